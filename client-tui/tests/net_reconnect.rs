//! The network task against the real daemon (in this process, real TLS): sign-in, a token
//! that survives the process, and messages typed while the daemon is down that are sent
//! exactly once after it comes back.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use messenger_client_tui::app::{Command, ConnState, ConvKey, NetEvent};
use messenger_client_tui::net::{self, NetConfig};
use messenger_client_tui::store::TokenStore;
use messenger_daemon::{Config, RunningServer};
use messenger_protocol::client::{Client, ConnectOptions, Trust};
use tokio::sync::mpsc;

async fn daemon(dir: &Path, addr: SocketAddr) -> RunningServer {
    let mut c = Config {
        listen: addr,
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.passwords.argon2_memory_kib = 1024;
    c.passwords.argon2_iterations = 1;
    c.store.sqlite_sync_full = false;
    c.timeouts.shutdown_drain_secs = 1;
    RunningServer::start(c).await.expect("daemon starts")
}

struct Tui {
    cmds: mpsc::UnboundedSender<Command>,
    events: mpsc::UnboundedReceiver<NetEvent>,
}

impl Tui {
    fn start(opts: ConnectOptions, config_dir: &Path) -> Tui {
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let (tx, events) = mpsc::unbounded_channel();
        let store = TokenStore::open(Some(config_dir.to_path_buf())).expect("store");
        tokio::spawn(net::run(
            NetConfig {
                opts,
                store,
                device_name: "test".into(),
            },
            cmd_rx,
            tx,
        ));
        Tui { cmds, events }
    }

    /// The first event `pick` accepts, skipping others; fails after 20 s.
    async fn expect<T>(&mut self, what: &str, mut pick: impl FnMut(&NetEvent) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ev = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .expect("network task alive");
            if let Some(t) = pick(&ev) {
                return t;
            }
        }
    }

    fn send(&self, c: Command) {
        self.cmds.send(c).expect("network task alive");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_typed_while_the_server_is_down_are_sent_once_after_it_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let server = daemon(&data, "127.0.0.1:0".parse().expect("addr")).await;
    let addr = server.addr;
    let ca = server.dev_ca.clone().expect("dev CA");
    let opts = ConnectOptions::new(addr.to_string(), Trust::CaFile(ca));

    let mut bob = Client::connect(opts.clone()).await.expect("bob connects");
    let bob_user = bob
        .register("bob", "bob-password", "Bob")
        .await
        .expect("register bob");
    bob.login("bob", "bob-password", "sdk")
        .await
        .expect("login");

    let config = dir.path().join("config");
    let mut tui = Tui::start(opts.clone(), &config);
    tui.expect("the sign-in request", |e| {
        matches!(e, NetEvent::SignedOut(None)).then_some(())
    })
    .await;
    tui.send(Command::SignIn {
        username: "alice".into(),
        password: "alice-password".into(),
        register: Some("Alice".into()),
    });
    let alice = tui
        .expect("sign-in", |e| match e {
            NetEvent::SignedIn(u) => Some(u.clone()),
            _ => None,
        })
        .await;
    assert_eq!(alice.username, "alice");
    assert!(
        TokenStore::open(Some(config.clone()))
            .expect("store")
            .load(&addr.to_string())
            .expect("load")
            .is_some(),
        "the session token was saved"
    );

    server.shutdown().await;
    tui.expect("the reconnect countdown", |e| {
        matches!(e, NetEvent::State(ConnState::Reconnecting { .. })).then_some(())
    })
    .await;
    // Typed while offline.
    let to = ConvKey::Direct(bob_user.user_id);
    for (id, body) in [("queued-1", "first while away"), ("queued-2", "second")] {
        tui.send(Command::Send {
            to,
            client_msg_id: id.into(),
            body: body.into(),
        });
    }

    let server = daemon(&data, addr).await;
    let mut sent = Vec::new();
    while sent.len() < 2 {
        let id = tui
            .expect("the queued messages accepted", |e| match e {
                NetEvent::Sent { client_msg_id, .. } => Some(client_msg_id.clone()),
                _ => None,
            })
            .await;
        sent.push(id);
    }
    assert_eq!(sent, vec!["queued-1", "queued-2"], "in typing order");

    // Bob gets each exactly once (his SDK client drops replayed duplicates by seq, so also
    // compare what the server stored).
    bob.reconnect_with_backoff(50)
        .await
        .expect("bob reconnects");
    let mut got = Vec::new();
    while got.len() < 2 {
        let d = bob
            .next_delivery(Duration::from_secs(10))
            .await
            .expect("delivery");
        let m = d.message.expect("message");
        got.push(String::from_utf8_lossy(&m.body).into_owned());
    }
    assert_eq!(got, vec!["first while away", "second"]);
    let page = bob
        .conn()
        .history(
            messenger_protocol::client::Recipient::User(alice.user_id),
            0,
            50,
        )
        .await
        .expect("history");
    assert_eq!(
        page.messages.len(),
        2,
        "nothing doubled: {:?}",
        page.messages
    );

    // A message to Alice reaches the task live.
    bob.conn()
        .send_text(
            messenger_protocol::client::Recipient::User(alice.user_id),
            "welcome back",
        )
        .await
        .expect("send");
    tui.expect("bob's message", |e| match e {
        NetEvent::Message(m) if m.body.as_ref() == b"welcome back" => Some(()),
        _ => None,
    })
    .await;

    // Logging out forgets the token and asks for the sign-in form again.
    tui.send(Command::Logout);
    tui.expect("the sign-in form after logout", |e| {
        matches!(e, NetEvent::SignedOut(None)).then_some(())
    })
    .await;
    assert_eq!(
        TokenStore::open(Some(config))
            .expect("store")
            .load(&addr.to_string())
            .expect("load"),
        None
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_reported_with_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = daemon(
        &dir.path().join("data"),
        "127.0.0.1:0".parse().expect("addr"),
    )
    .await;
    let opts = ConnectOptions::new(server.addr.to_string(), Trust::Fingerprint([7; 32]));
    let mut tui = Tui::start(opts, &dir.path().join("config"));
    let why = tui
        .expect("the offline state", |e| match e {
            NetEvent::State(ConnState::Offline(why)) => Some(why.clone()),
            NetEvent::SignedOut(_) | NetEvent::SignedIn(_) => {
                panic!("connected despite a wrong fingerprint: {e:?}")
            }
            _ => None,
        })
        .await;
    assert!(why.contains("is not trusted"), "{why}");
    assert!(
        why.contains("--ca") && why.contains("--fingerprint"),
        "{why}"
    );
    server.shutdown().await;
}
