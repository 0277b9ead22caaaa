//! A bounded cache of verified tokens, so a token seen again costs no signature check.
//!
//! Keyed by the SHA-256 of the token (the token itself is never kept), valid until the token's
//! `exp`, capped by entry count and by approximate memory; entries signed by a key that leaves
//! its issuer's key set are flushed.

use crate::identity::Principal;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

pub type TokenHash = [u8; 32];

pub fn hash_token(token: &str) -> TokenHash {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[derive(Debug, Clone)]
struct Entry {
    principal: Principal,
    expires_at: u64,
    issuer: usize,
    kid: Option<String>,
    bytes: usize,
}

#[derive(Default)]
struct Inner {
    map: HashMap<TokenHash, Entry>,
    /// Insertion order, for eviction of the oldest entries.
    order: VecDeque<TokenHash>,
    bytes: usize,
}

/// Hit and miss counts, for tests and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    pub bytes: usize,
}

pub struct TokenCache {
    max_entries: usize,
    max_bytes: usize,
    inner: Mutex<Inner>,
}

fn principal_bytes(p: &Principal) -> usize {
    let strings = p.subject.len()
        + p.issuer.as_ref().map(String::len).unwrap_or(0)
        + p.client_id.as_ref().map(String::len).unwrap_or(0)
        + p.tenant.as_ref().map(String::len).unwrap_or(0)
        + p.patient.as_ref().map(String::len).unwrap_or(0)
        + p.fhir_user.as_ref().map(String::len).unwrap_or(0)
        + p.roles.iter().map(|r| r.len() + 24).sum::<usize>()
        + p.scopes.iter().map(|r| r.len() + 24).sum::<usize>();
    strings + std::mem::size_of::<Entry>() + 32 + 64
}

impl TokenCache {
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        TokenCache {
            max_entries,
            max_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The cached principal for a token, if present and not expired at `now`.
    pub fn get(&self, key: &TokenHash, now: u64) -> Option<Principal> {
        let mut inner = self.inner.lock().ok()?;
        let expired = match inner.map.get(key) {
            None => return None,
            Some(e) => now >= e.expires_at,
        };
        if expired {
            if let Some(e) = inner.map.remove(key) {
                inner.bytes = inner.bytes.saturating_sub(e.bytes);
            }
            return None;
        }
        inner.map.get(key).map(|e| e.principal.clone())
    }

    pub fn insert(
        &self,
        key: TokenHash,
        principal: Principal,
        expires_at: u64,
        issuer: usize,
        kid: Option<String>,
        now: u64,
    ) {
        if self.max_entries == 0 || now >= expires_at {
            return;
        }
        let bytes = principal_bytes(&principal);
        if bytes > self.max_bytes {
            return;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let known = if let Some(old) = inner.map.remove(&key) {
            inner.bytes = inner.bytes.saturating_sub(old.bytes);
            true
        } else {
            false
        };
        // Evict expired and then oldest entries until the new one fits.
        while inner.map.len() >= self.max_entries || inner.bytes + bytes > self.max_bytes {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some(e) = inner.map.remove(&oldest) {
                inner.bytes = inner.bytes.saturating_sub(e.bytes);
            }
        }
        inner.bytes += bytes;
        if !known || !inner.order.contains(&key) {
            inner.order.push_back(key);
        }
        inner.map.insert(
            key,
            Entry {
                principal,
                expires_at,
                issuer,
                kid,
                bytes,
            },
        );
        // Keep the order queue from growing without bound with stale keys.
        if inner.order.len() > self.max_entries.saturating_mul(2) + 16 {
            let Inner { map, order, .. } = &mut *inner;
            order.retain(|k| map.contains_key(k));
        }
    }

    /// Flush every entry of `issuer` signed with one of `kids` (keys that left the key set), or
    /// every entry of the issuer when `kids` is `None`.
    pub fn flush_keys(&self, issuer: usize, kids: Option<&[Option<String>]>) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let mut freed = 0;
        inner.map.retain(|_, e| {
            let drop = e.issuer == issuer && kids.map(|k| k.contains(&e.kid)).unwrap_or(true);
            if drop {
                freed += e.bytes;
            }
            !drop
        });
        inner.bytes = inner.bytes.saturating_sub(freed);
    }

    pub fn stats(&self) -> CacheStats {
        match self.inner.lock() {
            Ok(i) => CacheStats {
                entries: i.map.len(),
                bytes: i.bytes,
            },
            Err(_) => CacheStats::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn token_hash_is_sha256() {
        // FIPS 180-2 test vector.
        assert_eq!(
            hash_token("abc")
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    use crate::identity::AuthMethod;

    fn p(sub: &str) -> Principal {
        Principal {
            subject: sub.into(),
            issuer: Some("iss".into()),
            client_id: None,
            roles: vec!["clinician".into()],
            scopes: vec![],
            tenant: None,
            patient: None,
            fhir_user: None,
            method: AuthMethod::Token,
            system: None,
            expires_at: None,
        }
    }

    #[test]
    fn hit_then_expiry_in_virtual_time() {
        let c = TokenCache::new(10, 1 << 20);
        let k = hash_token("t1");
        c.insert(k, p("a"), 1000, 0, Some("k1".into()), 900);
        assert_eq!(c.get(&k, 999).unwrap().subject, "a");
        assert!(c.get(&k, 1000).is_none(), "valid until exp, not at it");
        assert_eq!(
            c.stats().entries,
            0,
            "an expired entry is dropped when seen"
        );
        // Already expired tokens are never cached.
        c.insert(k, p("a"), 1000, 0, None, 1000);
        assert!(c.get(&k, 10).is_none());
    }

    #[test]
    fn eviction_by_count_and_by_memory() {
        let c = TokenCache::new(3, 1 << 20);
        for i in 0..5 {
            c.insert(
                hash_token(&format!("t{i}")),
                p(&format!("s{i}")),
                10_000,
                0,
                None,
                0,
            );
        }
        assert_eq!(c.stats().entries, 3);
        assert!(c.get(&hash_token("t0"), 1).is_none());
        assert!(c.get(&hash_token("t1"), 1).is_none());
        assert!(c.get(&hash_token("t4"), 1).is_some());

        let one = principal_bytes(&p("s0"));
        let c = TokenCache::new(1000, one * 2 + one / 2);
        for i in 0..4 {
            c.insert(
                hash_token(&format!("t{i}")),
                p(&format!("s{i}")),
                10_000,
                0,
                None,
                0,
            );
        }
        let s = c.stats();
        assert_eq!(s.entries, 2);
        assert!(s.bytes <= one * 2 + one / 2);
    }

    #[test]
    fn a_key_that_leaves_the_set_flushes_its_tokens() {
        let c = TokenCache::new(10, 1 << 20);
        c.insert(hash_token("a"), p("a"), 10_000, 0, Some("old".into()), 0);
        c.insert(hash_token("b"), p("b"), 10_000, 0, Some("new".into()), 0);
        c.insert(hash_token("c"), p("c"), 10_000, 1, Some("old".into()), 0);
        c.flush_keys(0, Some(&[Some("old".into())]));
        assert!(c.get(&hash_token("a"), 1).is_none());
        assert!(c.get(&hash_token("b"), 1).is_some());
        assert!(
            c.get(&hash_token("c"), 1).is_some(),
            "another issuer's kid of the same name stays"
        );
    }
}
