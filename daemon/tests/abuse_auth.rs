//! Abuse of sign-in: lockouts an attacker tries to aim at someone else, floods of invalid and
//! valid Resumes, and a full password-hash queue. Each test reproduces an audit finding at
//! small scale, bounded by counts (never by time), and asserts the limit that now holds.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{PASSWORD, TestServer, WAIT, code};
use messenger_protocol::client::{Client, ClientError};
use messenger_protocol::{ErrorCode, WireError};

/// The wire error of a refused request.
fn wire(e: ClientError) -> WireError {
    match e {
        ClientError::Wire(w) => w,
        other => panic!("expected an error frame, got {other}"),
    }
}

/// `n` wrong-password logins of `username` from `client`; returns how many were refused as
/// rate limited (the rest were plain wrong-password answers).
async fn wrong_passwords(client: &mut Client, username: &str, n: usize) -> usize {
    let mut limited = 0;
    for _ in 0..n {
        let e = client
            .login(username, "not the password", "attacker")
            .await
            .expect_err("a wrong password never logs in");
        match code(&e) {
            Some(ErrorCode::RateLimited) => limited += 1,
            Some(ErrorCode::Unauthenticated) => {}
            other => panic!("unexpected answer {other:?}: {e}"),
        }
    }
    limited
}

/// A fresh client that presents `cookie` for `username`.
async fn client_with_cookie(ts: &TestServer, username: &str, cookie: Bytes) -> Client {
    let mut c = ts.client().await;
    c.set_login_cookie(username, cookie);
    c
}

/// F6: 100 wrong passwords from an attacker lock the account's unknown devices, not the
/// owner's device that signed in before, with the right password.
#[tokio::test]
async fn the_owners_known_device_logs_in_at_once_after_an_attacker_tried_100_passwords() {
    let ts = TestServer::start().await;
    let (owner, _) = ts.user("alice").await;
    let cookie = owner
        .login_cookie("alice")
        .cloned()
        .expect("a successful login hands out a login cookie");
    assert_eq!(cookie.len(), 32);
    owner.close().await;

    let mut attacker = ts.client().await;
    let limited = wrong_passwords(&mut attacker, "alice", 100).await;
    let budget = ts.config.limits.login_failures_per_account as usize;
    assert_eq!(limited, 100 - budget, "the untrusted budget ran out");

    let mut phone = client_with_cookie(&ts, "ALICE", cookie.clone()).await;
    let auth = phone
        .login("alice", PASSWORD, "phone")
        .await
        .expect("the known device is not locked out");
    assert_eq!(auth.login_cookie, cookie, "a valid cookie is kept");
    ts.stop().await;
}

/// F6: while the account's untrusted budget is spent, a device without a cookie is refused
/// with a retry time, and the refusal reads the same for a username that does not exist.
#[tokio::test]
async fn an_unknown_device_is_told_when_to_retry_without_learning_whether_the_user_exists() {
    let ts = TestServer::start_with(|c| c.limits.login_failures_per_account = 3).await;
    let _ = ts.user("alice").await;
    let mut attacker = ts.client().await;
    for name in ["alice", "nobody"] {
        assert_eq!(wrong_passwords(&mut attacker, name, 4).await, 1);
    }
    let mut laptop = ts.client().await;
    let real = wire(
        laptop
            .login("alice", PASSWORD, "laptop")
            .await
            .expect_err("the untrusted budget is spent"),
    );
    let missing = wire(
        laptop
            .login("nobody", PASSWORD, "laptop")
            .await
            .expect_err("no such user"),
    );
    for e in [&real, &missing] {
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert!(e.retry_after_ms > 0 && e.retry_after_ms <= 60_000, "{e:?}");
        assert!(e.message.contains("devices it does not know"), "{e:?}");
    }
    assert_eq!(real.message, missing.message);
    ts.stop().await;
}

/// F6: a cookie is bound to the account that issued it; presented for another account it is
/// no cookie at all.
#[tokio::test]
async fn a_cookie_of_one_account_does_not_unlock_another() {
    let ts = TestServer::start_with(|c| c.limits.login_failures_per_account = 2).await;
    let (alice, _) = ts.user("alice").await;
    let _ = ts.user("bob").await;
    let alices_cookie = alice.login_cookie("alice").cloned().expect("cookie");
    let mut attacker = ts.client().await;
    wrong_passwords(&mut attacker, "bob", 2).await;

    let mut c = client_with_cookie(&ts, "bob", alices_cookie).await;
    let e = wire(
        c.login("bob", PASSWORD, "d")
            .await
            .expect_err("alice's cookie means nothing for bob"),
    );
    assert_eq!(e.code, ErrorCode::RateLimited);
    assert!(e.retry_after_ms > 0);
    ts.stop().await;
}

