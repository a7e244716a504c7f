//! Authentication of MQTT clients: username/password against an argon2id
//! password file, TLS client certificates, and anonymous access.
//!
//! Decisions, in order (see [`Authenticator::authenticate`]):
//! 1. no username: a verified client certificate authenticates the client;
//!    otherwise it is anonymous (allowed or refused with `NotAuthorized`, 0x87);
//!    a password without a username is refused (`BadUserNameOrPassword`, 0x86);
//! 2. username with a password: checked against the password file; an unknown
//!    user costs the same argon2 work as a wrong password so the answer time
//!    does not reveal which users exist;
//! 3. username without a password: accepted only when it equals the verified
//!    certificate identity;
//! 4. no password file configured: usernames cannot be verified, so a client
//!    sending one is treated as anonymous (its username is NOT trusted and is
//!    not put in the [`Identity`], so ACL `user:` rules never match it).
//!
//! Failed logins (bad username/password) count against the source address
//! (IPv6: its /64). Past `max_failures_per_minute`, attempts from that source
//! that need a password check are refused with `Banned` (0x8A) until its
//! one-minute window ends, even with the right password; certificate and
//! anonymous logins are not affected (there is nothing to guess). Each
//! refusal for bad credentials or a ban is delayed by `failure_delay_ms`.
//!
//! A successful password check is remembered for `success_cache_ttl_s` as a
//! keyed BLAKE2 digest of (user, password) under a random per-process key,
//! so a fleet reconnecting after a network blip or a node restart costs one
//! argon2 check per device per TTL, not per CONNECT. Only successes are
//! cached (a wrong password always costs argon2); the cache is bounded
//! (`success_cache_max` entries, full: new successes are not cached) and
//! dropped when the password file is reloaded.
//!
//! Password file format: one `username:PHC-string` per line, `#` starts a
//! comment line, blank lines are ignored. Usernames must not contain `:` or
//! whitespace. Create entries with `broker passwd FILE USER` ([`set_password`]).
//!
//! With `[auth.jwt]` configured, a password in JWT form is verified as a
//! token instead (the username is then ignored), see [`jwt`].

pub mod jwt;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use lodestream_mqtt::ReasonCode;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::Semaphore;

/// Who a connection is, after authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Verified username (password checked), if any.
    pub username: Option<String>,
    /// Identity taken from a verified TLS client certificate, if any.
    pub cert_identity: Option<String>,
    pub client_id: String,
    /// Neither a verified username nor a certificate.
    pub anonymous: bool,
    /// Claims of the verified JWT the client logged in with, if any.
    pub claims: Option<jwt::Claims>,
}

/// Which certificate field names the client.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum CertIdentitySource {
    /// Subject Common Name.
    #[default]
    Cn,
    /// First DNS subject alternative name.
    SanDns,
    /// First e-mail (RFC 822) subject alternative name.
    SanEmail,
    /// First URI subject alternative name (e.g. SPIFFE ids).
    SanUri,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Accept clients presenting neither credentials nor a certificate.
    pub allow_anonymous: bool,
    /// `username:PHC-hash` file; none = no password authentication.
    #[serde(deserialize_with = "crate::config::empty_is_none")]
    pub password_file: Option<std::path::PathBuf>,
    /// Certificate field used as identity for TLS client certificates.
    pub cert_identity: CertIdentitySource,
    /// Each refused login waits this long before the CONNACK (slows guessing).
    pub failure_delay_ms: u64,
    /// Failed logins per source address (IPv6: per /64) and minute before
    /// that source is refused with `Banned` for the rest of the minute;
    /// 0 disables the limit.
    pub max_failures_per_minute: u32,
    /// How long a verified (user, password) is accepted without argon2;
    /// 0 disables the cache.
    pub success_cache_ttl_s: u64,
    /// Entries the success cache holds at most.
    pub success_cache_max: usize,
    /// JWT authentication (token as the MQTT password); off without keys.
    pub jwt: jwt::JwtConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            allow_anonymous: true,
            password_file: None,
            cert_identity: CertIdentitySource::Cn,
            failure_delay_ms: 500,
            max_failures_per_minute: 20,
            success_cache_ttl_s: 300,
            success_cache_max: 200_000,
            jwt: jwt::JwtConfig::default(),
        }
    }
}

