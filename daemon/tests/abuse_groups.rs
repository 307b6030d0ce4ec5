//! Abuse through groups (audit of issue 11): adding people who did not agree (F3), burying a
//! victim's chats under giant groups (F7), and probing which group ids exist (F10). Everything
//! runs through the SDK on real TLS against the in-process daemon; traffic is bounded by count.

mod common;

use common::{TestServer, code, deliveries, use_postgres};
use messenger_daemon::testing::TestDatabase;
use messenger_protocol::ErrorCode;
use messenger_protocol::client::{Client, ClientError, Recipient};
use messenger_protocol::pb;

const UNKNOWN_USER: u64 = 999_999;
const UNKNOWN_GROUP: u64 = 999_999;

fn refusal(user: u64) -> String {
    format!("user {user} does not accept group invitations from you")
}

/// The code and the human message of a refused request.
fn answer(e: &ClientError) -> (Option<ErrorCode>, String) {
    match e {
        ClientError::Wire(w) => (Some(w.code), w.message.clone()),
        other => (None, other.to_string()),
    }
}

async fn set_policy(c: &Client, policy: pb::GroupAddPolicy) {
    c.conn()
        .set_group_add_policy(policy)
        .await
        .expect("set group_adds");
}

async fn group_ids(c: &Client) -> Vec<u64> {
    c.conn()
        .list_groups()
        .await
        .expect("list groups")
        .iter()
        .map(|g| g.group_id)
        .collect()
}

/// F3: "a 5,000-member group whose members were added without consent". With the default
/// setting a stranger cannot add anyone, not even after sending them an unsolicited message,
/// and the refusal reads exactly as it does for an id that names no account.
#[tokio::test]
async fn a_stranger_cannot_add_a_user_with_the_default_setting() {
    let ts = TestServer::start().await;
    let (stranger, _) = ts.user("stranger").await;
    let (victim, victim_user) = ts.user("victim").await;
    let v = victim_user.user_id;

    let settings = victim.session().and_then(|a| a.settings).expect("settings");
    assert_eq!(settings.group_adds(), pb::GroupAddPolicy::Contacts);

    // Writing to the victim does not make the stranger a contact.
    stranger
        .conn()
        .send_text(Recipient::User(v), "hi, add me?")
        .await
        .expect("unsolicited message");

    let refused = stranger
        .conn()
        .create_group("trap", &[v])
        .await
        .expect_err("create with the victim");
    assert_eq!(
        answer(&refused),
        (Some(ErrorCode::PermissionDenied), refusal(v))
    );
    let unknown = stranger
        .conn()
        .create_group("trap", &[UNKNOWN_USER])
        .await
        .expect_err("create with an unknown id");
    assert_eq!(
        answer(&unknown),
        (Some(ErrorCode::PermissionDenied), refusal(UNKNOWN_USER))
    );

    let own = stranger
        .conn()
        .create_group("own", &[])
        .await
        .expect("a group of one");
    let refused = stranger
        .conn()
        .add_members(own.group_id, &[v])
        .await
        .expect_err("add the victim");
    assert_eq!(
        answer(&refused),
        (Some(ErrorCode::PermissionDenied), refusal(v))
    );
    assert!(group_ids(&victim).await.is_empty());

    // Once the victim writes back, the stranger is a contact.
    victim
        .conn()
        .send_text(Recipient::User(stranger.user().expect("me").user_id), "ok")
        .await
        .expect("reply");
    stranger
        .conn()
        .add_members(own.group_id, &[v])
        .await
        .expect("a contact may add");
    assert_eq!(group_ids(&victim).await, [own.group_id]);
    ts.stop().await;
}

