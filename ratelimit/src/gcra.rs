//! The Generic Cell Rate Algorithm.
//!
//! A key's state is one timestamp, its *theoretical arrival time* (TAT). With the emission
//! interval `T = period / rate` and the tolerance `tau = T * burst`, a request of cost `c` at
//! time `now` is allowed when `max(TAT, now) + c*T - tau <= now`, and then moves the TAT there.
//! This is a token bucket of `burst` units refilled at one unit per `T`, without a refill loop.
//! A key whose TAT is in the past holds a full bucket: forgetting it loses nothing.

use std::time::Duration;

/// A rate limit: `rate` units per `period`, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    rate: u64,
    period: Duration,
    burst: u64,
}

/// Why a [`Quota`] cannot be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaError(pub &'static str);

impl std::fmt::Display for QuotaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for QuotaError {}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Quota {
    /// `rate` units per `period` (both at least 1), at most `burst` (at least 1) at once.
    pub fn new(rate: u64, period: Duration, burst: u64) -> Result<Quota, QuotaError> {
        if rate == 0 {
            return Err(QuotaError("rate must be at least 1"));
        }
        if period.is_zero() {
            return Err(QuotaError("the period must be at least 1 second"));
        }
        if burst == 0 {
            return Err(QuotaError("burst must be at least 1"));
        }
        if nanos(period) / rate == 0 {
            return Err(QuotaError("rate is too high for the period"));
        }
        Ok(Quota {
            rate,
            period,
            burst,
        })
    }

    /// Units per period.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// The period.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// The most units at once.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// The emission interval `T` in nanoseconds (the time one unit takes to come back).
    pub fn interval_ns(&self) -> u64 {
        (nanos(self.period) / self.rate).max(1)
    }

    /// The tolerance `tau = T * burst` in nanoseconds.
    pub fn tolerance_ns(&self) -> u64 {
        self.interval_ns().saturating_mul(self.burst)
    }

    /// This quota scaled by `share` (0 < share <= 1): rate and burst rounded up, at least 1.
    /// What a replica enforces alone when the shared store is unavailable.
    pub fn scaled(&self, share: f64) -> Quota {
        let scale = |v: u64| -> u64 {
            let s = (v as f64 * share).ceil();
            if s.is_finite() && s >= 1.0 {
                (s as u64).min(v)
            } else {
                1
            }
        };
        let rate = scale(self.rate);
        let burst = scale(self.burst);
        Quota::new(rate, self.period, burst).unwrap_or(*self)
    }

    /// The cost a request is charged: at least 0, at most the burst (a request that costs more
    /// than the whole bucket needs a full bucket and empties it).
    pub fn charge(&self, cost: u64) -> u64 {
        cost.min(self.burst)
    }
}

/// What a limit decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The request may go on.
    pub allowed: bool,
    /// Units left in the bucket after this request (before it, when refused).
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset_after: Duration,
    /// When refused: until the request would be allowed. Zero when allowed.
    pub retry_after: Duration,
}

/// Whole seconds, rounded up.
pub fn ceil_secs(d: Duration) -> u64 {
    let s = d.as_secs();
    if d.subsec_nanos() > 0 {
        s.saturating_add(1)
    } else {
        s
    }
}

impl Outcome {
    /// [`Outcome::retry_after`] in whole seconds, rounded up, at least 1 (for `Retry-After`).
    pub fn retry_after_secs(&self) -> u64 {
        ceil_secs(self.retry_after).max(1)
    }

    /// [`Outcome::reset_after`] in whole seconds, rounded up.
    pub fn reset_secs(&self) -> u64 {
        ceil_secs(self.reset_after)
    }
}

/// One GCRA step: the outcome of a request of `cost` units at `now` (ns) for a key whose TAT is
/// `tat` (`None`: a key never seen, or forgotten), and the TAT to store when it is allowed.
pub fn step(tat: Option<u64>, now: u64, quota: &Quota, cost: u64) -> (Outcome, Option<u64>) {
    let t = quota.interval_ns();
    let tau = quota.tolerance_ns();
    let cost = quota.charge(cost);
    let tat = tat.unwrap_or(now).max(now);
    let new_tat = tat.saturating_add(cost.saturating_mul(t));
    let allow_at = new_tat.saturating_sub(tau);
    if now < allow_at {
        let used = tat - now;
        return (
            Outcome {
                allowed: false,
                remaining: tau.saturating_sub(used) / t,
                reset_after: Duration::from_nanos(used),
                retry_after: Duration::from_nanos(allow_at - now),
            },
            None,
        );
    }
    let used = new_tat - now;
    (
        Outcome {
            allowed: true,
            remaining: tau.saturating_sub(used) / t,
            reset_after: Duration::from_nanos(used),
            retry_after: Duration::ZERO,
        },
        Some(new_tat),
    )
}

