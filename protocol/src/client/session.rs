//! [`Client`]: a resumable session on top of [`Connection`].
//!
//! It owns the connection options, the current connection and its events, the session
//! (`Authenticated`: token, user, device) and the highest inbox seq it has handed to the
//! application. That seq survives reconnects, so when the server replays the inbox from the
//! device's cursor after a Resume, entries the application already saw are dropped here:
//! the application sees each seq at most once per `Client`, in increasing order.
//!
//! It also keeps the login cookie the server gave each username it logged in as (see
//! [`Client::login`]); an application that outlives the process saves them with
//! [`Client::login_cookies`] and restores them with [`Client::set_login_cookie`].
//!
//! It never acknowledges anything the application has not been given (acks are explicit:
//! [`Client::ack_seen`]), and never reconnects behind the application's back.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use tracing::{debug, trace};

use super::ClientError;
use super::connection::{ConnectOptions, Connection, Event, Events};
use crate::pb;

/// First backoff cap of [`Client::reconnect_with_backoff`].
const BACKOFF_START: Duration = Duration::from_millis(100);
/// Largest backoff cap of [`Client::reconnect_with_backoff`].
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A session with the daemon that survives reconnects.
#[derive(Debug)]
pub struct Client {
    opts: ConnectOptions,
    conn: Connection,
    events: Events,
    session: Option<pb::Authenticated>,
    /// Highest seq returned by `next_event`, and whose inbox it belongs to.
    last_seen_seq: u64,
    seq_owner: Option<u64>,
    go_away: Option<pb::GoAway>,
    /// Login cookie per case-folded username.
    login_cookies: HashMap<String, Bytes>,
}

/// The key cookies are kept under: usernames are case-insensitive (ASCII) on the server.
fn cookie_key(username: &str) -> String {
    username.to_ascii_lowercase()
}

impl Client {
    /// Connects (TLS + Hello); the client is not authenticated yet.
    pub async fn connect(opts: ConnectOptions) -> Result<Client, ClientError> {
        let (conn, events) = Connection::connect(&opts).await?;
        Ok(Client {
            opts,
            conn,
            events,
            session: None,
            last_seen_seq: 0,
            seq_owner: None,
            go_away: None,
            login_cookies: HashMap::new(),
        })
    }

    /// As [`connect`](Self::connect), over an already-open TCP stream; a later
    /// [`reconnect`](Self::reconnect) dials `opts.addr` itself.
    pub async fn connect_stream(
        opts: ConnectOptions,
        tcp: tokio::net::TcpStream,
    ) -> Result<Client, ClientError> {
        let (conn, events) = Connection::connect_stream(&opts, tcp).await?;
        Ok(Client {
            opts,
            conn,
            events,
            session: None,
            last_seen_seq: 0,
            seq_owner: None,
            go_away: None,
            login_cookies: HashMap::new(),
        })
    }

    /// The options every (re)connection uses.
    pub fn options(&self) -> &ConnectOptions {
        &self.opts
    }

    /// The current connection, for every request the `Client` does not wrap. Clone it to
    /// send from another task (a clone keeps pointing at this connection after a reconnect).
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// The current session, once `login` or `resume` succeeded.
    pub fn session(&self) -> Option<&pb::Authenticated> {
        self.session.as_ref()
    }

    /// The logged-in user.
    pub fn user(&self) -> Option<&pb::User> {
        self.session.as_ref().and_then(|s| s.user.as_ref())
    }

    /// The last GoAway the server sent, until the next successful reconnect.
    pub fn last_go_away(&self) -> Option<&pb::GoAway> {
        self.go_away.as_ref()
    }

    /// Creates an account (does not log in).
    pub async fn register(
        &self,
        username: &str,
        password: &str,
        display_name: &str,
    ) -> Result<pb::User, ClientError> {
        self.conn.register(username, password, display_name).await
    }

