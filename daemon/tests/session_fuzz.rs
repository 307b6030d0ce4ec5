//! Property test of the session state machine: long random sequences of well-framed but
//! arbitrary requests (every kind, hostile field values) from authenticated and anonymous
//! connections. Invariants: every request gets exactly one answer — its own response kind or
//! a typed error — the connection stays up unless the account was really deleted, and other
//! users keep chatting. A panic in a session would show up as an unexplained close.

mod common;

use bytes::Bytes;
use common::{PASSWORD, TestServer, deliveries, text};
use messenger_protocol::client::{ClientError, Recipient};
use messenger_protocol::pb::{self, client_frame::Kind as Req, server_frame::Kind as Resp};
use prost::Message as _;

/// xorshift64*: deterministic, so a failure names its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

struct Pools {
    ids: Vec<u64>,
}

impl Pools {
    fn id(&self, rng: &mut Rng) -> u64 {
        *rng.pick(&self.ids)
    }

    fn ids(&self, rng: &mut Rng) -> Vec<u64> {
        (0..rng.below(5)).map(|_| self.id(rng)).collect()
    }

    fn text(&self, rng: &mut Rng) -> String {
        let long = "x".repeat(300);
        let choices = [
            "",
            "alice",
            "bob",
            "Alice",
            "  padded  ",
            "emoji 🐱‍👤",
            "日本語テキスト",
            "مرحبا",
            "bell\u{7}and\u{1b}[2Jescape",
            "nul\u{0}byte",
            PASSWORD,
            "a.b-c_d",
            long.as_str(),
        ];
        rng.pick(&choices).to_string()
    }

    fn bytes(&self, rng: &mut Rng) -> Bytes {
        let len = *rng.pick(&[0usize, 1, 17, 1000, 70_000]);
        Bytes::from(
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31))
                .collect::<Vec<u8>>(),
        )
    }

    fn request(&self, rng: &mut Rng) -> Req {
        match rng.below(21) {
            0 => Req::Hello(pb::Hello {
                protocol_version: rng.below(3) as u32,
                client: self.text(rng),
            }),
            1 => Req::Register(pb::Register {
                username: self.text(rng),
                password: self.text(rng),
                display_name: self.text(rng),
            }),
            2 => Req::Login(pb::Login {
                username: self.text(rng),
                password: self.text(rng),
                device_name: self.text(rng),
                login_cookie: self.bytes(rng),
            }),
            3 => Req::Resume(pb::Resume {
                session_token: self.bytes(rng),
            }),
            4 => Req::UpdateProfile(pb::UpdateProfile {
                display_name: self.text(rng),
                // Valid values, unspecified and out of range alike.
                group_adds: rng.below(6) as i32 - 1,
            }),
            5 => Req::ChangePassword(pb::ChangePassword {
                current_password: self.text(rng),
                new_password: self.text(rng),
            }),
            6 => Req::Logout(pb::Logout {}),
            7 => Req::DeleteAccount(pb::DeleteAccount {
                password: self.text(rng),
            }),
            8 => Req::LookupUser(pb::LookupUser {
                by: match rng.below(3) {
                    0 => None,
                    1 => Some(pb::lookup_user::By::Username(self.text(rng))),
                    _ => Some(pb::lookup_user::By::UserId(self.id(rng))),
                },
            }),
            9 => Req::Send(pb::SendMessage {
                to: match rng.below(3) {
                    0 => None,
                    1 => Some(pb::send_message::To::UserId(self.id(rng))),
                    _ => Some(pb::send_message::To::GroupId(self.id(rng))),
                },
                client_msg_id: self.text(rng),
                body: self.bytes(rng),
                content_type: self.text(rng),
            }),
            10 => Req::Ack(pb::Ack {
                up_to_seq: self.id(rng),
            }),
            11 => Req::CreateGroup(pb::CreateGroup {
                name: self.text(rng),
                member_ids: self.ids(rng),
            }),
            12 => Req::AddMembers(pb::AddMembers {
                group_id: self.id(rng),
                user_ids: self.ids(rng),
            }),
            13 => Req::RemoveMember(pb::RemoveMember {
                group_id: self.id(rng),
                user_id: self.id(rng),
            }),
            14 => Req::LeaveGroup(pb::LeaveGroup {
                group_id: self.id(rng),
            }),
            15 => Req::ListGroups(pb::ListGroups {}),
            16 => Req::GetGroup(pb::GetGroup {
                group_id: self.id(rng),
            }),
            17 => Req::GetHistory(pb::GetHistory {
                conversation: match rng.below(3) {
                    0 => None,
                    1 => Some(pb::get_history::Conversation::UserId(self.id(rng))),
                    _ => Some(pb::get_history::Conversation::GroupId(self.id(rng))),
                },
                before_message_id: self.id(rng),
                limit: rng.below(1000) as u32,
            }),
            18 => Req::ListConversations(pb::ListConversations {
                limit: rng.below(1000) as u32,
                cursor: self.bytes(rng),
            }),
            _ => Req::Ping(pb::Ping {}),
        }
    }
}

