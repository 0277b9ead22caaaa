//! Per-pool resilience: passive outlier detection (a circuit per backend) and the bulkhead
//! (a cap on a pool's upstream requests in flight). The retry budget is part of the retry rule
//! ([`crate::retry::RetryBudget`]). See `docs/resilience.md`.
//!
//! Outlier detection watches real traffic. A backend that fails `consecutive_failures` times in
//! a row (a 5xx answer other than `501`/`505`, a failed connect, or a connection that broke or
//! timed out after the request was sent) is **ejected** (circuit open) for an interval that
//! starts at `base_ejection` and doubles with each consecutive ejection, up to `max_ejection`.
//! At most `max_ejected_percent` of a zone's backends are ejected at once, and never the last
//! one of a zone. When the interval ends the backend is **half-open**: one real request at a
//! time goes to it as a probe; a success closes the circuit, a failure ejects it again for the
//! next, longer interval. After the circuit has stayed closed for as long as its last ejection
//! lasted, the next ejection starts again at `base_ejection`.
//!
//! Every method takes the time as an argument, so the state machine is tested with a
//! controlled clock.

use once_cell::sync::Lazy;
use prometheus::{register_int_counter_vec, register_int_gauge_vec, IntCounterVec, IntGaugeVec};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

// The registration of a well-formed, uniquely named metric cannot fail; `expect` documents that
// this happens once, at start-up, and never on a request.
#[allow(clippy::expect_used)]
pub static CIRCUIT_STATE: Lazy<IntGaugeVec> = Lazy::new(|| {
    register_int_gauge_vec!(
        "caregate_backend_circuit_state",
        "Outlier detection's circuit of a backend: 0 closed, 1 open (ejected), 2 half-open (probing).",
        &["pool", "zone", "backend"]
    )
    .expect("register caregate_backend_circuit_state")
});

/// The DESIGN.md core metric: 1 while a backend's circuit is open (ejected), else 0.
#[allow(clippy::expect_used)]
pub static CIRCUIT_OPEN: Lazy<IntGaugeVec> = Lazy::new(|| {
    register_int_gauge_vec!(
        "caregate_circuit_open",
        "1 while outlier detection has a backend ejected (its circuit open), 0 when closed or half-open (see caregate_backend_circuit_state).",
        &["pool", "zone", "backend"]
    )
    .expect("register caregate_circuit_open")
});

/// Drop the circuit series of one backend (`[pool, zone, backend]`).
pub fn remove_series(labels: &[&str; 3]) {
    let _ = CIRCUIT_STATE.remove_label_values(labels);
    let _ = CIRCUIT_OPEN.remove_label_values(labels);
    let _ = EJECTIONS.remove_label_values(labels);
}

#[allow(clippy::expect_used)]
pub static EJECTIONS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_backend_ejections_total",
        "Backends ejected by outlier detection (first ejections and re-ejections after a failed probe).",
        &["pool", "zone", "backend"]
    )
    .expect("register caregate_backend_ejections_total")
});

#[allow(clippy::expect_used)]
pub static POOL_IN_FLIGHT: Lazy<IntGaugeVec> = Lazy::new(|| {
    register_int_gauge_vec!(
        "caregate_pool_in_flight",
        "Requests holding a slot of the pool's bulkhead (max_in_flight) now.",
        &["pool"]
    )
    .expect("register caregate_pool_in_flight")
});

#[allow(clippy::expect_used)]
pub static BULKHEAD_REFUSALS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_bulkhead_refusals_total",
        "Requests refused with 503 overloaded because the pool had max_in_flight requests in flight.",
        &["pool"]
    )
    .expect("register caregate_bulkhead_refusals_total")
});

#[allow(clippy::expect_used)]
pub static RETRY_BUDGET_EXHAUSTED: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_retry_budget_exhausted_total",
        "Attempts that failed after the request was sent, which the retry rule would have retried, not retried because the pool's retry budget was spent.",
        &["pool"]
    )
    .expect("register caregate_retry_budget_exhausted_total")
});

