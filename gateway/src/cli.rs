//! caregate's command line, as a library: build your own `caregate` binary with filter kinds of
//! your own.
//!
//! Pingora is a library you build your proxy binary with; caregate is too. The stock `caregate`
//! binary is [`App::builder`] with nothing added. A program with kinds of its own registers them
//! on the builder and gets the same command line — `run`, `check`, `demo`, `audit verify`,
//! `sandbox` — with its kinds accepted, built and validated (`check`) exactly like the built-in
//! ones:
//!
//! ```no_run
//! use std::process::ExitCode;
//!
//! // Keep the allocator caregate is measured with (see [`crate::Allocator`]).
//! #[global_allocator]
//! static GLOBAL: caregate::Allocator = caregate::Allocator;
//!
//! # mod consent_filter {
//! #     pub fn build(
//! #         _: serde_yaml::Value,
//! #         _: &caregate_filters::BuildContext,
//! #     ) -> Result<std::sync::Arc<dyn caregate_filters::Filter>, caregate_filters::BuildError> {
//! #         Err(caregate_filters::BuildError::new("config", "not in this example"))
//! #     }
//! # }
//! fn main() -> ExitCode {
//!     caregate::App::builder()
//!         .name("consent-gateway")
//!         .filter_kind("consent", consent_filter::build)
//!         .main()
//! }
//! ```
//!
//! The builder starts from [`FilterRegistry::builtin`] and registers your kinds through the same
//! public [`FilterRegistry::register`]. A kind registered twice, or one that shadows a built-in
//! kind, is refused when the program starts ([`AppBuilder::main`] prints why and exits with
//! status 2), before any config is read. See `docs/writing-a-filter.md` for the whole path from
//! an empty crate to a tested filter in a custom binary.
#![warn(missing_docs)]

use crate::config;
use crate::sandbox_server::SandboxServer;
use crate::server::build_server;
use caregate_filters::{BuildContext, BuildError, Filter, FilterRegistry};
use caregate_sandbox::Sandbox;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use pingora::prelude::Opt;
use pingora::server::RunArgs;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// The signature of a filter kind's builder: its `config:` block (an empty mapping when the
/// config file gives none) and the [`BuildContext`] in, an immutable filter out — or a
/// [`BuildError`] whose path (`config.field`) the gateway prefixes with the filter's place in
/// the file (`routes[2].filters[1] (consent): config.opt_outs: ...`). It is called once per
/// configured filter, by `check` and at start.
pub type FilterBuilder =
    fn(serde_yaml::Value, &BuildContext) -> Result<Arc<dyn Filter>, BuildError>;

/// Why a filter kind could not be registered on an [`AppBuilder`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistrationError {
    /// The kind is one of caregate's built-in kinds: a program cannot replace one (config files
    /// would then mean different things on different binaries). Choose another name.
    ShadowsBuiltin {
        /// The kind as given.
        kind: &'static str,
    },
    /// The kind was registered on this builder before.
    Duplicate {
        /// The kind as given.
        kind: &'static str,
    },
    /// The kind is not a snake_case name (`[a-z][a-z0-9_]*`): kinds are written in config files
    /// and are the `filter` label of `caregate_filter_decisions_total`.
    InvalidName {
        /// The kind as given.
        kind: &'static str,
    },
}

impl std::fmt::Display for RegistrationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistrationError::ShadowsBuiltin { kind } => write!(
                f,
                "filter kind `{kind}` is a built-in kind of caregate; a program cannot \
                 register it again or replace it: give your kind another name"
            ),
            RegistrationError::Duplicate { kind } => write!(
                f,
                "filter kind `{kind}` is registered twice; register each kind once"
            ),
            RegistrationError::InvalidName { kind } => write!(
                f,
                "filter kind `{kind}` is not a snake_case name (a lower-case letter, then \
                 lower-case letters, digits and `_`)"
            ),
        }
    }
}

impl std::error::Error for RegistrationError {}

/// Collects the filter kinds and the name of a caregate program; made by [`App::builder`].
///
/// Registration errors are kept and reported by [`AppBuilder::build`] (or, through it, by
/// [`AppBuilder::main`]), so registrations chain without a `?` at each step.
#[must_use = "a builder does nothing until `.main()` or `.build()`"]
pub struct AppBuilder {
    registry: FilterRegistry,
    builtin: Vec<&'static str>,
    name: &'static str,
    errors: Vec<RegistrationError>,
}

