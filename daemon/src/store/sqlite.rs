//! The embedded store: `SQLite` in WAL mode, one file in the data directory.
//!
//! Owns that file and nothing else. Every change goes through one writer thread, which runs
//! whatever commands are queued in one transaction (group commit: one fsync for the whole
//! batch, each command isolated by its own SAVEPOINT) and answers only after COMMIT returned,
//! so `Ok` always means durable. Reads run beside it on a few read-only connections, which WAL
//! lets see the last commit without waiting for the writer. Nothing read from disk may panic
//! here: every failure becomes a `StoreError`.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::types::Type;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};
use tokio::sync::{Semaphore, oneshot};

use super::{NewAccount, NewSession, Store, StoreError, StoreResult};
use crate::model::{
    Account, Appended, Conversation, DeviceId, Group, GroupId, GroupMember, InboxEntry, MessageId,
    NewMessage, Recipient, Seq, Session, StoredMessage, UnixMillis, User, UserId, now_millis,
};

mod embedded {
    refinery::embed_migrations!("../migrations/sqlite");
}

/// Long enough to ride out a checkpoint or another process briefly holding the file, short
/// enough that a wedged database surfaces as an error instead of a hang.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The writer uses a few dozen distinct statements; the default cache (16) would evict them.
const STATEMENT_CACHE: usize = 64;

#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// `synchronous=FULL`: each group commit is fsynced before anyone hears `Ok`, so an
    /// accepted message survives power loss. `false` selects NORMAL, which survives a crash of
    /// the process but may lose the last commits when the machine loses power.
    pub synchronous_full: bool,
    /// Read-only connections serving reads concurrently with the writer.
    pub readers: usize,
    /// Most commands committed together in one transaction.
    pub max_batch: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            synchronous_full: true,
            readers: 4,
            max_batch: 4096,
        }
    }
}

pub struct SqliteStore {
    commands: mpsc::Sender<Command>,
    writer: Mutex<Option<JoinHandle<()>>>,
    checkpointer: Arc<Checkpointer>,
    readers: Arc<ReaderPool>,
    closed: AtomicBool,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, applies pending migrations and
    /// starts the writer thread. Blocking: call it once at start-up, before serving.
    pub fn open(path: &Path, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Backend(format!("cannot create {}: {e}", parent.display()))
            })?;
        }

        let mut writer = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        writer.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String =
            writer.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        // Readers beside the writer and one fsync per commit both depend on WAL; running
        // silently without it would break the concurrency and durability promises.
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(format!(
                "{} cannot use WAL (journal_mode is {mode})",
                path.display()
            )));
        }
        let synchronous = if options.synchronous_full {
            "FULL"
        } else {
            "NORMAL"
        };
        writer.pragma_update(None, "synchronous", synchronous)?;
        writer.pragma_update(None, "foreign_keys", "ON")?;
        // Checkpoints run on their own thread (see `Checkpointer`), not inside a commit.
        writer.pragma_update(None, "wal_autocheckpoint", 0)?;
        tune(&writer, WRITER_CACHE_KIB)?;
        writer.set_prepared_statement_cache_capacity(STATEMENT_CACHE);

        embedded::migrations::runner()
            .run(&mut writer)
            .map_err(|e| StoreError::Backend(format!("migration failed: {e}")))?;

        let readers = (0..options.readers.max(1))
            .map(|_| open_reader(path))
            .collect::<StoreResult<Vec<_>>>()?;
        let readers = Arc::new(ReaderPool {
            permits: Arc::new(Semaphore::new(readers.len())),
            idle: Mutex::new(readers),
        });

        let checkpointer = Arc::new(Checkpointer::start(path)?);
        let (commands, queue) = mpsc::channel();
        let max_batch = options.max_batch.max(1);
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(writer, queue, max_batch))
            .map_err(|e| StoreError::Backend(format!("cannot start the writer thread: {e}")))?;

        Ok(SqliteStore {
            commands,
            writer: Mutex::new(Some(thread)),
            checkpointer,
            readers,
            closed: AtomicBool::new(false),
        })
    }

    /// Runs `work` on the writer thread inside the next group commit and returns its result
    /// once the batch is durable. A caller that stops waiting does not cancel the command.
    async fn write<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        if self.closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        let (reply, answer) = oneshot::channel();
        let op = Box::new(Pending {
            work: Some(work),
            outcome: None,
            reply,
        });
        self.commands
            .send(Command::Write(op))
            .map_err(|_| closed())?;
        // A dropped reply means the writer stopped before running the command: nothing changed.
        answer.await.map_err(|_| closed())?
    }

    /// Runs `work` on a pooled read-only connection, off the async threads.
    async fn read<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        if self.closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        let permit = Arc::clone(&self.readers.permits)
            .acquire_owned()
            .await
            .map_err(|_| closed())?;
        let readers = Arc::clone(&self.readers);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut lease = readers.lease()?;
            work(lease.conn()?)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("read task failed: {e}")))?
    }

    /// Asks the writer to commit what is queued and stop, then waits for it. Returns `None`
    /// when it was already stopped.
    fn stop_writer(&self) -> Option<JoinHandle<()>> {
        self.closed.store(true, Ordering::Release);
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        // Fails only when the thread already exited; joining it is still right.
        let _ = self.commands.send(Command::Stop);
        Some(handle)
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Blocks for at most the batch in flight: the thread must not outlive the store, or a
        // reopen of the same file could race with its last commit.
        if let Some(handle) = self.stop_writer()
            && handle.join().is_err()
        {
            tracing::error!("sqlite writer thread panicked");
        }
        self.checkpointer.stop();
    }
}

