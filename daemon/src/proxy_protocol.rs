//! PROXY protocol v2: the binary header a TCP balancer (HAProxy `send-proxy-v2`) writes before
//! the client's bytes, naming the client's address. Owns reading exactly that header off a fresh
//! connection and turning it into the address limits and logs should see.
//!
//! It must never read past the header: the next byte belongs to the TLS handshake, and a
//! buffered over-read would be lost to rustls. So it reads the 16-byte fixed part, then exactly
//! the length that part announces (capped), and nothing else.

use std::net::SocketAddr;

use ppp::v2::{self, Addresses, Command, Protocol};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

/// The fixed part: 12-byte signature, version/command, family/protocol, 2-byte length.
const FIXED_LEN: usize = 16;

/// Largest address-and-TLV block accepted. HAProxy's own headers stay far below this (the
/// addresses are at most 216 bytes for UNIX sockets, TLVs such as a unique id a few hundred);
/// the cap keeps a hostile peer from making every connection allocate 64 KiB.
pub const MAX_PAYLOAD_LEN: usize = 1024;

/// Where a connection really comes from, as the balancer reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `PROXY`: a client's connection relayed by the balancer; its source address.
    Client(SocketAddr),
    /// `LOCAL`: the balancer speaking for itself (health checks); the socket's own peer.
    Local(SocketAddr),
}

impl Origin {
    /// The address to use for per-IP limits, counters and logs.
    pub fn addr(&self) -> SocketAddr {
        match *self {
            Origin::Client(a) | Origin::Local(a) => a,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY header before the deadline")]
    Timeout,
    #[error("connection closed after {0} bytes of the PROXY header")]
    Closed(usize),
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "PROXY protocol v1 (text) header received; only v2 is accepted (HAProxy: `send-proxy-v2`, not `send-proxy`)"
    )]
    TextV1,
    #[error(
        "connection starts with a TLS record, not a PROXY v2 header: it did not come through the balancer, or the balancer lacks `send-proxy-v2`"
    )]
    DirectTls,
    #[error("connection does not start with the PROXY v2 signature")]
    Signature,
    #[error(
        "PROXY header announces {0} bytes of addresses and TLVs; at most {MAX_PAYLOAD_LEN} are accepted"
    )]
    TooLong(usize),
    #[error("malformed PROXY v2 header: {0}")]
    Malformed(#[from] v2::ParseError),
    #[error("PROXY header for {0}; only TCP over IPv4 or IPv6 is accepted")]
    Unsupported(&'static str),
}

impl ProxyHeaderError {
    /// A short, bounded label for the metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Closed(_) | Self::Io(_) => "closed",
            Self::TextV1 => "v1",
            Self::DirectTls => "tls_without_header",
            Self::Signature => "signature",
            Self::TooLong(_) => "too_long",
            Self::Malformed(_) => "malformed",
            Self::Unsupported(_) => "unsupported",
        }
    }
}

/// [`read_header`] bounded by `deadline` (the connection's handshake deadline: the header
/// counts against the same budget as TLS, so a silent peer cannot hold a slot longer).
pub async fn read_header_by<R: AsyncRead + Unpin>(
    io: &mut R,
    peer: SocketAddr,
    deadline: Instant,
) -> Result<Origin, ProxyHeaderError> {
    tokio::time::timeout_at(deadline, read_header(io, peer))
        .await
        .unwrap_or(Err(ProxyHeaderError::Timeout))
}

/// Reads one PROXY v2 header from `io` and nothing after it. `peer` is the socket's own peer
/// address, returned for `LOCAL`.
pub async fn read_header<R: AsyncRead + Unpin>(
    io: &mut R,
    peer: SocketAddr,
) -> Result<Origin, ProxyHeaderError> {
    let mut header = vec![0u8; FIXED_LEN];
    let mut filled = 0;
    while filled < FIXED_LEN {
        let n = io.read(&mut header[filled..FIXED_LEN]).await?;
        if n == 0 {
            return Err(ProxyHeaderError::Closed(filled));
        }
        filled += n;
        // Judge the signature as soon as it diverges, so garbage shorter than 16 bytes is
        // refused at once instead of waiting for the deadline.
        let seen = filled.min(v2::PROTOCOL_PREFIX.len());
        if header[..seen] != v2::PROTOCOL_PREFIX[..seen] {
            return Err(classify_wrong_start(&header[..filled]));
        }
    }
    let len = usize::from(u16::from_be_bytes([header[14], header[15]]));
    if len > MAX_PAYLOAD_LEN {
        return Err(ProxyHeaderError::TooLong(len));
    }
    header.resize(FIXED_LEN + len, 0);
    let mut filled = FIXED_LEN;
    while filled < header.len() {
        let n = io.read(&mut header[filled..]).await?;
        if n == 0 {
            return Err(ProxyHeaderError::Closed(filled));
        }
        filled += n;
    }
    origin(&header, peer)
}

