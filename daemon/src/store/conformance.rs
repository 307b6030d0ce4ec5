//! The store conformance suite: the behaviour every `Store` backend must show, written against
//! `dyn Store` only so the same functions run unchanged on each backend. A backend plugs in by
//! giving each function a fresh, empty store (see `sqlite_backend` at the bottom); the restart
//! case takes a function that reopens the same database instead.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use super::{NewAccount, NewSession, Store, StoreError};
use crate::model::{
    AppendQuotas, Appended, Conversation, ConversationPage, ConversationQuery, ConversationWith,
    DeviceId, GroupAdds, GroupId, InboxEntry, MessageId, NewMessage, ProfileChange, Recipient, Seq,
    Session, StoredMessage, User, UserId,
};

/// Ids no test creates; the stores start counting at 1.
const MISSING_USER: UserId = UserId(999_999);
const MISSING_GROUP: GroupId = GroupId(999_999);
const MISSING_DEVICE: DeviceId = DeviceId(999_999);
const ALL: usize = usize::MAX;

// ----- helpers -----

/// An account that accepts group additions from anyone, so the group cases need not set up
/// contacts; consent has cases of its own, on accounts made by `create_with`.
fn new_account(name: &str) -> NewAccount {
    NewAccount {
        username: name.to_owned(),
        username_key: name.to_lowercase(),
        display_name: format!("{name} (display)"),
        password_hash: format!("hash-of-{name}"),
        group_adds: GroupAdds::Anyone,
    }
}

async fn create(store: &dyn Store, name: &str) -> User {
    create_with(store, name, GroupAdds::Anyone).await
}

async fn create_with(store: &dyn Store, name: &str, group_adds: GroupAdds) -> User {
    store
        .create_account(NewAccount {
            group_adds,
            ..new_account(name)
        })
        .await
        .expect("create account")
}

async fn rename(store: &dyn Store, user: UserId, display_name: &str) -> Result<User, StoreError> {
    store
        .update_profile(
            user,
            ProfileChange {
                display_name: Some(display_name.to_owned()),
                group_adds: None,
            },
        )
        .await
        .map(|profile| profile.user)
}

async fn set_group_adds(store: &dyn Store, user: &User, group_adds: GroupAdds) {
    let profile = store
        .update_profile(
            user.id,
            ProfileChange {
                display_name: None,
                group_adds: Some(group_adds),
            },
        )
        .await
        .expect("update profile");
    assert_eq!(profile.group_adds, group_adds);
}

async fn conversation_page(
    store: &dyn Store,
    reader: &User,
    snapshot: Option<MessageId>,
    before: Option<MessageId>,
    limit: usize,
) -> ConversationPage {
    store
        .conversation_page(
            reader.id,
            ConversationQuery {
                snapshot,
                before,
                limit,
            },
        )
        .await
        .expect("conversation page")
}

/// (conversation, client_msg_id of its last message), in page order.
fn listed(page: &ConversationPage) -> Vec<(Conversation, &str)> {
    page.conversations
        .iter()
        .map(|c| (c.conversation(), c.last.client_msg_id.as_str()))
        .collect()
}

fn token(n: u8) -> [u8; 32] {
    [n; 32]
}

async fn login(store: &dyn Store, user: &User, token_byte: u8) -> Session {
    store
        .create_session(NewSession {
            user: user.id,
            device_name: format!("device-{token_byte}"),
            token_hash: token(token_byte),
            expires_at: 1_000,
        })
        .await
        .expect("create session")
}

fn message(from: &User, to: Recipient, client_msg_id: &str) -> NewMessage {
    NewMessage {
        sender: from.id,
        to,
        client_msg_id: client_msg_id.to_owned(),
        body: Bytes::from(format!("body of {client_msg_id}")),
        content_type: "text/plain".to_owned(),
        server_time: 42,
        quotas: AppendQuotas::UNLIMITED,
    }
}

/// A group of `members` created by `creator` (limit 10), for tests that only need its id.
async fn new_group(store: &dyn Store, creator: &User, name: &str, members: &[UserId]) -> GroupId {
    store
        .create_group(creator.id, name, members, 10, 1)
        .await
        .unwrap()
        .id
}

async fn dm(store: &dyn Store, from: &User, to: &User, client_msg_id: &str) -> Appended {
    store
        .append_message(message(from, Recipient::User(to.id), client_msg_id))
        .await
        .expect("direct append")
}

async fn to_group(store: &dyn Store, from: &User, group: GroupId, client_msg_id: &str) -> Appended {
    store
        .append_message(message(from, Recipient::Group(group), client_msg_id))
        .await
        .expect("group append")
}

async fn inbox(store: &dyn Store, user: &User) -> Vec<InboxEntry> {
    store
        .read_inbox(user.id, Seq(0), ALL, usize::MAX)
        .await
        .expect("read inbox")
}

fn seqs(entries: &[InboxEntry]) -> Vec<u64> {
    entries.iter().map(|e| e.seq.0).collect()
}

fn client_ids(messages: &[StoredMessage]) -> Vec<&str> {
    messages.iter().map(|m| m.client_msg_id.as_str()).collect()
}

async fn history(
    store: &dyn Store,
    reader: &User,
    conversation: Conversation,
    before: Option<MessageId>,
    limit: usize,
) -> Vec<StoredMessage> {
    store
        .history(reader.id, conversation, before, limit)
        .await
        .expect("history")
}

async fn members(store: &dyn Store, reader: &User, group: GroupId) -> Vec<(UserId, bool)> {
    store
        .group(reader.id, group)
        .await
        .expect("group")
        .members
        .iter()
        .map(|m| (m.user.id, m.admin))
        .collect()
}

#[track_caller]
fn assert_err<T: std::fmt::Debug>(result: Result<T, StoreError>, expected: &StoreError) {
    match result {
        Err(e) if std::mem::discriminant(&e) == std::mem::discriminant(expected) => {
            // The payload names what is missing or taken; it is part of the contract for
            // NotFound/AlreadyExists/LimitExceeded, free text for PermissionDenied.
            match (&e, expected) {
                (StoreError::NotFound(a), StoreError::NotFound(b))
                | (StoreError::AlreadyExists(a), StoreError::AlreadyExists(b))
                | (StoreError::LimitExceeded(a), StoreError::LimitExceeded(b))
                | (StoreError::QuotaExceeded(a), StoreError::QuotaExceeded(b)) => {
                    assert_eq!(a, b, "wrong error payload");
                }
                (StoreError::GroupAddRefused(a), StoreError::GroupAddRefused(b)) => {
                    assert_eq!(a, b, "wrong refused users");
                }
                _ => {}
            }
        }
        other => panic!("expected {expected:?}, got {other:?}"),
    }
}

// ----- accounts -----

pub(crate) async fn accounts_are_created_and_found(store: &dyn Store) {
    let alice = create(store, "Alice").await;
    assert_eq!(alice.username, "Alice");
    assert_eq!(alice.display_name, "Alice (display)");

    let by_name = store
        .account_by_username("alice")
        .await
        .unwrap()
        .expect("found by key");
    assert_eq!(by_name.user, alice);
    assert_eq!(by_name.password_hash, "hash-of-Alice");
    let by_id = store
        .account_by_id(alice.id)
        .await
        .unwrap()
        .expect("found by id");
    assert_eq!(by_id.user, alice);

    let bob = create(store, "bob").await;
    assert_ne!(bob.id, alice.id);
    assert!(store.account_by_username("carol").await.unwrap().is_none());
    assert!(store.account_by_id(MISSING_USER).await.unwrap().is_none());
    assert!(
        store
            .account_by_id(UserId(u64::MAX))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.inbox_head(alice.id).await.unwrap(), Seq(0));
    assert_eq!(store.inbox_head(MISSING_USER).await.unwrap(), Seq(0));
}

pub(crate) async fn usernames_are_unique_ignoring_case(store: &dyn Store) {
    let alice = create(store, "Alice").await;
    let mut shouting = new_account("ALICE");
    shouting.password_hash = "other".into();
    assert_err(
        store.create_account(shouting).await,
        &StoreError::AlreadyExists("username"),
    );
    let kept = store.account_by_username("alice").await.unwrap().unwrap();
    assert_eq!(kept.user, alice);
    assert_eq!(kept.password_hash, "hash-of-Alice");
}

pub(crate) async fn display_name_changes_do_not_rewrite_history(store: &dyn Store) {
    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    dm(store, &alice, &bob, "before").await;
    let renamed = rename(store, alice.id, "Queen").await.unwrap();
    assert_eq!(renamed.id, alice.id);
    assert_eq!(renamed.username, "alice");
    assert_eq!(renamed.display_name, "Queen");
    dm(store, &alice, &bob, "after").await;

    let page = history(store, &bob, Conversation::Direct(alice.id), None, ALL).await;
    assert_eq!(client_ids(&page), ["after", "before"]);
    assert_eq!(page[0].sender.display_name, "Queen");
    assert_eq!(page[1].sender.display_name, "alice (display)");
    assert_err(
        rename(store, MISSING_USER, "x").await,
        &StoreError::NotFound("user"),
    );
}

pub(crate) async fn change_password_ends_every_other_session(store: &dyn Store) {
    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    let phone = login(store, &alice, 1).await;
    let laptop = login(store, &alice, 2).await;
    let tablet = login(store, &alice, 3).await;
    let bobs = login(store, &bob, 4).await;

    let mut ended = store
        .change_password(alice.id, "new-hash", laptop.device)
        .await
        .unwrap();
    ended.sort();
    let mut expected = vec![phone.device, tablet.device];
    expected.sort();
    assert_eq!(ended, expected);

    let account = store.account_by_id(alice.id).await.unwrap().unwrap();
    assert_eq!(account.password_hash, "new-hash");
    assert!(store.session_by_token(&token(1)).await.unwrap().is_none());
    assert!(store.session_by_token(&token(3)).await.unwrap().is_none());
    let kept = store.session_by_token(&token(2)).await.unwrap().unwrap();
    assert_eq!(kept.device, laptop.device);
    let other = store.session_by_token(&token(4)).await.unwrap().unwrap();
    assert_eq!(other.device, bobs.device);

    assert_err(
        store
            .change_password(MISSING_USER, "x", MISSING_DEVICE)
            .await,
        &StoreError::NotFound("user"),
    );
}

