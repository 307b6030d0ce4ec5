//! The network task: it owns the SDK [`Client`], connects, resumes with the stored token,
//! reconnects with backoff, runs the [`Command`]s the UI sends and reports everything back
//! as [`NetEvent`]s.
//!
//! The UI never awaits anything here; it only sends commands on a channel. Own messages go
//! through an outbox: each keeps its `client_msg_id` and stays queued until the server
//! accepted it, across reconnects (the server deduplicates retries by that id), so a message
//! typed offline is sent once it can be and never twice. Deliveries are acknowledged only
//! after they were handed to the UI.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use messenger_protocol::ErrorCode;
use messenger_protocol::client::{Client, ClientError, ConnectOptions, Connection, Event};
use messenger_protocol::pb;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::app::{Command, ConnState, ConvKey, HISTORY_PAGE, NetEvent};
use crate::store::TokenStore;

const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// How often seen deliveries are acknowledged (acks are cumulative, so batching is free).
const ACK_INTERVAL: Duration = Duration::from_millis(300);

pub struct NetConfig {
    pub opts: ConnectOptions,
    pub store: TokenStore,
    pub device_name: String,
}

struct Outgoing {
    to: ConvKey,
    client_msg_id: String,
    body: String,
}

/// How one connected stretch ended.
enum End {
    /// The connection dropped (or the server asked us to go); reconnect.
    Lost,
    /// Signed out on purpose (logout, account deleted): start over without a token.
    SignedOut,
    /// The sign-in form succeeded.
    SignedIn,
    /// The UI is gone.
    Quit,
}

struct Net {
    cfg: NetConfig,
    tx: mpsc::UnboundedSender<NetEvent>,
    outbox: VecDeque<Outgoing>,
}

/// Runs until the command channel closes.
pub async fn run(
    cfg: NetConfig,
    cmds: mpsc::UnboundedReceiver<Command>,
    tx: mpsc::UnboundedSender<NetEvent>,
) {
    let mut net = Net {
        cfg,
        tx,
        outbox: VecDeque::new(),
    };
    net.main(cmds).await;
}

fn explain(e: &ClientError, server: &str) -> String {
    match e {
        ClientError::Tls(why) => format!(
            "the certificate of {server} is not trusted ({why}); start with --ca FILE \
             (the server's CA, e.g. messenger-data/tls/dev-ca.pem) or --fingerprint SHA256 \
             (as messengerd prints it)"
        ),
        // Say when to try again: the server tells us for every refusal that a retry can fix.
        ClientError::Wire(w) if w.retry_after_ms > 0 => format!(
            "{} (try again in {} s)",
            w.message,
            w.retry_after_ms.div_ceil(1000)
        ),
        ClientError::Wire(w) => w.message.clone(),
        other => other.to_string(),
    }
}

impl Net {
    fn emit(&self, ev: NetEvent) {
        // The UI is gone only while quitting; nothing to report to then.
        let _ = self.tx.send(ev);
    }

    fn server(&self) -> String {
        self.cfg.opts.addr.clone()
    }

