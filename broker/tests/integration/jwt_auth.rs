//! JWT authentication with real clients: mosquitto_pub (`-P <token>`)
//! over TCP and rumqttc over WebSocket, against a broker
//! whose keys are an RS256 PEM (from `openssl`) and a JWKS file holding an
//! ES256 and an HS256 key. Refusals: 0x86 for a token that cannot be trusted
//! or is expired, 0x87 for a genuine token without the identity claim.

use crate::common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::process::Command;

const HS_SECRET: &[u8] = b"fleet-shared-secret-of-32-bytes!";

struct Keys {
    dir: PathBuf,
    rsa_private: Vec<u8>,
    ec: rcgen::KeyPair,
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(args: &[&str]) {
    let st = std::process::Command::new("openssl")
        .args(args)
        .stderr(Stdio::null())
        .status()
        .expect("openssl installed");
    assert!(st.success(), "openssl {args:?}");
}

fn jwks(ec: &rcgen::KeyPair, hs: &[u8]) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    // Uncompressed P-256 point: 0x04 || x || y.
    let raw = ec.public_key_raw();
    json!({"keys": [
        {"kty": "EC", "crv": "P-256", "kid": "ec1", "alg": "ES256",
         "x": b64(&raw[1..33]), "y": b64(&raw[33..65])},
        {"kty": "oct", "kid": "hs1", "alg": "HS256", "k": b64(hs)},
    ]})
    .to_string()
}