pub(crate) async fn deleted_account_frees_the_name_and_keeps_its_messages(store: &dyn Store) {
    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    let carol = create(store, "carol").await;
    let device = login(store, &alice, 1).await;
    let shared = new_group(store, &alice, "shared", &[bob.id, carol.id]).await;
    let alone = new_group(store, &alice, "alone", &[]).await;
    let sent = dm(store, &alice, &bob, "hello").await;
    to_group(store, &alice, shared, "to the group").await;

    let ended = store.delete_account(alice.id).await.unwrap();
    assert_eq!(ended, [device.device]);

    assert!(store.session_by_token(&token(1)).await.unwrap().is_none());
    assert!(store.account_by_id(alice.id).await.unwrap().is_none());
    assert!(store.account_by_username("alice").await.unwrap().is_none());
    assert!(store.groups_of(alice.id).await.unwrap().is_empty());
    assert!(
        store
            .read_inbox(alice.id, Seq(0), ALL, usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.inbox_head(alice.id).await.unwrap(), Seq(0));

    // The group she led now has her longest-standing member as admin; her solo group is gone.
    assert_eq!(
        members(store, &bob, shared).await,
        [(bob.id, true), (carol.id, false)]
    );
    assert_err(
        store.group(bob.id, alone).await,
        &StoreError::NotFound("group"),
    );

    // What she sent stays, with her name as it was.
    let page = history(store, &bob, Conversation::Direct(alice.id), None, ALL).await;
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].id, sent.message.id);
    assert_eq!(page[0].sender, alice);
    let bobs = inbox(store, &bob).await;
    assert_eq!(client_ids(&[(*bobs[0].message).clone()]), ["hello"]);
    assert_eq!(bobs.len(), 2);
    let group_page = history(store, &carol, Conversation::Group(shared), None, ALL).await;
    assert_eq!(group_page[0].sender, alice);

    // Nobody acts for or reaches a deleted account.
    assert_err(
        store
            .append_message(message(&bob, Recipient::User(alice.id), "late"))
            .await,
        &StoreError::NotFound("user"),
    );
    assert_err(
        store
            .append_message(message(&alice, Recipient::User(bob.id), "ghost"))
            .await,
        &StoreError::NotFound("user"),
    );
    assert_err(
        store.delete_account(alice.id).await,
        &StoreError::NotFound("user"),
    );

    // The name is free again, the id is not reused, and the newcomer inherits nothing.
    let again = create(store, "Alice").await;
    assert_ne!(again.id, alice.id);
    assert!(
        history(store, &again, Conversation::Direct(bob.id), None, ALL)
            .await
            .is_empty()
    );
    assert!(inbox(store, &again).await.is_empty());
}

// ----- sessions -----

pub(crate) async fn sessions_are_found_by_token_touched_and_deleted(store: &dyn Store) {
    let alice = create(store, "alice").await;
    let session = login(store, &alice, 7).await;
    assert_eq!(session.user, alice);
    assert_eq!(session.device_name, "device-7");
    assert_eq!(session.expires_at, 1_000);
    assert_eq!(session.acked, Seq(0));

    let found = store.session_by_token(&token(7)).await.unwrap().unwrap();
    assert_eq!(found.device, session.device);
    assert_eq!(found.user, alice);
    assert_eq!(found.device_name, "device-7");
    assert!(store.session_by_token(&token(8)).await.unwrap().is_none());

    store.touch_session(session.device, 5_000).await.unwrap();
    let touched = store.session_by_token(&token(7)).await.unwrap().unwrap();
    assert_eq!(touched.expires_at, 5_000);
    assert_err(
        store.touch_session(MISSING_DEVICE, 1).await,
        &StoreError::NotFound("session"),
    );

    let second = login(store, &alice, 8).await;
    assert_ne!(second.device, session.device);
    store.delete_session(session.device).await.unwrap();
    assert!(store.session_by_token(&token(7)).await.unwrap().is_none());
    assert!(store.session_by_token(&token(8)).await.unwrap().is_some());
    store.delete_session(session.device).await.unwrap();

    assert_err(
        store
            .create_session(NewSession {
                user: MISSING_USER,
                device_name: "x".into(),
                token_hash: token(9),
                expires_at: 1,
            })
            .await,
        &StoreError::NotFound("user"),
    );
}

pub(crate) async fn acks_only_move_forward_and_stop_at_the_head(store: &dyn Store) {
    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    let session = login(store, &alice, 1).await;
    for i in 0..3 {
        dm(store, &bob, &alice, &format!("m{i}")).await;
    }
    let acked = || async {
        store
            .session_by_token(&token(1))
            .await
            .unwrap()
            .unwrap()
            .acked
    };

    store.ack(session.device, Seq(2)).await.unwrap();
    assert_eq!(acked().await, Seq(2));
    store.ack(session.device, Seq(1)).await.unwrap();
    assert_eq!(acked().await, Seq(2));
    store.ack(session.device, Seq(100)).await.unwrap();
    assert_eq!(acked().await, Seq(3));
    store.ack(session.device, Seq(u64::MAX)).await.unwrap();
    assert_eq!(acked().await, Seq(3));

    // A new device starts where the user's devices got to, not at the start of the inbox.
    let second = login(store, &alice, 2).await;
    assert_eq!(second.acked, Seq(3));
    dm(store, &bob, &alice, "m3").await;
    store.ack(second.device, Seq(4)).await.unwrap();
    assert_eq!(login(store, &alice, 3).await.acked, Seq(4));
    assert_eq!(
        acked().await,
        Seq(3),
        "other devices keep their own cursors"
    );

    // A session revoked meanwhile is not an error for the acking connection.
    store.ack(MISSING_DEVICE, Seq(1)).await.unwrap();
    store.delete_session(session.device).await.unwrap();
    store.ack(session.device, Seq(3)).await.unwrap();
}

// ----- messages -----

pub(crate) async fn direct_message_lands_in_both_inboxes(store: &dyn Store) {
    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    let appended = dm(store, &alice, &bob, "m1").await;
    assert!(!appended.duplicate);
    let mut expected = vec![(alice.id, Seq(1)), (bob.id, Seq(1))];
    expected.sort();
    assert_eq!(appended.entries, expected);

    let m = &appended.message;
    assert_eq!(m.sender, alice);
    assert_eq!(m.to, Recipient::User(bob.id));
    assert_eq!(m.client_msg_id, "m1");
    assert_eq!(m.body, Bytes::from("body of m1"));
    assert_eq!(m.content_type, "text/plain");
    assert_eq!(m.server_time, 42);

    for user in [&alice, &bob] {
        let entries = inbox(store, user).await;
        assert_eq!(seqs(&entries), [1]);
        assert_eq!(*entries[0].message, **m);
        assert_eq!(store.inbox_head(user.id).await.unwrap(), Seq(1));
    }

    // Writing to yourself is one inbox entry, not two.
    let note = dm(store, &alice, &alice, "note to self").await;
    assert_eq!(note.entries, [(alice.id, Seq(2))]);
    assert_eq!(seqs(&inbox(store, &alice).await), [1, 2]);
    assert_eq!(seqs(&inbox(store, &bob).await), [1]);
}

pub(crate) async fn retried_append_returns_the_first_message(store: &dyn Store) {
    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    let first = dm(store, &alice, &bob, "same").await;
    let mut retry = message(&alice, Recipient::User(bob.id), "same");
    retry.body = Bytes::from_static(b"a different body");
    let second = store.append_message(retry).await.unwrap();
    assert!(second.duplicate);
    assert!(second.entries.is_empty());
    assert_eq!(*second.message, *first.message);
    assert_eq!(store.inbox_head(bob.id).await.unwrap(), Seq(1));
    assert_eq!(store.inbox_head(alice.id).await.unwrap(), Seq(1));

    // Uniqueness is per sender.
    let bobs = dm(store, &bob, &alice, "same").await;
    assert!(!bobs.duplicate);
    assert_ne!(bobs.message.id, first.message.id);
}

pub(crate) async fn append_to_a_missing_recipient_is_not_found(store: &dyn Store) {
    let alice = create(store, "alice").await;
    assert_err(
        store
            .append_message(message(&alice, Recipient::User(MISSING_USER), "a"))
            .await,
        &StoreError::NotFound("user"),
    );
    assert_err(
        store
            .append_message(message(&alice, Recipient::Group(MISSING_GROUP), "b"))
            .await,
        &StoreError::NotFound("group"),
    );
    assert_eq!(store.inbox_head(alice.id).await.unwrap(), Seq(0));
    // A failed append does not burn its client_msg_id.
    let bob = create(store, "bob").await;
    assert!(!dm(store, &alice, &bob, "a").await.duplicate);
}

pub(crate) async fn group_message_fans_out_to_every_member(store: &dyn Store) {
    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    let carol = create(store, "carol").await;
    let dave = create(store, "dave").await;
    let group = new_group(store, &alice, "team", &[bob.id, carol.id]).await;
    dm(store, &bob, &carol, "warm-up").await;

    let appended = to_group(store, &bob, group, "hi all").await;
    let mut expected = vec![(alice.id, Seq(1)), (bob.id, Seq(2)), (carol.id, Seq(2))];
    expected.sort();
    assert_eq!(appended.entries, expected);
    assert_eq!(appended.message.to, Recipient::Group(group));
    for (user, seq) in [(&alice, 1), (&bob, 2), (&carol, 2)] {
        let entries = inbox(store, user).await;
        let last = entries.last().expect("an entry");
        assert_eq!(last.seq, Seq(seq));
        assert_eq!(last.message.id, appended.message.id);
    }
    assert!(inbox(store, &dave).await.is_empty());
}

pub(crate) async fn non_member_cannot_send_to_a_group(store: &dyn Store) {
    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    let dave = create(store, "dave").await;
    let group = new_group(store, &alice, "team", &[bob.id]).await;
    let earlier = to_group(store, &bob, group, "earlier").await;

    // Answered like a group that does not exist: group ids are not for probing.
    assert_err(
        store
            .append_message(message(&dave, Recipient::Group(group), "sneak"))
            .await,
        &StoreError::NotFound("group"),
    );
    store.remove_member(alice.id, group, bob.id).await.unwrap();
    assert_err(
        store
            .append_message(message(&bob, Recipient::Group(group), "after removal"))
            .await,
        &StoreError::NotFound("group"),
    );
    assert_eq!(store.inbox_head(alice.id).await.unwrap(), Seq(1));
    assert_eq!(store.inbox_head(dave.id).await.unwrap(), Seq(0));
    let page = history(store, &alice, Conversation::Group(group), None, ALL).await;
    assert_eq!(client_ids(&page), ["earlier"]);

    // A retry of what was accepted before the removal still gets its first answer.
    let retry = store
        .append_message(message(&bob, Recipient::Group(group), "earlier"))
        .await
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.message.id, earlier.message.id);
}

