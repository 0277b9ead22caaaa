//! `caregate lint -c FILE`: the governance rules a platform team runs before a config goes live.

use serde::Deserialize;
use std::collections::BTreeMap;

/// `lint:` in the config: rule settings and waivers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LintConfig {
    /// Per rule id: its level and options.
    #[serde(default)]
    pub rules: BTreeMap<String, serde_yaml::Value>,
    /// Findings accepted on purpose, each with a reason.
    #[serde(default)]
    pub waivers: Vec<serde_yaml::Value>,
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

/// Run `caregate lint`.
pub fn run(args: &LintArgs, registry: &caregate_filters::FilterRegistry) -> std::process::ExitCode {
    let _ = (args, registry);
    std::process::ExitCode::from(1)
}
