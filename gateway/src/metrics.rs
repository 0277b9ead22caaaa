//! The gateway's Prometheus metrics (default registry, served on the admin listener).
//!
//! Labels are bounded: listener, route, method (known methods or `OTHER`), status class, pool,
//! zone, backend (configured addresses only), filter, result, reason code. Never a path, a
//! patient id, a user id or a token.

use once_cell::sync::Lazy;
use prometheus::{
    register_histogram_vec, register_int_counter_vec, register_int_gauge_vec, HistogramVec,
    IntCounterVec, IntGaugeVec,
};

/// Buckets for a proxy: sub-millisecond to tens of seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

// The registration of a well-formed, uniquely named metric cannot fail; `expect` documents that
// this happens once, at start-up, and never on a request.
#[allow(clippy::expect_used)]
pub static REQUESTS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_requests_total",
        "Requests answered, by listener, route, method, status class and exact status code (a bounded set; other codes are `other`, no response is `none`).",
        &["listener", "route", "method", "status_class", "code"]
    )
    .expect("register caregate_requests_total")
});

#[allow(clippy::expect_used)]
pub static REQUEST_DURATION: Lazy<HistogramVec> = Lazy::new(|| {
    register_histogram_vec!(
        "caregate_request_duration_seconds",
        "Time from request header to the end of the response, by listener and route.",
        &["listener", "route"],
        BUCKETS.to_vec()
    )
    .expect("register caregate_request_duration_seconds")
});

#[allow(clippy::expect_used)]
pub static UPSTREAM_DURATION: Lazy<HistogramVec> = Lazy::new(|| {
    register_histogram_vec!(
        "caregate_upstream_duration_seconds",
        "Time from connecting to the backend to its response header, by pool and zone.",
        &["pool", "zone"],
        BUCKETS.to_vec()
    )
    .expect("register caregate_upstream_duration_seconds")
});

#[allow(clippy::expect_used)]
pub static BACKEND_HEALTHY: Lazy<IntGaugeVec> = Lazy::new(|| {
    register_int_gauge_vec!(
        "caregate_upstream_backend_healthy",
        "1 when the backend passes its health check, 0 when not.",
        &["pool", "zone", "backend"]
    )
    .expect("register caregate_upstream_backend_healthy")
});

#[allow(clippy::expect_used)]
pub static FAILOVERS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_upstream_failovers_total",
        "Requests sent to a lower-priority zone than the first one tried, by pool and zones.",
        &["pool", "from_zone", "to_zone"]
    )
    .expect("register caregate_upstream_failovers_total")
});

#[allow(clippy::expect_used)]
pub static RETRIES: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_upstream_retries_total",
        "Upstream attempts retried, by pool, zone of the failed attempt and kind (connect|proxy).",
        &["pool", "zone", "kind"]
    )
    .expect("register caregate_upstream_retries_total")
});

#[allow(clippy::expect_used)]
pub static FILTER_DECISIONS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_filter_decisions_total",
        "Decisions of filters and of the gateway's own checks, by filter, result and reason code.",
        &["filter", "result", "reason"]
    )
    .expect("register caregate_filter_decisions_total")
});

#[allow(clippy::expect_used)]
pub static AUDIT_RECORDS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_audit_records_total",
        "Audit records handed to the sink, by phase (access|completion|denied) and result (ok|error).",
        &["phase", "result"]
    )
    .expect("register caregate_audit_records_total")
});

#[allow(clippy::expect_used)]
pub static AUDIT_CHECKPOINT_EXPORTS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_audit_checkpoint_exports_total",
        "Audit checkpoints copied off the host (audit.offhost_checkpoints), by result (ok, error).",
        &["result"]
    )
    .expect("register caregate_audit_checkpoint_exports_total")
});

#[allow(clippy::expect_used)]
pub static AUDIT_QUEUE_DEPTH: Lazy<prometheus::IntGauge> = Lazy::new(|| {
    prometheus::register_int_gauge!(
        "caregate_audit_queue_depth",
        "Audit records queued for the sink and not yet written."
    )
    .expect("register caregate_audit_queue_depth")
});

#[allow(clippy::expect_used)]
pub static AUDIT_SINK_HEALTHY: Lazy<prometheus::IntGauge> = Lazy::new(|| {
    prometheus::register_int_gauge!(
        "caregate_audit_sink_healthy",
        "1 while the audit sink writes; 0 when it fails (PHI routes then answer 503)."
    )
    .expect("register caregate_audit_sink_healthy")
});

#[allow(clippy::expect_used)]
pub static CONFIG_RELOADS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_config_reloads_total",
        "Config reloads, by trigger (signal, admin, file, rollback) and outcome (applied; rejected: the new file failed validation or changes a setting fixed at start, and the running config is kept; unchanged: same file).",
        &["trigger", "outcome"]
    )
    .expect("register caregate_config_reloads_total")
});

#[allow(clippy::expect_used)]
pub static REQUEST_BODY_BYTES: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_request_body_bytes_total",
        "Request body bytes read from clients, by listener and route.",
        &["listener", "route"]
    )
    .expect("register caregate_request_body_bytes_total")
});

#[allow(clippy::expect_used)]
pub static RESPONSE_BODY_BYTES: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_response_body_bytes_total",
        "Response body bytes sent to clients, by listener and route.",
        &["listener", "route"]
    )
    .expect("register caregate_response_body_bytes_total")
});

#[allow(clippy::expect_used)]
pub static LISTENER_CONNECTIONS: Lazy<IntGaugeVec> = Lazy::new(|| {
    register_int_gauge_vec!(
        "caregate_listener_connections",
        "Open client connections per listener, counted by the connection layer from accept (after the TLS handshake) to close.",
        &["listener"]
    )
    .expect("register caregate_listener_connections")
});

