//! A client that speaks frames by hand over TLS, so an attacker can do what the SDK never
//! does: stop reading after signing in, or send part of a frame and fall silent. It binds to
//! a chosen loopback source address so the daemon's per-address limits see many attackers.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use messenger_protocol::client::{ConnectOptions, client_config};
use messenger_protocol::codec::ClientCodec;
use messenger_protocol::pb::{self, client_frame::Kind as Req, server_frame::Kind as Resp};
use messenger_protocol::{DEFAULT_MAX_FRAME_BYTES, PROTOCOL_VERSION};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::Framed;

/// How long one answer may take before the attacker gives up on the connection.
const ANSWER: Duration = Duration::from_secs(30);

pub struct Raw {
    framed: Framed<TlsStream<TcpStream>, ClientCodec>,
    next_id: u64,
}

impl Raw {
    /// TCP from `source`, then TLS; nothing sent yet. `tiny_receive_buffer` shrinks the
    /// socket's receive buffer as far as the kernel allows, so the server's bytes pile up on
    /// its side once this client stops reading.
    pub async fn tls(
        opts: &ConnectOptions,
        source: IpAddr,
        tiny_receive_buffer: bool,
    ) -> anyhow::Result<Self> {
        let remote = tokio::net::lookup_host(&opts.addr)
            .await?
            .find(|a| a.is_ipv4() == source.is_ipv4())
            .context("the target has no address of the source's family")?;
        let socket = if remote.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if tiny_receive_buffer {
            socket.set_recv_buffer_size(1024)?;
        }
        socket.bind(SocketAddr::new(source, 0))?;
        let tcp = tokio::time::timeout(opts.connect_timeout, socket.connect(remote))
            .await
            .context("tcp connect timed out")??;
        let config = client_config(&opts.trust)?;
        let tls = tokio::time::timeout(
            opts.connect_timeout,
            TlsConnector::from(config).connect(opts.tls_server_name()?, tcp),
        )
        .await
        .context("tls handshake timed out")??;
        Ok(Self {
            framed: Framed::new(tls, ClientCodec::new(DEFAULT_MAX_FRAME_BYTES)),
            next_id: 1,
        })
    }

    /// TLS plus `Hello`: ready to sign in.
    pub async fn hello(
        opts: &ConnectOptions,
        source: IpAddr,
        tiny_receive_buffer: bool,
    ) -> anyhow::Result<Self> {
        let mut raw = Self::tls(opts, source, tiny_receive_buffer).await?;
        match raw
            .request(Req::Hello(pb::Hello {
                protocol_version: PROTOCOL_VERSION,
                client: "messenger-loadtest-attack".into(),
            }))
            .await?
        {
            Resp::HelloOk(_) => Ok(raw),
            Resp::Error(e) => anyhow::bail!("hello refused: {}", e.message),
            other => anyhow::bail!("hello answered with {other:?}"),
        }
    }

    /// Writes one request without waiting for anything.
    pub async fn send(&mut self, kind: Req) -> anyhow::Result<u64> {
        let request_id = self.next_id;
        self.next_id += 1;
        self.framed
            .send(pb::ClientFrame {
                request_id,
                kind: Some(kind),
            })
            .await?;
        Ok(request_id)
    }

    /// Sends a request and reads until its answer (anything else in between is skipped).
    pub async fn request(&mut self, kind: Req) -> anyhow::Result<Resp> {
        let id = self.send(kind).await?;
        let answer = async {
            loop {
                let frame = self
                    .framed
                    .next()
                    .await
                    .context("closed before the answer")??;
                if frame.request_id == id {
                    return frame.kind.context("an answer without a kind");
                }
                if let Some(Resp::Error(e)) = frame.kind
                    && frame.request_id == 0
                {
                    anyhow::bail!("closed by the server: {}", e.message);
                }
            }
        };
        tokio::time::timeout(ANSWER, answer)
            .await
            .context("no answer in time")?
    }

    /// Writes bytes that need not be a whole frame.
    pub async fn write_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let tls = self.framed.get_mut();
        tls.write_all(bytes).await?;
        tls.flush().await?;
        Ok(())
    }

    /// Waits until the server closes the connection (reading and dropping what it sends).
    pub async fn closed(&mut self) {
        while let Some(Ok(_)) = self.framed.next().await {}
    }
}
