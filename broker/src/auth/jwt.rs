//! JWT authentication: a client sends a signed token as its MQTT password.
//!
//! Keys (`[auth.jwt]`): `key_file` holds one key for `algorithm` (HS256: the
//! shared secret, raw bytes, one trailing newline ignored; RS256 / ES256: a
//! PEM public key), and/or `jwks_file` holds a JSON Web Key Set whose keys are
//! chosen by the token's `kid` (a token without `kid` is tried against every
//! key). Each key verifies only its own algorithm, so an RSA public key can
//! never be abused as an HMAC secret. Both files are re-read on SIGHUP; a
//! failed reload keeps the previous keys.
//!
//! Checks: signature; `exp` required; `nbf` when present; `iss` and `aud`
//! required and checked when configured; `leeway_s` of clock skew both ways.
//! The claim named by `identity_claim` (default `sub`) becomes the
//! identity's username, so `user:NAME` rules and `%u` apply to it, and every
//! claim is available to rules as `%{claim:NAME}`.
//!
//! Refusals (see [`JwtRefusal::reason_code`]):
//! - 0x86 Bad User Name or Password: the token cannot be trusted or is no
//!   longer (not yet) valid: malformed, unknown key, wrong signature, expired,
//!   not yet valid. A client should get a fresh token and retry.
//! - 0x87 Not Authorized: the token is genuine and current but does not
//!   entitle its bearer to this broker: wrong `aud` or `iss`, or no usable
//!   identity claim. Retrying with a fresh token of the same kind will not help.
//!
//! Tokens are checked at CONNECT; a connection outliving its token's `exp`
//! is not closed (as in Mosquitto's and EMQX's JWT plugins by default).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use lodestream_mqtt::ReasonCode;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

/// The verified claims of a token, shared by the identity and the rules.
pub type Claims = Arc<Map<String, Value>>;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// One key: HS256 secret (raw bytes) or RS256/ES256 PEM public key.
    pub key_file: String,
    /// Algorithm of `key_file`: "HS256", "RS256" or "ES256".
    pub algorithm: String,
    /// JSON Web Key Set file (RSA, EC P-256 or oct keys).
    pub jwks_file: String,
    /// Accepted `aud` values; empty: a token carrying `aud` is refused.
    pub audience: Vec<String>,
    /// Accepted `iss` values; empty: `iss` not checked.
    pub issuer: Vec<String>,
    /// Claim whose (string or number) value is the identity for the rules.
    pub identity_claim: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_s: u64,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            key_file: String::new(),
            algorithm: String::new(),
            jwks_file: String::new(),
            audience: Vec::new(),
            issuer: Vec::new(),
            identity_claim: "sub".into(),
            leeway_s: 30,
        }
    }
}

impl JwtConfig {
    pub fn enabled(&self) -> bool {
        !self.key_file.is_empty() || !self.jwks_file.is_empty()
    }
}

#[derive(Debug, Error)]
pub enum JwtError {
    #[error("JWT key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("JWT key file {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("[auth.jwt] {0}")]
    Config(String),
}

/// Why a token was refused; [`JwtRefusal::reason_code`] gives the CONNACK code.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum JwtRefusal {
    #[error("token not trusted or not valid now: {0}")]
    Invalid(String),
    #[error("token not for this broker: {0}")]
    NotEntitled(String),
}

impl JwtRefusal {
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            JwtRefusal::Invalid(_) => ReasonCode::BadUserNameOrPassword,
            JwtRefusal::NotEntitled(_) => ReasonCode::NotAuthorized,
        }
    }
}

