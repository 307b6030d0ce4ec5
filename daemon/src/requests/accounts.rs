//! Accounts and sessions: register, login, resume, profile, password, logout, delete.

use messenger_protocol::pb::{self, server_frame::Kind as Resp};
use messenger_protocol::{ErrorCode, WireError};

use super::login_budget::{Budget, LOGIN_COOKIES_PER_ACCOUNT};
use super::short_name;
use crate::auth::{self, Lane};
use crate::limits::AddressGroup;
use crate::metrics;
use crate::model::{GroupAdds, ProfileChange, Session as StoredSession, now_millis};
use crate::session::{After, Handled, Session, ok, rate_limited};
use crate::store::{NewAccount, NewSession, StoreError};

const DEVICE_NAME_MAX: usize = 64;

fn wrong_credentials() -> WireError {
    WireError::new(ErrorCode::Unauthenticated, "wrong username or password")
}

impl Session {
    async fn limit_auth_attempt(&self) -> Result<(), WireError> {
        self.shared
            .auth_per_ip
            .hit(&AddressGroup::of(self.peer.ip()))
            .await
            .map_err(|wait| {
                metrics::auth_refused(metrics::budget::IP);
                rate_limited(
                    "too many login or register attempts from this address",
                    wait,
                )
            })
    }

