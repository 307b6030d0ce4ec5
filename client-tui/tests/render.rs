//! Rendering through ratatui's `TestBackend`: what a user would see for a given state.

use std::time::{Duration, Instant};

use messenger_client_tui::app::{App, ConnState, ConvKey, NetEvent};
use messenger_client_tui::ui::{self, RenderInfo, sanitize, wrap};
use messenger_protocol::pb;
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;

fn user(id: u64, name: &str) -> pb::User {
    pb::User {
        user_id: id,
        username: name.to_lowercase(),
        display_name: name.into(),
    }
}

fn msg(id: u64, from: &pb::User, to: pb::message::To, text: &str) -> pb::Message {
    pb::Message {
        message_id: id,
        sender: Some(from.clone()),
        to: Some(to),
        client_msg_id: format!("c{id}"),
        body: text.as_bytes().to_vec().into(),
        content_type: "text/plain".into(),
        // 12:34 UTC on some day.
        server_time_ms: (12 * 3600 + 34 * 60) * 1000 + id as i64,
    }
}

fn signed_in() -> App {
    let mut app = App::new("127.0.0.1:7443");
    app.on_net(NetEvent::SignedIn(user(1, "Alice")));
    app.on_net(NetEvent::State(ConnState::Connected));
    app
}

fn draw(app: &App, w: u16, h: u16) -> (Buffer, RenderInfo) {
    let mut t = Terminal::new(TestBackend::new(w, h)).expect("terminal");
    let mut info = RenderInfo::default();
    t.draw(|f| info = ui::render(f, app, Instant::now()))
        .expect("draw");
    (t.backend().buffer().clone(), info)
}

/// The screen as text rows; wide characters' trailing cells are skipped, as a terminal shows them.
fn rows(buf: &Buffer) -> Vec<String> {
    let area = buf.area;
    (0..area.height)
        .map(|y| {
            let mut s = String::new();
            let mut skip = 0;
            for x in 0..area.width {
                if skip > 0 {
                    skip -= 1;
                    continue;
                }
                let sym = buf[(x, y)].symbol();
                skip = unicode_width::UnicodeWidthStr::width(sym).saturating_sub(1);
                s.push_str(sym);
            }
            s
        })
        .collect()
}

fn screen(buf: &Buffer) -> String {
    rows(buf).join("\n")
}

#[test]
fn the_conversation_list_shows_titles_unread_counts_newest_first() {
    let mut app = signed_in();
    let bob = user(2, "Bob");
    let carol = user(3, "Carol");
    app.on_net(NetEvent::Message(msg(
        1,
        &bob,
        pb::message::To::UserId(1),
        "hi",
    )));
    app.on_net(NetEvent::Message(msg(
        2,
        &carol,
        pb::message::To::UserId(1),
        "a",
    )));
    app.on_net(NetEvent::Message(msg(
        3,
        &carol,
        pb::message::To::UserId(1),
        "b",
    )));
    app.on_net(NetEvent::Message(msg(
        4,
        &carol,
        pb::message::To::GroupId(5),
        "g",
    )));
    app.on_net(NetEvent::Group {
        group: pb::Group {
            group_id: 5,
            name: "crew".into(),
            members: vec![],
            created_at_ms: 0,
        },
        open: false,
    });
    let (buf, _) = draw(&app, 80, 20);
    let r = rows(&buf);
    assert!(r[1].starts_with("│# crew (1)"), "{}", screen(&buf));
    assert!(r[2].starts_with("│@ Carol (2)"), "{}", screen(&buf));
    assert!(r[3].starts_with("│@ Bob  "), "{}", screen(&buf));
    // The open conversation (Bob's, opened first) is highlighted.
    let bob_cell = &buf[(2, 3)];
    assert_eq!(bob_cell.bg, ratatui::style::Color::DarkGray);
    // Status bar: connection and user.
    let last = r.last().expect("status");
    assert!(last.contains("connected"), "{last}");
    assert!(last.contains("alice (Alice) @ 127.0.0.1:7443"), "{last}");
}