/// Register the resilience metrics, so that each family is present from the first scrape.
pub fn init_metrics() {
    Lazy::force(&CIRCUIT_STATE);
    Lazy::force(&CIRCUIT_OPEN);
    Lazy::force(&EJECTIONS);
    Lazy::force(&POOL_IN_FLIGHT);
    Lazy::force(&BULKHEAD_REFUSALS);
    Lazy::force(&RETRY_BUDGET_EXHAUSTED);
}

/// Whether an upstream answer counts as a failure of the backend: a 5xx, except
/// `501 Not Implemented` and `505 HTTP Version Not Supported`, which describe the request, not
/// the backend's health.
pub fn status_is_failure(status: u16) -> bool {
    (500..600).contains(&status) && status != 501 && status != 505
}

/// The settings of a pool's outlier detection.
#[derive(Debug, Clone)]
pub struct Settings {
    pub enabled: bool,
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejected_percent: u32,
    /// How long a half-open probe may stay unanswered before another request may probe (the
    /// probe's client may have gone away): the pool's connect and read timeouts.
    pub probe_timeout: Duration,
}

impl Settings {
    /// The ejection interval after `previous` consecutive ejections.
    pub fn interval(&self, previous: u32) -> Duration {
        let factor = 1u32.checked_shl(previous.min(31)).unwrap_or(u32::MAX);
        self.base_ejection
            .checked_mul(factor)
            .unwrap_or(self.max_ejection)
            .min(self.max_ejection)
    }

    /// How many of a zone's `n` backends may be ejected at once: `max_ejected_percent` of them,
    /// rounded down, and never all of them.
    pub fn max_ejected(&self, n: usize) -> usize {
        let pct = usize::try_from(self.max_ejected_percent.min(100)).unwrap_or(100);
        (n.saturating_mul(pct) / 100).min(n.saturating_sub(1))
    }
}

/// A backend's circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    Closed,
    /// Ejected until the instant.
    Open {
        until: Instant,
    },
    /// The interval is over: one request at a time may probe (the one in flight started at
    /// `probe`).
    HalfOpen {
        probe: Option<Instant>,
    },
}

impl Circuit {
    /// The value of `caregate_backend_circuit_state` at `now`.
    pub fn code(self, now: Instant) -> i64 {
        match self {
            Circuit::Closed => 0,
            Circuit::Open { until } if now < until => 1,
            Circuit::Open { .. } | Circuit::HalfOpen { .. } => 2,
        }
    }

    fn ejected(self) -> bool {
        !matches!(self, Circuit::Closed)
    }
}

#[derive(Debug, Clone)]
struct State {
    circuit: Circuit,
    /// Failures in a row while closed.
    consecutive: u32,
    /// Ejections in a row (the next interval doubles with each).
    ejections: u32,
    /// When the circuit last closed after an ejection.
    closed_at: Option<Instant>,
}

impl State {
    fn new() -> Self {
        State {
            circuit: Circuit::Closed,
            consecutive: 0,
            ejections: 0,
            closed_at: None,
        }
    }
}

/// The outlier detection of one pool: a circuit per backend (by zone and address).
pub struct Detector {
    settings: Settings,
    pool: Arc<str>,
    zones: Vec<Arc<str>>,
    states: Mutex<HashMap<(usize, SocketAddr), State>>,
    /// Backends whose circuit is not closed: while none is, picking takes no lock.
    not_closed: AtomicUsize,
}

