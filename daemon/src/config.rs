//! One `Config` for the daemon, layered: built-in defaults < TOML file (`--config`) <
//! `MESSENGER_*` environment variables < command-line flags. Every key is documented here and
//! in `messengerd --help`; README.md lists them too.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde::Deserialize;

/// The daemon's complete configuration after layering.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the client port (TLS; native protocol).
    pub listen: SocketAddr,
    /// Address of the admin HTTP endpoint (/healthz, /readyz, /metrics). It has no
    /// authentication: keep it on loopback or a private network, never a public interface.
    pub admin_listen: SocketAddr,
    /// Caps and timeouts of the admin endpoint.
    pub admin: AdminConfig,
    /// Directory for the embedded database and the generated development certificate.
    pub data_dir: PathBuf,
    pub log_format: LogFormat,
    pub tls: TlsConfig,
    pub limits: Limits,
    pub memory: MemoryConfig,
    pub timeouts: Timeouts,
    pub sessions: Sessions,
    pub passwords: Passwords,
    pub store: StoreConfig,
    pub cluster: ClusterConfig,
    pub web: WebConfig,
    /// Expect a PROXY protocol v2 header on every client connection (behind HAProxy with
    /// `send-proxy-v2`), so limits and logs see the client's address, not the balancer's.
    pub proxy_protocol: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7480)),
            admin: AdminConfig::default(),
            data_dir: PathBuf::from("messenger-data"),
            log_format: LogFormat::Text,
            tls: TlsConfig::default(),
            limits: Limits::default(),
            memory: MemoryConfig::default(),
            timeouts: Timeouts::default(),
            sessions: Sessions::default(),
            passwords: Passwords::default(),
            store: StoreConfig::default(),
            cluster: ClusterConfig::default(),
            web: WebConfig::default(),
            proxy_protocol: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain. When neither cert nor key is set, a development certificate
    /// (and the CA that signed it) is generated in the data directory.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest frame accepted or sent, in bytes (length prefix excluded).
    pub max_frame_bytes: usize,
    /// Largest message body, in bytes.
    pub max_body_bytes: usize,
    /// Most members a group may have, creator included.
    pub max_group_members: usize,
    /// Most messages one history page returns.
    pub max_history_page: usize,
    /// Most concurrent client connections; 0 (the default) means as many as the open-file
    /// limit allows after headroom for the store, Redis, the admin port and listeners. A
    /// value above that is lowered to it, with a warning at start (see `fd_limit`).
    pub max_connections: usize,
    /// Most concurrent client connections from one IP address.
    pub max_connections_per_ip: usize,
    /// Sustained messages per second one account may send, over all its connections and
    /// nodes (retries of a stored message count too).
    pub messages_per_second: u32,
    /// Messages one account may send at once above the sustained rate.
    pub message_burst: u32,
    /// Sustained inbox entries per second one account's sends may create: a direct message
    /// costs 2 (the recipient's and the sender's own), a group message one per member.
    pub recipients_per_second: u32,
    /// Sustained message-body bytes per second one account may send (a message costs its
    /// body's size): the message rate alone let a few accounts write 24 MB/s of 60 KiB bodies.
    pub send_bytes_per_second: u32,
    /// Message-body bytes one account may send at once above the sustained rate (at least
    /// `max_body_bytes`, so every message can pass).
    pub send_bytes_burst: u32,
    /// Inbox entries one account's sends may create at once (a send is admitted while the
    /// account is not in debt; its fan-out is charged when it is stored).
    pub recipient_burst: u32,
    /// Sustained read requests per second per account (GetHistory, ListConversations,
    /// LookupUser, GetGroup, ListGroups).
    pub reads_per_second: u32,
    /// Read requests per account at once above the sustained rate.
    pub read_burst: u32,
    /// LookupUser requests per account per minute (a bucket of this many, refilled over a
    /// minute), on top of the read budget: user ids and names cannot be enumerated fast.
    pub lookups_per_minute: u32,
    /// Groups one account may create per hour (a bucket of this many, refilled over an hour).
    pub groups_created_per_hour: u32,
    /// Members one account may add to groups per minute, initial members of a new group
    /// included (one request larger than this is allowed when the allowance is unused; the
    /// excess is waited off afterwards).
    pub group_members_added_per_minute: u32,
    /// A direct message is refused while the recipient has this many inbox entries that no
    /// device of theirs has received and acknowledged (group messages are not refused).
    pub max_inbox_backlog: u64,
    /// A conversation (a direct pair or a group) stores at most this many messages; further
    /// sends to it are refused.
    pub max_conversation_messages: u64,
    /// Failed logins per account per minute from devices without a valid login cookie (the
    /// account's shared "untrusted" budget) before such attempts are refused.
    pub login_failures_per_account: u32,
    /// Failed logins per minute with one valid login cookie (a device that signed in to the
    /// account before), and wrong current passwords per minute per signed-in device
    /// (`ChangePassword`, `DeleteAccount`). Each cookie and device has its own budget, so
    /// nobody else's failures use it up.
    pub login_failures_per_cookie: u32,
    /// `Resume`s with an unknown, revoked or expired token per IP address (IPv6: per /64) per
    /// minute; further `Resume`s from that address are refused until the window ends.
    pub invalid_resumes_per_ip: u32,
    /// Sustained successful `Resume`s per minute of one device (session) ...
    pub resumes_per_device_per_minute: u32,
    /// ... with this burst (a token bucket per device).
    pub resume_burst_per_device: u32,
    /// Login and register attempts per IP address per minute.
    pub auth_attempts_per_ip: u32,
    /// Live deliveries queued per connection before it switches to catching up from the store.
    pub outbound_queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 256 * 1024,
            max_body_bytes: 64 * 1024,
            max_group_members: 5_000,
            max_history_page: 200,
            max_connections: 0,
            max_connections_per_ip: 256,
            messages_per_second: 50,
            message_burst: 200,
            recipients_per_second: 5_000,
            send_bytes_per_second: 1024 * 1024,
            send_bytes_burst: 8 * 1024 * 1024,
            recipient_burst: 20_000,
            reads_per_second: 50,
            read_burst: 500,
            lookups_per_minute: 60,
            groups_created_per_hour: 30,
            group_members_added_per_minute: 1_000,
            max_inbox_backlog: 500_000,
            max_conversation_messages: 1_000_000,
            login_failures_per_account: 10,
            login_failures_per_cookie: 5,
            invalid_resumes_per_ip: 120,
            resumes_per_device_per_minute: 12,
            resume_burst_per_device: 30,
            auth_attempts_per_ip: 120,
            outbound_queue: 512,
        }
    }
}

