//! Inputs and configurations that crashed a fuzz target (`fuzz/`), replayed through the same
//! entry point the target uses: a session over an in-memory stream, with the real store.

mod common;

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use messenger_daemon::state::Shared;
use messenger_protocol::PROTOCOL_VERSION;
use messenger_protocol::pb::{self, client_frame::Kind as Req, server_frame::Kind as Resp};
use prost::Message as _;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// fuzz/session, first input: with `max_frame_bytes` at its smallest valid value (4096, body
/// limit 0) every WebSocket session panicked while being set up (tungstenite requires the
/// write-buffer cap to exceed the 16 KiB write buffer; the cap was 4 × 4096).
#[tokio::test]
async fn a_websocket_session_with_the_smallest_valid_frame_limit_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = common::test_config(dir.path());
    config.limits.max_body_bytes = 0;
    config.limits.max_frame_bytes = 4096;
    config
        .validate()
        .expect("an operator may run this configuration");
    let store = messenger_daemon::store::open(&config).await.expect("store");
    let shared = Arc::new(Shared::new(config, store).expect("shared state"));
    let (client, server) = tokio::io::duplex(64 * 1024);
    let peer = "127.0.0.1:50000".parse().expect("addr");
    let task = tokio::spawn(messenger_daemon::web::serve(
        shared,
        server,
        peer,
        CancellationToken::new(),
    ));
    let (mut ws, _) = tokio_tungstenite::client_async("ws://localhost/start", client)
        .await
        .expect("upgrade");
    let hello = pb::ClientFrame {
        request_id: 1,
        kind: Some(Req::Hello(pb::Hello {
            protocol_version: PROTOCOL_VERSION,
            client: "regression".into(),
        })),
    };
    ws.send(Message::Binary(hello.encode_to_vec().into()))
        .await
        .expect("send Hello");
    let answer = loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => break pb::ServerFrame::decode(b).expect("frame"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("no answer to Hello: {other:?}"),
        }
    };
    match answer.kind {
        Some(Resp::HelloOk(ok)) => {
            assert_eq!(ok.limits.expect("limits").max_frame_bytes, 4096);
        }
        other => panic!("Hello answered by {other:?}"),
    }
    drop(ws);
    task.await
        .expect("the connection task ends without a panic");
}