/// Whether `resp` is an acceptable answer to `req`.
fn answers(req: &Req, resp: &Resp) -> bool {
    if matches!(resp, Resp::Error(_)) {
        return true;
    }
    matches!(
        (req, resp),
        (Req::Register(_), Resp::Registered(_))
            | (Req::Login(_) | Req::Resume(_), Resp::Authenticated(_))
            | (
                Req::UpdateProfile(_)
                    | Req::ChangePassword(_)
                    | Req::Logout(_)
                    | Req::DeleteAccount(_)
                    | Req::LeaveGroup(_),
                Resp::Ok(_)
            )
            | (Req::LookupUser(_), Resp::User(_))
            | (Req::Send(_), Resp::Sent(_))
            | (
                Req::CreateGroup(_) | Req::AddMembers(_) | Req::RemoveMember(_) | Req::GetGroup(_),
                Resp::Group(_)
            )
            | (Req::ListGroups(_), Resp::GroupList(_))
            | (Req::GetHistory(_), Resp::HistoryPage(_))
            | (Req::ListConversations(_), Resp::ConversationList(_))
            | (Req::Ping(_), Resp::Pong(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_request_sequences_always_get_one_answer_each_and_never_break_the_server() {
    let ts = TestServer::start_with(|c| c.limits.max_body_bytes = 64 * 1024).await;
    let mut known = vec![0, 1, 2, 3, u64::MAX, i64::MAX as u64, (i64::MAX as u64) + 1];
    for i in 0..3 {
        let (c, u) = ts.user(&format!("seed{i}")).await;
        known.push(u.user_id);
        let g = c.conn().create_group("seeded", &[]).await.expect("group");
        known.push(g.group_id);
    }
    let pools = Pools { ids: known };

    for seed in 1..=24u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let name = format!("fuzz{seed}");
        let client = if seed % 3 == 0 {
            ts.client().await // anonymous
        } else {
            ts.user(&name).await.0
        };
        let conn = client.conn().clone();
        for step in 0..120u64 {
            let req = pools.request(&mut rng);
            let request_id = 100 + step;
            let is_ack = matches!(req, Req::Ack(_));
            let frame = pb::ClientFrame {
                request_id: if is_ack { 0 } else { request_id },
                kind: Some(req.clone()),
            };
            if is_ack {
                conn.send_frame(frame).await.expect("ack sent");
                continue;
            }
            let frame_len = frame.encoded_len();
            match conn.request_raw(frame).await {
                Ok(resp) => {
                    let kind = resp.kind.expect("response has a kind");
                    assert!(
                        answers(&req, &kind),
                        "seed {seed} step {step}: {req:?} answered by {kind:?}"
                    );
                    if matches!((&req, &kind), (Req::DeleteAccount(_), Resp::Ok(_))) {
                        break; // the server closes after a deletion, as documented
                    }
                }
                // The SDK refuses frames above the server's limit before sending them.
                Err(ClientError::Codec(_)) => {}
                // Before sign-in (anonymous, or after a Logout) frames are limited to a few
                // KiB: a larger one is refused with TOO_LARGE and the connection closes, as
                // documented.
                Err(e)
                    if frame_len > ts.config.memory.pre_auth_max_frame_bytes
                        && e.to_string().contains("too_large") =>
                {
                    break;
                }
                Err(e) => panic!("seed {seed} step {step}: {req:?} got no answer: {e}"),
            }
        }
        drop(client);
    }

    // Everyone else is unaffected.
    let (alice, _) = ts.user("after_alice").await;
    let (mut bob, bob_user) = ts.user("after_bob").await;
    alice
        .conn()
        .send_text(Recipient::User(bob_user.user_id), "still serving")
        .await
        .expect("send");
    assert_eq!(text(&deliveries(&mut bob, 1).await[0]), "still serving");
    ts.stop().await;
}
