//! The fuzz targets' seed corpus (`fuzz/corpus/<target>/seed-*`), made of real frames encoded by
//! this crate. The committed files must be exactly what this generates, so a change to the
//! protocol shows up here; `MESSENGER_WRITE_FUZZ_SEEDS=1 cargo test -p messenger-protocol --test
//! fuzz_seeds` rewrites them.

use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use messenger_protocol::codec::encode_frame;
use messenger_protocol::pb::{self, client_frame::Kind as Req, server_frame::Kind as Resp};
use messenger_protocol::{DEFAULT_MAX_FRAME_BYTES, PROTOCOL_VERSION};
use prost::Message;

const PASSWORD: &str = "correct horse battery";

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Length-prefixed frames, as on the wire.
fn wire<M: Message>(frames: &[M]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for f in frames {
        encode_frame(f, DEFAULT_MAX_FRAME_BYTES, &mut buf).expect("seed frame encodes");
    }
    buf.to_vec()
}

fn req(request_id: u64, kind: Req) -> pb::ClientFrame {
    pb::ClientFrame {
        request_id,
        kind: Some(kind),
    }
}

fn hello() -> Req {
    Req::Hello(pb::Hello {
        protocol_version: PROTOCOL_VERSION,
        client: "fuzz-seed/1".into(),
    })
}

fn register(name: &str) -> Req {
    Req::Register(pb::Register {
        username: name.into(),
        password: PASSWORD.into(),
        display_name: format!("{name} display"),
    })
}

fn login(name: &str) -> Req {
    Req::Login(pb::Login {
        username: name.into(),
        password: PASSWORD.into(),
        device_name: "seed device".into(),
        ..Default::default()
    })
}

fn send_to(to: pb::send_message::To, body: &[u8]) -> Req {
    Req::Send(pb::SendMessage {
        to: Some(to),
        client_msg_id: "seed-1".into(),
        body: Bytes::copy_from_slice(body),
        content_type: "text/plain".into(),
    })
}

/// One frame of every request kind.
fn every_request() -> Vec<(&'static str, Req)> {
    use pb::get_history::Conversation;
    use pb::lookup_user::By;
    use pb::send_message::To;
    vec![
        ("hello", hello()),
        ("register", register("fuzz_a")),
        ("login", login("fuzz_a")),
        (
            "resume",
            Req::Resume(pb::Resume {
                session_token: Bytes::new(),
            }),
        ),
        (
            "update-profile",
            Req::UpdateProfile(pb::UpdateProfile {
                display_name: "Renamed".into(),
                group_adds: pb::GroupAddPolicy::Anyone as i32,
            }),
        ),
        (
            "change-password",
            Req::ChangePassword(pb::ChangePassword {
                current_password: PASSWORD.into(),
                new_password: "another long password".into(),
            }),
        ),
        ("logout", Req::Logout(pb::Logout {})),
        (
            "delete-account",
            Req::DeleteAccount(pb::DeleteAccount {
                password: PASSWORD.into(),
            }),
        ),
        (
            "lookup-user",
            Req::LookupUser(pb::LookupUser {
                by: Some(By::Username("fuzz_a".into())),
            }),
        ),
        ("send", send_to(To::UserId(1), b"hello")),
        ("ack", Req::Ack(pb::Ack { up_to_seq: 1 })),
        (
            "create-group",
            Req::CreateGroup(pb::CreateGroup {
                name: "seed group".into(),
                member_ids: vec![1, 2],
            }),
        ),
        (
            "add-members",
            Req::AddMembers(pb::AddMembers {
                group_id: 1,
                user_ids: vec![2, 3],
            }),
        ),
        (
            "remove-member",
            Req::RemoveMember(pb::RemoveMember {
                group_id: 1,
                user_id: 2,
            }),
        ),
        (
            "leave-group",
            Req::LeaveGroup(pb::LeaveGroup { group_id: 1 }),
        ),
        ("list-groups", Req::ListGroups(pb::ListGroups {})),
        ("get-group", Req::GetGroup(pb::GetGroup { group_id: 1 })),
        (
            "get-history",
            Req::GetHistory(pb::GetHistory {
                conversation: Some(Conversation::UserId(1)),
                before_message_id: 0,
                limit: 50,
            }),
        ),
        ("ping", Req::Ping(pb::Ping {})),
        (
            "list-conversations",
            Req::ListConversations(pb::ListConversations {
                limit: 50,
                cursor: Bytes::from_static(&[1; 17]),
            }),
        ),
    ]
}