pub(crate) async fn inbox_reads_in_order_and_pages(store: &dyn Store) {
    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    for i in 0..10 {
        let (from, to) = if i % 2 == 0 {
            (&alice, &bob)
        } else {
            (&bob, &alice)
        };
        dm(store, from, to, &format!("m{i}")).await;
    }
    let all = inbox(store, &alice).await;
    assert_eq!(seqs(&all), (1..=10).collect::<Vec<_>>());
    let ids: Vec<_> = all
        .iter()
        .map(|e| e.message.client_msg_id.clone())
        .collect();
    assert_eq!(ids, (0..10).map(|i| format!("m{i}")).collect::<Vec<_>>());
    assert!(all.windows(2).all(|w| w[0].message.id < w[1].message.id));

    let mut pages = Vec::new();
    let mut after = Seq(0);
    loop {
        let page = store
            .read_inbox(alice.id, after, 4, usize::MAX)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map_or(after, |e| e.seq);
        pages.push(seqs(&page));
    }
    assert_eq!(pages, [vec![1, 2, 3, 4], vec![5, 6, 7, 8], vec![9, 10]]);
    assert!(
        store
            .read_inbox(alice.id, Seq(0), 0, usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .read_inbox(alice.id, Seq(u64::MAX), ALL, usize::MAX)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.inbox_head(alice.id).await.unwrap(), Seq(10));
}

pub(crate) async fn inbox_pages_stop_at_the_byte_bound(store: &dyn Store) {
    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    for i in 0..5 {
        dm(store, &bob, &alice, &format!("m{i}")).await;
    }
    let body = inbox(store, &alice).await[0].message.body.len();
    assert_eq!(body, "body of m0".len());
    let page = |max_bytes| async move {
        seqs(
            &store
                .read_inbox(alice.id, Seq(0), ALL, max_bytes)
                .await
                .unwrap(),
        )
    };
    // The entry that reaches the bound is the last one.
    assert_eq!(page(2 * body + 1).await, [1, 2, 3]);
    assert_eq!(page(3 * body).await, [1, 2, 3]);
    // Never empty while entries remain, however small the bound.
    assert_eq!(page(1).await, [1]);
    assert_eq!(page(0).await, [1]);
    // The count limit still applies under a large bound.
    let two = store
        .read_inbox(alice.id, Seq(1), 2, usize::MAX)
        .await
        .unwrap();
    assert_eq!(seqs(&two), [2, 3]);
}

pub(crate) async fn direct_history_pages_newest_first_from_both_sides(store: &dyn Store) {
    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    let carol = create(store, "carol").await;
    for i in 1..=7 {
        let (from, to) = if i % 2 == 0 {
            (&alice, &bob)
        } else {
            (&bob, &alice)
        };
        dm(store, from, to, &format!("m{i}")).await;
        // Other conversations interleave and must not show up.
        dm(store, &alice, &carol, &format!("c{i}")).await;
    }
    let conv = Conversation::Direct(bob.id);
    let first = history(store, &alice, conv, None, 3).await;
    assert_eq!(client_ids(&first), ["m7", "m6", "m5"]);
    let second = history(store, &alice, conv, Some(first[2].id), 3).await;
    assert_eq!(client_ids(&second), ["m4", "m3", "m2"]);
    let third = history(store, &alice, conv, Some(second[2].id), 3).await;
    assert_eq!(client_ids(&third), ["m1"]);
    assert!(
        history(store, &alice, conv, Some(third[0].id), 3)
            .await
            .is_empty()
    );

    let from_bob = history(store, &bob, Conversation::Direct(alice.id), None, ALL).await;
    let all: Vec<_> = first.iter().chain(&second).chain(&third).cloned().collect();
    assert_eq!(from_bob, all);
    assert!(
        history(store, &alice, Conversation::Direct(MISSING_USER), None, ALL)
            .await
            .is_empty()
    );

    dm(store, &alice, &alice, "note").await;
    let notes = history(store, &alice, Conversation::Direct(alice.id), None, ALL).await;
    assert_eq!(client_ids(&notes), ["note"]);
}

pub(crate) async fn group_history_is_for_members_only(store: &dyn Store) {
    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    let carol = create(store, "carol").await;
    let group = new_group(store, &alice, "team", &[bob.id]).await;
    let other = new_group(store, &alice, "other", &[bob.id]).await;
    for i in 1..=5 {
        let from = if i % 2 == 0 { &alice } else { &bob };
        to_group(store, from, group, &format!("g{i}")).await;
        to_group(store, from, other, &format!("o{i}")).await;
    }
    let conv = Conversation::Group(group);
    let page = history(store, &bob, conv, None, 2).await;
    assert_eq!(client_ids(&page), ["g5", "g4"]);
    let rest = history(store, &bob, conv, Some(page[1].id), ALL).await;
    assert_eq!(client_ids(&rest), ["g3", "g2", "g1"]);

    assert_err(
        store.history(carol.id, conv, None, ALL).await,
        &StoreError::NotFound("group"),
    );
    assert_err(
        store
            .history(alice.id, Conversation::Group(MISSING_GROUP), None, ALL)
            .await,
        &StoreError::NotFound("group"),
    );
    store.leave_group(bob.id, group).await.unwrap();
    assert_err(
        store.history(bob.id, conv, None, ALL).await,
        &StoreError::NotFound("group"),
    );
}

pub(crate) async fn conversations_list_each_chat_once_newest_first(store: &dyn Store) {
    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    let carol = create(store, "carol").await;
    let team = new_group(store, &alice, "team", &[bob.id]).await;
    let left = new_group(store, &bob, "left", &[alice.id]).await;
    dm(store, &alice, &bob, "d1").await;
    to_group(store, &bob, left, "l1").await;
    dm(store, &carol, &alice, "d2").await;
    to_group(store, &bob, team, "g1").await;
    dm(store, &bob, &alice, "d3").await;
    dm(store, &alice, &alice, "note").await;
    store.leave_group(alice.id, left).await.unwrap();

    let all = conversation_page(store, &alice, None, None, ALL).await;
    assert_eq!(
        listed(&all),
        [
            (Conversation::Direct(alice.id), "note"),
            (Conversation::Direct(bob.id), "d3"),
            (Conversation::Group(team), "g1"),
            (Conversation::Direct(carol.id), "d2"),
        ],
        "newest first, one row per conversation, groups left are gone"
    );
    match &all.conversations[2].with {
        ConversationWith::Group(g) => assert_eq!(g.name, "team"),
        other => panic!("expected the group, got {other:?}"),
    }
    match &all.conversations[3].with {
        ConversationWith::Direct(peer, Some(user)) => {
            assert_eq!(*peer, carol.id);
            assert_eq!(user, &carol);
        }
        other => panic!("expected carol, got {other:?}"),
    }
    assert_eq!(all.snapshot, all.conversations[0].last.id);

    // Paged one by one, the same list.
    let mut paged = Vec::new();
    let mut before = None;
    loop {
        let page = conversation_page(store, &alice, Some(all.snapshot), before, 1).await;
        let Some(last) = page.conversations.last() else {
            break;
        };
        before = Some(last.last.id);
        paged.extend(page.conversations);
    }
    assert_eq!(paged, all.conversations);

    // A deleted peer stays listed, without an account.
    store.delete_account(carol.id).await.unwrap();
    let after = conversation_page(store, &alice, None, None, ALL).await;
    assert!(matches!(
        after.conversations[3].with,
        ConversationWith::Direct(peer, None) if peer == carol.id
    ));
    assert!(
        conversation_page(store, &carol, None, None, ALL)
            .await
            .conversations
            .is_empty()
    );
}

pub(crate) async fn conversation_pages_hold_still_while_chats_move(store: &dyn Store) {
    let reader = create(store, "reader").await;
    let mut peers = Vec::new();
    for i in 0..6 {
        let peer = create(store, &format!("peer{i}")).await;
        dm(store, &peer, &reader, &format!("first-{i}")).await;
        peers.push(peer);
    }
    let group = new_group(store, &peers[0], "club", &[reader.id]).await;
    to_group(store, &peers[0], group, "club-first").await;
    // Newest first: club, peer5 .. peer0.
    let first = conversation_page(store, &reader, None, None, 3).await;
    assert_eq!(
        listed(&first),
        [
            (Conversation::Group(group), "club-first"),
            (Conversation::Direct(peers[5].id), "first-5"),
            (Conversation::Direct(peers[4].id), "first-4"),
        ]
    );

    // While the client pages: a chat not yet listed and one already listed get messages, and
    // a new one starts.
    dm(store, &peers[1], &reader, "second-1").await;
    dm(store, &reader, &peers[5], "second-5").await;
    to_group(store, &peers[0], group, "club-second").await;
    let newcomer = create(store, "newcomer").await;
    dm(store, &newcomer, &reader, "hello").await;

    let cursor = first.conversations.last().map(|c| c.last.id);
    let rest = conversation_page(store, &reader, Some(first.snapshot), cursor, ALL).await;
    assert_eq!(rest.snapshot, first.snapshot);
    assert_eq!(
        listed(&rest),
        [
            (Conversation::Direct(peers[3].id), "first-3"),
            (Conversation::Direct(peers[2].id), "first-2"),
            (Conversation::Direct(peers[1].id), "first-1"),
            (Conversation::Direct(peers[0].id), "first-0"),
        ],
        "the snapshot's list: nothing skipped, nothing twice, nothing newer"
    );

    // A fresh listing shows the new order.
    let fresh = conversation_page(store, &reader, None, None, 4).await;
    assert_eq!(
        listed(&fresh),
        [
            (Conversation::Direct(newcomer.id), "hello"),
            (Conversation::Group(group), "club-second"),
            (Conversation::Direct(peers[5].id), "second-5"),
            (Conversation::Direct(peers[1].id), "second-1"),
        ]
    );
}

pub(crate) async fn a_group_is_a_conversation_from_the_first_message_after_joining(
    store: &dyn Store,
) {
    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    let group = new_group(store, &alice, "team", &[]).await;
    to_group(store, &alice, group, "before bob").await;
    store
        .add_members(alice.id, group, &[bob.id], 10)
        .await
        .unwrap();
    assert!(
        conversation_page(store, &bob, None, None, ALL)
            .await
            .conversations
            .is_empty(),
        "nothing reached bob's inbox from this group yet"
    );
    let snapshot = conversation_page(store, &alice, None, None, ALL)
        .await
        .snapshot;
    to_group(store, &alice, group, "welcome").await;
    let listed_now = conversation_page(store, &bob, None, None, ALL).await;
    assert_eq!(
        listed(&listed_now),
        [(Conversation::Group(group), "welcome")]
    );
    // As of an earlier snapshot, the group had nothing for bob.
    assert!(
        conversation_page(store, &bob, Some(snapshot), None, ALL)
            .await
            .conversations
            .is_empty()
    );
}

pub(crate) async fn group_adds_decide_who_may_add_a_user(store: &dyn Store) {
    let admin = create_with(store, "admin", GroupAdds::Contacts).await;
    let friend = create_with(store, "friend", GroupAdds::Contacts).await;
    let stranger = create_with(store, "stranger", GroupAdds::Contacts).await;
    let open = create_with(store, "open", GroupAdds::Anyone).await;
    let closed = create_with(store, "closed", GroupAdds::Nobody).await;
    let fresh = store
        .create_account(NewAccount {
            group_adds: GroupAdds::default(),
            ..new_account("fresh")
        })
        .await
        .unwrap();
    assert_eq!(
        login(store, &fresh, 9).await.group_adds,
        GroupAdds::Contacts,
        "the default"
    );

    // A message the stranger receives from the admin does not make the admin their contact.
    dm(store, &admin, &stranger, "unsolicited").await;
    // One the friend writes to the admin does.
    dm(store, &friend, &admin, "hi").await;

    let group = new_group(store, &admin, "g", &[]).await;
    assert_err(
        store
            .add_members(
                admin.id,
                group,
                &[open.id, stranger.id, MISSING_USER, closed.id],
                10,
            )
            .await,
        &StoreError::GroupAddRefused(vec![stranger.id, MISSING_USER, closed.id]),
    );
    assert_eq!(
        members(store, &admin, group).await,
        [(admin.id, true)],
        "a refused request adds nobody, not even those who accept"
    );
    let before = store.groups_of(admin.id).await.unwrap().len();
    assert_err(
        store
            .create_group(admin.id, "refused", &[friend.id, stranger.id], 10, 1)
            .await,
        &StoreError::GroupAddRefused(vec![stranger.id]),
    );
    assert_eq!(store.groups_of(admin.id).await.unwrap().len(), before);
    assert!(store.groups_of(friend.id).await.unwrap().is_empty());

    let added = store
        .add_members(admin.id, group, &[open.id, friend.id], 10)
        .await
        .unwrap();
    assert_eq!(added.members.len(), 3);

    // Sharing a group makes a contact: open (now in g with the admin) switches to contacts
    // and still accepts the admin, but not the stranger.
    set_group_adds(store, &open, GroupAdds::Contacts).await;
    let second = store
        .create_group(admin.id, "second", &[open.id], 10, 1)
        .await
        .unwrap();
    assert_eq!(second.members.len(), 2);
    let strangers = new_group(store, &stranger, "s", &[]).await;
    assert_err(
        store
            .add_members(stranger.id, strangers, &[open.id], 10)
            .await,
        &StoreError::GroupAddRefused(vec![open.id]),
    );

    // Nobody: not even a contact.
    set_group_adds(store, &friend, GroupAdds::Nobody).await;
    assert_err(
        store
            .create_group(admin.id, "third", &[friend.id], 10, 1)
            .await,
        &StoreError::GroupAddRefused(vec![friend.id]),
    );
    let session = login(store, &friend, 10).await;
    assert_eq!(session.group_adds, GroupAdds::Nobody);
    let by_token = store
        .session_by_token(&token(10))
        .await
        .unwrap()
        .expect("session");
    assert_eq!(by_token.group_adds, GroupAdds::Nobody);

    // Whoever is refused can still leave what they are in.
    store.leave_group(friend.id, group).await.unwrap();
    // An admin can always create a group alone, whatever the setting.
    assert!(
        store
            .create_group(closed.id, "mine", &[], 10, 1)
            .await
            .is_ok()
    );

    // Changing one field leaves the other alone.
    let renamed = rename(store, friend.id, "Friendly").await.unwrap();
    assert_eq!(renamed.display_name, "Friendly");
    assert_eq!(
        login(store, &friend, 11).await.group_adds,
        GroupAdds::Nobody
    );
    assert_err(
        store
            .update_profile(
                MISSING_USER,
                ProfileChange {
                    display_name: None,
                    group_adds: Some(GroupAdds::Anyone),
                },
            )
            .await,
        &StoreError::NotFound("user"),
    );
}

// ----- groups -----

pub(crate) async fn group_changes_follow_admin_rules(store: &dyn Store) {
    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    let carol = create(store, "carol").await;
    let dave = create(store, "dave").await;
    let erin = create(store, "erin").await;

    let created = store
        .create_group(alice.id, "team", &[bob.id, bob.id, alice.id], 10, 1234)
        .await
        .unwrap();
    assert_eq!(created.name, "team");
    assert_eq!(created.created_at, 1234);
    let got: Vec<_> = created
        .members
        .iter()
        .map(|m| (m.user.id, m.admin))
        .collect();
    assert_eq!(got, [(alice.id, true), (bob.id, false)]);
    assert_eq!(created.members[0].user, alice);
    let group = created.id;

    let denied = StoreError::PermissionDenied("");
    let hidden = StoreError::NotFound("group");
    assert_err(
        store.add_members(bob.id, group, &[carol.id], 10).await,
        &denied,
    );
    assert_err(
        store.add_members(dave.id, group, &[carol.id], 10).await,
        &hidden,
    );
    assert_err(
        store
            .add_members(alice.id, MISSING_GROUP, &[carol.id], 10)
            .await,
        &StoreError::NotFound("group"),
    );

    let added = store
        .add_members(alice.id, group, &[carol.id, bob.id, carol.id], 10)
        .await
        .unwrap();
    let got: Vec<_> = added.members.iter().map(|m| (m.user.id, m.admin)).collect();
    assert_eq!(got, [(alice.id, true), (bob.id, false), (carol.id, false)]);

    assert_err(
        store
            .add_members(alice.id, group, &[dave.id, MISSING_USER], 10)
            .await,
        &StoreError::GroupAddRefused(vec![MISSING_USER]),
    );
    assert_err(
        store
            .add_members(alice.id, group, &[dave.id, erin.id], 4)
            .await,
        &StoreError::LimitExceeded("group size"),
    );
    assert_eq!(members(store, &alice, group).await.len(), 3);
    assert_err(store.group(dave.id, group).await, &hidden);

    assert_err(store.remove_member(bob.id, group, carol.id).await, &denied);
    assert_err(store.remove_member(dave.id, group, carol.id).await, &hidden);
    assert_err(
        store.remove_member(alice.id, group, alice.id).await,
        &denied,
    );
    assert_err(
        store.remove_member(alice.id, group, dave.id).await,
        &StoreError::NotFound("member"),
    );
    let after = store
        .remove_member(alice.id, group, carol.id)
        .await
        .unwrap();
    let got: Vec<_> = after.members.iter().map(|m| (m.user.id, m.admin)).collect();
    assert_eq!(got, [(alice.id, true), (bob.id, false)]);

    assert_err(store.group(carol.id, group).await, &hidden);
    assert_err(
        store.group(alice.id, MISSING_GROUP).await,
        &StoreError::NotFound("group"),
    );
    assert!(store.groups_of(carol.id).await.unwrap().is_empty());
    let listed = store.groups_of(bob.id).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, group);
    assert_eq!(listed[0].name, "team");
    assert!(listed[0].members.is_empty());
}