impl AppBuilder {
    /// The program's name, as `--help`, `--version` and its error messages print it
    /// (`consent-gateway: invalid config: ...`). The default is `caregate`.
    pub fn name(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// Register filter kind `kind`, built by `build`, through the same public path as the
    /// built-in kinds ([`FilterRegistry::register`]). Once registered, `kind: <kind>` is
    /// accepted in listener and route `filters:`, `check` builds and validates its config and
    /// holds its chains to its [`Filter::declaration`], and the kind appears in the list an
    /// unknown kind's error prints.
    ///
    /// A kind that is built in, registered twice, or not snake_case is refused: the error is
    /// reported by [`AppBuilder::build`] and [`AppBuilder::main`].
    pub fn filter_kind(mut self, kind: &'static str, build: FilterBuilder) -> Self {
        let snake = kind
            .bytes()
            .next()
            .map(|b| b.is_ascii_lowercase())
            .unwrap_or(false)
            && kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !snake {
            self.errors.push(RegistrationError::InvalidName { kind });
        } else if !self.registry.register(kind, build) {
            self.errors.push(if self.builtin.contains(&kind) {
                RegistrationError::ShadowsBuiltin { kind }
            } else {
                RegistrationError::Duplicate { kind }
            });
        }
        self
    }

    /// The program, or the first registration that was refused.
    pub fn build(self) -> Result<App, RegistrationError> {
        match self.errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(App {
                registry: self.registry,
                name: self.name,
            }),
        }
    }

    /// Build the program and run its command line on this process's arguments: the `main` of a
    /// custom binary. A refused registration is printed (`NAME: cannot start: filter kind ...`)
    /// and exits with status 2, before any argument or config is read.
    pub fn main(self) -> ExitCode {
        let name = self.name;
        match self.build() {
            Ok(app) => app.main(),
            Err(e) => {
                eprintln!("{name}: cannot start: {e}");
                ExitCode::from(2)
            }
        }
    }
}

/// A caregate program: the filter kinds it knows, behind caregate's command line.
///
/// Made by [`App::builder`]; the stock `caregate` binary is `App::builder().main()`.
pub struct App {
    registry: FilterRegistry,
    name: &'static str,
}

impl App {
    /// A builder holding every built-in filter kind ([`FilterRegistry::builtin`]), named
    /// `caregate`.
    pub fn builder() -> AppBuilder {
        let registry = FilterRegistry::builtin();
        let builtin = registry.kinds().collect();
        AppBuilder {
            registry,
            builtin,
            name: "caregate",
            errors: Vec::new(),
        }
    }

    /// The filter kinds this program builds: the built-in ones and those registered on the
    /// builder. Pass it to [`config::load_file_with`] to validate a config as `check` does
    /// (e.g. in a test of your example config).
    pub fn registry(&self) -> &FilterRegistry {
        &self.registry
    }

    /// The program's name (see [`AppBuilder::name`]).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Read, parse and validate a config file with this program's filter kinds: what `check`
    /// does, without printing.
    pub fn load_config(&self, path: &Path) -> Result<config::Loaded, config::ConfigError> {
        config::load_file_with(path, &self.registry)
    }

    /// Run the command line on this process's arguments (`std::env::args_os`).
    pub fn main(self) -> ExitCode {
        self.run_with_args(std::env::args_os())
    }