/// F3: the setting is the user's to open up: with `anyone`, a stranger may add them, and the
/// setting comes back with every sign-in.
#[tokio::test]
async fn anyone_lets_a_stranger_add_the_user() {
    let ts = TestServer::start().await;
    let (stranger, _) = ts.user("stranger").await;
    let (open, open_user) = ts.user("open").await;
    set_policy(&open, pb::GroupAddPolicy::Anyone).await;

    let phone = ts.device("open", "phone").await;
    let settings = phone.session().and_then(|a| a.settings).expect("settings");
    assert_eq!(settings.group_adds(), pb::GroupAddPolicy::Anyone);

    let group = stranger
        .conn()
        .create_group("welcome", &[open_user.user_id])
        .await
        .expect("anyone may add");
    assert_eq!(group_ids(&open).await, [group.group_id]);

    // Changing the name alone keeps the setting.
    open.conn()
        .update_profile("Open Door")
        .await
        .expect("rename");
    let tablet = ts.device("open", "tablet").await;
    let again = tablet.session().and_then(|a| a.settings).expect("settings");
    assert_eq!(again.group_adds(), pb::GroupAddPolicy::Anyone);

    // An UpdateProfile that changes nothing, or names an unknown setting, is refused.
    for (name, adds) in [("", 0), ("", 42)] {
        let err = open
            .conn()
            .request(pb::client_frame::Kind::UpdateProfile(pb::UpdateProfile {
                display_name: name.into(),
                group_adds: adds,
            }))
            .await
            .expect_err("nothing valid to change");
        assert_eq!(code(&err), Some(ErrorCode::InvalidArgument));
    }
    ts.stop().await;
}

/// F3: `nobody` refuses even a contact (someone the user wrote to, or shares a group with),
/// while the user can still make groups of their own.
#[tokio::test]
async fn nobody_refuses_even_contacts() {
    let ts = TestServer::start().await;
    let (friend, friend_user) = ts.user("friend").await;
    let (hermit, hermit_user) = ts.user("hermit").await;
    let h = hermit_user.user_id;
    hermit
        .conn()
        .send_text(Recipient::User(friend_user.user_id), "hello friend")
        .await
        .expect("a contact");
    let shared = friend
        .conn()
        .create_group("shared", &[h])
        .await
        .expect("a contact may add");

    set_policy(&hermit, pb::GroupAddPolicy::Nobody).await;
    let refused = friend
        .conn()
        .create_group("another", &[h])
        .await
        .expect_err("nobody");
    assert_eq!(
        answer(&refused),
        (Some(ErrorCode::PermissionDenied), refusal(h))
    );
    let mine = hermit
        .conn()
        .create_group("mine", &[friend_user.user_id])
        .await
        .expect("the hermit's own group");
    let mut groups = group_ids(&hermit).await;
    groups.sort_unstable();
    assert_eq!(groups, [shared.group_id, mine.group_id]);
    ts.stop().await;
}

/// F3: a request that names one refusing user changes nothing at all: no group is created,
/// nobody who would have accepted is added, and no member hears of it.
#[tokio::test]
async fn a_refused_add_changes_nothing() {
    let ts = TestServer::start().await;
    refused_add_changes_nothing(&ts).await;
    ts.stop().await;
}

async fn refused_add_changes_nothing(ts: &TestServer) {
    let (admin, _) = ts.user("admin").await;
    let (willing, willing_user) = ts.open_user("willing").await;
    let (_unwilling, unwilling_user) = ts.user("unwilling").await;
    let (member, member_user) = ts.open_user("member").await;
    let (w, u) = (willing_user.user_id, unwilling_user.user_id);

    let refused = admin
        .conn()
        .create_group("mixed", &[w, u, UNKNOWN_USER])
        .await
        .expect_err("one refuses");
    assert_eq!(
        answer(&refused),
        (
            Some(ErrorCode::PermissionDenied),
            format!("users {u}, {UNKNOWN_USER} do not accept group invitations from you")
        )
    );
    assert!(group_ids(&admin).await.is_empty());
    assert!(group_ids(&willing).await.is_empty());

    let group = admin
        .conn()
        .create_group("team", &[member_user.user_id])
        .await
        .expect("create");
    let refused = admin
        .conn()
        .add_members(group.group_id, &[w, u])
        .await
        .expect_err("one refuses");
    assert_eq!(
        answer(&refused),
        (Some(ErrorCode::PermissionDenied), refusal(u))
    );
    let after = member
        .conn()
        .get_group(group.group_id)
        .await
        .expect("group");
    assert_eq!(after.members.len(), 2, "{after:?}");
    assert!(group_ids(&willing).await.is_empty());
}

/// Consent works both ways: whoever is in a group can leave it, a plain member as much as the
/// last admin (who hands the group on), and the last one out deletes it.
#[tokio::test]
async fn anyone_can_leave_any_group() {
    let ts = TestServer::start().await;
    let (admin, _) = ts.user("admin").await;
    let (plain, plain_user) = ts.open_user("plain").await;
    let (heir, heir_user) = ts.open_user("heir").await;
    let group = admin
        .conn()
        .create_group("club", &[heir_user.user_id, plain_user.user_id])
        .await
        .expect("create");
    let g = group.group_id;

    plain.conn().leave_group(g).await.expect("a member leaves");
    admin
        .conn()
        .leave_group(g)
        .await
        .expect("the last admin leaves");
    let left = heir.conn().get_group(g).await.expect("still there");
    assert_eq!(left.members.len(), 1);
    assert!(left.members[0].admin, "the heir became admin: {left:?}");
    heir.conn()
        .leave_group(g)
        .await
        .expect("the last one leaves");
    let gone = heir.conn().get_group(g).await.expect_err("deleted");
    assert_eq!(code(&gone), Some(ErrorCode::NotFound));
    ts.stop().await;
}