pub(crate) async fn create_group_checks_users_and_size(store: &dyn Store) {
    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    let carol = create(store, "carol").await;

    assert_err(
        store
            .create_group(alice.id, "g", &[bob.id, MISSING_USER], 10, 1)
            .await,
        &StoreError::GroupAddRefused(vec![MISSING_USER]),
    );
    assert_err(
        store
            .create_group(MISSING_USER, "g", &[bob.id], 10, 1)
            .await,
        &StoreError::NotFound("user"),
    );
    assert_err(
        store
            .create_group(alice.id, "g", &[bob.id, carol.id], 2, 1)
            .await,
        &StoreError::LimitExceeded("group size"),
    );
    assert!(store.groups_of(alice.id).await.unwrap().is_empty());

    // Duplicates and the creator do not count against the limit.
    let first = store
        .create_group(
            alice.id,
            "first",
            &[bob.id, carol.id, bob.id, alice.id],
            3,
            1,
        )
        .await
        .unwrap();
    assert_eq!(first.members.len(), 3);
    let second = store
        .create_group(bob.id, "second", &[alice.id], 3, 2)
        .await
        .unwrap();
    assert!(second.id > first.id);
    let listed: Vec<_> = store
        .groups_of(alice.id)
        .await
        .unwrap()
        .into_iter()
        .map(|g| (g.id, g.name))
        .collect();
    assert_eq!(
        listed,
        [
            (first.id, "first".to_owned()),
            (second.id, "second".to_owned())
        ]
    );
}

pub(crate) async fn leaving_hands_admin_to_the_longest_standing_member(store: &dyn Store) {
    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    let carol = create(store, "carol").await;
    let dave = create(store, "dave").await;
    // dave joins after carol, so carol is the longer-standing of the two.
    let group = new_group(store, &alice, "team", &[bob.id, carol.id]).await;
    store
        .add_members(alice.id, group, &[dave.id], 10)
        .await
        .unwrap();
    to_group(store, &alice, group, "before anyone left").await;

    store.leave_group(bob.id, group).await.unwrap();
    assert_eq!(
        members(store, &alice, group).await,
        [(alice.id, true), (carol.id, false), (dave.id, false)]
    );
    assert_err(
        store.leave_group(bob.id, group).await,
        &StoreError::NotFound("group"),
    );

    store.leave_group(alice.id, group).await.unwrap();
    assert_eq!(
        members(store, &carol, group).await,
        [(carol.id, true), (dave.id, false)]
    );
    store.leave_group(carol.id, group).await.unwrap();
    assert_eq!(members(store, &dave, group).await, [(dave.id, true)]);

    store.leave_group(dave.id, group).await.unwrap();
    assert_err(
        store.group(dave.id, group).await,
        &StoreError::NotFound("group"),
    );
    assert_err(
        store.leave_group(dave.id, group).await,
        &StoreError::NotFound("group"),
    );
    assert!(store.groups_of(dave.id).await.unwrap().is_empty());
    // Leaving takes nothing out of anyone's inbox.
    assert_eq!(
        client_ids(&[(*inbox(store, &bob).await[0].message).clone()]),
        ["before anyone left"]
    );
    // A deleted group's id is never reused, so its old messages cannot leak into a new group.
    let next = store
        .create_group(alice.id, "next", &[], 10, 2)
        .await
        .unwrap();
    assert_ne!(next.id, group);
    assert!(
        history(store, &alice, Conversation::Group(next.id), None, ALL)
            .await
            .is_empty()
    );
}

