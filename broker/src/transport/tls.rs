//! TLS termination with rustls (ring provider), optional client certificates
//! and certificate reload without restart.
//!
//! Reload: with `reload_interval_s > 0`, [`TlsAcceptor::spawn_reloader`]
//! polls the modification time and size of the certificate, key and CA
//! files. When any changed, the configuration is rebuilt; new handshakes use
//! it, established connections keep theirs. A rebuild that fails (e.g. the
//! certificate was replaced but not yet its key) keeps the previous
//! configuration, logs a warning, and is retried on the next change.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use x509_parser::extensions::GeneralName;

use crate::auth::CertIdentitySource;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    #[serde(deserialize_with = "crate::config::empty_is_none")]
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(deserialize_with = "crate::config::empty_is_none")]
    pub key: Option<PathBuf>,
    /// PEM CA bundle; set enables client certificates.
    #[serde(deserialize_with = "crate::config::empty_is_none")]
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a certificate (needs `client_ca`).
    pub require_client_cert: bool,
    /// Poll the files' mtime every this many seconds; 0 = no reload.
    pub reload_interval_s: u64,
}

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("tls.{0} is not set")]
    Missing(&'static str),
    #[error("tls.require_client_cert needs tls.client_ca (the CA bundle to verify clients with)")]
    RequireWithoutCa,
    #[error("{what} file {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} file {path}: {message}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("tls: {0}")]
    Config(String),
    #[error("client certificate: {0}")]
    BadPeerCert(String),
}

/// The verified client certificate's names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerCert {
    pub common_name: Option<String>,
    pub san_dns: Vec<String>,
    pub san_email: Vec<String>,
    pub san_uri: Vec<String>,
}

impl PeerCert {
    /// The identity named by `src`, if the certificate has that field.
    pub fn identity(&self, src: CertIdentitySource) -> Option<String> {
        match src {
            CertIdentitySource::Cn => self.common_name.clone(),
            CertIdentitySource::SanDns => self.san_dns.first().cloned(),
            CertIdentitySource::SanEmail => self.san_email.first().cloned(),
            CertIdentitySource::SanUri => self.san_uri.first().cloned(),
        }
    }

    /// Extracts the names from a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<PeerCert, TlsError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| TlsError::BadPeerCert(e.to_string()))?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string);
        let mut pc = PeerCert {
            common_name,
            ..PeerCert::default()
        };
        let san = cert
            .subject_alternative_name()
            .map_err(|e| TlsError::BadPeerCert(e.to_string()))?;
        for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
            match name {
                GeneralName::DNSName(s) => pc.san_dns.push(s.to_string()),
                GeneralName::RFC822Name(s) => pc.san_email.push(s.to_string()),
                GeneralName::URI(s) => pc.san_uri.push(s.to_string()),
                _ => {}
            }
        }
        Ok(pc)
    }
}

/// Modification time and size of each watched file (`None`: unreadable).
type Stamps = Vec<Option<(SystemTime, u64)>>;

struct Inner {
    cfg: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    seen: Mutex<Stamps>,
    reloader_started: AtomicBool,
}

/// Accepts TLS connections with the current configuration. Cheap to clone.
#[derive(Clone)]
pub struct TlsAcceptor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    // Explicit provider: never depends on which rustls features other crates
    // in the build enable.
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Io {
        what,
        path: path.into(),
        source,
    })
}

fn pem_err(what: &'static str, path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        what,
        path: path.into(),
        message: e.to_string(),
    }
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(what, path, e))?;
    if certs.is_empty() {
        return Err(pem_err(what, path, "no PEM certificate found"));
    }
    Ok(certs)
}

