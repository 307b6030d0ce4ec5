//! Durable append throughput of the embedded store (`synchronous = FULL`: every group commit is
//! fsynced before its appends are answered).
//!
//! Group commit only pays off when appends arrive concurrently, so each measurement spreads its
//! iterations over many tasks on a multi-thread runtime and times the whole burst; one
//! iteration is one append, reported as elements per second. The single-task case is the
//! baseline: one fsync per append.
//!
//! The two-user cases keep the whole database in a handful of hot pages, which hides what a
//! real server pays: `direct_2000_users` appends direct messages between random pairs of 2000
//! users on a store that already holds 100k messages, so every batch touches inbox and index
//! pages scattered over the file, as under the load-test harness.
//!
//! `conversation_list` reads the first page of the conversation list of a user whose inbox
//! holds 60k entries (audit F9 measured 117 ms there when the list was computed from the
//! inbox): three busy groups and 200 direct chats.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use messenger_daemon::model::{
    AppendQuotas, ConversationQuery, GroupAdds, GroupId, NewMessage, Recipient, UserId,
};
use messenger_daemon::store::sqlite::{SqliteOptions, SqliteStore};
use messenger_daemon::store::{NewAccount, Store};
use tempfile::TempDir;
use tokio::runtime::Runtime;

/// A typical short chat message.
const BODY: &[u8] = &[b'x'; 128];
const GROUP_SIZE: usize = 100;
/// The scattered case: its users, its concurrent senders, what the store holds before the
/// first measured append, and its body size.
const MANY_USERS: usize = 2000;
const MANY_TASKS: u64 = 256;
const PREFILLED: u64 = 100_000;
const SHORT_BODY: &[u8] = &[b'y'; 100];

struct Fixture {
    store: Arc<dyn Store>,
    users: Vec<UserId>,
    /// Keeps `client_msg_id`s unique across every iteration of every sample.
    next_id: Arc<AtomicU64>,
    // Last, so the store is dropped (and its writer stopped) before the directory goes.
    dir: TempDir,
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn open(dir: &TempDir, synchronous_full: bool) -> Arc<dyn Store> {
    let options = SqliteOptions {
        synchronous_full,
        ..SqliteOptions::default()
    };
    Arc::new(SqliteStore::open(&dir.path().join("bench.db"), options).expect("open store"))
}

fn fixture(rt: &Runtime, users: usize, synchronous_full: bool) -> Fixture {
    // Under target/, on the same disk as the build, not a tmpfs that would make fsync free.
    let dir = tempfile::Builder::new()
        .prefix("store-bench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir");
    let store = open(&dir, synchronous_full);
    let users = rt.block_on(async {
        let mut ids = Vec::with_capacity(users);
        for i in 0..users {
            let name = format!("user{i}");
            let user = store
                .create_account(NewAccount {
                    username: name.clone(),
                    username_key: name.clone(),
                    display_name: name,
                    password_hash: "x".into(),
                    // The bench builds its groups directly.
                    group_adds: GroupAdds::Anyone,
                })
                .await
                .expect("create account");
            ids.push(user.id);
        }
        ids
    });
    Fixture {
        store,
        users,
        next_id: Arc::new(AtomicU64::new(0)),
        dir,
    }
}

/// Runs `iters` appends spread over `tasks` concurrent tasks; `route(task)` picks each task's
/// sender and recipient. Returns the wall time of the whole burst.
fn burst(
    rt: &Runtime,
    fixture: &Fixture,
    tasks: u64,
    iters: u64,
    route: impl Fn(u64) -> (UserId, Recipient),
) -> Duration {
    let routes: Vec<_> = (0..tasks).map(route).collect();
    burst_with(rt, fixture, tasks, iters, BODY, move |task, _| {
        routes[usize::try_from(task).unwrap_or(0)]
    })
}

/// Like `burst`, but `route(task, n)` picks the sender and recipient of each append anew.
fn burst_with<R>(
    rt: &Runtime,
    fixture: &Fixture,
    tasks: u64,
    iters: u64,
    body: &'static [u8],
    route: R,
) -> Duration
where
    R: Fn(u64, u64) -> (UserId, Recipient) + Send + Sync + 'static,
{
    let route = Arc::new(route);
    rt.block_on(async {
        let start = Instant::now();
        let mut running = tokio::task::JoinSet::new();
        for task in 0..tasks {
            let count = iters / tasks + u64::from(task < iters % tasks);
            let store = Arc::clone(&fixture.store);
            let next_id = Arc::clone(&fixture.next_id);
            let route = Arc::clone(&route);
            running.spawn(async move {
                for _ in 0..count {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    let (sender, to) = route(task, id);
                    store
                        .append_message(NewMessage {
                            sender,
                            to,
                            client_msg_id: format!("b{id}"),
                            body: Bytes::from_static(body),
                            content_type: "text/plain".into(),
                            server_time: 0,
                            quotas: AppendQuotas::UNLIMITED,
                        })
                        .await
                        .expect("append");
                }
            });
        }
        while let Some(done) = running.join_next().await {
            done.expect("append task");
        }
        start.elapsed()
    })
}

/// A well-mixed 64-bit hash (splitmix64): deterministic "random" pairs without a generator
/// shared between tasks.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A random pair of two different users for the `n`th append.
fn random_pair(users: &[UserId], n: u64) -> (UserId, Recipient) {
    let count = u64::try_from(users.len()).unwrap_or(u64::MAX);
    let h = mix(n);
    let a = h % count;
    // Any other user: offset by 1..count.
    let b = (a + 1 + (h >> 32) % (count - 1)) % count;
    let pick = |i: u64| users[usize::try_from(i).unwrap_or(0)];
    (pick(a), Recipient::User(pick(b)))
}

/// 2000 users and 100k messages between random pairs, written with `synchronous = NORMAL`
/// (set-up only), then reopened with `synchronous = FULL` for the measurement.
fn scattered_fixture(rt: &Runtime) -> Fixture {
    let mut fixture = fixture(rt, MANY_USERS, false);
    let users: Arc<[UserId]> = fixture.users.clone().into();
    burst_with(
        rt,
        &fixture,
        MANY_TASKS,
        PREFILLED,
        SHORT_BODY,
        move |_, n| random_pair(&users, n),
    );
    rt.block_on(fixture.store.close()).expect("close");
    fixture.store = open(&fixture.dir, true);
    fixture
}

fn durable_append(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("durable_append");
    group.throughput(Throughput::Elements(1));
    // Every sample grows the database; a few seconds of samples keep it to a sane size.
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));

    let direct = fixture(&rt, 2, true);
    for tasks in [1, 64] {
        group.bench_with_input(BenchmarkId::new("direct", tasks), &tasks, |b, &tasks| {
            b.iter_custom(|iters| {
                burst(&rt, &direct, tasks, iters, |task| {
                    let (a, b) = (direct.users[0], direct.users[1]);
                    if task % 2 == 0 {
                        (a, Recipient::User(b))
                    } else {
                        (b, Recipient::User(a))
                    }
                })
            });
        });
    }
    rt.block_on(direct.store.close()).expect("close");

    let members = fixture(&rt, GROUP_SIZE, true);
    let to = rt
        .block_on(members.store.create_group(
            members.users[0],
            "bench",
            &members.users,
            GROUP_SIZE,
            0,
        ))
        .expect("create group")
        .id;
    let tasks = 64;
    group.bench_with_input(BenchmarkId::new("group100", tasks), &tasks, |b, &tasks| {
        b.iter_custom(|iters| {
            burst(&rt, &members, tasks, iters, |task| {
                let sender = members.users[usize::try_from(task).unwrap_or(0) % GROUP_SIZE];
                (sender, Recipient::Group(to))
            })
        });
    });
    rt.block_on(members.store.close()).expect("close");

    // Scattered I/O varies more from batch to batch; a longer run steadies the estimate.
    group.measurement_time(Duration::from_secs(10));
    // Built on first use, so a filter that skips this case skips its set-up too.
    let mut scattered: Option<Fixture> = None;
    group.bench_with_input(
        BenchmarkId::new("direct_2000_users", MANY_TASKS),
        &MANY_TASKS,
        |b, &tasks| {
            let fixture = scattered.get_or_insert_with(|| scattered_fixture(&rt));
            let users: Arc<[UserId]> = fixture.users.clone().into();
            b.iter_custom(|iters| {
                let users = Arc::clone(&users);
                burst_with(&rt, fixture, tasks, iters, SHORT_BODY, move |_, n| {
                    random_pair(&users, n)
                })
            });
        },
    );
    if let Some(fixture) = scattered {
        rt.block_on(fixture.store.close()).expect("close");
    }
    group.finish();
}