// ----- concurrency -----

/// Many concurrent senders to overlapping recipients, with pollers reading behind them: each
/// inbox must come out dense (1..=N), every reported entry must be where it was reported, and
/// a poller following `after = cursor` must never have skipped an entry.
pub(crate) async fn concurrent_appends_keep_every_inbox_gapless(store: Arc<dyn Store>) {
    const USERS: usize = 8;
    const TASKS: usize = 32;
    const PER_TASK: usize = 50;

    let mut users = Vec::new();
    for i in 0..USERS {
        users.push(create(store.as_ref(), &format!("user{i}")).await);
    }
    let all_ids: Vec<_> = users.iter().map(|u| u.id).collect();
    let everyone = store
        .create_group(users[0].id, "everyone", &all_ids, 100, 1)
        .await
        .unwrap()
        .id;
    let half = store
        .create_group(users[1].id, "half", &all_ids[..USERS / 2], 100, 1)
        .await
        .unwrap()
        .id;
    let users = Arc::new(users);
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let mut pollers = Vec::new();
    for user in users.iter().map(|u| u.id) {
        let store = Arc::clone(&store);
        let finished = Arc::clone(&finished);
        pollers.push(tokio::spawn(async move {
            let mut seen: Vec<(u64, MessageId)> = Vec::new();
            let mut cursor = Seq(0);
            loop {
                // Read `finished` before polling: the poll after it was set sees everything.
                let last_round = finished.load(std::sync::atomic::Ordering::Acquire);
                let page = store
                    .read_inbox(user, cursor, 16, usize::MAX)
                    .await
                    .unwrap();
                for entry in &page {
                    assert_eq!(entry.seq.0, cursor.0 + 1, "poller of {user} skipped");
                    cursor = entry.seq;
                    seen.push((entry.seq.0, entry.message.id));
                }
                if page.is_empty() {
                    if last_round {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
            }
            (user, seen)
        }));
    }

    let mut senders = Vec::new();
    for task in 0..TASKS {
        let store = Arc::clone(&store);
        let users = Arc::clone(&users);
        senders.push(tokio::spawn(async move {
            let mut appended = Vec::new();
            let from = &users[task % USERS];
            for i in 0..PER_TASK {
                let to = match i % 4 {
                    0 => Recipient::Group(everyone),
                    1 if task % USERS < USERS / 2 => Recipient::Group(half),
                    _ => Recipient::User(users[(task + i) % USERS].id),
                };
                let cid = format!("t{task}-m{i}");
                let result = store.append_message(message(from, to, &cid)).await.unwrap();
                assert!(!result.duplicate);
                appended.push(result);
            }
            appended
        }));
    }
    let mut appended = Vec::new();
    for sender in senders {
        appended.extend(sender.await.unwrap());
    }
    finished.store(true, std::sync::atomic::Ordering::Release);

    // Where every append said each entry went.
    let mut reported: BTreeMap<UserId, BTreeMap<u64, MessageId>> = BTreeMap::new();
    for a in &appended {
        assert!(a.entries.windows(2).all(|w| w[0].0 < w[1].0));
        for &(user, seq) in &a.entries {
            let previous = reported
                .entry(user)
                .or_default()
                .insert(seq.0, a.message.id);
            assert!(previous.is_none(), "seq {seq} of {user} handed out twice");
        }
    }
    let message_ids: HashSet<_> = appended.iter().map(|a| a.message.id).collect();
    assert_eq!(message_ids.len(), TASKS * PER_TASK);

    for poller in pollers {
        let (user, seen) = poller.await.unwrap();
        let full = store
            .read_inbox(user, Seq(0), ALL, usize::MAX)
            .await
            .unwrap();
        let n = full.len() as u64;
        assert!(n > 0);
        assert_eq!(seqs(&full), (1..=n).collect::<Vec<_>>(), "gap in {user}");
        assert_eq!(store.inbox_head(user).await.unwrap(), Seq(n));
        let full: Vec<_> = full.iter().map(|e| (e.seq.0, e.message.id)).collect();
        assert_eq!(seen, full, "poller of {user} saw a different inbox");
        let expected: Vec<_> = reported
            .get(&user)
            .map(|m| m.iter().map(|(s, id)| (*s, *id)).collect())
            .unwrap_or_default();
        assert_eq!(
            full, expected,
            "inbox of {user} differs from the append results"
        );
    }
}

/// Retries racing each other (as after a reconnect) store each message once: one of them
/// appends, every other gets that first message back as a duplicate, and no inbox gets an
/// entry twice or a hole.
pub(crate) async fn concurrent_retries_store_each_message_once(store: Arc<dyn Store>) {
    const MESSAGES: usize = 20;
    const TRIES: usize = 5;
    let alice = create(store.as_ref(), "alice").await;
    let bob = create(store.as_ref(), "bob").await;
    let mut tasks = Vec::new();
    for i in 0..MESSAGES {
        for _ in 0..TRIES {
            let store = Arc::clone(&store);
            let m = message(&alice, Recipient::User(bob.id), &format!("m{i}"));
            tasks.push(tokio::spawn(async move { store.append_message(m).await }));
        }
    }
    let mut first: BTreeMap<String, MessageId> = BTreeMap::new();
    let mut answers = Vec::new();
    for task in tasks {
        let appended = task.await.unwrap().expect("append or duplicate");
        if appended.duplicate {
            assert!(appended.entries.is_empty(), "a duplicate appended entries");
        } else {
            let previous =
                first.insert(appended.message.client_msg_id.clone(), appended.message.id);
            assert!(previous.is_none(), "one client_msg_id stored twice");
        }
        answers.push(appended);
    }
    assert_eq!(first.len(), MESSAGES);
    for appended in &answers {
        assert_eq!(
            first.get(&appended.message.client_msg_id),
            Some(&appended.message.id),
            "a retry got a different message back"
        );
    }
    let dense: Vec<u64> = (1..=MESSAGES as u64).collect();
    assert_eq!(seqs(&inbox(store.as_ref(), &alice).await), dense);
    assert_eq!(seqs(&inbox(store.as_ref(), &bob).await), dense);
}

/// Commands queued back to back (so they may share one group commit) each see the ones queued
/// before them: an append right after a rename is stamped with the new name, an append to or
/// from an account deleted just before is refused, and a refused append leaves no hole in the
/// sender's inbox.
pub(crate) async fn queued_renames_and_deletions_apply_to_the_next_append(store: &dyn Store) {
    use std::pin::Pin;

    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    let carol = create(store, "carol").await;
    let append = |from: &User, to: &User, id: &str| {
        let m = message(from, Recipient::User(to.id), id);
        async move {
            match store.append_message(m).await {
                Ok(a) => Ok((a.message.sender.display_name.clone(), a.entries)),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    type Outcome = Result<(String, Vec<(UserId, Seq)>), String>;
    // join_all polls in order, so the commands are queued in this order.
    let queued: Vec<Pin<Box<dyn Future<Output = Outcome> + Send + '_>>> = vec![
        Box::pin(append(&alice, &bob, "a1")),
        Box::pin(async {
            rename(store, alice.id, "Queen")
                .await
                .map(|_| (String::new(), Vec::new()))
                .map_err(|e| e.to_string())
        }),
        Box::pin(append(&alice, &bob, "a2")),
        Box::pin(async {
            store
                .delete_account(bob.id)
                .await
                .map(|_| (String::new(), Vec::new()))
                .map_err(|e| e.to_string())
        }),
        Box::pin(append(&alice, &bob, "a3")),
        Box::pin(append(&bob, &alice, "b1")),
        Box::pin(append(&alice, &carol, "a4")),
    ];
    let outcomes = futures_util::future::join_all(queued).await;
    let entries = |a: Seq, b: (UserId, Seq)| {
        let mut e = vec![(alice.id, a), b];
        e.sort();
        e
    };
    let missing = StoreError::NotFound("user").to_string();
    assert_eq!(
        outcomes,
        [
            Ok((
                "alice (display)".to_owned(),
                entries(Seq(1), (bob.id, Seq(1)))
            )),
            Ok((String::new(), Vec::new())),
            Ok(("Queen".to_owned(), entries(Seq(2), (bob.id, Seq(2))))),
            Ok((String::new(), Vec::new())),
            Err(missing.clone()),
            Err(missing),
            Ok(("Queen".to_owned(), entries(Seq(3), (carol.id, Seq(1))))),
        ]
    );
    assert_eq!(seqs(&inbox(store, &alice).await), [1, 2, 3]);
    assert_eq!(store.inbox_head(bob.id).await.unwrap(), Seq(0));

    // A new account gets a fresh inbox, whatever the writer remembered of the deleted one.
    let bob2 = create(store, "bob").await;
    assert_eq!(
        dm(store, &alice, &bob2, "a5").await.entries,
        entries(Seq(4), (bob2.id, Seq(1)))
    );
}

/// Concurrent commands that fail (a taken name) must fail alone, whatever they were batched
/// with.
pub(crate) async fn concurrent_duplicate_usernames_have_one_winner(store: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for attempt in 0..40 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let name = format!("name{}", attempt % 10);
            (name.clone(), store.create_account(new_account(&name)).await)
        }));
    }
    let mut winners: BTreeMap<String, usize> = BTreeMap::new();
    for task in tasks {
        let (name, result) = task.await.unwrap();
        match result {
            Ok(user) => {
                assert_eq!(user.username, name);
                *winners.entry(name).or_default() += 1;
            }
            Err(e) => assert_err::<()>(Err(e), &StoreError::AlreadyExists("username")),
        }
    }
    assert_eq!(winners.len(), 10);
    assert!(winners.values().all(|&n| n == 1));
    for i in 0..10 {
        let found = store
            .account_by_username(&format!("name{i}"))
            .await
            .unwrap();
        assert!(found.is_some());
    }
}