fn build(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let cert = cfg.cert.as_deref().ok_or(TlsError::Missing("cert"))?;
    let key_path = cfg.key.as_deref().ok_or(TlsError::Missing("key"))?;
    if cfg.require_client_cert && cfg.client_ca.is_none() {
        return Err(TlsError::RequireWithoutCa);
    }
    let chain = load_certs("certificate", cert)?;
    let key_pem = read("key", key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            pem_err("key", key_path, "no PEM private key found")
        }
        e => pem_err("key", key_path, e),
    })?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = if let Some(client_ca) = cfg.client_ca.as_deref() {
        let mut roots = RootCertStore::empty();
        for ca in load_certs("client CA", client_ca)? {
            roots
                .add(ca)
                .map_err(|e| pem_err("client CA", client_ca, e))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        let verifier = if cfg.require_client_cert {
            verifier
        } else {
            verifier.allow_unauthenticated()
        };
        builder.with_client_cert_verifier(
            verifier
                .build()
                .map_err(|e| pem_err("client CA", client_ca, e))?,
        )
    } else {
        builder.with_no_client_auth()
    };
    let server = builder.with_single_cert(chain, key).map_err(|e| {
        TlsError::Config(format!(
            "certificate {} with key {}: {e}",
            cert.display(),
            key_path.display()
        ))
    })?;
    Ok(Arc::new(server))
}

fn stamps(cfg: &TlsConfig) -> Stamps {
    [&cfg.cert, &cfg.key, &cfg.client_ca]
        .into_iter()
        .flatten()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

impl Inner {
    fn install(&self, server: Arc<ServerConfig>) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = server;
    }

    /// Rebuilds when a watched file changed since the last look.
    fn reload_if_changed(&self) {
        let now = stamps(&self.cfg);
        {
            let mut seen = self
                .seen
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if *seen == now {
                return;
            }
            *seen = now;
        }
        match build(&self.cfg) {
            Ok(server) => {
                self.install(server);
                tracing::info!(cert = ?self.cfg.cert, "TLS certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS reload failed; keeping the previous certificate")
            }
        }
    }
}