    /// Run the command line on `args` (the first one is the program's name, as in
    /// `std::env::args_os`). `--help`, `--version` and usage errors print as clap prints them
    /// and return its exit status (0, or 2 for a usage error); nothing exits the process here.
    /// `run` and `demo` return when the gateway has shut down.
    pub fn run_with_args<I, T>(&self, args: I) -> ExitCode
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        init_logging();
        let command = Cli::command().name(self.name).bin_name(self.name);
        let cli = match command
            .try_get_matches_from(args)
            .and_then(|m| Cli::from_arg_matches(&m))
        {
            Ok(cli) => cli,
            Err(e) => {
                let _ = e.print();
                return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
            }
        };
        match cli.command {
            Command::Run {
                config,
                upgrade,
                daemon,
            } => self.run(&config, upgrade, daemon, None),
            Command::Check { config } => self.check(&config),
            Command::Lint(args) => crate::lint::run(&args, &self.registry),
            Command::Usage(args) => crate::usage::run(&args),
            Command::Demo {
                state_dir,
                command: Some(DemoCommand::Token(args)),
                ..
            } => match crate::demo::DemoState::open(&state_dir, false)
                .and_then(|s| crate::demo::mint(&s, &args))
            {
                Ok(t) => {
                    println!("{t}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{} demo token: {e}", self.name);
                    ExitCode::from(1)
                }
            },
            Command::Demo {
                config,
                state_dir,
                command: None,
            } => {
                match crate::demo::DemoState::open(&state_dir, true) {
                    Ok(s) => s.export(),
                    Err(e) => {
                        eprintln!("{} demo: {e}", self.name);
                        return ExitCode::from(1);
                    }
                }
                let banner = match self.load(&config) {
                    Ok(l) => crate::demo::banner(&l, &state_dir),
                    Err(e) => {
                        eprintln!(
                            "{}: invalid demo config: {e} (run from the repository root)",
                            self.name
                        );
                        return ExitCode::from(1);
                    }
                };
                self.run(&config, false, false, Some(banner))
            }
            Command::Sandbox {
                listen,
                data,
                base_url,
            } => self.sandbox(listen, data, base_url),
            Command::Audit {
                command:
                    AuditCommand::Verify {
                        file,
                        key_env,
                        checkpoints,
                    },
            } => self.audit_verify(&file, &key_env, checkpoints.as_deref()),
            Command::Audit {
                command: AuditCommand::Report(args),
            } => self.audit_report(&args),
            Command::Health {
                admin,
                config,
                ready,
            } => self.health(admin, config.as_deref(), ready),
        }
    }

    fn load(&self, path: &Path) -> Result<config::Loaded, String> {
        self.load_config(path)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    fn check(&self, path: &Path) -> ExitCode {
        match self.load(path) {
            Ok(l) => {
                println!(
                    "{}: ok ({} listeners, {} routes, {} pools)",
                    path.display(),
                    l.config.listeners.len(),
                    l.config.routes.len(),
                    l.config.pools.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: invalid config: {e}", self.name);
                ExitCode::from(1)
            }
        }
    }

    fn run(&self, path: &Path, upgrade: bool, daemon: bool, banner: Option<String>) -> ExitCode {
        let name = &self.name;
        if daemon {
            eprintln!("{name}: {DAEMON_REFUSED}");
            return ExitCode::from(2);
        }
        // From here on a SIGHUP never ends the process: once the server runs, it reloads.
        if let Err(e) = crate::lifecycle::catch_sighup_early() {
            eprintln!("{name}: cannot install the SIGHUP handler: {e}");
            return ExitCode::from(1);
        }
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!(
                    "{name}: invalid config: cannot read {}: {e}",
                    path.display()
                );
                return ExitCode::from(1);
            }
        };
        let base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let loaded = match config::load_str_with(&text, base_dir, &self.registry) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("{name}: invalid config: {}: {e}", path.display());
                return ExitCode::from(1);
            }
        };
        crate::logging::configure(&loaded.config.log);
        // Start whole or not at all: every listen address must be free before anything starts.
        // On a graceful upgrade the old process holds them and hands them over.
        if !upgrade {
            if let Err(e) = crate::lifecycle::precheck_binds(&loaded.config) {
                eprintln!("{name}: cannot start: {e}");
                return ExitCode::from(1);
            }
        }
        let opt = Opt {
            upgrade,
            daemon: false,
            ..Opt::default()
        };
        let source = crate::server::Source {
            path: path.to_path_buf(),
            text,
            registry: self.registry.clone(),
        };
        let built = match build_server(loaded, opt, source) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{name}: cannot start: {e}");
                return ExitCode::from(1);
            }
        };
        if let Err(e) = built.finisher.write_pid_file() {
            eprintln!("{name}: cannot start: {e}");
            return ExitCode::from(1);
        }
        if let Some(b) = banner {
            println!("{b}");
        }
        built.server.run(RunArgs {
            shutdown_signal: Box::new(built.signals),
        });
        // A fast shutdown (SIGINT) ends here without the drain: still seal the audit trail.
        built.finisher.finish();
        ExitCode::SUCCESS
    }

    fn audit_report(&self, args: &ReportArgs) -> ExitCode {
        use caregate_audit::report::{parse_time, sort_entries, Query, TEXT_HEADER};
        let name = &self.name;
        let keys = match verify_keys(&args.key_env) {
            Ok(k) => k,
            Err(e) => {
                eprintln!("{name} audit report: {e}");
                return ExitCode::from(2);
            }
        };
        let bound = |flag: &str, value: &Option<String>, end_of_day: bool| {
            value
                .as_deref()
                .map(|v| parse_time(v, end_of_day).map_err(|e| format!("{flag}: {e}")))
                .transpose()
        };
        let (from, to) = match (
            bound("--from", &args.from, false),
            bound("--to", &args.to, true),
        ) {
            (Ok(from), Ok(to)) => (from, to),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("{name} audit report: {e}");
                return ExitCode::from(2);
            }
        };
        match &args.patient {
            None if !args.break_glass => {
                eprintln!(
                    "{name} audit report: name the patient (--patient ID), or ask for the \
                     break-the-glass review (--break-glass, of every patient or, with \
                     --patient, of one)"
                );
                return ExitCode::from(2);
            }
            Some(p) if p.trim().is_empty() => {
                eprintln!("{name} audit report: --patient: the patient id is empty");
                return ExitCode::from(2);
            }
            _ => {}
        }
        if args.authority.is_some() && args.patient.is_none() {
            eprintln!("{name} audit report: --authority needs --patient");
            return ExitCode::from(2);
        }
        if let (Some(f), Some(t)) = (from, to) {
            if f > t {
                eprintln!("{name} audit report: --from is after --to");
                return ExitCode::from(2);
            }
        }
        let query = Query {
            patient: args.patient.clone().unwrap_or_default(),
            authority: args.authority.clone(),
            from,
            to,
            break_glass: args.break_glass,
        };
        // The trails: PATH's own (the active file and its segments), or every trail in the
        // directory PATH — as `audit verify` finds them.
        let trails: Vec<PathBuf> = if args.file.is_dir() {
            let found = match caregate_audit::find_trails(&args.file) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("{name} audit report: {}: {e}", args.file.display());
                    return ExitCode::from(2);
                }
            };
            for skipped in &found.skipped {
                eprintln!("note: {}: skipped: not an audit file", skipped.display());
            }
            if found.trails.is_empty() {
                eprintln!(
                    "{name} audit report: {}: no audit trail in this directory",
                    args.file.display()
                );
                return ExitCode::from(2);
            }
            found.trails
        } else {
            vec![args.file.clone()]
        };
        // Every trail must verify before anything is printed.
        let mut entries = Vec::new();
        let mut notes = Vec::new();
        for trail in &trails {
            let files = caregate_audit::chain_files(trail);
            if files.is_empty() {
                eprintln!(
                    "{name} audit report: {}: no such file (nor rotated segments of it)",
                    trail.display()
                );
                return ExitCode::from(2);
            }
            match caregate_audit::report::report_verified_keys(&files, &keys, &query) {
                Ok(r) => {
                    entries.extend(r.entries);
                    for v in &r.verified {
                        for w in &v.warnings {
                            notes.push(format!("note: {}: {w}", v.file.display()));
                        }
                    }
                }
                Err(e) => {
                    eprintln!("{name} audit report: REFUSED: {e}");
                    return ExitCode::from(1);
                }
            }
        }
        sort_entries(&mut entries);
        for n in &notes {
            eprintln!("{n}");
        }
        let none = format!(
            "{} in the verified trail{}",
            match (&args.patient, args.break_glass) {
                (Some(p), false) => format!("no access to patient {p:?}"),
                (Some(p), true) => format!("no break-the-glass access to patient {p:?}"),
                (None, _) => "no break-the-glass access".to_string(),
            },
            match (&args.from, &args.to) {
                (None, None) => String::new(),
                (f, t) => format!(
                    " from {} to {}",
                    f.as_deref().unwrap_or("the start"),
                    t.as_deref().unwrap_or("the end")
                ),
            }
        );
        if args.format == "json" {
            match serde_json::to_string_pretty(&entries) {
                Ok(j) => println!("{j}"),
                Err(e) => {
                    eprintln!("{name} audit report: {e}");
                    return ExitCode::from(1);
                }
            }
            if entries.is_empty() {
                eprintln!("{none}");
            }
        } else if entries.is_empty() {
            println!("{none}");
        } else {
            println!("{TEXT_HEADER}");
            for e in &entries {
                println!("{}", e.text_line());
            }
        }
        ExitCode::SUCCESS
    }

    fn audit_verify(
        &self,
        file: &Path,
        key_env: &[String],
        checkpoints: Option<&Path>,
    ) -> ExitCode {
        let name = &self.name;
        let keys = match verify_keys(key_env) {
            Ok(k) => k,
            Err(e) => {
                eprintln!("{name} audit verify: {e}");
                return ExitCode::from(2);
            }
        };
        // The trails to verify: PATH's own (the active file and its rotated and handed-over
        // segments), or every trail in the directory PATH.
        let trails: Vec<PathBuf> = if file.is_dir() {
            let found = match caregate_audit::find_trails(file) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("{name} audit verify: {}: {e}", file.display());
                    return ExitCode::from(2);
                }
            };
            for skipped in &found.skipped {
                println!("note: {}: skipped: not an audit file", skipped.display());
            }
            if found.trails.is_empty() {
                eprintln!(
                    "{name} audit verify: {}: no audit trail in this directory",
                    file.display()
                );
                return ExitCode::from(2);
            }
            found.trails
        } else {
            vec![file.to_path_buf()]
        };
        if checkpoints.is_some() && trails.len() > 1 {
            eprintln!(
                "{name} audit verify: {}: --checkpoints checks one trail, and this directory holds {}",
                file.display(),
                trails.len()
            );
            return ExitCode::from(2);
        }
        let seq = |s: Option<u64>| s.map_or_else(|| "-".to_string(), |s| s.to_string());
        let mut failed = false;
        for trail in &trails {
            let files = caregate_audit::chain_files(trail);
            if files.is_empty() {
                eprintln!(
                    "{name} audit verify: {}: no such file (nor rotated segments of it)",
                    trail.display()
                );
                return ExitCode::from(2);
            }
            let verified = match checkpoints {
                Some(copies) => caregate_audit::verify_checkpoints(&files, &keys, copies)
                    .map(|(r, c)| (r, Some(c))),
                None => caregate_audit::verify_files_keys(&files, &keys).map(|r| (r, None)),
            };
            let (reports, copies) = match verified {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("{name} audit verify: FAILED: {e}");
                    failed = true;
                    continue;
                }
            };
            for r in &reports {
                let mut line = format!(
                    "{}: ok — {} records, {} checkpoints, seq {}..{}",
                    r.file.display(),
                    r.records,
                    r.checkpoints,
                    seq(r.first_seq),
                    seq(r.last_seq),
                );
                if let Some(link) = &r.link {
                    let point = if link.handover {
                        "its hand-over checkpoint"
                    } else {
                        "its last line,"
                    };
                    line.push_str(&format!(
                        ", continues {} after {point} seq {}",
                        link.file.display(),
                        link.seq
                    ));
                }
                for h in &r.handovers {
                    line.push_str(&format!(
                        ", hand-over at seq {} ({} late records after it)",
                        h.seq, h.late_records
                    ));
                }
                if !r.key_ids.is_empty() {
                    line.push_str(&format!(", keys {}", r.key_ids.join(" then ")));
                }
                println!("{line}");
            }
            if let Some(c) = &copies {
                println!(
                    "{}: ok — {} off-host checkpoint copies match the trail",
                    c.file.display(),
                    c.matched
                );
                for w in &c.warnings {
                    println!("note: {w}");
                }
            }
            for r in &reports {
                for w in &r.warnings {
                    println!("note: {}: {w}", r.file.display());
                }
            }
            if reports.len() > 1 {
                println!("{}: intact — {} segments", trail.display(), reports.len());
            }
        }
        if failed {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        }
    }

    fn sandbox(&self, listen: SocketAddr, data: PathBuf, base_url: Option<String>) -> ExitCode {
        let name = &self.name;
        let base = base_url.unwrap_or_else(|| format!("http://{listen}/fhir"));
        let sandbox = Sandbox::new(&base);
        let n = match sandbox.load_dir(&data) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("{name} sandbox: {e}");
                return ExitCode::from(1);
            }
        };
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("{name} sandbox: cannot start a runtime: {e}");
                return ExitCode::from(1);
            }
        };
        let server = SandboxServer::new("standalone", listen, &base, Arc::new(sandbox));
        rt.block_on(async move {
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
                }
                let _ = tx.send(true);
            });
            log::info!("sandbox: {n} resources, base {base}");
            match server.serve(rx).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{name} sandbox: cannot listen on {listen}: {e}");
                    ExitCode::from(1)
                }
            }
        })
    }

    /// `health`: one plain-HTTP GET of `/healthz` (or `/readyz`) on the admin listener, within
    /// 2 s. Exit 0 on a 200; 1 with a one-line reason on stderr otherwise (no answer, another
    /// status, an unreadable config). Address: `admin`, else `admin.listen` of the config file
    /// (read for that key only, so a probe needs none of the config's secrets), else
    /// 127.0.0.1:9901. An unspecified address (`0.0.0.0`, `::`) is probed on loopback.
    fn health(&self, admin: Option<SocketAddr>, config: Option<&Path>, ready: bool) -> ExitCode {
        use std::io::{Read, Write};
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpStream};
        use std::time::{Duration, Instant};

        const DEFAULT_CONFIG: &str = "/etc/caregate/caregate.yaml";
        const LIMIT: Duration = Duration::from_secs(2);
        const MAX_ANSWER: usize = 16 * 1024;

        // `admin.listen` (and whether `admin.tls` is set) from the config's YAML, without the
        // rest of the config's checks or its `${...}` secrets.
        fn from_config(path: Option<&Path>) -> Result<SocketAddr, String> {
            let default = SocketAddr::from(([127, 0, 0, 1], 9901));
            let path = match path {
                Some(p) => p,
                None if Path::new(DEFAULT_CONFIG).is_file() => Path::new(DEFAULT_CONFIG),
                None => return Ok(default),
            };
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let doc: serde_yaml::Value = serde_yaml::from_str(&text)
                .map_err(|e| format!("{}: not YAML: {e}", path.display()))?;
            let admin = doc.get("admin").filter(|a| !a.is_null());
            if admin
                .and_then(|a| a.get("tls"))
                .is_some_and(|t| !t.is_null())
            {
                return Err(format!(
                    "{}: admin.tls is set, and `health` speaks plain HTTP only: probe a plain \
                     admin listener (see docs/operations.md, Deployment)",
                    path.display()
                ));
            }
            let Some(listen) = admin.and_then(|a| a.get("listen")).filter(|l| !l.is_null()) else {
                return Ok(default);
            };
            let Some(listen) = listen.as_str() else {
                return Err(format!(
                    "{}: admin.listen: not an IP:PORT string",
                    path.display()
                ));
            };
            let listen = config::substitute_env(listen, |n| std::env::var(n).ok())
                .map_err(|e| format!("{}: admin.listen: {e}", path.display()))?;
            listen.trim().parse().map_err(|e| {
                format!(
                    "{}: admin.listen: `{listen}` is not an IP:PORT address: {e}",
                    path.display()
                )
            })
        }

        // The status code and the first line of the body (the reason of a 503), once the whole
        // answer (or MAX_ANSWER bytes of it) is in.
        fn probe(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
            let deadline = Instant::now() + LIMIT;
            let left = || {
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1))
            };
            let timed_out = |e: std::io::Error| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    format!("no answer within {} s", LIMIT.as_secs())
                }
                _ => e.to_string(),
            };
            let mut stream = TcpStream::connect_timeout(&addr, LIMIT)
                .map_err(|e| format!("cannot connect: {}", timed_out(e)))?;
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: caregate-health\r\n\
                 Connection: close\r\n\r\n"
            );
            stream
                .set_write_timeout(Some(left()))
                .and_then(|()| stream.write_all(request.as_bytes()))
                .map_err(|e| format!("cannot send the request: {}", timed_out(e)))?;
            let mut answer = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                if Instant::now() >= deadline {
                    return Err(format!("no whole answer within {} s", LIMIT.as_secs()));
                }
                stream
                    .set_read_timeout(Some(left()))
                    .map_err(|e| e.to_string())?;
                let n = stream.read(&mut chunk).map_err(timed_out)?;
                answer.extend_from_slice(&chunk[..n.min(chunk.len())]);
                if n == 0 || answer.len() >= MAX_ANSWER {
                    break;
                }
                // Done when the head and Content-Length bytes of body are in, even if the
                // server keeps the connection open.
                let text = String::from_utf8_lossy(&answer);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.trim()
                            .eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())
                            .flatten()
                    });
                    if length.is_some_and(|len| body.len() >= len) {
                        break;
                    }
                }
            }
            let text = String::from_utf8_lossy(&answer);
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            let status_line = head.lines().next().unwrap_or("");
            let status = status_line
                .strip_prefix("HTTP/1.")
                .and_then(|rest| rest.split_whitespace().nth(1))
                .and_then(|code| code.parse::<u16>().ok())
                .ok_or_else(|| {
                    if answer.is_empty() {
                        "the connection closed without an answer".to_string()
                    } else {
                        "the answer is not HTTP/1.x".to_string()
                    }
                })?;
            let chunked = head.lines().any(|l| {
                l.split_once(':').is_some_and(|(k, v)| {
                    k.trim().eq_ignore_ascii_case("transfer-encoding")
                        && v.to_ascii_lowercase().contains("chunked")
                })
            });
            let mut lines = body.lines().map(str::trim).filter(|l| !l.is_empty());
            if chunked {
                lines.next(); // the first chunk's size
            }
            let reason: String = lines
                .next()
                .unwrap_or("")
                .chars()
                .filter(|c| !c.is_control())
                .take(200)
                .collect();
            Ok((status, reason))
        }

        let name = self.name;
        let path = if ready { "/readyz" } else { "/healthz" };
        let mut addr = match admin.map_or_else(|| from_config(config), Ok) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("{name} health: {e}");
                return ExitCode::from(1);
            }
        };
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        match probe(addr, path) {
            Ok((200, reason)) => {
                println!("http://{addr}{path}: 200 {reason}");
                ExitCode::SUCCESS
            }
            Ok((status, reason)) => {
                eprintln!("{name} health: http://{addr}{path}: {status} {reason}");
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("{name} health: http://{addr}{path}: {e}");
                ExitCode::from(1)
            }
        }
    }
}