// ----- lifecycle -----

/// The identity made with the schema names the cluster in Redis: it must look the same to
/// every reader, every time (and survive restarts, see `everything_survives_a_restart`).
pub(crate) async fn the_cluster_id_is_32_hex_chars_and_stable(store: &dyn Store) {
    let id = store.cluster_id().await.expect("cluster id");
    assert_eq!(id.len(), 32, "{id}");
    assert!(
        id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{id}"
    );
    create(store, "alice").await;
    assert_eq!(store.cluster_id().await.expect("cluster id again"), id);
}

pub(crate) async fn closed_store_is_unavailable(store: &dyn Store) {
    let alice = create(store, "alice").await;
    store.close().await.unwrap();
    let unavailable = StoreError::Unavailable(String::new());
    assert_err(store.create_account(new_account("bob")).await, &unavailable);
    assert_err(store.account_by_id(alice.id).await, &unavailable);
    assert_err(
        store.read_inbox(alice.id, Seq(0), ALL, usize::MAX).await,
        &unavailable,
    );
    store.close().await.unwrap();
}

/// What was acknowledged before a clean shutdown is all there after reopening, and counters
/// (ids, seqs) carry on rather than restart.
pub(crate) async fn everything_survives_a_restart<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Store>>,
{
    let store = open().await;
    let s = store.as_ref();
    let cluster_id = s.cluster_id().await.unwrap();
    let alice = create(s, "alice").await;
    let bob = create(s, "bob").await;
    let gone = create(s, "gone").await;
    login(s, &alice, 1).await;
    let group = s
        .create_group(alice.id, "team", &[bob.id], 10, 1)
        .await
        .unwrap()
        .id;
    let first = dm(s, &alice, &bob, "m1").await;
    to_group(s, &bob, group, "g1").await;
    let device = s.session_by_token(&token(1)).await.unwrap().unwrap().device;
    s.ack(device, Seq(1)).await.unwrap();
    s.delete_account(gone.id).await.unwrap();
    store.close().await.unwrap();
    drop(store);

    let store = open().await;
    let s = store.as_ref();
    assert_eq!(s.cluster_id().await.unwrap(), cluster_id);
    assert_eq!(
        s.account_by_username("alice").await.unwrap().unwrap().user,
        alice
    );
    let session = s.session_by_token(&token(1)).await.unwrap().unwrap();
    assert_eq!(session.device, device);
    assert_eq!(session.acked, Seq(1));
    assert_eq!(seqs(&inbox(s, &bob).await), [1, 2]);
    assert_eq!(s.inbox_head(alice.id).await.unwrap(), Seq(2));
    assert_eq!(
        client_ids(&history(s, &alice, Conversation::Group(group), None, ALL).await),
        ["g1"]
    );
    assert_eq!(
        members(s, &bob, group).await,
        [(alice.id, true), (bob.id, false)]
    );

    let next = dm(s, &bob, &alice, "m2").await;
    assert!(next.message.id > first.message.id);
    assert_eq!(next.entries, {
        let mut e = vec![(alice.id, Seq(3)), (bob.id, Seq(3))];
        e.sort();
        e
    });
    let retry = s
        .append_message(message(&alice, Recipient::User(bob.id), "m1"))
        .await
        .unwrap();
    assert!(retry.duplicate);
    let newcomer = create(s, "gone").await;
    assert!(newcomer.id > gone.id, "a deleted account's id came back");
    store.close().await.unwrap();
}

// ----- login cookies -----

pub(crate) async fn login_cookies_belong_to_one_account_are_bounded_and_revoked(store: &dyn Store) {
    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    let cookie = |n: u8| [n; 32];
    store
        .remember_login_cookie(alice.id, &cookie(1), 10, 3)
        .await
        .unwrap();
    assert!(store.has_login_cookie(alice.id, &cookie(1)).await.unwrap());
    // Another account's cookie, a made-up one and a missing user find nothing.
    assert!(!store.has_login_cookie(bob.id, &cookie(1)).await.unwrap());
    assert!(!store.has_login_cookie(alice.id, &cookie(9)).await.unwrap());
    assert!(!store.has_login_cookie(UserId(0), &cookie(1)).await.unwrap());
    assert_err(
        store
            .remember_login_cookie(MISSING_USER, &cookie(2), 10, 3)
            .await,
        &StoreError::NotFound("user"),
    );

    // Only the `keep` most recently used stay; using a cookie again keeps it.
    for (n, at) in [(2, 20), (3, 30)] {
        store
            .remember_login_cookie(alice.id, &cookie(n), at, 3)
            .await
            .unwrap();
    }
    store
        .remember_login_cookie(alice.id, &cookie(1), 40, 3)
        .await
        .unwrap();
    store
        .remember_login_cookie(alice.id, &cookie(4), 50, 3)
        .await
        .unwrap();
    let mut kept = Vec::new();
    for n in 1..=4 {
        if store.has_login_cookie(alice.id, &cookie(n)).await.unwrap() {
            kept.push(n);
        }
    }
    assert_eq!(kept, vec![1, 3, 4], "the least recently used cookie goes");

    // The same bytes may be remembered for two accounts without touching each other.
    store
        .remember_login_cookie(bob.id, &cookie(3), 60, 3)
        .await
        .unwrap();
    let session = login(store, &alice, 7).await;
    store
        .change_password(alice.id, "new-hash", session.device)
        .await
        .unwrap();
    for n in 1..=4 {
        assert!(
            !store.has_login_cookie(alice.id, &cookie(n)).await.unwrap(),
            "a password change revokes every login cookie"
        );
    }
    assert!(store.has_login_cookie(bob.id, &cookie(3)).await.unwrap());

    store
        .remember_login_cookie(bob.id, &cookie(5), 70, 3)
        .await
        .unwrap();
    store.delete_account(bob.id).await.unwrap();
    assert!(!store.has_login_cookie(bob.id, &cookie(5)).await.unwrap());
    // A new account under the freed name does not inherit them.
    let bob_again = create(store, "bob").await;
    assert!(
        !store
            .has_login_cookie(bob_again.id, &cookie(5))
            .await
            .unwrap()
    );
}

// ----- storage quotas -----

fn with_quotas(mut m: NewMessage, inbox_backlog: u64, history: u64) -> NewMessage {
    m.quotas = AppendQuotas {
        inbox_backlog,
        history,
    };
    m
}

pub(crate) async fn a_direct_message_to_a_full_inbox_is_refused_and_changes_nothing(
    store: &dyn Store,
) {
    use super::{HISTORY_FULL, INBOX_FULL};
    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    let carol = create(store, "carol").await;
    let bobs_phone = login(store, &bob, 1).await;
    let group = new_group(store, &alice, "g", &[bob.id]).await;
    let send = |from: &User, to: Recipient, id: &str| {
        store.append_message(with_quotas(message(from, to, id), 3, u64::MAX))
    };
    for i in 0..3 {
        send(&alice, Recipient::User(bob.id), &format!("m{i}"))
            .await
            .unwrap();
    }
    let bob_before = inbox(store, &bob).await;
    let alice_before = inbox(store, &alice).await;
    assert_err(
        send(&alice, Recipient::User(bob.id), "over").await,
        &StoreError::QuotaExceeded(INBOX_FULL),
    );
    assert_err(
        send(&carol, Recipient::User(bob.id), "over").await,
        &StoreError::QuotaExceeded(INBOX_FULL),
    );
    assert_ne!(INBOX_FULL, HISTORY_FULL);
    assert_eq!(
        inbox(store, &bob).await,
        bob_before,
        "a refused DM changed bob's inbox"
    );
    assert_eq!(inbox(store, &alice).await, alice_before);
    assert!(inbox(store, &carol).await.is_empty());
    assert_eq!(
        history(store, &alice, Conversation::Direct(bob.id), None, ALL)
            .await
            .len(),
        3
    );
    // A retry of a message that was stored still gets its first answer.
    assert!(
        send(&alice, Recipient::User(bob.id), "m0")
            .await
            .unwrap()
            .duplicate
    );
    // Bob may still write, to others and to himself; a group he is in still reaches him,
    // past the quota: one absent member must not silence a group. (Alice's own copies count
    // in her backlog too, and she has no device: bob writes to carol.)
    send(&bob, Recipient::User(carol.id), "reply")
        .await
        .unwrap();
    send(&bob, Recipient::User(bob.id), "note").await.unwrap();
    let g = send(&alice, Recipient::Group(group), "group")
        .await
        .unwrap();
    assert!(g.entries.iter().any(|&(u, _)| u == bob.id));
    // Once a device of bob's has received what waits, direct messages flow again.
    let head = store.inbox_head(bob.id).await.unwrap();
    store.ack(bobs_phone.device, head).await.unwrap();
    send(&alice, Recipient::User(bob.id), "after-ack")
        .await
        .unwrap();
}

pub(crate) async fn a_conversation_at_its_history_quota_refuses_further_messages(
    store: &dyn Store,
) {
    use super::HISTORY_FULL;
    let alice = create(store, "alice").await;
    let bob = create(store, "bob").await;
    let carol = create(store, "carol").await;
    let group = new_group(store, &alice, "g", &[bob.id]).await;
    let send = |from: &User, to: Recipient, id: &str| {
        store.append_message(with_quotas(message(from, to, id), u64::MAX, 2))
    };
    send(&alice, Recipient::User(bob.id), "d1").await.unwrap();
    send(&bob, Recipient::User(alice.id), "d2").await.unwrap();
    let bob_before = inbox(store, &bob).await;
    // Both sides of the pair share one history.
    for (from, to) in [(&alice, &bob), (&bob, &alice)] {
        assert_err(
            send(from, Recipient::User(to.id), "d3").await,
            &StoreError::QuotaExceeded(HISTORY_FULL),
        );
    }
    assert_eq!(inbox(store, &bob).await, bob_before);
    assert!(
        send(&alice, Recipient::User(bob.id), "d1")
            .await
            .unwrap()
            .duplicate
    );
    // Other conversations have their own.
    send(&alice, Recipient::User(carol.id), "c1").await.unwrap();
    send(&alice, Recipient::Group(group), "g1").await.unwrap();
    send(&bob, Recipient::Group(group), "g2").await.unwrap();
    assert_err(
        send(&alice, Recipient::Group(group), "g3").await,
        &StoreError::QuotaExceeded(HISTORY_FULL),
    );
    assert_eq!(
        history(store, &bob, Conversation::Group(group), None, ALL)
            .await
            .len(),
        2
    );
    // Counting starts from what the store holds, not from this process's sends: a higher
    // quota lets the same conversation go on.
    store
        .append_message(with_quotas(
            message(&alice, Recipient::Group(group), "g3"),
            u64::MAX,
            3,
        ))
        .await
        .unwrap();
}