impl Detector {
    pub fn new(settings: Settings, pool: Arc<str>, zones: Vec<Arc<str>>) -> Self {
        Detector {
            settings,
            pool,
            zones,
            states: Mutex::new(HashMap::new()),
            not_closed: AtomicUsize::new(0),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(usize, SocketAddr), State>> {
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn zone_name(&self, zone: usize) -> &str {
        self.zones.get(zone).map(|z| &**z).unwrap_or("")
    }

    fn publish(&self, zone: usize, addr: SocketAddr, circuit: Circuit, now: Instant) {
        let backend = addr.to_string();
        let labels = [&*self.pool, self.zone_name(zone), backend.as_str()];
        let code = circuit.code(now);
        CIRCUIT_STATE.with_label_values(&labels).set(code);
        // Present at 0 before the first ejection, so that rates and alerts see every backend.
        EJECTIONS.with_label_values(&labels);
        CIRCUIT_OPEN
            .with_label_values(&labels)
            .set(i64::from(code == 1));
    }

    /// Whether `addr` of `zone` may take a request now. With `claim`, a half-open backend's
    /// probe slot is taken (the caller sends the probe); without, nothing changes.
    pub fn admits(&self, zone: usize, addr: SocketAddr, now: Instant, claim: bool) -> bool {
        if !self.settings.enabled || self.not_closed.load(Ordering::Acquire) == 0 {
            return true;
        }
        let mut states = self.lock();
        let Some(s) = states.get_mut(&(zone, addr)) else {
            return true;
        };
        let probe_free = |probe: Option<Instant>| match probe {
            None => true,
            Some(at) => now.saturating_duration_since(at) >= self.settings.probe_timeout,
        };
        let admitted = match s.circuit {
            Circuit::Closed => true,
            Circuit::Open { until } => now >= until,
            Circuit::HalfOpen { probe } => probe_free(probe),
        };
        if admitted && claim && s.circuit.ejected() {
            s.circuit = Circuit::HalfOpen { probe: Some(now) };
            let circuit = s.circuit;
            drop(states);
            self.publish(zone, addr, circuit, now);
        }
        admitted
    }

    /// The circuit of `addr` of `zone` now.
    pub fn circuit(&self, zone: usize, addr: SocketAddr) -> Circuit {
        self.lock()
            .get(&(zone, addr))
            .map(|s| s.circuit)
            .unwrap_or(Circuit::Closed)
    }

    /// The backend answered with a status that is not a failure.
    pub fn success(&self, zone: usize, addr: SocketAddr, now: Instant) {
        if !self.settings.enabled {
            return;
        }
        let mut states = self.lock();
        let Some(s) = states.get_mut(&(zone, addr)) else {
            // Never failed: nothing to remember.
            return;
        };
        match s.circuit {
            Circuit::Closed => s.consecutive = 0,
            // An answer to a request sent before the ejection: the ejection stands.
            Circuit::Open { until } if now < until => {}
            Circuit::Open { .. } | Circuit::HalfOpen { .. } => {
                s.circuit = Circuit::Closed;
                s.consecutive = 0;
                s.closed_at = Some(now);
                self.not_closed.fetch_sub(1, Ordering::AcqRel);
                drop(states);
                self.publish(zone, addr, Circuit::Closed, now);
            }
        }
    }

    /// The backend failed an attempt. `zone_size` is the zone's current backend count (for the
    /// `max_ejected_percent` rule). Returns true when this failure ejected the backend.
    pub fn failure(&self, zone: usize, addr: SocketAddr, zone_size: usize, now: Instant) -> bool {
        if !self.settings.enabled {
            return false;
        }
        let mut states = self.lock();
        let ejected_in_zone = states
            .iter()
            .filter(|((z, a), s)| *z == zone && *a != addr && s.circuit.ejected())
            .count();
        let s = states.entry((zone, addr)).or_insert_with(State::new);
        let eject = match s.circuit {
            // A failure of a request sent before the ejection: nothing new.
            Circuit::Open { until } if now < until => false,
            // The probe failed: eject again, for longer.
            Circuit::Open { .. } | Circuit::HalfOpen { .. } => true,
            Circuit::Closed => {
                s.consecutive = s.consecutive.saturating_add(1);
                s.consecutive >= self.settings.consecutive_failures
                    && ejected_in_zone < self.settings.max_ejected(zone_size)
            }
        };
        if !eject {
            return false;
        }
        if s.circuit == Circuit::Closed {
            // Stable since the last ejection for as long as it lasted: start again at the base.
            if let Some(closed) = s.closed_at {
                let last = self.settings.interval(s.ejections.saturating_sub(1));
                if now.saturating_duration_since(closed) >= last {
                    s.ejections = 0;
                }
            }
            self.not_closed.fetch_add(1, Ordering::AcqRel);
        }
        let interval = self.settings.interval(s.ejections);
        s.ejections = s.ejections.saturating_add(1);
        s.consecutive = 0;
        s.circuit = Circuit::Open {
            until: now + interval,
        };
        let circuit = s.circuit;
        drop(states);
        self.publish(zone, addr, circuit, now);
        let backend = addr.to_string();
        EJECTIONS
            .with_label_values(&[&*self.pool, self.zone_name(zone), backend.as_str()])
            .inc();
        log::warn!(
            "pool {} zone {}: backend {addr} ejected for {} ms by outlier detection",
            self.pool,
            self.zone_name(zone),
            interval.as_millis()
        );
        true
    }

    /// Publish the circuit state of `current` (the zone's backends now) and forget the
    /// backends of `zone` that are not among them (a DNS answer dropped them).
    pub fn refresh_zone(&self, zone: usize, current: &[SocketAddr], now: Instant) {
        let mut gone = Vec::new();
        let mut shown = Vec::new();
        {
            let mut states = self.lock();
            states.retain(|(z, a), s| {
                if *z != zone || current.contains(a) {
                    return true;
                }
                if s.circuit.ejected() {
                    self.not_closed.fetch_sub(1, Ordering::AcqRel);
                }
                gone.push(*a);
                false
            });
            for a in current {
                let c = states
                    .get(&(zone, *a))
                    .map(|s| s.circuit)
                    .unwrap_or(Circuit::Closed);
                shown.push((*a, c));
            }
        }
        for a in gone {
            self.forget(zone, a);
        }
        for (a, c) in shown {
            self.publish(zone, a, c, now);
        }
    }

    /// Drop the metric series of one backend.
    pub fn forget(&self, zone: usize, addr: SocketAddr) {
        let backend = addr.to_string();
        remove_series(&[&*self.pool, self.zone_name(zone), backend.as_str()]);
    }
}

/// A pool's cap on upstream requests in flight (one slot per request, whatever its attempts).
pub struct Bulkhead {
    /// 0: no cap (the requests are still counted).
    max: usize,
    in_flight: Arc<AtomicUsize>,
    /// The pool's series, looked up once (not per request).
    gauge: prometheus::IntGauge,
    refusals: prometheus::IntCounter,
}

impl Bulkhead {
    pub fn new(pool: Arc<str>, max: usize) -> Self {
        // The pool's series, present at 0 from the first scrape.
        RETRY_BUDGET_EXHAUSTED.with_label_values(&[&*pool]);
        Bulkhead {
            max,
            in_flight: Arc::new(AtomicUsize::new(0)),
            gauge: POOL_IN_FLIGHT.with_label_values(&[&*pool]),
            refusals: BULKHEAD_REFUSALS.with_label_values(&[&*pool]),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Requests holding a slot now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Take a slot, or `None` (counted as a refusal) when the pool is at its cap.
    pub fn enter(&self) -> Option<Slot> {
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if self.max > 0 && before >= self.max {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.refusals.inc();
            return None;
        }
        let gauge = self.gauge.clone();
        gauge.inc();
        Some(Slot {
            in_flight: self.in_flight.clone(),
            gauge,
        })
    }
}

/// A request's slot in its pool's bulkhead; given back when dropped (with the request's
/// context, whichever way the request ended).
pub struct Slot {
    in_flight: Arc<AtomicUsize>,
    gauge: prometheus::IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            enabled: true,
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(35),
            max_ejected_percent: 50,
            probe_timeout: Duration::from_secs(5),
        }
    }

    fn detector(s: Settings) -> Detector {
        Detector::new(s, Arc::from("unit"), vec![Arc::from("z0"), Arc::from("z1")])
    }

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn intervals_double_up_to_the_maximum() {
        let s = settings();
        assert_eq!(s.interval(0), Duration::from_secs(10));
        assert_eq!(s.interval(1), Duration::from_secs(20));
        assert_eq!(s.interval(2), Duration::from_secs(35));
        assert_eq!(s.interval(200), Duration::from_secs(35));
    }

    #[test]
    fn never_more_than_the_percent_and_never_the_last_backend() {
        let s = settings();
        assert_eq!(s.max_ejected(1), 0);
        assert_eq!(s.max_ejected(2), 1);
        assert_eq!(s.max_ejected(3), 1);
        assert_eq!(s.max_ejected(4), 2);
        let all = Settings {
            max_ejected_percent: 100,
            ..settings()
        };
        assert_eq!(all.max_ejected(3), 2);
        assert_eq!(all.max_ejected(0), 0);
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_in_between_resets_the_count() {
        let d = detector(settings());
        let t0 = Instant::now();
        assert!(!d.failure(0, a(1), 2, t0));
        assert!(!d.failure(0, a(1), 2, t0));
        d.success(0, a(1), t0);
        assert!(!d.failure(0, a(1), 2, t0));
        assert!(!d.failure(0, a(1), 2, t0));
        assert!(d.admits(0, a(1), t0, false));
        assert!(d.failure(0, a(1), 2, t0));
        assert!(!d.admits(0, a(1), t0, true));
        assert!(!d.admits(0, a(1), t0 + Duration::from_millis(9999), true));
        // The other backend is not concerned.
        assert!(d.admits(0, a(2), t0, true));
    }

    #[test]
    fn half_open_lets_one_probe_at_a_time_and_a_success_closes() {
        let d = detector(settings());
        let t0 = Instant::now();
        for _ in 0..3 {
            d.failure(0, a(1), 2, t0);
        }
        let t1 = t0 + Duration::from_secs(10);
        // Peeking does not take the probe.
        assert!(d.admits(0, a(1), t1, false));
        assert_eq!(d.circuit(0, a(1)).code(t1), 2);
        assert!(d.admits(0, a(1), t1, true));
        assert_eq!(d.circuit(0, a(1)), Circuit::HalfOpen { probe: Some(t1) });
        // A second request while the probe is out goes elsewhere.
        assert!(!d.admits(0, a(1), t1 + Duration::from_secs(1), true));
        d.success(0, a(1), t1 + Duration::from_secs(1));
        assert_eq!(d.circuit(0, a(1)), Circuit::Closed);
        assert!(d.admits(0, a(1), t1 + Duration::from_secs(1), true));
    }

    #[test]
    fn an_unanswered_probe_frees_its_slot_after_the_probe_timeout() {
        let d = detector(settings());
        let t0 = Instant::now();
        for _ in 0..3 {
            d.failure(0, a(1), 2, t0);
        }
        let t1 = t0 + Duration::from_secs(10);
        assert!(d.admits(0, a(1), t1, true));
        assert!(!d.admits(0, a(1), t1 + Duration::from_secs(4), true));
        assert!(d.admits(0, a(1), t1 + Duration::from_secs(5), true));
    }

    #[test]
    fn a_failed_probe_ejects_again_for_twice_as_long() {
        let d = detector(settings());
        let t0 = Instant::now();
        for _ in 0..3 {
            d.failure(0, a(1), 2, t0);
        }
        let t1 = t0 + Duration::from_secs(10);
        assert!(d.admits(0, a(1), t1, true));
        assert!(d.failure(0, a(1), 2, t1));
        assert_eq!(
            d.circuit(0, a(1)),
            Circuit::Open {
                until: t1 + Duration::from_secs(20)
            }
        );
        let t2 = t1 + Duration::from_secs(20);
        assert!(d.admits(0, a(1), t2, true));
        assert!(d.failure(0, a(1), 2, t2));
        // Capped at the maximum.
        assert_eq!(
            d.circuit(0, a(1)),
            Circuit::Open {
                until: t2 + Duration::from_secs(35)
            }
        );
    }

    #[test]
    fn the_interval_starts_again_at_the_base_after_a_stable_period() {
        let d = detector(settings());
        let t0 = Instant::now();
        for _ in 0..3 {
            d.failure(0, a(1), 2, t0);
        }
        // Probe fails once (20 s next), then succeeds.
        let t1 = t0 + Duration::from_secs(10);
        d.admits(0, a(1), t1, true);
        d.failure(0, a(1), 2, t1);
        let t2 = t1 + Duration::from_secs(20);
        d.admits(0, a(1), t2, true);
        d.success(0, a(1), t2);
        // Failing again soon after: the interval goes on doubling (40 s, capped at 35 s).
        let soon = t2 + Duration::from_secs(5);
        for _ in 0..3 {
            d.failure(0, a(1), 2, soon);
        }
        assert_eq!(
            d.circuit(0, a(1)),
            Circuit::Open {
                until: soon + Duration::from_secs(35)
            }
        );
        let t3 = soon + Duration::from_secs(35);
        d.admits(0, a(1), t3, true);
        d.success(0, a(1), t3);
        // Stable for as long as the last ejection (35 s): back to the base interval.
        let later = t3 + Duration::from_secs(35);
        for _ in 0..3 {
            d.failure(0, a(1), 2, later);
        }
        assert_eq!(
            d.circuit(0, a(1)),
            Circuit::Open {
                until: later + Duration::from_secs(10)
            }
        );
    }

    #[test]
    fn the_percent_rule_keeps_a_zone_serving() {
        let d = detector(settings());
        let t0 = Instant::now();
        for _ in 0..3 {
            d.failure(0, a(1), 2, t0);
        }
        // The second backend of a two-backend zone fails too: not ejected (50 %).
        for _ in 0..5 {
            assert!(!d.failure(0, a(2), 2, t0));
        }
        assert!(d.admits(0, a(2), t0, true));
        // Another zone is counted on its own; a one-backend zone is never ejected.
        for _ in 0..5 {
            assert!(!d.failure(1, a(3), 1, t0));
        }
        assert!(d.admits(1, a(3), t0, true));
        // Once the first is back, the second one's next failure ejects it.
        let t1 = t0 + Duration::from_secs(10);
        d.admits(0, a(1), t1, true);
        d.success(0, a(1), t1);
        assert!(d.failure(0, a(2), 2, t1));
    }

    #[test]
    fn late_answers_of_requests_sent_before_the_ejection_change_nothing() {
        let d = detector(settings());
        let t0 = Instant::now();
        for _ in 0..3 {
            d.failure(0, a(1), 2, t0);
        }
        let t = t0 + Duration::from_secs(1);
        d.success(0, a(1), t);
        assert!(!d.failure(0, a(1), 2, t));
        assert_eq!(
            d.circuit(0, a(1)),
            Circuit::Open {
                until: t0 + Duration::from_secs(10)
            }
        );
    }

    #[test]
    fn disabled_detection_never_ejects() {
        let d = detector(Settings {
            enabled: false,
            ..settings()
        });
        let t0 = Instant::now();
        for _ in 0..10 {
            assert!(!d.failure(0, a(1), 4, t0));
        }
        assert!(d.admits(0, a(1), t0, true));
    }

    #[test]
    fn forgotten_backends_release_their_ejection() {
        let d = detector(settings());
        let t0 = Instant::now();
        for _ in 0..3 {
            d.failure(0, a(1), 2, t0);
        }
        d.refresh_zone(0, &[a(2)], t0);
        assert_eq!(d.circuit(0, a(1)), Circuit::Closed);
        assert_eq!(d.not_closed.load(Ordering::Acquire), 0);
    }

    #[test]
    fn only_server_errors_of_the_backend_count() {
        assert!(status_is_failure(500));
        assert!(status_is_failure(502));
        assert!(status_is_failure(503));
        assert!(status_is_failure(504));
        assert!(!status_is_failure(501));
        assert!(!status_is_failure(505));
        assert!(!status_is_failure(404));
        assert!(!status_is_failure(429));
        assert!(!status_is_failure(200));
    }

    fn pool_config(extra: &str) -> Result<crate::config::Loaded, crate::config::ConfigError> {
        let text = format!(
            "listeners:\n  - {{ name: public, channel: public, listen: \"127.0.0.1:0\" }}\npools:\n  - name: ehr\n    zones:\n      - {{ name: a, backends: [ {{ address: \"127.0.0.1:9\" }} ] }}\n{extra}routes:\n  - {{ name: r, listener: public, path_prefix: /api, pool: ehr }}\n"
        );
        crate::config::load_str(&text, std::path::PathBuf::from("."))
    }

    #[test]
    fn pool_resilience_defaults() {
        let Ok(l) = pool_config("") else {
            panic!("the minimal config does not load");
        };
        let p = &l.config.pools[0];
        let od = &p.outlier_detection;
        assert!(od.enabled);
        assert_eq!(od.consecutive_failures, 5);
        assert_eq!(od.base_ejection_ms, 30_000);
        assert_eq!(od.max_ejection_ms, 300_000);
        assert_eq!(od.max_ejected_percent, 50);
        assert_eq!(p.max_in_flight, 1000);
        assert!((p.retry_budget.ratio - 0.2).abs() < f64::EPSILON);
        assert_eq!(p.retry_budget.min_per_second, 5);
    }

    #[test]
    fn pool_resilience_config_is_checked_and_errors_name_the_pool() {
        let ok = "    outlier_detection: { consecutive_failures: 3, base_ejection_ms: 100, max_ejection_ms: 1000, max_ejected_percent: 100 }\n    max_in_flight: 0\n    retry_budget: { ratio: 0, min_per_second: 0 }\n";
        assert!(pool_config(ok).is_ok());
        assert!(pool_config("    outlier_detection: { enabled: false }\n").is_ok());
        for (extra, want) in [
            (
                "    outlier_detection: { consecutive_failures: 0 }\n",
                "pools[0] (ehr).outlier_detection.consecutive_failures",
            ),
            (
                "    outlier_detection: { base_ejection_ms: 1000, max_ejection_ms: 500 }\n",
                "pools[0] (ehr).outlier_detection",
            ),
            (
                "    outlier_detection: { max_ejected_percent: 101 }\n",
                "pools[0] (ehr).outlier_detection.max_ejected_percent",
            ),
            (
                "    retry_budget: { ratio: 1.5 }\n",
                "pools[0] (ehr).retry_budget.ratio",
            ),
            ("    outlier_detection: { ejection: 1 }\n", "unknown field"),
            ("    max_in_flight: -1\n", "max_in_flight"),
        ] {
            match pool_config(extra) {
                Ok(_) => panic!("accepted: {extra}"),
                Err(e) => assert!(e.0.contains(want), "{extra}: {}", e.0),
            }
        }
    }

    #[test]
    fn bulkhead_slots_come_back_when_dropped() {
        let b = Bulkhead::new(Arc::from("unit-bulkhead"), 2);
        let s1 = b.enter();
        let s2 = b.enter();
        assert!(s1.is_some() && s2.is_some());
        assert!(b.enter().is_none());
        assert_eq!(b.in_flight(), 2);
        drop(s1);
        assert_eq!(b.in_flight(), 1);
        let s3 = b.enter();
        assert!(s3.is_some());
        drop(s2);
        drop(s3);
        assert_eq!(b.in_flight(), 0);
        let unlimited = Bulkhead::new(Arc::from("unit-unlimited"), 0);
        let held: Vec<_> = (0..100).filter_map(|_| unlimited.enter()).collect();
        assert_eq!(held.len(), 100);
    }
}
