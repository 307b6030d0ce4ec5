//! The state machine alone: keys and network events in, state and commands out.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use messenger_client_tui::app::{
    App, Command, ConvKey, DeliveryState, FormKind, NetEvent, Overlay, Slash, parse_slash,
};
use messenger_protocol::pb;

fn user(id: u64, name: &str) -> pb::User {
    pb::User {
        user_id: id,
        username: name.to_lowercase(),
        display_name: name.into(),
    }
}

fn direct(id: u64, from: &pb::User, to: u64, text: &str, time: i64) -> pb::Message {
    pb::Message {
        message_id: id,
        sender: Some(from.clone()),
        to: Some(pb::message::To::UserId(to)),
        client_msg_id: format!("c{id}"),
        body: text.as_bytes().to_vec().into(),
        content_type: "text/plain".into(),
        server_time_ms: time,
    }
}

fn group_msg(id: u64, from: &pb::User, group: u64, text: &str, time: i64) -> pb::Message {
    pb::Message {
        to: Some(pb::message::To::GroupId(group)),
        ..direct(id, from, 0, text, time)
    }
}

fn key(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

fn ctrl(c: char) -> KeyEvent {
    KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL)
}

fn type_str(app: &mut App, s: &str) -> Vec<Command> {
    let mut out = Vec::new();
    for c in s.chars() {
        out.extend(app.on_key(key(KeyCode::Char(c))));
    }
    out
}

/// Alice (id 1) signed in.
fn signed_in() -> App {
    let mut app = App::new("127.0.0.1:7443");
    app.on_net(NetEvent::SignedOut(None));
    app.on_net(NetEvent::SignedIn(user(1, "Alice")));
    app
}

#[test]
fn the_sign_in_form_sends_login_or_register() {
    let mut app = App::new("s:1");
    app.on_net(NetEvent::SignedOut(Some("session expired".into())));
    let form = app.sign_in.as_ref().expect("form shown");
    assert_eq!(form.error.as_deref(), Some("session expired"));
    type_str(&mut app, "alice");
    app.on_key(key(KeyCode::Tab));
    // Enter with an empty password is refused, nothing is sent.
    assert!(app.on_key(key(KeyCode::Enter)).is_empty());
    assert!(app.sign_in.as_ref().and_then(|f| f.error.clone()).is_some());
    type_str(&mut app, "pw pw");
    let cmds = app.on_key(key(KeyCode::Enter));
    assert_eq!(
        cmds,
        vec![Command::SignIn {
            username: "alice".into(),
            password: "pw pw".into(),
            register: None
        }]
    );
    // Refused: the form shows why and can be used again.
    app.on_net(NetEvent::SignInFailed("wrong password".into()));
    let form = app.sign_in.as_ref().expect("still there");
    assert!(!form.busy);
    assert_eq!(form.error.as_deref(), Some("wrong password"));
    // Ctrl-R switches to register, keeping what was typed; the display name defaults.
    app.on_key(ctrl('r'));
    assert!(matches!(
        app.sign_in.as_ref().map(|f| f.kind),
        Some(FormKind::SignIn { register: true })
    ));
    app.on_key(key(KeyCode::Tab));
    app.on_key(key(KeyCode::Tab));
    let cmds = app.on_key(key(KeyCode::Enter));
    assert_eq!(
        cmds,
        vec![Command::SignIn {
            username: "alice".into(),
            password: "pw pw".into(),
            register: Some("alice".into())
        }]
    );
    app.on_net(NetEvent::SignedIn(user(1, "Alice")));
    assert!(app.sign_in.is_none());
}

#[test]
fn why_the_saved_session_failed_stays_on_the_sign_in_form() {
    let mut app = App::new("s:1");
    app.on_net(NetEvent::SignedOut(Some(
        "the saved session is no longer valid".into(),
    )));
    type_str(&mut app, "ali");
    // The network task then waits for the form, saying so without a reason.
    app.on_net(NetEvent::SignedOut(None));
    let form = app.sign_in.as_ref().expect("form");
    assert_eq!(
        form.error.as_deref(),
        Some("the saved session is no longer valid")
    );
    assert_eq!(form.fields[0].value, "ali");
}

