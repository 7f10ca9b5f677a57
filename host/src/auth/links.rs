//! Capability links: a signed, expiring grant for one service of one container.
//!
//! `hearth share` prints `https://{host}/.hearth/auth?token=<payload>.<sig>`, where the
//! payload is base64url JSON `{p, c, s, exp}` and the signature HMAC-SHA256 under the
//! node's key. Opening it trades the token for a cookie holding the same signed value,
//! set without a `Domain` so it goes back to that one host only, then redirects to the
//! service. The token names the container by id, not name, so a container deleted and
//! re-created under the same name does not inherit its links.
//!
//! The key is 32 random bytes in `<state_dir>/auth.key`, made on first use. Deleting it
//! (and restarting hearthd) revokes every link and cookie at once.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where on every guest host a link is redeemed. Guests' own apps never see this path.
pub const LINK_PATH: &str = "/.hearth/auth";
pub const COOKIE_NAME: &str = "hearth_cap";
pub const TTL_MIN: Duration = Duration::from_secs(60);
pub const TTL_MAX: Duration = Duration::from_secs(30 * 24 * 3600);
pub const KEY_FILE: &str = "auth.key";
const KEY_BYTES: usize = 32;
/// Longer than any token we sign (names are at most 63 bytes each); anything beyond is
/// refused before decoding.
const TOKEN_MAX: usize = 1024;
const NEXT_MAX: usize = 2048;

type HmacSha256 = Hmac<Sha256>;

/// What a link or cookie grants: service `s` (a canonical label such as `files-1`) of
/// container `c` (its id) in project `p`, until `exp` (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Claims {
    pub p: String,
    pub c: String,
    pub s: String,
    pub exp: u64,
}

impl Claims {
    pub(crate) fn names(&self, project: &str, container_id: &str, service: &str) -> bool {
        self.p == project && self.c == container_id && self.s == service
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkError {
    Malformed,
    BadSignature,
    Expired,
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) struct SigningKey([u8; KEY_BYTES]);

impl SigningKey {
    fn mac(&self) -> HmacSha256 {
        // Invariant: HMAC takes keys of any length.
        HmacSha256::new_from_slice(&self.0).expect("HMAC accepts any key length")
    }

    pub(crate) fn sign(&self, claims: &Claims) -> String {
        // Invariant: a struct of strings and an integer always serializes.
        let json = serde_json::to_vec(claims).unwrap_or_default();
        let payload = B64.encode(json);
        let mut mac = self.mac();
        mac.update(payload.as_bytes());
        let sig = B64.encode(mac.finalize().into_bytes());
        format!("{payload}.{sig}")
    }

    /// The claims of a token we signed that has not expired at `now`.
    pub(crate) fn verify(&self, token: &str, now: u64) -> Result<Claims, LinkError> {
        if token.len() > TOKEN_MAX {
            return Err(LinkError::Malformed);
        }
        let (payload, sig) = token.split_once('.').ok_or(LinkError::Malformed)?;
        let sig = B64.decode(sig).map_err(|_| LinkError::Malformed)?;
        let mut mac = self.mac();
        mac.update(payload.as_bytes());
        // Constant time: how much of a forged signature matched must not show.
        mac.verify_slice(&sig)
            .map_err(|_| LinkError::BadSignature)?;
        let json = B64.decode(payload).map_err(|_| LinkError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| LinkError::Malformed)?;
        if claims.exp <= now {
            return Err(LinkError::Expired);
        }
        Ok(claims)
    }

    #[cfg(test)]
    pub(crate) fn for_tests(byte: u8) -> SigningKey {
        SigningKey([byte; KEY_BYTES])
    }
}

/// The node's signing key, read (or made) on first use and then kept in memory: links
/// are checked on every request, the file is read once.
pub(crate) struct KeyCell {
    path: PathBuf,
    key: OnceLock<SigningKey>,
    init: Mutex<()>,
}

impl KeyCell {
    pub(crate) fn new(path: PathBuf) -> KeyCell {
        KeyCell {
            path,
            key: OnceLock::new(),
            init: Mutex::new(()),
        }
    }

    pub(crate) fn get(&self) -> io::Result<&SigningKey> {
        if let Some(key) = self.key.get() {
            return Ok(key);
        }
        let _init = self.init.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(key) = self.key.get() {
            return Ok(key);
        }
        let key = load_or_create(&self.path)?;
        Ok(self.key.get_or_init(|| SigningKey(key)))
    }
}

/// Reads the key at `path`, or makes one. Making it is atomic and exclusive: the key is
/// written in full to a temporary file and hard-linked into place, which fails if the
/// file appeared meanwhile (another hearthd task got there first); then theirs is used,
/// so everyone signs with the key that is on disk.
fn load_or_create(path: &Path) -> io::Result<[u8; KEY_BYTES]> {
    match read_key(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        other => return other,
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir)?;
    let mut key = [0u8; KEY_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let tmp = dir.join(format!(
        ".{KEY_FILE}.{}.{:08x}.tmp",
        std::process::id(),
        rand::random::<u32>()
    ));
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&key).and_then(|()| f.sync_all()))
        .and_then(|()| fs::hard_link(&tmp, path));
    let _ = fs::remove_file(&tmp);
    match written {
        Ok(()) => {
            fs::File::open(dir).and_then(|d| d.sync_all())?;
            tracing::info!("created the link signing key {}", path.display());
            Ok(key)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => read_key(path),
        Err(e) => Err(e),
    }
}

fn read_key(path: &Path) -> io::Result<[u8; KEY_BYTES]> {
    let bytes = fs::read(path)?;
    let key: [u8; KEY_BYTES] = bytes.as_slice().try_into().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: {} bytes, expected {KEY_BYTES} (delete it to make a new key, which \
                 revokes every share link)",
                path.display(),
                bytes.len()
            ),
        )
    })?;
    let mode = fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            "{} was readable by others (mode {:o}); restricting it to 0600",
            path.display(),
            mode & 0o777
        );
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    }
    Ok(key)
}

