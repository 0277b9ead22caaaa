//! `caregate usage`: which client ids still call deprecated API versions, read from the access
//! log (a client id is not PHI; the access log carries it with the API and version).

/// `caregate usage` arguments.
#[derive(clap::Args, Debug)]
pub struct UsageArgs {
    /// The access log (JSON lines); rotated files may be given too.
    #[arg(value_name = "ACCESS_LOG", required = true)]
    pub files: Vec<std::path::PathBuf>,
}

/// Run `caregate usage`.
pub fn run(args: &UsageArgs) -> std::process::ExitCode {
    let _ = args;
    std::process::ExitCode::from(1)
}