#[test]
fn own_messages_show_pending_then_sent() {
    let mut app = signed_in();
    app.on_net(NetEvent::DirectOpened(user(2, "Bob")));
    let cmds = app.queue_message(ConvKey::Direct(2), "on my way".into());
    let (buf, _) = draw(&app, 70, 12);
    let s = screen(&buf);
    assert!(s.contains("… "), "{s}");
    assert!(s.contains("Alice: on my way"), "{s}");
    assert!(!s.contains('✓'), "{s}");
    let Some(messenger_client_tui::app::Command::Send { client_msg_id, .. }) = cmds.last() else {
        panic!("no send");
    };
    app.on_net(NetEvent::Sent {
        to: ConvKey::Direct(2),
        client_msg_id: client_msg_id.clone(),
        message_id: 9,
        time_ms: (12 * 3600 + 35 * 60) * 1000,
    });
    let (buf, _) = draw(&app, 70, 12);
    let s = screen(&buf);
    assert!(s.contains("✓ 12:35 Alice: on my way"), "{s}");
    // Someone else's message has no delivery mark.
    app.on_net(NetEvent::Message(msg(
        10,
        &user(2, "Bob"),
        pb::message::To::UserId(1),
        "ok",
    )));
    let (buf, _) = draw(&app, 70, 12);
    assert!(screen(&buf).contains("  12:34 Bob: ok"), "{}", screen(&buf));
}

#[test]
fn control_characters_and_escapes_are_shown_not_obeyed() {
    assert_eq!(sanitize("a\u{1b}[2Jb"), "a^[[2Jb");
    assert_eq!(sanitize("bell\u{7}\u{0}\u{7f}"), "bell^G^@^?");
    assert_eq!(sanitize("c1\u{9b}31m"), "c1\u{fffd}31m");
    assert_eq!(sanitize("rlo\u{202e}txt"), "rlo\u{fffd}txt");
    assert_eq!(sanitize("tab\tx"), "tab    x");
    assert_eq!(sanitize("שלום 你好 👋"), "שלום 你好 👋");

    let mut app = signed_in();
    let evil = user(2, "Eve\u{1b}]0;pwned\u{7}");
    app.on_net(NetEvent::Message(msg(
        1,
        &evil,
        pb::message::To::UserId(1),
        "\u{1b}[31mred\u{1b}[0m\r\u{8}\u{9b}2J\u{90}x",
    )));
    let (buf, _) = draw(&app, 90, 10);
    for cell in buf.content() {
        for c in cell.symbol().chars() {
            assert!(
                !c.is_control(),
                "control character {c:?} reached the terminal:\n{}",
                screen(&buf)
            );
        }
    }
    let s = screen(&buf);
    assert!(
        s.contains("Eve^[]0;pwned^G: ^[[31mred^[[0m^M^H\u{fffd}2J\u{fffd}x"),
        "{s}"
    );
    assert!(s.contains("@ Eve^[]0;pwned^G"), "{s}");
}

#[test]
fn long_lines_and_wide_characters_wrap_within_the_view() {
    assert_eq!(wrap("abcdefgh", 3, 4), vec!["abc", "defg", "h"]);
    assert_eq!(wrap("hello big world", 9, 9), vec!["hello big", "world"]);
    assert_eq!(
        wrap("hello big world", 8, 8),
        vec!["hello ", "big ", "world"]
    );
    // A wide character never straddles the edge.
    assert_eq!(wrap("你好世界", 5, 5), vec!["你好", "世界"]);
    assert_eq!(wrap("", 5, 5), vec![""]);

    let mut app = signed_in();
    let bob = user(2, "Bob");
    let long = "x".repeat(5000);
    app.on_net(NetEvent::Message(msg(
        1,
        &bob,
        pb::message::To::UserId(1),
        &long,
    )));
    app.on_net(NetEvent::Message(msg(
        2,
        &bob,
        pb::message::To::UserId(1),
        &"漢字👍".repeat(40),
    )));
    let (buf, _) = draw(&app, 60, 20);
    let s = screen(&buf);
    for row in rows(&buf) {
        assert_eq!(
            unicode_width::UnicodeWidthStr::width(row.as_str()),
            60,
            "row overflows:\n{s}"
        );
    }
    assert!(s.contains("漢字👍"), "{s}");
    assert!(s.contains("xxxxxxxx"), "{s}");
}