/// `90s`, `15m`, `1h`, `7d` (a bare number is seconds), from one minute to 30 days.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "ttl {s:?}: use a number with s, m, h or d (90s, 15m, 1h, 7d)"
            ))
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("ttl {s:?}: use a number with s, m, h or d (90s, 15m, 1h, 7d)"))?;
    check_ttl(Duration::from_secs(n.saturating_mul(scale)))
}

pub fn check_ttl(ttl: Duration) -> Result<Duration, String> {
    if (TTL_MIN..=TTL_MAX).contains(&ttl) {
        Ok(ttl)
    } else {
        Err(format!(
            "ttl of {} s: links last from 1 minute to 30 days",
            ttl.as_secs()
        ))
    }
}

/// The `Set-Cookie` value that carries `token` for `max_age` seconds, to this host only
/// (no `Domain`), never to scripts (`HttpOnly`) or over plain HTTP (`Secure`).
pub(crate) fn set_cookie(token: &str, max_age: u64) -> String {
    format!("{COOKIE_NAME}={token}; HttpOnly; Secure; SameSite=Lax; Path=/; Max-Age={max_age}")
}

/// Every `hearth_cap` value the request carries. There can be several: a sibling host
/// (another container's app) may set one for the parent domain, and that must not hide
/// the real one.
pub(crate) fn cookies(headers: &hyper::http::HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(hyper::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name.trim() == COOKIE_NAME).then(|| value.trim().trim_matches('"'))
        })
}

/// `next` if it is a path on this host, else `/`. Only `/` followed by something other
/// than `/` or `\` is: `//evil.example` and `/\evil.example` are other hosts to a
/// browser, and so is anything with whitespace or control characters, which browsers
/// strip before looking.
pub(crate) fn safe_next(next: Option<&str>) -> &str {
    next.filter(|n| {
        n.len() <= NEXT_MAX
            && n.starts_with('/')
            && !n.starts_with("//")
            && n.bytes().all(|b| b.is_ascii_graphic() && b != b'\\')
    })
    .unwrap_or("/")
}