/// One frame of every response kind.
fn every_response() -> Vec<(&'static str, Resp)> {
    let user = pb::User {
        user_id: 1,
        username: "fuzz_a".into(),
        display_name: "Fuzz A".into(),
    };
    let message = pb::Message {
        message_id: 7,
        sender: Some(user.clone()),
        to: Some(pb::message::To::UserId(2)),
        client_msg_id: "seed-1".into(),
        body: Bytes::from_static(b"hello"),
        content_type: "text/plain".into(),
        server_time_ms: 1_700_000_000_000,
    };
    let group = pb::Group {
        group_id: 1,
        name: "seed group".into(),
        members: vec![pb::GroupMember {
            user: Some(user.clone()),
            admin: true,
        }],
        created_at_ms: 1_700_000_000_000,
    };
    vec![
        (
            "hello-ok",
            Resp::HelloOk(pb::HelloOk {
                protocol_version: PROTOCOL_VERSION,
                server: "messengerd/0.1.0".into(),
                limits: Some(pb::Limits {
                    max_frame_bytes: 262_144,
                    max_body_bytes: 65_536,
                    max_group_members: 1000,
                    max_history_page: 200,
                    idle_timeout_ms: 120_000,
                    max_conversation_page: 100,
                }),
                node: String::new(),
            }),
        ),
        (
            "error",
            Resp::Error(pb::Error {
                code: pb::ErrorCode::RateLimited as i32,
                message: "slow down".into(),
                retry_after_ms: 250,
            }),
        ),
        (
            "registered",
            Resp::Registered(pb::Registered {
                user: Some(user.clone()),
                settings: Some(pb::AccountSettings {
                    group_adds: pb::GroupAddPolicy::Contacts as i32,
                }),
            }),
        ),
        (
            "authenticated",
            Resp::Authenticated(pb::Authenticated {
                user: Some(user.clone()),
                session_token: Bytes::from_static(&[7; 32]),
                device_id: 3,
                expires_at_ms: 1_800_000_000_000,
                acked_seq: 4,
                login_cookie: Bytes::new(),
                settings: Some(pb::AccountSettings {
                    group_adds: pb::GroupAddPolicy::Nobody as i32,
                }),
            }),
        ),
        ("ok", Resp::Ok(pb::Ok {})),
        ("user", Resp::User(user)),
        (
            "sent",
            Resp::Sent(pb::Sent {
                message_id: 7,
                server_time_ms: 1_700_000_000_000,
                duplicate: false,
            }),
        ),
        (
            "delivery",
            Resp::Delivery(pb::Delivery {
                seq: 5,
                message: Some(message.clone()),
            }),
        ),
        ("group", Resp::Group(group.clone())),
        (
            "group-list",
            Resp::GroupList(pb::GroupList {
                groups: vec![group],
            }),
        ),
        (
            "history-page",
            Resp::HistoryPage(pb::HistoryPage {
                messages: vec![message],
                has_more: true,
            }),
        ),
        ("pong", Resp::Pong(pb::Pong {})),
        (
            "go-away",
            Resp::GoAway(pb::GoAway {
                reason: "server shutting down".into(),
                reconnect_after_ms: 1500,
                code: pb::ErrorCode::Unavailable as i32,
            }),
        ),
        (
            "conversation-list",
            Resp::ConversationList(pb::ConversationList {
                conversations: vec![pb::ConversationSummary::default()],
                next_cursor: Bytes::from_static(&[1; 17]),
            }),
        ),
    ]
}

