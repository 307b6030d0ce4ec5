//! End to end: the real daemon (in this process, real TLS on 127.0.0.1:0) and two real
//! `messenger` processes in tmux, driven with `send-keys` and read with `capture-pane`,
//! the way a person at a terminal uses them.
//!
//! tmux is required: without it this test fails with the command to install it.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use messenger_daemon::{Config, RunningServer};

const WIDTH: u16 = 100;
const HEIGHT: u16 = 30;

/// A private tmux server (its own socket), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Tmux {
        match Command::new("tmux").arg("-V").output() {
            Ok(o) if o.status.success() => {}
            _ => panic!(
                "tmux is needed by this end-to-end test and was not found; \
                 install it with: apt-get install -y tmux"
            ),
        }
        Tmux {
            socket: format!("messenger-e2e-{}", std::process::id()),
        }
    }

    fn cmd(&self, args: &[&str]) -> Output {
        let out = Command::new("tmux")
            // -u: the clients' UTF-8 output is kept as is, not replaced by '_'.
            .args(["-u", "-L", &self.socket])
            .args(args)
            .env_remove("TMUX")
            .env("LANG", "C.UTF-8")
            .output()
            .expect("run tmux");
        assert!(
            out.status.success(),
            "tmux {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn start(&self, name: &str, command: &str) {
        let (w, h) = (WIDTH.to_string(), HEIGHT.to_string());
        self.cmd(&["new-session", "-d", "-s", name, "-x", &w, "-y", &h, command]);
        // Keep the pane after the client exits, so a crash leaves its message to read.
        self.cmd(&["set-option", "-t", name, "remain-on-exit", "on"]);
    }

    fn keys(&self, name: &str, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", name];
        args.extend_from_slice(keys);
        self.cmd(&args);
    }

    fn type_text(&self, name: &str, text: &str) {
        self.cmd(&["send-keys", "-t", name, "-l", text]);
    }

    fn capture(&self, name: &str) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", name]).stdout).into_owned()
    }

    fn pane_field(&self, name: &str, format: &str) -> String {
        let out = self.cmd(&["display-message", "-p", "-t", name, format]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Waits until the screen satisfies `ok`; fails with the screen otherwise.
    fn wait_for(&self, name: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let screen = self.capture(name);
            if ok(&screen) {
                return screen;
            }
            if Instant::now() > deadline {
                panic!("{name}: timed out waiting for {what}; the screen is:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let tmux = |args: &[&str]| {
            Command::new("tmux")
                .args(["-L", &self.socket])
                .args(args)
                .env_remove("TMUX")
                .output()
        };
        let socket = tmux(&["display-message", "-p", "#{socket_path}"])
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        let _ = tmux(&["kill-server"]);
        // A killed server may leave its socket file behind.
        if let Some(path) = socket.filter(|p| !p.is_empty()) {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn daemon(rt: &tokio::runtime::Runtime, dir: &Path) -> RunningServer {
    let mut c = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.passwords.argon2_memory_kib = 1024;
    c.passwords.argon2_iterations = 1;
    c.store.sqlite_sync_full = false;
    rt.block_on(RunningServer::start(c)).expect("daemon starts")
}

/// Registers through the sign-in form and waits for the main screen.
fn register(tmux: &Tmux, who: &str, display: &str) {
    tmux.wait_for(who, "the sign-in form", |s| {
        s.contains("Log in") && s.contains("Username")
    });
    tmux.keys(who, &["C-r"]);
    tmux.wait_for(who, "the register form", |s| s.contains("Display name"));
    tmux.type_text(who, who);
    tmux.keys(who, &["Tab"]);
    tmux.type_text(who, &format!("{who}-password"));
    tmux.keys(who, &["Tab"]);
    tmux.type_text(who, display);
    tmux.keys(who, &["Enter"]);
    tmux.wait_for(who, "the main screen", |s| {
        s.contains("connected")
            && s.contains(&format!("{who} ({display})"))
            && s.contains("Conversations")
    });
}

#[test]
fn two_terminal_clients_exchange_direct_and_group_messages_in_tmux() {
    let tmux = Tmux::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let server = daemon(&rt, dir.path());
    let ca = server.dev_ca.clone().expect("dev CA");
    let bin = env!("CARGO_BIN_EXE_messenger");
    for who in ["alice", "bob"] {
        let config = dir.path().join(format!("config-{who}"));
        tmux.start(
            who,
            &format!(
                "{bin} --server {} --ca {} --config-dir {}",
                server.addr,
                ca.display(),
                config.display()
            ),
        );
    }
    register(&tmux, "alice", "Alice");
    register(&tmux, "bob", "Bob");

    // A direct message, typed by Alice, with text that needs care on a terminal.
    tmux.type_text("alice", "/dm bob");
    tmux.keys("alice", &["Enter"]);
    tmux.wait_for("alice", "the conversation with Bob", |s| {
        s.contains("@ Bob")
    });
    // Pasted (bracketed paste), since a typed ESC is a key to the terminal, not text.
    tmux.type_text("alice", "hello Bob, 你好 👋 ");
    tmux.cmd(&["set-buffer", "-b", "e2e", "\u{1b}[31mnot red\u{7}"]);
    tmux.cmd(&["paste-buffer", "-p", "-d", "-b", "e2e", "-t", "alice"]);
    tmux.keys("alice", &["Enter"]);
    let alice = tmux.wait_for("alice", "the message accepted", |s| {
        s.contains("✓") && s.contains("Alice: hello Bob, 你好")
    });
    assert!(
        alice.contains("^[[31mnot red"),
        "escape not neutralized:\n{alice}"
    );

    // Bob had nothing open: the new conversation opens and shows Alice's message.
    let bob = tmux.wait_for("bob", "Alice's message", |s| {
        s.contains("@ Alice") && s.contains("Alice: hello Bob, 你好 👋 ^[[31mnot red^G")
    });
    assert!(
        !bob.contains("(1)"),
        "an open conversation has no unread count:\n{bob}"
    );

    // A group, made and written to by Bob through slash commands.
    tmux.type_text("bob", "/group new crew alice");
    tmux.keys("bob", &["Enter"]);
    tmux.wait_for("bob", "the new group", |s| {
        s.contains("# crew") && s.contains("to crew")
    });
    tmux.type_text("bob", "hi crew");
    tmux.keys("bob", &["Enter"]);
    tmux.wait_for("bob", "the group message accepted", |s| {
        s.contains("✓") && s.contains("Bob: hi crew")
    });

    // Alice is in the direct conversation: the group shows up with one unread message,
    // first in the list (newest activity).
    let alice = tmux.wait_for("alice", "the group with an unread message", |s| {
        s.contains("# crew (1)")
    });
    let crew_row = alice.find("# crew").expect("crew listed");
    let bob_row = alice.find("@ Bob").expect("bob listed");
    assert!(crew_row < bob_row, "the group is not first:\n{alice}");
    tmux.keys("alice", &["Tab"]);
    tmux.wait_for("alice", "the group opened", |s| {
        s.contains("Bob: hi crew") && !s.contains("(1)")
    });
    // Alice answers in the group; Bob sees it.
    tmux.type_text("alice", "hi Bob, in the group");
    tmux.keys("alice", &["Enter"]);
    tmux.wait_for("bob", "Alice's group reply", |s| {
        s.contains("Alice: hi Bob, in the group")
    });

    // Members, through the command.
    tmux.type_text("bob", "/group members");
    tmux.keys("bob", &["Enter"]);
    tmux.wait_for("bob", "the member list", |s| {
        s.contains("Members of crew")
            && s.contains("Alice (alice)")
            && s.contains("Bob (bob)  admin")
    });
    tmux.keys("bob", &["Escape"]);

    let main_screen = tmux.capture("alice");
    println!("alice's main screen:\n{main_screen}");

    // Quitting restores the terminal; the token was saved with mode 0600, and the next start
    // resumes without the sign-in form.
    tmux.keys("alice", &["C-c"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux.pane_field("alice", "#{pane_dead}") != "1" {
        assert!(
            Instant::now() < deadline,
            "alice did not exit on Ctrl-C:
{}",
            tmux.capture("alice")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The alternate screen was left: the shell's (empty) screen is back.
    let after = tmux.capture("alice");
    assert!(
        !after.contains("Conversations"),
        "screen not restored:
{after}"
    );
    let token = dir.path().join("config-alice/sessions");
    let entries: Vec<_> = std::fs::read_dir(&token)
        .expect("sessions dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&entries[0])
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    tmux.cmd(&["respawn-pane", "-t", "alice"]);
    tmux.wait_for("alice", "the resumed session with history", |s| {
        s.contains("connected")
            && s.contains("alice (Alice)")
            && s.contains("# crew")
            && s.contains("hi Bob, in the group")
            && !s.contains("Username:")
    });

    rt.block_on(server.shutdown());
}
