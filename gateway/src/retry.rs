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
//! - every retry needs an attempt left in the pool's `max_attempts` and a backend not tried
//!   yet (the pool's zone order picks it).
//!
//! The rule is a plain function of the facts, so it is tested without sockets; the gateway's
//! `note_failure` owns the attempt bookkeeping and the retry metric for both paths.

use pingora::{Error, ErrorSource, ErrorType};

/// How an upstream attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connection could not be made: nothing was sent.
    Connect,
    /// The request (or part of it) was sent, then the exchange failed.
    AfterSend {
        /// The connection broke (closed, reset, read or write error), as opposed to a timeout
        /// or an answer that could not be parsed.
        broken: bool,
    },
}

impl Failure {
    /// Classify an error of an attempt whose request was (at least partly) sent.
    pub fn after_send(e: &Error) -> Failure {
        Failure::AfterSend {
            broken: e.esource() == &ErrorSource::Upstream
                && matches!(
                    e.etype(),
                    ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
                ),
        }
    }

    /// The `kind` label of `caregate_upstream_retries_total`.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
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
        Failure::AfterSend { broken } => broken && req.idempotent && req.body_replayable,
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
        assert!(!may_retry(Failure::AfterSend { broken: true }, POST));
        assert!(!may_retry(Failure::AfterSend { broken: false }, POST));
    }

    #[test]
    fn an_idempotent_request_goes_again_only_when_its_connection_broke() {
        assert!(may_retry(Failure::AfterSend { broken: true }, GET));
        // A timeout: a slow backend is not a dead one.
        assert!(!may_retry(Failure::AfterSend { broken: false }, GET));
        // The body was streamed and is gone.
        assert!(!may_retry(
            Failure::AfterSend { broken: true },
            Request {
                body_replayable: false,
                ..GET
            }
        ));
    }

    #[test]
    fn never_once_a_response_went_downstream() {
        let started = Request {
            response_started: true,
            ..GET
        };
        assert!(!may_retry(Failure::Connect, started));
        assert!(!may_retry(Failure::AfterSend { broken: true }, started));
    }

    #[test]
    fn failures_are_classified_from_pingora_errors() {
        let closed = Error::new(ErrorType::ConnectionClosed).into_up();
        assert_eq!(
            Failure::after_send(&closed),
            Failure::AfterSend { broken: true }
        );
        let timeout = Error::new(ErrorType::ReadTimedout).into_up();
        assert_eq!(
            Failure::after_send(&timeout),
            Failure::AfterSend { broken: false }
        );
        // A downstream read error is not the upstream's connection breaking.
        let downstream = Error::new(ErrorType::ReadError).into_down();
        assert_eq!(
            Failure::after_send(&downstream),
            Failure::AfterSend { broken: false }
        );
    }
}