#[derive(Parser)]
#[command(
    name = "caregate",
    version,
    about = "An API gateway for healthcare, on Pingora"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        /// The gateway's YAML config.
        #[arg(short, long)]
        config: PathBuf,
        /// Take over the listening sockets of a running gateway (graceful upgrade).
        #[arg(short, long)]
        upgrade: bool,
        /// Not supported: caregate runs in the foreground under a supervisor (systemd
        /// `Type=exec`, Kubernetes, a container runtime); `--daemon` exits with an explanation.
        #[arg(short, long)]
        daemon: bool,
    },
    /// Validate a config file and exit: 0 when valid, 1 with the message when not.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Run the built-in demo: a sandbox environment, the gateway in front of sandbox FHIR
    /// servers in two zones, with its own sandbox issuer; it prints requests to try.
    Demo {
        #[arg(short, long, default_value = "conf/demo.yaml")]
        config: PathBuf,
        /// Where the demo keeps its issuer secret, audit key, audit trail and access log.
        #[arg(long, global = true, default_value = crate::demo::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[command(subcommand)]
        command: Option<DemoCommand>,
    },
    /// Apply the governance rules to a config file, offline: the gate a platform team runs in
    /// CI before a config goes live. Exit 0 when no unwaived error-level finding remains, 1
    /// when one does (or the config is invalid), 2 for usage errors.
    Lint(crate::lint::LintArgs),
    /// Which client ids still call deprecated API versions, from the access log.
    Usage(crate::usage::UsageArgs),
    /// Work with the PHI audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Run a standalone sandbox FHIR server (synthetic data; no access control of its own).
    Sandbox {
        #[arg(long)]
        listen: SocketAddr,
        /// Folder of FHIR JSON files to load.
        #[arg(long)]
        data: PathBuf,
        /// Base URL its links are built from (default http://LISTEN/fhir).
        #[arg(long)]
        base_url: Option<String>,
    },
    /// Probe a running gateway's admin listener over plain HTTP: `GET /healthz` (or `/readyz`
    /// with `--ready`). Exit 0 on a 200, 1 otherwise with the reason on stderr. For container
    /// health checks and Kubernetes exec probes, which work with the admin listener on
    /// loopback. An admin listener with TLS cannot be probed this way.
    Health {
        /// The admin listener's address (IP:PORT). Default: `admin.listen` of the config file.
        #[arg(long, value_name = "ADDR")]
        admin: Option<SocketAddr>,
        /// The gateway's config file, read for `admin.listen` only (nothing else is checked).
        /// Default: /etc/caregate/caregate.yaml when that file exists, else the admin
        /// listener's default address, 127.0.0.1:9901.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Ask `/readyz` (ready to take traffic) instead of `/healthz` (alive).
        #[arg(long)]
        ready: bool,
    },
}