fn keys() -> Keys {
    let dir = std::env::temp_dir().join(common::unique("jwt"));
    std::fs::create_dir_all(&dir).unwrap();
    let private = dir.join("rsa.pem");
    let p = private.to_str().unwrap();
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        p,
    ]);
    let public = dir.join("rsa.pub.pem");
    openssl(&[
        "pkey",
        "-in",
        p,
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    let ec = rcgen::KeyPair::generate().unwrap();
    std::fs::write(dir.join("jwks.json"), jwks(&ec, HS_SECRET)).unwrap();
    Keys {
        rsa_private: std::fs::read(&private).unwrap(),
        dir,
        ec,
    }
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

impl Keys {
    fn rs256(&self, claims: Value) -> String {
        let key = EncodingKey::from_rsa_pem(&self.rsa_private).unwrap();
        encode(&Header::new(Algorithm::RS256), &claims, &key).unwrap()
    }
    fn es256(&self, claims: Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("ec1".into());
        let key = EncodingKey::from_ec_pem(self.ec.serialize_pem().as_bytes()).unwrap();
        encode(&h, &claims, &key).unwrap()
    }
    fn hs256(&self, claims: Value, secret: &[u8]) -> String {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("hs1".into());
        encode(&h, &claims, &EncodingKey::from_secret(secret)).unwrap()
    }
    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

async fn broker(k: &Keys, topic: &str) -> common::Broker {
    let mut c = common::test_config(&[format!("{topic}:fleets/#")]);
    c.auth.allow_anonymous = false;
    c.auth.failure_delay_ms = 0;
    c.auth.jwt.key_file = k.path("rsa.pub.pem");
    c.auth.jwt.algorithm = "RS256".into();
    c.auth.jwt.jwks_file = k.path("jwks.json");
    c.auth.jwt.audience = vec!["lodestream".into()];
    c.auth.jwt.issuer = vec!["https://idp.test".into()];
    // The documented claim rules: a truck publishes under fleets/<fleet>/<sub>/.
    c.acl.file = Some(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/examples/acl-jwt.toml").into());
    common::start_with(c).await
}

fn claims(sub: &str, fleet: &str) -> Value {
    json!({"sub": sub, "fleet": fleet, "aud": "lodestream", "iss": "https://idp.test",
           "exp": now() + 300, "nbf": now() - 5})
}

/// mosquitto_pub, MQTT 5, QoS 1, the token as password: (success, stderr).
async fn mosquitto_pub(port: u16, token: &str, topic: &str) -> (bool, String) {
    let out = Command::new("mosquitto_pub")
        .kill_on_drop(true)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-V",
            "mqttv5",
            "-q",
            "1",
        ])
        .args(["-u", "ignored", "-P", token, "-t", topic, "-m", "jwt", "-d"])
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .expect("mosquitto_pub finished")
        .expect("mosquitto_pub installed (apt-get install mosquitto-clients)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Every token kind against mosquitto_pub over TCP: good RS256/ES256/HS256
/// tokens log in and publish into Kafka; expired, not-yet-valid, wrong-key,
/// wrong-issuer and missing-claim tokens are refused with the documented
/// reason code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_with_tokens_over_tcp() {
    let k = keys();
    let t = common::unique("fleets");
    let b = broker(&k, &t).await;
    let good = [
        ("rs256", k.rs256(claims("truck-1", "north"))),
        ("es256", k.es256(claims("truck-2", "north"))),
        ("hs256", k.hs256(claims("truck-3", "north"), HS_SECRET)),
    ];
    for (name, token) in &good {
        let sub = name
            .replace("rs256", "truck-1")
            .replace("es256", "truck-2")
            .replace("hs256", "truck-3");
        let (ok, out) = mosquitto_pub(b.port(), token, &format!("fleets/north/{sub}/gps")).await;
        assert!(ok, "{name}: {out}");
    }
    let recs = common::read_topic(&t, 3, Duration::from_secs(20));
    assert_eq!(recs.len(), 3, "{recs:?}");

    let mut expired = claims("truck-1", "north");
    expired["exp"] = json!(now() - 120);
    let mut early = claims("truck-1", "north");
    early["nbf"] = json!(now() + 600);
    let mut other_iss = claims("truck-1", "north");
    other_iss["iss"] = json!("https://elsewhere.test");
    let mut no_sub = claims("truck-1", "north");
    no_sub.as_object_mut().unwrap().remove("sub");
    let other_ec = rcgen::KeyPair::generate().unwrap();
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("ec1".into());
    let wrong_key = encode(
        &h,
        &claims("truck-1", "north"),
        &EncodingKey::from_ec_pem(other_ec.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    let refused = [
        ("expired", k.rs256(expired), 134),
        ("not yet valid", k.es256(early), 134),
        ("wrong key", wrong_key, 134),
        (
            "wrong HMAC secret",
            k.hs256(
                claims("truck-1", "north"),
                b"not-the-fleet-secret-32-bytes...",
            ),
            134,
        ),
        ("other issuer", k.rs256(other_iss), 135),
        ("missing identity claim", k.rs256(no_sub), 135),
    ];
    for (name, token, why) in refused {
        let (ok, out) = mosquitto_pub(b.port(), &token, "fleets/north/truck-1/gps").await;
        assert!(!ok, "{name} accepted: {out}");
        assert!(
            out.contains(&format!("received CONNACK ({why})")),
            "{name}: want CONNACK {why:#x}, got {out}"
        );
    }
    let s = common::scrape(&b).await;
    assert!(
        common::metric(&s, "lodestream_auth_failures_total") >= 6.0,
        "{s}"
    );
}

/// `%{claim:fleet}` in a rule: a north token may publish under
/// fleets/north/<sub>/ but not under another fleet or another truck's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_use_the_tokens_claims() {
    let k = keys();
    let t = common::unique("fleets");
    let b = broker(&k, &t).await;
    let token = k.es256(claims("truck-9", "north"));
    for topic in ["fleets/south/truck-9/gps", "fleets/north/truck-8/x/y"] {
        let (_, out) = mosquitto_pub(b.port(), &token, topic).await;
        // MQTT 5: PUBACK 0x87 for a PUBLISH the rules refuse.
        assert!(
            out.contains("received PUBACK (Mid: 1, RC:135)"),
            "{topic}: {out}"
        );
    }
    let (ok, out) = mosquitto_pub(b.port(), &token, "fleets/north/truck-9/gps").await;
    assert!(ok, "{out}");
    let recs = common::read_topic(&t, 1, Duration::from_secs(20));
    let keys: Vec<_> = recs.iter().filter_map(|r| r.key.clone()).collect();
    assert_eq!(keys, ["fleets/north/truck-9/gps"]);
}

/// MQTT over WebSocket (rumqttc, MQTT 3.1.1 codes 5 / 4 for 0x87 / 0x86).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_over_websocket() {
    use rumqttc::{ConnectReturnCode, ConnectionError, Event, Incoming};
    let k = keys();
    let t = common::unique("fleets");
    let b = broker(&k, &t).await;
    let port = b.running.ws.expect("ws listener").port();
    let mut expired = claims("truck-4", "north");
    expired["exp"] = json!(now() - 120);
    let mut no_sub = claims("truck-4", "north");
    no_sub.as_object_mut().unwrap().remove("sub");
    let cases = [
        (k.hs256(claims("truck-4", "north"), HS_SECRET), None),
        (
            k.hs256(expired, HS_SECRET),
            Some(ConnectReturnCode::BadUserNamePassword),
        ),
        (
            k.hs256(
                claims("truck-4", "north"),
                b"a-different-secret-of-32-bytes!!",
            ),
            Some(ConnectReturnCode::BadUserNamePassword),
        ),
        (
            k.hs256(no_sub, HS_SECRET),
            Some(ConnectReturnCode::NotAuthorized),
        ),
    ];
    for (token, want) in cases {
        let mut o = rumqttc::MqttOptions::new(
            common::unique("ws"),
            format!("ws://127.0.0.1:{port}/mqtt"),
            port,
        );
        o.set_transport(rumqttc::Transport::Ws);
        o.set_credentials("ignored", token);
        let (_c, mut el) = rumqttc::AsyncClient::new(o, 10);
        let got = tokio::time::timeout(Duration::from_secs(10), el.poll())
            .await
            .expect("CONNACK in time");
        match (got, want) {
            (Ok(Event::Incoming(Incoming::ConnAck(a))), None) => {
                assert_eq!(a.code, ConnectReturnCode::Success)
            }
            (Err(ConnectionError::ConnectionRefused(code)), Some(want)) => assert_eq!(code, want),
            (other, want) => panic!("want {want:?}, got {other:?}"),
        }
    }
}

/// SIGHUP's reload (`Node::reload_security`) picks up a rotated JWKS: the
/// old key's tokens are refused, the new key's accepted, without restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_jwks_is_used_after_reload() {
    let k = keys();
    let t = common::unique("fleets");
    let b = broker(&k, &t).await;
    let old = k.hs256(claims("truck-5", "north"), HS_SECRET);
    let (ok, out) = mosquitto_pub(b.port(), &old, "fleets/north/truck-5/gps").await;
    assert!(ok, "{out}");
    let rotated = b"rotated-fleet-secret-of-32-bytes";
    std::fs::write(k.dir.join("jwks.json"), jwks(&k.ec, rotated)).unwrap();
    let node = b.node().clone();
    tokio::task::spawn_blocking(move || node.reload_security())
        .await
        .unwrap()
        .unwrap();
    let (ok, out) = mosquitto_pub(b.port(), &old, "fleets/north/truck-5/gps").await;
    assert!(!ok && out.contains("received CONNACK (134)"), "{out}");
    let new = k.hs256(claims("truck-5", "north"), rotated);
    let (ok, out) = mosquitto_pub(b.port(), &new, "fleets/north/truck-5/gps").await;
    assert!(ok, "{out}");
}

/// The real binary: `kill -HUP` makes it re-read the JWKS file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_jwks_of_the_broker_binary() {
    let k = keys();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = k.path("broker.toml");
    std::fs::write(
        &config,
        format!(
            "[listeners]\ntcp = \"127.0.0.1:{port}\"\nws = \"\"\nmetrics = \"\"\n\
             [kafka]\nbootstrap_servers = \"{}\"\ndefault_topic = \"{}\"\nretained_topic = \"{}\"\n\
             sessions_topic = \"{}\"\nnodes_topic = \"{}\"\n\
             [auth]\nallow_anonymous = false\nfailure_delay_ms = 0\n\
             [auth.jwt]\njwks_file = \"{}\"\n[sys]\ninterval_s = 0\n",
            common::kafka(),
            common::unique("default"),
            common::unique("retained"),
            common::unique("sessions"),
            common::unique("nodes"),
            k.path("jwks.json"),
        ),
    )
    .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["--config", &config])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("broker binary");
    let pid = child.id().to_string();
    let _proc = common::Proc(child);
    common::wait_port(port).await;
    let mut claims = json!({"sub": "truck-6", "exp": now() + 300});
    let old = k.hs256(claims.clone(), HS_SECRET);
    let (ok, out) = mosquitto_pub(port, &old, "fleets/north/truck-6/gps").await;
    assert!(ok, "{out}");

    let rotated = b"sighup-rotated-secret-of-32-byte";
    std::fs::write(k.dir.join("jwks.json"), jwks(&k.ec, rotated)).unwrap();
    let st = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(st.success());
    claims["jti"] = json!("after-reload");
    let new = k.hs256(claims, rotated);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out) = mosquitto_pub(port, &new, "fleets/north/truck-6/gps").await;
        if ok {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "new key never accepted: {out}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (ok, out) = mosquitto_pub(port, &old, "fleets/north/truck-6/gps").await;
    assert!(!ok && out.contains("received CONNACK (134)"), "{out}");
}
