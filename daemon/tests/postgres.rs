//! The daemon on the PostgreSQL backend: end to end over the real protocol, and through a
//! database outage (PostgreSQL stopped and started again under a running daemon).
//!
//! Needs PostgreSQL: the shared server at `MESSENGER_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), and Debian's server binaries for the
//! throwaway instance. Missing either is a failure with instructions, never a skip.

mod common;

use bytes::Bytes;
use common::{TestServer, assert_quiet, code, deliveries, text, use_postgres};
use messenger_daemon::testing::{TestDatabase, ThrowawayPostgres};
use messenger_protocol::ErrorCode;
use messenger_protocol::client::Recipient;
use tokio_postgres::NoTls;

#[tokio::test]
async fn a_direct_message_goes_through_postgres() {
    let db = TestDatabase::create("msgtest_daemon").await;
    let ts = TestServer::start_with(|c| use_postgres(c, &db.url)).await;
    let (alice, _) = ts.user("alice").await;
    let (mut bob, bob_user) = ts.user("bob").await;
    let sent = alice
        .conn()
        .send_text(Recipient::User(bob_user.user_id), "hello over postgres")
        .await
        .expect("send");
    let got = deliveries(&mut bob, 1).await;
    assert_eq!(text(&got[0]), "hello over postgres");
    assert_eq!(
        got[0].message.as_ref().map(|m| m.message_id),
        Some(sent.message_id)
    );
    ts.stop().await;

    // The daemon really wrote to PostgreSQL, not to a file in its data directory.
    let (client, connection) = tokio_postgres::connect(&db.url, NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .expect("count");
    assert_eq!(row.try_get::<_, i64>(0).expect("count column"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_fails_sends_as_unavailable_and_the_daemon_recovers() {
    let pg = tokio::task::spawn_blocking(ThrowawayPostgres::start)
        .await
        .expect("start PostgreSQL");
    let url = pg.url();
    let ts = TestServer::start_with(|c| use_postgres(c, &url)).await;
    let (alice, _) = ts.user("alice").await;
    let (mut bob, bob_user) = ts.user("bob").await;
    let to_bob = Recipient::User(bob_user.user_id);
    let send = |id: &'static str| {
        alice
            .conn()
            .send_message(to_bob, id, Bytes::from(id), "text/plain")
    };

    send("before").await.expect("send before the outage");
    assert_eq!(text(&deliveries(&mut bob, 1).await[0]), "before");

    let pg = tokio::task::spawn_blocking(move || {
        pg.stop();
        pg
    })
    .await
    .expect("stop PostgreSQL");
    for id in ["during-1", "during-2"] {
        match send(id).await {
            Ok(sent) => panic!("{id} was answered Sent ({sent:?}) while PostgreSQL was down"),
            Err(e) => assert_eq!(code(&e), Some(ErrorCode::Unavailable), "{id}: {e}"),
        }
    }

    let pg = tokio::task::spawn_blocking(move || {
        pg.start_again();
        pg
    })
    .await
    .expect("restart PostgreSQL");
    // Same client connections, same daemon: the pool replaces its dead connections.
    let mut accepted = Vec::new();
    for id in ["after-1", "during-1", "after-2"] {
        let sent = send(id).await.expect("send after PostgreSQL came back");
        assert!(
            !sent.duplicate,
            "{id} was never stored, so it is no duplicate"
        );
        accepted.push(id);
    }
    assert!(!alice.conn().is_closed() && !bob.conn().is_closed());
    let got: Vec<String> = deliveries(&mut bob, accepted.len())
        .await
        .iter()
        .map(text)
        .collect();
    assert_eq!(got, accepted);
    assert_quiet(&mut bob).await;
    // And the store agrees: the conversation holds exactly the accepted messages, in order.
    let alice_id = alice.user().expect("logged in").user_id;
    let page = bob
        .conn()
        .history(Recipient::User(alice_id), 0, 50)
        .await
        .expect("history");
    let mut bodies: Vec<String> = page
        .messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    bodies.reverse();
    assert_eq!(bodies, ["before", "after-1", "during-1", "after-2"]);
    ts.stop().await;
    drop(pg);
}