/// What connections may buffer, in bytes (see `memory`). Together with the per-connection
/// costs of an idle connection, these bound the daemon's memory under any traffic.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Bytes all connections together may buffer: queued outbound frames and large inbound
    /// frames being read. When it runs out, the slowest readers are shed (they resume from
    /// the store) and new large frames are refused with `UNAVAILABLE`.
    pub max_buffered_bytes: usize,
    /// Bytes one connection may have queued for its socket; a sender waits beyond it.
    pub connection_outbound_bytes: usize,
    /// Message bytes one connection's live queue may hold before it switches to catching up
    /// from the store.
    pub live_queue_bytes: usize,
    /// Message bytes one catch-up read from the store may hold (at least one message).
    pub catch_up_page_bytes: usize,
    /// Largest frame accepted before a connection has logged in or resumed (Hello, Register,
    /// Login and Resume are small): an unauthenticated client cannot pin a large buffer.
    pub pre_auth_max_frame_bytes: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            max_buffered_bytes: 512 * 1024 * 1024,
            connection_outbound_bytes: 256 * 1024,
            live_queue_bytes: 256 * 1024,
            catch_up_page_bytes: 256 * 1024,
            pre_auth_max_frame_bytes: 16 * 1024,
        }
    }
}

/// The admin endpoint answers balancers' health checks and scrapers from memory in
/// milliseconds; anything holding a connection longer is stuck or hostile. Its connections
/// are capped and timed out so they can never take the descriptors the client port needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Most concurrent admin connections; further ones are accepted and closed at once.
    pub max_connections: usize,
    /// A connection that has not sent a complete request head within this many seconds (of
    /// connecting, or of its previous response: the keep-alive idle time) is closed.
    pub idle_timeout_secs: u64,
    /// A request whose answer is not produced, or not taken by the client, within this many
    /// seconds closes its connection.
    pub request_timeout_secs: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            max_connections: 64,
            idle_timeout_secs: 10,
            request_timeout_secs: 10,
        }
    }
}

impl AdminConfig {
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// TLS handshake plus `Hello` must complete within this many seconds.
    pub handshake_secs: u64,
    /// A connection must authenticate (login/resume/register+login) within this many seconds.
    pub auth_secs: u64,
    /// A connection that sends nothing for this many seconds is closed (clients ping).
    pub idle_secs: u64,
    /// A connection whose socket accepts no bytes for this many seconds is closed; it resumes
    /// from its cursor when it reconnects.
    pub write_stall_secs: u64,
    /// On shutdown, how long connections get to flush `GoAway` before they are dropped.
    pub shutdown_drain_secs: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handshake_secs: 10,
            auth_secs: 30,
            idle_secs: 120,
            write_stall_secs: 60,
            shutdown_drain_secs: 10,
        }
    }
}

