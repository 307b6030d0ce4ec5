//! "Served again": how long after a fault a new client can use the service. A probe is two
//! fresh connections through the front door (the balancer, or the single node): both sign in
//! with their passwords, one sends the other a message, the other receives it. It is retried
//! until it succeeds once; the time from the fault to that success is the figure.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use messenger_protocol::ErrorCode;
use messenger_protocol::client::{Client, ConnectOptions, Recipient, Trust, new_client_msg_id};

const PASSWORD: &str = "chaos-probe-password";
/// One attempt gives up after this long (a frozen node never answers).
const ATTEMPT: Duration = Duration::from_secs(3);
const PAUSE: Duration = Duration::from_millis(100);

/// Two probe users on one deployment.
#[derive(Clone)]
pub struct Probe {
    opts: ConnectOptions,
    sender: String,
    recipient: String,
}

impl Probe {
    /// Registers the probe's users (once per deployment; existing ones are fine).
    pub async fn prepare(address: String, trust: Trust, prefix: &str) -> anyhow::Result<Self> {
        let mut opts = ConnectOptions::new(address, trust);
        opts.client_name = "messenger-loadtest chaos probe".into();
        opts.connect_timeout = ATTEMPT;
        opts.request_timeout = ATTEMPT;
        opts.ping_interval = Duration::ZERO;
        let probe = Self {
            opts,
            sender: format!("{prefix}probe-a"),
            recipient: format!("{prefix}probe-b"),
        };
        for user in [&probe.sender, &probe.recipient] {
            let client = Client::connect(probe.opts.clone())
                .await
                .context("probe: connecting")?;
            match client.register(user, PASSWORD, user).await {
                Ok(_) => {}
                Err(e) if e.wire_code() == Some(ErrorCode::AlreadyExists) => {}
                Err(e) => return Err(e).context("probe: registering"),
            }
            client.close().await;
        }
        Ok(probe)
    }

    /// Retries until one round trip succeeds; the time since `since`, or `None` when `limit`
    /// passed first.
    pub async fn served_again(&self, since: Instant, limit: Duration) -> Option<Duration> {
        while since.elapsed() < limit {
            if let Ok(Ok(())) = tokio::time::timeout(ATTEMPT, self.round_trip()).await {
                return Some(since.elapsed());
            }
            tokio::time::sleep(PAUSE).await;
        }
        None
    }

    /// Sign in both users on new connections, send, receive.
    pub async fn round_trip(&self) -> anyhow::Result<()> {
        let mut receiver = Client::connect(self.opts.clone()).await?;
        let auth = receiver.login(&self.recipient, PASSWORD, "probe").await?;
        let recipient_id = auth.user.map(|u| u.user_id).context("no user id")?;
        let mut sender = Client::connect(self.opts.clone()).await?;
        sender.login(&self.sender, PASSWORD, "probe").await?;
        let nonce = Bytes::from(new_client_msg_id());
        sender
            .conn()
            .send_message(
                Recipient::User(recipient_id),
                &new_client_msg_id(),
                nonce.clone(),
                "text/plain",
            )
            .await?;
        sender.close().await;
        // Earlier probes' messages may be replayed first.
        loop {
            let delivery = receiver.next_delivery(ATTEMPT).await?;
            if delivery.message.is_some_and(|m| m.body == nonce) {
                break;
            }
        }
        let _ = receiver.ack_seen().await;
        receiver.close().await;
        Ok(())
    }
}