    /// Logs in and keeps the session for [`reconnect`](Self::reconnect). Presents the login
    /// cookie kept for `username`, if any, and keeps the one the server returns: with it,
    /// other people's failed logins of this account never lock this device out.
    pub async fn login(
        &mut self,
        username: &str,
        password: &str,
        device_name: &str,
    ) -> Result<pb::Authenticated, ClientError> {
        let key = cookie_key(username);
        let cookie = self.login_cookies.get(&key).cloned().unwrap_or_default();
        let auth = self
            .conn
            .login_with_cookie(username, password, device_name, &cookie)
            .await?;
        if !auth.login_cookie.is_empty() {
            self.login_cookies.insert(key, auth.login_cookie.clone());
        }
        self.adopt(auth.clone());
        Ok(auth)
    }

    /// The login cookie kept for `username` (from a login of this `Client`, or restored).
    pub fn login_cookie(&self, username: &str) -> Option<&Bytes> {
        self.login_cookies.get(&cookie_key(username))
    }

    /// Every login cookie kept, by case-folded username, for saving.
    pub fn login_cookies(&self) -> &HashMap<String, Bytes> {
        &self.login_cookies
    }

    /// Restores a saved login cookie for `username` (an empty one forgets it).
    pub fn set_login_cookie(&mut self, username: &str, cookie: Bytes) {
        if cookie.is_empty() {
            self.login_cookies.remove(&cookie_key(username));
        } else {
            self.login_cookies.insert(cookie_key(username), cookie);
        }
    }

    /// Resumes a session from its token (e.g. saved by a previous process) and keeps it.
    pub async fn resume(&mut self, token: &[u8]) -> Result<pb::Authenticated, ClientError> {
        let mut auth = self.conn.resume(token).await?;
        if auth.session_token.is_empty() {
            auth.session_token = bytes::Bytes::copy_from_slice(token);
        }
        self.adopt(auth.clone());
        Ok(auth)
    }

    /// Logs out on the server and forgets the session.
    pub async fn logout(&mut self) -> Result<(), ClientError> {
        self.conn.logout().await?;
        self.session = None;
        Ok(())
    }

    fn adopt(&mut self, auth: pb::Authenticated) {
        let user_id = auth.user.as_ref().map(|u| u.user_id);
        if user_id != self.seq_owner {
            // Another user's inbox: its seqs have nothing to do with ours.
            self.last_seen_seq = 0;
            self.seq_owner = user_id;
        }
        // Everything up to the device's cursor was processed already; the server does not
        // replay it, and anything at or below it that still arrives is a duplicate.
        self.last_seen_seq = self.last_seen_seq.max(auth.acked_seq);
        self.session = Some(auth);
    }

    /// The next push, with duplicates removed: a Delivery whose seq is not above every seq
    /// already returned is dropped silently. `None` once the connection's events ended
    /// (after `Event::Closed`); call [`reconnect`](Self::reconnect) to go on.
    ///
    /// Cancel-safe: nothing is lost if the future is dropped before it completes.
    pub async fn next_event(&mut self) -> Option<Event> {
        loop {
            match self.events.recv().await? {
                Event::Delivery(d) => {
                    if d.seq <= self.last_seen_seq {
                        trace!(
                            seq = d.seq,
                            last_seen = self.last_seen_seq,
                            "duplicate delivery dropped"
                        );
                        continue;
                    }
                    self.last_seen_seq = d.seq;
                    return Some(Event::Delivery(d));
                }
                Event::GoAway(g) => {
                    self.go_away = Some(g.clone());
                    return Some(Event::GoAway(g));
                }
                closed @ Event::Closed { .. } => return Some(closed),
            }
        }
    }

    /// The next Delivery within `timeout` (duplicates removed as in
    /// [`next_event`](Self::next_event)); a GoAway or the end of the connection is
    /// `Err(Closed)`, no delivery in time is `Err(Timeout)`.
    pub async fn next_delivery(&mut self, timeout: Duration) -> Result<pb::Delivery, ClientError> {
        match tokio::time::timeout(timeout, self.next_event()).await {
            Err(_) => Err(ClientError::Timeout),
            Ok(Some(Event::Delivery(d))) => Ok(d),
            Ok(Some(Event::GoAway(g))) => Err(ClientError::Closed(format!(
                "go-away: {} (reconnect after {} ms)",
                g.reason, g.reconnect_after_ms
            ))),
            Ok(Some(Event::Closed { reason })) => Err(ClientError::Closed(reason)),
            Ok(None) => Err(ClientError::Closed("the connection's events ended".into())),
        }
    }