/// `frame_codec` inputs: a limit byte (255: 2104 bytes), a cut seed, then the stream.
fn frame_codec_seeds() -> Vec<(String, Vec<u8>)> {
    let codec_input = |limit: u8, stream: Vec<u8>| [vec![limit, 3], stream].concat();
    let mut seeds = Vec::new();
    let requests = every_request();
    for (i, (name, kind)) in requests.iter().enumerate() {
        let frame = req(i as u64 + 1, kind.clone());
        seeds.push((format!("client-{name}"), codec_input(255, wire(&[frame]))));
    }
    for (name, kind) in every_response() {
        let frame = pb::ServerFrame {
            request_id: 1,
            kind: Some(kind),
        };
        seeds.push((format!("server-{name}"), codec_input(255, wire(&[frame]))));
    }
    let all: Vec<_> = requests
        .iter()
        .enumerate()
        .map(|(i, (_, k))| req(i as u64 + 1, k.clone()))
        .collect();
    seeds.push(("client-all-pipelined".into(), codec_input(255, wire(&all))));
    // A length one past the limit of 64 + 8·0 bytes, before any body arrives.
    seeds.push((
        "too-large-prefix".into(),
        codec_input(0, vec![0, 0, 0, 65, 1, 2, 3]),
    ));
    seeds.push((
        "malformed-body".into(),
        codec_input(255, vec![0, 0, 0, 3, 0xff, 0xff, 0xff]),
    ));
    let mut cut = wire(&[req(1, hello())]);
    cut.truncate(cut.len() - 2);
    seeds.push(("partial-frame".into(), codec_input(255, cut)));
    seeds
}

/// `session` inputs (frame limit 5120 bytes): conversations of length-prefixed client frames
/// (request ids are the harness's; a `Resume` with an empty token resumes the input's last
/// session; [`reconnect`] starts the next connection).
fn session_seeds() -> Vec<(String, Vec<u8>)> {
    use pb::get_history::Conversation;
    use pb::lookup_user::By;
    use pb::send_message::To;
    let conversation = |kinds: Vec<Req>| {
        let frames: Vec<_> = kinds
            .into_iter()
            .enumerate()
            .map(|(i, k)| req(i as u64 + 1, k))
            .collect();
        wire(&frames)
    };
    let mut seeds = vec![
        (
            "messages".to_string(),
            conversation(vec![
                hello(),
                register("fuzz_a"),
                login("fuzz_a"),
                send_to(To::UserId(1), b"hello me"),
                Req::Ack(pb::Ack { up_to_seq: 1 }),
                Req::GetHistory(pb::GetHistory {
                    conversation: Some(Conversation::UserId(1)),
                    before_message_id: 0,
                    limit: 20,
                }),
                Req::ListConversations(pb::ListConversations {
                    limit: 20,
                    cursor: Bytes::new(),
                }),
                Req::LookupUser(pb::LookupUser {
                    by: Some(By::Username("fuzz_a".into())),
                }),
                Req::LookupUser(pb::LookupUser {
                    by: Some(By::UserId(1)),
                }),
                Req::Ping(pb::Ping {}),
                Req::Logout(pb::Logout {}),
            ]),
        ),
        (
            "groups".to_string(),
            conversation(vec![
                hello(),
                register("fuzz_b"),
                register("fuzz_c"),
                login("fuzz_b"),
                Req::CreateGroup(pb::CreateGroup {
                    name: "seed group".into(),
                    member_ids: vec![1],
                }),
                Req::GetGroup(pb::GetGroup { group_id: 1 }),
                Req::AddMembers(pb::AddMembers {
                    group_id: 1,
                    user_ids: vec![2, 3],
                }),
                send_to(To::GroupId(1), b"hello group"),
                Req::ListGroups(pb::ListGroups {}),
                Req::GetHistory(pb::GetHistory {
                    conversation: Some(Conversation::GroupId(1)),
                    before_message_id: 0,
                    limit: 20,
                }),
                Req::RemoveMember(pb::RemoveMember {
                    group_id: 1,
                    user_id: 3,
                }),
                Req::LeaveGroup(pb::LeaveGroup { group_id: 1 }),
            ]),
        ),
        (
            "account".to_string(),
            [
                conversation(vec![hello(), register("fuzz_d"), login("fuzz_d")]),
                reconnect(),
                conversation(vec![
                    hello(),
                    Req::Resume(pb::Resume {
                        session_token: Bytes::new(),
                    }),
                    Req::UpdateProfile(pb::UpdateProfile {
                        display_name: "Renamed".into(),
                        group_adds: pb::GroupAddPolicy::Nobody as i32,
                    }),
                    Req::ChangePassword(pb::ChangePassword {
                        current_password: PASSWORD.into(),
                        new_password: "another long password".into(),
                    }),
                    Req::ChangePassword(pb::ChangePassword {
                        current_password: "another long password".into(),
                        new_password: PASSWORD.into(),
                    }),
                    Req::Logout(pb::Logout {}),
                ]),
                reconnect(),
                conversation(vec![
                    hello(),
                    Req::Resume(pb::Resume {
                        session_token: Bytes::new(),
                    }),
                ]),
            ]
            .concat(),
        ),
        (
            "delete-account".to_string(),
            conversation(vec![
                hello(),
                register("fuzz_e"),
                login("fuzz_e"),
                Req::DeleteAccount(pb::DeleteAccount {
                    password: PASSWORD.into(),
                }),
            ]),
        ),
        (
            "unauthenticated".to_string(),
            conversation(vec![
                hello(),
                send_to(To::UserId(1), b"who am I"),
                Req::Ack(pb::Ack { up_to_seq: 3 }),
                Req::CreateGroup(pb::CreateGroup {
                    name: "g".into(),
                    member_ids: vec![],
                }),
                Req::Hello(pb::Hello {
                    protocol_version: PROTOCOL_VERSION,
                    client: "again".into(),
                }),
            ]),
        ),
        (
            "first-not-hello".to_string(),
            conversation(vec![Req::Ping(pb::Ping {})]),
        ),
        (
            "bad-version".to_string(),
            conversation(vec![Req::Hello(pb::Hello {
                protocol_version: PROTOCOL_VERSION + 1,
                client: "future".into(),
            })]),
        ),
        (
            "oversized".to_string(),
            conversation(vec![
                hello(),
                login("fuzz_a"),
                send_to(To::UserId(1), &[b'x'; 6000]),
            ]),
        ),
    ];
    let mut malformed = conversation(vec![hello()]);
    malformed.extend_from_slice(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
    seeds.push(("malformed".into(), malformed));
    let mut empty_kind = conversation(vec![hello()]);
    empty_kind.extend_from_slice(&[0, 0, 0, 0]);
    seeds.push(("no-kind".into(), empty_kind));
    seeds
}

/// The session harness's marker: close this connection and open another.
fn reconnect() -> Vec<u8> {
    wire(&[pb::ClientFrame {
        request_id: u64::MAX,
        kind: None,
    }])
}

fn check_or_write(target: &str, seeds: &[(String, Vec<u8>)]) {
    let dir = corpus_dir(target);
    let write = std::env::var_os("MESSENGER_WRITE_FUZZ_SEEDS").is_some();
    if write {
        std::fs::create_dir_all(&dir).expect("corpus dir");
    }
    for (name, bytes) in seeds {
        let path = dir.join(format!("seed-{name}"));
        if write {
            std::fs::write(&path, bytes).expect("write seed");
            continue;
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; regenerate with MESSENGER_WRITE_FUZZ_SEEDS=1 cargo test -p messenger-protocol --test fuzz_seeds",
                path.display()
            )
        });
        assert!(
            committed == *bytes,
            "{} differs from the generator; regenerate with MESSENGER_WRITE_FUZZ_SEEDS=1",
            path.display()
        );
    }
}