fn classify_wrong_start(start: &[u8]) -> ProxyHeaderError {
    const V1: &[u8] = b"PROXY ";
    let n = start.len().min(V1.len());
    if start[..n] == V1[..n] {
        ProxyHeaderError::TextV1
    } else if start.first() == Some(&0x16) {
        // 0x16 is the TLS handshake record type: a client that reached the daemon directly.
        ProxyHeaderError::DirectTls
    } else {
        ProxyHeaderError::Signature
    }
}

fn origin(bytes: &[u8], peer: SocketAddr) -> Result<Origin, ProxyHeaderError> {
    let header = v2::Header::try_from(bytes)?;
    match header.command {
        // The spec tells receivers to ignore the addresses of a LOCAL header.
        Command::Local => Ok(Origin::Local(peer)),
        Command::Proxy => {
            if header.protocol != Protocol::Stream {
                return Err(ProxyHeaderError::Unsupported(match header.protocol {
                    Protocol::Datagram => "UDP",
                    _ => "an unspecified protocol",
                }));
            }
            match header.addresses {
                Addresses::IPv4(a) => Ok(Origin::Client(SocketAddr::from((
                    a.source_address,
                    a.source_port,
                )))),
                Addresses::IPv6(a) => Ok(Origin::Client(SocketAddr::from((
                    a.source_address,
                    a.source_port,
                )))),
                // Falling back to the balancer's address would put every client behind it
                // under one per-IP limit; refusing makes the misconfiguration visible.
                Addresses::Unix(_) => Err(ProxyHeaderError::Unsupported("a UNIX socket")),
                Addresses::Unspecified => Err(ProxyHeaderError::Unsupported(
                    "an unspecified address family",
                )),
            }
        }
    }
}

/// A PROXY v2 header as HAProxy writes it; for tests and tools that stand in for a balancer.
pub fn encode_proxy(source: SocketAddr, destination: SocketAddr) -> std::io::Result<Vec<u8>> {
    let addresses: Addresses = match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            v2::IPv4::new(*s.ip(), *d.ip(), s.port(), d.port()).into()
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a {
                SocketAddr::V4(v4) => v4.ip().to_ipv6_mapped(),
                SocketAddr::V6(v6) => *v6.ip(),
            };
            v2::IPv6::new(v6(s), v6(d), s.port(), d.port()).into()
        }
    };
    v2::Builder::with_addresses(
        v2::Version::Two | Command::Proxy,
        Protocol::Stream,
        addresses,
    )
    .build()
}

