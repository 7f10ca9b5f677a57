//! The store's answers that every proxied request would otherwise ask again — a token's
//! row by hash, whether a service is public — kept in memory and thrown away as soon as
//! the store's access generation moves (a token created or revoked, a service opened or
//! closed, a project or container removed), so a revocation still takes effect at once.
//! Asking SQLite on every request cost a fifth of the proxy's CPU (four file-lock
//! system calls per request).

use crate::store::{ApiTokenRow, Store, StoreError};
use std::collections::HashMap;
use std::sync::Mutex;

/// Entries kept at most; past that the cache starts over (it is only a cache).
const MAX_ENTRIES: usize = 10_000;

#[derive(Default)]
struct Cached {
    generation: u64,
    /// By token hash; `None`: no such live token.
    tokens: HashMap<String, Option<ApiTokenRow>>,
    /// By (container id, service label).
    public: HashMap<(String, String), bool>,
}

#[derive(Default)]
pub struct Decisions {
    cached: Mutex<Cached>,
}

impl Decisions {
    fn with<T>(&self, store: &Store, f: impl FnOnce(&mut Cached) -> T) -> T {
        let mut c = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let generation = store.access_generation();
        if c.generation != generation || c.tokens.len() + c.public.len() > MAX_ENTRIES {
            *c = Cached {
                generation,
                ..Cached::default()
            };
        }
        f(&mut c)
    }

    /// The live token with this hash. `fresh` says the store was asked (so its use may
    /// be recorded).
    pub fn token(
        &self,
        store: &Store,
        hash: &str,
    ) -> Result<(Option<ApiTokenRow>, bool), StoreError> {
        if let Some(hit) = self.with(store, |c| c.tokens.get(hash).cloned()) {
            return Ok((hit, false));
        }
        let row = store
            .api_token_by_hash(hash)?
            .filter(|r| r.revoked_at.is_none());
        self.with(store, |c| c.tokens.insert(hash.to_string(), row.clone()));
        Ok((row, true))
    }

    pub fn is_public(
        &self,
        store: &Store,
        container_id: &str,
        service: &str,
    ) -> Result<bool, StoreError> {
        let key = (container_id.to_string(), service.to_string());
        if let Some(hit) = self.with(store, |c| c.public.get(&key).copied()) {
            return Ok(hit);
        }
        let public = store.is_public(container_id, service)?;
        self.with(store, |c| c.public.insert(key, public));
        Ok(public)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::tokens;

    #[test]
    fn cached_answers_end_when_access_changes() {
        let s = Store::open_in_memory().unwrap();
        s.create_project("p").unwrap();
        s.create_project("q").unwrap();
        let t = tokens::create(&s, "p", "ci").unwrap();
        let d = Decisions::default();
        let h = tokens::hash(&t.token);
        let (row, fresh) = d.token(&s, &h).unwrap();
        assert!(row.is_some() && fresh);
        let (row, fresh) = d.token(&s, &h).unwrap();
        assert!(
            row.is_some() && !fresh,
            "the second answer comes from memory"
        );
        // Something unrelated to this token changed: asked again, same answer.
        tokens::create(&s, "q", "other").unwrap();
        assert!(d.token(&s, &h).unwrap().1);
        s.revoke_api_token("p", &row.unwrap().id).unwrap();
        assert!(d.token(&s, &h).unwrap().0.is_none(), "revoked at once");

        assert!(!d.is_public(&s, "c1", "files-1").unwrap());
        s.set_public("c1", "files-1", true).unwrap_or_default();
        // set_public may refuse an unknown container; only a change it made counts.
        let expect = s.is_public("c1", "files-1").unwrap();
        assert_eq!(d.is_public(&s, "c1", "files-1").unwrap(), expect);
    }
}
