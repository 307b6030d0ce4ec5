//! Trust: how the client decides that it talks to the real server.
//!
//! Two modes, and deliberately no third one:
//!
//! - a custom CA ([`Trust::CaFile`], [`Trust::CaPem`]): the server's chain is verified by
//!   rustls's `WebPkiServerVerifier` against those roots only, including the server name;
//! - a pinned SHA-256 fingerprint of the server's end-entity certificate
//!   ([`Trust::Fingerprint`]): the leaf's DER must hash to the pin. Name and validity dates
//!   are not checked in this mode (the pin *is* the identity, as with a self-signed
//!   certificate), but the handshake signatures are still verified against the leaf's key,
//!   so a peer that merely replays the certificate without its private key is refused.
//!
//! This module must never offer an accept-anything verifier, not even for tests.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

use super::ClientError;

/// What the client trusts when it verifies the server's certificate.
#[derive(Clone, PartialEq, Eq)]
pub enum Trust {
    /// A PEM file of one or more CA certificates (or the server's self-signed certificate).
    CaFile(PathBuf),
    /// The same, already in memory.
    CaPem(Vec<u8>),
    /// SHA-256 of the DER of the server's end-entity certificate.
    Fingerprint([u8; 32]),
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trust::CaFile(p) => f.debug_tuple("CaFile").field(p).finish(),
            Trust::CaPem(pem) => write!(f, "CaPem({} bytes)", pem.len()),
            Trust::Fingerprint(fp) => write!(f, "Fingerprint({})", format_fingerprint(fp)),
        }
    }
}

/// The crypto provider every connection uses (aws-lc-rs), without touching the process-wide
/// default, so an application may install a different one for its own purposes.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Parses a certificate fingerprint: 64 hex digits, upper or lower case, optionally as
/// colon-separated pairs (`AB:CD:...`), optionally prefixed with `sha256:`.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], ClientError> {
    let bad = |why: &str| ClientError::Config(format!("invalid sha256 fingerprint: {why}"));
    let s = s.trim();
    let s = match s.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("sha256:") => &s[7..],
        _ => s,
    };
    let digits: Vec<u8> = if s.contains(':') {
        let mut out = Vec::with_capacity(64);
        for pair in s.split(':') {
            if pair.len() != 2 {
                return Err(bad(
                    "colon-separated form needs exactly two hex digits per byte",
                ));
            }
            out.extend_from_slice(pair.as_bytes());
        }
        out
    } else {
        s.as_bytes().to_vec()
    };
    if digits.len() != 64 {
        return Err(bad(&format!(
            "expected 64 hex digits, found {}",
            digits.len()
        )));
    }
    let mut fp = [0u8; 32];
    for (i, chunk) in digits.chunks_exact(2).enumerate() {
        let hi = hex_value(chunk[0]).ok_or_else(|| bad("not a hex digit"))?;
        let lo = hex_value(chunk[1]).ok_or_else(|| bad("not a hex digit"))?;
        fp[i] = (hi << 4) | lo;
    }
    Ok(fp)
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Formats a fingerprint the way [`parse_fingerprint`] reads it back: `sha256:` and 64
/// lowercase hex digits.
pub fn format_fingerprint(fp: &[u8; 32]) -> String {
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in fp {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// SHA-256 of a certificate's DER: the value [`Trust::Fingerprint`] pins.
pub fn certificate_fingerprint(cert_der: &[u8]) -> [u8; 32] {
    Sha256::digest(cert_der).into()
}

/// Builds the rustls client configuration for `trust`, with ALPN `messenger/1`.
pub fn client_config(trust: &Trust) -> Result<Arc<ClientConfig>, ClientError> {
    let provider = crypto_provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut config = match trust {
        Trust::CaFile(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| {
                    ClientError::Config(format!("cannot read CA file {}: {e}", path.display()))
                })?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    ClientError::Config(format!("bad PEM in CA file {}: {e}", path.display()))
                })?;
            let verifier = webpki_verifier(certs, &provider, &path.display().to_string())?;
            builder.with_webpki_verifier(verifier).with_no_client_auth()
        }
        Trust::CaPem(pem) => {
            let certs = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ClientError::Config(format!("bad CA PEM: {e}")))?;
            let verifier = webpki_verifier(certs, &provider, "the CA PEM")?;
            builder.with_webpki_verifier(verifier).with_no_client_auth()
        }
        Trust::Fingerprint(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCertVerifier {
                fingerprint: *fp,
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![crate::ALPN.to_vec()];
    Ok(Arc::new(config))
}

fn webpki_verifier(
    certs: Vec<CertificateDer<'static>>,
    provider: &Arc<CryptoProvider>,
    source: &str,
) -> Result<Arc<WebPkiServerVerifier>, ClientError> {
    if certs.is_empty() {
        return Err(ClientError::Config(format!(
            "no certificates found in {source}"
        )));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| {
            ClientError::Config(format!("unusable CA certificate in {source}: {e}"))
        })?;
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| ClientError::Config(format!("cannot build verifier from {source}: {e}")))
}