/// What a good token yields.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub identity: String,
    pub claims: Claims,
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Verifies tokens against the configured keys; keys swap whole on reload.
pub struct JwtVerifier {
    cfg: JwtConfig,
    keys: RwLock<Arc<Vec<Key>>>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// A password is taken for a token when it has the JWS compact form: three
/// base64url parts, the first a JSON header (`eyJ` is `{"` encoded).
pub fn looks_like_jwt(password: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(password) else {
        return false;
    };
    s.starts_with("eyJ")
        && s.split('.').count() == 3
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl JwtVerifier {
    /// `None` when JWT authentication is not configured. Blocking (file reads).
    pub fn new(cfg: &JwtConfig) -> Result<Option<JwtVerifier>, JwtError> {
        if !cfg.enabled() {
            return Ok(None);
        }
        if cfg.identity_claim.is_empty() {
            return Err(JwtError::Config("identity_claim is empty".into()));
        }
        let keys = load_keys(cfg)?;
        Ok(Some(JwtVerifier {
            cfg: cfg.clone(),
            keys: RwLock::new(Arc::new(keys)),
        }))
    }

    /// Re-reads the key files; on error the previous keys stay in force.
    pub fn reload(&self) -> Result<usize, JwtError> {
        let keys = load_keys(&self.cfg)?;
        let n = keys.len();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(n)
    }

    pub fn verify(&self, token: &str) -> Result<Verified, JwtRefusal> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| JwtRefusal::Invalid(format!("header: {e}")))?;
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        let candidates = keys.iter().filter(|k| {
            k.alg == header.alg && (header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
        });
        let mut last = JwtRefusal::Invalid(format!(
            "no key for alg {:?} kid {:?}",
            header.alg, header.kid
        ));
        for k in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &k.key, &self.validation(k.alg))
            {
                Ok(data) => return self.identity(data.claims),
                Err(e) => {
                    last = refusal(e.kind());
                    // Only a wrong signature means another key may fit.
                    if !matches!(e.kind(), ErrorKind::InvalidSignature) {
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = self.cfg.leeway_s;
        v.validate_exp = true;
        v.validate_nbf = true;
        let mut required = vec!["exp"];
        if self.cfg.audience.is_empty() {
            // A token naming an audience is meant for someone in particular;
            // with none configured it is refused (RFC 7519 4.1.3).
            v.validate_aud = true;
            v.aud = None;
        } else {
            v.set_audience(&self.cfg.audience);
            required.push("aud");
        }
        if !self.cfg.issuer.is_empty() {
            v.set_issuer(&self.cfg.issuer);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        v
    }

    fn identity(&self, claims: Map<String, Value>) -> Result<Verified, JwtRefusal> {
        let identity = match claims.get(&self.cfg.identity_claim) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => {
                return Err(JwtRefusal::NotEntitled(format!(
                    "no string claim {:?}",
                    self.cfg.identity_claim
                )))
            }
        };
        Ok(Verified {
            identity,
            claims: Arc::new(claims),
        })
    }
}

fn refusal(kind: &ErrorKind) -> JwtRefusal {
    match kind {
        ErrorKind::InvalidAudience => JwtRefusal::NotEntitled("aud not accepted".into()),
        ErrorKind::InvalidIssuer => JwtRefusal::NotEntitled("iss not accepted".into()),
        ErrorKind::MissingRequiredClaim(c) if c == "aud" || c == "iss" => {
            JwtRefusal::NotEntitled(format!("no {c} claim"))
        }
        ErrorKind::ExpiredSignature => JwtRefusal::Invalid("expired".into()),
        ErrorKind::ImmatureSignature => JwtRefusal::Invalid("not valid yet (nbf)".into()),
        ErrorKind::InvalidSignature => JwtRefusal::Invalid("signature does not verify".into()),
        other => JwtRefusal::Invalid(format!("{other:?}")),
    }
}

fn algorithm(name: &str) -> Option<Algorithm> {
    match name {
        "HS256" => Some(Algorithm::HS256),
        "RS256" => Some(Algorithm::RS256),
        "ES256" => Some(Algorithm::ES256),
        _ => None,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, JwtError> {
    std::fs::read(path).map_err(|source| JwtError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn load_keys(cfg: &JwtConfig) -> Result<Vec<Key>, JwtError> {
    let mut keys = Vec::new();
    if !cfg.key_file.is_empty() {
        let path = Path::new(&cfg.key_file);
        let alg = algorithm(&cfg.algorithm).ok_or_else(|| {
            JwtError::Config(format!(
                "algorithm = {:?}: expected \"HS256\", \"RS256\" or \"ES256\" for key_file",
                cfg.algorithm
            ))
        })?;
        let bytes = read(path)?;
        let bad = |e: jsonwebtoken::errors::Error| JwtError::Key {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let key = match alg {
            Algorithm::HS256 => {
                let secret = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
                if secret.len() < 32 {
                    return Err(JwtError::Key {
                        path: path.to_path_buf(),
                        message: "an HS256 secret needs at least 32 bytes".into(),
                    });
                }
                DecodingKey::from_secret(secret)
            }
            Algorithm::RS256 => DecodingKey::from_rsa_pem(&bytes).map_err(bad)?,
            _ => DecodingKey::from_ec_pem(&bytes).map_err(bad)?,
        };
        keys.push(Key {
            kid: None,
            alg,
            key,
        });
    }
    if !cfg.jwks_file.is_empty() {
        let path = Path::new(&cfg.jwks_file);
        let set: JwkSet = serde_json::from_slice(&read(path)?).map_err(|e| JwtError::Key {
            path: path.to_path_buf(),
            message: format!("not a JWK set: {e}"),
        })?;
        for jwk in &set.keys {
            keys.push(jwk_key(jwk).map_err(|message| JwtError::Key {
                path: path.to_path_buf(),
                message,
            })?);
        }
    }
    Ok(keys)
}

/// A JWK's algorithm: its `alg`, else the one this broker uses for its type.
fn jwk_key(jwk: &Jwk) -> Result<Key, String> {
    let kid = jwk.common.key_id.clone();
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(_) => Some(Algorithm::ES256),
        AlgorithmParameters::OctetKey(_) => Some(Algorithm::HS256),
        AlgorithmParameters::OctetKeyPair(_) => None,
    };
    let alg = match jwk.common.key_algorithm {
        None => by_type,
        Some(KeyAlgorithm::HS256) => Some(Algorithm::HS256),
        Some(KeyAlgorithm::RS256) => Some(Algorithm::RS256),
        Some(KeyAlgorithm::ES256) => Some(Algorithm::ES256),
        Some(_) => None,
    }
    .filter(|a| Some(*a) == by_type)
    .ok_or_else(|| format!("key {kid:?}: only RS256, ES256 and HS256 keys are supported"))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid:?}: {e}"))?;
    Ok(Key { kid, alg, key })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn hs_verifier(cfg: JwtConfig) -> (JwtVerifier, tempdir::Dir) {
        let dir = tempdir::Dir::new();
        let path = dir.file("secret", SECRET);
        let cfg = JwtConfig {
            key_file: path,
            algorithm: "HS256".into(),
            ..cfg
        };
        (JwtVerifier::new(&cfg).unwrap().unwrap(), dir)
    }

    fn token(claims: Value, secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    /// Minimal self-cleaning temporary directory (no extra crate for tests).
    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let p = std::env::temp_dir().join(format!("jwt-{}", uuid::Uuid::new_v4()));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn file(&self, name: &str, data: &[u8]) -> String {
                let p = self.0.join(name);
                std::fs::write(&p, data).unwrap();
                p.display().to_string()
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn good_token_gives_the_identity_claim_and_all_claims() {
        let (v, _d) = hs_verifier(JwtConfig::default());
        let t = token(
            json!({"sub": "truck-7", "fleet": "north", "exp": now() + 60}),
            SECRET,
        );
        let ok = v.verify(&t).unwrap();
        assert_eq!(ok.identity, "truck-7");
        assert_eq!(ok.claims["fleet"], json!("north"));
    }

    #[test]
    fn expired_not_yet_valid_and_wrong_key_are_0x86() {
        let (v, _d) = hs_verifier(JwtConfig {
            leeway_s: 0,
            ..JwtConfig::default()
        });
        let cases = [
            token(json!({"sub": "a", "exp": now() - 10}), SECRET),
            token(
                json!({"sub": "a", "exp": now() + 60, "nbf": now() + 30}),
                SECRET,
            ),
            token(
                json!({"sub": "a", "exp": now() + 60}),
                b"another-secret-another-secret-xx",
            ),
            token(json!({"sub": "a"}), SECRET),
            "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln".to_string(),
        ];
        for t in cases {
            let r = v.verify(&t).unwrap_err();
            assert_eq!(r.reason_code(), ReasonCode::BadUserNameOrPassword, "{r}");
        }
    }

    #[test]
    fn audience_issuer_and_identity_claim_refusals_are_0x87() {
        let (v, _d) = hs_verifier(JwtConfig {
            audience: vec!["lodestream".into()],
            issuer: vec!["https://idp.example".into()],
            ..JwtConfig::default()
        });
        let good = json!({"sub": "a", "exp": now() + 60, "aud": "lodestream", "iss": "https://idp.example"});
        assert!(v.verify(&token(good.clone(), SECRET)).is_ok());
        for (field, value) in [
            ("aud", json!("other")),
            ("iss", json!("https://evil.example")),
            ("sub", Value::Null),
            ("sub", json!("")),
        ] {
            let mut c = good.clone();
            c[field] = value;
            let r = v.verify(&token(c, SECRET)).unwrap_err();
            assert_eq!(r.reason_code(), ReasonCode::NotAuthorized, "{field}: {r}");
        }
        let mut no_aud = good.clone();
        no_aud.as_object_mut().unwrap().remove("aud");
        let r = v.verify(&token(no_aud, SECRET)).unwrap_err();
        assert_eq!(r.reason_code(), ReasonCode::NotAuthorized, "{r}");
    }

    #[test]
    fn a_token_with_an_audience_is_refused_when_none_is_configured() {
        let (v, _d) = hs_verifier(JwtConfig::default());
        let t = token(json!({"sub": "a", "exp": now() + 60, "aud": "x"}), SECRET);
        assert_eq!(
            v.verify(&t).unwrap_err().reason_code(),
            ReasonCode::NotAuthorized
        );
    }

    #[test]
    fn a_key_only_verifies_its_own_algorithm() {
        // An ES256 JWKS key: an HS256 token (even signed with the key's
        // public bytes as secret) finds no key.
        let kp = rcgen::KeyPair::generate().unwrap();
        let dir = tempdir::Dir::new();
        let pem = dir.file("ec.pem", kp.public_key_pem().as_bytes());
        let v = JwtVerifier::new(&JwtConfig {
            key_file: pem,
            algorithm: "ES256".into(),
            ..JwtConfig::default()
        })
        .unwrap()
        .unwrap();
        let hs = token(
            json!({"sub": "a", "exp": now() + 60}),
            kp.public_key_pem().as_bytes(),
        );
        assert!(matches!(v.verify(&hs), Err(JwtRefusal::Invalid(_))));
        let es = encode(
            &Header::new(Algorithm::ES256),
            &json!({"sub": "a", "exp": now() + 60}),
            &EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(v.verify(&es).unwrap().identity, "a");
    }

    #[test]
    fn jwks_keys_are_chosen_by_kid_and_reload_swaps_them() {
        let dir = tempdir::Dir::new();
        let jwks = |k: &[u8]| {
            use base64::Engine;
            let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(k);
            json!({"keys": [{"kty": "oct", "kid": "k1", "alg": "HS256", "k": k}]}).to_string()
        };
        let path = dir.file("jwks.json", jwks(SECRET).as_bytes());
        let v = JwtVerifier::new(&JwtConfig {
            jwks_file: path.clone(),
            ..JwtConfig::default()
        })
        .unwrap()
        .unwrap();
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        let claims = json!({"sub": "a", "exp": now() + 60});
        let t = encode(&h, &claims, &EncodingKey::from_secret(SECRET)).unwrap();
        assert!(v.verify(&t).is_ok());
        h.kid = Some("k2".into());
        let other_kid = encode(&h, &claims, &EncodingKey::from_secret(SECRET)).unwrap();
        assert!(v.verify(&other_kid).is_err());
        let rotated = b"rotated-secret-rotated-secret-xx";
        std::fs::write(&path, jwks(rotated)).unwrap();
        assert_eq!(v.reload().unwrap(), 1);
        assert!(v.verify(&t).is_err(), "old key gone after reload");
        std::fs::write(&path, "not json").unwrap();
        assert!(v.reload().is_err());
        h.kid = Some("k1".into());
        let new = encode(&h, &claims, &EncodingKey::from_secret(rotated)).unwrap();
        assert!(
            v.verify(&new).is_ok(),
            "failed reload keeps the keys in force"
        );
    }

    #[test]
    fn example_rules_scope_a_token_to_its_fleet() {
        use crate::acl::{Acl, Action};
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/acl-jwt.toml");
        let acl = Acl::load(&path).unwrap();
        let (v, _d) = hs_verifier(JwtConfig::default());
        let t = token(
            json!({"sub": "truck-7", "fleet": "north", "exp": now() + 60}),
            SECRET,
        );
        let ok = v.verify(&t).unwrap();
        let id = crate::auth::Identity {
            username: Some(ok.identity),
            cert_identity: None,
            client_id: "c".into(),
            anonymous: false,
            claims: Some(ok.claims),
        };
        assert!(acl.check(&id, Action::Publish, "fleets/north/truck-7/gps"));
        assert!(!acl.check(&id, Action::Publish, "fleets/north/truck-8/gps"));
        assert!(!acl.check(&id, Action::Publish, "fleets/south/truck-7/gps"));
        assert!(acl.check(&id, Action::Subscribe, "fleets/north/+/gps"));
        assert!(!acl.check(&id, Action::Subscribe, "fleets/+/+/gps"));
        assert!(!acl.check(&id, Action::Subscribe, "$SYS/#"));
    }

    #[test]
    fn jwt_shaped_passwords_only() {
        let t = token(json!({"sub": "a"}), SECRET);
        assert!(looks_like_jwt(t.as_bytes()));
        for p in ["secret", "a.b.c", "eyJ.a", "eyJa.b.c d", ""] {
            assert!(!looks_like_jwt(p.as_bytes()), "{p}");
        }
    }
}