#[test]
fn a_ten_thousand_message_conversation_draws_its_end_and_scrolls() {
    let mut app = signed_in();
    let bob = user(2, "Bob");
    app.on_net(NetEvent::DirectOpened(bob.clone()));
    let page: Vec<pb::Message> = (1..=10_000)
        .rev()
        .map(|i| msg(i, &bob, pb::message::To::UserId(1), &format!("message {i}")))
        .collect();
    app.on_net(NetEvent::History {
        conv: ConvKey::Direct(2),
        messages: page,
        has_more: false,
    });
    let started = Instant::now();
    let (buf, info) = draw(&app, 80, 24);
    let s = screen(&buf);
    assert!(s.contains("Bob: message 10000"), "{s}");
    assert!(!s.contains("message 9900"), "{s}");
    assert_eq!(info.top_reached, None, "the top is far away");
    app.scroll = 9_990;
    let (buf, _) = draw(&app, 80, 24);
    let s = screen(&buf);
    assert!(s.contains("Bob: message 5"), "{s}");
    assert!(s.contains("lines up"), "{s}");
    // Past the top: clamped, the beginning shown, and the renderer says so.
    app.scroll = 20_000;
    let (buf, info) = draw(&app, 80, 24);
    let s = screen(&buf);
    assert!(s.contains("beginning of the conversation"), "{s}");
    assert!(s.contains("Bob: message 1\u{20}"), "{s}");
    let max = info.top_reached.expect("top reached");
    app.clamp_scroll(max);
    assert_eq!(app.scroll, max);
    // Not a timing assertion of the design, just a guard against drawing all 10,000 rows
    // per frame by accident (that takes far longer than this even in a debug build).
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn tiny_and_resized_terminals_draw_without_panicking() {
    let mut app = signed_in();
    let bob = user(2, "Bob");
    app.on_net(NetEvent::Message(msg(
        1,
        &bob,
        pb::message::To::UserId(1),
        "👋 hello 你好 مرحبا",
    )));
    app.input.set("typed\nacross lines 你好".into());
    for (w, h) in [
        (1, 1),
        (2, 3),
        (10, 4),
        (20, 6),
        (40, 8),
        (200, 60),
        (15, 40),
    ] {
        let (buf, _) = draw(&app, w, h);
        assert_eq!(buf.area.width, w);
    }
    app.on_net(NetEvent::SignedOut(Some("expired".into())));
    for (w, h) in [(1, 1), (30, 5), (100, 30)] {
        draw(&app, w, h);
    }
}

#[test]
fn the_sign_in_screen_shows_the_server_and_masks_the_password() {
    let mut app = App::new("chat.example:7443");
    app.on_net(NetEvent::SignedOut(None));
    app.paste("alice");
    app.on_key(crossterm::event::KeyEvent::new(
        crossterm::event::KeyCode::Tab,
        crossterm::event::KeyModifiers::NONE,
    ));
    app.paste("hunter2");
    let (buf, _) = draw(&app, 80, 20);
    let s = screen(&buf);
    assert!(s.contains("Server: chat.example:7443"), "{s}");
    assert!(s.contains("Username: alice"), "{s}");
    assert!(s.contains("Password: •••••••"), "{s}");
    assert!(!s.contains("hunter2"), "{s}");
    app.on_net(NetEvent::SignInFailed(
        "a rather long reason from the server that does not fit on one line of the form, \
         so it wraps onto the next"
            .into(),
    ));
    let (buf, _) = draw(&app, 80, 20);
    let s = screen(&buf);
    assert!(s.contains("so it wraps onto the next"), "{s}");
    app.on_net(NetEvent::State(ConnState::Reconnecting {
        at: Instant::now() + Duration::from_millis(2500),
        error: "connection refused".into(),
    }));
    let (buf, _) = draw(&app, 80, 20);
    let s = screen(&buf);
    assert!(s.contains("reconnecting in 3s"), "{s}");
    assert!(s.contains("connection refused"), "{s}");
    app.on_net(NetEvent::State(ConnState::Offline(
        "the certificate of chat.example:7443 is not trusted".into(),
    )));
    let (buf, _) = draw(&app, 100, 20);
    let s = screen(&buf);
    assert!(s.contains("offline"), "{s}");
    assert!(s.contains("is not trusted"), "{s}");
}

#[test]
fn help_and_members_overlays() {
    let mut app = signed_in();
    app.run_slash(messenger_client_tui::app::Slash::Help);
    let (buf, _) = draw(&app, 100, 30);
    let s = screen(&buf);
    assert!(s.contains("Help"), "{s}");
    assert!(s.contains("/group new NAME USER..."), "{s}");
    app.on_net(NetEvent::Group {
        group: pb::Group {
            group_id: 3,
            name: "crew".into(),
            members: vec![
                pb::GroupMember {
                    user: Some(user(1, "Alice")),
                    admin: true,
                },
                pb::GroupMember {
                    user: Some(user(2, "Bob")),
                    admin: false,
                },
            ],
            created_at_ms: 1,
        },
        open: true,
    });
    app.overlay = messenger_client_tui::app::Overlay::Members(ConvKey::Group(3));
    let (buf, _) = draw(&app, 100, 30);
    let s = screen(&buf);
    assert!(s.contains("Members of crew"), "{s}");
    assert!(s.contains("Alice (alice)  admin"), "{s}");
    assert!(s.contains("Bob (bob)"), "{s}");
    assert!(s.contains("crew · 2 members"), "{s}");
}
