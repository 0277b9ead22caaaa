//! Cluster-wide limits: a shared store ([`Backend`], e.g. Redis) behind a short timeout, with a
//! fallback policy while it is unavailable.
//!
//! State machine:
//!
//! ```text
//!            ok                                   failure or timeout
//!   +---> HEALTHY ------------------------------------------> DEGRADED (retry at now + retry_after)
//!   |                                                              |
//!   |   the first request at or after `retry at` probes the store; |
//!   |   every other request meanwhile uses the fallback            |
//!   +------------------------- probe ok <--------------------------+
//!                              probe fails: DEGRADED again, retry at now + retry_after
//! ```
//!
//! While degraded no request waits on the store: only one request per `retry_after` (the probe)
//! pays at most `timeout`. The fallback is [`Fallback::Local`] (this replica enforces a share of
//! the cluster limit in its own memory) or [`Fallback::Deny`] (fail closed).

use crate::gcra::{Outcome, Quota};
use crate::local::LocalStore;
use crate::Clock;
use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Why the shared store did not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// No answer within the timeout.
    Timeout,
    /// An error (connection refused, protocol, script): for the error log. Never carries a key.
    Failed(String),
}

impl BackendError {
    /// `timeout` or `error` (the `kind` label of the store error counter).
    pub fn kind(&self) -> &'static str {
        match self {
            BackendError::Timeout => "timeout",
            BackendError::Failed(_) => "error",
        }
    }
}

/// A shared GCRA store: charge `cost` units to `key` under `quota`, atomically, in one round
/// trip.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// The outcome for `key`.
    async fn check(&self, key: &str, quota: &Quota, cost: u64) -> Result<Outcome, BackendError>;

    /// Forget the connection after a failure or a timeout, so the next probe starts afresh.
    fn reset(&self) {}
}

/// What a replica does while the shared store is unavailable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fallback {
    /// Enforce `share` (0 < share <= 1) of each cluster limit in this replica's memory.
    Local {
        /// The share of the cluster limit (rate and burst) enforced locally.
        share: f64,
    },
    /// Refuse every request the limit applies to (fail closed).
    Deny,
}

/// How a [`ClusterLimiter`] behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClusterConfig {
    /// The most a request waits on the store.
    pub timeout: Duration,
    /// After a failure, how long until the store is tried again.
    pub retry_after: Duration,
    /// What to do meanwhile.
    pub fallback: Fallback,
}

/// Where an outcome came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The shared store.
    Cluster,
    /// The local fallback (a share of the limit).
    Fallback,
    /// The store is unavailable and the policy is [`Fallback::Deny`]: refused.
    Unavailable,
}

/// An outcome, where it came from, and the store error met on the way, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// The decision.
    pub outcome: Outcome,
    /// Where it came from.
    pub source: Source,
    /// The store failed on this request (counted once per failure).
    pub error: Option<BackendError>,
}

/// A cluster-wide limiter with a fallback. See the [module documentation](self).
pub struct ClusterLimiter {
    backend: Arc<dyn Backend>,
    config: ClusterConfig,
    local: LocalStore,
    clock: Arc<dyn Clock>,
    degraded: AtomicBool,
    /// While degraded: when (clock ns) the next probe may go.
    retry_at: AtomicU64,
}

impl std::fmt::Debug for ClusterLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLimiter")
            .field("config", &self.config)
            .field("degraded", &self.degraded())
            .finish_non_exhaustive()
    }
}

impl ClusterLimiter {
    /// A limiter on `backend`; the fallback keeps at most about `max_keys` keys.
    pub fn new(
        backend: Arc<dyn Backend>,
        config: ClusterConfig,
        max_keys: usize,
        clock: Arc<dyn Clock>,
    ) -> Self {
        ClusterLimiter {
            backend,
            config,
            local: LocalStore::with_clock(max_keys, clock.clone()),
            clock,
            degraded: AtomicBool::new(false),
            retry_at: AtomicU64::new(0),
        }
    }