/// Copies committed WAL frames back into the database file on a thread of its own, so the
/// writer's group commits never pay for it (in-commit auto-checkpoints took a sixth of the
/// writer's time under load). PASSIVE checkpoints never block the writer or readers; the WAL
/// is rewound by SQLite once a checkpoint caught up. On stop, a final TRUNCATE checkpoint
/// leaves a compact database file.
struct Checkpointer {
    stop: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

impl Checkpointer {
    fn start(path: &Path) -> StoreResult<Self> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let stop = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                let (lock, wake) = &*flag;
                let mut stopped = lock.lock().unwrap_or_else(PoisonError::into_inner);
                while !*stopped {
                    let (guard, _) = wake
                        .wait_timeout(stopped, CHECKPOINT_EVERY)
                        .unwrap_or_else(PoisonError::into_inner);
                    stopped = guard;
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::warn!(error = %e, "wal checkpoint failed");
                    }
                }
                drop(stopped);
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "final wal checkpoint failed");
                }
            })
            .map_err(|e| StoreError::Backend(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Self {
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Stops after a final checkpoint; call after the writer stopped.
    fn stop(&self) {
        let (lock, wake) = &*self.stop;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        wake.notify_all();
        let handle = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::error!("sqlite checkpoint thread panicked");
        }
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable("the store is closed".into())
}

fn open_reader(path: &Path) -> StoreResult<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    tune(&conn, READER_CACHE_KIB)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Page cache of the writer: inbox appends touch pages all over the inbox and users tables,
/// and every page SQLite must re-read from the OS costs a syscall and a copy in the one
/// thread that all writes go through.
const WRITER_CACHE_KIB: i64 = 64 * 1024;
const READER_CACHE_KIB: i64 = 16 * 1024;
/// Reads through a memory map instead of read(2) copies.
const MMAP_BYTES: i64 = 256 * 1024 * 1024;

fn tune(conn: &Connection, cache_kib: i64) -> rusqlite::Result<()> {
    conn.pragma_update(None, "cache_size", -cache_kib)?;
    conn.pragma_update(None, "mmap_size", MMAP_BYTES)?;
    conn.pragma_update(None, "temp_store", "MEMORY")
}

// ----- errors and conversions -----

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

/// `SQLite` integers are signed. An id beyond `i64::MAX` cannot name a stored row, so it becomes
/// -1, which matches nothing (stored ids are positive).
fn id_param(id: u64) -> i64 {
    i64::try_from(id).unwrap_or(-1)
}

/// Bounds (seqs, "before" ids) saturate instead: "after 2^63+1" means "after everything".
fn bound_param(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn limit_param(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn get_u64(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    u64::try_from(v)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Integer, Box::new(e)))
}

fn to_u64(v: i64) -> StoreResult<u64> {
    u64::try_from(v).map_err(|_| StoreError::Backend(format!("negative id {v} in the database")))
}

/// One key per conversation, so history of either kind is one range scan of one index.
/// A direct conversation's key is the same from both sides.
fn direct_key(a: UserId, b: UserId) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    format!("u:{lo}:{hi}")
}

fn group_key(group: GroupId) -> String {
    format!("g:{group}")
}

fn user_from_row(row: &Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: UserId(get_u64(row, 0)?),
        username: row.get(1)?,
        display_name: row.get(2)?,
    })
}

fn account_from_row(row: &Row<'_>) -> rusqlite::Result<Account> {
    Ok(Account {
        user: user_from_row(row)?,
        password_hash: row.get(3)?,
    })
}

/// The columns `message_from_row` reads, in its order, from `messages` aliased `m`.
macro_rules! message_columns {
    () => {
        "m.id, m.sender_id, m.sender_username, m.sender_display_name, m.to_user_id, \
         m.to_group_id, m.client_msg_id, m.body, m.content_type, m.server_time"
    };
}

fn message_from_row(row: &Row<'_>, at: usize) -> rusqlite::Result<StoredMessage> {
    let to_user: Option<i64> = row.get(at + 4)?;
    let to_group: Option<i64> = row.get(at + 5)?;
    // The schema's CHECK keeps exactly one of the two set; anything else is a damaged row.
    let to = match (to_user.is_some(), to_group.is_some()) {
        (true, false) => Recipient::User(UserId(get_u64(row, at + 4)?)),
        (false, true) => Recipient::Group(GroupId(get_u64(row, at + 5)?)),
        _ => {
            return Err(rusqlite::Error::InvalidColumnType(
                at + 4,
                "to_user_id".into(),
                Type::Null,
            ));
        }
    };
    let body: Vec<u8> = row.get(at + 7)?;
    Ok(StoredMessage {
        id: MessageId(get_u64(row, at)?),
        sender: User {
            id: UserId(get_u64(row, at + 1)?),
            username: row.get(at + 2)?,
            display_name: row.get(at + 3)?,
        },
        to,
        client_msg_id: row.get(at + 6)?,
        body: Bytes::from(body),
        content_type: row.get(at + 8)?,
        server_time: row.get(at + 9)?,
    })
}

// ----- the writer thread -----

enum Command {
    Write(Box<dyn WriteOp>),
    /// Commit what was queued before this, then stop.
    Stop,
}