#[derive(Subcommand)]
enum DemoCommand {
    /// Print a token of the demo's sandbox issuer (for a patient context or a role), for the
    /// running demo. Such a token is refused on every production listener.
    Token(crate::demo::TokenArgs),
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify an audit trail's keyed chain. PATH is the active audit file (its rotated and
    /// handed-over segments `PATH.<n>` are verified with it, and the links between them) or a
    /// directory (every trail in it). Exit 0 when intact, 1 naming the first broken place (an
    /// edited, removed or reordered record, a cut-off tail, a missing, cut, reordered or
    /// duplicated segment), 2 for usage errors.
    Verify {
        #[arg(value_name = "PATH")]
        file: PathBuf,
        /// An environment variable holding one of the chain's HMAC keys (never pass a key as an
        /// argument): VAR, or ID=VAR to give the key's id. Repeat it for a trail written across
        /// a key rotation: every key the trail used must be given. Default: the key in
        /// CAREGATE_AUDIT_KEY and the ID=KEY pairs (separated by white space) in
        /// CAREGATE_AUDIT_KEYS, whichever are set.
        #[arg(long, value_name = "VAR|ID=VAR")]
        key_env: Vec<String>,
        /// A file of checkpoint copies kept off the host (`audit.offhost_checkpoints`): every
        /// copy must match the trail's checkpoint of the same seq, so a trail rewritten with
        /// the key, or cut back, fails. PATH must name one trail.
        #[arg(long, value_name = "FILE")]
        checkpoints: Option<PathBuf>,
    },
    /// List every access to one patient's data, for a privacy officer: who, when, what, outcome
    /// (and the emergency access used, if any). With --break-glass: the next-day review of
    /// emergency access, every request that used break-the-glass (of one patient with
    /// --patient). The trail is verified first, as `audit verify` does (PATH is the active audit
    /// file, with its segments, or a directory); a trail that does not verify is refused and
    /// nothing is listed. Exit 0 with the accesses (possibly none, saying so), 1 when the trail
    /// does not verify or cannot be read, 2 for usage errors.
    Report(ReportArgs),
}

