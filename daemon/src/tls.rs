//! TLS for the client port: rustls with ALPN `messenger/1`, certificates from PEM files that
//! can be reloaded without a restart (SIGHUP), or — when none are configured — a development
//! CA and certificate generated once into the data directory so a bare `messengerd` just works.
//! Clients trust the development CA file or pin the certificate's SHA-256 fingerprint.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

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
        let source = match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) => CertSource {
                cert: cert.clone(),
                key: key.clone(),
                dev_ca: None,
            },
            _ => ensure_dev_certificate(&config.data_dir.join("tls"))?,
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
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
    /// theirs. On error the old certificate stays in service.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load_certified_key(&self.source, &self.provider)?;
        let mut current = self
            .resolver
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *current = Arc::new(key);
        Ok(())
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

/// Creates `dir/{dev-ca.pem, cert.pem, key.pem}` unless they exist: a private CA and a leaf
/// for `localhost`, `127.0.0.1` and `::1` signed by it. The CA key is not kept, so the CA
/// cannot sign anything else.
fn ensure_dev_certificate(dir: &Path) -> Result<CertSource, TlsError> {
    let source = CertSource {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        dev_ca: Some(dir.join("dev-ca.pem")),
    };
    if source.cert.exists() && source.key.exists() {
        return Ok(source);
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;

    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Messenger development CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate()?)?;

    let mut leaf_params = rcgen::CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])?;
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "messengerd development");
    // Strict verifiers (Python's default X509_STRICT, for one) require the AKI extension.
    leaf_params.use_authority_key_identifier_extension = true;
    let leaf_key = rcgen::KeyPair::generate()?;
    let leaf = leaf_params.signed_by(&leaf_key, &ca)?;

    let ca_path = source.dev_ca.clone().unwrap_or_default();
    std::fs::write(&ca_path, ca.pem()).map_err(io(&ca_path))?;
    std::fs::write(&source.cert, leaf.pem()).map_err(io(&source.cert))?;
    write_private(&source.key, leaf_key.serialize_pem().as_bytes()).map_err(io(&source.key))?;
    Ok(source)
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
