//! What nodes tell each other over Redis: one protobuf `Envelope` per publish, batching
//! everything one node has for another at that moment. Internal to a cluster (all nodes run
//! the same build during normal operation); unknown fields are ignored, so adding a field is
//! safe during a rolling upgrade.

use std::sync::Arc;

use messenger_protocol::pb;
use prost::Message as _;

use crate::model::{
    DeviceId, GroupId, InboxEntry, MessageId, Recipient, Seq, StoredMessage, User, UserId,
};

#[derive(Clone, PartialEq, prost::Message)]
pub struct Envelope {
    /// The publishing node, for logs.
    #[prost(string, tag = "1")]
    pub from_node: String,
    /// Each message once; deliveries point into this list.
    #[prost(message, repeated, tag = "2")]
    pub messages: Vec<pb::Message>,
    #[prost(message, repeated, tag = "3")]
    pub deliveries: Vec<RemoteDelivery>,
    #[prost(message, repeated, tag = "4")]
    pub fences: Vec<Fence>,
    #[prost(message, repeated, tag = "5")]
    pub kicks: Vec<Kick>,
    /// Every receiving node makes all its connections read the store: the sender could not
    /// publish something (Redis was unreachable) and does not know to whom it was owed.
    #[prost(bool, tag = "6")]
    pub catch_up_all: bool,
    /// The sending node's cluster id: a node drops envelopes of another cluster.
    #[prost(string, tag = "7")]
    pub cluster: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RemoteDelivery {
    #[prost(uint64, tag = "1")]
    pub user: u64,
    #[prost(uint64, tag = "2")]
    pub seq: u64,
    /// Index into `Envelope::messages`.
    #[prost(uint32, tag = "3")]
    pub message: u32,
}

/// The device connected somewhere with this epoch: older connections of it must close.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Fence {
    #[prost(uint64, tag = "1")]
    pub user: u64,
    #[prost(uint64, tag = "2")]
    pub device: u64,
    #[prost(uint64, tag = "3")]
    pub epoch: u64,
}

/// Close these devices' connections (all when `all_devices`): a revoked session or a
/// deleted account.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Kick {
    #[prost(uint64, tag = "1")]
    pub user: u64,
    #[prost(uint64, repeated, tag = "2")]
    pub devices: Vec<u64>,
    #[prost(bool, tag = "3")]
    pub all_devices: bool,
    #[prost(int32, tag = "4")]
    pub code: i32,
    #[prost(string, tag = "5")]
    pub reason: String,
}

impl Envelope {
    pub fn is_empty(&self) -> bool {
        self.deliveries.is_empty()
            && self.fences.is_empty()
            && self.kicks.is_empty()
            && !self.catch_up_all
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, prost::DecodeError> {
        Self::decode(bytes)
    }

    /// The deliveries as inbox entries; an entry whose message is missing or malformed is
    /// skipped (the recipient's pump reads it from the store when it notices the gap).
    pub fn entries(&self) -> Vec<(UserId, InboxEntry)> {
        let messages: Vec<Option<Arc<StoredMessage>>> = self
            .messages
            .iter()
            .map(|m| stored_message(m).map(Arc::new))
            .collect();
        self.deliveries
            .iter()
            .filter_map(|d| {
                let message = messages.get(d.message as usize)?.clone()?;
                Some((
                    UserId(d.user),
                    InboxEntry {
                        seq: Seq(d.seq),
                        message,
                    },
                ))
            })
            .collect()
    }
}

impl Kick {
    pub fn devices(&self) -> Option<Vec<DeviceId>> {
        (!self.all_devices).then(|| self.devices.iter().copied().map(DeviceId).collect())
    }
}

fn stored_message(m: &pb::Message) -> Option<StoredMessage> {
    let sender = m.sender.as_ref()?;
    let to = match m.to? {
        pb::message::To::UserId(u) => Recipient::User(UserId(u)),
        pb::message::To::GroupId(g) => Recipient::Group(GroupId(g)),
    };
    Some(StoredMessage {
        id: MessageId(m.message_id),
        sender: User {
            id: UserId(sender.user_id),
            username: sender.username.clone(),
            display_name: sender.display_name.clone(),
        },
        to,
        client_msg_id: m.client_msg_id.clone(),
        body: m.body.clone(),
        content_type: m.content_type.clone(),
        server_time: m.server_time_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: u64) -> StoredMessage {
        StoredMessage {
            id: MessageId(id),
            sender: User {
                id: UserId(7),
                username: "ann".into(),
                display_name: "Ann".into(),
            },
            to: Recipient::Group(GroupId(3)),
            client_msg_id: format!("c{id}"),
            body: bytes::Bytes::from_static(b"\x00\xffbody"),
            content_type: "text/plain".into(),
            server_time: 1_700_000_000_000,
        }
    }

    #[test]
    fn deliveries_survive_the_round_trip_and_share_their_message() {
        let m = message(42);
        let envelope = Envelope {
            from_node: "n1".into(),
            cluster: "0123456789abcdef0123456789abcdef".into(),
            messages: vec![pb::Message::from(&m)],
            deliveries: vec![
                RemoteDelivery {
                    user: 1,
                    seq: 10,
                    message: 0,
                },
                RemoteDelivery {
                    user: 2,
                    seq: 5,
                    message: 0,
                },
            ],
            ..Envelope::default()
        };
        let back = Envelope::from_bytes(&envelope.to_bytes()).expect("decode");
        assert_eq!(back.cluster, envelope.cluster);
        let entries = back.entries();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].0, UserId(1));
        assert_eq!(entries[0].1.seq, Seq(10));
        assert_eq!(*entries[0].1.message, m);
        assert!(Arc::ptr_eq(&entries[0].1.message, &entries[1].1.message));
    }

    #[test]
    fn a_delivery_pointing_nowhere_is_skipped_not_a_panic() {
        let envelope = Envelope {
            deliveries: vec![RemoteDelivery {
                user: 1,
                seq: 1,
                message: 9,
            }],
            ..Envelope::default()
        };
        assert!(envelope.entries().is_empty());
        assert!(Envelope::from_bytes(b"\xff\xff\xff").is_err());
    }
}