/// A queued write, type-erased so one channel carries every operation.
trait WriteOp: Send {
    /// Runs the work inside the open transaction; true when it succeeded.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Sends the outcome: only after the batch committed.
    fn reply(self: Box<Self>);
    /// The batch did not commit. A success becomes an error; an error the work itself
    /// returned still stands, since it changed nothing either way.
    fn fail(self: Box<Self>, reason: &str);
}

struct Pending<T, F> {
    work: Option<F>,
    outcome: Option<StoreResult<T>>,
    reply: oneshot::Sender<StoreResult<T>>,
}

impl<T, F> WriteOp for Pending<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> StoreResult<T> + Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let outcome = match self.work.take() {
            Some(work) => work(conn),
            None => Err(StoreError::Backend("write command ran twice".into())),
        };
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }

    fn reply(self: Box<Self>) {
        let outcome = self
            .outcome
            .unwrap_or_else(|| Err(StoreError::Backend("write command never ran".into())));
        // The caller may have given up waiting; the change is committed regardless.
        let _ = self.reply.send(outcome);
    }

    fn fail(self: Box<Self>, reason: &str) {
        let outcome = match self.outcome {
            Some(Err(e)) => Err(e),
            _ => Err(StoreError::Backend(reason.to_owned())),
        };
        let _ = self.reply.send(outcome);
    }
}

fn writer_loop(conn: Connection, queue: mpsc::Receiver<Command>, max_batch: usize) {
    // Bounded preallocation: max_batch is configuration, not a promise of memory.
    let mut batch: Vec<Box<dyn WriteOp>> = Vec::with_capacity(max_batch.min(1024));
    let mut stopping = false;
    while !stopping {
        // Block for the first command, then take whatever piled up meanwhile: under load the
        // batch grows by itself, idle it is one command with no added latency.
        match queue.recv() {
            Ok(Command::Write(op)) => batch.push(op),
            Ok(Command::Stop) | Err(_) => break,
        }
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(Command::Write(op)) => batch.push(op),
                Ok(Command::Stop) | Err(TryRecvError::Disconnected) => {
                    stopping = true;
                    break;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        run_batch(&conn, &mut batch);
    }
    // Commands queued after Stop are dropped with the receiver; their callers see Unavailable.
    drop(queue);
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "closing the sqlite writer connection failed");
    }
}

fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

fn run_batch(conn: &Connection, batch: &mut Vec<Box<dyn WriteOp>>) {
    // IMMEDIATE takes the write lock now, so no command fails half-way on SQLITE_BUSY.
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE") {
        abort(conn, batch, &format!("cannot begin a transaction: {e}"));
        return;
    }
    for op in batch.iter_mut() {
        if let Err(e) = run_isolated(conn, op.as_mut()) {
            abort(conn, batch, &e);
            return;
        }
    }
    match exec(conn, "COMMIT") {
        Ok(()) => {
            for op in batch.drain(..) {
                op.reply();
            }
        }
        Err(e) => abort(conn, batch, &format!("commit failed: {e}")),
    }
}

/// Runs one command in its own savepoint, so a command that fails (a taken username, a
/// non-member sending) undoes only its own changes and the rest of the batch commits.
fn run_isolated(conn: &Connection, op: &mut dyn WriteOp) -> Result<(), String> {
    exec(conn, "SAVEPOINT command").map_err(|e| format!("savepoint failed: {e}"))?;
    let ok = op.run(conn);
    // Some errors (disk full, I/O) make SQLite roll back the whole transaction by itself; the
    // commands before this one are gone too, so the batch must not report success.
    if conn.is_autocommit() {
        return Err("the transaction was rolled back".into());
    }
    let end = if ok {
        exec(conn, "RELEASE command")
    } else {
        exec(conn, "ROLLBACK TO command").and_then(|()| exec(conn, "RELEASE command"))
    };
    end.map_err(|e| format!("savepoint release failed: {e}"))
}

fn abort(conn: &Connection, batch: &mut Vec<Box<dyn WriteOp>>, reason: &str) {
    tracing::error!(reason, commands = batch.len(), "sqlite group commit failed");
    if !conn.is_autocommit()
        && let Err(e) = conn.execute_batch("ROLLBACK")
    {
        tracing::error!(error = %e, "rollback after a failed group commit failed");
    }
    for op in batch.drain(..) {
        op.fail(reason);
    }
}

// ----- the reader pool -----

struct ReaderPool {
    /// One permit per connection: waiting happens here, asynchronously, never on the mutex.
    permits: Arc<Semaphore>,
    /// A `std` mutex: it is held only to pop or push a connection, never across an await.
    idle: Mutex<Vec<Connection>>,
}

impl ReaderPool {
    fn lease(&self) -> StoreResult<Lease<'_>> {
        let conn = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .ok_or_else(closed)?;
        Ok(Lease {
            pool: self,
            conn: Some(conn),
        })
    }
}

/// A borrowed reader connection, given back even when the work fails or panics.
struct Lease<'a> {
    pool: &'a ReaderPool,
    conn: Option<Connection>,
}

impl Lease<'_> {
    fn conn(&mut self) -> StoreResult<&mut Connection> {
        self.conn.as_mut().ok_or_else(closed)
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        // After close the pool is emptied on purpose; the connection closes here instead.
        if self.pool.permits.is_closed() {
            return;
        }
        if let Some(conn) = self.conn.take() {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(conn);
        }
    }
}

// ----- shared lookups (used on both sides) -----