    async fn main(&mut self, mut cmds: mpsc::UnboundedReceiver<Command>) {
        let mut client: Option<Client> = None;
        let mut failures: u32 = 0;
        loop {
            self.emit(NetEvent::State(ConnState::Connecting));
            let connected = match client.as_mut() {
                None => Client::connect(self.cfg.opts.clone())
                    .await
                    .map(|c| client = Some(c)),
                // Keeps the session and the seen seq, so the replay is deduplicated.
                Some(c) => c.reconnect().await,
            };
            match connected {
                Ok(()) => {}
                Err(e) if e.wire_code() == Some(ErrorCode::Unauthenticated) => {
                    // The session was revoked (password changed or signed out elsewhere, or
                    // it expired); the new, unauthenticated connection is in place.
                    self.forget_token();
                    self.outbox.clear();
                    self.emit(NetEvent::SignedOut(Some(format!(
                        "your session ended ({}); sign in again",
                        explain(&e, &self.server())
                    ))));
                }
                Err(e) => {
                    let wait = if e.is_transient() {
                        backoff(failures)
                    } else {
                        // Retrying will not fix a certificate or configuration problem
                        // soon; try rarely in case the server's certificate changes back.
                        Duration::from_secs(60)
                    };
                    failures = failures.saturating_add(1);
                    let msg = explain(&e, &self.server());
                    let state = if e.is_transient() {
                        ConnState::Reconnecting {
                            at: (Instant::now() + wait).into_std(),
                            error: msg,
                        }
                    } else {
                        ConnState::Offline(msg)
                    };
                    self.emit(NetEvent::State(state));
                    if !self.wait(wait, &mut cmds).await {
                        return;
                    }
                    continue;
                }
            }
            let Some(c) = client.as_mut() else { continue };
            if c.session().is_none() {
                match self.resume_stored(c).await {
                    Ok(()) => {}
                    Err(e) => {
                        failures = failures.saturating_add(1);
                        let wait = backoff(failures);
                        self.emit(NetEvent::State(ConnState::Reconnecting {
                            at: (Instant::now() + wait).into_std(),
                            error: explain(&e, &self.server()),
                        }));
                        if !self.wait(wait, &mut cmds).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            self.emit(NetEvent::State(ConnState::Connected));
            if c.session().is_none() {
                match self.signed_out(c, &mut cmds).await {
                    End::Quit => return,
                    End::Lost => {
                        failures = failures.saturating_add(1);
                        self.pause_after_loss(c, failures, &mut cmds).await;
                        continue;
                    }
                    End::SignedIn | End::SignedOut => {}
                }
            }
            failures = 0;
            match self.online(c, &mut cmds).await {
                End::Quit => {
                    c.close().await;
                    return;
                }
                End::Lost => {
                    failures = failures.saturating_add(1);
                    if !self.pause_after_loss(c, failures, &mut cmds).await {
                        return;
                    }
                }
                End::SignedOut | End::SignedIn => {
                    c.close().await;
                    client = None;
                }
            }
        }
    }

    /// Waits before reconnecting: what a GoAway asked for, else a backoff step.
    async fn pause_after_loss(
        &mut self,
        c: &Client,
        failures: u32,
        cmds: &mut mpsc::UnboundedReceiver<Command>,
    ) -> bool {
        let wait = match c.last_go_away() {
            Some(g) if g.reconnect_after_ms > 0 => {
                Duration::from_millis(u64::from(g.reconnect_after_ms))
            }
            _ => backoff(failures.saturating_sub(1)),
        };
        let reason = c
            .conn()
            .closed_reason()
            .unwrap_or_else(|| "connection lost".into());
        self.emit(NetEvent::State(ConnState::Reconnecting {
            at: (Instant::now() + wait).into_std(),
            error: reason,
        }));
        self.wait(wait, cmds).await
    }

    /// Sleeps for `wait` while still taking commands (sends are queued); false on quit.
    async fn wait(&mut self, wait: Duration, cmds: &mut mpsc::UnboundedReceiver<Command>) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return true,
                cmd = cmds.recv() => match cmd {
                    None => return false,
                    Some(cmd) => self.offline_command(cmd),
                },
            }
        }
    }

    fn offline_command(&mut self, cmd: Command) {
        match cmd {
            Command::Send {
                to,
                client_msg_id,
                body,
            } => self.outbox.push_back(Outgoing {
                to,
                client_msg_id,
                body,
            }),
            // Answered after the reconnect: the first page is fetched again on selection.
            Command::History { conv, .. } => self.emit(NetEvent::HistoryFailed {
                conv,
                error: "offline".into(),
            }),
            Command::LookupUser(_) | Command::GetGroup(_) => {}
            Command::SignIn { .. } => self.emit(NetEvent::SignInFailed(
                "not connected yet; try again".into(),
            )),
            _ => self.emit(NetEvent::Error("offline: try again once connected".into())),
        }
    }

    fn forget_token(&self) {
        if let Err(e) = self.cfg.store.remove(&self.server()) {
            self.emit(NetEvent::Error(e.to_string()));
        }
    }

