//! The `caregate` command.

use caregate::config;
use caregate::sandbox_server::SandboxServer;
use caregate::server::build_server;
use caregate_sandbox::Sandbox;
use clap::{Parser, Subcommand};
use pingora::prelude::Opt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// mimalloc instead of the system allocator: a proxy allocates and frees small buffers for every
/// request, which glibc's malloc spent about a sixth of the passthrough CPU on, and it returns
/// freed memory to the OS, so idle keep-alive connections after a burst do not pin the peak.
/// Measured in benches/RESULTS.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// Run in the background.
        #[arg(short, long)]
        daemon: bool,
    },
    /// Validate a config file and exit: 0 when valid, 1 with the message when not.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Run the built-in demo: the gateway in front of sandbox FHIR servers in two zones.
    Demo {
        #[arg(short, long, default_value = "conf/demo.yaml")]
        config: PathBuf,
    },
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
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify an audit file's keyed chain: exit 0 when intact, 1 naming the first broken place
    /// (an edited, removed or reordered record, or a cut-off tail).
    Verify {
        file: PathBuf,
        /// The environment variable holding the chain's HMAC key (never pass it as an argument).
        #[arg(long, default_value = "CAREGATE_AUDIT_KEY")]
        key_env: String,
    },
}

fn audit_verify(file: &std::path::Path, key_env: &str) -> ExitCode {
    let Ok(key) = std::env::var(key_env) else {
        eprintln!("caregate audit verify: set {key_env} to the audit HMAC key");
        return ExitCode::from(2);
    };
    match caregate_audit::verify(file, key.as_bytes()) {
        Ok(report) => {
            println!(
                "{}: ok — {} records, {} checkpoints, seq {}..{}",
                report.file.display(),
                report.records,
                report.checkpoints,
                report
                    .first_seq
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into()),
                report
                    .last_seq
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into()),
            );
            for w in &report.warnings {
                println!("note: {w}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("caregate audit verify: FAILED: {e}");
            ExitCode::from(1)
        }
    }
}

fn init_logging() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .try_init();
}

fn load(path: &std::path::Path) -> Result<config::Loaded, String> {
    config::load_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn run(path: &std::path::Path, upgrade: bool, daemon: bool, banner: Option<String>) -> ExitCode {
    let loaded = match load(path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("caregate: invalid config: {e}");
            return ExitCode::from(1);
        }
    };
    let opt = Opt {
        upgrade,
        daemon,
        ..Opt::default()
    };
    let server = match build_server(loaded, opt) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("caregate: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(b) = banner {
        println!("{b}");
    }
    server.run_forever()
}

fn demo_banner(loaded: &config::Loaded) -> String {
    let cfg = &loaded.config;
    let public = cfg
        .listeners
        .iter()
        .find(|l| l.name == "public")
        .map(|l| l.listen.to_string())
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let internal = cfg
        .listeners
        .iter()
        .find(|l| l.name == "internal")
        .map(|l| l.listen.to_string())
        .unwrap_or_else(|| "127.0.0.1:8081".into());
    let admin = cfg.admin.listen.to_string();
    let zone_a = cfg
        .sandboxes
        .first()
        .map(|s| s.name.clone())
        .unwrap_or_default();
    format!(
        r#"
caregate demo: the gateway in front of two sandbox FHIR servers (zone-a preferred, zone-b standby)
holding synthetic Synthea patients. Try, in another terminal:

  # readiness and metrics (admin listener, loopback only)
  curl -s http://{admin}/readyz
  curl -s http://{admin}/metrics | grep caregate_upstream_backend_healthy

  # FHIR through the public listener
  curl -s http://{public}/fhir/metadata | head -c 300; echo
  curl -s 'http://{public}/fhir/Patient?_count=2' | head -c 600; echo
  curl -s 'http://{public}/fhir/Observation?category=vital-signs&_count=1' | head -c 600; echo

  # what the gateway refuses: a path trick, an internal route on the public listener
  curl -si 'http://{public}/fhir/%2e%2e/internal/fhir/Patient' | head -n 1
  curl -si 'http://{public}/fhir/Patient%2F1' | head -n 1
  curl -s  'http://{public}/internal/fhir/Patient'; echo
  curl -s  'http://{internal}/internal/fhir/Patient?_count=1' | head -c 300; echo

  # a preflight from the patient portal, answered at the gateway
  curl -si -X OPTIONS http://{public}/fhir/Patient -H 'Origin: http://localhost:3000' -H 'Access-Control-Request-Method: GET' | head -n 5

  # take zone-a down: its sandbox closes its socket; traffic fails over to zone-b
  curl -s -X POST http://{admin}/sandbox/{zone_a}/outage
  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}} ' 'http://{public}/fhir/Patient?_count=1'; done; echo
  curl -s -o /dev/null -w '%{{http_code}}\n' 'http://{public}/fhir/Patient?_count=1'   # still served, by zone-b
  curl -s http://{admin}/metrics | grep -E 'caregate_upstream_(failovers_total|backend_healthy)'
  curl -s -X POST http://{admin}/sandbox/{zone_a}/restore

Stop with Ctrl-C.
"#
    )
}

fn run_sandbox(listen: SocketAddr, data: PathBuf, base_url: Option<String>) -> ExitCode {
    let base = base_url.unwrap_or_else(|| format!("http://{listen}/fhir"));
    let sandbox = Sandbox::new(&base);
    let n = match sandbox.load_dir(&data) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("caregate sandbox: {e}");
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
            eprintln!("caregate sandbox: cannot start a runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let server = SandboxServer::new("standalone", listen, &base, Arc::new(sandbox));
    rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
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
                eprintln!("caregate sandbox: cannot listen on {listen}: {e}");
                ExitCode::from(1)
            }
        }
    })
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            upgrade,
            daemon,
        } => run(&config, upgrade, daemon, None),
        Command::Check { config } => match load(&config) {
            Ok(l) => {
                println!(
                    "{}: ok ({} listeners, {} routes, {} pools)",
                    config.display(),
                    l.config.listeners.len(),
                    l.config.routes.len(),
                    l.config.pools.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("caregate: invalid config: {e}");
                ExitCode::from(1)
            }
        },
        Command::Demo { config } => {
            let banner = match load(&config) {
                Ok(l) => demo_banner(&l),
                Err(e) => {
                    eprintln!("caregate: invalid demo config: {e} (run from the repository root)");
                    return ExitCode::from(1);
                }
            };
            run(&config, false, false, Some(banner))
        }
        Command::Sandbox {
            listen,
            data,
            base_url,
        } => run_sandbox(listen, data, base_url),
        Command::Audit {
            command: AuditCommand::Verify { file, key_env },
        } => audit_verify(&file, &key_env),
    }
}