#[test]
fn conversations_are_ordered_by_last_activity_with_unread_counts() {
    let mut app = signed_in();
    let bob = user(2, "Bob");
    let carol = user(3, "Carol");
    let cmds = app.on_net(NetEvent::Message(direct(10, &bob, 1, "hi", 1000)));
    // The first conversation opens by itself and loads its history.
    assert_eq!(app.selected, Some(ConvKey::Direct(2)));
    assert!(cmds.contains(&Command::History {
        conv: ConvKey::Direct(2),
        before_message_id: 0
    }));
    app.on_net(NetEvent::Message(direct(11, &carol, 1, "one", 2000)));
    app.on_net(NetEvent::Message(direct(12, &carol, 1, "two", 3000)));
    let cmds = app.on_net(NetEvent::Message(group_msg(13, &bob, 7, "team", 4000)));
    // An unknown group's name is asked for.
    assert!(cmds.contains(&Command::GetGroup(7)));
    let order: Vec<ConvKey> = app.conversations.iter().map(|c| c.key).collect();
    assert_eq!(
        order,
        vec![ConvKey::Group(7), ConvKey::Direct(3), ConvKey::Direct(2)]
    );
    let unread = |app: &App, k| app.conversation(k).map(|c| c.unread);
    assert_eq!(unread(&app, ConvKey::Direct(3)), Some(2));
    assert_eq!(unread(&app, ConvKey::Group(7)), Some(1));
    // The open conversation does not count.
    assert_eq!(unread(&app, ConvKey::Direct(2)), Some(0));
    // Tab goes down the list (wrapping), and opening clears the count.
    app.on_key(key(KeyCode::Tab));
    assert_eq!(app.selected, Some(ConvKey::Group(7)));
    assert_eq!(unread(&app, ConvKey::Group(7)), Some(0));
    app.on_key(key(KeyCode::BackTab));
    assert_eq!(app.selected, Some(ConvKey::Direct(2)));
    // The group gets its name.
    app.on_net(NetEvent::Group {
        group: pb::Group {
            group_id: 7,
            name: "team".into(),
            members: vec![],
            created_at_ms: 0,
        },
        open: false,
    });
    assert_eq!(
        app.conversation(ConvKey::Group(7))
            .map(|c| c.title.as_str()),
        Some("team")
    );
}