fn user_by_id(conn: &Connection, user: UserId) -> StoreResult<Option<User>> {
    Ok(conn
        .prepare_cached("SELECT id, username, display_name FROM users WHERE id = ?1")?
        .query_row([id_param(user.0)], user_from_row)
        .optional()?)
}

fn user_exists(conn: &Connection, user: UserId) -> StoreResult<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM users WHERE id = ?1")?
        .exists([id_param(user.0)])?)
}

fn group_exists(conn: &Connection, group: GroupId) -> StoreResult<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM groups WHERE id = ?1")?
        .exists([id_param(group.0)])?)
}

/// `Some(admin)` when `user` is a member of `group`.
fn membership(conn: &Connection, group: GroupId, user: UserId) -> StoreResult<Option<bool>> {
    Ok(conn
        .prepare_cached("SELECT admin FROM group_members WHERE group_id = ?1 AND user_id = ?2")?
        .query_row([id_param(group.0), id_param(user.0)], |row| row.get(0))
        .optional()?)
}

fn require_member(conn: &Connection, group: GroupId, user: UserId) -> StoreResult<bool> {
    if !group_exists(conn, group)? {
        return Err(StoreError::NotFound("group"));
    }
    membership(conn, group, user)?.ok_or(StoreError::PermissionDenied("not a member of this group"))
}

fn require_admin(conn: &Connection, group: GroupId, user: UserId) -> StoreResult<()> {
    if require_member(conn, group, user)? {
        Ok(())
    } else {
        Err(StoreError::PermissionDenied(
            "only an admin may change the group",
        ))
    }
}