#[allow(clippy::expect_used)]
pub static BUILD_INFO: Lazy<IntGaugeVec> = Lazy::new(|| {
    register_int_gauge_vec!(
        "caregate_build_info",
        "Always 1; the labels name the running build: version, and the optional features built in.",
        &["version", "features"]
    )
    .expect("register caregate_build_info")
});

#[allow(clippy::expect_used)]
pub static CONFIG_GENERATION: Lazy<prometheus::IntGauge> = Lazy::new(|| {
    prometheus::register_int_gauge!(
        "caregate_config_generation",
        "The running config's generation: 1 at start, +1 for every reload applied."
    )
    .expect("register caregate_config_generation")
});

#[allow(clippy::expect_used)]
pub static IN_FLIGHT: Lazy<prometheus::IntGauge> = Lazy::new(|| {
    prometheus::register_int_gauge!(
        "caregate_requests_in_flight",
        "Requests the gateway is handling now (from the request header to the end of logging), read at each scrape."
    )
    .expect("register caregate_requests_in_flight")
});

#[allow(clippy::expect_used)]
pub static DRAINING: Lazy<prometheus::IntGauge> = Lazy::new(|| {
    prometheus::register_int_gauge!(
        "caregate_draining",
        "1 once the process is stopping (SIGTERM or SIGQUIT): /readyz answers 503."
    )
    .expect("register caregate_draining")
});

/// Touch every metric so that each family is present from the first scrape.
pub fn init() {
    Lazy::force(&REQUESTS);
    Lazy::force(&REQUEST_DURATION);
    Lazy::force(&UPSTREAM_DURATION);
    Lazy::force(&BACKEND_HEALTHY);
    Lazy::force(&FAILOVERS);
    Lazy::force(&RETRIES);
    Lazy::force(&FILTER_DECISIONS);
    Lazy::force(&CONFIG_RELOADS);
    Lazy::force(&IN_FLIGHT);
    Lazy::force(&DRAINING);
    Lazy::force(&REQUEST_BODY_BYTES);
    Lazy::force(&LISTENER_CONNECTIONS);
    crate::conn_guard::init();
    Lazy::force(&RESPONSE_BODY_BYTES);
    crate::outlier::init_metrics();
    Lazy::force(&BREAK_GLASS);
    Lazy::force(&BREAK_GLASS_REFUSED);
    Lazy::force(&crate::hl7gw::engine::MESSAGES);
    Lazy::force(&crate::hl7gw::engine::DURATION);
    Lazy::force(&crate::hl7gw::service::CONNECTIONS);
    Lazy::force(&crate::hl7gw::service::REFUSED);
    CONFIG_GENERATION.set(1);
    let features = if cfg!(feature = "otlp") { "otlp" } else { "" };
    BUILD_INFO
        .with_label_values(&[env!("CARGO_PKG_VERSION"), features])
        .set(1);
    // CPU, memory and file descriptors of the process (`process_*`, Linux): the prometheus
    // crate's `process` feature registers them in the default registry by itself.
}

#[allow(clippy::expect_used)]
pub static BREAK_GLASS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_break_glass_total",
        "Requests that used emergency access (break-the-glass), by route and purpose of use (a configured code).",
        &["route", "purpose"]
    )
    .expect("register caregate_break_glass_total")
});

#[allow(clippy::expect_used)]
pub static BREAK_GLASS_REFUSED: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_break_glass_refused_total",
        "Claims of emergency access refused, by route and reason (not_entitled, patient_context, purpose_not_accepted, bad_header).",
        &["route", "reason"]
    )
    .expect("register caregate_break_glass_refused_total")
});

#[allow(clippy::expect_used)]
pub static API_REQUESTS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "caregate_api_requests_total",
        "Requests to a version of an API, by API, version, lifecycle state at the time of the request (draft, preview, live, deprecated, retired) and environment (production, sandbox).",
        &["api", "version", "state", "environment"]
    )
    .expect("register caregate_api_requests_total")
});

/// The audit metrics, registered only when an audit sink is configured.
pub fn init_audit() {
    Lazy::force(&AUDIT_RECORDS);
    Lazy::force(&AUDIT_QUEUE_DEPTH);
    for result in ["ok", "error"] {
        AUDIT_CHECKPOINT_EXPORTS.with_label_values(&[result]);
    }
    AUDIT_SINK_HEALTHY.set(1);
}

/// The method label: one of the standard methods, or `OTHER`.
pub fn method_label(m: &str) -> &'static str {
    match m {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        _ => "OTHER",
    }
}

/// The `code` label: the status codes a gateway and its backends commonly answer, each its own
/// value; any other code is `other` (so the label stays bounded); no response is `none`.
pub fn status_code(status: u16) -> &'static str {
    match status {
        0 => "none",
        100 => "100",
        101 => "101",
        200 => "200",
        201 => "201",
        202 => "202",
        204 => "204",
        206 => "206",
        301 => "301",
        302 => "302",
        303 => "303",
        304 => "304",
        307 => "307",
        308 => "308",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        406 => "406",
        408 => "408",
        409 => "409",
        410 => "410",
        411 => "411",
        412 => "412",
        413 => "413",
        414 => "414",
        415 => "415",
        416 => "416",
        421 => "421",
        422 => "422",
        428 => "428",
        429 => "429",
        431 => "431",
        451 => "451",
        500 => "500",
        501 => "501",
        502 => "502",
        503 => "503",
        504 => "504",
        505 => "505",
        _ => "other",
    }
}

pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}
