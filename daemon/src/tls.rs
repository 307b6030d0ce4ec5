//! TLS for the client port: rustls with ALPN `messenger/1`, certificates from PEM files that
//! can be reloaded without a restart (SIGHUP), or — when none are configured — a development
//! CA and certificate generated into the data directory so a bare `messengerd` just works.
//! Clients trust the development CA file or pin the certificate's SHA-256 fingerprint.
//!
//! The development leaf lives a year and is renewed at start when it has less than 30 days
//! left, signed by the same CA (so clients that trust `dev-ca.pem` keep working; a pinned
//! fingerprint changes with each renewal). The CA lives ten years: clients import it once.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("certificate or key rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("generating the development certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Where the served certificate comes from, and how clients can trust it.
#[derive(Debug, Clone)]
pub struct CertSource {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The generated development CA, when the certificate is the development one.
    pub dev_ca: Option<PathBuf>,
}

/// The acceptor plus what operators and tests need to know about the certificate.
pub struct Tls {
    pub acceptor: TlsAcceptor,
    pub source: CertSource,
    resolver: Arc<ReloadableCert>,
    provider: Arc<CryptoProvider>,
}

impl Tls {
    /// Loads the configured certificate, or creates/reuses the development one.
    pub fn load(config: &Config) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let source = match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) => CertSource {
                cert: cert.clone(),
                key: key.clone(),
                dev_ca: None,
            },
            _ => {
                ensure_dev_certificate(&config.data_dir.join("tls"), &provider, SystemTime::now())?
            }
        };
        let key = load_certified_key(&source, &provider)?;
        let resolver = Arc::new(ReloadableCert {
            current: RwLock::new(Arc::new(key)),
        });
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        // Native clients ask for `messenger/1`; browsers (the WebSocket bridge) for `http/1.1`.
        server.alpn_protocols = vec![messenger_protocol::ALPN.to_vec()];
        if config.web.enabled {
            server.alpn_protocols.push(b"http/1.1".to_vec());
        }
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            source,
            resolver,
            provider,
        })
    }

    /// Re-reads the certificate and key files; new handshakes use them, open connections keep
    /// theirs. Returns the fingerprint now served. On error the old certificate stays in
    /// service.
    pub fn reload(&self) -> Result<String, TlsError> {
        let key = load_certified_key(&self.source, &self.provider)?;
        let fingerprint = key
            .cert
            .first()
            .map(|c| fingerprint_hex(c.as_ref()))
            .unwrap_or_default();
        let mut current = self
            .resolver
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *current = Arc::new(key);
        Ok(fingerprint)
    }

    /// SHA-256 of the served leaf certificate, as colon-separated upper-case hex.
    pub fn fingerprint(&self) -> String {
        let current = self
            .resolver
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        current
            .cert
            .first()
            .map(|c| fingerprint_hex(c.as_ref()))
            .unwrap_or_default()
    }
}

/// Serves whatever certificate was loaded last.
#[derive(Debug)]
struct ReloadableCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
        )
    }
}

