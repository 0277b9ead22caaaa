//! Rate limits for caregate, in plain Rust (no Pingora types), so they can be unit-tested under a
//! controlled clock and benchmarked on their own.
//!
//! - [`gcra`]: the Generic Cell Rate Algorithm (equivalent to a token bucket of `burst` units
//!   refilled at `rate` units per `period`), one timestamp per key.
//! - [`local::LocalStore`]: GCRA buckets in a sharded, bounded in-memory map.
//! - [`concurrency::ConcurrencyLimiter`]: in-flight requests per key, released by a guard.
//! - [`keys::KeyHasher`]: HMAC-SHA256 of keys that name a person, so they are never stored in
//!   clear.
//! - [`cost::CostTable`]: the cost of a request by FHIR interaction.
//! - [`cluster::ClusterLimiter`]: a shared store ([`cluster::Backend`], e.g.
//!   [`redis_backend::RedisBackend`]) with a short timeout, a fallback policy and recovery after
//!   a backoff.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod concurrency;
pub mod cost;
pub mod gcra;
pub mod keys;
pub mod local;
pub mod redis_backend;

pub use gcra::{Outcome, Quota};

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A monotonic clock in nanoseconds; tests substitute a [`ManualClock`].
pub trait Clock: Send + Sync + 'static {
    /// Nanoseconds since an arbitrary fixed origin; never goes back.
    fn now_ns(&self) -> u64;
}

/// The process's monotonic clock.
#[derive(Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A clock that moves only when told (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock at `ns`.
    pub fn at(ns: u64) -> Self {
        ManualClock(AtomicU64::new(ns))
    }

    /// Move the clock forward by `d`.
    pub fn advance(&self, d: std::time::Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0.fetch_add(ns, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl<C: Clock> Clock for std::sync::Arc<C> {
    fn now_ns(&self) -> u64 {
        (**self).now_ns()
    }
}
