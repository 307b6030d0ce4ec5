//! Peer (a): Mosquitto, the closest widely used store-and-forward system, with MQTT QoS 1 and
//! persistent sessions (`clean_session = false`), over TLS like Messenger.
//!
//! The harness starts its own broker from the installed binary with a generated CA and server
//! certificate (never the system one), one rumqttc client per user subscribed at QoS 1 to
//! `u/<index>`, publishing at QoS 1 to `u/<partner>`. A message counts as accepted when the
//! broker's PUBACK for that very publish arrived (packet ids are matched to sends).
//!
//! Note on durability: Mosquitto acknowledges QoS 1 messages from memory and writes its
//! persistence file only on autosave and shutdown, so its "accepted" is weaker than an
//! acknowledgement after a durable write.

use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet,
    QoS, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;

use super::{Connected, Inbox, Peer, PeerParams, PeerResult, PeerSender, PeerUsage, Pki};

/// How long the broker may take to accept connections after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Connecting and subscribing one user.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the workload against a fresh Mosquitto started from `mosquitto_bin`, then stops it.
pub async fn run(params: &PeerParams, mosquitto_bin: &Path) -> anyhow::Result<PeerResult> {
    let version = version(mosquitto_bin)?;
    let pki = Pki::generate()?;
    let broker = Broker::start(mosquitto_bin, &version, &pki, params.body_size).await?;
    let peer = MosquittoPeer {
        port: broker.port,
        tls: Arc::new(pki.client_config(None)?),
        max_packet: (params.body_size + 1024).max(10 * 1024),
        broker,
    };
    let name = format!("Mosquitto {version} (MQTT QoS 1, persistent sessions)");
    let result = super::drive(&name, params, &peer).await;
    drop(peer);
    result
}

/// The broker's version, from the first line of `mosquitto -h` ("mosquitto version 2.0.11").
fn version(bin: &Path) -> anyhow::Result<String> {
    let out = match Command::new(bin).arg("-h").stdin(Stdio::null()).output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            bail!(
                "the Mosquitto binary {} was not found; install the `mosquitto` package or pass its path",
                bin.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("running {} -h", bin.display())),
    };
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("mosquitto version "))
        .map(|v| v.trim().to_string())
        .with_context(|| {
            format!(
                "{} -h does not look like Mosquitto: {text:?}",
                bin.display()
            )
        })
}

/// TLS 1.3 needs Mosquitto 1.6 or later.
fn supports_tls13(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= (1, 6)
}

