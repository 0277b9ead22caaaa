//! `caregate lint -c FILE`: the governance rules a platform team runs before a config goes live.
//!
//! Lint loads the config as `check` does (with unset `${ENV}` references replaced by a
//! placeholder: it needs no secret), then applies its rules to the loaded config, APIs expanded
//! into one route per version. Each finding names its rule, its level, its place in the config
//! (`routes[3]`, `apis[0].versions[1]`) and that place's line and column in the file. Rules are
//! set under `lint.rules.<id>` (a level, and options); `lint.waivers` accepts findings on
//! purpose, each with its reason. See `docs/lint.md`.

mod load;
mod output;
mod positions;
mod rules;
#[cfg(test)]
mod tests;

pub use positions::Positions;
pub use rules::{RuleInfo, RULES};

use serde::Deserialize;
use std::process::ExitCode;

/// `lint:` in the config: rule settings and waivers. `run` and `check` only parse it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LintConfig {
    /// Per rule id: its level and options.
    #[serde(default)]
    pub rules: RuleSettings,
    /// Findings accepted on purpose, each with a reason.
    #[serde(default)]
    pub waivers: Vec<Waiver>,
}

/// `lint.rules`: one entry per rule id, each optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSettings {
    #[serde(default)]
    pub naming: NamingSettings,
    #[serde(default, rename = "public-route-authenticated")]
    pub public_route_authenticated: RuleSetting,
    #[serde(default, rename = "public-route-rate-limited")]
    pub public_route_rate_limited: RuleSetting,
    #[serde(default, rename = "phi-route-audited")]
    pub phi_route_audited: RuleSetting,
    #[serde(default, rename = "patient-token-confined")]
    pub patient_token_confined: RuleSetting,
    #[serde(default, rename = "deprecated-version-complete")]
    pub deprecated_version_complete: RuleSetting,
    #[serde(default, rename = "api-owner-docs")]
    pub api_owner_docs: RuleSetting,
    #[serde(default, rename = "environment-separation")]
    pub environment_separation: RuleSetting,
    #[serde(default, rename = "sandbox-issuer-scope")]
    pub sandbox_issuer_scope: RuleSetting,
    #[serde(default, rename = "unused-waiver")]
    pub unused_waiver: RuleSetting,
}

impl RuleSettings {
    /// The level set for rule `id`, if any.
    pub fn level(&self, id: &str) -> Option<LevelSetting> {
        match id {
            "naming" => self.naming.level,
            "public-route-authenticated" => self.public_route_authenticated.level,
            "public-route-rate-limited" => self.public_route_rate_limited.level,
            "phi-route-audited" => self.phi_route_audited.level,
            "patient-token-confined" => self.patient_token_confined.level,
            "deprecated-version-complete" => self.deprecated_version_complete.level,
            "api-owner-docs" => self.api_owner_docs.level,
            "environment-separation" => self.environment_separation.level,
            "sandbox-issuer-scope" => self.sandbox_issuer_scope.level,
            "unused-waiver" => self.unused_waiver.level,
            _ => None,
        }
    }
}

/// `lint.rules.<id>` of a rule without options.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSetting {
    /// `error`, `warning` or `off`; default the rule's own level.
    #[serde(default)]
    pub level: Option<LevelSetting>,
}

/// `lint.rules.naming`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamingSettings {
    #[serde(default)]
    pub level: Option<LevelSetting>,
    /// A regular expression every name of a route, API, pool, listener and tenant matches.
    #[serde(default)]
    pub pattern: Option<String>,
    /// A regular expression every API version name matches.
    #[serde(default)]
    pub version_pattern: Option<String>,
}

/// A level as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LevelSetting {
    Error,
    Warning,
    Off,
}

/// The level of a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warning,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warning => "warning",
        }
    }
}

/// `lint.waivers[]`: a finding accepted on purpose.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Waiver {
    /// The rule id the waiver applies to.
    pub rule: String,
    /// What it applies to: exactly one of these names.
    #[serde(default)]
    pub route: Option<String>,
    #[serde(default)]
    pub api: Option<String>,
    #[serde(default)]
    pub pool: Option<String>,
    #[serde(default)]
    pub listener: Option<String>,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub issuer: Option<String>,
    /// Why the finding is accepted (required, not empty): the justification in SARIF.
    pub reason: String,
}

