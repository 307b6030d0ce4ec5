//! Direct and group messages, stamping, idempotency, multi-device and history.

mod common;

use bytes::Bytes;
use common::{TestServer, assert_quiet, code, deliveries, text};
use messenger_protocol::ErrorCode;
use messenger_protocol::client::Recipient;
use messenger_protocol::pb;

fn sender_of(d: &pb::Delivery) -> pb::User {
    d.message
        .as_ref()
        .and_then(|m| m.sender.clone())
        .expect("sender stamped")
}

#[tokio::test]
async fn a_direct_message_reaches_an_online_user_stamped_with_the_sender() {
    let ts = TestServer::start().await;
    let (mut alice, alice_user) = ts.user("alice").await;
    let (mut bob, bob_user) = ts.user("bob").await;
    let sent = alice
        .conn()
        .send_text(Recipient::User(bob_user.user_id), "hi bob")
        .await
        .expect("send");
    assert!(!sent.duplicate);
    let d = deliveries(&mut bob, 1).await;
    assert_eq!(text(&d[0]), "hi bob");
    let m = d[0].message.as_ref().expect("message");
    assert_eq!(m.message_id, sent.message_id);
    assert_eq!(m.server_time_ms, sent.server_time_ms);
    assert!(m.server_time_ms > 0);
    assert_eq!(m.to, Some(pb::message::To::UserId(bob_user.user_id)));
    let sender = sender_of(&d[0]);
    assert_eq!(sender.user_id, alice_user.user_id);
    assert_eq!(sender.username, "alice");
    assert_eq!(sender.display_name, "alice display");
    // The sender's own inbox has it too (for their other devices).
    let own = deliveries(&mut alice, 1).await;
    assert_eq!(
        own[0].message.as_ref().map(|m| m.message_id),
        Some(sent.message_id)
    );
    ts.stop().await;
}

#[tokio::test]
async fn an_offline_user_gets_messages_in_order_after_login() {
    let ts = TestServer::start().await;
    let (alice, _) = ts.user("alice").await;
    let (bob, bob_user) = ts.user("bob").await;
    bob.close().await;
    drop(bob);
    for i in 0..20 {
        alice
            .conn()
            .send_text(Recipient::User(bob_user.user_id), &format!("m{i}"))
            .await
            .expect("send");
    }
    let mut bob = ts.device("bob", "phone").await;
    let got = deliveries(&mut bob, 20).await;
    let texts: Vec<String> = got.iter().map(text).collect();
    let want: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, want);
    assert!(
        got.windows(2).all(|w| w[1].seq == w[0].seq + 1),
        "gap-free seqs"
    );
    assert_quiet(&mut bob).await;
    ts.stop().await;
}

#[tokio::test]
async fn a_new_device_does_not_replay_what_another_device_already_acknowledged() {
    let ts = TestServer::start().await;
    let (alice, _) = ts.user("alice").await;
    let (mut bob, bob_user) = ts.user("bob").await;
    alice
        .conn()
        .send_text(Recipient::User(bob_user.user_id), "seen on the laptop")
        .await
        .expect("send");
    deliveries(&mut bob, 1).await;
    bob.ack_seen().await.expect("ack");
    bob.conn().ping().await.expect("ack processed");
    alice
        .conn()
        .send_text(Recipient::User(bob_user.user_id), "not yet seen")
        .await
        .expect("send");
    let mut phone = ts.device("bob", "phone").await;
    let got = deliveries(&mut phone, 1).await;
    assert_eq!(text(&got[0]), "not yet seen");
    assert_quiet(&mut phone).await;
    // The new device finds the conversation, and its older messages through history.
    let chats = phone
        .conn()
        .list_conversations(0)
        .await
        .expect("conversations");
    assert_eq!(chats.len(), 1);
    let alice_id = alice.user().expect("alice").user_id;
    match &chats[0].with {
        Some(pb::conversation_summary::With::User(u)) => assert_eq!(u.user_id, alice_id),
        other => panic!("{other:?}"),
    }
    let last = chats[0].last_message.as_ref().expect("last message");
    assert_eq!(&last.body[..], b"not yet seen");
    let page = phone
        .conn()
        .history(Recipient::User(alice_id), 0, 0)
        .await
        .expect("history");
    assert_eq!(page.messages.len(), 2);
    ts.stop().await;
}

