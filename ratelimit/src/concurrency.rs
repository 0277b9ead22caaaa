//! Concurrency limits: requests in flight per key on this replica, each held by a
//! [`ConcurrencyPermit`] that gives its slot back when dropped (or [`ConcurrencyPermit::release`]d).
//!
//! A key is in the map only while it has requests in flight, so memory is bounded by the
//! requests in flight.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};

const SHARDS: usize = 32;

struct Inner {
    shards: Box<[Mutex<HashMap<String, u32>>]>,
    hasher: RandomState,
}

impl Inner {
    fn shard(&self, key: &str) -> MutexGuard<'_, HashMap<String, u32>> {
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        match self.shards[i].lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn release(&self, key: &str) {
        let mut shard = self.shard(key);
        let gone = match shard.get_mut(key) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if gone {
            shard.remove(key);
        }
    }
}

/// In-flight requests per key.
#[derive(Clone)]
pub struct ConcurrencyLimiter {
    inner: Arc<Inner>,
}

impl Default for ConcurrencyLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for ConcurrencyLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConcurrencyLimiter").finish_non_exhaustive()
    }
}

/// A slot held by one request; dropping it gives the slot back.
pub struct ConcurrencyPermit {
    inner: Arc<Inner>,
    key: String,
    held: bool,
}

impl std::fmt::Debug for ConcurrencyPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key may name a person (hashed, but still kept out of logs).
        f.debug_struct("ConcurrencyPermit")
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

impl ConcurrencyPermit {
    /// Give the slot back now (idempotent; dropping does the same).
    pub fn release(&mut self) {
        if self.held {
            self.held = false;
            self.inner.release(&self.key);
        }
    }
}

impl Drop for ConcurrencyPermit {
    fn drop(&mut self) {
        self.release();
    }
}

impl ConcurrencyLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        ConcurrencyLimiter {
            inner: Arc::new(Inner {
                shards: (0..SHARDS)
                    .map(|_| Mutex::new(HashMap::new()))
                    .collect::<Vec<_>>()
                    .into_boxed_slice(),
                hasher: RandomState::new(),
            }),
        }
    }

    /// A slot for `key` if fewer than `max` requests of it are in flight; else `Err` with the
    /// number in flight.
    pub fn try_acquire(&self, key: &str, max: u32) -> Result<ConcurrencyPermit, u32> {
        let mut shard = self.inner.shard(key);
        let n = shard.get(key).copied().unwrap_or(0);
        if n >= max {
            return Err(n);
        }
        shard.insert(key.to_string(), n + 1);
        drop(shard);
        Ok(self.permit(key))
    }

    /// A slot for `key` whatever the limit (shadow mode: the count stays true), and whether the
    /// limit `max` was already reached.
    pub fn acquire_counting(&self, key: &str, max: u32) -> (ConcurrencyPermit, bool) {
        let mut shard = self.inner.shard(key);
        let n = shard.get(key).copied().unwrap_or(0);
        shard.insert(key.to_string(), n.saturating_add(1));
        drop(shard);
        (self.permit(key), n >= max)
    }

    fn permit(&self, key: &str) -> ConcurrencyPermit {
        ConcurrencyPermit {
            inner: self.inner.clone(),
            key: key.to_string(),
            held: true,
        }
    }

    /// Requests of `key` in flight.
    pub fn in_flight(&self, key: &str) -> u32 {
        self.inner.shard(key).get(key).copied().unwrap_or(0)
    }

    /// Keys with requests in flight.
    pub fn keys(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| match s.lock() {
                Ok(g) => g.len(),
                Err(p) => p.into_inner().len(),
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn slots_are_held_until_released_or_dropped() {
        let c = ConcurrencyLimiter::new();
        let a = c.try_acquire("u", 2).unwrap();
        let mut b = c.try_acquire("u", 2).unwrap();
        assert_eq!(c.try_acquire("u", 2).err(), Some(2));
        assert!(c.try_acquire("v", 2).is_ok(), "another key");
        b.release();
        b.release(); // idempotent
        assert_eq!(c.in_flight("u"), 1);
        let d = c.try_acquire("u", 2).unwrap();
        drop(a);
        drop(d);
        assert_eq!(c.in_flight("u"), 0);
        assert_eq!(c.keys(), 0, "no key left behind");
    }

    #[test]
    fn counting_acquire_reports_the_limit() {
        let c = ConcurrencyLimiter::new();
        let (p1, over1) = c.acquire_counting("k", 1);
        let (p2, over2) = c.acquire_counting("k", 1);
        assert!(!over1 && over2);
        assert_eq!(c.in_flight("k"), 2);
        drop((p1, p2));
        assert_eq!(c.keys(), 0);
    }
}
