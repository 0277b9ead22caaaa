//! The one retry rule of both upstream paths (the streaming proxy and whole exchanges), as
//! DESIGN.md states it:
//!
//! - a **connect failure** (refused, timed out: nothing was sent) may go to another backend,
//!   for any method;
//! - **after bytes were sent**, only an idempotent request whose whole body the gateway still
//!   holds may be sent again, and only when the connection broke (closed, reset, a read or
//!   write error) — never after a timeout (a slow backend is not a dead one, and a retry would
//!   multiply its load), and never once a response header went downstream. A non-idempotent
//!   request (a `POST` create, a `PATCH`) is never sent twice, whether its connection was fresh
//!   or reused from the pool;
//! - a **failing status** (a 5xx other than 501 and 505: the backend took the request and says
//!   it failed) is retried on another backend under the same conditions as a broken connection
//!   (idempotent, whole body still held, nothing downstream yet), so that a backend answering
//!   500s costs idempotent clients no error while a healthy backend remains. When no retry is
//!   possible (no attempt or backend left, budget spent), the client gets that status as the
//!   backend sent it;
//! - every retry needs an attempt left in the pool's `max_attempts` and a backend not tried
//!   yet (the pool's zone order picks it);
//! - and a retry of a request that was sent spends the pool's **retry budget**
//!   ([`RetryBudget`]): over a sliding window of 10 s, such retries may be at most `ratio` of the
//!   pool's requests plus a floor of `min_per_second`. When it is spent, a failure that would
//!   have been retried is not: the client gets the error (and
//!   `caregate_retry_budget_exhausted_total` counts it). A backend that fails everything then
//!   costs each request one attempt, not `max_attempts`. A failed connect sent nothing, so its
//!   retry (zone failover) multiplies no backend's work: it spends no budget, and stays bounded
//!   by `max_attempts`, the backends not tried yet and outlier detection.
//!
//! The rule is a plain function of the facts, so it is tested without sockets; the gateway's
//! `note_failure` owns the attempt bookkeeping and the retry metric for both paths.

use pingora::{Error, ErrorSource, ErrorType};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How an upstream attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connection could not be made: nothing was sent.
    Connect,
    /// The request (or part of it) was sent, then the exchange failed.
    /// The backend answered with a status that marks it failing (a 5xx other than 501 and
    /// 505; see `outlier::status_is_failure`) and nothing of the response went downstream yet.
    /// Outlier detection already counted it (`note_response`), so it is no backend fault here.
    Status,
    AfterSend {
        /// The connection broke (closed, reset, read or write error), as opposed to a timeout
        /// or an answer that could not be parsed.
        broken: bool,
        /// The backend is to blame (an upstream error: a broken connection, a timeout, an
        /// answer that could not be parsed), as opposed to the client going away or a filter
        /// refusing the body. Counts for outlier detection.
        backend_fault: bool,
    },
}

impl Failure {
    /// Classify an error of an attempt whose request was (at least partly) sent.
    pub fn after_send(e: &Error) -> Failure {
        let upstream = e.esource() == &ErrorSource::Upstream;
        Failure::AfterSend {
            broken: upstream
                && matches!(
                    e.etype(),
                    ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
                ),
            backend_fault: upstream && !matches!(e.etype(), ErrorType::HTTPStatus(_)),
        }
    }

    /// Whether retrying this failure spends the pool's retry budget: only when the request was
    /// sent (a backend may have worked on it).
    pub fn spends_budget(self) -> bool {
        matches!(self, Failure::AfterSend { .. } | Failure::Status)
    }

    /// Whether the failure counts against the backend (outlier detection): a failed connect,
    /// or an upstream error after the request was sent.
    pub fn backend_fault(self) -> bool {
        match self {
            Failure::Connect => true,
            Failure::Status => false,
            Failure::AfterSend { backend_fault, .. } => backend_fault,
        }
    }

    /// The `kind` label of `caregate_upstream_retries_total`.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Status => "status",
            Failure::AfterSend { .. } => "proxy",
        }
    }
}

/// What the request allows, whatever the failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The method is idempotent (RFC 9110 §9.2.2: GET, HEAD, OPTIONS, TRACE, PUT, DELETE).
    pub idempotent: bool,
    /// The gateway still holds the whole request body (it can send it again).
    pub body_replayable: bool,
    /// A final response header already went downstream.
    pub response_started: bool,
}

