//! caregate: an API gateway for healthcare, on Pingora.
//!
//! This crate holds the CLI, configuration, server assembly, the `ProxyHttp` implementation,
//! routing, upstream pools, the admin listener, metrics and the sandbox's HTTP side. Filters live
//! in `caregate-filters`.
//!
//! It is also the library you build your own `caregate` binary with, when you have filter kinds
//! of your own: [`App::builder`] registers them beside the built-in kinds and runs the same
//! command line (see [`cli`] and `docs/writing-a-filter.md`):
//!
//! ```no_run
//! #[global_allocator]
//! static GLOBAL: caregate::Allocator = caregate::Allocator;
//!
//! fn main() -> std::process::ExitCode {
//!     caregate::App::builder()
//!         // .filter_kind("consent", consent_filter::build)
//!         .main()
//! }
//! ```
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod anomaly;
pub mod apis;
pub mod cli;
pub mod config;
pub mod confinement;
pub mod conn_guard;
pub mod demo;
pub mod dns;
pub mod errors;
pub mod exchange;
pub mod hl7gw;
pub mod hygiene;
pub mod lifecycle;
pub mod lint;
pub mod logging;
pub mod metrics;
pub mod otlp;
pub mod outlier;
pub mod portal;
pub mod proxy;
pub mod reload;
pub mod retry;
pub mod router;
pub mod sandbox_server;
pub mod server;
pub mod tls_identity;
pub mod upstream;
pub mod usage;

pub use cli::{App, AppBuilder, FilterBuilder, RegistrationError};

/// The global allocator caregate is built and measured with: mimalloc. A proxy allocates and
/// frees small buffers for every request, which glibc's malloc spent about a sixth of the
/// passthrough CPU on, and mimalloc returns freed memory to the OS, so idle keep-alive
/// connections after a burst do not pin the peak (measured in `benches/RESULTS.md`).
///
/// A library cannot choose the allocator of the binary it is linked into: a custom binary
/// (see [`App::builder`]) keeps the measured performance only when it declares it itself, in
/// its `main.rs`:
///
/// ```no_run
/// #[global_allocator]
/// static GLOBAL: caregate::Allocator = caregate::Allocator;
/// # fn main() {}
/// ```
pub use mimalloc::MiMalloc as Allocator;