    /// Resumes with the stored token if there is one. A refused token is removed (the UI
    /// then shows the sign-in form); only transient trouble is an error.
    async fn resume_stored(&mut self, c: &mut Client) -> Result<(), ClientError> {
        let token = match self.cfg.store.load(&self.server()) {
            Ok(Some(t)) => t,
            Ok(None) => return Ok(()),
            Err(e) => {
                self.emit(NetEvent::Error(e.to_string()));
                return Ok(());
            }
        };
        match c.resume(&token).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_transient() => Err(e),
            Err(e) => {
                self.forget_token();
                self.emit(NetEvent::SignedOut(Some(format!(
                    "the saved session is no longer valid ({}); sign in again",
                    explain(&e, &self.server())
                ))));
                Ok(())
            }
        }
    }

    /// Connected but not signed in: waits for the sign-in form.
    async fn signed_out(
        &mut self,
        c: &mut Client,
        cmds: &mut mpsc::UnboundedReceiver<Command>,
    ) -> End {
        self.outbox.clear();
        self.emit(NetEvent::SignedOut(None));
        loop {
            tokio::select! {
                ev = c.next_event() => match ev {
                    Some(Event::Closed { .. }) | None => return End::Lost,
                    Some(_) => {}
                },
                cmd = cmds.recv() => match cmd {
                    None => return End::Quit,
                    Some(Command::SignIn { username, password, register }) => {
                        match self.sign_in(c, &username, &password, register.as_deref()).await {
                            Ok(()) => return End::SignedIn,
                            Err(e) if e.is_transient() && c.conn().is_closed() => {
                                self.emit(NetEvent::SignInFailed(explain(&e, &self.server())));
                                return End::Lost;
                            }
                            Err(e) => self.emit(NetEvent::SignInFailed(explain(&e, &self.server()))),
                        }
                    }
                    Some(_) => self.emit(NetEvent::SignInFailed("sign in first".into())),
                },
            }
        }
    }

    async fn sign_in(
        &mut self,
        c: &mut Client,
        username: &str,
        password: &str,
        register: Option<&str>,
    ) -> Result<(), ClientError> {
        if let Some(display) = register {
            c.register(username, password, display).await?;
        }
        // This device's login cookie for the account, so others' failed logins cannot lock
        // it out (docs/PROTOCOL.md §5.3.1). A damaged file only costs that protection.
        match self.cfg.store.load_cookie(&self.server(), username) {
            Ok(Some(cookie)) => c.set_login_cookie(username, cookie.into()),
            Ok(None) => {}
            Err(e) => self.emit(NetEvent::Error(e.to_string())),
        }
        let auth = c.login(username, password, &self.cfg.device_name).await?;
        if let Err(e) = self.cfg.store.save(&self.server(), &auth.session_token) {
            self.emit(NetEvent::Error(format!(
                "signed in, but the session could not be saved: {e}"
            )));
        }
        if !auth.login_cookie.is_empty()
            && let Err(e) = self
                .cfg
                .store
                .save_cookie(&self.server(), username, &auth.login_cookie)
        {
            self.emit(NetEvent::Error(format!(
                "signed in, but the login cookie could not be saved: {e}"
            )));
        }
        Ok(())
    }

    /// Signed in: deliveries in, commands out, until the connection ends.
    async fn online(&mut self, c: &mut Client, cmds: &mut mpsc::UnboundedReceiver<Command>) -> End {
        let Some(user) = c.user().cloned() else {
            return End::SignedOut;
        };
        self.emit(NetEvent::SignedIn(user));
        self.spawn_list_conversations(c.conn());
        if !self.flush(c.conn()).await {
            return End::Lost;
        }
        let mut acked = c.last_seen_seq();
        let mut ack_tick = tokio::time::interval(ACK_INTERVAL);
        loop {
            tokio::select! {
                ev = c.next_event() => match ev {
                    Some(Event::Delivery(d)) => {
                        if let Some(m) = d.message {
                            self.emit(NetEvent::Message(m));
                        }
                    }
                    Some(Event::GoAway(g)) => self.emit(NetEvent::Notice(format!(
                        "server going away: {}", g.reason
                    ))),
                    Some(Event::Closed { .. }) | None => return End::Lost,
                },
                _ = ack_tick.tick() => {
                    if c.last_seen_seq() > acked {
                        // A failed ack is repeated after the reconnect by the replay.
                        if c.ack_seen().await.is_ok() {
                            acked = c.last_seen_seq();
                        }
                    }
                }
                cmd = cmds.recv() => {
                    let Some(cmd) = cmd else {
                        let _ = c.ack_seen().await;
                        return End::Quit;
                    };
                    if let Some(end) = self.online_command(c, cmd).await {
                        return end;
                    }
                }
            }
        }
    }

    async fn online_command(&mut self, c: &mut Client, cmd: Command) -> Option<End> {
        let conn = c.conn().clone();
        let tx = self.tx.clone();
        match cmd {
            Command::Send {
                to,
                client_msg_id,
                body,
            } => {
                self.outbox.push_back(Outgoing {
                    to,
                    client_msg_id,
                    body,
                });
                if !self.flush(&conn).await {
                    return Some(End::Lost);
                }
            }
            Command::Logout => {
                if let Err(e) = c.logout().await {
                    self.emit(NetEvent::Error(format!(
                        "logout: {}",
                        explain(&e, &self.server())
                    )));
                }
                // Forget the token even if the server could not be told: the user asked.
                self.forget_token();
                return Some(End::SignedOut);
            }
            Command::DeleteAccount { password } => match conn.delete_account(&password).await {
                Ok(()) => {
                    self.forget_token();
                    self.emit(NetEvent::Notice("account deleted".into()));
                    return Some(End::SignedOut);
                }
                Err(e) => self.emit(NetEvent::Error(format!(
                    "account not deleted: {}",
                    explain(&e, &self.server())
                ))),
            },
            Command::SignIn { .. } => {
                self.emit(NetEvent::Error("already signed in; /logout first".into()))
            }
            other => {
                let server = self.server();
                tokio::spawn(async move {
                    if let Err(e) = request(&conn, &tx, other).await {
                        let _ = tx.send(NetEvent::Error(explain(&e, &server)));
                    }
                });
            }
        }
        None
    }

    fn spawn_list_conversations(&self, conn: &Connection) {
        let conn = conn.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            match conn.list_conversations(0).await {
                Ok(list) => {
                    let _ = tx.send(NetEvent::Conversations(list));
                }
                Err(e) => {
                    let _ = tx.send(NetEvent::Error(format!("conversations: {e}")));
                }
            }
        });
    }

    /// Sends the outbox in order. False when the connection failed (what is left stays
    /// queued for the next connection); refused messages are reported and dropped.
    async fn flush(&mut self, conn: &Connection) -> bool {
        while let Some(m) = self.outbox.front() {
            let body = Bytes::copy_from_slice(m.body.as_bytes());
            match conn
                .send_message(m.to.recipient(), &m.client_msg_id, body, "text/plain")
                .await
            {
                Ok(sent) => {
                    self.emit(NetEvent::Sent {
                        to: m.to,
                        client_msg_id: m.client_msg_id.clone(),
                        message_id: sent.message_id,
                        time_ms: sent.server_time_ms,
                    });
                    self.outbox.pop_front();
                }
                Err(e) if e.wire_code() == Some(ErrorCode::RateLimited) => {
                    let wait = match &e {
                        ClientError::Wire(w) => u64::from(w.retry_after_ms.max(100)),
                        _ => 100,
                    };
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                Err(e) if e.is_transient() => return false,
                Err(e) => {
                    self.emit(NetEvent::SendFailed {
                        to: m.to,
                        client_msg_id: m.client_msg_id.clone(),
                        error: explain(&e, &self.server()),
                    });
                    self.outbox.pop_front();
                }
            }
        }
        true
    }
}