impl Timeouts {
    pub fn handshake(&self) -> Duration {
        Duration::from_secs(self.handshake_secs)
    }
    pub fn auth(&self) -> Duration {
        Duration::from_secs(self.auth_secs)
    }
    pub fn idle(&self) -> Duration {
        Duration::from_secs(self.idle_secs)
    }
    pub fn write_stall(&self) -> Duration {
        Duration::from_secs(self.write_stall_secs)
    }
    pub fn shutdown_drain(&self) -> Duration {
        Duration::from_secs(self.shutdown_drain_secs)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sessions {
    /// A session token expires this many seconds after its last login or resume.
    pub ttl_secs: u64,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            ttl_secs: 30 * 24 * 3600,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Passwords {
    /// argon2id memory cost in KiB (OWASP: 19456).
    pub argon2_memory_kib: u32,
    /// argon2id iterations (OWASP: 2).
    pub argon2_iterations: u32,
    /// argon2id lanes (OWASP: 1).
    pub argon2_parallelism: u32,
    /// Most password hashes computed at once; 0 means one per CPU core.
    pub hash_concurrency: usize,
    /// Password checks (login, register) that may wait for a hashing thread; when that many
    /// wait, further ones are refused at once with `UNAVAILABLE` and a `retry_after_ms`.
    pub hash_queue: usize,
    /// A second, reserved queue for the checks of known devices (a login with a valid login
    /// cookie, a signed-in user's current password): served first, so owners still get in
    /// while a login flood fills `hash_queue`. When it is full they use `hash_queue` too.
    pub hash_queue_reserved: usize,
    /// Shortest password accepted.
    pub min_length: usize,
}

impl Default for Passwords {
    fn default() -> Self {
        Self {
            argon2_memory_kib: 19_456,
            argon2_iterations: 2,
            argon2_parallelism: 1,
            hash_concurrency: 0,
            hash_queue: 32,
            hash_queue_reserved: 8,
            min_length: 8,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Which backend keeps durable state: the embedded SQLite file, or PostgreSQL (needed
    /// when several daemons share one deployment).
    pub backend: StoreBackend,
    /// PostgreSQL connection URL (`postgres://user:password@host:port/dbname`). When unset,
    /// `DB_HOST`, `DB_PORT`, `DB_USER`, `DB_PASSWORD` and `DB_NAME` are used.
    pub postgres_url: Option<String>,
    /// Connections in the PostgreSQL pool.
    pub postgres_pool_size: u32,
    /// Seconds to wait for a pooled PostgreSQL connection before a request fails `unavailable`.
    pub postgres_timeout_secs: u64,
    /// Apply pending migrations at start (`messengerd migrate` does it explicitly).
    pub migrate_on_start: bool,
    /// SQLite database file; default `<data_dir>/messenger.db`.
    pub sqlite_path: Option<PathBuf>,
    /// fsync every group commit (true) or leave it to the OS (false: faster, but a power loss
    /// can drop recently accepted messages).
    pub sqlite_sync_full: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Sqlite,
            postgres_url: None,
            postgres_pool_size: 16,
            postgres_timeout_secs: 5,
            migrate_on_start: true,
            sqlite_path: None,
            sqlite_sync_full: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    Sqlite,
    Postgres,
}

/// Browsers on the client port: TLS with ALPN `http/1.1` (or none) is HTTP, serving the web
/// client and upgrading `GET /start` to a WebSocket that carries the same frames.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// Serve HTTP and the WebSocket bridge beside the native protocol.
    pub enabled: bool,
    /// Origins (`https://chat.example.com`) whose pages may open the WebSocket, besides the
    /// daemon's own origin (the `Host` it was reached at). Requests without `Origin` (not a
    /// browser) are allowed: the check only stops other sites' pages from using a visitor's
    /// browser.
    pub allowed_origins: Vec<String>,
}

impl Default for WebConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            allowed_origins: Vec::new(),
        }
    }
}

/// Running as one of several nodes: Redis carries presence and cross-node delivery.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Redis URL (`redis://host:port/db`); when unset the daemon runs alone.
    pub redis_url: Option<String>,
    /// This node's name in presence and logs; default: host name, process id and a random
    /// suffix, so two processes never share one.
    pub node_id: Option<String>,
    /// Seconds between this node's heartbeats in Redis.
    pub heartbeat_secs: u64,
    /// Seconds after its last heartbeat a node counts as gone.
    pub node_ttl_secs: u64,
    /// Longest wait at start for an earlier claim on this node id to expire (a node restarted
    /// right after a crash); default twice `node_ttl_secs`. A claim that is being refreshed
    /// fails the start at once.
    pub node_claim_wait_secs: Option<u64>,
    /// A node hands connections back when it holds more than the mean by this much, or the
    /// emptiest node holds less than the mean by this much (percent); 0 turns rebalancing off.
    pub rebalance_tolerance_percent: u64,
    /// Most connections one node hands back per rebalancing round (rounds are 5 s apart).
    pub rebalance_batch: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            node_id: None,
            heartbeat_secs: 1,
            node_ttl_secs: 5,
            node_claim_wait_secs: None,
            rebalance_tolerance_percent: 20,
            rebalance_batch: 20,
        }
    }
}

impl ClusterConfig {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs)
    }
    pub fn node_ttl(&self) -> Duration {
        Duration::from_secs(self.node_ttl_secs)
    }
    pub fn node_claim_wait(&self) -> Duration {
        Duration::from_secs(
            self.node_claim_wait_secs
                .unwrap_or(self.node_ttl_secs.saturating_mul(2)),
        )
    }
}