#[tokio::test]
async fn a_history_page_never_exceeds_the_frame_limit() {
    let ts = TestServer::start_with(|c| {
        c.limits.max_body_bytes = 60 * 1024;
        c.limits.max_frame_bytes = 128 * 1024;
    })
    .await;
    let (alice, _) = ts.user("alice").await;
    let (bob, bob_user) = ts.user("bob").await;
    let big = Bytes::from(vec![b'x'; 60 * 1024]);
    for i in 0..5 {
        alice
            .conn()
            .send_message(
                Recipient::User(bob_user.user_id),
                &format!("big{i}"),
                big.clone(),
                "",
            )
            .await
            .expect("send");
    }
    let alice_id = alice.user().expect("alice").user_id;
    let mut total = 0;
    let mut before = 0;
    loop {
        let page = bob
            .conn()
            .history(Recipient::User(alice_id), before, 0)
            .await
            .expect("a page that fits, not an error or silence");
        assert!(!page.messages.is_empty() && page.messages.len() <= 2);
        total += page.messages.len();
        match page.messages.last() {
            Some(m) if page.has_more => before = m.message_id,
            _ => break,
        }
    }
    assert_eq!(total, 5);
    ts.stop().await;
}

#[tokio::test]
async fn group_messages_reach_online_and_offline_members_and_refuse_outsiders() {
    let ts = TestServer::start().await;
    let (mut alice, _) = ts.user("alice").await;
    let (mut bob, bob_user) = ts.open_user("bob").await;
    let (carol, carol_user) = ts.open_user("carol").await;
    let (mallory, _) = ts.user("mallory").await;
    let group = alice
        .conn()
        .create_group("friends", &[bob_user.user_id, carol_user.user_id])
        .await
        .expect("create");
    assert_eq!(group.members.len(), 3);
    carol.close().await;
    drop(carol);

    let sent = alice
        .conn()
        .send_text(Recipient::Group(group.group_id), "hello group")
        .await
        .expect("send");
    let got = deliveries(&mut bob, 1).await;
    assert_eq!(text(&got[0]), "hello group");
    assert_eq!(
        got[0].message.as_ref().and_then(|m| m.to),
        Some(pb::message::To::GroupId(group.group_id))
    );
    deliveries(&mut alice, 1).await;

    let mut carol = ts.device("carol", "later").await;
    let got = deliveries(&mut carol, 1).await;
    assert_eq!(
        got[0].message.as_ref().map(|m| m.message_id),
        Some(sent.message_id)
    );

    // Not a member: refused as if the group did not exist, and nothing reaches the members.
    let err = mallory
        .conn()
        .send_text(Recipient::Group(group.group_id), "let me in")
        .await
        .expect_err("non-member");
    assert_eq!(code(&err), Some(ErrorCode::NotFound));
    let err = mallory
        .conn()
        .history(Recipient::Group(group.group_id), 0, 10)
        .await
        .expect_err("non-member history");
    assert_eq!(code(&err), Some(ErrorCode::NotFound));
    let err = mallory
        .conn()
        .get_group(group.group_id)
        .await
        .expect_err("info");
    assert_eq!(code(&err), Some(ErrorCode::NotFound));
    assert_quiet(&mut bob).await;
    ts.stop().await;
}

#[tokio::test]
async fn only_admins_change_membership_and_leavers_stop_receiving() {
    let ts = TestServer::start().await;
    let (alice, _) = ts.user("alice").await;
    let (bob, bob_user) = ts.open_user("bob").await;
    let (mut carol, carol_user) = ts.open_user("carol").await;
    let (_dave, dave_user) = ts.open_user("dave").await;
    let g = alice
        .conn()
        .create_group("team", &[bob_user.user_id])
        .await
        .expect("create");
    let err = bob
        .conn()
        .add_members(g.group_id, &[carol_user.user_id])
        .await
        .expect_err("bob is not admin");
    assert_eq!(code(&err), Some(ErrorCode::PermissionDenied));
    let err = bob
        .conn()
        .remove_member(g.group_id, dave_user.user_id)
        .await
        .expect_err("bob is not admin");
    assert_eq!(code(&err), Some(ErrorCode::PermissionDenied));
    let g2 = alice
        .conn()
        .add_members(g.group_id, &[carol_user.user_id, dave_user.user_id])
        .await
        .expect("add");
    assert_eq!(g2.members.len(), 4);
    assert!(
        g2.members
            .iter()
            .any(|m| m.admin && m.user.as_ref().map(|u| u.username.as_str()) == Some("alice"))
    );
    let err = alice
        .conn()
        .add_members(g.group_id, &[999_999])
        .await
        .expect_err("unknown user");
    // Answered like a user who does not accept the caller (tests/abuse_groups.rs).
    assert_eq!(code(&err), Some(ErrorCode::PermissionDenied));

    let g3 = alice
        .conn()
        .remove_member(g.group_id, dave_user.user_id)
        .await
        .expect("kick dave");
    assert_eq!(g3.members.len(), 3);

    carol.conn().leave_group(g.group_id).await.expect("leave");
    let listed = carol.conn().list_groups().await.expect("list");
    assert!(listed.is_empty());
    alice
        .conn()
        .send_text(Recipient::Group(g.group_id), "after carol left")
        .await
        .expect("send");
    assert_quiet(&mut carol).await;
    let bob_groups = bob.conn().list_groups().await.expect("list");
    assert_eq!(bob_groups.len(), 1);
    assert_eq!(bob_groups[0].name, "team");
    ts.stop().await;
}