impl TlsAcceptor {
    pub fn new(cfg: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
        // Stamps first: a change racing with the read is then seen as a change.
        let seen = stamps(cfg);
        let server = build(cfg)?;
        Ok(TlsAcceptor {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                current: RwLock::new(server),
                seen: Mutex::new(seen),
                reloader_started: AtomicBool::new(false),
            }),
        })
    }

    /// Spawns the reload watcher (certificate reload without restart); does
    /// nothing when `reload_interval_s` is 0 or a watcher already runs. The
    /// watcher ends when the last clone of the acceptor is dropped.
    pub fn spawn_reloader(&self) {
        let secs = self.inner.cfg.reload_interval_s;
        if secs == 0 || self.inner.reloader_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(secs));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                // File reads and key parsing are blocking work.
                let _ = tokio::task::spawn_blocking(move || inner.reload_if_changed()).await;
            }
        });
    }

    /// Rebuilds the configuration from the files now (e.g. on SIGHUP). On
    /// error the previous configuration stays in force. Blocking (file
    /// reads): call it from `spawn_blocking` inside the runtime.
    pub fn reload(&self) -> Result<(), TlsError> {
        let seen = stamps(&self.inner.cfg);
        let server = build(&self.inner.cfg)?;
        self.inner.install(server);
        *self
            .inner
            .seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = seen;
        Ok(())
    }

    fn current(&self) -> Arc<ServerConfig> {
        self.inner
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Runs the server handshake. The caller bounds it in time (e.g. with the
    /// CONNECT timeout): a silent peer would otherwise hold it forever.
    /// Returns the client certificate's names when the client presented one
    /// (rustls has verified it against `client_ca` by then).
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        s: S,
    ) -> io::Result<(tokio_rustls::server::TlsStream<S>, Option<PeerCert>)> {
        let stream = tokio_rustls::TlsAcceptor::from(self.current())
            .accept(s)
            .await?;
        let peer = match stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
        {
            Some(der) => Some(
                PeerCert::from_der(der.as_ref())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
            ),
            None => None,
        };
        Ok((stream, peer))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub(crate) struct Ca {
        pub cert: rcgen::Certificate,
        pub key: KeyPair,
    }

    pub(crate) fn ca(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ca {
            cert: p.self_signed(&key).unwrap(),
            key,
        }
    }

    pub(crate) fn leaf(
        ca: &Ca,
        cn: &str,
        sans: Vec<SanType>,
        eku: ExtendedKeyUsagePurpose,
    ) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names = sans;
        p.extended_key_usages = vec![eku];
        (p.signed_by(&key, &ca.cert, &ca.key).unwrap(), key)
    }

    pub(crate) fn dns(name: &str) -> SanType {
        SanType::DnsName(name.try_into().unwrap())
    }

    /// A temporary directory holding a CA, a server certificate for
    /// `localhost` and the matching files.
    pub(crate) struct Pki {
        pub dir: PathBuf,
        pub ca: Ca,
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    impl Pki {
        pub(crate) fn new() -> Pki {
            let dir = std::env::temp_dir().join(format!("lodestream-tls-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&dir).unwrap();
            let pki = Pki {
                dir,
                ca: ca("Lodestream Test CA"),
            };
            pki.write_server("server-1");
            std::fs::write(pki.path("ca.pem"), pki.ca.cert.pem()).unwrap();
            pki
        }

        pub(crate) fn path(&self, name: &str) -> String {
            self.dir.join(name).display().to_string()
        }

        pub(crate) fn write_server(&self, cn: &str) {
            let (cert, key) = leaf(
                &self.ca,
                cn,
                vec![dns("localhost")],
                ExtendedKeyUsagePurpose::ServerAuth,
            );
            std::fs::write(self.path("server.pem"), cert.pem()).unwrap();
            std::fs::write(self.path("server.key"), key.serialize_pem()).unwrap();
        }

        pub(crate) fn config(&self, mtls: bool) -> TlsConfig {
            TlsConfig {
                cert: Some(self.path("server.pem").into()),
                key: Some(self.path("server.key").into()),
                client_ca: mtls.then(|| self.path("ca.pem").into()),
                require_client_cert: false,
                reload_interval_s: 0,
            }
        }

        pub(crate) fn client(
            &self,
            client_cert: Option<(&rcgen::Certificate, &KeyPair)>,
        ) -> tokio_rustls::TlsConnector {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca.cert.der().clone()).unwrap();
            let b = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots);
            let cfg = match client_cert {
                Some((cert, key)) => b
                    .with_client_auth_cert(
                        vec![cert.der().clone()],
                        PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
                    )
                    .unwrap(),
                None => b.with_no_client_auth(),
            };
            tokio_rustls::TlsConnector::from(Arc::new(cfg))
        }
    }

    /// Handshakes over an in-memory pipe; returns the server side's result and
    /// the server certificate's CN as seen by the client.
    async fn handshake(
        acceptor: &TlsAcceptor,
        connector: tokio_rustls::TlsConnector,
    ) -> (io::Result<Option<PeerCert>>, Option<String>) {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let server = async {
            let (mut tls, peer) = acceptor.accept(s).await?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            tls.write_all(&buf).await?;
            tls.flush().await?;
            Ok(peer)
        };
        let client = async {
            let mut tls = connector
                .connect(ServerName::try_from("localhost").unwrap(), c)
                .await
                .ok()?;
            tls.write_all(b"ping").await.ok()?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.ok()?;
            assert_eq!(&buf, b"ping");
            let der = tls.get_ref().1.peer_certificates()?.first()?.clone();
            PeerCert::from_der(der.as_ref()).ok()?.common_name
        };
        tokio::join!(server, client)
    }

    #[tokio::test]
    async fn server_handshake_with_a_rustls_client() {
        let pki = Pki::new();
        let acceptor = TlsAcceptor::new(&pki.config(false)).unwrap();
        let (server, server_cn) = handshake(&acceptor, pki.client(None)).await;
        assert_eq!(server.unwrap(), None, "no client certificate");
        assert_eq!(server_cn.as_deref(), Some("server-1"));
    }

    #[tokio::test]
    async fn mutual_tls_extracts_the_client_names() {
        let pki = Pki::new();
        let acceptor = TlsAcceptor::new(&TlsConfig {
            require_client_cert: true,
            ..pki.config(true)
        })
        .unwrap();
        let (cert, key) = leaf(
            &pki.ca,
            "truck-7",
            vec![
                dns("truck-7.fleet.example"),
                SanType::Rfc822Name("ops@fleet.example".try_into().unwrap()),
                SanType::URI("spiffe://fleet/truck-7".try_into().unwrap()),
            ],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let (server, _) = handshake(&acceptor, pki.client(Some((&cert, &key)))).await;
        let peer = server.unwrap().expect("client certificate");
        assert_eq!(peer.common_name.as_deref(), Some("truck-7"));
        assert_eq!(
            peer.identity(CertIdentitySource::Cn).as_deref(),
            Some("truck-7")
        );
        assert_eq!(
            peer.identity(CertIdentitySource::SanDns).as_deref(),
            Some("truck-7.fleet.example")
        );
        assert_eq!(
            peer.identity(CertIdentitySource::SanEmail).as_deref(),
            Some("ops@fleet.example")
        );
        assert_eq!(
            peer.identity(CertIdentitySource::SanUri).as_deref(),
            Some("spiffe://fleet/truck-7")
        );
    }

    #[tokio::test]
    async fn client_certificate_from_an_unknown_ca_is_rejected() {
        let pki = Pki::new();
        let acceptor = TlsAcceptor::new(&pki.config(true)).unwrap();
        let other = ca("Someone Else");
        let (cert, key) = leaf(
            &other,
            "intruder",
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let (server, _) = handshake(&acceptor, pki.client(Some((&cert, &key)))).await;
        assert!(server.is_err(), "{server:?}");
    }

    #[tokio::test]
    async fn missing_client_certificate_is_refused_only_when_required() {
        let pki = Pki::new();
        let optional = TlsAcceptor::new(&pki.config(true)).unwrap();
        let (server, _) = handshake(&optional, pki.client(None)).await;
        assert_eq!(server.unwrap(), None);
        let required = TlsAcceptor::new(&TlsConfig {
            require_client_cert: true,
            ..pki.config(true)
        })
        .unwrap();
        let (server, _) = handshake(&required, pki.client(None)).await;
        assert!(server.is_err());
    }

    #[tokio::test]
    async fn reload_picks_up_a_new_certificate() {
        let pki = Pki::new();
        let acceptor = TlsAcceptor::new(&TlsConfig {
            reload_interval_s: 1,
            ..pki.config(false)
        })
        .unwrap();
        acceptor.spawn_reloader();
        assert_eq!(
            handshake(&acceptor, pki.client(None)).await.1.as_deref(),
            Some("server-1")
        );
        pki.write_server("server-2");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let cn = handshake(&acceptor, pki.client(None)).await.1;
            if cn.as_deref() == Some("server-2") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not reloaded: {cn:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn failed_reload_keeps_the_previous_certificate() {
        let pki = Pki::new();
        let acceptor = TlsAcceptor::new(&pki.config(false)).unwrap();
        // New certificate, old key: inconsistent until the key arrives.
        let key = std::fs::read(pki.path("server.key")).unwrap();
        pki.write_server("server-2");
        std::fs::write(pki.path("server.key"), key).unwrap();
        let e = acceptor.reload().unwrap_err().to_string();
        assert!(e.contains("server.pem"), "{e}");
        assert_eq!(
            handshake(&acceptor, pki.client(None)).await.1.as_deref(),
            Some("server-1")
        );
    }

    #[test]
    fn configuration_errors_name_the_file() {
        let pki = Pki::new();
        let e = TlsAcceptor::new(&TlsConfig {
            cert: Some("/nonexistent/cert.pem".into()),
            ..pki.config(false)
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("certificate file /nonexistent/cert.pem"), "{e}");
        std::fs::write(pki.path("empty.pem"), "not pem\n").unwrap();
        let e = TlsAcceptor::new(&TlsConfig {
            key: Some(pki.path("empty.pem").into()),
            ..pki.config(false)
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("key file") && e.contains("empty.pem"), "{e}");
        let e = TlsAcceptor::new(&TlsConfig {
            client_ca: Some(pki.path("empty.pem").into()),
            ..pki.config(false)
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("client CA file") && e.contains("empty.pem"),
            "{e}"
        );
        let e = TlsAcceptor::new(&TlsConfig {
            require_client_cert: true,
            ..pki.config(false)
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("client_ca"), "{e}");
        assert!(matches!(
            TlsAcceptor::new(&TlsConfig::default()),
            Err(TlsError::Missing("cert"))
        ));
    }
}