    fn session_ttl_ms(&self) -> i64 {
        i64::try_from(self.shared.config.sessions.ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    pub(crate) async fn register(&mut self, r: pb::Register) -> Handled {
        self.limit_auth_attempt().await?;
        let username_key = auth::username_key(&r.username)?;
        auth::check_new_password(&r.password, self.shared.config.passwords.min_length)?;
        let display_name = if r.display_name.trim().is_empty() {
            r.username.clone()
        } else {
            auth::display_name(&r.display_name)?
        };
        // Cheap early answer for a taken name, before spending a hash on it.
        if self
            .shared
            .store
            .account_by_username(&username_key)
            .await?
            .is_some()
        {
            return Err(WireError::new(
                ErrorCode::AlreadyExists,
                "username is taken",
            ));
        }
        let password_hash = self
            .shared
            .passwords
            .hash(&r.password, Lane::Normal)
            .await?;
        let user = self
            .shared
            .store
            .create_account(NewAccount {
                username: r.username,
                username_key,
                display_name,
                password_hash,
                group_adds: GroupAdds::default(),
            })
            .await
            .map_err(|e| match e {
                StoreError::AlreadyExists(_) => {
                    WireError::new(ErrorCode::AlreadyExists, "username is taken")
                }
                other => other.into(),
            })?;
        ok(Resp::Registered(pb::Registered {
            user: Some(pb::User::from(&user)),
            settings: Some(GroupAdds::default().into()),
        }))
    }

    pub(crate) async fn login(&mut self, r: pb::Login) -> Handled {
        self.limit_auth_attempt().await?;
        let Ok(key) = auth::username_key(&r.username) else {
            metrics::auth_failure();
            return Err(wrong_credentials());
        };
        let cookie_hash = auth::login_cookie_hash(&r.login_cookie);
        if cookie_hash.is_none() {
            self.check_untrusted(&key).await?;
        }
        let device_name = if r.device_name.trim().is_empty() {
            "device".to_string()
        } else {
            short_name("device name", &r.device_name, DEVICE_NAME_MAX)?
        };
        let account = self.shared.store.account_by_username(&key).await?;
        let budget = self
            .login_budget(&key, account.as_ref(), cookie_hash)
            .await?;
        if r.password.len() > auth::MAX_PASSWORD_BYTES {
            self.record_login_failure(&budget);
            metrics::auth_failure();
            return Err(wrong_credentials());
        }
        let valid = self
            .shared
            .passwords
            .verify(
                &r.password,
                account.as_ref().map(|a| a.password_hash.as_str()),
                budget.lane(),
            )
            .await?;
        let Some(account) = account.filter(|_| valid) else {
            self.record_login_failure(&budget);
            metrics::auth_failure();
            return Err(wrong_credentials());
        };
        self.clear_login_failures(&budget);
        // A known device keeps its cookie; any other gets a new one.
        let (cookie, cookie_hash) = match (&budget, cookie_hash) {
            (Budget::Cookie(_), Some(hash)) => (r.login_cookie, hash),
            _ => {
                let (cookie, hash) = auth::new_login_cookie();
                (bytes::Bytes::copy_from_slice(&cookie), hash)
            }
        };
        self.shared
            .store
            .remember_login_cookie(
                account.user.id,
                &cookie_hash,
                now_millis(),
                LOGIN_COOKIES_PER_ACCOUNT,
            )
            .await?;
        let (token, token_hash) = auth::new_token();
        let session = self
            .shared
            .store
            .create_session(NewSession {
                user: account.user.id,
                device_name,
                token_hash,
                expires_at: now_millis().saturating_add(self.session_ttl_ms()),
            })
            .await?;
        self.authenticated(session, token.to_vec(), cookie)
    }

    pub(crate) async fn resume(&mut self, r: pb::Resume) -> Handled {
        // Invalid resumes are counted per address, and once over the limit every resume from
        // it is refused before the store is asked: a flood of made-up tokens costs no reads.
        let address = AddressGroup::of(self.peer.ip());
        self.shared
            .invalid_resumes
            .check(&address)
            .await
            .map_err(|wait| {
                metrics::auth_refused(metrics::budget::INVALID_RESUME);
                rate_limited(
                    "too many resumes with unknown or expired tokens from this address",
                    wait,
                )
            })?;
        let hash = auth::token_hash(&r.session_token);
        let Some(mut session) = self.shared.store.session_by_token(&hash).await? else {
            self.shared.invalid_resumes.record(&address);
            metrics::auth_failure();
            return Err(WireError::new(
                ErrorCode::Unauthenticated,
                "unknown or revoked session; log in again",
            ));
        };
        let now = now_millis();
        if session.expires_at <= now {
            self.shared.invalid_resumes.record(&address);
            self.shared.store.delete_session(session.device).await?;
            metrics::auth_failure();
            return Err(WireError::new(
                ErrorCode::Unauthenticated,
                "session expired; log in again",
            ));
        }
        // Each resume replaces the device's live connection (and fences the old one): a storm
        // of them would only churn connections and memory.
        self.shared
            .resumes
            .try_take(&session.device)
            .map_err(|wait| {
                metrics::auth_refused(metrics::budget::RESUME_DEVICE);
                rate_limited("this device resumed too often; retry later", wait)
            })?;
        // Sliding expiry, but written at most once per tenth of the lifetime: a reconnect storm
        // then costs reads, not a write per client.
        let ttl = self.session_ttl_ms();
        let renewed = now.saturating_add(ttl);
        if renewed.saturating_sub(session.expires_at) > ttl / 10 {
            session.expires_at = renewed;
            self.shared
                .store
                .touch_session(session.device, session.expires_at)
                .await?;
        }
        self.authenticated(session, r.session_token.to_vec(), bytes::Bytes::new())
    }

    fn authenticated(
        &mut self,
        session: StoredSession,
        token: Vec<u8>,
        login_cookie: bytes::Bytes,
    ) -> Handled {
        let resp = Resp::Authenticated(pb::Authenticated {
            user: Some(pb::User::from(&session.user)),
            session_token: token.into(),
            device_id: session.device.0,
            expires_at_ms: session.expires_at,
            acked_seq: session.acked.0,
            login_cookie,
            settings: Some(session.group_adds.into()),
        });
        Ok((
            resp,
            After::SignIn {
                user: session.user,
                device: session.device,
                acked: session.acked,
            },
        ))
    }

    pub(crate) async fn update_profile(&mut self, r: pb::UpdateProfile) -> Handled {
        let user_id = self.authed()?.user.id;
        // Each field left at its zero value stays as it is; everything is checked before
        // anything is written.
        let display_name = if r.display_name.is_empty() {
            None
        } else {
            Some(auth::display_name(&r.display_name)?)
        };
        let group_adds = match r.group_adds {
            0 => None,
            n => Some(GroupAdds::from_wire(n).ok_or_else(|| {
                WireError::new(
                    ErrorCode::InvalidArgument,
                    format!("unknown group_adds value {n}"),
                )
            })?),
        };
        if display_name.is_none() && group_adds.is_none() {
            return Err(WireError::new(
                ErrorCode::InvalidArgument,
                "nothing to update: set display_name or group_adds",
            ));
        }
        let profile = self
            .shared
            .store
            .update_profile(
                user_id,
                ProfileChange {
                    display_name,
                    group_adds,
                },
            )
            .await?;
        if let Some(a) = self.auth.as_mut() {
            a.user = profile.user;
        }
        ok(Resp::Ok(pb::Ok {}))
    }

    /// Checks the caller's password (for change and delete), counting failures per device:
    /// the session proves a known device, so others' failed logins never block this.
    async fn check_own_password(&self, password: &str) -> Result<(), WireError> {
        let (me, device) = {
            let a = self.authed()?;
            (&a.user, a.device)
        };
        self.shared
            .password_failures
            .check(&device)
            .map_err(|wait| {
                metrics::auth_refused(metrics::budget::DEVICE_PASSWORD);
                rate_limited("too many wrong passwords on this device", wait)
            })?;
        let account = self
            .shared
            .store
            .account_by_id(me.id)
            .await?
            .ok_or_else(|| {
                WireError::new(ErrorCode::Unauthenticated, "account no longer exists")
            })?;
        if password.len() > auth::MAX_PASSWORD_BYTES
            || !self
                .shared
                .passwords
                .verify(password, Some(&account.password_hash), Lane::Reserved)
                .await?
        {
            self.shared.password_failures.record(&device);
            metrics::auth_failure();
            // Not UNAUTHENTICATED: the session itself stays valid.
            return Err(WireError::new(
                ErrorCode::PermissionDenied,
                "the password is wrong",
            ));
        }
        Ok(())
    }

    pub(crate) async fn change_password(&mut self, r: pb::ChangePassword) -> Handled {
        auth::check_new_password(&r.new_password, self.shared.config.passwords.min_length)?;
        self.check_own_password(&r.current_password).await?;
        let (user, device) = {
            let a = self.authed()?;
            (a.user.id, a.device)
        };
        let hash = self
            .shared
            .passwords
            .hash(&r.new_password, Lane::Reserved)
            .await?;
        let revoked = self
            .shared
            .store
            .change_password(user, &hash, device)
            .await?;
        self.shared.hub.kick(
            user,
            Some(&revoked),
            &WireError::new(
                ErrorCode::Unauthenticated,
                "session revoked: the password was changed",
            ),
        );
        ok(Resp::Ok(pb::Ok {}))
    }

    pub(crate) async fn logout(&mut self) -> Handled {
        let (user, device) = {
            let a = self.authed()?;
            (a.user.id, a.device)
        };
        self.shared.store.delete_session(device).await?;
        self.sign_out();
        // The same token may be in use on another connection.
        self.shared.hub.kick(
            user,
            Some(&[device]),
            &WireError::new(ErrorCode::Unauthenticated, "session logged out"),
        );
        ok(Resp::Ok(pb::Ok {}))
    }

    pub(crate) async fn delete_account(&mut self, r: pb::DeleteAccount) -> Handled {
        self.check_own_password(&r.password).await?;
        let user = self.authed()?.user.id;
        self.shared.store.delete_account(user).await?;
        self.sign_out();
        self.shared.hub.kick(
            user,
            None,
            &WireError::new(ErrorCode::Unauthenticated, "account deleted"),
        );
        Ok((
            Resp::Ok(pb::Ok {}),
            After::Close(pb::GoAway {
                reason: "account deleted".into(),
                reconnect_after_ms: 0,
                code: ErrorCode::Unauthenticated as i32,
            }),
        ))
    }
}