#[derive(clap::Args)]
struct ReportArgs {
    #[arg(value_name = "PATH")]
    file: PathBuf,
    /// The patient: a FHIR Patient id, or an HL7 v2 patient identifier (PID-3). Required
    /// unless --break-glass is given.
    #[arg(long)]
    patient: Option<String>,
    /// Only the requests that used emergency access (break-the-glass): of every patient, or of
    /// the --patient.
    #[arg(long)]
    break_glass: bool,
    /// HL7 v2 only: match PID-3 identifiers of this assigning authority only.
    #[arg(long)]
    authority: Option<String>,
    /// From this time on: RFC 3339 (2024-05-01T08:00:00Z) or a date (2024-05-01, from its
    /// start, UTC).
    #[arg(long, value_name = "TIME")]
    from: Option<String>,
    /// Up to this time, inclusive: RFC 3339, or a date (to its end, UTC).
    #[arg(long, value_name = "TIME")]
    to: Option<String>,
    /// `text`: a header line, then one tab-separated line per access; `json`: an array.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    format: String,
    /// The environment variables holding the chain's HMAC keys, as for `audit verify` (never
    /// pass a key as an argument): VAR, or ID=VAR after a key rotation; by default
    /// CAREGATE_AUDIT_KEY and the ID=KEY pairs of CAREGATE_AUDIT_KEYS.
    #[arg(long, value_name = "VAR|ID=VAR")]
    key_env: Vec<String>,
}