#[test]
fn an_own_message_goes_pending_then_sent_and_is_never_doubled() {
    let mut app = signed_in();
    let alice = user(1, "Alice");
    app.on_net(NetEvent::DirectOpened(user(2, "Bob")));
    type_str(&mut app, "hello");
    let cmds = app.on_key(key(KeyCode::Enter));
    let [
        Command::Send {
            to,
            client_msg_id,
            body,
        },
    ] = cmds.as_slice()
    else {
        panic!("expected one send: {cmds:?}");
    };
    assert_eq!((*to, body.as_str()), (ConvKey::Direct(2), "hello"));
    assert!(app.input.text.is_empty());
    let conv = || app_conv(&app);
    fn app_conv(app: &App) -> Vec<(Option<u64>, DeliveryState)> {
        app.conversation(ConvKey::Direct(2))
            .map(|c| {
                c.messages
                    .iter()
                    .map(|m| (m.message_id, m.state.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
    assert_eq!(conv(), vec![(None, DeliveryState::Pending)]);
    // The own copy of the delivery (the sender's inbox gets one) arrives before `Sent`.
    let mut own = direct(50, &alice, 2, "hello", 5000);
    own.client_msg_id = client_msg_id.clone();
    app.on_net(NetEvent::Message(own.clone()));
    assert_eq!(app_conv(&app), vec![(Some(50), DeliveryState::Sent)]);
    app.on_net(NetEvent::Sent {
        to: ConvKey::Direct(2),
        client_msg_id: client_msg_id.clone(),
        message_id: 50,
        time_ms: 5000,
    });
    // A replay after a reconnect, and the same message in a history page.
    app.on_net(NetEvent::Message(own.clone()));
    app.on_net(NetEvent::History {
        conv: ConvKey::Direct(2),
        messages: vec![own],
        has_more: false,
    });
    assert_eq!(app_conv(&app), vec![(Some(50), DeliveryState::Sent)]);
}

#[test]
fn messages_typed_offline_stay_pending_in_order_until_accepted() {
    let mut app = signed_in();
    app.on_net(NetEvent::DirectOpened(user(2, "Bob")));
    app.on_net(NetEvent::State(
        messenger_client_tui::app::ConnState::Offline("down".into()),
    ));
    let mut ids = Vec::new();
    for text in ["one", "two"] {
        type_str(&mut app, text);
        for c in app.on_key(key(KeyCode::Enter)) {
            if let Command::Send { client_msg_id, .. } = c {
                ids.push(client_msg_id);
            }
        }
    }
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
    // A message from Bob arrives first; pending ones stay below it.
    app.on_net(NetEvent::Message(direct(60, &user(2, "Bob"), 1, "yo", 100)));
    app.on_net(NetEvent::Sent {
        to: ConvKey::Direct(2),
        client_msg_id: ids[0].clone(),
        message_id: 61,
        time_ms: 200,
    });
    let c = app.conversation(ConvKey::Direct(2)).expect("conv");
    let bodies: Vec<(&str, &DeliveryState)> = c
        .messages
        .iter()
        .map(|m| (m.body.as_str(), &m.state))
        .collect();
    assert_eq!(
        bodies,
        vec![
            ("yo", &DeliveryState::Sent),
            ("one", &DeliveryState::Sent),
            ("two", &DeliveryState::Pending)
        ]
    );
    app.on_net(NetEvent::SendFailed {
        to: ConvKey::Direct(2),
        client_msg_id: ids[1].clone(),
        error: "not a member".into(),
    });
    let last = app
        .conversation(ConvKey::Direct(2))
        .and_then(|c| c.messages.last())
        .map(|m| m.state.clone());
    assert_eq!(last, Some(DeliveryState::Failed("not a member".into())));
}

#[test]
fn quitting_with_unsent_messages_asks_twice() {
    let mut app = signed_in();
    app.on_net(NetEvent::DirectOpened(user(2, "Bob")));
    type_str(&mut app, "still pending");
    app.on_key(key(KeyCode::Enter));
    assert_eq!(app.unsent(), 1);
    app.on_key(ctrl('c'));
    assert!(!app.quit);
    assert!(
        app.notice
            .as_ref()
            .is_some_and(|(t, _)| t.contains("not sent"))
    );
    app.on_key(ctrl('c'));
    assert!(app.quit);
    // Nothing pending: one Ctrl-C is enough.
    let mut app = signed_in();
    app.on_key(ctrl('c'));
    assert!(app.quit);
}

#[test]
fn input_history_multiline_entry_and_paste() {
    let mut app = signed_in();
    app.on_net(NetEvent::DirectOpened(user(2, "Bob")));
    type_str(&mut app, "first");
    app.on_key(key(KeyCode::Enter));
    type_str(&mut app, "second");
    app.on_key(key(KeyCode::Enter));
    type_str(&mut app, "draft");
    app.on_key(key(KeyCode::Up));
    assert_eq!(app.input.text, "second");
    app.on_key(key(KeyCode::Up));
    assert_eq!(app.input.text, "first");
    app.on_key(key(KeyCode::Up));
    assert_eq!(app.input.text, "first");
    app.on_key(key(KeyCode::Down));
    app.on_key(key(KeyCode::Down));
    assert_eq!(app.input.text, "draft");
    app.on_key(ctrl('u'));

    // Ctrl-J and Alt-Enter insert newlines; Up/Down then move between lines, not history.
    type_str(&mut app, "a");
    app.on_key(ctrl('j'));
    type_str(&mut app, "bc");
    app.on_key(KeyEvent::new(KeyCode::Enter, KeyModifiers::ALT));
    type_str(&mut app, "d");
    assert_eq!(app.input.text, "a\nbc\nd");
    app.on_key(key(KeyCode::Up));
    assert_eq!(app.input.text, "a\nbc\nd");
    app.on_key(key(KeyCode::Char('X')));
    assert_eq!(app.input.text, "a\nbXc\nd");
    let cmds = app.on_key(key(KeyCode::Enter));
    assert!(matches!(cmds.as_slice(), [Command::Send { body, .. }] if body == "a\nbXc\nd"));

    // A paste keeps its newlines (CRLF normalized) and is not sent until Enter.
    app.paste("line 1\r\nline 2 👋 \u{1b}[2J");
    assert_eq!(app.input.text, "line 1\nline 2 👋 \u{1b}[2J");
    // Editing moves over whole characters, wide ones included.
    app.on_key(key(KeyCode::End));
    for _ in 0..5 {
        app.on_key(key(KeyCode::Backspace));
    }
    assert_eq!(app.input.text, "line 1\nline 2 👋");
    app.on_key(key(KeyCode::Backspace));
    assert_eq!(app.input.text, "line 1\nline 2 ");
}

#[test]
fn slash_commands_parse_and_become_requests() {
    assert_eq!(parse_slash("/dm bob"), Ok(Slash::Dm("bob".into())));
    assert_eq!(
        parse_slash("/group new crew alice bob"),
        Ok(Slash::GroupNew {
            name: "crew".into(),
            members: vec!["alice".into(), "bob".into()]
        })
    );
    assert_eq!(
        parse_slash("/group add carol dave"),
        Ok(Slash::GroupAdd(vec!["carol".into(), "dave".into()]))
    );
    assert_eq!(
        parse_slash("/group kick carol"),
        Ok(Slash::GroupKick("carol".into()))
    );
    assert_eq!(parse_slash("/group leave"), Ok(Slash::GroupLeave));
    assert_eq!(parse_slash("/group members"), Ok(Slash::GroupMembers));
    assert_eq!(parse_slash("/help"), Ok(Slash::Help));
    assert_eq!(
        parse_slash("/nick Big Al"),
        Ok(Slash::Nick("Big Al".into()))
    );
    assert_eq!(
        parse_slash("/groupadds nobody"),
        Ok(Slash::GroupAdds(pb::GroupAddPolicy::Nobody))
    );
    assert!(parse_slash("/groupadds everyone").is_err());
    assert!(parse_slash("/dm").is_err());
    assert!(parse_slash("/group kick").is_err());
    assert!(parse_slash("/frobnicate").is_err());

    let mut app = signed_in();
    type_str(&mut app, "/dm bob");
    assert_eq!(
        app.on_key(key(KeyCode::Enter)),
        vec![Command::OpenDirect {
            username: "bob".into()
        }]
    );
    // Group commands need an open group.
    type_str(&mut app, "/group leave");
    assert!(app.on_key(key(KeyCode::Enter)).is_empty());
    assert!(app.notice.as_ref().is_some_and(|(_, err)| *err));
    app.on_net(NetEvent::Group {
        group: pb::Group {
            group_id: 9,
            name: "crew".into(),
            members: vec![],
            created_at_ms: 1,
        },
        open: true,
    });
    assert_eq!(app.selected, Some(ConvKey::Group(9)));
    type_str(&mut app, "/group kick carol");
    assert_eq!(
        app.on_key(key(KeyCode::Enter)),
        vec![Command::RemoveMember {
            group_id: 9,
            username: "carol".into()
        }]
    );
    type_str(&mut app, "/group members");
    assert_eq!(app.on_key(key(KeyCode::Enter)), vec![Command::GetGroup(9)]);
    assert_eq!(app.overlay, Overlay::Members(ConvKey::Group(9)));
    // "//" sends a message that starts with "/".
    app.on_key(key(KeyCode::Esc));
    type_str(&mut app, "//not a command");
    let cmds = app.on_key(key(KeyCode::Enter));
    assert!(matches!(cmds.as_slice(), [Command::Send { body, .. }] if body == "/not a command"));
    // The message above is still pending: the first /quit warns, the second quits.
    type_str(&mut app, "/quit");
    app.on_key(key(KeyCode::Enter));
    assert!(!app.quit);
    type_str(&mut app, "/quit");
    app.on_key(key(KeyCode::Enter));
    assert!(app.quit);
}

#[test]
fn deleting_the_account_needs_the_typed_username() {
    let mut app = signed_in();
    type_str(&mut app, "/delete-account");
    app.on_key(key(KeyCode::Enter));
    assert!(matches!(&app.overlay, Overlay::Form(f) if f.kind == FormKind::DeleteAccount));
    type_str(&mut app, "secret");
    app.on_key(key(KeyCode::Tab));
    type_str(&mut app, "bob");
    assert!(app.on_key(key(KeyCode::Enter)).is_empty());
    assert!(matches!(&app.overlay, Overlay::Form(f) if f.error.is_some()));
    for _ in 0..3 {
        app.on_key(key(KeyCode::Backspace));
    }
    type_str(&mut app, "alice");
    assert_eq!(
        app.on_key(key(KeyCode::Enter)),
        vec![Command::DeleteAccount {
            password: "secret".into()
        }]
    );
    // Esc cancels a prompt without sending anything.
    let mut app = signed_in();
    app.on_key(KeyEvent::new(KeyCode::Char('d'), KeyModifiers::ALT));
    assert!(matches!(&app.overlay, Overlay::Form(f) if f.kind == FormKind::Dm));
    assert!(app.on_key(key(KeyCode::Esc)).is_empty());
    assert_eq!(app.overlay, Overlay::None);
}

#[test]
fn scrolling_to_the_top_loads_older_pages_one_at_a_time() {
    let mut app = signed_in();
    let bob = user(2, "Bob");
    app.on_net(NetEvent::DirectOpened(bob.clone()));
    let page: Vec<pb::Message> = (51..=100)
        .rev()
        .map(|i| direct(i, &bob, 1, &format!("m{i}"), i as i64))
        .collect();
    app.on_net(NetEvent::History {
        conv: ConvKey::Direct(2),
        messages: page,
        has_more: true,
    });
    let cmds = app.reached_top();
    assert_eq!(
        cmds,
        vec![Command::History {
            conv: ConvKey::Direct(2),
            before_message_id: 51
        }]
    );
    // Only one page in flight.
    assert!(app.reached_top().is_empty());
    let older: Vec<pb::Message> = (1..=50)
        .rev()
        .map(|i| direct(i, &bob, 1, &format!("m{i}"), i as i64))
        .collect();
    app.on_net(NetEvent::History {
        conv: ConvKey::Direct(2),
        messages: older,
        has_more: false,
    });
    let c = app.conversation(ConvKey::Direct(2)).expect("conv");
    let ids: Vec<u64> = c.messages.iter().filter_map(|m| m.message_id).collect();
    assert_eq!(ids, (1..=100).collect::<Vec<_>>());
    // The beginning: nothing more to ask.
    assert!(app.reached_top().is_empty());
    // PageUp/PageDown move by the view height.
    app.view_height = 12;
    app.on_key(key(KeyCode::PageUp));
    assert_eq!(app.scroll, 10);
    app.on_key(key(KeyCode::PageDown));
    assert_eq!(app.scroll, 0);
}

#[test]
fn what_arrived_while_away_is_counted_after_a_reconnect() {
    use messenger_client_tui::app::ConnState;
    let mut app = signed_in();
    app.on_net(NetEvent::State(ConnState::Connected));
    let bob = user(2, "Bob");
    app.on_net(NetEvent::Message(direct(1, &bob, 1, "live", 1)));
    assert_eq!(app.since_reconnect, None);
    app.on_net(NetEvent::State(ConnState::Reconnecting {
        at: std::time::Instant::now(),
        error: "connection lost".into(),
    }));
    app.on_net(NetEvent::State(ConnState::Connecting));
    app.on_net(NetEvent::State(ConnState::Connected));
    app.on_net(NetEvent::SignedIn(user(1, "Alice")));
    app.on_net(NetEvent::Message(direct(2, &bob, 1, "while away", 2)));
    app.on_net(NetEvent::Message(direct(
        3,
        &user(3, "Carol"),
        1,
        "me too",
        3,
    )));
    // A replayed duplicate does not count.
    app.on_net(NetEvent::Message(direct(2, &bob, 1, "while away", 2)));
    assert_eq!(app.since_reconnect, Some(2));
    assert!(
        app.notice
            .as_ref()
            .is_some_and(|(t, _)| t.starts_with("2 new message"))
    );
    assert_eq!(
        app.conversation(ConvKey::Direct(3)).map(|c| c.unread),
        Some(1)
    );
    app.on_key(key(KeyCode::Char('x')));
    assert_eq!(app.since_reconnect, None);
}
