//! Domain types shared by the store, the hub and the sessions. Newtypes say what a number is;
//! conversions to and from the wire types live next to the types they build.

use std::sync::Arc;

use bytes::Bytes;
use messenger_protocol::pb;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// An account. Never reused, even after the account is deleted.
    UserId
);
id_type!(
    /// One logged-in session of a user (a device); owns a cursor and a token.
    DeviceId
);
id_type!(
    /// A message, global and increasing in commit order on one node.
    MessageId
);
id_type!(
    /// A group conversation.
    GroupId
);
id_type!(
    /// Position in one user's inbox: strictly increasing, in commit order.
    Seq
);

/// Milliseconds since the Unix epoch.
pub type UnixMillis = i64;

pub fn now_millis() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub username: String,
    pub display_name: String,
}

impl From<&User> for pb::User {
    fn from(u: &User) -> Self {
        pb::User {
            user_id: u.id.0,
            username: u.username.clone(),
            display_name: u.display_name.clone(),
        }
    }
}

/// An account with its password hash, as the store keeps it.
#[derive(Debug, Clone)]
pub struct Account {
    pub user: User,
    /// PHC string of the argon2id hash.
    pub password_hash: String,
}

/// Where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Recipient {
    User(UserId),
    Group(GroupId),
}

/// A message as stored: the body once, the sender stamped by the server at send time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: MessageId,
    /// The sender as they were when they sent it (name changes later do not rewrite history).
    pub sender: User,
    pub to: Recipient,
    pub client_msg_id: String,
    pub body: Bytes,
    pub content_type: String,
    pub server_time: UnixMillis,
}

impl From<&StoredMessage> for pb::Message {
    fn from(m: &StoredMessage) -> Self {
        pb::Message {
            message_id: m.id.0,
            sender: Some(pb::User::from(&m.sender)),
            to: Some(match m.to {
                Recipient::User(u) => pb::message::To::UserId(u.0),
                Recipient::Group(g) => pb::message::To::GroupId(g.0),
            }),
            client_msg_id: m.client_msg_id.clone(),
            body: m.body.clone(),
            content_type: m.content_type.clone(),
            server_time_ms: m.server_time,
        }
    }
}

/// One entry of a user's inbox. The message is shared between every recipient's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEntry {
    pub seq: Seq,
    pub message: Arc<StoredMessage>,
}

impl From<&InboxEntry> for pb::Delivery {
    fn from(e: &InboxEntry) -> Self {
        pb::Delivery {
            seq: e.seq.0,
            message: Some(pb::Message::from(&*e.message)),
        }
    }
}

/// A message to append, as the session built it from a `SendMessage`.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub sender: UserId,
    pub to: Recipient,
    pub client_msg_id: String,
    pub body: Bytes,
    pub content_type: String,
    pub server_time: UnixMillis,
    /// The storage quotas this append is checked against, inside its transaction.
    pub quotas: AppendQuotas,
}

/// Storage quotas, checked by the store inside the append's transaction (so nothing accepted
/// is ever dropped afterwards, and two racing sends cannot both slip under a quota).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendQuotas {
    /// A direct message is refused while the recipient has this many inbox entries or more
    /// that no device of theirs acknowledged (their newest seq minus the highest seq any of
    /// their devices acked). Group messages are never refused for it: one absent member must
    /// not silence a group, and group traffic is bounded by the senders' fan-out budgets.
    pub inbox_backlog: u64,
    /// A message is refused when its conversation (a direct pair, or a group) already holds
    /// this many messages.
    pub history: u64,
}

impl AppendQuotas {
    pub const UNLIMITED: Self = Self {
        inbox_backlog: u64::MAX,
        history: u64::MAX,
    };
}

/// What an append produced.
#[derive(Debug, Clone)]
pub struct Appended {
    pub message: Arc<StoredMessage>,
    /// One entry per recipient inbox (the sender's own included), in ascending user id order.
    /// Empty when `duplicate` is true: the first append already delivered it.
    pub entries: Vec<(UserId, Seq)>,
    /// True when (sender, client_msg_id) was already stored; `message` is the first one.
    pub duplicate: bool,
}

/// A logged-in device's session, found by its token hash.
#[derive(Debug, Clone)]
pub struct Session {
    pub device: DeviceId,
    pub user: User,
    pub device_name: String,
    pub expires_at: UnixMillis,
    /// Highest seq this device acknowledged.
    pub acked: Seq,
    /// The account's own setting, returned to it on sign-in.
    pub group_adds: GroupAdds,
}

