//! The PostgreSQL store: several daemons share one database through bb8-postgres pools.
//!
//! Unlike the embedded store there is no single writer to hand out seqs, so the counter lives
//! in the user's row (`users.last_seq`): an append locks every recipient's row (`FOR UPDATE`,
//! in id order so two appends never wait on each other in a cycle), reads and bumps the counter
//! and commits, and the next appender for that user can only read the counter after that commit.
//! Seq order is therefore commit order, on any number of nodes.
//!
//! Lock order, kept by every transaction that takes more than one: group rows, then user rows
//! (ascending id), then sessions; `direct_threads` rows are only written by appends, after the
//! user rows they belong to are locked; appends take a conversation's `history_sizes` row last.
//! Nothing read from the database may panic here: rows are read
//! with `try_get` and every failure becomes a `StoreError`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bb8::{Pool, PooledConnection};
use bb8_postgres::PostgresConnectionManager;
use bytes::Bytes;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, NoTls, Row, Statement};

use super::conversations::{self, Candidate};
use super::{
    HISTORY_FULL, INBOX_FULL, NewAccount, NewSession, Store, StoreError, StoreResult, bound_param,
    history_key, id_param, limit_param,
};
use crate::model::{
    Account, Appended, Conversation, ConversationPage, ConversationQuery, ConversationSummary,
    ConversationWith, DeviceId, Group, GroupAdds, GroupId, GroupMember, InboxEntry, MessageId,
    NewMessage, Profile, ProfileChange, Recipient, Seq, Session, StoredMessage, UnixMillis, User,
    UserId, now_millis,
};

mod outage;

use outage::{Failure, Outage, cause};

mod embedded {
    refinery::embed_migrations!("../migrations/postgres");
}

/// Key of the session-level advisory lock held while migrating, so nodes starting together
/// apply each migration once instead of racing on `CREATE TABLE` (ASCII "msgrmigr").
const MIGRATION_LOCK: i64 = 0x6d73_6772_6d69_6772;

/// How long unacknowledged data may sit on a connection before the kernel declares it dead.
const DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Most connections in the pool.
    pub pool_size: u32,
    /// How long a request waits for a pooled connection (and a new connection for its
    /// handshake) before it fails `Unavailable`.
    pub timeout: Duration,
    /// Apply pending migrations while opening.
    pub migrate: bool,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            pool_size: 16,
            timeout: Duration::from_secs(5),
            migrate: true,
        }
    }
}

pub struct PostgresStore {
    /// `None` once closed: dropping the last handle closes the idle connections, while
    /// requests still running keep theirs (each checked-out connection holds a handle).
    pool: std::sync::RwLock<Option<Pool<Manager>>>,
    timeout: Duration,
    closed: AtomicBool,
    /// Shared with the pool's connections and error sink: they see the failures too.
    outage: Arc<Outage>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Parses a `postgres://` URL (or key=value connection string).
pub fn parse_url(url: &str) -> StoreResult<tokio_postgres::Config> {
    url.parse::<tokio_postgres::Config>()
        .map_err(|e| StoreError::Backend(format!("invalid PostgreSQL URL: {e}")))
}

/// Applies pending migrations on a dedicated connection, under an advisory lock so that
/// several nodes starting at once are safe. Returns how many migrations were applied.
pub async fn migrate(config: &tokio_postgres::Config, timeout: Duration) -> StoreResult<usize> {
    let mut config = config.clone();
    config.connect_timeout(timeout);
    let (mut client, connection) = config.connect(NoTls).await.map_err(pg_error)?;
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "migration connection failed");
        }
    });
    let outcome = async {
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg_error)?;
        let report = embedded::migrations::runner()
            .run_async(&mut client)
            .await
            .map_err(|e| StoreError::Backend(format!("migration failed: {e}")));
        // Closing the connection releases the lock too; unlocking explicitly just lets the
        // next node go on without waiting for the socket to close.
        let unlocked = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg_error);
        let report = report?;
        unlocked?;
        Ok(report.applied_migrations().len())
    }
    .await;
    drop(client);
    // The connection task ends once the client is gone.
    let _ = driver.await;
    outcome
}

impl PostgresStore {
    /// Builds the pool and, if asked, migrates first. The pool connects lazily, so with
    /// `migrate = false` this succeeds while the database is down and requests fail
    /// `Unavailable` until it is back.
    pub async fn open(
        config: tokio_postgres::Config,
        options: PostgresOptions,
    ) -> StoreResult<PostgresStore> {
        // bb8 refuses a zero timeout (it asserts).
        let timeout = options.timeout.max(Duration::from_millis(100));
        let mut config = config;
        config.connect_timeout(timeout);
        // A server that vanished without closing the socket (power loss, partition) would
        // otherwise hold a request until the default two-hour keepalive gives up; unless the URL
        // chose its own settings, notice it within about half a minute.
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(DEAD_PEER_TIMEOUT);
        }
        if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            config.keepalives_idle(Duration::from_secs(15));
            config.keepalives_interval(Duration::from_secs(5));
            config.keepalives_retries(3);
        }
        if options.migrate {
            let applied = migrate(&config, timeout).await?;
            if applied > 0 {
                tracing::info!(applied, "postgres migrations applied");
            }
        }
        let outage = Arc::new(Outage::default());
        let manager = Manager {
            inner: PostgresConnectionManager::new(config, NoTls),
            outage: outage.clone(),
        };
        let pool = Pool::builder()
            .max_size(options.pool_size.max(1))
            .connection_timeout(timeout)
            // A connection the server dropped (restart, failover) must not be handed out
            // again and again: check each one before use and replace the broken ones.
            .test_on_check_out(true)
            .retry_connection(true)
            .error_sink(Box::new(LogErrors(outage.clone())))
            .build_unchecked(manager);
        Ok(PostgresStore {
            pool: std::sync::RwLock::new(Some(pool)),
            timeout,
            closed: AtomicBool::new(false),
            outage,
        })
    }

    /// Opens from a URL; see [`open`](Self::open).
    pub async fn open_url(url: &str, options: PostgresOptions) -> StoreResult<PostgresStore> {
        Self::open(parse_url(url)?, options).await
    }

    async fn conn(&self) -> StoreResult<PooledConnection<'static, Manager>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        let pool = self
            .pool
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(closed)?;
        match pool.get_owned().await {
            // Checked on the way out (`test_on_check_out`): the database answered.
            Ok(conn) => {
                self.outage.succeeded();
                Ok(conn)
            }
            Err(bb8::RunError::TimedOut) => {
                let mut why = format!("no PostgreSQL connection within {:?}", self.timeout);
                if let Some(last) = self.outage.last_cause() {
                    why.push_str(" (last error: ");
                    why.push_str(&last);
                    why.push(')');
                }
                self.outage.failed(Failure::Operation, &why);
                Err(StoreError::Unavailable(why))
            }
            Err(bb8::RunError::User(e)) => {
                self.outage.failed(Failure::Operation, &cause(&e));
                Err(unavailable(&e))
            }
        }
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable("the store is closed".into())
}

// ----- the pool's connections -----

/// A pooled connection with its own prepared statements: a statement belongs to the server
/// session that prepared it, so the cache goes wherever the connection goes.
pub struct PgConn {
    client: tokio_postgres::Client,
    statements: HashMap<&'static str, Statement>,
    outage: Arc<Outage>,
}

#[derive(Debug)]
struct Manager {
    inner: PostgresConnectionManager<NoTls>,
    outage: Arc<Outage>,
}

impl bb8::ManageConnection for Manager {
    type Connection = PgConn;
    type Error = tokio_postgres::Error;

