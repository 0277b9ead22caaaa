//! HL7 v2 through the gateway: MLLP listeners and `hl7: true` HTTP routes, routed by message
//! type, sending facility and tenant to MLLP or HTTP pools, with the sender's acknowledgement,
//! metrics and audit. See `docs/hl7.md`.

pub mod config;
pub mod engine;
pub mod service;

pub use engine::{Engine, Handled, Origin, Outcome, Upstreams};

/// The media type of HL7 v2 (ER7) message bodies over HTTP.
pub const MEDIA_TYPE: &str = "application/hl7-v2";
