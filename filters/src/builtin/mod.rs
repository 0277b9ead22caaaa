//! The built-in filter kinds. Each module holds one kind: its typed config, its build function
//! and its filter.

pub mod body;
pub mod break_glass;
pub mod bundle_entries;
pub mod cors;
pub mod fhir_links;
pub mod fhir_mask;
pub mod headers;
pub mod ip_allow;
pub mod jwt_auth;
pub mod patient_compartment;
pub mod rate_limit;
pub mod rbac;
pub mod request_limits;
pub mod smart_configuration;
pub mod smart_scopes;
pub mod tenant;