/// F7: "adding a victim to a few max-size groups makes their conversation list fail above
/// limit 3; it has no paging, so their real chats are hidden". Here a victim who accepts
/// anyone is put in several groups whose last messages are as large as a body may be: every
/// page still fits in a frame, and paging reaches every real chat.
#[tokio::test]
async fn a_victim_in_many_large_groups_still_sees_all_their_real_chats() {
    const GROUPS: usize = 8;
    const FRIENDS: usize = 3;
    let ts = TestServer::start().await;
    let (victim, victim_user) = ts.open_user("victim").await;
    let v = victim_user.user_id;
    let mut friends = Vec::new();
    for i in 0..FRIENDS {
        let (friend, friend_user) = ts.user(&format!("friend{i}")).await;
        friend
            .conn()
            .send_text(Recipient::User(v), &format!("real chat {i}"))
            .await
            .expect("a real chat");
        friends.push(friend_user.user_id);
    }

    let (attacker, _) = ts.user("attacker").await;
    let mut filler = Vec::new();
    for i in 0..4 {
        filler.push(ts.open_user(&format!("filler{i}")).await.1.user_id);
    }
    let max_body = ts.config.limits.max_body_bytes;
    let mut spam = Vec::new();
    for g in 0..GROUPS {
        let mut members = filler.clone();
        members.push(v);
        let group = attacker
            .conn()
            .create_group(&format!("spam {g}"), &members)
            .await
            .expect("the victim accepts anyone");
        attacker
            .conn()
            .send_message(
                Recipient::Group(group.group_id),
                &format!("spam-{g}"),
                vec![b'x'; max_body].into(),
                "application/octet-stream",
            )
            .await
            .expect("a maximal body");
        spam.push(group.group_id);
    }

    // Page by page, with the server's default page size and with tiny pages.
    for page_size in [0, 2] {
        let all = victim
            .conn()
            .list_conversations(page_size)
            .await
            .expect("every page");
        let mut directs: Vec<u64> = Vec::new();
        let mut groups: Vec<u64> = Vec::new();
        for c in &all {
            match &c.with {
                Some(pb::conversation_summary::With::User(u)) => directs.push(u.user_id),
                Some(pb::conversation_summary::With::Group(g)) => groups.push(g.group_id),
                None => panic!("a summary without a conversation: {c:?}"),
            }
        }
        directs.sort_unstable();
        groups.sort_unstable();
        assert_eq!(directs, friends, "page size {page_size}");
        assert_eq!(groups, spam, "page size {page_size}");
        // Newest first: the spam came last.
        let ids: Vec<u64> = all
            .iter()
            .filter_map(|c| c.last_message.as_ref().map(|m| m.message_id))
            .collect();
        assert!(ids.windows(2).all(|w| w[0] > w[1]), "{ids:?}");
    }

    // A single page of the default size cannot hold eight maximal bodies: it stops early
    // with a cursor rather than failing.
    let first = victim
        .conn()
        .list_conversations_page(0, &[])
        .await
        .expect("first page");
    assert!(first.conversations.len() < GROUPS + FRIENDS);
    assert!(!first.next_cursor.is_empty());
    ts.stop().await;
}

/// F7 paging under traffic: a chat that gets a message while its owner pages keeps its place
/// in the listing (the message arrives as a delivery); every chat is listed exactly once.
#[tokio::test]
async fn paging_lists_every_chat_once_while_messages_arrive() {
    let ts = TestServer::start().await;
    paging_under_traffic(&ts).await;
    ts.stop().await;
}

