//! The error log: one logger for the whole process, with an allowlist of sources.
//!
//! PHI must never reach the error log. caregate's own messages (targets `caregate*`) are
//! written by code reviewed for that, at every level. Messages of the libraries underneath
//! (Pingora, its HTTP and TLS stacks, the resolver) are not ours: at their debug and trace
//! levels they print request lines, query strings, headers (bearer tokens) and bodies, and at any
//! level some carry client addresses. So from any other source only these reach the log:
//!
//! | source | levels |
//! |---|---|
//! | `pingora_core::server` (process lifecycle: bootstrap, signals, upgrade) | error, warn, info |
//! | any other source | error, warn |
//!
//! and every such message is scrubbed first: IP addresses become `<addr>`, a query string
//! `?<query>`, the word after `Bearer` and anything shaped like a JWT `<token>`, and the message
//! is cut at 300 characters. Whatever `RUST_LOG` or `log.level` say, debug and trace messages of
//! other sources are dropped.
//!
//! Format `text`: `2026-12-06T14:00:00.123Z INFO caregate::reload: config reloaded ...`;
//! `json`: one object a line with `time`, `level`, `target`, `message`. The level and format come
//! from the config's `log` section (reloadable), else `RUST_LOG` (its most verbose level), else
//! `info`.

use serde::Deserialize;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The `log` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `error`, `warn`, `info`, `debug` or `trace`. Default: `RUST_LOG`, else `info`.
    #[serde(default)]
    pub level: Option<LogLevel>,
    /// `text` (default) or `json`.
    #[serde(default)]
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

struct Logger {
    level: AtomicUsize,
    json: AtomicBool,
}

static LOGGER: Logger = Logger {
    level: AtomicUsize::new(3),
    json: AtomicBool::new(false),
};

fn level_from_env() -> log::LevelFilter {
    let Ok(v) = std::env::var("RUST_LOG") else {
        return log::LevelFilter::Info;
    };
    // `debug`, or directives like `caregate=debug,pingora=info`: the most verbose level named.
    v.split(',')
        .filter_map(|d| d.rsplit('=').next())
        .filter_map(|l| l.trim().parse::<log::LevelFilter>().ok())
        .max()
        .unwrap_or(log::LevelFilter::Info)
}

fn set_level(l: log::LevelFilter) {
    LOGGER.level.store(l as usize, Ordering::Relaxed);
    log::set_max_level(l);
}

/// Install the logger (level from `RUST_LOG`, else info; text). Idempotent.
pub fn init() {
    if log::set_logger(&LOGGER).is_ok() {
        set_level(level_from_env());
    }
}

/// Apply the config's `log` section (at start and at every reload).
pub fn configure(s: &LogSettings) {
    set_level(s.level.map_or_else(level_from_env, LogLevel::filter));
    LOGGER
        .json
        .store(s.format == LogFormat::Json, Ordering::Relaxed);
}

fn own(target: &str) -> bool {
    target.starts_with("caregate")
}

/// The most verbose level a source other than caregate may log at.
fn allowed(target: &str) -> log::Level {
    if target.starts_with("pingora_core::server") {
        log::Level::Info
    } else {
        log::Level::Warn
    }
}

fn level_index(l: log::Level) -> usize {
    l as usize
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        level_index(m.level()) <= self.level.load(Ordering::Relaxed)
            && (own(m.target()) || m.level() <= allowed(m.target()))
    }

    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let mut message = r.args().to_string();
        if !own(r.target()) {
            message = scrub(&message);
        }
        let time = caregate_audit::now_rfc3339();
        let line = if self.json.load(Ordering::Relaxed) {
            serde_json::json!({
                "time": time,
                "level": r.level().as_str(),
                "target": r.target(),
                "message": message,
            })
            .to_string()
        } else {
            format!("{time} {:<5} {}: {message}", r.level(), r.target())
        };
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{line}");
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

/// Whether `w` (trimmed of punctuation around it) is an IP address, with or without a port.
fn is_address(w: &str) -> bool {
    let t = w.trim_matches(|c: char| {
        !(c.is_ascii_hexdigit() || c == ':' || c == '.' || c == '[' || c == ']')
    });
    let t = t.trim_end_matches(':');
    !t.is_empty()
        && (t.parse::<std::net::IpAddr>().is_ok()
            || t.parse::<std::net::SocketAddr>().is_ok()
            || t.trim_matches(|c| c == '[' || c == ']')
                .parse::<std::net::Ipv6Addr>()
                .is_ok())
}

fn jwt_like(w: &str) -> bool {
    let t =
        w.trim_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'));
    t.starts_with("eyJ") && t.matches('.').count() >= 1
}

/// Scrub a message of another source (see the module docs).
pub fn scrub(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len().min(320));
    let mut after_bearer = false;
    for (i, word) in msg.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let replaced: std::borrow::Cow<'_, str> = if after_bearer || jwt_like(word) {
            "<token>".into()
        } else if let Some(q) = word.find('?') {
            format!("{}?<query>", &word[..q]).into()
        } else if is_address(word) {
            "<addr>".into()
        } else if let Some((k, _)) = word.split_once('=').filter(|(_, v)| is_address(v)) {
            format!("{k}=<addr>").into()
        } else {
            word.into()
        };
        after_bearer = word
            .trim_matches(|c: char| !c.is_ascii_alphabetic())
            .eq_ignore_ascii_case("bearer");
        out.push_str(&replaced);
        if out.len() > 300 {
            let mut cut = 300;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
            out.push_str("...");
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubbing_removes_addresses_queries_and_tokens() {
        let s = scrub(
            "Fail to proxy: peer 127.0.0.7:51234 GET /fhir/Patient?family=Zebedee&birthdate=1931 authorization: Bearer abc.def.ghi [::1]:443 peer_addr=10.1.2.3:80 eyJhbGciOi.eyJzdWIi.sig",
        );
        for gone in [
            "127.0.0.7",
            "Zebedee",
            "1931",
            "abc.def",
            "::1",
            "10.1.2.3",
            "eyJ",
        ] {
            assert!(!s.contains(gone), "{gone} in {s}");
        }
        assert!(s.contains("Fail to proxy"), "{s}");
        assert!(s.contains("/fhir/Patient?<query>"), "{s}");
        let long = "x".repeat(1000);
        assert!(scrub(&long).len() < 310);
        assert_eq!(
            scrub("upstream pool fhir zone a"),
            "upstream pool fhir zone a"
        );
    }

    #[test]
    fn other_sources_are_kept_to_warnings_and_lifecycle() {
        assert!(own("caregate::proxy") && own("caregate_filters::builtin"));
        assert!(!own("pingora_proxy::proxy_h1"));
        assert_eq!(allowed("pingora_proxy::proxy_h1"), log::Level::Warn);
        assert_eq!(allowed("pingora_core::server"), log::Level::Info);
        assert_eq!(allowed("h2::codec"), log::Level::Warn);
    }
}