/// The keys of `audit verify`: each `--key-env` (VAR or ID=VAR), or by default
/// `CAREGATE_AUDIT_KEY` and the ID=KEY pairs of `CAREGATE_AUDIT_KEYS`, whichever are set.
fn verify_keys(key_env: &[String]) -> Result<caregate_audit::AuditKeys, String> {
    let mut keys = caregate_audit::AuditKeys::new();
    if key_env.is_empty() {
        if let Ok(k) = std::env::var("CAREGATE_AUDIT_KEY") {
            keys.add(None, k);
        }
        if let Ok(pairs) = std::env::var("CAREGATE_AUDIT_KEYS") {
            let more = caregate_audit::AuditKeys::parse_pairs(&pairs)
                .map_err(|e| format!("CAREGATE_AUDIT_KEYS: {e}"))?;
            if more.is_empty() {
                return Err("CAREGATE_AUDIT_KEYS: no ID=KEY pair in it".into());
            }
            keys.extend(more);
        }
        if keys.is_empty() {
            return Err(
                "set CAREGATE_AUDIT_KEY to the audit HMAC key (or CAREGATE_AUDIT_KEYS to ID=KEY pairs after a key rotation)"
                    .into(),
            );
        }
        return Ok(keys);
    }
    for spec in key_env {
        let (id, var) = match spec.split_once('=') {
            Some((id, var)) => (Some(id), var),
            None => (None, spec.as_str()),
        };
        let Ok(k) = std::env::var(var) else {
            return Err(format!("set {var} to the audit HMAC key"));
        };
        keys.add(id, k);
    }
    Ok(keys)
}

