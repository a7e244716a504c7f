//! Transports and security stacked as the listeners use them, over real
//! loopback sockets and without Kafka: TCP -> TLS (client certificate) ->
//! WebSocket -> MQTT CONNECT -> authentication -> ACL, the way a browser or
//! device reaches the broker through `wss://`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use lodestream_broker::acl::{Acl, Action};
use lodestream_broker::auth::{AuthConfig, Authenticator, CertIdentitySource, Identity};
use lodestream_broker::transport::{self, TlsAcceptor, TlsConfig, WsConfig};
use lodestream_mqtt::{
    encode, ConnAck, Connect, Decoder, Packet, Properties, ProtocolVersion, ReasonCode,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

struct Pki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!("lodestream-it-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "Fleet CA");
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = p.self_signed(&ca_key).unwrap();
        let pki = Pki { dir, ca, ca_key };
        let (cert, key) = pki.leaf("broker", ExtendedKeyUsagePurpose::ServerAuth);
        std::fs::write(pki.path("server.pem"), cert.pem()).unwrap();
        std::fs::write(pki.path("server.key"), key.serialize_pem()).unwrap();
        std::fs::write(pki.path("ca.pem"), pki.ca.pem()).unwrap();
        pki
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn leaf(&self, cn: &str, eku: ExtendedKeyUsagePurpose) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names = vec![SanType::DnsName("localhost".try_into().unwrap())];
        p.extended_key_usages = vec![eku];
        (p.signed_by(&key, &self.ca, &self.ca_key).unwrap(), key)
    }

    fn tls_config(&self) -> TlsConfig {
        TlsConfig {
            cert: Some(self.path("server.pem").into()),
            key: Some(self.path("server.key").into()),
            client_ca: Some(self.path("ca.pem").into()),
            require_client_cert: false,
            reload_interval_s: 0,
        }
    }

    fn connector(&self, client: Option<&str>) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let b = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let cfg = match client {
            Some(cn) => {
                let (cert, key) = self.leaf(cn, ExtendedKeyUsagePurpose::ClientAuth);
                b.with_client_auth_cert(
                    vec![cert.der().clone()],
                    PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
                )
                .unwrap()
            }
            None => b.with_no_client_auth(),
        };
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    }
}

/// What a listener would do up to CONNACK, with the modules under test.
struct Server {
    tls: TlsAcceptor,
    ws: Option<WsConfig>,
    auth: Authenticator,
    acl: Acl,
}

/// Outcome seen by the server for one connection.
#[derive(Debug)]
struct Accepted {
    identity: Result<Identity, ReasonCode>,
    may_publish_gps: bool,
    may_subscribe_all: bool,
}

async fn read_connect<S: AsyncRead + Unpin>(s: &mut S) -> Connect {
    let mut dec = Decoder::new(64 * 1024);
    let mut buf = BytesMut::new();
    loop {
        if let Some(Packet::Connect(c)) = dec.decode(&mut buf).unwrap() {
            return *c;
        }
        assert!(
            s.read_buf(&mut buf).await.unwrap() > 0,
            "closed before CONNECT"
        );
    }
}

impl Server {
    async fn serve_one(&self, tcp: TcpStream, peer: SocketAddr) -> Accepted {
        let (tls, cert) = self.tls.accept(tcp).await.expect("TLS handshake");
        let cert_identity = cert.and_then(|c| c.identity(CertIdentitySource::Cn));
        match &self.ws {
            Some(cfg) => {
                let ws = transport::ws::accept(tls, cfg).await.expect("upgrade");
                self.mqtt(ws, cert_identity, peer).await
            }
            None => self.mqtt(tls, cert_identity, peer).await,
        }
    }

    async fn mqtt<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut s: S,
        cert_identity: Option<String>,
        peer: SocketAddr,
    ) -> Accepted {
        let c = read_connect(&mut s).await;
        let identity = self
            .auth
            .authenticate(
                &c.client_id,
                c.username.as_deref(),
                c.password.as_deref(),
                cert_identity.as_deref(),
                peer.ip(),
            )
            .await;
        let reason = match &identity {
            Ok(_) => ReasonCode::Success,
            Err(r) => *r,
        };
        let mut out = BytesMut::new();
        encode(
            &Packet::ConnAck(ConnAck {
                session_present: false,
                reason,
                properties: Properties::default(),
            }),
            ProtocolVersion::V5,
            &mut out,
        )
        .unwrap();
        s.write_all(&out).await.unwrap();
        s.flush().await.unwrap();
        let check = |action, topic| {
            identity
                .as_ref()
                .is_ok_and(|id| self.acl.check(id, action, topic))
        };
        Accepted {
            may_publish_gps: check(Action::Publish, "trucks/7/gps"),
            may_subscribe_all: check(Action::Subscribe, "#"),
            identity,
        }
    }
}