/// `token` and `next` from a link's query string.
pub(crate) fn parse_query(query: Option<&str>) -> (Option<String>, Option<String>) {
    let (mut token, mut next) = (None, None);
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "token" if token.is_none() => token = Some(v.into_owned()),
            "next" if next.is_none() => next = Some(v.into_owned()),
            _ => {}
        }
    }
    (token, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            p: "proj".into(),
            c: "c0ffee".into(),
            s: "files-1".into(),
            exp,
        }
    }

    #[test]
    fn sign_and_verify() {
        let key = SigningKey::for_tests(7);
        let t = key.sign(&claims(1000));
        assert_eq!(key.verify(&t, 999), Ok(claims(1000)));
        assert_eq!(key.verify(&t, 1000), Err(LinkError::Expired));
        assert_eq!(
            SigningKey::for_tests(8).verify(&t, 0),
            Err(LinkError::BadSignature)
        );
        assert!(
            !t.contains(['+', '/', '=']),
            "URL- and cookie-safe without escaping: {t}"
        );
    }

    #[test]
    fn tampering_is_rejected() {
        let key = SigningKey::for_tests(7);
        let t = key.sign(&claims(1000));
        let (payload, sig) = t.split_once('.').unwrap();

        // Claims rewritten (another container, a later expiry), old signature kept.
        let mut forged = claims(u64::MAX);
        forged.c = "other".into();
        let forged_payload = B64.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(
            key.verify(&format!("{forged_payload}.{sig}"), 0),
            Err(LinkError::BadSignature)
        );
        // One signature character changed.
        let mut sig2: Vec<u8> = sig.as_bytes().to_vec();
        sig2[0] = if sig2[0] == b'A' { b'B' } else { b'A' };
        let sig2 = String::from_utf8(sig2).unwrap();
        assert_eq!(
            key.verify(&format!("{payload}.{sig2}"), 0),
            Err(LinkError::BadSignature)
        );
        // A truncated signature, none at all, garbage, something huge.
        assert_eq!(
            key.verify(&format!("{payload}.{}", &sig[..8]), 0),
            Err(LinkError::BadSignature)
        );
        assert_eq!(key.verify(payload, 0), Err(LinkError::Malformed));
        assert_eq!(key.verify("a.b.c", 0), Err(LinkError::Malformed));
        assert_eq!(key.verify(&"A".repeat(5000), 0), Err(LinkError::Malformed));
        // Signed, but not our claims.
        let mut mac = key.mac();
        mac.update(b"bm90IGpzb24");
        let sig = B64.encode(mac.finalize().into_bytes());
        assert_eq!(
            key.verify(&format!("bm90IGpzb24.{sig}"), 0),
            Err(LinkError::Malformed)
        );
    }

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_ttl("30d"), Ok(TTL_MAX));
        assert_eq!(parse_ttl("1m"), Ok(TTL_MIN));
        assert_eq!(parse_ttl("120"), Ok(Duration::from_secs(120)));
        for bad in [
            "",
            "59s",
            "31d",
            "1w",
            "h",
            "-1h",
            "1.5h",
            "1 h",
            "1hh",
            "99999999999999999999d",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn next_paths() {
        for (next, want) in [
            (None, "/"),
            (Some("/"), "/"),
            (Some("/files/a?b=c#d"), "/files/a?b=c#d"),
            (Some("/%2F%2Fevil.example"), "/%2F%2Fevil.example"),
            (Some("//evil.example"), "/"),
            (Some("/\\evil.example"), "/"),
            (Some("\\\\evil.example"), "/"),
            (Some("https://evil.example"), "/"),
            (Some("evil.example"), "/"),
            (Some("/\t/evil.example"), "/"),
            (Some("/a\r\nSet-Cookie: x=y"), "/"),
            (Some("/ é"), "/"),
            (Some(""), "/"),
        ] {
            assert_eq!(safe_next(next), want, "{next:?}");
        }
        // The query string is decoded first, so an encoded `//` is still refused.
        let (token, next) = parse_query(Some("token=a.b&next=%2F%2Fevil.example"));
        assert_eq!(token.as_deref(), Some("a.b"));
        assert_eq!(safe_next(next.as_deref()), "/");
        let (_, next) = parse_query(Some("next=%2Fdocs%3Fx%3D1&token=t"));
        assert_eq!(safe_next(next.as_deref()), "/docs?x=1");
    }

    #[test]
    fn cookie_parsing() {
        use hyper::http::{header, HeaderMap, HeaderValue};
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; hearth_cap=one; b=2"),
        );
        h.append(
            header::COOKIE,
            HeaderValue::from_static("hearth_cap=\"two\""),
        );
        h.append(header::COOKIE, HeaderValue::from_static("xhearth_cap=no"));
        assert_eq!(cookies(&h).collect::<Vec<_>>(), ["one", "two"]);
        let c = set_cookie("v", 60);
        assert!(c.starts_with("hearth_cap=v; "));
        for attr in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/", "Max-Age=60"] {
            assert!(c.split("; ").any(|a| a == attr), "{attr} in {c}");
        }
        assert!(!c.contains("Domain"));
    }

    #[test]
    fn key_file_is_made_once_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join(KEY_FILE);
        let a = load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create(&path).unwrap(), a);
        let cell = KeyCell::new(path.clone());
        assert_eq!(cell.get().unwrap().0, a);
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [KEY_FILE]);

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(read_key(&path).unwrap(), a);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        fs::write(&path, b"short").unwrap();
        assert_eq!(
            load_or_create(&path).unwrap_err().kind(),
            io::ErrorKind::InvalidData,
            "a damaged key is an error, not silently replaced"
        );
    }

    #[test]
    fn concurrent_creators_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let keys: Vec<[u8; KEY_BYTES]> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| load_or_create(&path).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]));
        assert_eq!(read_key(&path).unwrap(), keys[0]);
    }
}