#[tokio::test]
async fn repeated_ids_and_the_creator_do_not_count_against_the_group_size() {
    let ts = TestServer::start_with(|c| c.limits.max_group_members = 3).await;
    let (alice, alice_user) = ts.user("alice").await;
    let (_bob, bob) = ts.open_user("bob").await;
    let (_carol, carol) = ts.open_user("carol").await;
    let (_dave, dave) = ts.open_user("dave").await;
    let (b, c, d, me) = (bob.user_id, carol.user_id, dave.user_id, alice_user.user_id);

    // Three people, named four times: a group of three, at the limit.
    let g = alice
        .conn()
        .create_group("three", &[b, c, b, me])
        .await
        .expect("a group of three is within the limit");
    let mut members: Vec<u64> = g
        .members
        .iter()
        .filter_map(|m| m.user.as_ref().map(|u| u.user_id))
        .collect();
    members.sort_unstable();
    let mut want = vec![me, b, c];
    want.sort_unstable();
    assert_eq!(members, want);

    // Four distinct people are one too many, however they are spelled.
    let err = alice
        .conn()
        .create_group("four", &[b, c, d, d])
        .await
        .expect_err("a group of four");
    assert_eq!(code(&err), Some(ErrorCode::InvalidArgument));

    // Adding: repeats, the admin and existing members do not count either.
    let pair = alice
        .conn()
        .create_group("pair", &[b])
        .await
        .expect("create pair");
    let grown = alice
        .conn()
        .add_members(pair.group_id, &[c, c, me, b])
        .await
        .expect("the pair grows to three");
    assert_eq!(grown.members.len(), 3);
    let err = alice
        .conn()
        .add_members(pair.group_id, &[d, d])
        .await
        .expect_err("a fourth member");
    assert_eq!(code(&err), Some(ErrorCode::InvalidArgument));
    let after = alice.conn().get_group(pair.group_id).await.expect("info");
    assert_eq!(after.members.len(), 3, "a refused add changes nothing");
    ts.stop().await;
}

#[tokio::test]
async fn a_retry_with_the_same_client_msg_id_is_delivered_once() {
    let ts = TestServer::start().await;
    let (alice, _) = ts.user("alice").await;
    let (mut bob, bob_user) = ts.user("bob").await;
    let to = Recipient::User(bob_user.user_id);
    let body = Bytes::from_static(b"only once");
    let first = alice
        .conn()
        .send_message(to, "retry-1", body.clone(), "text/plain")
        .await
        .expect("send");
    let second = alice
        .conn()
        .send_message(to, "retry-1", body, "text/plain")
        .await
        .expect("retry");
    assert_eq!(first.message_id, second.message_id);
    assert!(!first.duplicate);
    assert!(second.duplicate);
    deliveries(&mut bob, 1).await;
    assert_quiet(&mut bob).await;
    ts.stop().await;
}

