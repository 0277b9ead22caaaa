//! `caregate usage`: which client ids still call deprecated API versions, read from the access
//! log (a client id is not PHI; the access log carries it with the API, the version and the
//! version's lifecycle state at the time of each request).

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::ExitCode;

/// `caregate usage` arguments.
#[derive(clap::Args, Debug)]
pub struct UsageArgs {
    /// The access log (JSON lines); rotated files may be given too.
    #[arg(value_name = "ACCESS_LOG", required = true)]
    pub files: Vec<std::path::PathBuf>,
    /// Every API version, not only the deprecated and retired ones.
    #[arg(long)]
    pub all: bool,
    /// Only one API.
    #[arg(long)]
    pub api: Option<String>,
    /// Only requests at or after this time (`YYYY-MM-DD` or RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// `text` (default) or `json`.
    #[arg(long, default_value = "text")]
    pub format: String,
}

/// The calls of one client to one API version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub api: String,
    pub version: String,
    /// The state at the last call (`deprecated`, `retired`, ...).
    pub state: String,
    /// The OAuth client id, or `null` for calls without a verified token.
    pub client_id: Option<String>,
    pub calls: u64,
    /// Calls answered `410 api_sunset` (the version was retired).
    pub refused_sunset: u64,
    pub first: String,
    pub last: String,
}

/// What the scan found.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub usage: Vec<Usage>,
    /// Lines read, and lines that were not JSON objects (skipped, counted).
    pub lines: u64,
    pub unreadable_lines: u64,
}

/// Scan access-log lines. `deprecated_only`: keep only calls to deprecated or retired versions.
pub fn scan(
    lines: impl Iterator<Item = String>,
    deprecated_only: bool,
    api: Option<&str>,
    since: Option<i64>,
) -> Report {
    type Key = (String, String, Option<String>);
    let mut by: BTreeMap<Key, Usage> = BTreeMap::new();
    let mut report = Report::default();
    for line in lines {
        if line.trim().is_empty() {
            continue;
        }
        report.lines += 1;
        let Ok(serde_json::Value::Object(v)) = serde_json::from_str::<serde_json::Value>(&line)
        else {
            report.unreadable_lines += 1;
            continue;
        };
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let (Some(a), Some(ver)) = (s("api"), s("api_version")) else {
            continue;
        };
        let state = s("api_state").unwrap_or_default();
        if deprecated_only && state != "deprecated" && state != "retired" {
            continue;
        }
        if api.is_some_and(|x| x != a) {
            continue;
        }
        let time = s("time").unwrap_or_default();
        if let Some(since) = since {
            match crate::apis::parse_time(&time) {
                Ok(t) if t >= since => {}
                _ => continue,
            }
        }
        let client = s("client_id");
        let sunset = v.get("reason").and_then(|r| r.as_str()) == Some("api_sunset");
        let u = by
            .entry((a.clone(), ver.clone(), client.clone()))
            .or_insert_with(|| Usage {
                api: a,
                version: ver,
                state: state.clone(),
                client_id: client,
                calls: 0,
                refused_sunset: 0,
                first: time.clone(),
                last: time.clone(),
            });
        u.calls += 1;
        u.refused_sunset += u64::from(sunset);
        if time < u.first {
            u.first = time.clone();
        }
        if time >= u.last {
            u.last = time;
            u.state = state;
        }
    }
    report.usage = by.into_values().collect();
    // Most calls first within each API version.
    report.usage.sort_by(|x, y| {
        (&x.api, &x.version)
            .cmp(&(&y.api, &y.version))
            .then(y.calls.cmp(&x.calls))
    });
    report
}