impl Waiver {
    /// The things the waiver names, as (kind, name).
    fn subjects(&self) -> Vec<(SubjectKind, &str)> {
        [
            (SubjectKind::Route, &self.route),
            (SubjectKind::Api, &self.api),
            (SubjectKind::Pool, &self.pool),
            (SubjectKind::Listener, &self.listener),
            (SubjectKind::Tenant, &self.tenant),
            (SubjectKind::Issuer, &self.issuer),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect()
    }
}

/// What a finding is about, for waivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectKind {
    Route,
    Api,
    Pool,
    Listener,
    Tenant,
    Issuer,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The rule id (`patient-token-confined`).
    pub rule: &'static str,
    pub level: Level,
    pub message: String,
    /// The config path (`routes[3]`, `apis[0].versions[1]`).
    pub place: String,
    /// 1-based position of the place in the file.
    pub line: usize,
    pub column: usize,
    /// What the finding is about (route, API, pool, ... names), for waivers.
    pub subjects: Vec<(SubjectKind, String)>,
    /// The reason of the waiver that accepts it, if one does.
    pub waived: Option<String>,
}

/// What one lint run found, and what to tell besides.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
    /// Notes for the reader (e.g. unset variables replaced by a placeholder).
    pub notes: Vec<String>,
}

impl Report {
    /// Unwaived findings at `level`.
    pub fn count(&self, level: Level) -> usize {
        self.findings
            .iter()
            .filter(|f| f.waived.is_none() && f.level == level)
            .count()
    }

    /// Waived findings.
    pub fn waived(&self) -> usize {
        self.findings.iter().filter(|f| f.waived.is_some()).count()
    }

    /// Whether the gate fails: an unwaived error-level finding remains.
    pub fn fails(&self) -> bool {
        self.count(Level::Error) > 0
    }
}

/// `caregate lint` arguments.
#[derive(clap::Args, Debug)]
pub struct LintArgs {
    /// The config file to lint.
    #[arg(short, long)]
    pub config: std::path::PathBuf,
    /// Output: `text` (default, for people), `json` or `sarif` (SARIF 2.1.0, for code scanning).
    #[arg(long, default_value = "text")]
    pub format: String,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    Sarif,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "text" => Some(Format::Text),
            "json" => Some(Format::Json),
            "sarif" => Some(Format::Sarif),
            _ => None,
        }
    }
}

/// Lint the config file at `path`: load it (a config that does not load is one
/// `config-invalid` finding), apply the rules, match the waivers.
pub fn lint_file(path: &std::path::Path, registry: &caregate_filters::FilterRegistry) -> Report {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let base_dir = path
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_else(|| std::path::PathBuf::from("."));
            lint_text(&text, base_dir, registry)
        }
        Err(e) => Report {
            findings: vec![rules::config_invalid(
                format!("cannot read {}: {e}", path.display()),
                String::new(),
                (1, 1),
            )],
            notes: Vec::new(),
        },
    }
}

/// Lint config text whose relative paths resolve against `base_dir`.
pub fn lint_text(
    text: &str,
    base_dir: std::path::PathBuf,
    registry: &caregate_filters::FilterRegistry,
) -> Report {
    lint_text_with(text, base_dir, registry, &|n| std::env::var(n).ok())
}

/// [`lint_text`] with `lookup` for the environment.
fn lint_text_with(
    text: &str,
    base_dir: std::path::PathBuf,
    registry: &caregate_filters::FilterRegistry,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Report {
    let sub = load::substitute_with(text, lookup);
    let mut notes = Vec::new();
    if !sub.placeholders.is_empty() {
        notes.push(format!(
            "not set here, linted with a placeholder value: {} (lint needs no secret; `check` and `run` do)",
            sub.placeholders.join(", ")
        ));
    }
    let positions = Positions::parse(&sub.text);
    // Offline: the certificate, key and CA files the config names are not read (a CI job
    // has none of the production ones; `check` on the host reads them).
    let findings = match crate::config::load_str_offline(&sub.text, base_dir, registry) {
        Err(e) => {
            let message = sub.redact(&e.0);
            let (place, at) = load::place_of_error(&message, &sub.text, &positions);
            vec![rules::config_invalid(message, place, at)]
        }
        Ok(loaded) => rules::run_all(&loaded, &sub.text, &positions)
            .into_iter()
            .map(|mut f| {
                f.message = sub.redact(&f.message);
                f
            })
            .collect(),
    };
    Report { findings, notes }
}

/// Run `caregate lint`.
pub fn run(args: &LintArgs, registry: &caregate_filters::FilterRegistry) -> ExitCode {
    let Some(format) = Format::parse(&args.format) else {
        eprintln!(
            "caregate lint: unknown --format `{}` (use text, json or sarif)",
            args.format
        );
        return ExitCode::from(2);
    };
    let report = lint_file(&args.config, registry);
    let file = args.config.display().to_string();
    let out = match format {
        Format::Text => output::text(&report, &file),
        Format::Json => output::json(&report, &file),
        Format::Sarif => output::sarif(&report, &file),
    };
    print!("{out}");
    if report.fails() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