impl Config {
    pub fn sqlite_path(&self) -> PathBuf {
        self.store
            .sqlite_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("messenger.db"))
    }

    /// Checks relations between settings that serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        let l = &self.limits;
        if l.max_frame_bytes < l.max_body_bytes + 4096 {
            return Err(format!(
                "limits.max_frame_bytes ({}) must exceed limits.max_body_bytes ({}) by at least 4096 bytes of envelope",
                l.max_frame_bytes, l.max_body_bytes
            ));
        }
        if l.max_frame_bytes > 16 * 1024 * 1024 {
            return Err("limits.max_frame_bytes may be at most 16 MiB".into());
        }
        if l.outbound_queue == 0 || l.max_history_page == 0 || l.max_group_members < 2 {
            return Err(
                "limits.outbound_queue and limits.max_history_page must be > 0, limits.max_group_members >= 2"
                    .into(),
            );
        }
        let m = &self.memory;
        if m.connection_outbound_bytes < 1024
            || m.live_queue_bytes == 0
            || m.catch_up_page_bytes == 0
            || m.pre_auth_max_frame_bytes < 1024
        {
            return Err("memory.connection_outbound_bytes and memory.pre_auth_max_frame_bytes must be at least 1024, memory.live_queue_bytes and memory.catch_up_page_bytes > 0".into());
        }
        if m.max_buffered_bytes < l.max_frame_bytes.saturating_mul(4) {
            return Err(format!(
                "memory.max_buffered_bytes ({}) must hold at least four frames of limits.max_frame_bytes ({})",
                m.max_buffered_bytes, l.max_frame_bytes
            ));
        }
        let budgets = [
            ("messages_per_second", l.messages_per_second),
            ("message_burst", l.message_burst),
            ("recipients_per_second", l.recipients_per_second),
            ("send_bytes_per_second", l.send_bytes_per_second),
            ("recipient_burst", l.recipient_burst),
            ("reads_per_second", l.reads_per_second),
            ("read_burst", l.read_burst),
            ("lookups_per_minute", l.lookups_per_minute),
            ("groups_created_per_hour", l.groups_created_per_hour),
            (
                "group_members_added_per_minute",
                l.group_members_added_per_minute,
            ),
        ];
        if let Some((name, _)) = budgets.iter().find(|(_, v)| *v == 0) {
            return Err(format!("limits.{name} must be > 0"));
        }
        if (l.send_bytes_burst as usize) < l.max_body_bytes {
            return Err(format!(
                "limits.send_bytes_burst ({}) must be at least limits.max_body_bytes ({}): else a message of the largest size could never be sent",
                l.send_bytes_burst, l.max_body_bytes
            ));
        }
        if l.max_inbox_backlog == 0 || l.max_conversation_messages == 0 {
            return Err(
                "limits.max_inbox_backlog and limits.max_conversation_messages must be > 0".into(),
            );
        }
        if l.resumes_per_device_per_minute == 0 {
            // Zero would refuse every Resume for ever, not "no limit".
            return Err("limits.resumes_per_device_per_minute must be > 0".into());
        }
        if self.cluster.redis_url.is_some() && self.store.backend != StoreBackend::Postgres {
            return Err(
                "cluster.redis_url needs store.backend = \"postgres\": nodes must share one store"
                    .into(),
            );
        }
        if self.cluster.heartbeat_secs == 0
            || self.cluster.node_ttl_secs <= self.cluster.heartbeat_secs
        {
            return Err(
                "cluster.heartbeat_secs must be > 0 and below cluster.node_ttl_secs".into(),
            );
        }
        let a = &self.admin;
        if a.max_connections == 0 || a.idle_timeout_secs == 0 || a.request_timeout_secs == 0 {
            return Err(
                "admin.max_connections, admin.idle_timeout_secs and admin.request_timeout_secs must be > 0"
                    .into(),
            );
        }
        if self.store.postgres_pool_size == 0 {
            return Err("store.postgres_pool_size must be > 0".into());
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err("tls.cert and tls.key must be set together".into());
        }
        Ok(())
    }
}

/// Command line of `messengerd`. Each flag also reads the environment variable shown, and
/// overrides the same key of the config file.
#[derive(Debug, Parser)]
#[command(name = "messengerd", version, about = "Messenger chat daemon", long_about = None)]
pub struct Cli {
    /// TOML configuration file (keys as in README.md; flags and environment override it).
    #[arg(long, short = 'c', env = "MESSENGER_CONFIG", global = true)]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub overrides: Overrides,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (the default when no subcommand is given).
    Run,
    /// Apply pending store migrations and exit.
    Migrate,
    /// Create demo users, contacts and groups (idempotent), then exit.
    Seed(SeedArgs),
}