    async fn connect(&self) -> Result<PgConn, tokio_postgres::Error> {
        Ok(PgConn {
            client: self.inner.connect().await?,
            statements: HashMap::new(),
            outage: self.outage.clone(),
        })
    }

    async fn is_valid(&self, conn: &mut PgConn) -> Result<(), tokio_postgres::Error> {
        conn.client.simple_query("").await.map(|_| ())
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.client.is_closed()
    }
}

/// The pool's failed connection attempts (it retries on its own while a request waits):
/// into the outage log, not one line each.
#[derive(Debug, Clone)]
struct LogErrors(Arc<Outage>);

impl bb8::ErrorSink<tokio_postgres::Error> for LogErrors {
    fn sink(&self, error: tokio_postgres::Error) {
        self.0.failed(Failure::Connect, &cause(&error));
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<tokio_postgres::Error>> {
        Box::new(self.clone())
    }
}

/// Runs cached statements on a client or a transaction.
struct Db<'a, C> {
    client: &'a C,
    statements: &'a mut HashMap<&'static str, Statement>,
    outage: &'a Outage,
}

type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

impl<C: GenericClient + Sync> Db<'_, C> {
    async fn prepare(&mut self, sql: &'static str) -> StoreResult<Statement> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await.map_err(|e| self.failed(e))?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    async fn query(&mut self, sql: &'static str, params: Params<'_>) -> StoreResult<Vec<Row>> {
        let statement = self.prepare(sql).await?;
        self.client
            .query(&statement, params)
            .await
            .map_err(|e| self.failed(e))
    }

    async fn query_opt(
        &mut self,
        sql: &'static str,
        params: Params<'_>,
    ) -> StoreResult<Option<Row>> {
        let statement = self.prepare(sql).await?;
        self.client
            .query_opt(&statement, params)
            .await
            .map_err(|e| self.failed(e))
    }

    async fn query_one(&mut self, sql: &'static str, params: Params<'_>) -> StoreResult<Row> {
        self.query_opt(sql, params)
            .await?
            .ok_or_else(|| StoreError::Backend(format!("no row from: {sql}")))
    }

    /// Like `query_opt`, but hands back the raw error so the caller can tell a unique
    /// violation from anything else.
    async fn try_query_opt(
        &mut self,
        sql: &'static str,
        params: Params<'_>,
    ) -> StoreResult<Result<Option<Row>, tokio_postgres::Error>> {
        let statement = self.prepare(sql).await?;
        Ok(self.client.query_opt(&statement, params).await)
    }

    async fn execute(&mut self, sql: &'static str, params: Params<'_>) -> StoreResult<u64> {
        let statement = self.prepare(sql).await?;
        self.client
            .execute(&statement, params)
            .await
            .map_err(|e| self.failed(e))
    }

    /// `pg_error`, and a lost database goes into the outage log.
    fn failed(&self, e: tokio_postgres::Error) -> StoreError {
        if is_outage(&e) {
            self.outage.failed(Failure::Operation, &cause(&e));
        }
        pg_error(e)
    }
}

/// `Db` over the pooled connection itself (single statements, autocommit).
macro_rules! db {
    ($conn:expr) => {{
        let PgConn {
            client,
            statements,
            outage,
        } = &mut *$conn;
        Db {
            client: &*client,
            statements,
            outage: &**outage,
        }
    }};
}

/// Opens a transaction on the pooled connection and a `Db` over it. Dropping the transaction
/// without committing rolls it back.
macro_rules! begin {
    ($conn:expr, $tx:ident, $db:ident) => {
        let PgConn {
            client,
            statements,
            outage,
        } = &mut *$conn;
        let $tx = client.transaction().await.map_err(pg_error)?;
        let mut $db = Db {
            client: &$tx,
            statements,
            outage: &**outage,
        };
    };
}

/// As `begin!`, for reads that must see one snapshot (a membership check and the page it
/// guards): a read-only REPEATABLE READ transaction.
macro_rules! begin_snapshot {
    ($conn:expr, $tx:ident, $db:ident) => {
        let PgConn {
            client,
            statements,
            outage,
        } = &mut *$conn;
        let $tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg_error)?;
        let mut $db = Db {
            client: &$tx,
            statements,
            outage: &**outage,
        };
    };
}

// ----- errors and conversions -----

/// Whether the error means the database could not be reached or dropped the connection (or
/// gave up on the transaction as a whole): nothing was changed and trying later may work.
fn is_unavailable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        let code = code.code();
        // 08: connection exceptions; 57P0x: shutdown, crash, cannot connect now; 53300: too
        // many connections; 40001/40P01: serialization failure and deadlock (rolled back).
        return code.starts_with("08")
            || code.starts_with("57P")
            || code == SqlState::TOO_MANY_CONNECTIONS.code()
            || code == SqlState::T_R_SERIALIZATION_FAILURE.code()
            || code == SqlState::T_R_DEADLOCK_DETECTED.code();
    }
    // No server code: the socket failed (refused, reset, timed out).
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// Unavailable because the database itself is gone or refusing work, as opposed to one
/// transaction losing a serialization race (which says nothing about the database's health).
fn is_outage(e: &tokio_postgres::Error) -> bool {
    is_unavailable(e)
        && e.code() != Some(&SqlState::T_R_SERIALIZATION_FAILURE)
        && e.code() != Some(&SqlState::T_R_DEADLOCK_DETECTED)
}

fn unavailable(e: &tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(format!("PostgreSQL: {}", cause(e)))
}

fn pg_error(e: tokio_postgres::Error) -> StoreError {
    if is_unavailable(&e) {
        unavailable(&e)
    } else {
        StoreError::Backend(format!("PostgreSQL: {}", cause(&e)))
    }
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

fn is_foreign_key_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION)
}

fn get<'r, T: tokio_postgres::types::FromSql<'r>>(row: &'r Row, idx: usize) -> StoreResult<T> {
    row.try_get(idx)
        .map_err(|e| StoreError::Backend(format!("reading column {idx}: {e}")))
}

fn get_u64(row: &Row, idx: usize) -> StoreResult<u64> {
    let v: i64 = get(row, idx)?;
    u64::try_from(v).map_err(|_| StoreError::Backend(format!("negative value {v} in column {idx}")))
}

fn user_from_row(row: &Row, at: usize) -> StoreResult<User> {
    Ok(User {
        id: UserId(get_u64(row, at)?),
        username: get(row, at + 1)?,
        display_name: get(row, at + 2)?,
    })
}

fn group_adds_at(row: &Row, idx: usize) -> StoreResult<GroupAdds> {
    let stored: String = get(row, idx)?;
    GroupAdds::parse(&stored)
        .ok_or_else(|| StoreError::Backend(format!("unknown group_adds {stored:?}")))
}

/// The columns `message_from_row` reads, in its order, from `messages` aliased `m`.
macro_rules! message_columns {
    () => {
        "m.id, m.sender_id, m.sender_username, m.sender_display_name, m.to_user_id, \
         m.to_group_id, m.client_msg_id, m.body, m.content_type, m.server_time"
    };
}

fn message_from_row(row: &Row, at: usize) -> StoreResult<StoredMessage> {
    let to_user: Option<i64> = get(row, at + 4)?;
    let to_group: Option<i64> = get(row, at + 5)?;
    // The schema's CHECK keeps exactly one of the two set; anything else is a damaged row.
    let to = match (to_user, to_group) {
        (Some(_), None) => Recipient::User(UserId(get_u64(row, at + 4)?)),
        (None, Some(_)) => Recipient::Group(GroupId(get_u64(row, at + 5)?)),
        _ => {
            return Err(StoreError::Backend(
                "message row with neither or both recipients".into(),
            ));
        }
    };
    let body: Vec<u8> = get(row, at + 7)?;
    Ok(StoredMessage {
        id: MessageId(get_u64(row, at)?),
        sender: user_from_row(row, at + 1)?,
        to,
        client_msg_id: get(row, at + 6)?,
        body: Bytes::from(body),
        content_type: get(row, at + 8)?,
        server_time: get(row, at + 9)?,
    })
}