#[derive(Debug, Error)]
pub enum AuthError {
    #[error("password file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("password file {path}, line {line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("invalid username {0:?}: must be non-empty, without ':' or whitespace, not starting with '#'")]
    InvalidUser(String),
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error(transparent)]
    Jwt(#[from] jwt::JwtError),
}

/// Source addresses whose failures are remembered at most (bounded memory).
const MAX_TRACKED_SOURCES: usize = 10_000;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Users loaded from the password file.
struct Users {
    /// username -> PHC string (parsed again at verification: `PasswordHash`
    /// borrows its input).
    hashes: HashMap<String, String>,
    /// Hash of a random password with the file's parameters, verified for
    /// unknown users so they cost as much as known ones.
    dummy: String,
    /// user -> (keyed digest of the password last verified, when).
    verified: Mutex<HashMap<String, ([u8; 32], Instant)>>,
    /// Key of those digests, random per load.
    key: [u8; 32],
}

impl Users {
    fn digest(&self, user: &str, password: &[u8]) -> Option<[u8; 32]> {
        use blake2::digest::{Mac, Update};
        let mut mac =
            blake2::Blake2bMac::<blake2::digest::consts::U32>::new_from_slice(&self.key).ok()?;
        Update::update(&mut mac, &(user.len() as u64).to_le_bytes());
        Update::update(&mut mac, user.as_bytes());
        Update::update(&mut mac, password);
        Some(mac.finalize().into_bytes().into())
    }

    fn cached(&self, user: &str, password: &[u8], ttl: Duration) -> bool {
        if ttl.is_zero() {
            return false;
        }
        let Some(d) = self.digest(user, password) else {
            return false;
        };
        let map = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        // Constant-time compare: the digest is secret-derived.
        map.get(user).is_some_and(|(want, at)| {
            at.elapsed() < ttl && want.iter().zip(d).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        })
    }

    fn remember(&self, user: &str, password: &[u8], ttl: Duration, max: usize) {
        if ttl.is_zero() {
            return;
        }
        let Some(d) = self.digest(user, password) else {
            return;
        };
        let mut map = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= max && !map.contains_key(user) {
            map.retain(|_, (_, at)| at.elapsed() < ttl);
            if map.len() >= max {
                return;
            }
        }
        map.insert(user.to_string(), (d, Instant::now()));
    }
}

struct Window {
    start: Instant,
    failures: u32,
}

/// Failed logins per source, bounded to [`MAX_TRACKED_SOURCES`] entries.
///
/// At the bound, expired windows are dropped first; if every entry is still
/// live, the entry whose window started earliest is evicted. So an attacker
/// spreading failures over more than 10 000 sources (or /64 prefixes) can make
/// the broker forget a banned source early; memory stays bounded either way.
#[derive(Default)]
struct FailureTable {
    by_source: HashMap<IpAddr, Window>,
}

impl FailureTable {
    fn live(&mut self, ip: IpAddr, now: Instant) -> Option<&mut Window> {
        let expired = self
            .by_source
            .get(&ip)
            .is_some_and(|w| now.duration_since(w.start) >= FAILURE_WINDOW);
        if expired {
            self.by_source.remove(&ip);
        }
        self.by_source.get_mut(&ip)
    }

    fn is_banned(&mut self, ip: IpAddr, max: u32, now: Instant) -> bool {
        max > 0 && self.live(ip, now).is_some_and(|w| w.failures >= max)
    }