async fn paging_under_traffic(ts: &TestServer) {
    let (mut reader, reader_user) = ts.user("reader").await;
    let r = reader_user.user_id;
    let mut peers = Vec::new();
    for i in 0..5 {
        let (peer, peer_user) = ts.user(&format!("peer{i}")).await;
        peer.conn()
            .send_text(Recipient::User(r), &format!("first {i}"))
            .await
            .expect("send");
        peers.push((peer, peer_user.user_id));
    }
    deliveries(&mut reader, 5).await;

    let first = reader
        .conn()
        .list_conversations_page(2, &[])
        .await
        .expect("page 1");
    assert_eq!(first.conversations.len(), 2);
    // The two newest, then messages to a listed chat and to an unlisted one.
    for idx in [4, 0] {
        peers[idx]
            .0
            .conn()
            .send_text(Recipient::User(r), "meanwhile")
            .await
            .expect("send");
    }
    let arrived = deliveries(&mut reader, 2).await;
    assert_eq!(arrived.len(), 2);

    let mut listed = first.conversations.clone();
    let mut cursor = first.next_cursor.clone();
    while !cursor.is_empty() {
        let page = reader
            .conn()
            .list_conversations_page(2, &cursor)
            .await
            .expect("next page");
        listed.extend(page.conversations);
        cursor = page.next_cursor;
    }
    let order: Vec<u64> = listed
        .iter()
        .map(|c| match &c.with {
            Some(pb::conversation_summary::With::User(u)) => u.user_id,
            other => panic!("{other:?}"),
        })
        .collect();
    let expected: Vec<u64> = peers.iter().rev().map(|(_, id)| *id).collect();
    assert_eq!(order, expected, "the listing as of its first page");

    let forged = reader
        .conn()
        .list_conversations_page(2, b"not a cursor")
        .await
        .expect_err("a cursor the server did not make");
    assert_eq!(code(&forged), Some(ErrorCode::InvalidArgument));
}

/// F10: "errors reveal which group ids exist". Every group request from someone who is not a
/// member gets exactly the answer a missing group gets, code and message, including from a
/// former member.
#[tokio::test]
async fn a_group_you_are_not_in_answers_exactly_like_a_missing_one() {
    let ts = TestServer::start().await;
    hidden_groups(&ts).await;
    ts.stop().await;
}

async fn hidden_groups(ts: &TestServer) {
    let (owner, _) = ts.user("owner").await;
    let (former, former_user) = ts.open_user("former").await;
    let (_member, member_user) = ts.open_user("member").await;
    let (prober, _) = ts.open_user("prober").await;
    let secret = owner
        .conn()
        .create_group("secret", &[member_user.user_id, former_user.user_id])
        .await
        .expect("create");
    owner
        .conn()
        .send_text(Recipient::Group(secret.group_id), "psst")
        .await
        .expect("send");
    former
        .conn()
        .leave_group(secret.group_id)
        .await
        .expect("leave");
    let someone = member_user.user_id;

    async fn every_request(
        c: &Client,
        group: u64,
        someone: u64,
    ) -> Vec<(Option<ErrorCode>, String)> {
        let conn = c.conn();
        let mut out = Vec::new();
        let results = [
            conn.get_group(group).await.map(drop),
            conn.send_text(Recipient::Group(group), "hi")
                .await
                .map(drop),
            conn.add_members(group, &[someone]).await.map(drop),
            conn.remove_member(group, someone).await.map(drop),
            conn.leave_group(group).await,
            conn.history(Recipient::Group(group), 0, 10).await.map(drop),
        ];
        for r in results {
            out.push(answer(&r.expect_err("refused")));
        }
        out
    }

    let missing = every_request(&prober, UNKNOWN_GROUP, someone).await;
    assert!(
        missing
            .iter()
            .all(|(code, _)| *code == Some(ErrorCode::NotFound)),
        "{missing:?}"
    );
    let hidden = every_request(&prober, secret.group_id, someone).await;
    assert_eq!(hidden, missing, "a stranger can tell the group exists");
    let left = every_request(&former, secret.group_id, someone).await;
    assert_eq!(left, missing, "a former member can tell the group exists");
}

/// The same promises on the PostgreSQL store (F3, F7, F10), where consent, membership and the
/// listing's snapshot are kept under row locks shared by every node.
#[tokio::test]
async fn consent_paging_and_hidden_groups_hold_on_postgres() {
    for scenario in 0..3 {
        let db = TestDatabase::create("msgtest_abuse_groups").await;
        let ts = TestServer::start_with(|c| use_postgres(c, &db.url)).await;
        match scenario {
            0 => refused_add_changes_nothing(&ts).await,
            1 => paging_under_traffic(&ts).await,
            _ => hidden_groups(&ts).await,
        }
        ts.stop().await;
    }
}