fn duplicate(existing: StoredMessage) -> Appended {
    Appended {
        message: Arc::new(existing),
        entries: Vec::new(),
        duplicate: true,
    }
}

/// `users` without duplicates and without `skip`, in their first order.
fn distinct_without(users: &[UserId], skip: &HashSet<UserId>) -> Vec<UserId> {
    let mut seen = HashSet::new();
    users
        .iter()
        .copied()
        .filter(|u| !skip.contains(u) && seen.insert(*u))
        .collect()
}

// ----- shared statements -----

const ACCOUNT_BY_KEY: &str =
    "SELECT id, username, display_name, password_hash FROM users WHERE username_key = $1";
const ACCOUNT_BY_ID: &str =
    "SELECT id, username, display_name, password_hash FROM users WHERE id = $1";

async fn account_by<C: GenericClient + Sync>(
    db: &mut Db<'_, C>,
    sql: &'static str,
    key: &(dyn ToSql + Sync),
) -> StoreResult<Option<Account>> {
    db.query_opt(sql, &[key])
        .await?
        .map(|row| {
            Ok(Account {
                user: user_from_row(&row, 0)?,
                password_hash: get(&row, 3)?,
            })
        })
        .transpose()
}

async fn existing_message<C: GenericClient + Sync>(
    db: &mut Db<'_, C>,
    sender: UserId,
    client_msg_id: &str,
) -> StoreResult<Option<StoredMessage>> {
    db.query_opt(
        concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages m WHERE m.sender_id = $1 AND m.client_msg_id = $2"
        ),
        &[&id_param(sender.0), &client_msg_id],
    )
    .await?
    .map(|row| message_from_row(&row, 0))
    .transpose()
}

/// Locks the group row: `FOR UPDATE` for changes to the group, `FOR NO KEY UPDATE` for
/// appends, so a membership change and a send to the group are serialized. An append writes
/// the group's `last_message_id`, so it must hold the stronger lock from the start: two sends
/// each holding a share lock and then asking to write the row would deadlock. (Sends to one
/// group were already serialized by the member rows they all lock.) False when it does not
/// exist.
async fn lock_group<C: GenericClient + Sync>(
    db: &mut Db<'_, C>,
    group: GroupId,
    exclusive: bool,
) -> StoreResult<bool> {
    let sql = if exclusive {
        "SELECT 1 FROM groups WHERE id = $1 FOR UPDATE"
    } else {
        "SELECT 1 FROM groups WHERE id = $1 FOR NO KEY UPDATE"
    };
    Ok(db.query_opt(sql, &[&id_param(group.0)]).await?.is_some())
}

/// `Some(admin)` when `user` is a member of `group`.
async fn membership<C: GenericClient + Sync>(
    db: &mut Db<'_, C>,
    group: GroupId,
    user: UserId,
) -> StoreResult<Option<bool>> {
    db.query_opt(
        "SELECT admin FROM group_members WHERE group_id = $1 AND user_id = $2",
        &[&id_param(group.0), &id_param(user.0)],
    )
    .await?
    .map(|row| get(&row, 0))
    .transpose()
}

async fn require_member<C: GenericClient + Sync>(
    db: &mut Db<'_, C>,
    group: GroupId,
    user: UserId,
    lock: Option<bool>,
) -> StoreResult<bool> {
    let exists = match lock {
        Some(exclusive) => lock_group(db, group, exclusive).await?,
        None => db
            .query_opt("SELECT 1 FROM groups WHERE id = $1", &[&id_param(group.0)])
            .await?
            .is_some(),
    };
    // A group the user is not in is answered like one that does not exist, so a group id
    // cannot be probed.
    if !exists {
        return Err(StoreError::NotFound("group"));
    }
    membership(db, group, user)
        .await?
        .ok_or(StoreError::NotFound("group"))
}

/// Those of `users` (in their order) that may not be added to a group by `actor`: missing
/// accounts, and accounts whose `group_adds` does not let `actor` in. Index seeks only: the
/// user's row, one `direct_threads` key, and the user's memberships probed against the
/// actor's (primary key), whatever size the groups are.
async fn refused_adds<C: GenericClient + Sync>(
    db: &mut Db<'_, C>,
    actor: UserId,
    users: &[UserId],
) -> StoreResult<Vec<UserId>> {
    if users.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = users.iter().map(|u| id_param(u.0)).collect();
    db.query(
        "SELECT c.id FROM unnest($2::bigint[]) WITH ORDINALITY AS c(id, n) \
         WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.id = c.id AND (u.group_adds = 'anyone' \
           OR (u.group_adds = 'contacts' AND ( \
             EXISTS (SELECT 1 FROM direct_threads d \
                     WHERE d.user_id = u.id AND d.peer_id = $1 AND d.wrote) \
             OR EXISTS (SELECT 1 FROM group_members mine \
                        JOIN group_members theirs ON theirs.group_id = mine.group_id \
                        WHERE mine.user_id = u.id AND theirs.user_id = $1))))) \
         ORDER BY c.n",
        &[&id_param(actor.0), &ids],
    )
    .await?
    .iter()
    .map(|row| get_u64(row, 0).map(UserId))
    .collect()
}

/// Refuses the request if any of `users` is missing or does not accept `actor`: one answer
/// for both. The caller locked their rows first, so none is deleted before the commit.
async fn require_accepted<C: GenericClient + Sync>(
    db: &mut Db<'_, C>,
    actor: UserId,
    users: &[UserId],
) -> StoreResult<()> {
    let refused = refused_adds(db, actor, users).await?;
    if refused.is_empty() {
        Ok(())
    } else {
        Err(StoreError::GroupAddRefused(refused))
    }
}

/// Locks the group for a change and checks that `user` is one of its admins.
async fn require_admin<C: GenericClient + Sync>(
    db: &mut Db<'_, C>,
    group: GroupId,
    user: UserId,
) -> StoreResult<()> {
    if require_member(db, group, user, Some(true)).await? {
        Ok(())
    } else {
        Err(StoreError::PermissionDenied(
            "only an admin may change the group",
        ))
    }
}