/// F6: made-up cookies (random bytes of the right length, or any other length) are treated
/// as none: they spend the account's untrusted budget and do not get past it.
#[tokio::test]
async fn a_forged_cookie_is_treated_as_none() {
    let ts = TestServer::start_with(|c| c.limits.login_failures_per_account = 2).await;
    let _ = ts.user("alice").await;
    let forged = Bytes::from(rand::random::<[u8; 32]>().to_vec());
    let mut attacker = client_with_cookie(&ts, "alice", forged.clone()).await;
    assert_eq!(
        wrong_passwords(&mut attacker, "alice", 3).await,
        1,
        "a forged cookie gets no budget of its own"
    );
    for cookie in [forged, Bytes::from_static(b"short")] {
        let mut c = client_with_cookie(&ts, "alice", cookie).await;
        let e = c
            .login("alice", PASSWORD, "d")
            .await
            .expect_err("still the untrusted budget");
        assert_eq!(code(&e), Some(ErrorCode::RateLimited));
    }
    ts.stop().await;
}

/// F6: a known device's wrong passwords count against its own cookie, so a stolen device
/// cannot guess without limit, and leave the account's untrusted budget alone.
#[tokio::test]
async fn a_known_devices_wrong_passwords_spend_only_its_own_budget() {
    let ts = TestServer::start_with(|c| {
        c.limits.login_failures_per_cookie = 3;
        c.limits.login_failures_per_account = 3;
    })
    .await;
    let (owner, _) = ts.user("alice").await;
    let cookie = owner.login_cookie("alice").cloned().expect("cookie");
    let mut device = client_with_cookie(&ts, "alice", cookie.clone()).await;
    assert_eq!(wrong_passwords(&mut device, "alice", 4).await, 1);
    let e = wire(
        device
            .login("alice", PASSWORD, "d")
            .await
            .expect_err("this cookie's budget is spent"),
    );
    assert_eq!(e.code, ErrorCode::RateLimited);
    assert!(e.retry_after_ms > 0);
    assert!(e.message.contains("this device"), "{e:?}");

    // Nobody else was slowed down by it: a device without a cookie still gets in.
    let mut other = ts.client().await;
    let auth = other
        .login("alice", PASSWORD, "other")
        .await
        .expect("the untrusted budget is untouched");
    assert_ne!(
        auth.login_cookie, cookie,
        "a new device gets a cookie of its own"
    );
    ts.stop().await;
}

/// F6: a signed-in owner can change the password while an attacker keeps the account's
/// untrusted budget spent (the check is limited per device, not per account).
#[tokio::test]
async fn a_signed_in_owner_can_change_the_password_during_an_attack() {
    let ts = TestServer::start_with(|c| c.limits.login_failures_per_account = 2).await;
    let (owner, _) = ts.user("alice").await;
    let mut attacker = ts.client().await;
    wrong_passwords(&mut attacker, "alice", 5).await;
    owner
        .conn()
        .change_password(PASSWORD, "a brand new password")
        .await
        .expect("not locked by someone else's failures");
    ts.stop().await;
}