    fn record_failure(&mut self, ip: IpAddr, now: Instant) {
        if let Some(w) = self.live(ip, now) {
            w.failures = w.failures.saturating_add(1);
            return;
        }
        if self.by_source.len() >= MAX_TRACKED_SOURCES {
            self.by_source
                .retain(|_, w| now.duration_since(w.start) < FAILURE_WINDOW);
        }
        if self.by_source.len() >= MAX_TRACKED_SOURCES {
            let oldest = self
                .by_source
                .iter()
                .min_by_key(|(_, w)| w.start)
                .map(|(ip, _)| *ip);
            if let Some(oldest) = oldest {
                self.by_source.remove(&oldest);
            }
        }
        self.by_source.insert(
            ip,
            Window {
                start: now,
                failures: 1,
            },
        );
    }
}

/// Rate-limiting key: IPv4 as is (IPv4-mapped IPv6 folded to IPv4), IPv6 by
/// its /64, since one host usually owns a whole /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

struct Inner {
    cfg: AuthConfig,
    /// `None` when no password file is configured.
    users: RwLock<Option<Arc<Users>>>,
    failures: Mutex<FailureTable>,
    /// Bounds concurrent argon2 verifications: each takes tens of MiB and a
    /// core, so a connection flood must queue here rather than exhaust memory
    /// through the blocking pool.
    verify_slots: Semaphore,
    /// `None` when JWT authentication is not configured.
    jwt: Option<jwt::JwtVerifier>,
}