/// Accepts exactly the end-entity certificate whose SHA-256 is `fingerprint`, and verifies
/// the handshake signatures with that certificate's key.
#[derive(Debug)]
struct PinnedCertVerifier {
    fingerprint: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = certificate_fingerprint(end_entity.as_ref());
        if got == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(FingerprintMismatch { got })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

struct FingerprintMismatch {
    got: [u8; 32],
}

// rustls shows the Debug form of an `OtherError` in its messages: make it the readable one.
impl std::fmt::Debug for FingerprintMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for FingerprintMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "server certificate fingerprint {} does not match the pinned fingerprint",
            format_fingerprint(&self.got)
        )
    }
}

impl std::error::Error for FingerprintMismatch {}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn expected() -> [u8; 32] {
        let mut fp = [0u8; 32];
        for (i, b) in fp.iter_mut().enumerate() {
            *b = ((i % 16) as u8) * 0x11;
        }
        fp
    }

    #[test]
    fn parses_plain_upper_colon_and_prefixed_forms() {
        let colon = HEX
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect::<Vec<_>>()
            .join(":");
        for s in [
            HEX.to_string(),
            HEX.to_uppercase(),
            colon.clone(),
            colon.to_uppercase(),
            format!("sha256:{HEX}"),
            format!("SHA256:{}", colon.to_uppercase()),
            format!("  sha256:{HEX}\n"),
        ] {
            assert_eq!(parse_fingerprint(&s).expect(&s), expected(), "{s}");
        }
    }

    #[test]
    fn format_and_parse_round_trip() {
        let fp = certificate_fingerprint(b"not really a certificate");
        assert_eq!(
            parse_fingerprint(&format_fingerprint(&fp)).expect("parse"),
            fp
        );
    }

    #[test]
    fn rejects_malformed_fingerprints() {
        let too_short = &HEX[..62];
        let too_long = format!("{HEX}00");
        let non_hex = format!("{}zz", &HEX[..62]);
        let bad_pairs = format!("0:{}", &HEX[1..]);
        let mixed = format!("{}:{}", &HEX[..32], &HEX[32..]);
        let trailing_colon = format!("{}:", HEX);
        for s in [
            "",
            "sha256:",
            too_short,
            &too_long,
            &non_hex,
            &bad_pairs,
            &mixed,
            &trailing_colon,
            "sha1:0011",
            "é",
        ] {
            assert!(
                matches!(parse_fingerprint(s), Err(ClientError::Config(_))),
                "{s:?} should be refused"
            );
        }
    }

    #[test]
    fn trust_from_a_pem_builds_a_config_with_alpn() {
        let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
        let config = client_config(&Trust::CaPem(key.cert.pem().into_bytes())).expect("config");
        assert_eq!(config.alpn_protocols, vec![crate::ALPN.to_vec()]);

        let dir = std::env::temp_dir().join(format!(
            "messenger-protocol-tls-test-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("ca.pem");
        std::fs::write(&path, key.cert.pem()).expect("write");
        client_config(&Trust::CaFile(path.clone())).expect("config from file");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir(&dir);
    }

    #[test]
    fn trust_without_certificates_is_a_config_error() {
        for trust in [
            Trust::CaPem(Vec::new()),
            Trust::CaPem(b"hello".to_vec()),
            Trust::CaFile(PathBuf::from("/nonexistent/messenger/ca.pem")),
        ] {
            assert!(
                matches!(client_config(&trust), Err(ClientError::Config(_))),
                "{trust:?}"
            );
        }
    }

    #[test]
    fn a_fingerprint_builds_a_config() {
        let config = client_config(&Trust::Fingerprint([7; 32])).expect("config");
        assert_eq!(config.alpn_protocols, vec![crate::ALPN.to_vec()]);
    }
}
