//! Project API tokens: `hth_` and 32 random bytes in base64url, shown once at creation.
//! The store keeps only their SHA-256, so checking one is a hash and an indexed lookup:
//! no plaintext ever to compare, and a leaked database grants nothing. (A fast hash is
//! enough: the token carries 256 bits of entropy, there is nothing to brute-force.)

use super::AuthError;
use crate::store::{ApiTokenRow, Store};
use base64::Engine;
use hyper::http::{header, HeaderMap};
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::time::Duration;

pub const TOKEN_PREFIX: &str = "hth_";
const TOKEN_BYTES: usize = 32;
/// base64url of 32 bytes, unpadded.
const TOKEN_CHARS: usize = 43;
const NAME_MAX: usize = 64;
/// `last_used_at` is for people ("is this token still in use?"), so minute precision
/// will do, and it spares a write per request.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// A token just created: the only time its plaintext exists outside the client.
#[derive(Debug, Clone, Serialize)]
pub struct NewToken {
    pub id: String,
    pub project: String,
    pub name: String,
    pub token: String,
    pub created_at: String,
}

fn random_token() -> String {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

fn random_id() -> String {
    let mut bytes = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the store keeps of a token.
pub fn hash(token: &str) -> String {
    format!("{:x}", Sha256::digest(token.as_bytes()))
}

/// Whether `token` could be one of ours, so garbage costs no database lookup.
pub(crate) fn well_formed(token: &str) -> bool {
    token.strip_prefix(TOKEN_PREFIX).is_some_and(|rest| {
        rest.len() == TOKEN_CHARS
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// Names are labels for people; any printable text, not too long.
pub fn validate_name(name: &str) -> Result<(), AuthError> {
    let name_chars = name.chars().count();
    if name.trim().is_empty() || name_chars > NAME_MAX || name.chars().any(char::is_control) {
        return Err(AuthError::Invalid(format!(
            "token name {name:?}: use 1-{NAME_MAX} printable characters"
        )));
    }
    Ok(())
}

/// Creates a token for an existing project.
pub fn create(store: &Store, project: &str, name: &str) -> Result<NewToken, AuthError> {
    validate_name(name)?;
    let token = random_token();
    let row = store.insert_api_token(&random_id(), project, name, &hash(&token))?;
    tracing::info!(project, id = %row.id, "API token created");
    Ok(NewToken {
        id: row.id,
        project: row.project,
        name: row.name,
        token,
        created_at: row.created_at,
    })
}

/// The `Authorization` header, read as a bearer token: `None` without the header,
/// `Some(None)` for a header that is not `Bearer <token>`.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<Option<&str>> {
    let value = headers.get(header::AUTHORIZATION)?;
    let parsed = value.to_str().ok().and_then(|v| {
        let (scheme, token) = v.trim().split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|t| !t.is_empty())
    });
    Some(parsed)
}

/// Whether an `Authorization` value carries one of our tokens (and so must not reach a
/// guest).
pub(crate) fn is_ours(value: &str) -> bool {
    value.trim().split_once(' ').is_some_and(|(scheme, token)| {
        scheme.eq_ignore_ascii_case("bearer") && token.trim().starts_with(TOKEN_PREFIX)
    })
}

/// The live (not revoked) token `token` names, if any, straight from the store (the
/// proxy goes through [`super::decisions`]).
#[cfg(test)]
pub(crate) fn lookup(store: &Store, token: &str) -> Result<Option<ApiTokenRow>, AuthError> {
    if !well_formed(token) {
        return Ok(None);
    }
    let row = store.api_token_by_hash(&hash(token))?;
    Ok(row.filter(|r| r.revoked_at.is_none()))
}

/// Records the use of `row`, at most once per [`TOUCH_EVERY`]. A failed write only
/// costs the statistic, never the request.
pub(crate) fn touch(store: &Store, row: &ApiTokenRow) {
    let stale = row.last_used_at.as_deref().is_none_or(|at| {
        time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
            .map(|at| time::OffsetDateTime::now_utc() - at >= TOUCH_EVERY)
            .unwrap_or(true)
    });
    if stale {
        if let Err(e) = store.touch_api_token(&row.id) {
            tracing::warn!(id = %row.id, "recording token use: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::http::HeaderValue;

    fn store() -> Store {
        let s = Store::open_in_memory().unwrap();
        s.create_project("p").unwrap();
        s
    }

    #[test]
    fn format_and_hash() {
        let t = random_token();
        assert!(t.starts_with("hth_"));
        assert_eq!(t.len(), 4 + TOKEN_CHARS);
        assert!(well_formed(&t));
        assert_ne!(random_token(), t);
        assert_eq!(hash(&t).len(), 64);
        assert!(!well_formed("hth_short"));
        assert!(!well_formed(&t.replace("hth_", "xyz_")));
        assert!(!well_formed(&format!("{t}=")));
        // Known answer: SHA-256("abc").
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn round_trip_and_revocation() {
        let s = store();
        let t = create(&s, "p", "ci").unwrap();
        let row = lookup(&s, &t.token).unwrap().expect("valid token");
        assert_eq!(
            (row.project.as_str(), row.id.as_str()),
            ("p", t.id.as_str())
        );
        // The plaintext is nowhere in the store.
        let listed = s.api_tokens("p").unwrap();
        assert_eq!(listed.len(), 1);
        assert_ne!(listed[0].hash, t.token);
        assert!(!serde_json::to_string(&listed)
            .unwrap()
            .contains(&listed[0].hash));

        touch(&s, &row);
        assert!(s.api_tokens("p").unwrap()[0].last_used_at.is_some());

        // One character off: unknown.
        let mut wrong = t.token.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == 'A' { 'B' } else { 'A' });
        assert!(lookup(&s, &wrong).unwrap().is_none());

        s.revoke_api_token("p", &t.id).unwrap();
        assert!(lookup(&s, &t.token).unwrap().is_none());
    }

    #[test]
    fn names_and_missing_projects() {
        let s = store();
        for bad in ["", "  ", "a\nb", &"x".repeat(65)] {
            assert!(
                matches!(create(&s, "p", bad), Err(AuthError::Invalid(_))),
                "{bad:?}"
            );
        }
        assert!(create(&s, "p", "déploiement 2").is_ok());
        assert!(matches!(
            create(&s, "nope", "ci"),
            Err(AuthError::NotFound(_))
        ));
    }

    #[test]
    fn bearer_header() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer hth_x"),
        );
        assert_eq!(bearer(&h), Some(Some("hth_x")));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  hth_y "),
        );
        assert_eq!(bearer(&h), Some(Some("hth_y")));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dTpw"),
        );
        assert_eq!(bearer(&h), Some(None));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer(&h), Some(None));
        assert!(is_ours("Bearer hth_abc"));
        assert!(!is_ours("Bearer other"));
        assert!(!is_ours("Basic hth_abc"));
    }
}
