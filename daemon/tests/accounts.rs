//! Accounts through the real protocol: register, login, resume, profile, password, logout,
//! delete, and every way each can fail.

mod common;

use common::{PASSWORD, TestServer, code};
use messenger_protocol::ErrorCode;
use messenger_protocol::client::{Client, Recipient};

#[tokio::test]
async fn register_login_and_resume_keep_one_identity() {
    let ts = TestServer::start().await;
    let (alice, user) = ts.user("alice").await;
    let auth = alice.session().expect("session").clone();
    assert_eq!(auth.user.as_ref().map(|u| u.user_id), Some(user.user_id));
    assert_eq!(user.display_name, "alice display");
    assert_eq!(auth.session_token.len(), 32);

    let mut again = ts.client().await;
    let resumed = again.resume(&auth.session_token).await.expect("resume");
    assert_eq!(
        resumed.device_id, auth.device_id,
        "resume continues the same device"
    );
    assert_eq!(resumed.user.map(|u| u.username), Some("alice".to_string()));
    ts.stop().await;
}

#[tokio::test]
async fn usernames_are_unique_case_insensitively_and_validated() {
    let ts = TestServer::start().await;
    let _ = ts.user("Alice").await;
    let c = ts.client().await;
    let err = c
        .conn()
        .register("aLICE", PASSWORD, "")
        .await
        .expect_err("duplicate");
    assert_eq!(code(&err), Some(ErrorCode::AlreadyExists));
    for bad in ["al", "-alice", "al ice", "ålice", &"x".repeat(33)] {
        let err = c.conn().register(bad, PASSWORD, "").await.expect_err(bad);
        assert_eq!(code(&err), Some(ErrorCode::InvalidArgument), "{bad:?}");
    }
    let err = c
        .conn()
        .register("bob", "short", "")
        .await
        .expect_err("short password");
    assert_eq!(code(&err), Some(ErrorCode::InvalidArgument));
    let err = c
        .conn()
        .register("bob", PASSWORD, "bad\u{7}name")
        .await
        .expect_err("control char in display name");
    assert_eq!(code(&err), Some(ErrorCode::InvalidArgument));
    // The failures created nothing: bob is still free.
    c.conn()
        .register("bob", PASSWORD, "")
        .await
        .expect("bob is free");
    ts.stop().await;
}

#[tokio::test]
async fn wrong_password_and_unknown_user_are_the_same_refusal() {
    let ts = TestServer::start().await;
    let _ = ts.user("alice").await;
    let mut c = ts.client().await;
    let wrong = c
        .login("alice", "not the password", "d")
        .await
        .expect_err("wrong");
    let unknown = c.login("nobody", PASSWORD, "d").await.expect_err("unknown");
    assert_eq!(code(&wrong), Some(ErrorCode::Unauthenticated));
    assert_eq!(code(&unknown), Some(ErrorCode::Unauthenticated));
    assert_eq!(wrong.to_string(), unknown.to_string());
    // Unauthenticated connections can do nothing else.
    let err = c.conn().list_groups().await.expect_err("not logged in");
    assert_eq!(code(&err), Some(ErrorCode::Unauthenticated));
    ts.stop().await;
}

#[tokio::test]
async fn repeated_failed_logins_are_rate_limited_per_account() {
    let ts = TestServer::start_with(|c| c.limits.login_failures_per_account = 3).await;
    let _ = ts.user("alice").await;
    let mut c = ts.client().await;
    for _ in 0..3 {
        let e = c
            .login("alice", "wrong password", "d")
            .await
            .expect_err("wrong");
        assert_eq!(code(&e), Some(ErrorCode::Unauthenticated));
    }
    let e = c.login("alice", PASSWORD, "d").await.expect_err("locked");
    assert_eq!(code(&e), Some(ErrorCode::RateLimited));
    match e {
        messenger_protocol::client::ClientError::Wire(w) => assert!(w.retry_after_ms > 0),
        other => panic!("{other}"),
    }
    // Another account is not affected.
    let _ = ts.user("bob").await;
    ts.stop().await;
}

#[tokio::test]
async fn display_name_changes_show_on_new_messages() {
    let ts = TestServer::start().await;
    let (alice, _) = ts.user("alice").await;
    let (mut bob, bob_user) = ts.user("bob").await;
    alice
        .conn()
        .update_profile("Alice Liddell")
        .await
        .expect("update");
    alice
        .conn()
        .send_text(Recipient::User(bob_user.user_id), "hello")
        .await
        .expect("send");
    let d = common::deliveries(&mut bob, 1).await;
    let sender = d[0]
        .message
        .as_ref()
        .and_then(|m| m.sender.clone())
        .expect("sender");
    assert_eq!(sender.display_name, "Alice Liddell");
    let looked_up = bob
        .conn()
        .lookup_user_by_name("ALICE")
        .await
        .expect("lookup");
    assert_eq!(looked_up.display_name, "Alice Liddell");
    let err = alice.conn().update_profile("   ").await.expect_err("empty");
    assert_eq!(code(&err), Some(ErrorCode::InvalidArgument));
    ts.stop().await;
}