/// A PROXY v2 `LOCAL` header (what HAProxy sends on its own health checks).
pub fn encode_local() -> std::io::Result<Vec<u8>> {
    v2::Builder::with_addresses(
        v2::Version::Two | Command::Local,
        Protocol::Unspecified,
        Addresses::Unspecified,
    )
    .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn peer() -> SocketAddr {
        "10.0.0.9:5000".parse().expect("addr")
    }

    async fn parse(bytes: &[u8]) -> Result<Origin, ProxyHeaderError> {
        let mut input = bytes;
        read_header(&mut input, peer()).await
    }

    #[tokio::test]
    async fn an_ipv4_header_names_the_client_and_leaves_the_next_bytes_unread() {
        let client: SocketAddr = "203.0.113.7:40000".parse().expect("addr");
        let mut bytes = encode_proxy(client, "10.0.0.1:7443".parse().expect("addr")).expect("h");
        bytes.extend_from_slice(b"\x16\x03\x01TLS follows");
        let mut input = bytes.as_slice();
        let origin = read_header(&mut input, peer()).await.expect("parsed");
        assert_eq!(origin, Origin::Client(client));
        assert_eq!(
            input, b"\x16\x03\x01TLS follows",
            "nothing after the header read"
        );
    }

    #[tokio::test]
    async fn an_ipv6_header_names_the_client() {
        let client: SocketAddr = "[2001:db8::5]:443".parse().expect("addr");
        let bytes = encode_proxy(client, "[2001:db8::1]:7443".parse().expect("addr")).expect("h");
        assert_eq!(parse(&bytes).await.expect("parsed"), Origin::Client(client));
    }

    #[tokio::test]
    async fn a_local_header_yields_the_socket_peer() {
        let bytes = encode_local().expect("h");
        assert_eq!(parse(&bytes).await.expect("parsed"), Origin::Local(peer()));
    }

    #[tokio::test]
    async fn a_header_split_into_single_bytes_is_reassembled() {
        let client: SocketAddr = "198.51.100.2:1234".parse().expect("addr");
        let mut bytes = encode_proxy(client, "10.0.0.1:7443".parse().expect("addr")).expect("h");
        let header_len = bytes.len();
        bytes.extend_from_slice(b"rest");
        let (mut tx, mut rx) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for b in bytes {
                tx.write_all(&[b]).await.expect("write");
                tokio::task::yield_now().await;
            }
            tx
        });
        let origin = read_header(&mut rx, peer()).await.expect("parsed");
        assert_eq!(origin, Origin::Client(client));
        let _tx = writer.await.expect("writer");
        let mut rest = [0u8; 4];
        rx.read_exact(&mut rest).await.expect("rest");
        assert_eq!(
            &rest, b"rest",
            "the {header_len}-byte header consumed nothing more"
        );
    }

    #[tokio::test]
    async fn an_oversized_length_is_refused_before_reading_it() {
        let mut bytes = v2::PROTOCOL_PREFIX.to_vec();
        bytes.extend_from_slice(&[0x21, 0x11]);
        bytes.extend_from_slice(&u16::MAX.to_be_bytes());
        // No payload follows: refusing must not wait for 64 KiB that never come.
        let err = parse(&bytes).await.expect_err("too long");
        assert!(matches!(err, ProxyHeaderError::TooLong(65535)), "{err}");
        assert_eq!(err.reason(), "too_long");
    }

    #[tokio::test]
    async fn a_v1_text_header_is_refused_with_a_clear_reason() {
        let err = parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 7443\r\n")
            .await
            .expect_err("v1");
        assert!(matches!(err, ProxyHeaderError::TextV1), "{err}");
        assert!(err.to_string().contains("send-proxy-v2"), "{err}");
    }

    #[tokio::test]
    async fn a_tls_client_hello_without_header_is_named_as_such() {
        let err = parse(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .expect_err("direct tls");
        assert!(matches!(err, ProxyHeaderError::DirectTls), "{err}");
    }

    #[tokio::test]
    async fn a_truncated_header_reports_the_close() {
        let bytes = encode_local().expect("h");
        let err = parse(&bytes[..10]).await.expect_err("truncated");
        assert!(matches!(err, ProxyHeaderError::Closed(10)), "{err}");
    }

    #[tokio::test]
    async fn a_proxy_header_too_short_for_its_addresses_is_malformed() {
        let mut bytes = v2::PROTOCOL_PREFIX.to_vec();
        // PROXY, TCP over IPv4, but only 4 of the 12 address bytes.
        bytes.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        let err = parse(&bytes).await.expect_err("malformed");
        assert!(matches!(err, ProxyHeaderError::Malformed(_)), "{err}");
    }

    #[tokio::test]
    async fn a_proxy_header_for_udp_is_unsupported() {
        let addresses: Addresses = v2::IPv4::new([1, 2, 3, 4], [5, 6, 7, 8], 1, 2).into();
        let bytes = v2::Builder::with_addresses(
            v2::Version::Two | Command::Proxy,
            Protocol::Datagram,
            addresses,
        )
        .build()
        .expect("h");
        let err = parse(&bytes).await.expect_err("udp");
        assert!(matches!(err, ProxyHeaderError::Unsupported("UDP")), "{err}");
    }

    #[tokio::test]
    async fn a_silent_peer_times_out_at_the_deadline() {
        let (_tx, mut rx) = tokio::io::duplex(64);
        let deadline = Instant::now() + std::time::Duration::from_millis(50);
        let err = read_header_by(&mut rx, peer(), deadline)
            .await
            .expect_err("timeout");
        assert!(matches!(err, ProxyHeaderError::Timeout), "{err}");
    }
}