/// Our own broker process and its directory; killed and removed on drop.
struct Broker {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Broker {
    async fn start(
        bin: &Path,
        version: &str,
        pki: &Pki,
        body_size: usize,
    ) -> anyhow::Result<Broker> {
        let dir = std::env::temp_dir().join(format!(
            "messenger-loadtest-mosquitto-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(dir.join("data"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let mut cleanup = DirGuard(Some(dir.clone()));
        std::fs::write(dir.join("ca.pem"), &pki.ca_pem)?;
        std::fs::write(dir.join("server.pem"), &pki.cert_pem)?;
        write_private(&dir.join("server.key"), pki.key_pem.as_bytes())?;

        let versions: &[&str] = if supports_tls13(version) {
            &["tlsv1.3", "tlsv1.2"]
        } else {
            &["tlsv1.2"]
        };
        let mut last_log = String::new();
        for tls_version in versions {
            // A few attempts in case another process takes the free port first.
            for _ in 0..3 {
                let port = free_port()?;
                let conf = dir.join("mosquitto.conf");
                std::fs::write(&conf, config(&dir, port, tls_version, body_size))?;
                let log_path = dir.join("mosquitto.log");
                let log = std::fs::File::create(&log_path)?;
                let child = Command::new(bin)
                    .arg("-c")
                    .arg(&conf)
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()
                    .with_context(|| format!("starting {}", bin.display()))?;
                let mut broker = Broker {
                    child,
                    dir: dir.clone(),
                    port,
                };
                match broker.wait_ready().await {
                    Ok(()) => {
                        cleanup.0 = None;
                        return Ok(broker);
                    }
                    Err(e) => {
                        last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
                        // The broker's drop removes the directory; keep it for the next try.
                        broker.dir = PathBuf::new();
                        tracing::debug!(error = %e, log = %last_log, "mosquitto did not start");
                        if last_log.contains("tls_version") {
                            break;
                        }
                    }
                }
            }
        }
        bail!("Mosquitto did not start; its output:\n{last_log}")
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("mosquitto exited: {status}");
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("mosquitto did not listen on port {} in time", self.port);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

struct DirGuard(Option<PathBuf>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn config(dir: &Path, port: u16, tls_version: &str, body_size: usize) -> String {
    let d = dir.display();
    let mut c = format!(
        "# Generated by messenger-loadtest for a side-by-side run.\n\
         per_listener_settings false\n\
         allow_anonymous true\n\
         listener {port} 127.0.0.1\n\
         cafile {d}/ca.pem\n\
         certfile {d}/server.pem\n\
         keyfile {d}/server.key\n\
         tls_version {tls_version}\n\
         persistence true\n\
         persistence_location {d}/data/\n\
         max_inflight_messages 1000\n\
         max_queued_messages 100000\n\
         max_packet_size {}\n\
         set_tcp_nodelay true\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n\
         connection_messages false\n",
        (body_size + 1024).max(10 * 1024)
    );
    // Started as root, Mosquitto 2 would switch to the `mosquitto` user, which cannot read
    // the key in our private directory.
    if effective_uid() == Some(0) {
        c.push_str("user root\n");
    }
    c
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

#[cfg(unix)]
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

#[cfg(not(unix))]
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, data)
}

struct MosquittoPeer {
    broker: Broker,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    max_packet: usize,
}

impl PeerUsage for MosquittoPeer {
    fn cpu_secs(&self) -> Option<f64> {
        crate::stats::sample(self.broker.child.id()).map(|s| s.cpu_secs)
    }
    fn rss_bytes(&self) -> Option<u64> {
        crate::stats::sample(self.broker.child.id()).map(|s| s.rss_bytes)
    }
    fn in_process(&self) -> bool {
        false
    }
}

impl Peer for MosquittoPeer {
    type Sender = MqttSender;

    async fn connect(&self, me: u32, inbox: Arc<Inbox>) -> anyhow::Result<Connected<MqttSender>> {
        let mut opts = MqttOptions::new(format!("mlt-{me}"), "127.0.0.1", self.port);
        opts.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(self.max_packet, self.max_packet)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                self.tls.clone(),
            )));
        let (client, mut el) = AsyncClient::new(opts, 16);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(CONNECT_TIMEOUT.as_secs());
        el.set_network_options(net);

        tokio::time::timeout(CONNECT_TIMEOUT, async {
            match el.poll().await? {
                Event::Incoming(Packet::ConnAck(_)) => {}
                other => bail!("expected CONNACK, got {other:?}"),
            }
            client
                .subscribe(format!("u/{me}"), QoS::AtLeastOnce)
                .await?;
            loop {
                if let Event::Incoming(Packet::SubAck(ack)) = el.poll().await? {
                    if ack
                        .return_codes
                        .iter()
                        .all(|c| matches!(c, SubscribeReasonCode::Success(QoS::AtLeastOnce)))
                    {
                        return Ok(());
                    }
                    bail!("subscription refused: {:?}", ack.return_codes);
                }
            }
        })
        .await
        .context("connecting to Mosquitto timed out")??;

        let pending = Arc::new(Mutex::new(VecDeque::new()));
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let task = tokio::spawn(event_loop(el, inbox, pending.clone(), acks_tx));
        Ok(Connected {
            sender: MqttSender {
                client,
                pending,
                acks,
            },
            tasks: vec![task],
        })
    }
}

struct MqttSender {
    client: AsyncClient,
    /// Seqs of publishes handed to the event loop that did not get a packet id yet, in order.
    pending: Arc<Mutex<VecDeque<u64>>>,
    /// Seqs whose PUBACK arrived.
    acks: mpsc::UnboundedReceiver<u64>,
}

impl PeerSender for MqttSender {
    async fn send(&mut self, to: u32, seq: u64, body: Bytes) -> anyhow::Result<()> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(seq);
        self.client
            .publish_bytes(format!("u/{to}"), QoS::AtLeastOnce, false, body)
            .await?;
        loop {
            match self.acks.recv().await {
                Some(s) if s == seq => return Ok(()),
                // The PUBACK of an earlier send that was given up on.
                Some(_) => continue,
                None => bail!("the MQTT event loop ended"),
            }
        }
    }
}

/// Drives one client's connection: logs deliveries, pairs each outgoing publish's packet id
/// with its sender's seq, and reports PUBACKs as acceptances.
async fn event_loop(
    mut el: EventLoop,
    inbox: Arc<Inbox>,
    pending: Arc<Mutex<VecDeque<u64>>>,
    acks: mpsc::UnboundedSender<u64>,
) {
    let mut inflight: HashMap<u16, u64> = HashMap::new();
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => inbox.arrived(&p.payload),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                // A retransmission (after a reconnect) reuses the packet id of a publish that is
                // already paired.
                if pkid != 0 && !inflight.contains_key(&pkid) {
                    let seq = pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .pop_front();
                    if let Some(seq) = seq {
                        inflight.insert(pkid, seq);
                    }
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(seq) = inflight.remove(&ack.pkid) {
                    let _ = acks.send(seq);
                }
            }
            Ok(_) => {}
            Err(ConnectionError::RequestsDone) => return,
            Err(e) => {
                inbox.shared.error(format!("mqtt connection: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