#[tokio::test]
async fn two_devices_of_one_user_both_receive_and_see_what_the_other_sent() {
    let ts = TestServer::start().await;
    let (mut alice_laptop, _) = ts.user("alice").await;
    let mut alice_phone = ts.device("alice", "phone").await;
    let (mut bob, bob_user) = ts.user("bob").await;
    let alice_id = alice_laptop.user().expect("user").user_id;

    bob.conn()
        .send_text(Recipient::User(alice_id), "to both devices")
        .await
        .expect("send");
    assert_eq!(
        text(&deliveries(&mut alice_laptop, 1).await[0]),
        "to both devices"
    );
    assert_eq!(
        text(&deliveries(&mut alice_phone, 1).await[0]),
        "to both devices"
    );
    deliveries(&mut bob, 1).await;

    alice_laptop
        .conn()
        .send_text(Recipient::User(bob_user.user_id), "from the laptop")
        .await
        .expect("send");
    let on_phone = deliveries(&mut alice_phone, 1).await;
    assert_eq!(text(&on_phone[0]), "from the laptop");
    assert_eq!(sender_of(&on_phone[0]).user_id, alice_id);
    assert_eq!(text(&deliveries(&mut bob, 1).await[0]), "from the laptop");
    ts.stop().await;
}

#[tokio::test]
async fn history_pages_backwards_through_a_conversation() {
    let ts = TestServer::start().await;
    let (alice, _) = ts.user("alice").await;
    let (bob, bob_user) = ts.user("bob").await;
    let alice_id = alice.user().expect("user").user_id;
    for i in 0..25 {
        let (from, to) = if i % 2 == 0 {
            (&alice, bob_user.user_id)
        } else {
            (&bob, alice_id)
        };
        from.conn()
            .send_text(Recipient::User(to), &format!("h{i}"))
            .await
            .expect("send");
    }
    let mut seen = Vec::new();
    let mut before = 0;
    loop {
        let page = bob
            .conn()
            .history(Recipient::User(alice_id), before, 10)
            .await
            .expect("page");
        assert!(page.messages.len() <= 10);
        seen.extend(
            page.messages
                .iter()
                .map(|m| String::from_utf8_lossy(&m.body).into_owned()),
        );
        match page.messages.last() {
            Some(last) if page.has_more => before = last.message_id,
            _ => break,
        }
    }
    let want: Vec<String> = (0..25).rev().map(|i| format!("h{i}")).collect();
    assert_eq!(seen, want, "newest first, every message once");
    ts.stop().await;
}

#[tokio::test]
async fn bad_sends_are_refused_and_change_nothing() {
    let ts = TestServer::start_with(|c| {
        c.limits.max_body_bytes = 1000;
        c.limits.max_frame_bytes = 8192;
    })
    .await;
    let (alice, _) = ts.user("alice").await;
    let (mut bob, bob_user) = ts.user("bob").await;
    let to = Recipient::User(bob_user.user_id);
    let c = alice.conn();
    let cases: Vec<(&str, Result<pb::Sent, _>, ErrorCode)> = vec![
        (
            "too large",
            c.send_message(to, "a", Bytes::from(vec![b'x'; 1001]), "")
                .await,
            ErrorCode::TooLarge,
        ),
        (
            "empty body",
            c.send_message(to, "b", Bytes::new(), "").await,
            ErrorCode::InvalidArgument,
        ),
        (
            "no client_msg_id",
            c.send_message(to, "", Bytes::from_static(b"x"), "").await,
            ErrorCode::InvalidArgument,
        ),
        (
            "unknown user",
            c.send_message(Recipient::User(424_242), "c", Bytes::from_static(b"x"), "")
                .await,
            ErrorCode::NotFound,
        ),
        (
            "unknown group",
            c.send_message(Recipient::Group(424_242), "d", Bytes::from_static(b"x"), "")
                .await,
            ErrorCode::NotFound,
        ),
    ];
    for (what, result, want) in cases {
        let err = result.expect_err(what);
        assert_eq!(code(&err), Some(want), "{what}: {err}");
    }
    assert_quiet(&mut bob).await;
    ts.stop().await;
}

#[tokio::test]
async fn a_flooding_sender_is_rate_limited_with_a_retry_hint() {
    let ts = TestServer::start_with(|c| {
        c.limits.messages_per_second = 1;
        c.limits.message_burst = 5;
    })
    .await;
    let (alice, _) = ts.user("alice").await;
    let (_bob, bob_user) = ts.user("bob").await;
    let mut limited = None;
    for i in 0..10 {
        if let Err(e) = alice
            .conn()
            .send_text(Recipient::User(bob_user.user_id), &format!("{i}"))
            .await
        {
            limited = Some((i, e));
            break;
        }
    }
    let (i, e) = limited.expect("rate limited");
    assert_eq!(i, 5, "the burst passes");
    assert_eq!(code(&e), Some(ErrorCode::RateLimited));
    ts.stop().await;
}
