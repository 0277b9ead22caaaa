//! caregate: an API gateway for healthcare, on Pingora.
//!
//! This crate holds the CLI, configuration, server assembly, the `ProxyHttp` implementation,
//! routing, upstream pools, the admin listener, metrics and the sandbox's HTTP side. Filters live
//! in `caregate-filters`.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod config;
pub mod errors;
pub mod exchange;
pub mod hygiene;
pub mod metrics;
pub mod otlp;
pub mod proxy;
pub mod router;
pub mod sandbox_server;
pub mod server;
pub mod tls_identity;
pub mod upstream;
