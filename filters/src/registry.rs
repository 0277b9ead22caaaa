//! The explicit registry of filter kinds: one list of every built-in kind, each built from its
//! typed, strict config into an immutable filter object.

use crate::builtin;
use crate::Filter;
pub use caregate_filter_api::build::{
    parse_config, BuildContext, BuildError, FilterSpec, SharedBuildState,
};
use std::collections::BTreeMap;
use std::sync::Arc;

type Builder = fn(serde_yaml::Value, &BuildContext) -> Result<Arc<dyn Filter>, BuildError>;

/// Maps a config `kind` to the function that builds it.
#[derive(Clone)]
pub struct FilterRegistry {
    builders: BTreeMap<&'static str, Builder>,
}

impl FilterRegistry {
    /// The registry of every built-in filter kind. New kinds are added here, and only here.
    pub fn builtin() -> Self {
        let mut r = FilterRegistry {
            builders: BTreeMap::new(),
        };
        r.register("headers", builtin::headers::build);
        r.register("request_limits", builtin::request_limits::build);
        r.register("cors", builtin::cors::build);
        r.register("fhir_links", builtin::fhir_links::build);
        r.register("fhir_mask", builtin::fhir_mask::build);
        r.register("smart_scopes", builtin::smart_scopes::build);
        r.register("smart_configuration", builtin::smart_configuration::build);
        r.register("patient_compartment", builtin::patient_compartment::build);
        r.register("jwt_auth", builtin::jwt_auth::build);
        r.register("rbac", builtin::rbac::build);
        r.register("ip_allow", builtin::ip_allow::build);
        r.register("tenant", builtin::tenant::build);
        r.register("rate_limit", builtin::rate_limit::build);
        r.register("break_glass", builtin::break_glass::build);
        r
    }

    /// Register a kind. A second registration of the same kind replaces nothing and is refused.
    pub fn register(&mut self, kind: &'static str, builder: Builder) -> bool {
        if self.builders.contains_key(kind) {
            return false;
        }
        self.builders.insert(kind, builder);
        true
    }

    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.builders.keys().copied()
    }

    /// Build a filter from its spec.
    pub fn build(
        &self,
        spec: &FilterSpec,
        cx: &BuildContext,
    ) -> Result<Arc<dyn Filter>, BuildError> {
        let builder = self.builders.get(spec.kind.as_str()).ok_or_else(|| {
            BuildError::new(
                "kind",
                format!(
                    "unknown filter kind `{}` (known: {})",
                    spec.kind,
                    self.kinds().collect::<Vec<_>>().join(", ")
                ),
            )
        })?;
        let config = spec
            .config
            .clone()
            .unwrap_or(serde_yaml::Value::Mapping(Default::default()));
        builder(config, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_kind_is_refused_with_the_known_kinds() {
        let r = FilterRegistry::builtin();
        let spec = FilterSpec {
            kind: "nope".into(),
            config: None,
        };
        let err = r
            .build(&spec, &BuildContext::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("unknown filter kind `nope`"), "{err}");
        assert!(err.contains("cors"), "{err}");
    }

    #[test]
    fn unknown_config_field_names_its_place() {
        let r = FilterRegistry::builtin();
        let spec = FilterSpec {
            kind: "request_limits".into(),
            config: Some(
                serde_yaml::from_str("max_body_bytes: 10\nmax_bdy: 3\n").unwrap_or_default(),
            ),
        };
        let err = r
            .build(&spec, &BuildContext::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("config"), "{err}");
        assert!(err.contains("unknown field `max_bdy`"), "{err}");
    }
}