/// Run `caregate usage`.
pub fn run(args: &UsageArgs) -> ExitCode {
    let since = match args.since.as_deref().map(crate::apis::parse_time) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            eprintln!("caregate usage: --since: {e}");
            return ExitCode::from(2);
        }
    };
    if args.format != "text" && args.format != "json" {
        eprintln!("caregate usage: --format: `text` or `json`");
        return ExitCode::from(2);
    }
    let mut all_lines = Vec::new();
    for f in &args.files {
        match std::fs::File::open(f) {
            Ok(file) => {
                for line in std::io::BufReader::new(file).lines() {
                    match line {
                        Ok(l) => all_lines.push(l),
                        Err(_) => all_lines.push(String::from("\u{0}")),
                    }
                }
            }
            Err(e) => {
                eprintln!("caregate usage: cannot read {}: {e}", f.display());
                return ExitCode::from(1);
            }
        }
    }
    let report = scan(all_lines.into_iter(), !args.all, args.api.as_deref(), since);
    if args.format == "json" {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("caregate usage: {e}");
                return ExitCode::from(1);
            }
        }
        return ExitCode::SUCCESS;
    }
    let what = if args.all {
        "API versions"
    } else {
        "deprecated or retired API versions"
    };
    if report.usage.is_empty() {
        println!("No calls to {what} in {} access-log lines.", report.lines);
    } else {
        println!(
            "Calls to {what}, by client ({} access-log lines):",
            report.lines
        );
        println!(
            "{:<20} {:<10} {:<11} {:<32} {:>8} {:>8}  LAST CALL",
            "API", "VERSION", "STATE", "CLIENT ID", "CALLS", "410s"
        );
        for u in &report.usage {
            println!(
                "{:<20} {:<10} {:<11} {:<32} {:>8} {:>8}  {}",
                u.api,
                u.version,
                u.state,
                u.client_id.as_deref().unwrap_or("(no client id)"),
                u.calls,
                u.refused_sunset,
                u.last
            );
        }
    }
    if report.unreadable_lines > 0 {
        println!(
            "({} lines were not JSON objects and were skipped.)",
            report.unreadable_lines
        );
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(t: &str, api: &str, v: &str, state: &str, client: Option<&str>) -> String {
        serde_json::json!({
            "time": t, "route": format!("patient-fhir@{v}"), "status": 200,
            "api": api, "api_version": v, "api_state": state, "client_id": client,
        })
        .to_string()
    }

    #[test]
    fn names_the_clients_of_deprecated_versions() {
        let lines = vec![
            line("2026-01-01T10:00:00.000Z", "patient-api", "v1", "deprecated", Some("old-mobile")),
            line("2026-01-02T10:00:00.000Z", "patient-api", "v1", "deprecated", Some("old-mobile")),
            line("2026-01-02T11:00:00.000Z", "patient-api", "v1", "deprecated", Some("kiosk")),
            line("2026-01-02T11:00:00.000Z", "patient-api", "v2", "live", Some("new-mobile")),
            "not json".to_string(),
            serde_json::json!({"time": "2026-01-03T00:00:00.000Z", "route": "billing", "status": 200}).to_string(),
            serde_json::json!({"time": "2026-01-04T00:00:00.000Z", "api": "patient-api", "api_version": "v0", "api_state": "retired", "reason": "api_sunset", "client_id": "ancient"}).to_string(),
        ];
        let r = scan(lines.clone().into_iter(), true, None, None);
        assert_eq!(r.lines, 7);
        assert_eq!(r.unreadable_lines, 1);
        let got: Vec<(&str, Option<&str>, u64, u64)> = r
            .usage
            .iter()
            .map(|u| {
                (
                    u.version.as_str(),
                    u.client_id.as_deref(),
                    u.calls,
                    u.refused_sunset,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("v0", Some("ancient"), 1, 1),
                ("v1", Some("old-mobile"), 2, 0),
                ("v1", Some("kiosk"), 1, 0)
            ]
        );
        assert_eq!(r.usage[1].first, "2026-01-01T10:00:00.000Z");
        assert_eq!(r.usage[1].last, "2026-01-02T10:00:00.000Z");
        // --all keeps the live version; --since drops the older calls.
        assert_eq!(
            scan(lines.clone().into_iter(), false, None, None)
                .usage
                .len(),
            4
        );
        let since = crate::apis::parse_time("2026-01-02").ok();
        let r = scan(lines.into_iter(), true, Some("patient-api"), since);
        assert_eq!(
            r.usage.iter().find(|u| u.version == "v1").map(|u| u.calls),
            Some(1)
        );
    }
}