/// Authenticates CONNECTs. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Loads the password file, if one is configured. Blocking (file read and
    /// one argon2 hash for the unknown-user dummy).
    pub fn new(cfg: &AuthConfig) -> Result<Authenticator, AuthError> {
        let users = match &cfg.password_file {
            None => None,
            Some(file) => Some(Arc::new(load_users(file)?)),
        };
        let jwt = jwt::JwtVerifier::new(&cfg.jwt)?;
        let slots = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .max(2);
        Ok(Authenticator {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                users: RwLock::new(users),
                failures: Mutex::new(FailureTable::default()),
                verify_slots: Semaphore::new(slots),
                jwt,
            }),
        })
    }

    /// Re-reads the JWT keys and the password file. On error the previous
    /// keys / users stay in force. Blocking (file reads and one argon2 hash):
    /// call it from `spawn_blocking` inside the runtime.
    pub fn reload(&self) -> Result<(), AuthError> {
        if let Some(jwt) = &self.inner.jwt {
            let n = jwt.reload()?;
            tracing::info!(keys = n, "JWT keys reloaded");
        }
        let Some(file) = &self.inner.cfg.password_file else {
            return Ok(());
        };
        let users = load_users(file)?;
        let n = users.hashes.len();
        *self
            .inner
            .users
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Arc::new(users));
        tracing::info!(users = n, file = %file.display(), "password file reloaded");
        Ok(())
    }

    /// Returns the identity or the MQTT 5 reason code to refuse with
    /// (`BadUserNameOrPassword` 0x86, `NotAuthorized` 0x87, `Banned` 0x8A when
    /// the source is over its failure budget). `lodestream_mqtt::codec::v3_connack_code`
    /// maps them to the MQTT 3.1.1 return codes 4, 5 and 5.
    pub async fn authenticate(
        &self,
        client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
        cert_identity: Option<&str>,
        peer: IpAddr,
    ) -> Result<Identity, ReasonCode> {
        let identity = |username: Option<&str>, anonymous: bool| Identity {
            username: username.map(str::to_string),
            cert_identity: cert_identity.map(str::to_string),
            client_id: client_id.to_string(),
            anonymous,
            claims: None,
        };
        if let (Some(jwt), Some(token)) = (&self.inner.jwt, password) {
            if jwt::looks_like_jwt(token) {
                return self.token(jwt, token, identity(None, false)).await;
            }
        }
        let users = self
            .inner
            .users
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        // Outcomes that involve no secret, so nothing to guess: never banned.
        match (username, password) {
            (None, None) if cert_identity.is_some() => return Ok(identity(None, false)),
            (None, None) => return self.anonymous(identity(None, true)),
            (Some(_), _) if users.is_none() => {
                // Nothing to verify the name against: do not trust it.
                return self.anonymous(identity(None, cert_identity.is_none()));
            }
            (Some(user), None) if cert_identity == Some(user) => {
                return Ok(identity(Some(user), false))
            }
            _ => {}
        }
        // A password check (or a certain failure): the failure budget applies.
        if self.lock_failures().is_banned(
            source_key(peer),
            self.inner.cfg.max_failures_per_minute,
            Instant::now(),
        ) {
            tracing::debug!(%peer, client_id, "login refused: too many failures from this source");
            self.delay().await;
            return Err(ReasonCode::Banned);
        }
        if let (Some(user), Some(pw), Some(users)) = (username, password, users) {
            let ttl = Duration::from_secs(self.inner.cfg.success_cache_ttl_s);
            if users.cached(user, pw, ttl) {
                return Ok(identity(Some(user), false));
            }
            if self.verify(&users, user, pw).await {
                users.remember(user, pw, ttl, self.inner.cfg.success_cache_max);
                return Ok(identity(Some(user), false));
            }
        }
        self.fail(peer, client_id).await
    }

    /// A JWT password. Refusals are delayed like bad passwords but not
    /// counted towards the source's ban: a signature cannot be guessed, and a
    /// fleet behind one NAT reconnecting with expired tokens must not lock
    /// out its peers' good ones.
    async fn token(
        &self,
        jwt: &jwt::JwtVerifier,
        token: &[u8],
        mut id: Identity,
    ) -> Result<Identity, ReasonCode> {
        let verified = std::str::from_utf8(token)
            .map_err(|_| jwt::JwtRefusal::Invalid("not UTF-8".into()))
            .and_then(|t| jwt.verify(t));
        match verified {
            Ok(v) => {
                id.username = Some(v.identity);
                id.claims = Some(v.claims);
                Ok(id)
            }
            Err(refusal) => {
                tracing::debug!(client_id = %id.client_id, %refusal, "login refused: token");
                self.delay().await;
                Err(refusal.reason_code())
            }
        }
    }

    fn anonymous(&self, id: Identity) -> Result<Identity, ReasonCode> {
        if !id.anonymous || self.inner.cfg.allow_anonymous {
            Ok(id)
        } else {
            Err(ReasonCode::NotAuthorized)
        }
    }

    async fn fail(&self, peer: IpAddr, client_id: &str) -> Result<Identity, ReasonCode> {
        tracing::debug!(%peer, client_id, "login refused: bad username or password");
        self.lock_failures()
            .record_failure(source_key(peer), Instant::now());
        self.delay().await;
        Err(ReasonCode::BadUserNameOrPassword)
    }

    async fn delay(&self) {
        if self.inner.cfg.failure_delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.inner.cfg.failure_delay_ms)).await;
        }
    }

    fn lock_failures(&self) -> std::sync::MutexGuard<'_, FailureTable> {
        self.inner
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Verifies off the async threads: argon2 is slow on purpose.
    async fn verify(&self, users: &Arc<Users>, user: &str, password: &[u8]) -> bool {
        let Ok(_slot) = self.inner.verify_slots.acquire().await else {
            return false;
        };
        let known = users.hashes.contains_key(user);
        let users = users.clone();
        let user = user.to_string();
        let password = password.to_vec();
        let checked = tokio::task::spawn_blocking(move || {
            let phc = users.hashes.get(&user).unwrap_or(&users.dummy);
            PasswordHash::new(phc)
                .map(|h| Argon2::default().verify_password(&password, &h).is_ok())
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        known && checked
    }
}

fn parse_users(text: &str, path: &Path) -> Result<HashMap<String, String>, AuthError> {
    let mut hashes = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |message: String| AuthError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let Some((user, hash)) = line.split_once(':') else {
            return Err(err("expected username:hash".into()));
        };
        if !valid_username(user) {
            return Err(err(format!("invalid username {user:?}")));
        }
        PasswordHash::new(hash).map_err(|e| err(format!("invalid PHC hash for {user:?}: {e}")))?;
        if hashes.insert(user.to_string(), hash.to_string()).is_some() {
            return Err(err(format!("duplicate user {user:?}")));
        }
    }
    Ok(hashes)
}