    /// The highest inbox seq returned by [`next_event`](Self::next_event) (or covered by the
    /// device's cursor at login/resume).
    pub fn last_seen_seq(&self) -> u64 {
        self.last_seen_seq
    }

    /// Acknowledges everything up to [`last_seen_seq`](Self::last_seen_seq).
    pub async fn ack_seen(&self) -> Result<(), ClientError> {
        if self.last_seen_seq == 0 {
            return Ok(());
        }
        self.conn.ack(self.last_seen_seq).await
    }

    /// Replaces the connection with a new one (same options) and resumes the session if
    /// there is one. `last_seen_seq` is kept, so the server's replay is deduplicated.
    /// A token the server refuses (`Unauthenticated`) is forgotten; the new, unauthenticated
    /// connection stays in place so the application can log in again.
    pub async fn reconnect(&mut self) -> Result<(), ClientError> {
        let (conn, events) = Connection::connect(&self.opts).await?;
        let old = std::mem::replace(&mut self.conn, conn);
        // Pushes still buffered on the old connection were not acked: the server replays them.
        self.events = events;
        tokio::spawn(async move { old.close().await });
        self.go_away = None;
        let Some(token) = self.session.as_ref().map(|s| s.session_token.clone()) else {
            return Ok(());
        };
        match self.conn.resume(&token).await {
            Ok(mut auth) => {
                if auth.session_token.is_empty() {
                    auth.session_token = token;
                }
                self.adopt(auth);
                Ok(())
            }
            Err(e) => {
                if e.wire_code() == Some(crate::ErrorCode::Unauthenticated) {
                    self.session = None;
                }
                Err(e)
            }
        }
    }

    /// [`reconnect`](Self::reconnect) up to `max_attempts` times (at least once), waiting
    /// between attempts with exponential backoff and full jitter (a random delay up to a cap
    /// that doubles from 100 ms to 10 s), first waiting the `reconnect_after_ms` of a GoAway
    /// if one was seen, and at least a rate limit's `retry_after_ms`. Errors a retry cannot
    /// fix (refused token, untrusted certificate, bad options) are returned at once.
    pub async fn reconnect_with_backoff(&mut self, max_attempts: u32) -> Result<(), ClientError> {
        if let Some(g) = self.go_away.take()
            && g.reconnect_after_ms > 0
        {
            let wait = Duration::from_millis(u64::from(g.reconnect_after_ms));
            debug!(?wait, "waiting as the server's go-away asked");
            tokio::time::sleep(wait).await;
        }
        let attempts = max_attempts.max(1);
        let mut cap = BACKOFF_START;
        let mut attempt = 1;
        loop {
            let err = match self.reconnect().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if attempt >= attempts || !err.is_transient() {
                return Err(err);
            }
            let mut delay = full_jitter(cap);
            if let ClientError::Wire(w) = &err
                && w.retry_after_ms > 0
            {
                delay = delay.max(Duration::from_millis(u64::from(w.retry_after_ms)));
            }
            debug!(attempt, ?delay, error = %err, "reconnect failed; retrying");
            tokio::time::sleep(delay).await;
            cap = (cap * 2).min(BACKOFF_MAX);
            attempt += 1;
        }
    }

    /// Closes the current connection gracefully (the session stays valid for a later
    /// [`reconnect`](Self::reconnect)).
    pub async fn close(&self) {
        self.conn.close().await;
    }
}

/// A uniformly random duration in `[0, cap]`.
fn full_jitter(cap: Duration) -> Duration {
    let cap_ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=cap_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_the_cap() {
        for _ in 0..1000 {
            assert!(full_jitter(Duration::from_millis(100)) <= Duration::from_millis(100));
        }
        assert_eq!(full_jitter(Duration::ZERO), Duration::ZERO);
    }
}