/// The TAT after giving back `cost` units taken at `now` (a request refused by another limit).
pub fn refund(tat: u64, now: u64, quota: &Quota, cost: u64) -> u64 {
    let back = quota.charge(cost).saturating_mul(quota.interval_ns());
    tat.saturating_sub(back).max(now)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const S: u64 = 1_000_000_000;

    fn q(rate: u64, secs: u64, burst: u64) -> Quota {
        Quota::new(rate, Duration::from_secs(secs), burst).unwrap()
    }

    /// Runs requests of `cost` at `now` against one key, keeping its TAT.
    struct Key(Option<u64>);
    impl Key {
        fn hit(&mut self, now: u64, quota: &Quota, cost: u64) -> Outcome {
            let (o, tat) = step(self.0, now, quota, cost);
            if let Some(t) = tat {
                self.0 = Some(t);
            }
            o
        }
    }

    #[test]
    fn burst_then_refused_with_retry_after() {
        // 1 per second, burst 3.
        let quota = q(1, 1, 3);
        let mut k = Key(None);
        let r: Vec<_> = (0..3).map(|_| k.hit(0, &quota, 1)).collect();
        assert!(r.iter().all(|o| o.allowed));
        assert_eq!(r.iter().map(|o| o.remaining).collect::<Vec<_>>(), [2, 1, 0]);
        let refused = k.hit(0, &quota, 1);
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        assert_eq!(refused.retry_after_secs(), 1);
        assert_eq!(refused.reset_secs(), 3, "the bucket is full again in 3 s");
    }

    #[test]
    fn refill_over_time() {
        let quota = q(10, 10, 2); // 1 unit per second, 2 at once
        let mut k = Key(None);
        assert!(k.hit(0, &quota, 1).allowed);
        assert!(k.hit(0, &quota, 1).allowed);
        assert!(!k.hit(0, &quota, 1).allowed);
        // Half a second later: still nothing back.
        let o = k.hit(S / 2, &quota, 1);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Duration::from_millis(500));
        // One second: one unit back.
        let o = k.hit(S, &quota, 1);
        assert!(o.allowed);
        assert_eq!(o.remaining, 0);
        // Long idle: a full bucket, never more than burst.
        let o = k.hit(100 * S, &quota, 1);
        assert!(o.allowed);
        assert_eq!(o.remaining, 1);
    }

    #[test]
    fn cost_above_one_and_above_burst() {
        let quota = q(60, 60, 10); // 1 unit per second, 10 at once
        let mut k = Key(None);
        let o = k.hit(0, &quota, 5);
        assert!(o.allowed);
        assert_eq!(o.remaining, 5);
        let o = k.hit(0, &quota, 5);
        assert!(o.allowed);
        assert_eq!(o.remaining, 0);
        let o = k.hit(0, &quota, 5);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Duration::from_secs(5), "5 units take 5 s");
        // A cheap request is refused too while the bucket is empty, with a shorter wait.
        let o = k.hit(0, &quota, 1);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Duration::from_secs(1));
        // A cost above the burst needs a full bucket and empties it.
        let mut fresh = Key(None);
        let o = fresh.hit(0, &quota, 100);
        assert!(o.allowed);
        assert_eq!(o.remaining, 0);
        let o = fresh.hit(0, &quota, 100);
        assert!(!o.allowed);
        assert_eq!(o.retry_after, Duration::from_secs(10));
        // Cost zero is free.
        let o = fresh.hit(0, &quota, 0);
        assert!(o.allowed);
    }

    #[test]
    fn refund_gives_units_back() {
        let quota = q(1, 1, 2);
        let (_, tat) = step(None, 0, &quota, 2);
        let tat = tat.unwrap();
        assert!(!step(Some(tat), 0, &quota, 1).0.allowed);
        let back = refund(tat, 0, &quota, 1);
        assert!(step(Some(back), 0, &quota, 1).0.allowed);
        // Never below now (no more than a full bucket).
        assert_eq!(refund(tat, 5 * S, &quota, 2), 5 * S);
    }

    #[test]
    fn quota_validation_and_scaling() {
        assert!(Quota::new(0, Duration::from_secs(1), 1).is_err());
        assert!(Quota::new(1, Duration::ZERO, 1).is_err());
        assert!(Quota::new(1, Duration::from_secs(1), 0).is_err());
        let quota = q(100, 60, 20);
        let half = quota.scaled(0.5);
        assert_eq!((half.rate(), half.burst()), (50, 10));
        let tiny = q(1, 60, 1).scaled(0.1);
        assert_eq!((tiny.rate(), tiny.burst()), (1, 1));
        assert_eq!(quota.scaled(1.0), quota);
    }
}