/// F1/F9: a flood of Resumes with made-up tokens from one address is refused with a retry
/// time once over the per-address limit, before the store is asked; another address is not
/// affected.
#[tokio::test]
async fn an_invalid_resume_flood_from_one_address_is_rate_limited() {
    let ts = TestServer::start_with(|c| c.limits.invalid_resumes_per_ip = 20).await;
    let (owner, _) = ts.user("alice").await;
    let token = owner.session().expect("session").session_token.clone();
    owner.close().await;

    let mut attacker = ts.client().await;
    let mut limited = 0;
    for _ in 0..50 {
        let fake = rand::random::<[u8; 32]>();
        let e = attacker.resume(&fake).await.expect_err("made-up token");
        match code(&e) {
            Some(ErrorCode::Unauthenticated) => {}
            Some(ErrorCode::RateLimited) => {
                let w = wire(e);
                assert!(w.retry_after_ms > 0 && w.retry_after_ms <= 60_000);
                limited += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(limited, 30);
    // From another loopback address the owner's token still works.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.2:0".parse().expect("addr"))
        .expect("bind 127.0.0.2");
    let tcp = socket
        .connect(ts.server().addr)
        .await
        .expect("connect from 127.0.0.2");
    let mut elsewhere = Client::connect_stream(ts.options(), tcp)
        .await
        .expect("hello");
    elsewhere
        .resume(&token)
        .await
        .expect("another address is not limited");
    ts.stop().await;
}

/// F1: a storm of valid Resumes of one device (each replacing the last connection) is cut
/// off after the device's burst, with a retry time; the user's other devices are not.
#[tokio::test]
async fn a_resume_storm_of_one_device_is_limited() {
    let ts = TestServer::start_with(|c| {
        c.limits.resumes_per_device_per_minute = 6;
        c.limits.resume_burst_per_device = 5;
    })
    .await;
    let (owner, _) = ts.user("alice").await;
    let token = owner.session().expect("session").session_token.clone();
    let laptop = ts.device("alice", "laptop").await;
    let laptop_token = laptop.session().expect("session").session_token.clone();
    let mut refused = None;
    for i in 0..20 {
        let mut c = ts.client().await;
        match c.resume(&token).await {
            Ok(_) => assert!(i < 5, "resume {i} passed the burst"),
            Err(e) => {
                refused = Some((i, wire(e)));
                break;
            }
        }
    }
    let (at, e) = refused.expect("the storm was cut off");
    assert_eq!(at, 5, "the burst is exactly 5");
    assert_eq!(e.code, ErrorCode::RateLimited);
    // One token every 10 s at 6 a minute.
    assert!(e.retry_after_ms > 0 && e.retry_after_ms <= 10_000, "{e:?}");
    let mut c = ts.client().await;
    c.resume(&laptop_token)
        .await
        .expect("another device of the same user is not limited");
    ts.stop().await;
}

/// Waits (bounded by WAIT, on progress, not time) until `n` password checks are queued.
async fn until_queued(ts: &TestServer, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while ts.server().shared.passwords.waiting() != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} checks queued, expected {n}",
            ts.server().shared.passwords.waiting()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// F9: with the password-hash queue full, a new login or registration is refused at once
/// (`UNAVAILABLE` with a retry hint) instead of queueing behind the flood, while the owner's
/// known device still gets into the reserved queue and in.
#[tokio::test]
async fn a_full_hash_queue_refuses_at_once_and_known_devices_still_get_in() {
    let ts = TestServer::start_with(|c| {
        c.passwords.hash_concurrency = 1;
        c.passwords.hash_queue = 1;
        c.passwords.hash_queue_reserved = 1;
    })
    .await;
    let (owner, _) = ts.user("alice").await;
    let cookie = owner.login_cookie("alice").cloned().expect("cookie");
    let _ = ts.user("bob").await;

    // The hashing thread takes nothing while held: the queue fills exactly.
    let hold = ts.server().shared.passwords.hold();
    let mut first = ts.client().await;
    let queued = tokio::spawn(async move { first.login("bob", PASSWORD, "queued").await });
    until_queued(&ts, 1).await;

    let mut flood = ts.client().await;
    let e = wire(
        flood
            .login("bob", PASSWORD, "refused")
            .await
            .expect_err("the queue is full"),
    );
    assert_eq!(e.code, ErrorCode::Unavailable);
    assert!(e.retry_after_ms > 0, "{e:?}");
    assert!(e.message.contains("busy"), "{e:?}");
    let e = flood
        .register("carol", PASSWORD, "Carol")
        .await
        .expect_err("registration needs a hash too");
    assert_eq!(code(&e), Some(ErrorCode::Unavailable));
    // Both refusals arrived while the queue was still held: neither waited in it.
    assert_eq!(ts.server().shared.passwords.waiting(), 1);

    let mut phone = client_with_cookie(&ts, "alice", cookie).await;
    let owner_login = tokio::spawn(async move { phone.login("alice", PASSWORD, "phone").await });
    until_queued(&ts, 2).await;
    drop(hold);
    owner_login
        .await
        .expect("task")
        .expect("the owner's known device gets in");
    queued
        .await
        .expect("task")
        .expect("the queued login is served");
    ts.stop().await;
}