/// `messengerd seed`: users `<prefix>1..N`, a first direct message between neighbours (so
/// they list each other as conversations), and groups `<prefix>-group-1..M`.
#[derive(Debug, Clone, clap::Args)]
pub struct SeedArgs {
    /// Users to create
    #[arg(long, default_value_t = 20)]
    pub users: usize,
    /// Groups to create
    #[arg(long, default_value_t = 3)]
    pub groups: usize,
    /// Members per group, the creator included
    #[arg(long, default_value_t = 5)]
    pub group_size: usize,
    /// Password of every seeded user
    #[arg(long, env = "MESSENGER_SEED_PASSWORD", default_value = "demo-password")]
    pub password: String,
    /// Username prefix
    #[arg(long, default_value = "demo")]
    pub prefix: String,
}

#[derive(Debug, Default, clap::Args)]
pub struct Overrides {
    /// Client port address (TLS) [default: 127.0.0.1:7443]
    #[arg(long, env = "MESSENGER_LISTEN", global = true)]
    pub listen: Option<SocketAddr>,
    /// Admin HTTP address for /healthz, /readyz and /metrics; unauthenticated, keep it private [default: 127.0.0.1:7480]
    #[arg(long, env = "MESSENGER_ADMIN_LISTEN", global = true)]
    pub admin_listen: Option<SocketAddr>,
    /// Most concurrent admin connections; more are closed at once [default: 64]
    #[arg(long, env = "MESSENGER_ADMIN_MAX_CONNECTIONS", global = true)]
    pub admin_max_connections: Option<usize>,
    /// Seconds an admin connection may wait for its next request head [default: 10]
    #[arg(long, env = "MESSENGER_ADMIN_IDLE_TIMEOUT", global = true)]
    pub admin_idle_timeout: Option<u64>,
    /// Seconds an admin request may take, answer written included [default: 10]
    #[arg(long, env = "MESSENGER_ADMIN_REQUEST_TIMEOUT", global = true)]
    pub admin_request_timeout: Option<u64>,
    /// Data directory (database, development certificate) [default: messenger-data]
    #[arg(long, env = "MESSENGER_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Log format [default: text]
    #[arg(long, env = "MESSENGER_LOG_FORMAT", value_enum, global = true)]
    pub log_format: Option<LogFormat>,
    /// TLS certificate chain (PEM); without it a development certificate is generated
    #[arg(long, env = "MESSENGER_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM)
    #[arg(long, env = "MESSENGER_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,
    /// Store backend [default: sqlite]
    #[arg(long, env = "MESSENGER_STORE_BACKEND", value_enum, global = true)]
    pub store_backend: Option<StoreBackend>,
    /// PostgreSQL URL [default: built from DB_HOST, DB_PORT, DB_USER, DB_PASSWORD, DB_NAME]
    #[arg(long, env = "MESSENGER_POSTGRES_URL", global = true)]
    pub postgres_url: Option<String>,
    /// PostgreSQL pool size [default: 16]
    #[arg(long, env = "MESSENGER_POSTGRES_POOL_SIZE", global = true)]
    pub postgres_pool_size: Option<u32>,
    /// Seconds to wait for a pooled PostgreSQL connection [default: 5]
    #[arg(long, env = "MESSENGER_POSTGRES_TIMEOUT", global = true)]
    pub postgres_timeout: Option<u64>,
    /// Apply pending migrations at start [default: true]
    #[arg(long, env = "MESSENGER_MIGRATE_ON_START", global = true)]
    pub migrate_on_start: Option<bool>,
    /// Redis URL; set it to run as one node of a cluster [default: none]
    #[arg(long, env = "MESSENGER_REDIS_URL", global = true)]
    pub redis_url: Option<String>,
    /// This node's id [default: host-pid-random]
    #[arg(long, env = "MESSENGER_NODE_ID", global = true)]
    pub node_id: Option<String>,
    /// Serve the web client and the WebSocket bridge on the client port [default: true]
    #[arg(long, env = "MESSENGER_WEB_ENABLED", global = true)]
    pub web_enabled: Option<bool>,
    /// Extra origins allowed to open the WebSocket, comma-separated [default: none]
    #[arg(
        long,
        env = "MESSENGER_WEB_ALLOWED_ORIGINS",
        value_delimiter = ',',
        global = true
    )]
    pub web_allowed_origins: Option<Vec<String>>,
    /// Expect PROXY protocol v2 headers on client connections [default: false]
    #[arg(long, env = "MESSENGER_PROXY_PROTOCOL", global = true)]
    pub proxy_protocol: Option<bool>,
    /// SQLite database file [default: <data-dir>/messenger.db]
    #[arg(long, env = "MESSENGER_SQLITE_PATH", global = true)]
    pub sqlite_path: Option<PathBuf>,
    /// fsync every group commit of the SQLite store [default: true]
    #[arg(long, env = "MESSENGER_SQLITE_SYNC_FULL", global = true)]
    pub sqlite_sync_full: Option<bool>,
    /// Largest frame in bytes [default: 262144]
    #[arg(long, env = "MESSENGER_MAX_FRAME_BYTES", global = true)]
    pub max_frame_bytes: Option<usize>,
    /// Largest message body in bytes [default: 65536]
    #[arg(long, env = "MESSENGER_MAX_BODY_BYTES", global = true)]
    pub max_body_bytes: Option<usize>,
    /// Most members per group [default: 5000]
    #[arg(long, env = "MESSENGER_MAX_GROUP_MEMBERS", global = true)]
    pub max_group_members: Option<usize>,
    /// Most messages per history page or conversation list [default: 200]
    #[arg(long, env = "MESSENGER_MAX_HISTORY_PAGE", global = true)]
    pub max_history_page: Option<usize>,
    /// Most concurrent client connections; 0 = as many as the open-file limit allows after headroom, and any value is lowered to that [default: 0]
    #[arg(long, env = "MESSENGER_MAX_CONNECTIONS", global = true)]
    pub max_connections: Option<usize>,
    /// Most concurrent connections per client IP [default: 256]
    #[arg(long, env = "MESSENGER_MAX_CONNECTIONS_PER_IP", global = true)]
    pub max_connections_per_ip: Option<usize>,
    /// Sustained messages per second per account, over all its connections and nodes [default: 50]
    #[arg(long, env = "MESSENGER_MESSAGES_PER_SECOND", global = true)]
    pub messages_per_second: Option<u32>,
    /// Message burst per account above the sustained rate [default: 200]
    #[arg(long, env = "MESSENGER_MESSAGE_BURST", global = true)]
    pub message_burst: Option<u32>,
    /// Sustained inbox entries per second an account's sends may create (fan-out) [default: 5000]
    #[arg(long, env = "MESSENGER_RECIPIENTS_PER_SECOND", global = true)]
    pub recipients_per_second: Option<u32>,
    /// Message-body bytes per second per account [default: 1048576]
    #[arg(long, env = "MESSENGER_SEND_BYTES_PER_SECOND", global = true)]
    pub send_bytes_per_second: Option<u32>,
    /// Message-body bytes per account at once above the sustained rate [default: 8388608]
    #[arg(long, env = "MESSENGER_SEND_BYTES_BURST", global = true)]
    pub send_bytes_burst: Option<u32>,
    /// Inbox entries an account's sends may create at once [default: 20000]
    #[arg(long, env = "MESSENGER_RECIPIENT_BURST", global = true)]
    pub recipient_burst: Option<u32>,
    /// Sustained read requests per second per account [default: 50]
    #[arg(long, env = "MESSENGER_READS_PER_SECOND", global = true)]
    pub reads_per_second: Option<u32>,
    /// Read requests per account at once above the sustained rate [default: 500]
    #[arg(long, env = "MESSENGER_READ_BURST", global = true)]
    pub read_burst: Option<u32>,
    /// LookupUser requests per account per minute [default: 60]
    #[arg(long, env = "MESSENGER_LOOKUPS_PER_MINUTE", global = true)]
    pub lookups_per_minute: Option<u32>,
    /// Groups an account may create per hour [default: 30]
    #[arg(long, env = "MESSENGER_GROUPS_CREATED_PER_HOUR", global = true)]
    pub groups_created_per_hour: Option<u32>,
    /// Group members an account may add per minute [default: 1000]
    #[arg(long, env = "MESSENGER_GROUP_MEMBERS_ADDED_PER_MINUTE", global = true)]
    pub group_members_added_per_minute: Option<u32>,
    /// Unacknowledged inbox entries past which direct messages to a user are refused [default: 500000]
    #[arg(long, env = "MESSENGER_MAX_INBOX_BACKLOG", global = true)]
    pub max_inbox_backlog: Option<u64>,
    /// Most messages one conversation stores [default: 1000000]
    #[arg(long, env = "MESSENGER_MAX_CONVERSATION_MESSAGES", global = true)]
    pub max_conversation_messages: Option<u64>,
    /// Failed logins per account per minute [default: 10]
    #[arg(long, env = "MESSENGER_LOGIN_FAILURES_PER_ACCOUNT", global = true)]
    pub login_failures_per_account: Option<u32>,
    /// Login/register attempts per IP per minute [default: 120]
    #[arg(long, env = "MESSENGER_AUTH_ATTEMPTS_PER_IP", global = true)]
    pub auth_attempts_per_ip: Option<u32>,
    /// Bytes all connections together may buffer before the slowest readers are shed [default: 536870912]
    #[arg(long, env = "MESSENGER_MAX_BUFFERED_BYTES", global = true)]
    pub max_buffered_bytes: Option<usize>,
    /// Failed logins per minute per login cookie, and wrong current passwords per minute per device [default: 5]
    #[arg(long, env = "MESSENGER_LOGIN_FAILURES_PER_COOKIE", global = true)]
    pub login_failures_per_cookie: Option<u32>,
    /// Resumes with an unknown, revoked or expired token per IP per minute [default: 120]
    #[arg(long, env = "MESSENGER_INVALID_RESUMES_PER_IP", global = true)]
    pub invalid_resumes_per_ip: Option<u32>,
    /// Sustained resumes per minute of one device [default: 12]
    #[arg(long, env = "MESSENGER_RESUMES_PER_DEVICE_PER_MINUTE", global = true)]
    pub resumes_per_device_per_minute: Option<u32>,
    /// Resume burst of one device above the sustained rate [default: 30]
    #[arg(long, env = "MESSENGER_RESUME_BURST_PER_DEVICE", global = true)]
    pub resume_burst_per_device: Option<u32>,
    /// Live deliveries queued per connection before it catches up from the store [default: 512]
    #[arg(long, env = "MESSENGER_OUTBOUND_QUEUE", global = true)]
    pub outbound_queue: Option<usize>,
    /// Seconds to finish TLS and Hello [default: 10]
    #[arg(long, env = "MESSENGER_HANDSHAKE_TIMEOUT", global = true)]
    pub handshake_timeout: Option<u64>,
    /// Seconds to authenticate after connecting [default: 30]
    #[arg(long, env = "MESSENGER_AUTH_TIMEOUT", global = true)]
    pub auth_timeout: Option<u64>,
    /// Seconds of client silence before the connection is closed [default: 120]
    #[arg(long, env = "MESSENGER_IDLE_TIMEOUT", global = true)]
    pub idle_timeout: Option<u64>,
    /// Seconds a socket may accept no bytes before it is closed [default: 60]
    #[arg(long, env = "MESSENGER_WRITE_STALL_TIMEOUT", global = true)]
    pub write_stall_timeout: Option<u64>,
    /// Seconds to drain connections on shutdown [default: 10]
    #[arg(long, env = "MESSENGER_SHUTDOWN_DRAIN", global = true)]
    pub shutdown_drain: Option<u64>,
    /// Session token lifetime in seconds; a resume renews it (written at most once per tenth of it) [default: 2592000]
    #[arg(long, env = "MESSENGER_SESSION_TTL", global = true)]
    pub session_ttl: Option<u64>,
    /// argon2id memory cost in KiB [default: 19456]
    #[arg(long, env = "MESSENGER_ARGON2_MEMORY_KIB", global = true)]
    pub argon2_memory_kib: Option<u32>,
    /// argon2id iterations [default: 2]
    #[arg(long, env = "MESSENGER_ARGON2_ITERATIONS", global = true)]
    pub argon2_iterations: Option<u32>,
    /// Concurrent password hashes; 0 = CPU cores [default: 0]
    #[arg(long, env = "MESSENGER_HASH_CONCURRENCY", global = true)]
    pub hash_concurrency: Option<usize>,
    /// Password checks that may wait for a hashing thread; more are refused UNAVAILABLE at once [default: 32]
    #[arg(long, env = "MESSENGER_HASH_QUEUE", global = true)]
    pub hash_queue: Option<usize>,
    /// Reserved queue for known devices' password checks, served first [default: 8]
    #[arg(long, env = "MESSENGER_HASH_QUEUE_RESERVED", global = true)]
    pub hash_queue_reserved: Option<usize>,
}