/// Every suite function that runs unchanged on each backend, once: a backend module defines
/// its `suite!` (how to give a test a fresh store) and calls `for_each_backend!(suite)`, so no
/// backend can miss a test another one runs.
macro_rules! for_each_backend {
    ($suite:ident) => {
        $suite! {
            borrowed: [
                accounts_are_created_and_found,
                usernames_are_unique_ignoring_case,
                display_name_changes_do_not_rewrite_history,
                change_password_ends_every_other_session,
                deleted_account_frees_the_name_and_keeps_its_messages,
                sessions_are_found_by_token_touched_and_deleted,
                acks_only_move_forward_and_stop_at_the_head,
                direct_message_lands_in_both_inboxes,
                retried_append_returns_the_first_message,
                append_to_a_missing_recipient_is_not_found,
                group_message_fans_out_to_every_member,
                non_member_cannot_send_to_a_group,
                inbox_reads_in_order_and_pages,
                inbox_pages_stop_at_the_byte_bound,
                direct_history_pages_newest_first_from_both_sides,
                group_history_is_for_members_only,
                conversations_list_each_chat_once_newest_first,
                conversation_pages_hold_still_while_chats_move,
                a_group_is_a_conversation_from_the_first_message_after_joining,
                group_adds_decide_who_may_add_a_user,
                group_changes_follow_admin_rules,
                create_group_checks_users_and_size,
                leaving_hands_admin_to_the_longest_standing_member,
                the_cluster_id_is_32_hex_chars_and_stable,
                login_cookies_belong_to_one_account_are_bounded_and_revoked,
                closed_store_is_unavailable,
                a_direct_message_to_a_full_inbox_is_refused_and_changes_nothing,
                a_conversation_at_its_history_quota_refuses_further_messages,
            ],
            shared: [
                concurrent_appends_keep_every_inbox_gapless,
                concurrent_duplicate_usernames_have_one_winner,
                concurrent_retries_store_each_message_once,
            ],
        }
    };
}

// ----- the SQLite backend -----

mod sqlite_backend {
    use std::path::PathBuf;
    use std::sync::Arc;

    use tempfile::TempDir;

    use super::super::Store;
    use super::super::sqlite::{SqliteOptions, SqliteStore};
    use crate::model::{Recipient, Seq};

    fn db_path(dir: &TempDir) -> PathBuf {
        dir.path().join("data").join("messenger.db")
    }

    fn open(dir: &TempDir) -> Arc<dyn Store> {
        Arc::new(SqliteStore::open(&db_path(dir), SqliteOptions::default()).expect("open store"))
    }