#[tokio::test]
async fn changing_the_password_revokes_other_sessions_only() {
    let ts = TestServer::start().await;
    let (alice, _) = ts.user("alice").await;
    let mut laptop = ts.device("alice", "laptop").await;
    let laptop_token = laptop.session().expect("session").session_token.clone();

    let err = alice
        .conn()
        .change_password("wrong current", "a new password")
        .await
        .expect_err("wrong current");
    assert_eq!(code(&err), Some(ErrorCode::PermissionDenied));

    alice
        .conn()
        .change_password(PASSWORD, "a new password")
        .await
        .expect("change");
    // The other device is told and disconnected.
    let e = laptop
        .next_delivery(common::WAIT)
        .await
        .expect_err("kicked");
    assert!(e.to_string().contains("revoked"), "{e}");
    // Its token no longer resumes; the changing session still works.
    let mut c = ts.client().await;
    let e = c.resume(&laptop_token).await.expect_err("revoked token");
    assert_eq!(code(&e), Some(ErrorCode::Unauthenticated));
    alice
        .conn()
        .list_groups()
        .await
        .expect("current session still valid");
    // Old password fails, new one works.
    let mut c = ts.client().await;
    assert!(c.login("alice", PASSWORD, "x").await.is_err());
    c.login("alice", "a new password", "x")
        .await
        .expect("new password");
    ts.stop().await;
}

#[tokio::test]
async fn logout_invalidates_the_token() {
    let ts = TestServer::start().await;
    let (mut alice, _) = ts.user("alice").await;
    let token = alice.session().expect("session").session_token.clone();
    alice.logout().await.expect("logout");
    let err = alice.conn().list_groups().await.expect_err("logged out");
    assert_eq!(code(&err), Some(ErrorCode::Unauthenticated));
    let mut c = ts.client().await;
    let err = c.resume(&token).await.expect_err("token revoked");
    assert_eq!(code(&err), Some(ErrorCode::Unauthenticated));
    let err = c.resume(b"garbage token").await.expect_err("garbage");
    assert_eq!(code(&err), Some(ErrorCode::Unauthenticated));
    ts.stop().await;
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let ts = TestServer::start_with(|c| c.sessions.ttl_secs = 1).await;
    let (alice, _) = ts.user("alice").await;
    let token = alice.session().expect("session").session_token.clone();
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    let mut c = ts.client().await;
    let err = c.resume(&token).await.expect_err("expired");
    assert_eq!(code(&err), Some(ErrorCode::Unauthenticated));
    assert!(err.to_string().contains("expired"), "{err}");
    ts.stop().await;
}

#[tokio::test]
async fn deleting_an_account_needs_the_password_and_frees_the_username() {
    let ts = TestServer::start().await;
    let (alice, alice_user) = ts.open_user("alice").await;
    let (bob, _) = ts.user("bob").await;
    let mut phone = ts.device("alice", "phone").await;
    let group = bob
        .conn()
        .create_group("club", &[alice_user.user_id])
        .await
        .expect("group");
    alice
        .conn()
        .send_text(
            Recipient::User(bob.user().expect("bob").user_id),
            "before deletion",
        )
        .await
        .expect("send");

    let err = alice
        .conn()
        .delete_account("wrong")
        .await
        .expect_err("wrong password");
    assert_eq!(code(&err), Some(ErrorCode::PermissionDenied));
    alice.conn().delete_account(PASSWORD).await.expect("delete");

    // Every session of the account is gone: the phone is told and disconnected (after the
    // copy of alice's own message it was already sent).
    let mut own_copies = 0;
    while phone.next_delivery(common::WAIT).await.is_ok() {
        own_copies += 1;
        assert!(own_copies <= 1, "only the one message alice sent");
    }
    let mut c = ts.client().await;
    let err = c.login("alice", PASSWORD, "d").await.expect_err("deleted");
    assert_eq!(code(&err), Some(ErrorCode::Unauthenticated));
    // Nobody can message the deleted user; the group lost the member.
    let err = bob
        .conn()
        .send_text(Recipient::User(alice_user.user_id), "hello?")
        .await
        .expect_err("deleted user");
    assert_eq!(code(&err), Some(ErrorCode::NotFound));
    let g = bob.conn().get_group(group.group_id).await.expect("group");
    assert_eq!(g.members.len(), 1);
    // Bob's history still shows what alice sent.
    let page = bob
        .conn()
        .history(Recipient::User(alice_user.user_id), 0, 10)
        .await
        .expect("history");
    assert_eq!(page.messages.len(), 1);
    // The name is free again, for a new account with a new id.
    let fresh = Client::connect(ts.options()).await.expect("connect");
    let new_alice = fresh
        .register("alice", PASSWORD, "")
        .await
        .expect("re-register");
    assert_ne!(new_alice.user_id, alice_user.user_id);
    ts.stop().await;
}

#[tokio::test]
async fn a_second_login_on_an_authenticated_connection_is_refused() {
    let ts = TestServer::start().await;
    let (mut alice, _) = ts.user("alice").await;
    let err = alice
        .login("alice", PASSWORD, "again")
        .await
        .expect_err("second login");
    assert_eq!(code(&err), Some(ErrorCode::InvalidArgument));
    alice.logout().await.expect("logout");
    alice
        .login("alice", PASSWORD, "again")
        .await
        .expect("login after logout");
    ts.stop().await;
}

#[tokio::test]
async fn resuming_a_device_on_a_new_connection_closes_the_older_one() {
    let ts = TestServer::start().await;
    let (mut old, _) = ts.user("alice").await;
    let token = old.session().expect("session").session_token.clone();
    let mut new = ts.client().await;
    new.resume(&token).await.expect("resume");
    let err = old.next_delivery(common::WAIT).await.expect_err("replaced");
    assert!(err.to_string().contains("newer connection"), "{err}");
    new.conn()
        .list_groups()
        .await
        .expect("the newer connection serves");
    ts.stop().await;
}
