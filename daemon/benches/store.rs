//! Durable append throughput of the embedded store (`synchronous = FULL`: every group commit is
//! fsynced before its appends are answered).
//!
//! Group commit only pays off when appends arrive concurrently, so each measurement spreads its
//! iterations over many tasks on a multi-thread runtime and times the whole burst; one
//! iteration is one append, reported as elements per second. The single-task case is the
//! baseline: one fsync per append.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use messenger_daemon::model::{NewMessage, Recipient, UserId};
use messenger_daemon::store::sqlite::{SqliteOptions, SqliteStore};
use messenger_daemon::store::{NewAccount, Store};
use tempfile::TempDir;
use tokio::runtime::Runtime;

/// A typical short chat message.
const BODY: &[u8] = &[b'x'; 128];
const GROUP_SIZE: usize = 100;

struct Fixture {
    store: Arc<dyn Store>,
    users: Vec<UserId>,
    /// Keeps `client_msg_id`s unique across every iteration of every sample.
    next_id: Arc<AtomicU64>,
    // Last, so the store is dropped (and its writer stopped) before the directory goes.
    _dir: TempDir,
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn fixture(rt: &Runtime, users: usize) -> Fixture {
    // Under target/, on the same disk as the build, not a tmpfs that would make fsync free.
    let dir = tempfile::Builder::new()
        .prefix("store-bench")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir");
    let options = SqliteOptions {
        synchronous_full: true,
        ..SqliteOptions::default()
    };
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.path().join("bench.db"), options).expect("open store"));
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
        _dir: dir,
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
    rt.block_on(async {
        let start = Instant::now();
        let mut running = tokio::task::JoinSet::new();
        for task in 0..tasks {
            let count = iters / tasks + u64::from(task < iters % tasks);
            let (sender, to) = route(task);
            let store = Arc::clone(&fixture.store);
            let next_id = Arc::clone(&fixture.next_id);
            running.spawn(async move {
                for _ in 0..count {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    store
                        .append_message(NewMessage {
                            sender,
                            to,
                            client_msg_id: format!("b{id}"),
                            body: Bytes::from_static(BODY),
                            content_type: "text/plain".into(),
                            server_time: 0,
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

fn durable_append(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("durable_append");
    group.throughput(Throughput::Elements(1));
    // Every sample grows the database; a few seconds of samples keep it to a sane size.
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));

    let direct = fixture(&rt, 2);
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

    let members = fixture(&rt, GROUP_SIZE);
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
    group.finish();
}

criterion_group!(benches, durable_append);
criterion_main!(benches);