fn load_users(path: &Path) -> Result<Users, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let hashes = parse_users(&text, path)?;
    // The dummy uses the same parameters as the file's hashes (or the
    // defaults) so an unknown user takes as long as a wrong password.
    let params = hashes
        .values()
        .next()
        .and_then(|phc| PasswordHash::new(phc).ok())
        .and_then(|h| Params::try_from(&h).ok())
        .unwrap_or_default();
    let mut random = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut random);
    let dummy = hash_with(&random, params)?;
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    Ok(Users {
        hashes,
        dummy,
        verified: Mutex::new(HashMap::new()),
        key,
    })
}

fn valid_username(user: &str) -> bool {
    !user.is_empty()
        && !user.starts_with('#')
        && !user.contains(':')
        && !user.chars().any(char::is_whitespace)
}

fn hash_with(password: &[u8], params: Params) -> Result<String, AuthError> {
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// Adds or replaces a user in a password file (argon2id, random salt, PHC
/// string): used by the `broker passwd FILE USER` subcommand. Other lines,
/// comments included, are kept; the file is replaced atomically and, on
/// Unix, created readable by its owner only.
pub fn set_password(file: &Path, user: &str, password: &str) -> Result<(), AuthError> {
    set_password_with(file, user, password, Params::default())
}

fn set_password_with(
    file: &Path,
    user: &str,
    password: &str,
    params: Params,
) -> Result<(), AuthError> {
    if !valid_username(user) {
        return Err(AuthError::InvalidUser(user.to_string()));
    }
    let io = |source| AuthError::Io {
        path: file.to_path_buf(),
        source,
    };
    let existing = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(e)),
    };
    // Refuse to rewrite a file we could not load afterwards.
    parse_users(&existing, file)?;
    let entry = format!("{user}:{}", hash_with(password.as_bytes(), params)?);
    let mut out = String::with_capacity(existing.len() + entry.len() + 1);
    let mut replaced = false;
    for line in existing.lines() {
        let t = line.trim();
        if !t.starts_with('#') && t.split_once(':').is_some_and(|(u, _)| u == user) {
            out.push_str(&entry);
            replaced = true;
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    if !replaced {
        out.push_str(&entry);
        out.push('\n');
    }
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "passwd".into());
    let tmp = file.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = (|| {
        use std::io::Write;
        let mut f = opts.open(&tmp)?;
        f.write_all(out.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// Cheap argon2 parameters: the behaviour under test does not depend on
    /// the cost, and debug builds of argon2 are slow.
    fn cheap() -> Params {
        Params::new(64, 1, 1, None).unwrap()
    }

    struct Fixture {
        _dir: TempDir,
        file: PathBuf,
    }

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fixture(users: &[(&str, &str)]) -> Fixture {
        let dir = std::env::temp_dir().join(format!("lodestream-auth-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("passwd");
        for (u, p) in users {
            set_password_with(&file, u, p, cheap()).unwrap();
        }
        Fixture {
            _dir: TempDir(dir),
            file,
        }
    }

    fn config(f: &Fixture) -> AuthConfig {
        AuthConfig {
            allow_anonymous: false,
            password_file: Some(f.file.clone()),
            failure_delay_ms: 0,
            ..AuthConfig::default()
        }
    }

    const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));

    #[tokio::test]
    async fn correct_password_authenticates_the_user() {
        let f = fixture(&[("alice", "s3cret"), ("bob", "hunter2")]);
        let a = Authenticator::new(&config(&f)).unwrap();
        let id = a
            .authenticate("c1", Some("alice"), Some(b"s3cret"), None, IP)
            .await
            .unwrap();
        assert_eq!(
            id,
            Identity {
                username: Some("alice".into()),
                cert_identity: None,
                client_id: "c1".into(),
                anonymous: false,
                claims: None,
            }
        );
        assert!(a
            .authenticate("c2", Some("bob"), Some(b"hunter2"), None, IP)
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn wrong_password_and_unknown_user_are_refused_alike() {
        let f = fixture(&[("alice", "s3cret")]);
        let a = Authenticator::new(&config(&f)).unwrap();
        for (u, p) in [("alice", "nope"), ("mallory", "s3cret"), ("alice", "")] {
            assert_eq!(
                a.authenticate("c", Some(u), Some(p.as_bytes()), None, IP)
                    .await
                    .unwrap_err(),
                ReasonCode::BadUserNameOrPassword,
                "{u}/{p}"
            );
        }
    }

    #[test]
    fn dummy_hash_uses_the_files_parameters() {
        let f = fixture(&[("alice", "s3cret")]);
        let users = load_users(&f.file).unwrap();
        let dummy = PasswordHash::new(&users.dummy).unwrap();
        let real = PasswordHash::new(&users.hashes["alice"]).unwrap();
        assert_eq!(
            Params::try_from(&dummy).unwrap(),
            Params::try_from(&real).unwrap()
        );
        assert_eq!(dummy.algorithm, real.algorithm);
    }

    #[tokio::test]
    async fn anonymous_follows_allow_anonymous() {
        let f = fixture(&[("alice", "s3cret")]);
        let mut cfg = config(&f);
        let a = Authenticator::new(&cfg).unwrap();
        assert_eq!(
            a.authenticate("c", None, None, None, IP).await.unwrap_err(),
            ReasonCode::NotAuthorized
        );
        cfg.allow_anonymous = true;
        let a = Authenticator::new(&cfg).unwrap();
        let id = a.authenticate("c", None, None, None, IP).await.unwrap();
        assert!(id.anonymous);
        assert_eq!(id.username, None);
        // Allowing anonymous does not turn a wrong password into anonymous.
        assert_eq!(
            a.authenticate("c", Some("alice"), Some(b"x"), None, IP)
                .await
                .unwrap_err(),
            ReasonCode::BadUserNameOrPassword
        );
    }

    #[tokio::test]
    async fn certificate_without_username_authenticates() {
        let f = fixture(&[("alice", "s3cret")]);
        let a = Authenticator::new(&config(&f)).unwrap();
        let id = a
            .authenticate("c", None, None, Some("truck-7"), IP)
            .await
            .unwrap();
        assert_eq!(id.cert_identity.as_deref(), Some("truck-7"));
        assert!(!id.anonymous);
        assert_eq!(id.username, None);
        // Username equal to the certificate identity needs no password.
        let id = a
            .authenticate("c", Some("truck-7"), None, Some("truck-7"), IP)
            .await
            .unwrap();
        assert_eq!(id.username.as_deref(), Some("truck-7"));
        // Another username without a password is refused.
        assert_eq!(
            a.authenticate("c", Some("alice"), None, Some("truck-7"), IP)
                .await
                .unwrap_err(),
            ReasonCode::BadUserNameOrPassword
        );
        // Certificate plus a valid password keeps both.
        let id = a
            .authenticate("c", Some("alice"), Some(b"s3cret"), Some("truck-7"), IP)
            .await
            .unwrap();
        assert_eq!(id.username.as_deref(), Some("alice"));
        assert_eq!(id.cert_identity.as_deref(), Some("truck-7"));
    }

    #[tokio::test]
    async fn password_without_username_is_refused() {
        let f = fixture(&[("alice", "s3cret")]);
        let a = Authenticator::new(&config(&f)).unwrap();
        assert_eq!(
            a.authenticate("c", None, Some(b"s3cret"), None, IP)
                .await
                .unwrap_err(),
            ReasonCode::BadUserNameOrPassword
        );
    }

    #[tokio::test]
    async fn without_password_file_usernames_are_not_trusted() {
        let a = Authenticator::new(&AuthConfig::default()).unwrap();
        let id = a
            .authenticate("c", Some("admin"), Some(b"whatever"), None, IP)
            .await
            .unwrap();
        assert!(id.anonymous);
        assert_eq!(id.username, None);
        let a = Authenticator::new(&AuthConfig {
            allow_anonymous: false,
            ..AuthConfig::default()
        })
        .unwrap();
        assert_eq!(
            a.authenticate("c", Some("admin"), Some(b"x"), None, IP)
                .await
                .unwrap_err(),
            ReasonCode::NotAuthorized
        );
    }

    #[tokio::test]
    async fn repeated_failures_ban_the_source_for_the_window() {
        let f = fixture(&[("alice", "s3cret")]);
        let a = Authenticator::new(&AuthConfig {
            max_failures_per_minute: 3,
            ..config(&f)
        })
        .unwrap();
        for _ in 0..3 {
            assert_eq!(
                a.authenticate("c", Some("alice"), Some(b"guess"), None, IP)
                    .await
                    .unwrap_err(),
                ReasonCode::BadUserNameOrPassword
            );
        }
        // Even the right password is refused while banned ...
        assert_eq!(
            a.authenticate("c", Some("alice"), Some(b"s3cret"), None, IP)
                .await
                .unwrap_err(),
            ReasonCode::Banned
        );
        // ... while logins without a secret to guess still work ...
        assert!(a
            .authenticate("c", None, None, Some("truck-7"), IP)
            .await
            .is_ok());
        // ... and other sources are unaffected.
        let other = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
        assert!(a
            .authenticate("c", Some("alice"), Some(b"s3cret"), None, other)
            .await
            .is_ok());
    }

    #[test]
    fn failure_window_expires_and_table_stays_bounded() {
        let mut t = FailureTable::default();
        let now = Instant::now();
        for _ in 0..3 {
            t.record_failure(IP, now);
        }
        assert!(t.is_banned(IP, 3, now));
        assert!(!t.is_banned(IP, 0, now), "0 disables the limit");
        assert!(!t.is_banned(IP, 3, now + FAILURE_WINDOW));
        for i in 0..(MAX_TRACKED_SOURCES as u32 + 50) {
            t.record_failure(IpAddr::V4(Ipv4Addr::from(i)), now);
        }
        assert_eq!(t.by_source.len(), MAX_TRACKED_SOURCES);
    }

    #[test]
    fn ipv6_sources_are_grouped_by_64_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(source_key(mapped), IP);
    }

    #[tokio::test]
    async fn refusals_are_delayed() {
        let f = fixture(&[("alice", "s3cret")]);
        let a = Authenticator::new(&AuthConfig {
            failure_delay_ms: 150,
            ..config(&f)
        })
        .unwrap();
        let t = Instant::now();
        let _ = a
            .authenticate("c", Some("alice"), Some(b"x"), None, IP)
            .await;
        assert!(t.elapsed() >= Duration::from_millis(150));
    }

    #[tokio::test]
    async fn reload_picks_up_new_users_and_keeps_old_ones_on_error() {
        let f = fixture(&[("alice", "s3cret")]);
        let a = Authenticator::new(&config(&f)).unwrap();
        set_password_with(&f.file, "carol", "pw", cheap()).unwrap();
        set_password_with(&f.file, "alice", "changed", cheap()).unwrap();
        a.reload().unwrap();
        assert!(a
            .authenticate("c", Some("carol"), Some(b"pw"), None, IP)
            .await
            .is_ok());
        assert!(a
            .authenticate("c", Some("alice"), Some(b"changed"), None, IP)
            .await
            .is_ok());
        std::fs::write(&f.file, "garbage\n").unwrap();
        assert!(a.reload().is_err());
        assert!(a
            .authenticate("c", Some("carol"), Some(b"pw"), None, IP)
            .await
            .is_ok());
    }

    #[test]
    fn bad_password_file_lines_name_the_line() {
        let f = fixture(&[]);
        std::fs::write(&f.file, "# users\n\nalice:$argon2id$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo\nbob-without-hash\n").unwrap();
        let e = Authenticator::new(&config(&f)).unwrap_err().to_string();
        assert!(e.contains("line 4") && e.contains("username:hash"), "{e}");
        std::fs::write(&f.file, "alice:not-a-phc\n").unwrap();
        let e = Authenticator::new(&config(&f)).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("alice"), "{e}");
        let e = Authenticator::new(&AuthConfig {
            password_file: Some("/nonexistent/passwd".into()),
            ..AuthConfig::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/passwd"), "{e}");
    }

    #[test]
    fn set_password_replaces_and_keeps_other_lines() {
        let f = fixture(&[("alice", "a"), ("bob", "b")]);
        let before = std::fs::read_to_string(&f.file).unwrap();
        std::fs::write(&f.file, format!("# fleet users\n{before}")).unwrap();
        set_password_with(&f.file, "alice", "a2", cheap()).unwrap();
        let text = std::fs::read_to_string(&f.file).unwrap();
        assert!(text.starts_with("# fleet users\n"));
        assert_eq!(text.lines().filter(|l| l.starts_with("alice:")).count(), 1);
        assert!(text.contains("$argon2id$"));
        let bob = before.lines().find(|l| l.starts_with("bob:")).unwrap();
        assert!(text.contains(bob), "bob's line is untouched");
        assert!(matches!(
            set_password(&f.file, "bad user", "x"),
            Err(AuthError::InvalidUser(_))
        ));
        assert!(matches!(
            set_password(&f.file, "a:b", "x"),
            Err(AuthError::InvalidUser(_))
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&f.file).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "not readable by others");
        }
    }

    #[test]
    fn shared_types_are_send_and_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<Authenticator>();
        check::<Identity>();
        check::<crate::acl::Acl>();
        check::<crate::transport::TlsAcceptor>();
        fn stream<T: Send + Unpin + 'static>() {}
        stream::<crate::transport::WsStream<tokio::net::TcpStream>>();
        stream::<crate::transport::WsStream<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>>(
        );
    }

    #[test]
    fn auth_config_defaults_and_names() {
        let c: AuthConfig = toml::from_str("cert_identity = \"san_dns\"").unwrap();
        assert_eq!(c.cert_identity, CertIdentitySource::SanDns);
        assert!(c.allow_anonymous);
        assert!(toml::from_str::<AuthConfig>("alow_anonymous = true").is_err());
    }

    /// The success cache answers only for the exact (user, password) it
    /// saw succeed, within its TTL, up to its size.
    #[test]
    fn success_cache_matches_exact_credentials_within_ttl_and_bound() {
        let f = fixture(&[("alice", "s3cret")]);
        let users = load_users(&f.file).unwrap();
        let ttl = Duration::from_secs(60);
        assert!(!users.cached("alice", b"s3cret", ttl));
        users.remember("alice", b"s3cret", ttl, 2);
        assert!(users.cached("alice", b"s3cret", ttl));
        assert!(!users.cached("alice", b"s3cret!", ttl), "other password");
        assert!(!users.cached("alicf", b"s3cret", ttl), "other user");
        assert!(
            !users.cached("alice", b"s3cret", Duration::ZERO),
            "TTL 0 disables"
        );
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            !users.cached("alice", b"s3cret", Duration::from_millis(1)),
            "expired"
        );
        users.remember("bob", b"x", ttl, 2);
        users.remember("carol", b"y", ttl, 2);
        assert!(
            !users.cached("carol", b"y", ttl),
            "bounded: full cache does not grow"
        );
        // User and password are not confused across the boundary.
        users.remember("ab", b"c", ttl, 10);
        assert!(!users.cached("a", b"bc", ttl));
    }

    /// A reload drops the cache: a changed password is refused at once.
    #[tokio::test]
    async fn reload_forgets_cached_successes() {
        let f = fixture(&[("alice", "old")]);
        let a = Authenticator::new(&config(&f)).unwrap();
        assert!(a
            .authenticate("c", Some("alice"), Some(b"old"), None, IP)
            .await
            .is_ok());
        assert!(a
            .authenticate("c", Some("alice"), Some(b"old"), None, IP)
            .await
            .is_ok());
        set_password_with(&f.file, "alice", "new", cheap()).unwrap();
        a.reload().unwrap();
        assert_eq!(
            a.authenticate("c", Some("alice"), Some(b"old"), None, IP)
                .await,
            Err(ReasonCode::BadUserNameOrPassword)
        );
        assert!(a
            .authenticate("c", Some("alice"), Some(b"new"), None, IP)
            .await
            .is_ok());
    }
}