fn load_group(conn: &Connection, group: GroupId) -> StoreResult<Group> {
    let (name, created_at) = conn
        .prepare_cached("SELECT name, created_at FROM groups WHERE id = ?1")?
        .query_row([id_param(group.0)], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
        })
        .optional()?
        .ok_or(StoreError::NotFound("group"))?;
    let members = conn
        .prepare_cached(
            "SELECT u.id, u.username, u.display_name, gm.admin \
             FROM group_members gm JOIN users u ON u.id = gm.user_id \
             WHERE gm.group_id = ?1 ORDER BY gm.joined_at, gm.rowid",
        )?
        .query_map([id_param(group.0)], |row| {
            Ok(GroupMember {
                user: user_from_row(row)?,
                admin: row.get(3)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Group {
        id: group,
        name,
        created_at,
        members,
    })
}

// ----- writes (run on the writer thread, inside the batch transaction) -----

fn create_account(conn: &Connection, account: &NewAccount) -> StoreResult<User> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO users (username, username_key, display_name, password_hash, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
        )?
        .query_row(
            params![
                account.username,
                account.username_key,
                account.display_name,
                account.password_hash,
                now_millis()
            ],
            |row| get_u64(row, 0),
        );
    match inserted {
        Ok(id) => Ok(User {
            id: UserId(id),
            username: account.username.clone(),
            display_name: account.display_name.clone(),
        }),
        Err(e) if is_unique_violation(&e) => Err(StoreError::AlreadyExists("username")),
        Err(e) => Err(e.into()),
    }
}

fn update_display_name(conn: &Connection, user: UserId, display_name: &str) -> StoreResult<User> {
    conn.prepare_cached(
        "UPDATE users SET display_name = ?2 WHERE id = ?1 RETURNING id, username, display_name",
    )?
    .query_row(params![id_param(user.0), display_name], user_from_row)
    .optional()?
    .ok_or(StoreError::NotFound("user"))
}

fn change_password(
    conn: &Connection,
    user: UserId,
    password_hash: &str,
    keep: DeviceId,
) -> StoreResult<Vec<DeviceId>> {
    let changed = conn
        .prepare_cached("UPDATE users SET password_hash = ?2 WHERE id = ?1")?
        .execute(params![id_param(user.0), password_hash])?;
    if changed == 0 {
        return Err(StoreError::NotFound("user"));
    }
    let mut devices = conn
        .prepare_cached("DELETE FROM sessions WHERE user_id = ?1 AND id <> ?2 RETURNING id")?
        .query_map([id_param(user.0), id_param(keep.0)], |row| {
            get_u64(row, 0).map(DeviceId)
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    devices.sort_unstable();
    Ok(devices)
}

fn delete_account(conn: &Connection, user: UserId) -> StoreResult<Vec<DeviceId>> {
    if !user_exists(conn, user)? {
        return Err(StoreError::NotFound("user"));
    }
    let id = id_param(user.0);
    let mut devices = conn
        .prepare_cached("DELETE FROM sessions WHERE user_id = ?1 RETURNING id")?
        .query_map([id], |row| get_u64(row, 0).map(DeviceId))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    devices.sort_unstable();
    conn.prepare_cached("DELETE FROM inbox WHERE user_id = ?1")?
        .execute([id])?;
    let groups = conn
        .prepare_cached("SELECT group_id FROM group_members WHERE user_id = ?1")?
        .query_map([id], |row| get_u64(row, 0).map(GroupId))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    for group in groups {
        remove_membership(conn, group, user)?;
    }
    // Messages the user sent stay (they carry the stamped sender); AUTOINCREMENT keeps the id
    // from ever being given to someone else.
    conn.prepare_cached("DELETE FROM users WHERE id = ?1")?
        .execute([id])?;
    Ok(devices)
}

fn create_session(conn: &Connection, session: &NewSession) -> StoreResult<Session> {
    let user = user_by_id(conn, session.user)?.ok_or(StoreError::NotFound("user"))?;
    // A new device starts at the user's high-water mark: what no device acknowledged yet.
    let inserted = conn
        .prepare_cached(
            "INSERT INTO sessions (user_id, device_name, token_hash, expires_at, acked_seq, \
             created_at) SELECT ?1, ?2, ?3, ?4, u.acked_seq, ?5 FROM users u WHERE u.id = ?1 \
             RETURNING id, acked_seq",
        )?
        .query_row(
            params![
                id_param(user.id.0),
                session.device_name,
                &session.token_hash[..],
                session.expires_at,
                now_millis()
            ],
            |row| Ok((get_u64(row, 0)?, get_u64(row, 1)?)),
        );
    match inserted {
        Ok((device, acked)) => Ok(Session {
            device: DeviceId(device),
            user,
            device_name: session.device_name.clone(),
            expires_at: session.expires_at,
            acked: Seq(acked),
        }),
        Err(e) if is_unique_violation(&e) => Err(StoreError::AlreadyExists("session")),
        Err(e) => Err(e.into()),
    }
}

fn touch_session(conn: &Connection, device: DeviceId, expires_at: UnixMillis) -> StoreResult<()> {
    let changed = conn
        .prepare_cached("UPDATE sessions SET expires_at = ?2 WHERE id = ?1")?
        .execute(params![id_param(device.0), expires_at])?;
    if changed == 0 {
        return Err(StoreError::NotFound("session"));
    }
    Ok(())
}

fn delete_session(conn: &Connection, device: DeviceId) -> StoreResult<()> {
    conn.prepare_cached("DELETE FROM sessions WHERE id = ?1")?
        .execute([id_param(device.0)])?;
    Ok(())
}

fn ack(conn: &Connection, device: DeviceId, up_to: Seq) -> StoreResult<()> {
    // Zero rows changed is fine: the ack was stale, or the session was revoked meanwhile.
    conn.prepare_cached(
        "UPDATE sessions SET acked_seq = min(?2, users.last_seq) FROM users \
         WHERE sessions.id = ?1 AND users.id = sessions.user_id \
         AND sessions.acked_seq < min(?2, users.last_seq)",
    )?
    .execute([id_param(device.0), bound_param(up_to.0)])?;
    // The user's high-water mark, where the next new device starts.
    conn.prepare_cached(
        "UPDATE users SET acked_seq = s.acked_seq FROM sessions s \
         WHERE s.id = ?1 AND users.id = s.user_id AND users.acked_seq < s.acked_seq",
    )?
    .execute([id_param(device.0)])?;
    Ok(())
}

fn append_message(conn: &Connection, message: &NewMessage) -> StoreResult<Appended> {
    let sender = id_param(message.sender.0);

    // A retry must get the first answer back even if membership changed since.
    let existing = conn
        .prepare_cached(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages m WHERE m.sender_id = ?1 AND m.client_msg_id = ?2"
        ))?
        .query_row(params![sender, message.client_msg_id], |row| {
            message_from_row(row, 0)
        })
        .optional()?;
    if let Some(existing) = existing {
        return Ok(Appended {
            message: Arc::new(existing),
            entries: Vec::new(),
            duplicate: true,
        });
    }

    // A deleted account sends nothing.
    let stamped = user_by_id(conn, message.sender)?.ok_or(StoreError::NotFound("user"))?;

    let (to_user, to_group, conversation) = match message.to {
        Recipient::User(peer) => {
            if !user_exists(conn, peer)? {
                return Err(StoreError::NotFound("user"));
            }
            (
                Some(id_param(peer.0)),
                None,
                direct_key(message.sender, peer),
            )
        }
        Recipient::Group(group) => {
            // In the same transaction as the insert: a concurrent removal cannot slip a message
            // through.
            require_member(conn, group, message.sender)?;
            (None, Some(id_param(group.0)), group_key(group))
        }
    };

    let id = conn
        .prepare_cached(
            "INSERT INTO messages (sender_id, sender_username, sender_display_name, to_user_id, \
             to_group_id, conversation, client_msg_id, body, content_type, server_time) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) RETURNING id",
        )?
        .query_row(
            params![
                sender,
                stamped.username,
                stamped.display_name,
                to_user,
                to_group,
                conversation,
                message.client_msg_id,
                &message.body[..],
                message.content_type,
                message.server_time
            ],
            |row| row.get::<_, i64>(0),
        )?;

    // Each recipient's counter is bumped in this transaction, so seqs are handed out in commit
    // order; the batch commits as a whole, so a reader sees a seq only with all below it.
    let mut entries = match message.to {
        Recipient::User(peer) => {
            let peer = id_param(peer.0);
            conn.prepare_cached("UPDATE users SET last_seq = last_seq + 1 WHERE id IN (?1, ?2)")?
                .execute([sender, peer])?;
            conn.prepare_cached(
                "INSERT INTO inbox (user_id, seq, message_id) \
                 SELECT id, last_seq, ?3 FROM users WHERE id IN (?1, ?2) \
                 RETURNING user_id, seq",
            )?
            .query_map([sender, peer, id], |row| {
                Ok((UserId(get_u64(row, 0)?), Seq(get_u64(row, 1)?)))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?
        }
        Recipient::Group(group) => {
            let group = id_param(group.0);
            conn.prepare_cached(
                "UPDATE users SET last_seq = last_seq + 1 \
                 WHERE id IN (SELECT user_id FROM group_members WHERE group_id = ?1)",
            )?
            .execute([group])?;
            conn.prepare_cached(
                "INSERT INTO inbox (user_id, seq, message_id) \
                 SELECT u.id, u.last_seq, ?2 FROM group_members gm JOIN users u ON u.id = gm.user_id \
                 WHERE gm.group_id = ?1 \
                 RETURNING user_id, seq",
            )?
            .query_map([group, id], |row| {
                Ok((UserId(get_u64(row, 0)?), Seq(get_u64(row, 1)?)))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?
        }
    };
    entries.sort_unstable_by_key(|&(user, _)| user);

    Ok(Appended {
        message: Arc::new(StoredMessage {
            id: MessageId(to_u64(id)?),
            sender: stamped,
            to: message.to,
            client_msg_id: message.client_msg_id.clone(),
            body: message.body.clone(),
            content_type: message.content_type.clone(),
            server_time: message.server_time,
        }),
        entries,
        duplicate: false,
    })
}

fn insert_member(
    conn: &Connection,
    group: GroupId,
    user: UserId,
    admin: bool,
    joined_at: UnixMillis,
) -> StoreResult<()> {
    conn.prepare_cached(
        "INSERT INTO group_members (group_id, user_id, admin, joined_at) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        id_param(group.0),
        id_param(user.0),
        admin,
        joined_at
    ])?;
    Ok(())
}

/// `users` without duplicates and without those in `skip`, in their first order.
fn distinct_new(
    users: &[UserId],
    skip: impl Fn(UserId) -> StoreResult<bool>,
) -> StoreResult<Vec<UserId>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for &user in users {
        if seen.insert(user) && !skip(user)? {
            out.push(user);
        }
    }
    Ok(out)
}

fn create_group(
    conn: &Connection,
    creator: UserId,
    name: &str,
    members: &[UserId],
    max_members: usize,
    created_at: UnixMillis,
) -> StoreResult<Group> {
    let others = distinct_new(members, |user| Ok(user == creator))?;
    if others.len().saturating_add(1) > max_members {
        return Err(StoreError::LimitExceeded("group size"));
    }
    if !user_exists(conn, creator)? {
        return Err(StoreError::NotFound("user"));
    }
    for &user in &others {
        if !user_exists(conn, user)? {
            return Err(StoreError::NotFound("user"));
        }
    }
    let group = conn
        .prepare_cached("INSERT INTO groups (name, created_at) VALUES (?1, ?2) RETURNING id")?
        .query_row(params![name, created_at], |row| {
            get_u64(row, 0).map(GroupId)
        })?;
    insert_member(conn, group, creator, true, created_at)?;
    for user in others {
        insert_member(conn, group, user, false, created_at)?;
    }
    load_group(conn, group)
}

fn add_members(
    conn: &Connection,
    actor: UserId,
    group: GroupId,
    users: &[UserId],
    max_members: usize,
) -> StoreResult<Group> {
    require_admin(conn, group, actor)?;
    let new = distinct_new(users, |user| Ok(membership(conn, group, user)?.is_some()))?;
    for &user in &new {
        if !user_exists(conn, user)? {
            return Err(StoreError::NotFound("user"));
        }
    }
    let current: i64 = conn
        .prepare_cached("SELECT count(*) FROM group_members WHERE group_id = ?1")?
        .query_row([id_param(group.0)], |row| row.get(0))?;
    let current = usize::try_from(current).unwrap_or(usize::MAX);
    if current.saturating_add(new.len()) > max_members {
        return Err(StoreError::LimitExceeded("group size"));
    }
    let joined_at = now_millis();
    for user in new {
        insert_member(conn, group, user, false, joined_at)?;
    }
    load_group(conn, group)
}

fn remove_member(
    conn: &Connection,
    actor: UserId,
    group: GroupId,
    user: UserId,
) -> StoreResult<Group> {
    require_admin(conn, group, actor)?;
    if actor == user {
        return Err(StoreError::PermissionDenied(
            "an admin leaves the group instead of removing themselves",
        ));
    }
    remove_membership(conn, group, user)?;
    load_group(conn, group)
}

fn leave_group(conn: &Connection, user: UserId, group: GroupId) -> StoreResult<()> {
    if !group_exists(conn, group)? {
        return Err(StoreError::NotFound("group"));
    }
    remove_membership(conn, group, user)
}

/// Takes `user` out of `group`, then keeps the group valid: deleted when empty, otherwise
/// given an admin (the longest-standing member) if it has none left.
fn remove_membership(conn: &Connection, group: GroupId, user: UserId) -> StoreResult<()> {
    let g = id_param(group.0);
    let removed = conn
        .prepare_cached("DELETE FROM group_members WHERE group_id = ?1 AND user_id = ?2")?
        .execute([g, id_param(user.0)])?;
    if removed == 0 {
        return Err(StoreError::NotFound("member"));
    }
    let anyone_left = conn
        .prepare_cached("SELECT 1 FROM group_members WHERE group_id = ?1")?
        .exists([g])?;
    if !anyone_left {
        conn.prepare_cached("DELETE FROM groups WHERE id = ?1")?
            .execute([g])?;
        return Ok(());
    }
    conn.prepare_cached(
        "UPDATE group_members SET admin = 1 \
         WHERE rowid = (SELECT rowid FROM group_members WHERE group_id = ?1 \
                        ORDER BY joined_at, rowid LIMIT 1) \
         AND NOT EXISTS (SELECT 1 FROM group_members WHERE group_id = ?1 AND admin = 1)",
    )?
    .execute([g])?;
    Ok(())
}

// ----- reads (run on a pooled read-only connection) -----

fn account_by(
    conn: &Connection,
    sql: &str,
    key: impl rusqlite::ToSql,
) -> StoreResult<Option<Account>> {
    Ok(conn
        .prepare_cached(sql)?
        .query_row([key], account_from_row)
        .optional()?)
}

fn session_by_token(conn: &Connection, token_hash: &[u8; 32]) -> StoreResult<Option<Session>> {
    Ok(conn
        .prepare_cached(
            "SELECT u.id, u.username, u.display_name, s.id, s.device_name, s.expires_at, \
             s.acked_seq FROM sessions s JOIN users u ON u.id = s.user_id \
             WHERE s.token_hash = ?1",
        )?
        .query_row([&token_hash[..]], |row| {
            Ok(Session {
                user: user_from_row(row)?,
                device: DeviceId(get_u64(row, 3)?),
                device_name: row.get(4)?,
                expires_at: row.get(5)?,
                acked: Seq(get_u64(row, 6)?),
            })
        })
        .optional()?)
}

fn read_inbox(
    conn: &Connection,
    user: UserId,
    after: Seq,
    limit: usize,
) -> StoreResult<Vec<InboxEntry>> {
    Ok(conn
        .prepare_cached(concat!(
            "SELECT i.seq, ",
            message_columns!(),
            " FROM inbox i JOIN messages m ON m.id = i.message_id \
             WHERE i.user_id = ?1 AND i.seq > ?2 ORDER BY i.seq LIMIT ?3"
        ))?
        .query_map(
            [id_param(user.0), bound_param(after.0), limit_param(limit)],
            |row| {
                Ok(InboxEntry {
                    seq: Seq(get_u64(row, 0)?),
                    message: Arc::new(message_from_row(row, 1)?),
                })
            },
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?)
}

fn inbox_head(conn: &Connection, user: UserId) -> StoreResult<Seq> {
    let head = conn
        .prepare_cached("SELECT last_seq FROM users WHERE id = ?1")?
        .query_row([id_param(user.0)], |row| get_u64(row, 0))
        .optional()?;
    Ok(Seq(head.unwrap_or(0)))
}

fn history(
    conn: &mut Connection,
    reader: UserId,
    conversation: Conversation,
    before: Option<MessageId>,
    limit: usize,
) -> StoreResult<Vec<StoredMessage>> {
    // One snapshot for the membership check and the page.
    let tx = conn.transaction()?;
    let key = match conversation {
        Conversation::Direct(peer) => direct_key(reader, peer),
        Conversation::Group(group) => {
            require_member(&tx, group, reader)?;
            group_key(group)
        }
    };
    let before = before.map_or(i64::MAX, |id| bound_param(id.0));
    let page = tx
        .prepare_cached(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages m WHERE m.conversation = ?1 AND m.id < ?2 \
             ORDER BY m.id DESC LIMIT ?3"
        ))?
        .query_map(params![key, before, limit_param(limit)], |row| {
            message_from_row(row, 0)
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    tx.commit()?;
    Ok(page)
}

fn conversations(
    conn: &mut Connection,
    reader: UserId,
    limit: usize,
) -> StoreResult<Vec<(Conversation, StoredMessage)>> {
    let tx = conn.transaction()?;
    // The inbox holds every message the reader sent or received; the newest per conversation
    // key is its last activity. Groups the reader left are skipped.
    let rows = tx
        .prepare_cached(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages m JOIN ( \
               SELECT max(m2.id) AS id FROM inbox i JOIN messages m2 ON m2.id = i.message_id \
               WHERE i.user_id = ?1 GROUP BY m2.conversation \
             ) last ON last.id = m.id \
             WHERE m.to_group_id IS NULL OR EXISTS ( \
               SELECT 1 FROM group_members gm WHERE gm.group_id = m.to_group_id AND gm.user_id = ?1) \
             ORDER BY m.id DESC LIMIT ?2"
        ))?
        .query_map(params![id_param(reader.0), limit_param(limit)], |row| {
            message_from_row(row, 0)
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    tx.commit()?;
    Ok(rows
        .into_iter()
        .map(|m| {
            let conversation = match m.to {
                Recipient::Group(g) => Conversation::Group(g),
                Recipient::User(to) if m.sender.id == reader => Conversation::Direct(to),
                Recipient::User(_) => Conversation::Direct(m.sender.id),
            };
            (conversation, m)
        })
        .collect())
}

fn group_for(conn: &mut Connection, reader: UserId, group: GroupId) -> StoreResult<Group> {
    let tx = conn.transaction()?;
    require_member(&tx, group, reader)?;
    let loaded = load_group(&tx, group)?;
    tx.commit()?;
    Ok(loaded)
}

fn groups_of(conn: &Connection, user: UserId) -> StoreResult<Vec<Group>> {
    Ok(conn
        .prepare_cached(
            "SELECT g.id, g.name, g.created_at FROM group_members gm \
             JOIN groups g ON g.id = gm.group_id WHERE gm.user_id = ?1 ORDER BY g.id",
        )?
        .query_map([id_param(user.0)], |row| {
            Ok(Group {
                id: GroupId(get_u64(row, 0)?),
                name: row.get(1)?,
                created_at: row.get(2)?,
                members: Vec::new(),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?)
}

// ----- the trait -----

#[async_trait]
impl Store for SqliteStore {
    async fn create_account(&self, account: NewAccount) -> StoreResult<User> {
        self.write(move |c| create_account(c, &account)).await
    }

    async fn account_by_username(&self, username_key: &str) -> StoreResult<Option<Account>> {
        let key = username_key.to_owned();
        self.read(move |c| {
            account_by(
                c,
                "SELECT id, username, display_name, password_hash FROM users \
                 WHERE username_key = ?1",
                key,
            )
        })
        .await
    }

    async fn account_by_id(&self, user: UserId) -> StoreResult<Option<Account>> {
        self.read(move |c| {
            account_by(
                c,
                "SELECT id, username, display_name, password_hash FROM users WHERE id = ?1",
                id_param(user.0),
            )
        })
        .await
    }

    async fn update_display_name(&self, user: UserId, display_name: &str) -> StoreResult<User> {
        let display_name = display_name.to_owned();
        self.write(move |c| update_display_name(c, user, &display_name))
            .await
    }

    async fn change_password(
        &self,
        user: UserId,
        password_hash: &str,
        keep: DeviceId,
    ) -> StoreResult<Vec<DeviceId>> {
        let password_hash = password_hash.to_owned();
        self.write(move |c| change_password(c, user, &password_hash, keep))
            .await
    }

    async fn delete_account(&self, user: UserId) -> StoreResult<Vec<DeviceId>> {
        self.write(move |c| delete_account(c, user)).await
    }

    async fn create_session(&self, session: NewSession) -> StoreResult<Session> {
        self.write(move |c| create_session(c, &session)).await
    }

    async fn session_by_token(&self, token_hash: &[u8; 32]) -> StoreResult<Option<Session>> {
        let token_hash = *token_hash;
        self.read(move |c| session_by_token(c, &token_hash)).await
    }

    async fn touch_session(&self, device: DeviceId, expires_at: UnixMillis) -> StoreResult<()> {
        self.write(move |c| touch_session(c, device, expires_at))
            .await
    }

    async fn delete_session(&self, device: DeviceId) -> StoreResult<()> {
        self.write(move |c| delete_session(c, device)).await
    }

    async fn ack(&self, device: DeviceId, up_to: Seq) -> StoreResult<()> {
        self.write(move |c| ack(c, device, up_to)).await
    }

    async fn append_message(&self, message: NewMessage) -> StoreResult<Appended> {
        self.write(move |c| append_message(c, &message)).await
    }

    async fn read_inbox(
        &self,
        user: UserId,
        after: Seq,
        limit: usize,
    ) -> StoreResult<Vec<InboxEntry>> {
        self.read(move |c| read_inbox(c, user, after, limit)).await
    }

    async fn inbox_head(&self, user: UserId) -> StoreResult<Seq> {
        self.read(move |c| inbox_head(c, user)).await
    }

    async fn history(
        &self,
        reader: UserId,
        conversation: Conversation,
        before: Option<MessageId>,
        limit: usize,
    ) -> StoreResult<Vec<StoredMessage>> {
        self.read(move |c| history(c, reader, conversation, before, limit))
            .await
    }

    async fn conversations(
        &self,
        reader: UserId,
        limit: usize,
    ) -> StoreResult<Vec<(Conversation, StoredMessage)>> {
        self.read(move |c| conversations(c, reader, limit)).await
    }

    async fn create_group(
        &self,
        creator: UserId,
        name: &str,
        members: &[UserId],
        max_members: usize,
        created_at: UnixMillis,
    ) -> StoreResult<Group> {
        let name = name.to_owned();
        let members = members.to_vec();
        self.write(move |c| create_group(c, creator, &name, &members, max_members, created_at))
            .await
    }

    async fn add_members(
        &self,
        actor: UserId,
        group: GroupId,
        users: &[UserId],
        max_members: usize,
    ) -> StoreResult<Group> {
        let users = users.to_vec();
        self.write(move |c| add_members(c, actor, group, &users, max_members))
            .await
    }

    async fn remove_member(
        &self,
        actor: UserId,
        group: GroupId,
        user: UserId,
    ) -> StoreResult<Group> {
        self.write(move |c| remove_member(c, actor, group, user))
            .await
    }

    async fn leave_group(&self, user: UserId, group: GroupId) -> StoreResult<()> {
        self.write(move |c| leave_group(c, user, group)).await
    }

    async fn group(&self, reader: UserId, group: GroupId) -> StoreResult<Group> {
        self.read(move |c| group_for(c, reader, group)).await
    }

    async fn groups_of(&self, user: UserId) -> StoreResult<Vec<Group>> {
        self.read(move |c| groups_of(c, user)).await
    }

    async fn close(&self) -> StoreResult<()> {
        // Readers first: new reads fail fast instead of racing the shutdown.
        self.closed.store(true, Ordering::Release);
        self.readers.permits.close();
        self.readers
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        // A second close finds no thread and has nothing left to do.
        let Some(handle) = self.stop_writer() else {
            return Ok(());
        };
        let checkpointer = Arc::clone(&self.checkpointer);
        tokio::task::spawn_blocking(move || {
            let joined = handle.join();
            checkpointer.stop();
            joined
        })
        .await
        .map_err(|e| StoreError::Backend(format!("joining the writer failed: {e}")))?
        .map_err(|_| StoreError::Backend("the sqlite writer thread panicked".into()))
    }
}