async fn lookup_ids(conn: &Connection, usernames: &[String]) -> Result<Vec<u64>, ClientError> {
    let mut ids = Vec::with_capacity(usernames.len());
    for name in usernames {
        ids.push(conn.lookup_user_by_name(name).await?.user_id);
    }
    Ok(ids)
}

/// A request that needs no state of the network task, run on its own task.
async fn request(
    conn: &Connection,
    tx: &mpsc::UnboundedSender<NetEvent>,
    cmd: Command,
) -> Result<(), ClientError> {
    let ev = match cmd {
        Command::History {
            conv,
            before_message_id,
        } => match conn
            .history(conv.recipient(), before_message_id, HISTORY_PAGE)
            .await
        {
            Ok(page) => NetEvent::History {
                conv,
                messages: page.messages,
                has_more: page.has_more,
            },
            Err(e) => NetEvent::HistoryFailed {
                conv,
                error: e.to_string(),
            },
        },
        Command::OpenDirect { username } => {
            NetEvent::DirectOpened(conn.lookup_user_by_name(&username).await?)
        }
        Command::LookupUser(id) => NetEvent::User(conn.lookup_user_by_id(id).await?),
        Command::GetGroup(id) => NetEvent::Group {
            group: conn.get_group(id).await?,
            open: false,
        },
        Command::CreateGroup { name, usernames } => {
            let ids = lookup_ids(conn, &usernames).await?;
            NetEvent::Group {
                group: conn.create_group(&name, &ids).await?,
                open: true,
            }
        }
        Command::AddMembers {
            group_id,
            usernames,
        } => {
            let ids = lookup_ids(conn, &usernames).await?;
            let group = conn.add_members(group_id, &ids).await?;
            let _ = tx.send(NetEvent::Group { group, open: false });
            NetEvent::Notice(format!("added {}", usernames.join(", ")))
        }
        Command::RemoveMember { group_id, username } => {
            let id = conn.lookup_user_by_name(&username).await?.user_id;
            let group = conn.remove_member(group_id, id).await?;
            let _ = tx.send(NetEvent::Group { group, open: false });
            NetEvent::Notice(format!("removed {username}"))
        }
        Command::LeaveGroup(id) => {
            conn.leave_group(id).await?;
            NetEvent::LeftGroup(id)
        }
        Command::SetDisplayName(name) => {
            conn.update_profile(&name).await?;
            NetEvent::ProfileUpdated(name)
        }
        Command::SetGroupAdds(who) => {
            conn.set_group_add_policy(who).await?;
            NetEvent::Notice(format!(
                "group additions: {}",
                match who {
                    pb::GroupAddPolicy::Anyone => "anyone may add you to groups",
                    pb::GroupAddPolicy::Nobody => "nobody may add you to groups",
                    _ => "only your contacts may add you to groups",
                }
            ))
        }
        Command::ChangePassword { current, new } => {
            conn.change_password(&current, &new).await?;
            NetEvent::Notice("password changed; other sessions were signed out".into())
        }
        // Handled by the network task itself.
        Command::Send { .. }
        | Command::SignIn { .. }
        | Command::Logout
        | Command::DeleteAccount { .. } => return Ok(()),
    };
    let _ = tx.send(ev);
    Ok(())
}

/// Exponential backoff with jitter: a delay between half and all of a cap that doubles per
/// failure, so a restarted server is not hit by every client at once.
fn backoff(failures: u32) -> Duration {
    let cap = BACKOFF_START
        .saturating_mul(1u32 << failures.min(10))
        .min(BACKOFF_MAX);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let frac = 0.5 + f64::from(nanos % 1000) / 2000.0;
    cap.mul_f64(frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_capped() {
        assert!(backoff(0) <= BACKOFF_START);
        assert!(backoff(0) >= BACKOFF_START / 2);
        assert!(backoff(3) >= BACKOFF_START * 4);
        for n in [5, 20, u32::MAX] {
            assert!(backoff(n) <= BACKOFF_MAX);
            assert!(backoff(n) >= BACKOFF_MAX / 2);
        }
    }
}