impl Cli {
    /// Builds the layered configuration: defaults, then the file, then env and flags.
    pub fn load(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
                toml::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("parsing {}: {e}", path.display()))?
            }
            None => Config::default(),
        };
        self.overrides.apply(&mut config);
        config.validate().map_err(anyhow::Error::msg)?;
        Ok(config)
    }
}

impl Overrides {
    pub fn apply(&self, c: &mut Config) {
        fn set<T: Clone>(dst: &mut T, src: &Option<T>) {
            if let Some(v) = src {
                *dst = v.clone();
            }
        }
        set(&mut c.listen, &self.listen);
        set(&mut c.admin_listen, &self.admin_listen);
        set(&mut c.admin.max_connections, &self.admin_max_connections);
        set(&mut c.admin.idle_timeout_secs, &self.admin_idle_timeout);
        set(
            &mut c.admin.request_timeout_secs,
            &self.admin_request_timeout,
        );
        set(&mut c.data_dir, &self.data_dir);
        set(&mut c.log_format, &self.log_format);
        if self.tls_cert.is_some() {
            c.tls.cert = self.tls_cert.clone();
        }
        if self.tls_key.is_some() {
            c.tls.key = self.tls_key.clone();
        }
        if self.sqlite_path.is_some() {
            c.store.sqlite_path = self.sqlite_path.clone();
        }
        set(&mut c.store.sqlite_sync_full, &self.sqlite_sync_full);
        set(&mut c.store.backend, &self.store_backend);
        if self.postgres_url.is_some() {
            c.store.postgres_url = self.postgres_url.clone();
        }
        set(&mut c.store.postgres_pool_size, &self.postgres_pool_size);
        set(&mut c.store.postgres_timeout_secs, &self.postgres_timeout);
        set(&mut c.store.migrate_on_start, &self.migrate_on_start);
        if self.redis_url.is_some() {
            c.cluster.redis_url = self.redis_url.clone();
        }
        if self.node_id.is_some() {
            c.cluster.node_id = self.node_id.clone();
        }
        set(&mut c.proxy_protocol, &self.proxy_protocol);
        set(&mut c.web.enabled, &self.web_enabled);
        set(&mut c.web.allowed_origins, &self.web_allowed_origins);
        let l = &mut c.limits;
        set(&mut l.max_frame_bytes, &self.max_frame_bytes);
        set(&mut l.max_body_bytes, &self.max_body_bytes);
        set(&mut l.max_group_members, &self.max_group_members);
        set(&mut l.max_history_page, &self.max_history_page);
        set(&mut l.max_connections, &self.max_connections);
        set(&mut l.max_connections_per_ip, &self.max_connections_per_ip);
        set(&mut l.messages_per_second, &self.messages_per_second);
        set(&mut l.message_burst, &self.message_burst);
        set(&mut l.recipients_per_second, &self.recipients_per_second);
        set(&mut l.send_bytes_per_second, &self.send_bytes_per_second);
        set(&mut l.send_bytes_burst, &self.send_bytes_burst);
        set(&mut l.recipient_burst, &self.recipient_burst);
        set(&mut l.reads_per_second, &self.reads_per_second);
        set(&mut l.read_burst, &self.read_burst);
        set(&mut l.lookups_per_minute, &self.lookups_per_minute);
        set(
            &mut l.groups_created_per_hour,
            &self.groups_created_per_hour,
        );
        set(
            &mut l.group_members_added_per_minute,
            &self.group_members_added_per_minute,
        );
        set(&mut l.max_inbox_backlog, &self.max_inbox_backlog);
        set(
            &mut l.max_conversation_messages,
            &self.max_conversation_messages,
        );
        set(
            &mut l.login_failures_per_account,
            &self.login_failures_per_account,
        );
        set(&mut l.auth_attempts_per_ip, &self.auth_attempts_per_ip);
        set(
            &mut l.login_failures_per_cookie,
            &self.login_failures_per_cookie,
        );
        set(&mut l.invalid_resumes_per_ip, &self.invalid_resumes_per_ip);
        set(
            &mut l.resumes_per_device_per_minute,
            &self.resumes_per_device_per_minute,
        );
        set(
            &mut l.resume_burst_per_device,
            &self.resume_burst_per_device,
        );
        set(&mut l.outbound_queue, &self.outbound_queue);
        set(&mut c.memory.max_buffered_bytes, &self.max_buffered_bytes);
        let t = &mut c.timeouts;
        set(&mut t.handshake_secs, &self.handshake_timeout);
        set(&mut t.auth_secs, &self.auth_timeout);
        set(&mut t.idle_secs, &self.idle_timeout);
        set(&mut t.write_stall_secs, &self.write_stall_timeout);
        set(&mut t.shutdown_drain_secs, &self.shutdown_drain);
        set(&mut c.sessions.ttl_secs, &self.session_ttl);
        let p = &mut c.passwords;
        set(&mut p.argon2_memory_kib, &self.argon2_memory_kib);
        set(&mut p.argon2_iterations, &self.argon2_iterations);
        set(&mut p.hash_concurrency, &self.hash_concurrency);
        set(&mut p.hash_queue, &self.hash_queue);
        set(&mut p.hash_queue_reserved, &self.hash_queue_reserved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_are_overridden_by_flags() {
        let file: Config = toml::from_str(
            "listen = \"0.0.0.0:9000\"\n[limits]\nmax_body_bytes = 1000\nmax_frame_bytes = 9000\n",
        )
        .expect("parse");
        assert_eq!(file.limits.max_body_bytes, 1000);
        assert_eq!(
            file.limits.max_history_page, 200,
            "unset keys keep defaults"
        );
        let mut c = file;
        let o = Overrides {
            listen: Some("127.0.0.1:1".parse().expect("addr")),
            ..Overrides::default()
        };
        o.apply(&mut c);
        assert_eq!(c.listen.port(), 1);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn unknown_keys_and_bad_relations_are_refused() {
        assert!(toml::from_str::<Config>("listne = \"x\"").is_err());
        let mut c = Config::default();
        c.limits.max_frame_bytes = c.limits.max_body_bytes;
        assert!(c.validate().is_err());
    }

    #[test]
    fn the_admin_port_is_loopback_and_capped_by_default() {
        let c = Config::default();
        assert!(c.admin_listen.ip().is_loopback());
        assert!(c.admin.max_connections > 0);
        assert!(c.validate().is_ok());
        let mut uncapped = c;
        uncapped.admin.max_connections = 0;
        assert!(uncapped.validate().is_err());
    }

    #[test]
    fn the_shipped_benchmark_configuration_is_valid() {
        let c: Config = toml::from_str(include_str!("../../loadtest/bench.toml")).expect("parse");
        assert!(c.validate().is_ok());
        assert!(c.limits.messages_per_second > Limits::default().messages_per_second);
    }
}