fn connect_packet(user: Option<&str>, password: Option<&str>) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(
        &Packet::Connect(Box::new(Connect {
            protocol: ProtocolVersion::V5,
            clean_start: true,
            keep_alive: 30,
            client_id: "it-client".into(),
            will: None,
            username: user.map(str::to_string),
            password: password.map(|p| Bytes::copy_from_slice(p.as_bytes())),
            properties: Properties::default(),
        })),
        ProtocolVersion::V5,
        &mut out,
    )
    .unwrap();
    out.to_vec()
}

fn connack_reason(bytes: &[u8]) -> ReasonCode {
    let mut dec = Decoder::new(1024);
    dec.set_version(ProtocolVersion::V5);
    match dec.decode(&mut BytesMut::from(bytes)).unwrap() {
        Some(Packet::ConnAck(c)) => c.reason,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

const ACL: &str = r##"
[[rule]]
who = "cert:truck-7"
action = "publish"
topics = ["trucks/7/#"]
allow = true

[[rule]]
who = "user:admin"
action = "all"
topics = ["#"]
allow = true
"##;

async fn run(
    server: Server,
    client_cert: Option<&str>,
    pki: &Pki,
    user: Option<&str>,
    password: Option<&str>,
) -> (Accepted, ReasonCode) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ws = server.ws.is_some();
    let server_side = async {
        let (tcp, peer) = listener.accept().await.unwrap();
        server.serve_one(tcp, peer).await
    };
    let connect = connect_packet(user, password);
    let client_side = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = pki
            .connector(client_cert)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        if ws {
            let mut req = "wss://localhost/mqtt".into_client_request().unwrap();
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
            let (mut ws, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
            // Split the CONNECT over two messages, as the spec allows.
            let (a, b) = connect.split_at(5);
            ws.send(Message::Binary(Bytes::copy_from_slice(a)))
                .await
                .unwrap();
            ws.send(Message::Binary(Bytes::copy_from_slice(b)))
                .await
                .unwrap();
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => connack_reason(&b),
                other => panic!("expected a binary message, got {other:?}"),
            }
        } else {
            tls.write_all(&connect).await.unwrap();
            let mut buf = vec![0u8; 64];
            let n = tls.read(&mut buf).await.unwrap();
            connack_reason(&buf[..n])
        }
    };
    tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(server_side, client_side)
    })
    .await
    .expect("exchange finished")
}

fn server(pki: &Pki, ws: bool, auth: AuthConfig) -> Server {
    Server {
        tls: TlsAcceptor::new(&pki.tls_config()).unwrap(),
        ws: ws.then(WsConfig::default),
        auth: Authenticator::new(&auth).unwrap(),
        acl: Acl::parse(ACL).unwrap(),
    }
}

fn closed_auth() -> AuthConfig {
    AuthConfig {
        allow_anonymous: false,
        failure_delay_ms: 0,
        ..AuthConfig::default()
    }
}

#[tokio::test]
async fn wss_with_client_certificate_authenticates_and_authorizes_by_certificate() {
    let pki = Pki::new();
    let (accepted, reason) = run(
        server(&pki, true, closed_auth()),
        Some("truck-7"),
        &pki,
        None,
        None,
    )
    .await;
    assert_eq!(reason, ReasonCode::Success);
    let id = accepted.identity.unwrap();
    assert_eq!(id.cert_identity.as_deref(), Some("truck-7"));
    assert!(!id.anonymous);
    assert!(accepted.may_publish_gps);
    assert!(!accepted.may_subscribe_all);
}

#[tokio::test]
async fn tls_without_certificate_or_credentials_is_not_authorized() {
    let pki = Pki::new();
    let (accepted, reason) = run(server(&pki, false, closed_auth()), None, &pki, None, None).await;
    assert_eq!(reason, ReasonCode::NotAuthorized);
    assert!(accepted.identity.is_err());
}

#[tokio::test]
async fn password_login_over_wss_checks_the_password_file() {
    let pki = Pki::new();
    // Cheap argon2 parameters keep the debug-build test fast; the broker
    // verifies whatever parameters the PHC string names.
    let params = argon2::Params::new(64, 1, 1, None).unwrap();
    let salt = argon2::password_hash::SaltString::encode_b64(b"0123456789abcdef").unwrap();
    let phc = argon2::PasswordHasher::hash_password(
        &argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params),
        b"letmein",
        &salt,
    )
    .unwrap()
    .to_string();
    let file = pki.path("passwd");
    std::fs::write(&file, format!("# test users\nadmin:{phc}\n")).unwrap();
    let auth = AuthConfig {
        password_file: Some(file.into()),
        ..closed_auth()
    };
    let (accepted, reason) = run(
        server(&pki, true, auth.clone()),
        None,
        &pki,
        Some("admin"),
        Some("letmein"),
    )
    .await;
    assert_eq!(reason, ReasonCode::Success);
    assert_eq!(
        accepted.identity.unwrap().username.as_deref(),
        Some("admin")
    );
    assert!(accepted.may_subscribe_all);
    let (_, reason) = run(
        server(&pki, true, auth),
        None,
        &pki,
        Some("admin"),
        Some("wrong"),
    )
    .await;
    assert_eq!(reason, ReasonCode::BadUserNameOrPassword);
}