/// Whether the failed attempt may be followed by another one (attempts and backends left
/// aside: see the module documentation).
pub fn may_retry(failure: Failure, req: Request) -> bool {
    if req.response_started {
        return false;
    }
    match failure {
        Failure::Connect => true,
        // The backend took the request and said it failed: safe to send again only when the
        // method is idempotent and the whole body can be sent again.
        Failure::Status => req.idempotent && req.body_replayable,
        Failure::AfterSend { broken, .. } => broken && req.idempotent && req.body_replayable,
    }
}

/// The length of the retry budget's sliding window.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// The second (since the budget's origin) this bucket counts.
    second: u64,
    requests: u64,
    retries: u64,
}

/// A pool's retry budget: over the last [`BUDGET_WINDOW`] (ten one-second buckets), retries
/// may be at most `ratio` × requests + `min_per_second` × 10.
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    origin: Instant,
    buckets: Mutex<[Bucket; BUCKETS]>,
}

impl RetryBudget {
    pub fn new(ratio: f64, min_per_second: u32, origin: Instant) -> Self {
        RetryBudget {
            ratio: if ratio.is_finite() {
                ratio.max(0.0)
            } else {
                0.0
            },
            min_per_second,
            origin,
            buckets: Mutex::new([Bucket::default(); BUCKETS]),
        }
    }

    fn with_current<T>(&self, now: Instant, f: impl FnOnce(&mut Bucket, u64, u64) -> T) -> T {
        let second = now.saturating_duration_since(self.origin).as_secs();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (mut requests, mut retries) = (0u64, 0u64);
        for b in buckets.iter() {
            if b.second + (BUCKETS as u64) > second && b.second <= second {
                requests = requests.saturating_add(b.requests);
                retries = retries.saturating_add(b.retries);
            }
        }
        let slot = usize::try_from(second % BUCKETS as u64).unwrap_or(0);
        let b = &mut buckets[slot];
        if b.second != second {
            *b = Bucket {
                second,
                requests: 0,
                retries: 0,
            };
        }
        f(b, requests, retries)
    }

    /// Count a request sent to the pool.
    pub fn request(&self, now: Instant) {
        self.with_current(now, |b, _, _| b.requests = b.requests.saturating_add(1));
    }

