//! Durable state behind one async trait. The daemon talks only to `dyn Store`; each backend
//! (the embedded SQLite store, PostgreSQL shared by several nodes) implements it with the same semantics,
//! which the conformance tests in `store::conformance` pin down.
//!
//! Rules every backend keeps:
//! - `append_message` is durable when it returns `Ok` (the caller answers `Sent` after it).
//! - Per user, `seq` is strictly increasing and equals commit order: once an entry with seq N
//!   is readable, every entry below N of that user is readable too, so a cursor never skips.
//! - (sender, client_msg_id) is unique; a repeat returns the first message with
//!   `duplicate = true` and appends nothing.
//! - Authorization that depends on stored state (membership, admin rights, consent to group
//!   additions) is checked inside the same transaction as the change, so a concurrent removal
//!   cannot slip a message through, and a refused request changes nothing.
//! - A group the actor is not a member of is `NotFound("group")`, exactly like a group that
//!   does not exist: group ids are not for probing.

mod conversations;
pub mod postgres;
pub mod sqlite;

#[cfg(test)]
mod conformance;

use async_trait::async_trait;

use crate::model::{
    Account, Appended, Conversation, ConversationPage, ConversationQuery, DeviceId, Group,
    GroupAdds, GroupId, InboxEntry, MessageId, NewMessage, Profile, ProfileChange, Recipient, Seq,
    Session, StoredMessage, UnixMillis, User, UserId,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique name is taken (username).
    #[error("{0} already exists")]
    AlreadyExists(&'static str),
    /// The user, group or session does not exist (or no longer does).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The actor may not do this (not a member, not an admin).
    #[error("permission denied: {0}")]
    PermissionDenied(&'static str),
    /// A limit kept by the store (group size).
    #[error("limit exceeded: {0}")]
    LimitExceeded(&'static str),
    /// These users (in request order) do not accept being added to a group by the actor, or
    /// do not exist: the two are one answer on purpose.
    #[error("{}", refused_message(.0))]
    GroupAddRefused(Vec<UserId>),
    /// A storage quota is used up (`AppendQuotas`); nothing was changed.
    #[error("{0}")]
    QuotaExceeded(&'static str),
    /// The backend cannot be reached or is shutting down; nothing was changed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Anything else the backend reported.
    #[error("store failure: {0}")]
    Backend(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Most refused ids named in one error; a longer list is only a longer message.
const REFUSED_NAMED: usize = 10;

fn refused_message(users: &[UserId]) -> String {
    let named: Vec<String> = users
        .iter()
        .take(REFUSED_NAMED)
        .map(ToString::to_string)
        .collect();
    let more = users.len().saturating_sub(REFUSED_NAMED);
    let list = if more > 0 {
        format!("{} and {more} more", named.join(", "))
    } else {
        named.join(", ")
    };
    if users.len() == 1 {
        format!("user {list} does not accept group invitations from you")
    } else {
        format!("users {list} do not accept group invitations from you")
    }
}
/// The refusal of a direct message to a user whose inbox backlog is at its quota.
pub const INBOX_FULL: &str = "the recipient's inbox is full: too many messages wait for \
    them to come online and receive them; try again later";
/// The refusal of a message to a conversation whose history is at its quota.
pub const HISTORY_FULL: &str = "this conversation's history is full: it holds the most \
    messages a conversation may store";

// Both backends store ids, seqs and counts as signed 64-bit integers.

/// An id beyond `i64::MAX` cannot name a stored row, so it becomes -1, which matches nothing
/// (stored ids are positive).
fn id_param(id: u64) -> i64 {
    i64::try_from(id).unwrap_or(-1)
}

/// Bounds (seqs, "before" ids) saturate instead: "after 2^63+1" means "after everything".
fn bound_param(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The `history_sizes` key of the message's conversation (both schemas): (group, 0, 0) for a
/// group, (0, lower user id, higher user id) for a direct pair. Ids start at 1, so the two
/// kinds never share a key.
fn history_key(message: &NewMessage) -> [i64; 3] {
    match message.to {
        Recipient::Group(group) => [id_param(group.0), 0, 0],
        Recipient::User(peer) => {
            let (a, b) = (id_param(message.sender.0), id_param(peer.0));
            [0, a.min(b), a.max(b)]
        }
    }
}

fn limit_param(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A new account, the username already validated; `username_key` is its case-folded form,
/// which is what uniqueness is checked on.
#[derive(Debug, Clone)]
pub struct NewAccount {
    pub username: String,
    pub username_key: String,
    pub display_name: String,
    pub password_hash: String,
    /// Who may add the new account to groups (`GroupAdds::default()` for a registration).
    pub group_adds: GroupAdds,
}

/// A new session (device) created by a login.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub user: UserId,
    pub device_name: String,
    /// SHA-256 of the token; the token itself is never stored.
    pub token_hash: [u8; 32],
    pub expires_at: UnixMillis,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    // ----- accounts -----

    /// Creates an account. `AlreadyExists("username")` when `username_key` is taken.
    async fn create_account(&self, account: NewAccount) -> StoreResult<User>;

    /// The account whose case-folded username is `username_key`.
    async fn account_by_username(&self, username_key: &str) -> StoreResult<Option<Account>>;

    /// The account with this id (with its hash, for password checks).
    async fn account_by_id(&self, user: UserId) -> StoreResult<Option<Account>>;

    /// Applies every field the change sets, all or nothing, and returns the profile after it;
    /// `NotFound("user")` for a missing account.
    async fn update_profile(&self, user: UserId, change: ProfileChange) -> StoreResult<Profile>;

    /// Replaces the password hash and deletes every session of the user except `keep`, and
    /// every login cookie of the user. Returns the devices whose sessions were deleted.
    async fn change_password(
        &self,
        user: UserId,
        password_hash: &str,
        keep: DeviceId,
    ) -> StoreResult<Vec<DeviceId>>;

    /// Deletes the account: its sessions, login cookies, inbox, cursors and memberships go; the username is
    /// free again; messages it sent stay in others' inboxes and history with the stamped sender.
    /// Groups left without an admin get their longest-standing member as admin. Returns the
    /// devices whose sessions were deleted.
    async fn delete_account(&self, user: UserId) -> StoreResult<Vec<DeviceId>>;

    // ----- sessions -----

    /// Creates a device session. Its cursor starts at the highest seq any device of the user
    /// acknowledged (0 for a first login): a new device receives what no device has seen yet,
    /// and reads older conversations through `history`.
    async fn create_session(&self, session: NewSession) -> StoreResult<Session>;

    /// The session with this token hash, if it exists (expired ones too: the caller checks).
    async fn session_by_token(&self, token_hash: &[u8; 32]) -> StoreResult<Option<Session>>;

    /// Moves a session's expiry (sliding expiry on resume).
    async fn touch_session(&self, device: DeviceId, expires_at: UnixMillis) -> StoreResult<()>;

    /// Deletes one session (logout). Deleting a missing session is not an error.
    async fn delete_session(&self, device: DeviceId) -> StoreResult<()>;

    /// Raises the device's cursor to `up_to` (never lowers it), and the user's high-water mark
    /// with it. Acks above the user's newest seq are clamped to it.
    async fn ack(&self, device: DeviceId, up_to: Seq) -> StoreResult<()>;

    // ----- login cookies -----

    /// Records that the device holding the login cookie with this hash signed in to `user`
    /// at `used_at`: inserts the cookie or refreshes its last use, then keeps only the `keep`
    /// most recently used cookies of the user. `NotFound("user")` for a missing account.
    async fn remember_login_cookie(
        &self,
        user: UserId,
        cookie_hash: &[u8; 32],
        used_at: UnixMillis,
        keep: usize,
    ) -> StoreResult<()>;

    /// Whether `user` has a login cookie with this hash (false for a missing user).
    async fn has_login_cookie(&self, user: UserId, cookie_hash: &[u8; 32]) -> StoreResult<bool>;

    // ----- messages -----

    /// Stores a message and appends an inbox entry for every recipient and for the sender.
    /// Errors: `NotFound("user")` for a missing recipient, `NotFound("group")` for a missing
    /// group or one the sender is not a member of, `QuotaExceeded(INBOX_FULL)` for a direct
    /// message to another user whose unacknowledged backlog reached
    /// `message.quotas.inbox_backlog`, `QuotaExceeded(HISTORY_FULL)` when the conversation
    /// already holds `message.quotas.history` messages. A retry of a stored message still gets
    /// the first answer (`duplicate`), whatever the quotas say now.
    async fn append_message(&self, message: NewMessage) -> StoreResult<Appended>;

    /// Inbox entries of `user` with seq > `after`, ascending: at most `limit`, and no more
    /// once their bodies add up to `max_bytes` (the entry reaching it is included, so a page
    /// is never empty while entries remain). Bounds what one catch-up read holds in memory.
    async fn read_inbox(
        &self,
        user: UserId,
        after: Seq,
        limit: usize,
        max_bytes: usize,
    ) -> StoreResult<Vec<InboxEntry>>;

    /// The newest seq of the user's inbox (0 when empty).
    async fn inbox_head(&self, user: UserId) -> StoreResult<Seq>;

    /// Messages of a conversation as `reader` sees it, newest first, with id < `before`
    /// (all when `None`), at most `limit`. Group history requires membership (otherwise
    /// `NotFound("group")`); a direct conversation with a missing user is simply empty.
    async fn history(
        &self,
        reader: UserId,
        conversation: Conversation,
        before: Option<MessageId>,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>>;

    /// A page of the reader's conversations, each with its newest message as of the snapshot
    /// (newest first, at most `query.limit`): every direct peer, and every group the reader is
    /// still a member of that got a message since they joined. Answers from indexes, never a
    /// scan of the inbox. Without a snapshot in the query, the snapshot is taken now and
    /// covers every message to the reader committed before it (and none after).
    async fn conversation_page(
        &self,
        reader: UserId,
        query: ConversationQuery,
    ) -> StoreResult<ConversationPage>;

    // ----- groups -----

    /// Creates a group with `creator` as its admin and `members` (duplicates and the creator
    /// are ignored). At most `max_members` in all. Members that are missing or do not accept
    /// the creator (their `GroupAdds`) are `GroupAddRefused`, and nothing is created.
    async fn create_group(
        &self,
        creator: UserId,
        name: &str,
        members: &[UserId],
        max_members: usize,
        created_at: UnixMillis,
    ) -> StoreResult<Group>;

    /// Adds members; only an admin may (`PermissionDenied`). Existing members are ignored; new
    /// ones that are missing or do not accept the actor make it `GroupAddRefused`, and nobody
    /// is added.
    async fn add_members(
        &self,
        actor: UserId,
        group: GroupId,
        users: &[UserId],
        max_members: usize,
    ) -> StoreResult<Group>;

    /// Removes a member; only an admin may, and an admin may remove themselves only by
    /// leaving. `NotFound("member")` when the user is not in the group.
    async fn remove_member(
        &self,
        actor: UserId,
        group: GroupId,
        user: UserId,
    ) -> StoreResult<Group>;

    /// The user leaves (`NotFound("group")` when not a member). If they were the last admin,
    /// the longest-standing member becomes admin; the group is deleted when nobody is left.
    async fn leave_group(&self, user: UserId, group: GroupId) -> StoreResult<()>;

    /// The group with its members; `NotFound("group")` if missing or the reader is not a member.
    async fn group(&self, reader: UserId, group: GroupId) -> StoreResult<Group>;

    /// The groups the user belongs to (members left empty), ordered by id.
    async fn groups_of(&self, user: UserId) -> StoreResult<Vec<Group>>;

    // ----- lifecycle -----

    /// The identity created with the schema (32 lowercase hex characters, never changes): the
    /// nodes sharing this store are one cluster, and this names it in Redis.
    async fn cluster_id(&self) -> StoreResult<String>;

    /// Whether the store can serve requests now (for `/readyz`): `Unavailable` when it is
    /// closed or its database cannot be reached within the configured timeout.
    async fn health(&self) -> StoreResult<()>;

    /// Commits whatever is pending and stops background work; later calls get `Unavailable`.
    async fn close(&self) -> StoreResult<()>;
}

/// Checks an identity read back from the `cluster_identity` table, so a hand-edited row can
/// never name a Redis keyspace it was not meant to.
pub(crate) fn valid_cluster_id(id: String) -> StoreResult<String> {
    if id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(id)
    } else {
        Err(StoreError::Backend(format!(
            "cluster_identity.id {id:?} is not 32 lowercase hex characters"
        )))
    }
}

/// The one place store errors become wire errors.
impl From<StoreError> for messenger_protocol::WireError {
    fn from(e: StoreError) -> Self {
        use messenger_protocol::ErrorCode;
        let code = match &e {
            StoreError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            StoreError::NotFound(_) => ErrorCode::NotFound,
            StoreError::PermissionDenied(_) => ErrorCode::PermissionDenied,
            StoreError::LimitExceeded(_) => ErrorCode::InvalidArgument,
            StoreError::GroupAddRefused(_) => ErrorCode::PermissionDenied,
            StoreError::QuotaExceeded(_) => ErrorCode::ResourceExhausted,
            StoreError::Unavailable(_) => ErrorCode::Unavailable,
            StoreError::Backend(detail) => {
                tracing::error!(%detail, "store failure");
                return messenger_protocol::WireError::new(
                    ErrorCode::Internal,
                    "internal error; the request was not applied",
                );
            }
        };
        messenger_protocol::WireError::new(code, e.to_string())
    }
}

/// Opens the store the configuration selects, migrating it when `store.migrate_on_start`
/// (SQLite always migrates: the file is private to this process).
pub async fn open(config: &crate::config::Config) -> StoreResult<std::sync::Arc<dyn Store>> {
    open_with(config, config.store.migrate_on_start).await
}

/// Opens the configured store; `migrate` applies pending migrations first (`messengerd migrate`
/// passes true whatever the configuration says).
pub async fn open_with(
    config: &crate::config::Config,
    migrate: bool,
) -> StoreResult<std::sync::Arc<dyn Store>> {
    match config.store.backend {
        crate::config::StoreBackend::Sqlite => {
            let path = config.sqlite_path();
            let options = sqlite::SqliteOptions {
                synchronous_full: config.store.sqlite_sync_full,
                ..sqlite::SqliteOptions::default()
            };
            let store =
                tokio::task::spawn_blocking(move || sqlite::SqliteStore::open(&path, options))
                    .await
                    .map_err(|e| StoreError::Backend(format!("opening the store: {e}")))??;
            Ok(std::sync::Arc::new(store))
        }
        crate::config::StoreBackend::Postgres => {
            let url = postgres_url(&config.store, |name| std::env::var(name).ok());
            let options = postgres::PostgresOptions {
                pool_size: config.store.postgres_pool_size,
                timeout: std::time::Duration::from_secs(config.store.postgres_timeout_secs),
                migrate,
            };
            let store = postgres::PostgresStore::open_url(&url, options).await?;
            Ok(std::sync::Arc::new(store))
        }
    }
}

/// Where the PostgreSQL store is: `store.postgres_url` when set, otherwise a URL built from
/// `DB_HOST` (127.0.0.1), `DB_PORT` (5432), `DB_USER` (postgres), `DB_PASSWORD` (none) and
/// `DB_NAME` (messenger), read through `env` so tests need not touch the process environment.
pub fn postgres_url(
    store: &crate::config::StoreConfig,
    env: impl Fn(&str) -> Option<String>,
) -> String {
    if let Some(url) = &store.postgres_url {
        return url.clone();
    }
    let var = |name: &str, default: &str| {
        env(name)
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| default.to_owned())
    };
    let host = var("DB_HOST", "127.0.0.1");
    let port = var("DB_PORT", "5432");
    let user = var("DB_USER", "postgres");
    let password = var("DB_PASSWORD", "");
    let name = var("DB_NAME", "messenger");
    // An IPv6 literal needs brackets inside a URL.
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host
    };
    let credentials = if password.is_empty() {
        percent_encode(&user)
    } else {
        format!("{}:{}", percent_encode(&user), percent_encode(&password))
    };
    format!(
        "postgres://{credentials}@{host}:{port}/{}",
        percent_encode(&name)
    )
}

/// Escapes everything but RFC 3986 unreserved characters, so a password with `@`, `/` or `:`
/// cannot change where the URL points.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod url_tests {
    use super::postgres_url;
    use crate::config::StoreConfig;

    #[test]
    fn postgres_url_prefers_the_configured_url_then_db_variables_then_defaults() {
        let none = |_: &str| None;
        assert_eq!(
            postgres_url(&StoreConfig::default(), none),
            "postgres://postgres@127.0.0.1:5432/messenger"
        );

        let env = |name: &str| {
            Some(
                match name {
                    "DB_HOST" => "db.internal",
                    "DB_PORT" => "6543",
                    "DB_USER" => "chat",
                    "DB_PASSWORD" => "p@ss/w:rd",
                    "DB_NAME" => "prod",
                    _ => return None,
                }
                .to_owned(),
            )
        };
        let url = postgres_url(&StoreConfig::default(), env);
        assert_eq!(url, "postgres://chat:p%40ss%2Fw%3Ard@db.internal:6543/prod");
        let parsed: tokio_postgres::Config = url.parse().expect("parses");
        assert_eq!(parsed.get_password(), Some(&b"p@ss/w:rd"[..]));
        assert_eq!(parsed.get_dbname(), Some("prod"));

        let ipv6 = |name: &str| (name == "DB_HOST").then(|| "::1".to_owned());
        assert_eq!(
            postgres_url(&StoreConfig::default(), ipv6),
            "postgres://postgres@[::1]:5432/messenger"
        );

        let configured = StoreConfig {
            postgres_url: Some("postgres://x@y/z".into()),
            ..StoreConfig::default()
        };
        assert_eq!(postgres_url(&configured, env), "postgres://x@y/z");
    }
}