#[test]
fn frame_codec_corpus_is_the_generated_one() {
    check_or_write("frame_codec", &frame_codec_seeds());
}

#[test]
fn session_corpus_is_the_generated_one() {
    check_or_write("session", &session_seeds());
}

#[test]
fn every_request_kind_is_seeded() {
    // A kind added to the protocol but not to the seeds fails here (the match must be total).
    let seeded: Vec<Req> = every_request().into_iter().map(|(_, k)| k).collect();
    for kind in &seeded {
        match kind {
            Req::Hello(_)
            | Req::Register(_)
            | Req::Login(_)
            | Req::Resume(_)
            | Req::UpdateProfile(_)
            | Req::ChangePassword(_)
            | Req::Logout(_)
            | Req::DeleteAccount(_)
            | Req::LookupUser(_)
            | Req::Send(_)
            | Req::Ack(_)
            | Req::CreateGroup(_)
            | Req::AddMembers(_)
            | Req::RemoveMember(_)
            | Req::LeaveGroup(_)
            | Req::ListGroups(_)
            | Req::GetGroup(_)
            | Req::GetHistory(_)
            | Req::Ping(_)
            | Req::ListConversations(_) => {}
        }
    }
    let distinct: std::collections::HashSet<_> =
        seeded.iter().map(std::mem::discriminant).collect();
    assert_eq!(distinct.len(), 20, "one seed per request kind");
}