    /// Spend one retry if the budget has one left; false when it is spent.
    pub fn try_retry(&self, now: Instant) -> bool {
        let ratio = self.ratio;
        let floor = f64::from(self.min_per_second) * BUDGET_WINDOW.as_secs_f64();
        self.with_current(now, |b, requests, retries| {
            #[allow(clippy::cast_precision_loss)]
            let allowed = ratio * requests as f64 + floor;
            #[allow(clippy::cast_precision_loss)]
            let ok = (retries as f64) < allowed;
            if ok {
                b.retries = b.retries.saturating_add(1);
            }
            ok
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GET: Request = Request {
        idempotent: true,
        body_replayable: true,
        response_started: false,
    };
    const POST: Request = Request {
        idempotent: false,
        ..GET
    };

    #[test]
    fn nothing_sent_any_method_goes_again() {
        assert!(may_retry(Failure::Connect, GET));
        assert!(may_retry(Failure::Connect, POST));
        assert!(may_retry(
            Failure::Connect,
            Request {
                body_replayable: false,
                ..POST
            }
        ));
    }

    #[test]
    fn a_post_whose_connection_broke_is_never_sent_again() {
        // Fresh or reused from the pool: the backend may have acted on it.
        assert!(!may_retry(
            Failure::AfterSend {
                broken: true,
                backend_fault: true
            },
            POST
        ));
        assert!(!may_retry(
            Failure::AfterSend {
                broken: false,
                backend_fault: true
            },
            POST
        ));
    }

    #[test]
    fn an_idempotent_request_goes_again_only_when_its_connection_broke() {
        assert!(may_retry(
            Failure::AfterSend {
                broken: true,
                backend_fault: true
            },
            GET
        ));
        // A timeout: a slow backend is not a dead one.
        assert!(!may_retry(
            Failure::AfterSend {
                broken: false,
                backend_fault: true
            },
            GET
        ));
        // The body was streamed and is gone.
        assert!(!may_retry(
            Failure::AfterSend {
                broken: true,
                backend_fault: true
            },
            Request {
                body_replayable: false,
                ..GET
            }
        ));
    }

    #[test]
    fn a_failing_status_goes_again_only_for_an_idempotent_replayable_request() {
        assert!(may_retry(Failure::Status, GET));
        assert!(!may_retry(Failure::Status, POST));
        assert!(!may_retry(
            Failure::Status,
            Request {
                body_replayable: false,
                ..GET
            }
        ));
        assert!(!may_retry(
            Failure::Status,
            Request {
                response_started: true,
                ..GET
            }
        ));
        assert!(Failure::Status.spends_budget());
        assert!(
            !Failure::Status.backend_fault(),
            "outlier detection counted the status already"
        );
    }

    #[test]
    fn never_once_a_response_went_downstream() {
        let started = Request {
            response_started: true,
            ..GET
        };
        assert!(!may_retry(Failure::Connect, started));
        assert!(!may_retry(
            Failure::AfterSend {
                broken: true,
                backend_fault: true
            },
            started
        ));
    }

    #[test]
    fn failures_are_classified_from_pingora_errors() {
        let closed = Error::new(ErrorType::ConnectionClosed).into_up();
        assert_eq!(
            Failure::after_send(&closed),
            Failure::AfterSend {
                broken: true,
                backend_fault: true
            }
        );
        let timeout = Error::new(ErrorType::ReadTimedout).into_up();
        assert_eq!(
            Failure::after_send(&timeout),
            Failure::AfterSend {
                broken: false,
                backend_fault: true
            }
        );
        // A downstream read error is not the upstream's connection breaking.
        let downstream = Error::new(ErrorType::ReadError).into_down();
        assert_eq!(
            Failure::after_send(&downstream),
            Failure::AfterSend {
                broken: false,
                backend_fault: false
            }
        );
        // Nor is a filter refusing the request body.
        let refused = Error::new(ErrorType::HTTPStatus(413));
        assert!(!Failure::after_send(&refused).backend_fault());
        assert!(Failure::after_send(&timeout).backend_fault());
        assert!(Failure::Connect.backend_fault());
        // Only what was sent spends the retry budget.
        assert!(!Failure::Connect.spends_budget());
        assert!(Failure::after_send(&closed).spends_budget());
    }

    #[test]
    fn the_budget_allows_the_ratio_of_requests_over_the_window() {
        let t0 = Instant::now();
        let b = RetryBudget::new(0.2, 0, t0);
        for _ in 0..10 {
            b.request(t0);
        }
        assert!(b.try_retry(t0));
        assert!(b.try_retry(t0 + Duration::from_millis(500)));
        // 2 of 10 spent.
        assert!(!b.try_retry(t0 + Duration::from_millis(900)));
        // Five seconds later the same requests still count: still spent.
        assert!(!b.try_retry(t0 + Duration::from_secs(5)));
        // More requests, more retries.
        for _ in 0..5 {
            b.request(t0 + Duration::from_secs(5));
        }
        assert!(b.try_retry(t0 + Duration::from_secs(5)));
        assert!(!b.try_retry(t0 + Duration::from_secs(5)));
        // Once the first second has left the window, its requests and retries no longer count:
        // 5 requests and 1 retry remain, so nothing is left.
        assert!(!b.try_retry(t0 + Duration::from_secs(10)));
        // Once every bucket has left it, the budget is empty: no requests, no retries.
        assert!(!b.try_retry(t0 + Duration::from_secs(30)));
    }

    #[test]
    fn the_floor_allows_retries_without_traffic() {
        let t0 = Instant::now();
        let b = RetryBudget::new(0.0, 1, t0);
        // min_per_second 1: ten retries per ten seconds.
        for i in 0..10 {
            assert!(
                b.try_retry(t0 + Duration::from_millis(i * 100)),
                "retry {i}"
            );
        }
        assert!(!b.try_retry(t0 + Duration::from_secs(1)));
        // A second after the window moved past the first retries, there is room again.
        assert!(b.try_retry(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn a_zero_budget_never_retries() {
        let t0 = Instant::now();
        let b = RetryBudget::new(0.0, 0, t0);
        for _ in 0..100 {
            b.request(t0);
        }
        assert!(!b.try_retry(t0));
        let nan = RetryBudget::new(f64::NAN, 0, t0);
        nan.request(t0);
        assert!(!nan.try_retry(t0));
    }
}