async fn load_group<C: GenericClient + Sync>(
    db: &mut Db<'_, C>,
    group: GroupId,
) -> StoreResult<Group> {
    let row = db
        .query_opt(
            "SELECT name, created_at FROM groups WHERE id = $1",
            &[&id_param(group.0)],
        )
        .await?
        .ok_or(StoreError::NotFound("group"))?;
    let name: String = get(&row, 0)?;
    let created_at: i64 = get(&row, 1)?;
    let members = db
        .query(
            "SELECT u.id, u.username, u.display_name, gm.admin \
             FROM group_members gm JOIN users u ON u.id = gm.user_id \
             WHERE gm.group_id = $1 ORDER BY gm.joined_at, gm.joined_order",
            &[&id_param(group.0)],
        )
        .await?
        .iter()
        .map(|row| {
            Ok(GroupMember {
                user: user_from_row(row, 0)?,
                admin: get(row, 3)?,
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
    Ok(Group {
        id: group,
        name,
        created_at,
        members,
    })
}

/// Locks the rows of `users` (ascending id order, see the module comment) against deletion
/// while they are being referenced; returns how many exist.
async fn lock_users_key_share<C: GenericClient + Sync>(
    db: &mut Db<'_, C>,
    users: &[UserId],
) -> StoreResult<usize> {
    let ids: Vec<i64> = users.iter().map(|u| id_param(u.0)).collect();
    Ok(db
        .query(
            "SELECT id FROM users WHERE id = ANY($1) ORDER BY id FOR KEY SHARE",
            &[&ids],
        )
        .await?
        .len())
}

async fn insert_members<C: GenericClient + Sync>(
    db: &mut Db<'_, C>,
    group: GroupId,
    users: &[UserId],
    admin: bool,
    joined_at: UnixMillis,
) -> StoreResult<()> {
    if users.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = users.iter().map(|u| id_param(u.0)).collect();
    // WITH ORDINALITY keeps the given order, which is the members' seniority. Only messages
    // after the group's current last one count as theirs in the conversation list.
    db.execute(
        "INSERT INTO group_members (group_id, user_id, admin, joined_at, joined_after) \
         SELECT $1, u.id, $3, $4, g.last_message_id \
         FROM unnest($2::bigint[]) WITH ORDINALITY AS u(id, n), groups g WHERE g.id = $1 \
         ORDER BY u.n",
        &[&id_param(group.0), &ids, &admin, &joined_at],
    )
    .await?;
    Ok(())
}

/// Takes `user` out of `group` (whose row the caller locked), then keeps the group valid:
/// deleted when empty, otherwise given an admin (the longest-standing member) if it has none.
async fn remove_membership<C: GenericClient + Sync>(
    db: &mut Db<'_, C>,
    group: GroupId,
    user: UserId,
) -> StoreResult<()> {
    let g = id_param(group.0);
    let removed = db
        .execute(
            "DELETE FROM group_members WHERE group_id = $1 AND user_id = $2",
            &[&g, &id_param(user.0)],
        )
        .await?;
    if removed == 0 {
        return Err(StoreError::NotFound("member"));
    }
    let anyone_left = db
        .query_opt(
            "SELECT 1 FROM group_members WHERE group_id = $1 LIMIT 1",
            &[&g],
        )
        .await?
        .is_some();
    if !anyone_left {
        db.execute("DELETE FROM groups WHERE id = $1", &[&g])
            .await?;
        return Ok(());
    }
    db.execute(
        "UPDATE group_members SET admin = TRUE \
         WHERE group_id = $1 AND user_id = (SELECT user_id FROM group_members \
             WHERE group_id = $1 ORDER BY joined_at, joined_order LIMIT 1) \
         AND NOT EXISTS (SELECT 1 FROM group_members WHERE group_id = $1 AND admin)",
        &[&g],
    )
    .await?;
    Ok(())
}

// ----- the trait -----

#[async_trait]
impl Store for PostgresStore {
    async fn create_account(&self, account: NewAccount) -> StoreResult<User> {
        let mut conn = self.conn().await?;
        let mut db = db!(conn);
        let inserted = db
            .try_query_opt(
                "INSERT INTO users (username, username_key, display_name, password_hash, \
                 created_at, group_adds) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                &[
                    &account.username,
                    &account.username_key,
                    &account.display_name,
                    &account.password_hash,
                    &now_millis(),
                    &account.group_adds.as_str(),
                ],
            )
            .await?;
        match inserted {
            Ok(Some(row)) => Ok(User {
                id: UserId(get_u64(&row, 0)?),
                username: account.username,
                display_name: account.display_name,
            }),
            Ok(None) => Err(StoreError::Backend("insert returned no id".into())),
            Err(e) if is_unique_violation(&e) => Err(StoreError::AlreadyExists("username")),
            Err(e) => Err(pg_error(e)),
        }
    }

    async fn account_by_username(&self, username_key: &str) -> StoreResult<Option<Account>> {
        let mut conn = self.conn().await?;
        let mut db = db!(conn);
        account_by(&mut db, ACCOUNT_BY_KEY, &username_key).await
    }

    async fn account_by_id(&self, user: UserId) -> StoreResult<Option<Account>> {
        let mut conn = self.conn().await?;
        let mut db = db!(conn);
        account_by(&mut db, ACCOUNT_BY_ID, &id_param(user.0)).await
    }

    async fn update_profile(&self, user: UserId, change: ProfileChange) -> StoreResult<Profile> {
        let mut conn = self.conn().await?;
        let mut db = db!(conn);
        // One statement: it applies whole or not at all.
        db.query_opt(
            "UPDATE users SET display_name = coalesce($2, display_name), \
             group_adds = coalesce($3, group_adds) WHERE id = $1 \
             RETURNING id, username, display_name, group_adds",
            &[
                &id_param(user.0),
                &change.display_name,
                &change.group_adds.map(GroupAdds::as_str),
            ],
        )
        .await?
        .map(|row| {
            Ok::<_, StoreError>(Profile {
                user: user_from_row(&row, 0)?,
                group_adds: group_adds_at(&row, 3)?,
            })
        })
        .transpose()?
        .ok_or(StoreError::NotFound("user"))
    }

    async fn change_password(
        &self,
        user: UserId,
        password_hash: &str,
        keep: DeviceId,
    ) -> StoreResult<Vec<DeviceId>> {
        let mut conn = self.conn().await?;
        begin!(conn, tx, db);
        let changed = db
            .execute(
                "UPDATE users SET password_hash = $2 WHERE id = $1",
                &[&id_param(user.0), &password_hash],
            )
            .await?;
        if changed == 0 {
            return Err(StoreError::NotFound("user"));
        }
        let mut devices = db
            .query(
                "DELETE FROM sessions WHERE user_id = $1 AND id <> $2 RETURNING id",
                &[&id_param(user.0), &id_param(keep.0)],
            )
            .await?
            .iter()
            .map(|row| get_u64(row, 0).map(DeviceId))
            .collect::<StoreResult<Vec<_>>>()?;
        db.execute(
            "DELETE FROM login_cookies WHERE user_id = $1",
            &[&id_param(user.0)],
        )
        .await?;
        tx.commit().await.map_err(pg_error)?;
        devices.sort_unstable();
        Ok(devices)
    }

    async fn delete_account(&self, user: UserId) -> StoreResult<Vec<DeviceId>> {
        let mut conn = self.conn().await?;
        begin!(conn, tx, db);
        let id = id_param(user.0);
        // Groups before the user (the lock order): an append to one of them holds the group
        // and then waits for the member rows.
        let groups = db
            .query(
                "SELECT g.id FROM groups g JOIN group_members gm ON gm.group_id = g.id \
                 WHERE gm.user_id = $1 ORDER BY g.id FOR UPDATE OF g",
                &[&id],
            )
            .await?
            .iter()
            .map(|row| get_u64(row, 0).map(GroupId))
            .collect::<StoreResult<Vec<_>>>()?;
        if db
            .query_opt("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", &[&id])
            .await?
            .is_none()
        {
            return Err(StoreError::NotFound("user"));
        }
        let mut devices = db
            .query(
                "DELETE FROM sessions WHERE user_id = $1 RETURNING id",
                &[&id],
            )
            .await?
            .iter()
            .map(|row| get_u64(row, 0).map(DeviceId))
            .collect::<StoreResult<Vec<_>>>()?;
        devices.sort_unstable();
        db.execute("DELETE FROM login_cookies WHERE user_id = $1", &[&id])
            .await?;
        db.execute("DELETE FROM inbox WHERE user_id = $1", &[&id])
            .await?;
        // The peers' side of these conversations stays: they keep their chat with a deleted
        // user.
        db.execute("DELETE FROM direct_threads WHERE user_id = $1", &[&id])
            .await?;
        for group in groups {
            remove_membership(&mut db, group, user).await?;
        }
        // A group that took the user in between the two reads above: locking it now is out
        // of order, but this only happens in that narrow race, and a deadlock would be
        // detected and reported as Unavailable (nothing applied).
        let late = db
            .query(
                "SELECT group_id FROM group_members WHERE user_id = $1 ORDER BY group_id",
                &[&id],
            )
            .await?
            .iter()
            .map(|row| get_u64(row, 0).map(GroupId))
            .collect::<StoreResult<Vec<_>>>()?;
        for group in late {
            lock_group(&mut db, group, true).await?;
            remove_membership(&mut db, group, user).await?;
        }
        // Messages the user sent stay (they carry the stamped sender); the identity never
        // hands the id out again.
        db.execute("DELETE FROM users WHERE id = $1", &[&id])
            .await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(devices)
    }

    async fn create_session(&self, session: NewSession) -> StoreResult<Session> {
        let mut conn = self.conn().await?;
        let mut db = db!(conn);
        // A new device starts at the user's high-water mark: what no device acknowledged yet.
        let inserted = db
            .try_query_opt(
                "INSERT INTO sessions (user_id, device_name, token_hash, expires_at, acked_seq, \
                 created_at) SELECT u.id, $2, $3, $4, u.acked_seq, $5 FROM users u \
                 WHERE u.id = $1 RETURNING id, acked_seq, \
                 (SELECT username FROM users WHERE id = $1), \
                 (SELECT display_name FROM users WHERE id = $1), \
                 (SELECT group_adds FROM users WHERE id = $1)",
                &[
                    &id_param(session.user.0),
                    &session.device_name,
                    &&session.token_hash[..],
                    &session.expires_at,
                    &now_millis(),
                ],
            )
            .await?;
        match inserted {
            Ok(Some(row)) => Ok(Session {
                device: DeviceId(get_u64(&row, 0)?),
                user: User {
                    id: session.user,
                    username: get(&row, 2)?,
                    display_name: get(&row, 3)?,
                },
                device_name: session.device_name,
                expires_at: session.expires_at,
                acked: Seq(get_u64(&row, 1)?),
                group_adds: group_adds_at(&row, 4)?,
            }),
            Ok(None) => Err(StoreError::NotFound("user")),
            Err(e) if is_unique_violation(&e) => Err(StoreError::AlreadyExists("session")),
            // The account was deleted between the SELECT and the insert.
            Err(e) if is_foreign_key_violation(&e) => Err(StoreError::NotFound("user")),
            Err(e) => Err(pg_error(e)),
        }
    }

    async fn session_by_token(&self, token_hash: &[u8; 32]) -> StoreResult<Option<Session>> {
        let mut conn = self.conn().await?;
        let mut db = db!(conn);
        db.query_opt(
            "SELECT u.id, u.username, u.display_name, s.id, s.device_name, s.expires_at, \
             s.acked_seq, u.group_adds FROM sessions s JOIN users u ON u.id = s.user_id \
             WHERE s.token_hash = $1",
            &[&&token_hash[..]],
        )
        .await?
        .map(|row| {
            Ok(Session {
                user: user_from_row(&row, 0)?,
                device: DeviceId(get_u64(&row, 3)?),
                device_name: get(&row, 4)?,
                expires_at: get(&row, 5)?,
                acked: Seq(get_u64(&row, 6)?),
                group_adds: group_adds_at(&row, 7)?,
            })
        })
        .transpose()
    }

    async fn touch_session(&self, device: DeviceId, expires_at: UnixMillis) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        let mut db = db!(conn);
        let changed = db
            .execute(
                "UPDATE sessions SET expires_at = $2 WHERE id = $1",
                &[&id_param(device.0), &expires_at],
            )
            .await?;
        if changed == 0 {
            return Err(StoreError::NotFound("session"));
        }
        Ok(())
    }

    async fn delete_session(&self, device: DeviceId) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        let mut db = db!(conn);
        db.execute("DELETE FROM sessions WHERE id = $1", &[&id_param(device.0)])
            .await?;
        Ok(())
    }

    async fn remember_login_cookie(
        &self,
        user: UserId,
        cookie_hash: &[u8; 32],
        used_at: UnixMillis,
        keep: usize,
    ) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        begin!(conn, tx, db);
        let id = id_param(user.0);
        // The user row's lock orders this against a concurrent delete_account, which would
        // otherwise leave the insert failing on the foreign key, or a trim racing another.
        if db
            .query_opt("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", &[&id])
            .await?
            .is_none()
        {
            return Err(StoreError::NotFound("user"));
        }
        db.execute(
            "INSERT INTO login_cookies (user_id, cookie_hash, created_at, last_used_at) \
             VALUES ($1, $2, $3, $3) \
             ON CONFLICT (user_id, cookie_hash) DO UPDATE SET last_used_at = excluded.last_used_at",
            &[&id, &&cookie_hash[..], &used_at],
        )
        .await?;
        db.execute(
            "DELETE FROM login_cookies WHERE user_id = $1 AND cookie_hash NOT IN \
             (SELECT cookie_hash FROM login_cookies WHERE user_id = $1 \
              ORDER BY last_used_at DESC, created_at DESC LIMIT $2)",
            &[&id, &limit_param(keep)],
        )
        .await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(())
    }

    async fn has_login_cookie(&self, user: UserId, cookie_hash: &[u8; 32]) -> StoreResult<bool> {
        let mut conn = self.conn().await?;
        let mut db = db!(conn);
        Ok(db
            .query_opt(
                "SELECT 1 FROM login_cookies WHERE user_id = $1 AND cookie_hash = $2",
                &[&id_param(user.0), &&cookie_hash[..]],
            )
            .await?
            .is_some())
    }

    async fn ack(&self, device: DeviceId, up_to: Seq) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        begin!(conn, tx, db);
        // Acks above the newest seq are clamped to it. Read without a lock: the head only
        // grows, so a stale read clamps lower, never higher.
        let Some(row) = db
            .query_opt(
                "SELECT s.user_id, LEAST($2, u.last_seq) FROM sessions s \
                 JOIN users u ON u.id = s.user_id WHERE s.id = $1",
                &[&id_param(device.0), &bound_param(up_to.0)],
            )
            .await?
        else {
            // The ack was stale, or the session was revoked meanwhile.
            return Ok(());
        };
        let user: i64 = get(&row, 0)?;
        let to: i64 = get(&row, 1)?;
        // The user row before the session row (the lock order). Cursors never move back.
        db.execute(
            "UPDATE users SET acked_seq = $2 WHERE id = $1 AND acked_seq < $2",
            &[&user, &to],
        )
        .await?;
        db.execute(
            "UPDATE sessions SET acked_seq = $2 WHERE id = $1 AND acked_seq < $2",
            &[&id_param(device.0), &to],
        )
        .await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(())
    }

    async fn append_message(&self, message: NewMessage) -> StoreResult<Appended> {
        let mut conn = self.conn().await?;
        begin!(conn, tx, db);
        // A retry gets the first answer back even if the sender, the recipient or the
        // membership changed since: only a message that was never stored is refused.
        if let Some(existing) =
            existing_message(&mut db, message.sender, &message.client_msg_id).await?
        {
            return Ok(duplicate(existing));
        }
        let (recipients, to_user, to_group) = match message.to {
            Recipient::User(peer) => {
                let mut recipients = vec![message.sender, peer];
                recipients.sort_unstable();
                recipients.dedup();
                (recipients, Some(id_param(peer.0)), None)
            }
            Recipient::Group(group) => {
                // Held until commit: a concurrent removal waits for this send, or this send
                // sees the membership without the removed user.
                if !lock_group(&mut db, group, false).await? {
                    return Err(StoreError::NotFound("group"));
                }
                let members = db
                    .query(
                        "SELECT user_id FROM group_members WHERE group_id = $1 \
                         ORDER BY user_id",
                        &[&id_param(group.0)],
                    )
                    .await?
                    .iter()
                    .map(|row| get_u64(row, 0).map(UserId))
                    .collect::<StoreResult<Vec<_>>>()?;
                if members.binary_search(&message.sender).is_err() {
                    return Err(StoreError::NotFound("group"));
                }
                (members, None, Some(id_param(group.0)))
            }
        };

        // Every inbox owner's row, in id order; the lock is what orders seqs (module comment).
        let ids: Vec<i64> = recipients.iter().map(|u| id_param(u.0)).collect();
        let locked = db
            .query(
                "SELECT id, username, display_name, last_seq, acked_seq FROM users \
                 WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                &[&ids],
            )
            .await?;
        let mut stamped = None;
        let mut next = Vec::with_capacity(locked.len());
        for row in &locked {
            let user = user_from_row(row, 0)?;
            let last = get_u64(row, 3)?;
            // The row is locked, so this is the backlog every earlier append committed.
            // Notes to oneself are never refused for one's own backlog.
            if message.to == Recipient::User(user.id)
                && user.id != message.sender
                && last.saturating_sub(get_u64(row, 4)?) >= message.quotas.inbox_backlog
            {
                return Err(StoreError::QuotaExceeded(INBOX_FULL));
            }
            let seq = last.checked_add(1).ok_or_else(|| {
                StoreError::Backend(format!("inbox seq of {} overflowed", user.id))
            })?;
            next.push((user.id, Seq(seq)));
            if user.id == message.sender {
                stamped = Some(user);
            }
        }
        // A deleted account sends nothing.
        let stamped = stamped.ok_or(StoreError::NotFound("user"))?;
        if next.len() != recipients.len() {
            return Err(match message.to {
                Recipient::User(_) => StoreError::NotFound("user"),
                Recipient::Group(_) => StoreError::Backend("a group member has no account".into()),
            });
        }

        // One round trip for the message, the counters and the inbox rows, so the recipients'
        // rows stay locked as briefly as possible. Two identical sends racing both got past the
        // check above; the sender's row lock serialized them, so the second conflicts on the
        // message insert, and then (joined to its empty result) updates and inserts nothing.
        // The history quota is checked in the same statement: it starts after the locks above
        // were granted, so it sees every earlier append to this conversation (they lock the
        // same user rows); a message it refuses is not inserted, and nothing else is either.
        let seqs: Vec<i64> = next.iter().map(|(_, s)| bound_param(s.0)).collect();
        let users: Vec<i64> = next.iter().map(|(u, _)| id_param(u.0)).collect();
        // The conversation moves up the list of each side (see the V3 migration): one row per
        // side of a direct chat (one for a note to oneself), the group's own row for a group.
        let (thread_users, thread_peers, thread_wrote) = match message.to {
            Recipient::User(peer) if peer == message.sender => {
                (vec![id_param(peer.0)], vec![id_param(peer.0)], vec![true])
            }
            Recipient::User(peer) => {
                let (me, them) = (id_param(message.sender.0), id_param(peer.0));
                (vec![me, them], vec![them, me], vec![true, false])
            }
            Recipient::Group(_) => (Vec::new(), Vec::new(), Vec::new()),
        };
        let [size_group, size_low, size_high] = history_key(&message);
        let history_max = bound_param(message.quotas.history);
        let inserted = db
            .query_opt(
                "WITH m AS ( \
                   INSERT INTO messages (sender_id, sender_username, sender_display_name, \
                   to_user_id, to_group_id, client_msg_id, body, content_type, server_time) \
                   SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 \
                   WHERE coalesce((SELECT messages FROM history_sizes \
                     WHERE group_id = $15 AND low_id = $16 AND high_id = $17), 0) < $18 \
                   ON CONFLICT (sender_id, client_msg_id) DO NOTHING RETURNING id \
                 ), sizes AS ( \
                   INSERT INTO history_sizes (group_id, low_id, high_id, messages) \
                   SELECT $15, $16, $17, 1 FROM m \
                   ON CONFLICT (group_id, low_id, high_id) \
                   DO UPDATE SET messages = history_sizes.messages + 1 \
                 ), counters AS ( \
                   UPDATE users SET last_seq = v.seq \
                   FROM unnest($10::bigint[], $11::bigint[]) AS v(id, seq), m \
                   WHERE users.id = v.id \
                 ), entries AS ( \
                   INSERT INTO inbox (user_id, seq, message_id) \
                   SELECT v.id, v.seq, m.id FROM unnest($10::bigint[], $11::bigint[]) AS v(id, seq), m \
                 ), threads AS ( \
                   INSERT INTO direct_threads (user_id, peer_id, last_message_id, wrote) \
                   SELECT t.u, t.p, m.id, t.w \
                   FROM unnest($12::bigint[], $13::bigint[], $14::bool[]) AS t(u, p, w), m \
                   ON CONFLICT (user_id, peer_id) DO UPDATE SET \
                     last_message_id = GREATEST(direct_threads.last_message_id, \
                                                EXCLUDED.last_message_id), \
                     wrote = direct_threads.wrote OR EXCLUDED.wrote \
                 ), activity AS ( \
                   UPDATE groups SET last_message_id = GREATEST(groups.last_message_id, m.id) \
                   FROM m WHERE groups.id = $5 \
                 ) \
                 SELECT id FROM m",
                &[
                    &id_param(message.sender.0),
                    &stamped.username,
                    &stamped.display_name,
                    &to_user,
                    &to_group,
                    &message.client_msg_id,
                    &&message.body[..],
                    &message.content_type,
                    &message.server_time,
                    &users,
                    &seqs,
                    &thread_users,
                    &thread_peers,
                    &thread_wrote,
                    &size_group,
                    &size_low,
                    &size_high,
                    &history_max,
                ],
            )
            .await?;
        let Some(row) = inserted else {
            // Nothing inserted: a racing identical send stored it first, or else the history
            // quota refused it.
            return existing_message(&mut db, message.sender, &message.client_msg_id)
                .await?
                .map(duplicate)
                .ok_or(StoreError::QuotaExceeded(HISTORY_FULL));
        };
        let id = get_u64(&row, 0)?;
        tx.commit().await.map_err(pg_error)?;

        Ok(Appended {
            message: Arc::new(StoredMessage {
                id: MessageId(id),
                sender: stamped,
                to: message.to,
                client_msg_id: message.client_msg_id,
                body: message.body,
                content_type: message.content_type,
                server_time: message.server_time,
            }),
            entries: next,
            duplicate: false,
        })
    }

    async fn read_inbox(
        &self,
        user: UserId,
        after: Seq,
        limit: usize,
        max_bytes: usize,
    ) -> StoreResult<Vec<InboxEntry>> {
        let mut conn = self.conn().await?;
        let mut db = db!(conn);
        // The running total of body bytes picks the rows to send, so the server never ships
        // (nor this process buffers) more than the byte bound and one message.
        db.query(
            concat!(
                "SELECT * FROM (SELECT i.seq, ",
                message_columns!(),
                ", sum(octet_length(m.body)) OVER (ORDER BY i.seq) AS running \
                 FROM inbox i JOIN messages m ON m.id = i.message_id \
                 WHERE i.user_id = $1 AND i.seq > $2 ORDER BY i.seq LIMIT $3) page \
                 WHERE running - octet_length(body) < greatest($4::bigint, 1) ORDER BY seq"
            ),
            &[
                &id_param(user.0),
                &bound_param(after.0),
                &limit_param(limit),
                &limit_param(max_bytes),
            ],
        )
        .await?
        .iter()
        .map(|row| {
            Ok(InboxEntry {
                seq: Seq(get_u64(row, 0)?),
                message: Arc::new(message_from_row(row, 1)?),
            })
        })
        .collect()
    }

    async fn inbox_head(&self, user: UserId) -> StoreResult<Seq> {
        let mut conn = self.conn().await?;
        let mut db = db!(conn);
        let head = db
            .query_opt(
                "SELECT last_seq FROM users WHERE id = $1",
                &[&id_param(user.0)],
            )
            .await?;
        Ok(Seq(match head {
            Some(row) => get_u64(&row, 0)?,
            None => 0,
        }))
    }

    async fn history(
        &self,
        reader: UserId,
        conversation: Conversation,
        before: Option<MessageId>,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        let mut conn = self.conn().await?;
        // One snapshot for the membership check and the page.
        begin_snapshot!(conn, tx, db);
        let before = before.map_or(i64::MAX, |id| bound_param(id.0));
        let limit = limit_param(limit);
        let rows = match conversation {
            Conversation::Direct(peer) => {
                let (lo, hi) = if reader <= peer {
                    (reader, peer)
                } else {
                    (peer, reader)
                };
                db.query(
                    concat!(
                        "SELECT ",
                        message_columns!(),
                        " FROM messages m WHERE m.to_user_id IS NOT NULL \
                         AND LEAST(m.sender_id, m.to_user_id) = $1 \
                         AND GREATEST(m.sender_id, m.to_user_id) = $2 \
                         AND m.id < $3 ORDER BY m.id DESC LIMIT $4"
                    ),
                    &[&id_param(lo.0), &id_param(hi.0), &before, &limit],
                )
                .await?
            }
            Conversation::Group(group) => {
                require_member(&mut db, group, reader, None).await?;
                db.query(
                    concat!(
                        "SELECT ",
                        message_columns!(),
                        " FROM messages m WHERE m.to_group_id = $1 AND m.id < $2 \
                         ORDER BY m.id DESC LIMIT $3"
                    ),
                    &[&id_param(group.0), &before, &limit],
                )
                .await?
            }
        };
        tx.commit().await.map_err(pg_error)?;
        rows.iter().map(|row| message_from_row(row, 0)).collect()
    }

    async fn conversation_page(
        &self,
        reader: UserId,
        query: ConversationQuery,
    ) -> StoreResult<ConversationPage> {
        let mut conn = self.conn().await?;
        let snapshot = match query.snapshot {
            Some(snapshot) => snapshot,
            None => {
                // Message ids are handed out before commit, so "the newest id" alone could
                // leave a smaller one still uncommitted. But every message that reaches the
                // reader locks the reader's row before it takes its id: once this share lock
                // is granted, those holding an id are committed, and later ones take theirs
                // after the read below, so above it.
                begin!(conn, tx, db);
                db.query_opt(
                    "SELECT 1 FROM users WHERE id = $1 FOR SHARE",
                    &[&id_param(reader.0)],
                )
                .await?;
                let row = db
                    .query_one("SELECT coalesce(max(id), 0) FROM messages", &[])
                    .await?;
                let newest = get_u64(&row, 0)?;
                tx.commit().await.map_err(pg_error)?;
                MessageId(newest)
            }
        };
        let bound = conversations::upper_bound(snapshot, &query);
        let me = id_param(reader.0);
        let at_snapshot = bound_param(snapshot.0);
        // One snapshot for every statement of the page.
        begin_snapshot!(conn, tx, db);
        let mut candidates = Vec::new();

        // Direct chats quiet since the snapshot: their key is their last message.
        for row in db
            .query(
                "SELECT peer_id, last_message_id FROM direct_threads \
                 WHERE user_id = $1 AND last_message_id < $2 \
                 ORDER BY last_message_id DESC LIMIT $3",
                &[&me, &bound_param(bound), &limit_param(query.limit)],
            )
            .await?
        {
            candidates.push((
                MessageId(get_u64(&row, 1)?),
                Candidate::Direct(UserId(get_u64(&row, 0)?)),
            ));
        }

        // Direct chats active since: their key is their newest message up to the snapshot.
        let moved = db
            .query(
                "SELECT peer_id FROM direct_threads WHERE user_id = $1 AND last_message_id > $2",
                &[&me, &at_snapshot],
            )
            .await?
            .iter()
            .map(|row| get_u64(row, 0).map(UserId))
            .collect::<StoreResult<Vec<_>>>()?;
        for peer in moved {
            let (lo, hi) = if reader <= peer {
                (reader, peer)
            } else {
                (peer, reader)
            };
            let key = db
                .query_opt(
                    "SELECT m.id FROM messages m WHERE m.to_user_id IS NOT NULL \
                     AND LEAST(m.sender_id, m.to_user_id) = $1 \
                     AND GREATEST(m.sender_id, m.to_user_id) = $2 \
                     AND m.id <= $3 ORDER BY m.id DESC LIMIT 1",
                    &[&id_param(lo.0), &id_param(hi.0), &at_snapshot],
                )
                .await?;
            if let Some(row) = key {
                candidates.push((MessageId(get_u64(&row, 0)?), Candidate::Direct(peer)));
            }
        }

        // Groups: the reader's memberships (one index range), each keyed by the group's last
        // message, or for a group active since the snapshot, its newest message up to it.
        let groups = db
            .query(
                "SELECT g.id, g.name, g.created_at, g.last_message_id, gm.joined_after \
                 FROM group_members gm JOIN groups g ON g.id = gm.group_id \
                 WHERE gm.user_id = $1 AND g.last_message_id > gm.joined_after",
                &[&me],
            )
            .await?;
        for row in &groups {
            let id = GroupId(get_u64(row, 0)?);
            let last = get_u64(row, 3)?;
            let key = if last <= snapshot.0 {
                Some(last)
            } else {
                let joined_after: i64 = get(row, 4)?;
                match db
                    .query_opt(
                        "SELECT m.id FROM messages m WHERE m.to_group_id = $1 \
                         AND m.id > $2 AND m.id <= $3 ORDER BY m.id DESC LIMIT 1",
                        &[&id_param(id.0), &joined_after, &at_snapshot],
                    )
                    .await?
                {
                    Some(newest) => Some(get_u64(&newest, 0)?),
                    None => None,
                }
            };
            if let Some(key) = key {
                candidates.push((
                    MessageId(key),
                    Candidate::Group {
                        id,
                        name: get(row, 1)?,
                        created_at: get(row, 2)?,
                    },
                ));
            }
        }

        let page = conversations::page(candidates, bound, query.limit);
        let ids: Vec<i64> = page.iter().map(|(key, _)| id_param(key.0)).collect();
        let mut messages: HashMap<MessageId, StoredMessage> = HashMap::with_capacity(ids.len());
        for row in db
            .query(
                concat!(
                    "SELECT ",
                    message_columns!(),
                    " FROM messages m WHERE m.id = ANY($1)"
                ),
                &[&ids],
            )
            .await?
        {
            let m = message_from_row(&row, 0)?;
            messages.insert(m.id, m);
        }
        let peers: Vec<i64> = page
            .iter()
            .filter_map(|(_, c)| match c {
                Candidate::Direct(peer) => Some(id_param(peer.0)),
                Candidate::Group { .. } => None,
            })
            .collect();
        let mut accounts: HashMap<UserId, User> = HashMap::with_capacity(peers.len());
        for row in db
            .query(
                "SELECT id, username, display_name FROM users WHERE id = ANY($1)",
                &[&peers],
            )
            .await?
        {
            let user = user_from_row(&row, 0)?;
            accounts.insert(user.id, user);
        }
        tx.commit().await.map_err(pg_error)?;

        let mut out = Vec::with_capacity(page.len());
        for (key, candidate) in page {
            let last = messages.remove(&key).ok_or_else(|| {
                StoreError::Backend(format!("conversation key {key} names no message"))
            })?;
            let with = match candidate {
                Candidate::Direct(peer) => {
                    ConversationWith::Direct(peer, accounts.get(&peer).cloned())
                }
                Candidate::Group {
                    id,
                    name,
                    created_at,
                } => ConversationWith::Group(Group {
                    id,
                    name,
                    created_at,
                    members: Vec::new(),
                }),
            };
            out.push(ConversationSummary { with, last });
        }
        Ok(ConversationPage {
            snapshot,
            conversations: out,
        })
    }

    async fn create_group(
        &self,
        creator: UserId,
        name: &str,
        members: &[UserId],
        max_members: usize,
        created_at: UnixMillis,
    ) -> StoreResult<Group> {
        let others = distinct_without(members, &HashSet::from([creator]));
        if others.len().saturating_add(1) > max_members {
            return Err(StoreError::LimitExceeded("group size"));
        }
        let mut conn = self.conn().await?;
        begin!(conn, tx, db);
        // One statement locks everyone, in id order (the module's lock order).
        let mut everyone = others.clone();
        everyone.push(creator);
        let locked = lock_users_key_share(&mut db, &everyone).await?;
        // Before the first write, in the same transaction as the inserts.
        require_accepted(&mut db, creator, &others).await?;
        // Every other member exists (accepted), so a short count is the creator.
        if locked != everyone.len() {
            return Err(StoreError::NotFound("user"));
        }
        let row = db
            .query_one(
                "INSERT INTO groups (name, created_at) VALUES ($1, $2) RETURNING id",
                &[&name, &created_at],
            )
            .await?;
        let group = GroupId(get_u64(&row, 0)?);
        insert_members(&mut db, group, &[creator], true, created_at).await?;
        insert_members(&mut db, group, &others, false, created_at).await?;
        let loaded = load_group(&mut db, group).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(loaded)
    }

    async fn add_members(
        &self,
        actor: UserId,
        group: GroupId,
        users: &[UserId],
        max_members: usize,
    ) -> StoreResult<Group> {
        let mut conn = self.conn().await?;
        begin!(conn, tx, db);
        require_admin(&mut db, group, actor).await?;
        let current: HashSet<UserId> = db
            .query(
                "SELECT user_id FROM group_members WHERE group_id = $1",
                &[&id_param(group.0)],
            )
            .await?
            .iter()
            .map(|row| get_u64(row, 0).map(UserId))
            .collect::<StoreResult<_>>()?;
        let new = distinct_without(users, &current);
        lock_users_key_share(&mut db, &new).await?;
        require_accepted(&mut db, actor, &new).await?;
        if current.len().saturating_add(new.len()) > max_members {
            return Err(StoreError::LimitExceeded("group size"));
        }
        insert_members(&mut db, group, &new, false, now_millis()).await?;
        let loaded = load_group(&mut db, group).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(loaded)
    }

    async fn remove_member(
        &self,
        actor: UserId,
        group: GroupId,
        user: UserId,
    ) -> StoreResult<Group> {
        let mut conn = self.conn().await?;
        begin!(conn, tx, db);
        require_admin(&mut db, group, actor).await?;
        if actor == user {
            return Err(StoreError::PermissionDenied(
                "an admin leaves the group instead of removing themselves",
            ));
        }
        remove_membership(&mut db, group, user).await?;
        let loaded = load_group(&mut db, group).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(loaded)
    }

    async fn leave_group(&self, user: UserId, group: GroupId) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        begin!(conn, tx, db);
        require_member(&mut db, group, user, Some(true)).await?;
        remove_membership(&mut db, group, user).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(())
    }

    async fn group(&self, reader: UserId, group: GroupId) -> StoreResult<Group> {
        let mut conn = self.conn().await?;
        begin_snapshot!(conn, tx, db);
        require_member(&mut db, group, reader, None).await?;
        let loaded = load_group(&mut db, group).await?;
        tx.commit().await.map_err(pg_error)?;
        Ok(loaded)
    }

    async fn groups_of(&self, user: UserId) -> StoreResult<Vec<Group>> {
        let mut conn = self.conn().await?;
        let mut db = db!(conn);
        db.query(
            "SELECT g.id, g.name, g.created_at FROM group_members gm \
             JOIN groups g ON g.id = gm.group_id WHERE gm.user_id = $1 ORDER BY g.id",
            &[&id_param(user.0)],
        )
        .await?
        .iter()
        .map(|row| {
            Ok(Group {
                id: GroupId(get_u64(row, 0)?),
                name: get(row, 1)?,
                created_at: get(row, 2)?,
                members: Vec::new(),
            })
        })
        .collect()
    }

    async fn cluster_id(&self) -> StoreResult<String> {
        let mut conn = self.conn().await?;
        let mut db = db!(conn);
        let row = db.query_one("SELECT id FROM cluster_identity", &[]).await?;
        super::valid_cluster_id(get(&row, 0)?)
    }

    async fn health(&self) -> StoreResult<()> {
        let check = async {
            let mut conn = self.conn().await?;
            let mut db = db!(conn);
            db.query_one("SELECT 1", &[]).await.map(|_| ())
        };
        tokio::time::timeout(self.timeout, check)
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!(
                    "PostgreSQL did not answer within {:?}",
                    self.timeout
                ))
            })?
    }

    async fn close(&self) -> StoreResult<()> {
        self.closed.store(true, Ordering::Release);
        let pool = self
            .pool
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(pool);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_level_failures_are_unavailable_and_others_are_not() {
        // A refused connection has no server code, only an I/O source.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let refused = rt.block_on(async {
            // Port 1 is never a PostgreSQL server.
            let config = parse_url("postgres://postgres@127.0.0.1:1/x").expect("url");
            config
                .connect(NoTls)
                .await
                .err()
                .expect("connect must fail")
        });
        assert!(is_unavailable(&refused), "{refused}");
        assert!(is_outage(&refused), "{refused}");
        // The driver's own text is only "error connecting to server"; the log needs why.
        let why = cause(&refused);
        assert!(why.to_lowercase().contains("refused"), "{why}");
        match pg_error(refused) {
            StoreError::Unavailable(message) => assert!(message.contains(&why), "{message}"),
            other => panic!("not unavailable: {other:?}"),
        }
    }

    #[test]
    fn out_of_range_ids_match_nothing_and_bounds_saturate() {
        assert_eq!(id_param(u64::MAX), -1);
        assert_eq!(bound_param(u64::MAX), i64::MAX);
        assert_eq!(limit_param(usize::MAX), i64::MAX);
        assert_eq!(id_param(7), 7);
    }

    #[test]
    fn distinct_without_keeps_first_order() {
        let skip = HashSet::from([UserId(2)]);
        assert_eq!(
            distinct_without(&[UserId(3), UserId(2), UserId(1), UserId(3)], &skip),
            [UserId(3), UserId(1)]
        );
    }
}
