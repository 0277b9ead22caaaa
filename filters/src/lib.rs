//! The built-in caregate filters, and the registry of filter kinds.
//!
//! The filter contract itself (the `Filter` trait, decisions, `RequestCtx` and facts, the chain
//! runner, declarations, build context) is the small `caregate-filter-api` crate, re-exported
//! here whole so `caregate_filters::X` and `caregate_filter_api::X` name the same items. Users'
//! filters depend on the API crate only.
#![forbid(unsafe_code)]

pub use caregate_filter_api::*;

pub mod builtin;
pub mod registry;

pub use registry::FilterRegistry;