/// Inbox entries of the listing user: group messages, then one direct message per peer.
const LIST_INBOX: u64 = 60_000;
const LIST_GROUPS: usize = 3;
const LIST_PEERS: usize = 200;

fn conversation_list(c: &mut Criterion) {
    let rt = runtime();
    // users[0] lists; users[1..=LIST_PEERS] each write it once; every group has users[0..3].
    let fixture = fixture(&rt, LIST_PEERS + 1, false);
    let reader = fixture.users[0];
    let groups: Vec<GroupId> = (0..LIST_GROUPS)
        .map(|g| {
            rt.block_on(fixture.store.create_group(
                fixture.users[1],
                &format!("busy{g}"),
                &fixture.users[..3],
                10,
                0,
            ))
            .expect("create group")
            .id
        })
        .collect();
    let groups: Arc<[GroupId]> = groups.into();
    let group_messages = LIST_INBOX - u64::try_from(LIST_PEERS).unwrap_or(0);
    let senders = fixture.users.clone();
    burst_with(
        &rt,
        &fixture,
        64,
        group_messages,
        SHORT_BODY,
        move |_, n| {
            let g = groups[usize::try_from(n).unwrap_or(0) % groups.len()];
            (senders[1], Recipient::Group(g))
        },
    );
    let peers = fixture.users.clone();
    burst_with(
        &rt,
        &fixture,
        16,
        u64::try_from(LIST_PEERS).unwrap_or(0),
        SHORT_BODY,
        move |_, n| {
            let peer = peers[1 + usize::try_from(n).unwrap_or(0) % LIST_PEERS];
            (peer, Recipient::User(peers[0]))
        },
    );
    let head = rt.block_on(fixture.store.inbox_head(reader)).expect("head");
    assert!(head.0 >= LIST_INBOX, "the reader's inbox holds {}", head.0);

    let mut group = c.benchmark_group("conversation_list");
    group.sample_size(50);
    group.bench_function("first_page_of_100_at_60k_inbox", |b| {
        b.iter(|| {
            let page = rt
                .block_on(fixture.store.conversation_page(
                    reader,
                    ConversationQuery {
                        snapshot: None,
                        before: None,
                        limit: 101,
                    },
                ))
                .expect("page");
            assert_eq!(page.conversations.len(), 101);
        });
    });
    group.finish();
    rt.block_on(fixture.store.close()).expect("close");
}

criterion_group!(benches, durable_append, conversation_list);
criterion_main!(benches);
