//! Optional OTLP span export (cargo feature `otlp`, off by default).
//!
//! With the feature built in and an `otlp:` section in the config, every request becomes one
//! server span, exported over OTLP/HTTP (protobuf) by a batch processor on its own thread. The
//! span has exactly the trace id and span id the gateway sent upstream in `traceparent`, and the
//! incoming `traceparent` (if any) as its remote parent, so the gateway's span joins the
//! client's and the backend's in one trace. Attributes are bounded and carry no PHI: method,
//! route, listener, status, reason code, upstream pool and zone, request id.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector's OTLP/HTTP traces endpoint, e.g. `http://127.0.0.1:4318/v1/traces`.
    pub endpoint: String,
    #[serde(default = "d_service")]
    pub service_name: String,
    #[serde(default = "d_timeout")]
    pub timeout_ms: u64,
}

fn d_service() -> String {
    "caregate".into()
}
fn d_timeout() -> u64 {
    5_000
}

impl OtlpConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.endpoint.starts_with("http://") || self.endpoint.starts_with("https://")) {
            return Err("otlp.endpoint: must be an http(s) URL".into());
        }
        if !cfg!(feature = "otlp") {
            return Err(
                "otlp: this caregate was built without the `otlp` cargo feature (cargo build --features otlp)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// One finished request, as a span.
pub struct RequestSpan<'a> {
    pub trace_id: &'a str,
    pub span_id: &'a str,
    /// The caller's span id from an incoming `traceparent`.
    pub parent_id: Option<&'a str>,
    pub sampled: bool,
    pub name: String,
    pub start: std::time::SystemTime,
    pub end: std::time::SystemTime,
    pub attributes: Vec<(&'static str, String)>,
    pub status: u16,
}

#[cfg(feature = "otlp")]
mod imp {
    use super::{OtlpConfig, RequestSpan};
    use opentelemetry::trace::{
        Span, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
        TraceState, Tracer, TracerProvider,
    };
    use opentelemetry::{Context, KeyValue};
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracer, SdkTracerProvider};
    use opentelemetry_sdk::Resource;
    use std::cell::Cell;
    use std::time::Duration;

    thread_local! {
        /// The ids the next span built on this thread must carry (set just before building).
        static NEXT_IDS: Cell<Option<(u128, u64)>> = const { Cell::new(None) };
    }

    /// Gives spans the ids the gateway already chose (and sent upstream).
    #[derive(Debug)]
    struct ChosenIds;

    impl IdGenerator for ChosenIds {
        fn new_trace_id(&self) -> TraceId {
            match NEXT_IDS.with(Cell::get) {
                Some((t, _)) => TraceId::from_bytes(t.to_be_bytes()),
                None => RandomIdGenerator::default().new_trace_id(),
            }
        }

        fn new_span_id(&self) -> SpanId {
            match NEXT_IDS.with(Cell::get) {
                Some((_, s)) => SpanId::from_bytes(s.to_be_bytes()),
                None => RandomIdGenerator::default().new_span_id(),
            }
        }
    }

    pub struct OtlpExporter {
        provider: SdkTracerProvider,
        tracer: SdkTracer,
    }

    impl OtlpExporter {
        pub fn start(cfg: &OtlpConfig) -> Result<OtlpExporter, String> {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(cfg.endpoint.clone())
                .with_timeout(Duration::from_millis(cfg.timeout_ms.max(1)))
                .with_headers(Default::default())
                .build()
                .map_err(|e| format!("otlp: {e}"))?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_id_generator(ChosenIds)
                .with_resource(
                    Resource::builder()
                        .with_service_name(cfg.service_name.clone())
                        .build(),
                )
                .build();
            let tracer = provider.tracer("caregate");
            Ok(OtlpExporter { provider, tracer })
        }

        pub fn record(&self, s: RequestSpan<'_>) {
            let (Ok(trace), Ok(span)) = (
                u128::from_str_radix(s.trace_id, 16),
                u64::from_str_radix(s.span_id, 16),
            ) else {
                return;
            };
            let flags = if s.sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            };
            let parent = match s.parent_id.and_then(|p| u64::from_str_radix(p, 16).ok()) {
                Some(p) => Context::new().with_remote_span_context(SpanContext::new(
                    TraceId::from_bytes(trace.to_be_bytes()),
                    SpanId::from_bytes(p.to_be_bytes()),
                    flags,
                    true,
                    TraceState::default(),
                )),
                None => Context::new(),
            };
            let builder = self
                .tracer
                .span_builder(s.name)
                .with_kind(SpanKind::Server)
                .with_start_time(s.start)
                .with_attributes(
                    s.attributes
                        .into_iter()
                        .map(|(k, v)| KeyValue::new(k, v))
                        .chain(std::iter::once(KeyValue::new(
                            "http.response.status_code",
                            i64::from(s.status),
                        ))),
                );
            NEXT_IDS.with(|n| n.set(Some((trace, span))));
            let mut span = self.tracer.build_with_context(builder, &parent);
            NEXT_IDS.with(|n| n.set(None));
            if s.status >= 500 || s.status == 0 {
                span.set_status(Status::error("server error"));
            }
            span.end_with_timestamp(s.end);
        }

        pub fn shutdown(&self) {
            let _ = self.provider.shutdown();
        }
    }
}

#[cfg(not(feature = "otlp"))]
mod imp {
    use super::{OtlpConfig, RequestSpan};

    /// Without the `otlp` feature there is nothing to export; config validation refuses an
    /// `otlp:` section, so this is never started.
    pub struct OtlpExporter;

    impl OtlpExporter {
        pub fn start(_cfg: &OtlpConfig) -> Result<OtlpExporter, String> {
            Err("this caregate was built without the `otlp` cargo feature".into())
        }

        pub fn record(&self, _s: RequestSpan<'_>) {}

        pub fn shutdown(&self) {}
    }
}

pub use imp::OtlpExporter;