    /// One test per suite function, each on a fresh database in its own directory.
    macro_rules! suite {
        (borrowed: [$($name:ident),* $(,)?], shared: [$($shared:ident),* $(,)?] $(,)?) => {
            $(
                #[tokio::test]
                async fn $name() {
                    let dir = TempDir::new().expect("temp dir");
                    let store = open(&dir);
                    super::$name(store.as_ref()).await;
                    store.close().await.expect("close");
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $shared() {
                    let dir = TempDir::new().expect("temp dir");
                    let store = open(&dir);
                    super::$shared(Arc::clone(&store)).await;
                    store.close().await.expect("close");
                }
            )*
        };
    }

    for_each_backend!(suite);

    /// Not in the shared list: on PostgreSQL it needs a pool of one (see there).
    #[tokio::test]
    async fn queued_renames_and_deletions_apply_to_the_next_append() {
        let dir = TempDir::new().expect("temp dir");
        let store = open(&dir);
        super::queued_renames_and_deletions_apply_to_the_next_append(store.as_ref()).await;
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn everything_survives_a_restart() {
        let dir = TempDir::new().expect("temp dir");
        super::everything_survives_a_restart(|| async { open(&dir) }).await;
    }

    // Beyond the shared contract: SQLite specifics.

    #[tokio::test]
    async fn open_creates_the_data_directory_and_reopens_without_remigrating() {
        let dir = TempDir::new().expect("temp dir");
        let path = dir.path().join("a").join("b").join("messenger.db");
        for _ in 0..2 {
            let store = SqliteStore::open(&path, SqliteOptions::default()).expect("open");
            store.close().await.expect("close");
        }
        assert!(path.exists());
    }

    #[tokio::test]
    async fn dropping_without_close_keeps_what_was_acknowledged() {
        let dir = TempDir::new().expect("temp dir");
        let store = open(&dir);
        let alice = super::create(store.as_ref(), "alice").await;
        super::dm(store.as_ref(), &alice, &alice, "kept").await;
        drop(store);
        let store = open(&dir);
        assert_eq!(store.inbox_head(alice.id).await.unwrap(), Seq(1));
        store.close().await.expect("close");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_tiny_batch_limit_and_one_reader_still_keep_the_contract() {
        let dir = TempDir::new().expect("temp dir");
        let options = SqliteOptions {
            synchronous_full: false,
            readers: 1,
            max_batch: 1,
        };
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&db_path(&dir), options).expect("open"));
        let alice = super::create(store.as_ref(), "alice").await;
        let mut tasks = Vec::new();
        for i in 0..20 {
            let store = Arc::clone(&store);
            let alice = alice.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .append_message(super::message(
                        &alice,
                        Recipient::User(alice.id),
                        &format!("m{i}"),
                    ))
                    .await
                    .unwrap()
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let all = super::inbox(store.as_ref(), &alice).await;
        assert_eq!(super::seqs(&all), (1..=20).collect::<Vec<_>>());
        store.close().await.expect("close");
    }
}

// ----- the PostgreSQL backend -----

/// The same suite on PostgreSQL. Each test gets a database of its own on the server named by
/// `MESSENGER_TEST_POSTGRES_URL` (created, migrated, dropped afterwards), so they run in
/// parallel. No server is a failure, never a skip: the suite is part of the contract.
pub(crate) mod postgres_backend {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio_postgres::NoTls;

    use super::super::Store;
    use super::super::StoreError;
    use super::super::postgres::{PostgresOptions, PostgresStore, parse_url};
    use crate::model::{Conversation, GroupAdds, MessageId, Recipient, Seq, UserId};

    fn admin_url() -> String {
        crate::testing::postgres_admin_url()
    }

    fn options() -> PostgresOptions {
        PostgresOptions {
            pool_size: 8,
            timeout: Duration::from_secs(10),
            migrate: true,
        }
    }

    /// A database that exists for one test; dropped (forcibly, connections and all) when
    /// this goes away, even when the test panicked.
    pub(crate) struct TestDb {
        admin: tokio_postgres::Config,
        pub(crate) config: tokio_postgres::Config,
        name: String,
    }

    impl TestDb {
        pub(crate) async fn create() -> TestDb {
            let url = admin_url();
            let admin = parse_url(&url).expect("MESSENGER_TEST_POSTGRES_URL is not a valid URL");
            let name = format!("msgtest_{}", hex::encode(crate::auth::random_bytes::<8>()));
            let client = admin_client(&admin, &url).await;
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .expect("CREATE DATABASE for the test");
            let mut config = admin.clone();
            config.dbname(&name);
            TestDb {
                admin,
                config,
                name,
            }
        }

        /// Sessions connected to this test's database, as the server counts them.
        async fn connections(&self) -> i64 {
            let client = admin_client(&self.admin, &admin_url()).await;
            client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
                    &[&self.name],
                )
                .await
                .expect("count connections")
                .get(0)
        }

        pub(crate) async fn open(&self, options: PostgresOptions) -> Arc<dyn Store> {
            Arc::new(
                PostgresStore::open(self.config.clone(), options)
                    .await
                    .expect("open the PostgreSQL store"),
            )
        }
    }

    async fn admin_client(admin: &tokio_postgres::Config, url: &str) -> tokio_postgres::Client {
        let mut admin = admin.clone();
        admin.connect_timeout(Duration::from_secs(5));
        let (client, connection) = match admin.connect(NoTls).await {
            Ok(c) => c,
            Err(e) => panic!(
                "PostgreSQL is needed for these tests and is not reachable at {url}: {e}\n\
                 Start one (as root): pg_ctlcluster --skip-systemctl-redirect \
                 $(ls /etc/postgresql) main start\n\
                 or install it: apt-get install -y postgresql, or point \
                 MESSENGER_TEST_POSTGRES_URL at a server where the user may CREATE DATABASE \
                 (script/test does all of this)."
            ),
        };
        tokio::spawn(connection);
        client
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            let admin = self.admin.clone();
            let name = self.name.clone();
            // Drop cannot await, and the test's runtime may be the one running this: use a
            // runtime of its own on a thread of its own.
            let dropped = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                rt.block_on(async move {
                    let (client, connection) =
                        admin.connect(NoTls).await.map_err(|e| e.to_string())?;
                    tokio::spawn(connection);
                    client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await
                        .map_err(|e| e.to_string())
                })
            })
            .join();
            if !matches!(dropped, Ok(Ok(()))) {
                eprintln!("could not drop test database {}: {dropped:?}", self.name);
            }
        }
    }

    macro_rules! suite {
        (borrowed: [$($name:ident),* $(,)?], shared: [$($shared:ident),* $(,)?] $(,)?) => {
            $(
                #[tokio::test]
                async fn $name() {
                    let db = TestDb::create().await;
                    let store = db.open(options()).await;
                    super::$name(store.as_ref()).await;
                    store.close().await.expect("close");
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $shared() {
                    let db = TestDb::create().await;
                    let store = db.open(options()).await;
                    super::$shared(Arc::clone(&store)).await;
                    store.close().await.expect("close");
                }
            )*
        };
    }

    for_each_backend!(suite);

    /// The suite function assumes commands issued back to back run in that order. A pool of
    /// one connection hands it out first come, first served, which gives that order; with more
    /// connections (or nodes) concurrently issued commands have no defined order at all.
    #[tokio::test]
    async fn queued_renames_and_deletions_apply_to_the_next_append() {
        let db = TestDb::create().await;
        let store = db
            .open(PostgresOptions {
                pool_size: 1,
                ..options()
            })
            .await;
        super::queued_renames_and_deletions_apply_to_the_next_append(store.as_ref()).await;
        store.close().await.expect("close");
    }

    #[tokio::test]
    async fn everything_survives_a_restart() {
        let db = TestDb::create().await;
        super::everything_survives_a_restart(|| db.open(options())).await;
    }

    // Beyond the shared contract: PostgreSQL specifics.

    #[tokio::test]
    async fn reopening_does_not_remigrate_and_health_answers() {
        let db = TestDb::create().await;
        let first = db.open(options()).await;
        first.health().await.expect("healthy");
        let alice = super::create(first.as_ref(), "alice").await;
        assert!(db.connections().await > 0);
        first.close().await.expect("close");
        assert!(first.health().await.is_err(), "a closed store is not ready");
        // Closing lets go of the server's connections (a stopping node frees its slots).
        let mut left = db.connections().await;
        for _ in 0..50 {
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            left = db.connections().await;
        }
        assert_eq!(left, 0, "connections stayed open after close");
        let again = super::super::postgres::migrate(&db.config, Duration::from_secs(5))
            .await
            .expect("migrate again");
        assert_eq!(again, 0, "migrations were applied twice");
        let second = db.open(options()).await;
        let found = second.account_by_id(alice.id).await.expect("read");
        assert_eq!(found.map(|a| a.user), Some(alice));
        second.close().await.expect("close");
    }

    /// Nodes starting together all migrate at once; the advisory lock makes them take turns,
    /// so exactly one applies the schema and none fails on a half-created one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_migrations_apply_each_version_once() {
        let db = TestDb::create().await;
        let runs: Vec<_> = (0..6)
            .map(|_| {
                let config = db.config.clone();
                tokio::spawn(async move {
                    super::super::postgres::migrate(&config, Duration::from_secs(10)).await
                })
            })
            .collect();
        let mut applied = Vec::new();
        for run in runs {
            applied.push(run.await.expect("task").expect("migrate"));
        }
        applied.sort_unstable();
        // One run applied every version (V1 and on); the five others found nothing to do.
        assert_eq!(applied[..5], [0, 0, 0, 0, 0]);
        assert!(applied[5] >= 2, "{applied:?}");
        let store = db.open(options()).await;
        super::create(store.as_ref(), "alice").await;
        store.close().await.expect("close");
    }

    /// Each database is its own cluster: a fresh one gets a fresh id, the table refuses a
    /// second identity, and a database made before the identity existed (V1 only) gets one
    /// when migrated in place, keeping its data; V3 then indexes the conversations and
    /// contacts that data already holds.
    #[tokio::test]
    async fn each_database_has_one_cluster_id_and_an_old_one_gains_it_in_place() {
        let (one, two) = (TestDb::create().await, TestDb::create().await);
        let (a, b) = (one.open(options()).await, two.open(options()).await);
        let id = a.cluster_id().await.expect("id");
        assert_ne!(id, b.cluster_id().await.expect("id"));
        b.close().await.expect("close");
        drop(two);

        let alice = super::create(a.as_ref(), "alice").await;
        let bob = super::create(a.as_ref(), "bob").await;
        let carol = super::create(a.as_ref(), "carol").await;
        super::dm(a.as_ref(), &bob, &alice, "old dm").await;
        let club = super::new_group(a.as_ref(), &alice, "club", &[carol.id]).await;
        super::to_group(a.as_ref(), &carol, club, "old group message").await;
        let (client, connection) = one.config.connect(NoTls).await.expect("connect");
        tokio::spawn(connection);
        let second = client
            .batch_execute("INSERT INTO cluster_identity (id) VALUES (repeat('a', 32))")
            .await;
        assert!(second.is_err(), "a second identity row was accepted");
        // Back to a V1 database, as one created before these migrations existed (refinery
        // refuses to apply a version below the newest applied one, so the later ones go too).
        client
            .batch_execute(
                "DROP TABLE direct_threads; \
                 ALTER TABLE users DROP COLUMN group_adds; \
                 ALTER TABLE groups DROP COLUMN last_message_id; \
                 ALTER TABLE group_members DROP COLUMN joined_after; \
                 DROP TABLE cluster_identity; DROP TABLE login_cookies; \
                 DROP TABLE history_sizes; \
                 DELETE FROM refinery_schema_history WHERE version >= 2",
            )
            .await
            .expect("undo V2 and later");
        a.close().await.expect("close");
        let applied = super::super::postgres::migrate(&one.config, Duration::from_secs(5))
            .await
            .expect("upgrade in place");
        assert_eq!(applied, 4, "V2 to V5");
        let upgraded = one.open(options()).await;
        let new_id = upgraded.cluster_id().await.expect("id after upgrade");
        assert_eq!(new_id.len(), 32);
        let found = upgraded.account_by_id(alice.id).await.expect("read");
        assert_eq!(found.as_ref().map(|a| &a.user), Some(&alice));
        let list = super::conversation_page(upgraded.as_ref(), &alice, None, None, 10).await;
        assert_eq!(
            super::listed(&list),
            [
                (Conversation::Group(club), "old group message"),
                (Conversation::Direct(bob.id), "old dm"),
            ]
        );
        // Existing accounts got the default; bob wrote to alice, so alice is his contact.
        super::set_group_adds(upgraded.as_ref(), &carol, GroupAdds::Nobody).await;
        let refused = upgraded
            .create_group(alice.id, "new", &[bob.id, carol.id], 10, 1)
            .await;
        super::assert_err(refused, &StoreError::GroupAddRefused(vec![carol.id]));
        // The other way round: alice never wrote to bob and shares no group with him.
        super::assert_err(
            upgraded
                .create_group(bob.id, "bob's", &[alice.id], 10, 1)
                .await,
            &StoreError::GroupAddRefused(vec![alice.id]),
        );
        upgraded.close().await.expect("close");
    }

    #[tokio::test]
    async fn unreachable_database_is_unavailable_not_a_panic() {
        // Port 1 never runs PostgreSQL; without migration the pool opens lazily.
        let store = PostgresStore::open_url(
            "postgres://postgres@127.0.0.1:1/none",
            PostgresOptions {
                pool_size: 1,
                timeout: Duration::from_millis(300),
                migrate: false,
            },
        )
        .await
        .expect("a lazy pool opens");
        let unavailable = super::super::StoreError::Unavailable(String::new());
        super::assert_err(store.health().await, &unavailable);
        super::assert_err(
            store
                .append_message(super::message(
                    &crate::model::User {
                        id: UserId(1),
                        username: "a".into(),
                        display_name: "a".into(),
                    },
                    Recipient::User(UserId(2)),
                    "m1",
                ))
                .await,
            &unavailable,
        );
        let migrating = PostgresStore::open_url(
            "postgres://postgres@127.0.0.1:1/none",
            PostgresOptions {
                pool_size: 1,
                timeout: Duration::from_millis(300),
                migrate: true,
            },
        )
        .await;
        super::assert_err(migrating, &unavailable);
    }

    /// Two nodes (two stores, two pools) append concurrently to the same recipients while a
    /// poller on each side follows every inbox: no seq may be skipped or handed out twice,
    /// whichever node wrote it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_nodes_appending_to_the_same_users_keep_inboxes_gapless() {
        const USERS: usize = 5;
        const PER_TASK: usize = 40;
        const TASKS_PER_NODE: usize = 6;

        let db = TestDb::create().await;
        let nodes = [db.open(options()).await, db.open(options()).await];
        let mut users = Vec::new();
        for i in 0..USERS {
            users.push(super::create(nodes[0].as_ref(), &format!("u{i}")).await);
        }
        let ids: Vec<UserId> = users.iter().map(|u| u.id).collect();
        let group = nodes[1]
            .create_group(ids[0], "all", &ids, 100, 1)
            .await
            .expect("group")
            .id;
        let users = Arc::new(users);
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));

        let mut pollers = Vec::new();
        for (i, &user) in ids.iter().enumerate() {
            // Each poller reads through the node the user is not written through most.
            let store = Arc::clone(&nodes[i % 2]);
            let finished = Arc::clone(&finished);
            pollers.push(tokio::spawn(async move {
                let mut seen: Vec<(u64, MessageId)> = Vec::new();
                let mut cursor = Seq(0);
                loop {
                    let last_round = finished.load(std::sync::atomic::Ordering::Acquire);
                    let page = store
                        .read_inbox(user, cursor, 32, usize::MAX)
                        .await
                        .expect("poll");
                    for entry in &page {
                        assert_eq!(entry.seq.0, cursor.0 + 1, "poller of {user} skipped");
                        cursor = entry.seq;
                        seen.push((entry.seq.0, entry.message.id));
                    }
                    if page.is_empty() {
                        if last_round {
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                }
                (user, seen)
            }));
        }

        let mut senders = Vec::new();
        for (n, node) in nodes.iter().enumerate() {
            for task in 0..TASKS_PER_NODE {
                let store = Arc::clone(node);
                let users = Arc::clone(&users);
                senders.push(tokio::spawn(async move {
                    let mut appended = Vec::new();
                    let from = &users[task % USERS];
                    for i in 0..PER_TASK {
                        let to = if i % 3 == 0 {
                            Recipient::Group(group)
                        } else {
                            Recipient::User(users[(task + i) % USERS].id)
                        };
                        let cid = format!("n{n}-t{task}-m{i}");
                        let a = store
                            .append_message(super::message(from, to, &cid))
                            .await
                            .expect("append");
                        assert!(!a.duplicate);
                        appended.push(a);
                    }
                    appended
                }));
            }
        }
        let mut reported: std::collections::BTreeMap<UserId, Vec<(u64, MessageId)>> =
            std::collections::BTreeMap::new();
        for sender in senders {
            for a in sender.await.expect("sender task") {
                for &(user, seq) in &a.entries {
                    reported
                        .entry(user)
                        .or_default()
                        .push((seq.0, a.message.id));
                }
            }
        }
        finished.store(true, std::sync::atomic::Ordering::Release);

        for poller in pollers {
            let (user, seen) = poller.await.expect("poller task");
            let n = seen.len() as u64;
            assert!(n > 0);
            assert_eq!(
                seen.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
                (1..=n).collect::<Vec<_>>(),
                "gap or duplicate in the inbox of {user}"
            );
            let mut expected = reported.remove(&user).unwrap_or_default();
            expected.sort_unstable();
            assert_eq!(
                seen, expected,
                "inbox of {user} differs from the append results"
            );
            assert_eq!(nodes[0].inbox_head(user).await.expect("head"), Seq(n));
        }
        for node in nodes {
            node.close().await.expect("close");
        }
    }
}