fn load_certified_key(
    source: &CertSource,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let certs = CertificateDer::pem_file_iter(&source.cert)
        .map_err(|e| pem_error(&source.cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(&source.cert, e))?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: source.cert.clone(),
            message: "no certificate found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&source.key).map_err(|e| pem_error(&source.key, e))?;
    Ok(CertifiedKey::from_der(certs, key, provider)?)
}

fn pem_error(path: &Path, e: rustls_pki_types::pem::Error) -> TlsError {
    TlsError::Pem {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

pub fn fingerprint_hex(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

const DAY: Duration = Duration::from_secs(24 * 3600);
/// A year, like publicly issued certificates: a leaked development key stops working.
const DEV_LEAF_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Clients import the CA once, so it outlives many leaves; its key signs only loopback names
/// (name constraints), so keeping it for renewals does not let it vouch for anything else.
const DEV_CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// A leaf with less than this left is renewed at start.
const DEV_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// The names the development leaf is for.
const DEV_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Makes sure `dir/{dev-ca.pem, dev-ca-key.pem, cert.pem, key.pem}` hold a development CA and
/// a leaf for `localhost`, `127.0.0.1` and `::1` signed by it, valid for at least 30 days from
/// `now`: keeps them if so, else renews the leaf with the same CA, or, when that CA cannot
/// sign (its key is missing, as in data directories from before renewals existed) or expires
/// too, makes a new CA.
pub(crate) fn ensure_dev_certificate(
    dir: &Path,
    provider: &Arc<CryptoProvider>,
    now: SystemTime,
) -> Result<CertSource, TlsError> {
    let source = CertSource {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        dev_ca: Some(dir.join("dev-ca.pem")),
    };
    let ca_cert = dir.join("dev-ca.pem");
    let ca_key = dir.join("dev-ca-key.pem");
    if source.cert.exists() && source.key.exists() {
        match dev_leaf_valid_at(&source, provider, now + DEV_RENEW_BEFORE) {
            Ok(()) => return Ok(source),
            Err(why) => info!(%why, "renewing the development certificate"),
        }
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    if ca_cert.exists() && ca_key.exists() {
        let key_pem = std::fs::read_to_string(&ca_key).map_err(io(&ca_key))?;
        match rcgen::KeyPair::from_pem(&key_pem) {
            Ok(key) => {
                let issuer = rcgen::Issuer::new(dev_ca_params(now)?, key);
                write_dev_leaf(&source, &issuer, now)?;
                match dev_leaf_valid_at(&source, provider, now + DEV_RENEW_BEFORE) {
                    Ok(()) => return Ok(source),
                    Err(why) => warn!(%why, "the development CA cannot sign a usable certificate"),
                }
            }
            Err(e) => warn!(error = %e, "the development CA key is unreadable"),
        }
    }
    if ca_cert.exists() {
        warn!(
            path = %ca_cert.display(),
            "generating a new development CA: clients must trust the new dev-ca.pem"
        );
    }
    let ca_key_pair = rcgen::KeyPair::generate()?;
    let ca = rcgen::CertifiedIssuer::self_signed(dev_ca_params(now)?, ca_key_pair)?;
    std::fs::write(&ca_cert, ca.pem()).map_err(io(&ca_cert))?;
    write_private(&ca_key, ca.key().serialize_pem().as_bytes()).map_err(io(&ca_key))?;
    write_dev_leaf(&source, &ca, now)?;
    Ok(source)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError {
    let path = path.to_path_buf();
    move |source| TlsError::Io { path, source }
}

/// The development CA's parameters. Signing a renewed leaf rebuilds them around the kept key:
/// the leaf's issuer name and authority key id come from these and the key, so they match the
/// CA certificate written at first start.
fn dev_ca_params(now: SystemTime) -> Result<rcgen::CertificateParams, TlsError> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Messenger development CA");
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let mut v6_loopback = [0u8; 16];
    v6_loopback[15] = 1;
    params.name_constraints = Some(rcgen::NameConstraints {
        permitted_subtrees: vec![
            rcgen::GeneralSubtree::DnsName("localhost".into()),
            rcgen::GeneralSubtree::IpAddress(rcgen::CidrSubnet::V4([127, 0, 0, 0], [255, 0, 0, 0])),
            rcgen::GeneralSubtree::IpAddress(rcgen::CidrSubnet::V6(v6_loopback, [0xff; 16])),
        ],
        excluded_subtrees: Vec::new(),
    });
    // A day of slack for clocks behind this one.
    params.not_before = (now - DAY).into();
    params.not_after = (now + DEV_CA_LIFETIME).into();
    Ok(params)
}

/// Writes a fresh development leaf (new key) signed by `ca`, valid for a year from `now`.
fn write_dev_leaf<S: rcgen::SigningKey>(
    source: &CertSource,
    ca: &rcgen::Issuer<'_, S>,
    now: SystemTime,
) -> Result<(), TlsError> {
    let mut params = rcgen::CertificateParams::new(DEV_NAMES.map(String::from).to_vec())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "messengerd development");
    // Strict verifiers (Python's default X509_STRICT, for one) require the AKI extension.
    params.use_authority_key_identifier_extension = true;
    params.not_before = (now - DAY).into();
    params.not_after = (now + DEV_LEAF_LIFETIME).into();
    let key = rcgen::KeyPair::generate()?;
    let leaf = params.signed_by(&key, ca)?;
    // The key first: a crash between the two writes leaves a pair that fails to load, which
    // the next start renews, rather than a new certificate served with an old key.
    write_private(&source.key, key.serialize_pem().as_bytes()).map_err(io(&source.key))?;
    std::fs::write(&source.cert, leaf.pem()).map_err(io(&source.cert))?;
    Ok(())
}

/// Whether the development leaf verifies against the development CA for `localhost` at `at`,
/// the way a client trusting the CA would check it; the reason when not.
pub(crate) fn dev_leaf_valid_at(
    source: &CertSource,
    provider: &Arc<CryptoProvider>,
    at: SystemTime,
) -> Result<(), String> {
    let ca = source.dev_ca.as_deref().ok_or("no development CA")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let leaf = CertificateDer::pem_file_iter(&source.cert)
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no certificate")?
        .map_err(|e| e.to_string())?;
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| e.to_string())?;
    let since_epoch = at.duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    verifier
        .verify_server_cert(
            &leaf,
            &[],
            &name,
            &[],
            UnixTime::since_unix_epoch(since_epoch),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    fn days(n: u64) -> Duration {
        DAY * u32::try_from(n).expect("few days")
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).expect("read")
    }

    #[test]
    fn the_development_leaf_lives_a_year() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let source = ensure_dev_certificate(dir.path(), &provider(), now).expect("generate");
        dev_leaf_valid_at(&source, &provider(), now).expect("valid now");
        dev_leaf_valid_at(&source, &provider(), now + days(364)).expect("valid in 364 days");
        let late = dev_leaf_valid_at(&source, &provider(), now + days(366));
        assert!(
            late.as_ref().is_err_and(|e| e.contains("expired")),
            "{late:?}"
        );
    }

    #[test]
    fn an_expiring_leaf_is_renewed_at_start_by_the_same_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        // Made 340 days ago: 25 days left, under the 30-day renewal margin.
        let source =
            ensure_dev_certificate(dir.path(), &provider(), now - days(340)).expect("generate");
        let ca = read(source.dev_ca.as_deref().expect("dev CA"));
        let old_leaf = read(&source.cert);
        let old_key = read(&source.key);

        let renewed = ensure_dev_certificate(dir.path(), &provider(), now).expect("renew");
        assert_ne!(read(&renewed.cert), old_leaf, "the leaf was not renewed");
        assert_ne!(read(&renewed.key), old_key, "the renewed leaf kept its key");
        assert_eq!(
            read(renewed.dev_ca.as_deref().expect("dev CA")),
            ca,
            "the CA clients trust changed"
        );
        // Verified against the CA file written at first start.
        dev_leaf_valid_at(&renewed, &provider(), now + days(364)).expect("valid for a year");

        // A leaf with most of its year left is kept as it is.
        let kept = ensure_dev_certificate(dir.path(), &provider(), now).expect("keep");
        assert_eq!(read(&kept.cert), read(&renewed.cert));
    }

    #[test]
    fn without_the_ca_key_an_expiring_leaf_gets_a_new_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = SystemTime::now();
        let source =
            ensure_dev_certificate(dir.path(), &provider(), now - days(340)).expect("generate");
        let ca = read(source.dev_ca.as_deref().expect("dev CA"));
        std::fs::remove_file(dir.path().join("dev-ca-key.pem")).expect("remove CA key");
        let renewed = ensure_dev_certificate(dir.path(), &provider(), now).expect("renew");
        assert_ne!(read(renewed.dev_ca.as_deref().expect("dev CA")), ca);
        dev_leaf_valid_at(&renewed, &provider(), now + days(364)).expect("valid for a year");
    }

    #[test]
    fn a_reload_reports_the_new_certificates_fingerprint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let tls = Tls::load(&config).expect("load");
        let before = tls.fingerprint();
        // What a start 340 days from now would do: renew the leaf in place.
        ensure_dev_certificate(
            &dir.path().join("tls"),
            &provider(),
            SystemTime::now() + days(340),
        )
        .expect("renew");
        let on_disk = CertificateDer::pem_file_iter(&tls.source.cert)
            .expect("pem")
            .next()
            .expect("a certificate")
            .expect("valid pem");
        let reported = tls.reload().expect("reload");
        assert_ne!(reported, before, "the reload reported the old certificate");
        assert_eq!(reported, fingerprint_hex(on_disk.as_ref()));
        assert_eq!(tls.fingerprint(), reported);
    }
}
