//! GCRA buckets in memory: a sharded map from key to TAT, bounded.
//!
//! Memory is bounded by `max_keys`: a key whose TAT is in the past holds a full bucket and is
//! forgotten without loss (swept now and then, and whenever a shard is full). When a shard is
//! full of live keys (a flood of distinct keys), the keys closest to a full bucket are forgotten
//! first — about an eighth of the shard at a time — so an insert never fails and never panics;
//! the price is that a forgotten key starts again with a full bucket.

use crate::gcra::{self, Outcome, Quota};
use crate::{Clock, SystemClock};
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};

const SHARDS: usize = 64;
/// Sweep a shard's expired keys every this many inserts.
const SWEEP_EVERY: u32 = 4096;

struct Shard {
    tats: HashMap<String, u64>,
    inserts: u32,
}

/// GCRA buckets in a bounded in-memory map (one per replica).
pub struct LocalStore {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    hasher: RandomState,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore")
            .field("max_keys", &(self.per_shard * self.shards.len()))
            .finish_non_exhaustive()
    }
}

impl LocalStore {
    /// A store of at most about `max_keys` keys (at least one per shard), on the system clock.
    pub fn new(max_keys: usize) -> Self {
        Self::with_clock(max_keys, Arc::new(SystemClock::default()))
    }

    /// A store on `clock`.
    pub fn with_clock(max_keys: usize, clock: Arc<dyn Clock>) -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    tats: HashMap::new(),
                    inserts: 0,
                })
            })
            .collect::<Vec<_>>()
            .into_boxed_slice();
        LocalStore {
            shards,
            per_shard: max_keys.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
            clock,
        }
    }

    /// The store's clock, in ns.
    pub fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        match self.shards[i].lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Charge `cost` units to `key` under `quota` now.
    pub fn check(&self, key: &str, quota: &Quota, cost: u64) -> Outcome {
        let now = self.clock.now_ns();
        let mut shard = self.shard(key);
        let (outcome, new_tat) = gcra::step(shard.tats.get(key).copied(), now, quota, cost);
        if let Some(tat) = new_tat {
            match shard.tats.get_mut(key) {
                Some(t) => *t = tat,
                None => {
                    shard.inserts = shard.inserts.wrapping_add(1);
                    if shard.tats.len() >= self.per_shard
                        || shard.inserts.is_multiple_of(SWEEP_EVERY)
                    {
                        make_room(&mut shard.tats, now, self.per_shard);
                    }
                    shard.tats.insert(key.to_string(), tat);
                }
            }
        }
        outcome
    }

    /// Give back `cost` units charged to `key` (a request another limit refused).
    pub fn refund(&self, key: &str, quota: &Quota, cost: u64) {
        let now = self.clock.now_ns();
        let mut shard = self.shard(key);
        if let Some(t) = shard.tats.get_mut(key) {
            *t = gcra::refund(*t, now, quota, cost);
        }
    }

    /// How many keys the store holds.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| match s.lock() {
                Ok(g) => g.tats.len(),
                Err(p) => p.into_inner().tats.len(),
            })
            .sum()
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Forget keys with a full bucket; if the shard is still full, forget the eighth of it closest
/// to a full bucket.
fn make_room(tats: &mut HashMap<String, u64>, now: u64, cap: usize) {
    tats.retain(|_, tat| *tat > now);
    if tats.len() < cap {
        return;
    }
    let k = (cap / 8).max(1).min(tats.len());
    let mut all: Vec<u64> = tats.values().copied().collect();
    let (_, threshold, _) = all.select_nth_unstable(k - 1);
    let threshold = *threshold;
    tats.retain(|_, tat| *tat > threshold);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ManualClock;
    use std::time::Duration;

    fn quota(rate: u64, secs: u64, burst: u64) -> Quota {
        Quota::new(rate, Duration::from_secs(secs), burst).unwrap()
    }

    #[test]
    fn keys_are_independent_and_refill() {
        let clock = Arc::new(ManualClock::default());
        let s = LocalStore::with_clock(1000, clock.clone());
        let q = quota(1, 1, 2);
        assert!(s.check("a", &q, 1).allowed);
        assert!(s.check("a", &q, 1).allowed);
        let o = s.check("a", &q, 1);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Duration::from_secs(1));
        assert!(
            s.check("b", &q, 1).allowed,
            "another key has its own bucket"
        );
        clock.advance(Duration::from_secs(1));
        assert!(s.check("a", &q, 1).allowed);
    }

    #[test]
    fn refund_restores_units() {
        let clock = Arc::new(ManualClock::default());
        let s = LocalStore::with_clock(1000, clock);
        let q = quota(1, 60, 1);
        assert!(s.check("k", &q, 1).allowed);
        assert!(!s.check("k", &q, 1).allowed);
        s.refund("k", &q, 1);
        assert!(s.check("k", &q, 1).allowed);
    }

    #[test]
    fn a_flood_of_distinct_keys_stays_bounded() {
        let clock = Arc::new(ManualClock::default());
        let s = LocalStore::with_clock(640, clock.clone());
        let q = quota(1, 3600, 5);
        for i in 0..50_000 {
            let _ = s.check(&format!("flood-{i}"), &q, 1);
        }
        assert!(s.len() <= 640, "{} keys", s.len());
        // Still serving: a new key gets its bucket, an existing one its state.
        assert!(s.check("newcomer", &q, 1).allowed);
    }

    #[test]
    fn idle_keys_are_forgotten_first() {
        let clock = Arc::new(ManualClock::default());
        let s = LocalStore::with_clock(64, clock.clone()); // one key per shard
        let q = quota(1, 1, 1);
        for i in 0..64 {
            let _ = s.check(&format!("k{i}"), &q, 1);
        }
        clock.advance(Duration::from_secs(2));
        // Every bucket is full again: new keys take their places without loss.
        for i in 0..64 {
            assert!(s.check(&format!("n{i}"), &q, 1).allowed);
        }
        assert!(s.len() <= 64);
    }
}