/// Who may add a user to a group. Whoever is refused cannot tell it from a missing account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupAdds {
    Anyone,
    /// People the user wrote to directly, or shares a group with. Receiving a message does not
    /// count: otherwise one unsolicited message would buy the right to add anyone.
    #[default]
    Contacts,
    Nobody,
}

impl GroupAdds {
    /// The spelling both stores keep (see the V3 migrations).
    pub fn as_str(self) -> &'static str {
        match self {
            GroupAdds::Anyone => "anyone",
            GroupAdds::Contacts => "contacts",
            GroupAdds::Nobody => "nobody",
        }
    }

    pub fn parse(stored: &str) -> Option<GroupAdds> {
        match stored {
            "anyone" => Some(GroupAdds::Anyone),
            "contacts" => Some(GroupAdds::Contacts),
            "nobody" => Some(GroupAdds::Nobody),
            _ => None,
        }
    }

    /// The wire value; `None` for UNSPECIFIED ("leave it as it is") and unknown numbers.
    pub fn from_wire(value: i32) -> Option<GroupAdds> {
        match pb::GroupAddPolicy::try_from(value).ok()? {
            pb::GroupAddPolicy::Unspecified => None,
            pb::GroupAddPolicy::Anyone => Some(GroupAdds::Anyone),
            pb::GroupAddPolicy::Contacts => Some(GroupAdds::Contacts),
            pb::GroupAddPolicy::Nobody => Some(GroupAdds::Nobody),
        }
    }
}

impl From<GroupAdds> for pb::GroupAddPolicy {
    fn from(g: GroupAdds) -> Self {
        match g {
            GroupAdds::Anyone => pb::GroupAddPolicy::Anyone,
            GroupAdds::Contacts => pb::GroupAddPolicy::Contacts,
            GroupAdds::Nobody => pb::GroupAddPolicy::Nobody,
        }
    }
}

impl From<GroupAdds> for pb::AccountSettings {
    fn from(g: GroupAdds) -> Self {
        pb::AccountSettings {
            group_adds: pb::GroupAddPolicy::from(g) as i32,
        }
    }
}

/// What `UpdateProfile` changes; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct ProfileChange {
    pub display_name: Option<String>,
    pub group_adds: Option<GroupAdds>,
}

/// An account as its owner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub user: User,
    pub group_adds: GroupAdds,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    pub user: User,
    pub admin: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub id: GroupId,
    pub name: String,
    pub created_at: UnixMillis,
    /// Empty in listings; filled by `Store::group`.
    pub members: Vec<GroupMember>,
}

impl From<&Group> for pb::Group {
    fn from(g: &Group) -> Self {
        pb::Group {
            group_id: g.id.0,
            name: g.name.clone(),
            members: g
                .members
                .iter()
                .map(|m| pb::GroupMember {
                    user: Some(pb::User::from(&m.user)),
                    admin: m.admin,
                })
                .collect(),
            created_at_ms: g.created_at,
        }
    }
}

/// Who a listed conversation is with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConversationWith {
    /// The peer's id, and their account unless it was deleted.
    Direct(UserId, Option<User>),
    /// A group the reader is a member of (members left empty).
    Group(Group),
}

/// One row of the conversation list: the conversation and its newest message as of the
/// listing's snapshot. The message id is the row's sort key (unique per reader).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationSummary {
    pub with: ConversationWith,
    pub last: StoredMessage,
}

/// Which page of the conversation list to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversationQuery {
    /// The listing's snapshot: the newest message id when its first page was read (`None`
    /// for a first page). Later pages order conversations by their newest message up to it,
    /// so activity while paging neither skips nor repeats a conversation.
    pub snapshot: Option<MessageId>,
    /// Only conversations whose key is below this (the last key of the previous page).
    pub before: Option<MessageId>,
    pub limit: usize,
}

/// A page of the conversation list, newest key first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationPage {
    pub snapshot: MessageId,
    pub conversations: Vec<ConversationSummary>,
}

impl ConversationSummary {
    pub fn conversation(&self) -> Conversation {
        match &self.with {
            ConversationWith::Direct(peer, _) => Conversation::Direct(*peer),
            ConversationWith::Group(g) => Conversation::Group(g.id),
        }
    }
}

/// A conversation as history sees it, from the reader's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversation {
    Direct(UserId),
    Group(GroupId),
}