    /// Whether the store is considered unavailable (the fallback applies).
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::SeqCst)
    }

    /// The configuration.
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// Whether this request may use the store: healthy, or degraded and it wins the probe.
    fn may_try(&self) -> bool {
        if !self.degraded() {
            return true;
        }
        let now = self.clock.now_ns();
        let at = self.retry_at.load(Ordering::SeqCst);
        if now < at {
            return false;
        }
        // One probe per backoff: the winner moves the next retry on. A probe dropped mid-way
        // (client gone) leaves nothing stuck: another probe goes after the next backoff.
        let next = now.saturating_add(nanos(self.config.retry_after));
        self.retry_at
            .compare_exchange(at, next, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    fn fail(&self) {
        let now = self.clock.now_ns();
        self.retry_at.store(
            now.saturating_add(nanos(self.config.retry_after)),
            Ordering::SeqCst,
        );
        self.degraded.store(true, Ordering::SeqCst);
        self.backend.reset();
    }

    /// Charge `cost` units to `key` under `quota`.
    pub async fn check(&self, key: &str, quota: &Quota, cost: u64) -> Checked {
        let mut error = None;
        if self.may_try() {
            let answer =
                tokio::time::timeout(self.config.timeout, self.backend.check(key, quota, cost))
                    .await;
            match answer {
                Ok(Ok(outcome)) => {
                    if self.degraded.swap(false, Ordering::SeqCst) {
                        log::info!("rate_limit: the shared store answers again");
                    }
                    return Checked {
                        outcome,
                        source: Source::Cluster,
                        error: None,
                    };
                }
                Ok(Err(e)) => error = Some(e),
                Err(_) => error = Some(BackendError::Timeout),
            }
            let was = self.degraded();
            self.fail();
            if !was {
                if let Some(e) = &error {
                    log::warn!(
                        "rate_limit: the shared store is unavailable ({}), falling back for {} ms",
                        match e {
                            BackendError::Timeout => "timeout".to_string(),
                            BackendError::Failed(m) => m.clone(),
                        },
                        self.config.retry_after.as_millis()
                    );
                }
            }
        }
        match self.config.fallback {
            Fallback::Local { share } => Checked {
                outcome: self.local.check(key, &quota.scaled(share), cost),
                source: Source::Fallback,
                error,
            },
            Fallback::Deny => Checked {
                outcome: Outcome {
                    allowed: false,
                    remaining: 0,
                    reset_after: self.config.retry_after,
                    retry_after: self.config.retry_after,
                },
                source: Source::Unavailable,
                error,
            },
        }
    }

    /// Give back units the fallback charged (the store's are not given back: that would be a
    /// second round trip).
    pub fn refund_fallback(&self, key: &str, quota: &Quota, cost: u64) {
        if let Fallback::Local { share } = self.config.fallback {
            self.local.refund(key, &quota.scaled(share), cost);
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::ManualClock;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Behaviour {
        Up,
        Refuse,
        Stall,
    }

    /// A shared store that answers from its own LocalStore, refuses, or never answers.
    struct Fake {
        store: LocalStore,
        behaviour: Mutex<Behaviour>,
        calls: AtomicUsize,
        resets: AtomicUsize,
    }

    impl Fake {
        fn new(clock: Arc<ManualClock>) -> Arc<Fake> {
            Arc::new(Fake {
                store: LocalStore::with_clock(1000, clock),
                behaviour: Mutex::new(Behaviour::Up),
                calls: AtomicUsize::new(0),
                resets: AtomicUsize::new(0),
            })
        }
        fn set(&self, b: Behaviour) {
            *self.behaviour.lock().unwrap() = b;
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl Backend for Fake {
        async fn check(&self, key: &str, q: &Quota, cost: u64) -> Result<Outcome, BackendError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let b = *self.behaviour.lock().unwrap();
            match b {
                Behaviour::Up => Ok(self.store.check(key, q, cost)),
                Behaviour::Refuse => Err(BackendError::Failed("connection refused".into())),
                Behaviour::Stall => std::future::pending().await,
            }
        }
        fn reset(&self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn setup(fallback: Fallback) -> (Arc<ManualClock>, Arc<Fake>, ClusterLimiter) {
        let clock = Arc::new(ManualClock::default());
        let fake = Fake::new(clock.clone());
        let limiter = ClusterLimiter::new(
            fake.clone(),
            ClusterConfig {
                timeout: Duration::from_millis(20),
                retry_after: Duration::from_secs(1),
                fallback,
            },
            1000,
            clock.clone(),
        );
        (clock, fake, limiter)
    }

    fn quota() -> Quota {
        Quota::new(10, Duration::from_secs(3600), 10).unwrap()
    }

    async fn allowed(l: &ClusterLimiter, n: usize) -> (usize, Vec<Source>) {
        let mut ok = 0;
        let mut sources = Vec::new();
        for _ in 0..n {
            let c = l.check("k", &quota(), 1).await;
            if c.outcome.allowed {
                ok += 1;
            }
            sources.push(c.source);
        }
        (ok, sources)
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_store_decides() {
        let (_, fake, l) = setup(Fallback::Local { share: 0.5 });
        let (ok, sources) = allowed(&l, 12).await;
        assert_eq!(ok, 10);
        assert!(sources.iter().all(|s| *s == Source::Cluster));
        assert_eq!(fake.calls(), 12);
        assert!(!l.degraded());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_store_falls_back_to_the_local_share_then_recovers() {
        let (clock, fake, l) = setup(Fallback::Local { share: 0.5 });
        fake.set(Behaviour::Refuse);
        let first = l.check("k", &quota(), 1).await;
        assert_eq!(first.source, Source::Fallback);
        assert_eq!(first.error.as_ref().map(BackendError::kind), Some("error"));
        assert!(l.degraded());
        assert_eq!(fake.resets.load(Ordering::SeqCst), 1);
        // Meanwhile the store is not asked: half the limit (5) holds locally.
        let (ok, sources) = allowed(&l, 9).await;
        assert_eq!(ok + 1, 5, "the local share: 5 of 10");
        assert!(sources.iter().all(|s| *s == Source::Fallback));
        assert_eq!(fake.calls(), 1, "no request waits on a dead store");
        // After the backoff one request probes; still down: degraded again.
        clock.advance(Duration::from_secs(1));
        let probe = l.check("k", &quota(), 1).await;
        assert_eq!(probe.source, Source::Fallback);
        assert_eq!(fake.calls(), 2);
        let _ = l.check("k", &quota(), 1).await;
        assert_eq!(fake.calls(), 2, "one probe per backoff");
        // The store comes back: the next probe returns to it.
        fake.set(Behaviour::Up);
        clock.advance(Duration::from_secs(1));
        let back = l.check("k", &quota(), 1).await;
        assert_eq!(back.source, Source::Cluster);
        assert!(!l.degraded());
        let (_, sources) = allowed(&l, 3).await;
        assert!(sources.iter().all(|s| *s == Source::Cluster));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_store_times_out() {
        let (clock, fake, l) = setup(Fallback::Local { share: 0.5 });
        fake.set(Behaviour::Stall);
        let started = tokio::time::Instant::now();
        let c = l.check("k", &quota(), 1).await;
        assert_eq!(c.source, Source::Fallback);
        assert_eq!(c.error, Some(BackendError::Timeout));
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(20),
            "the timeout, no more"
        );
        let started = tokio::time::Instant::now();
        let c = l.check("k", &quota(), 1).await;
        assert_eq!(c.source, Source::Fallback);
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "degraded: no wait at all"
        );
        fake.set(Behaviour::Up);
        clock.advance(Duration::from_secs(1));
        assert_eq!(l.check("k", &quota(), 1).await.source, Source::Cluster);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deny_policy_fails_closed_until_recovery() {
        let (clock, fake, l) = setup(Fallback::Deny);
        fake.set(Behaviour::Refuse);
        let c = l.check("k", &quota(), 1).await;
        assert_eq!(c.source, Source::Unavailable);
        assert!(!c.outcome.allowed);
        assert_eq!(c.outcome.retry_after_secs(), 1);
        let (ok, _) = allowed(&l, 5).await;
        assert_eq!(ok, 0);
        fake.set(Behaviour::Up);
        clock.advance(Duration::from_secs(1));
        let c = l.check("k", &quota(), 1).await;
        assert!(c.outcome.allowed);
        assert_eq!(c.source, Source::Cluster);
    }
}