fn init_logging() {
    crate::logging::init();
}

/// Why `--daemon` is refused: Pingora forks inside `run`, after the gateway has started its
/// audit and access-log writer threads, and a fork keeps only the forking thread — the daemon
/// would serve PHI routes with no audit writer.
const DAEMON_REFUSED: &str = "--daemon is not supported: the audit trail and access \
log writers would not survive the fork. Run caregate in the foreground under a supervisor \
instead (systemd: Type=exec with ExecStart=caregate run -c FILE; see docs/operations.md), \
or in a container.";

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(
        _config: serde_yaml::Value,
        _cx: &BuildContext,
    ) -> Result<Arc<dyn Filter>, BuildError> {
        struct Plain;
        impl Filter for Plain {
            fn kind(&self) -> &'static str {
                "plain"
            }
        }
        Ok(Arc::new(Plain))
    }

    #[test]
    fn the_builder_registers_through_the_public_registry() {
        let app = App::builder()
            .name("my-gateway")
            .filter_kind("plain", plain)
            .build()
            .ok();
        let kinds: Vec<&str> = app
            .as_ref()
            .map(|a| a.registry().kinds().collect())
            .unwrap_or_default();
        assert!(
            kinds.contains(&"plain") && kinds.contains(&"jwt_auth"),
            "{kinds:?}"
        );
        assert_eq!(app.as_ref().map(App::name), Some("my-gateway"));
        // The stock program: the built-in kinds only.
        let stock = App::builder().build().ok();
        let n = stock.map(|a| a.registry().kinds().count()).unwrap_or(0);
        assert_eq!(n, FilterRegistry::builtin().kinds().count());
        assert_eq!(n + 1, kinds.len());
    }

    #[test]
    fn a_kind_registered_twice_or_shadowing_a_builtin_is_refused() {
        let twice = App::builder()
            .filter_kind("plain", plain)
            .filter_kind("plain", plain)
            .build()
            .err();
        assert_eq!(twice, Some(RegistrationError::Duplicate { kind: "plain" }));
        assert_eq!(
            twice.map(|e| e.to_string()).unwrap_or_default(),
            "filter kind `plain` is registered twice; register each kind once"
        );
        let shadow = App::builder()
            .filter_kind("jwt_auth", plain)
            .filter_kind("plain", plain)
            .build()
            .err();
        assert_eq!(
            shadow,
            Some(RegistrationError::ShadowsBuiltin { kind: "jwt_auth" })
        );
        assert!(shadow
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("`jwt_auth` is a built-in kind of caregate"));
        for bad in ["", "Consent", "1st", "my-kind", "consent check"] {
            assert_eq!(
                App::builder().filter_kind(bad, plain).build().err(),
                Some(RegistrationError::InvalidName { kind: bad }),
                "{bad:?}"
            );
        }
        // A refused program exits 2 before it reads any argument.
        assert_eq!(
            App::builder().filter_kind("cors", plain).main(),
            ExitCode::from(2)
        );
    }

    #[test]
    fn usage_errors_return_instead_of_exiting() {
        let app = App::builder().build().ok();
        let code = app.map(|a| a.run_with_args(["caregate", "no-such-command"]));
        assert_eq!(code, Some(ExitCode::from(2)));
    }
}
