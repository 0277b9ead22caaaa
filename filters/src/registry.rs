//! The explicit registry of filter kinds: one list of every built-in kind, each built from its
//! typed, strict config into an immutable filter object.

use crate::builtin;
use crate::Filter;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A filter as written in the config file: `{ kind: cors, config: { ... } }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSpec {
    pub kind: String,
    #[serde(default)]
    pub config: Option<serde_yaml::Value>,
}

/// Why a filter could not be built. `path` is relative to the filter's `config` block
/// (e.g. `allowed_origins[2]`), so the gateway can prefix it with the filter's place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl BuildError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        BuildError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// What a filter builder may know besides its own config: the organisation-wide sections of the
/// gateway config.
#[derive(Debug, Clone, Default)]
pub struct BuildContext {
    /// The organisation-wide `auth:` section (issuers, token cache, certificate mappings).
    pub auth: crate::builtin::jwt_auth::AuthConfig,
    /// State built once per config and shared by every filter that needs it.
    pub shared: Arc<SharedBuildState>,
    /// Names of the configured upstream pools.
    pub pools: Vec<String>,
    /// The configured tenants.
    pub tenants: Vec<crate::identity::TenantConfig>,
    /// The folder relative file paths in filter configs resolve against (the config file's).
    pub base_dir: std::path::PathBuf,
}

/// Objects shared by the filters built from one config (e.g. the issuers' key sets and the
/// verified-token cache, shared by every `jwt_auth` route).
#[derive(Default)]
pub struct SharedBuildState {
    pub issuer_set:
        std::sync::OnceLock<Result<Arc<crate::builtin::jwt_auth::IssuerSet>, BuildError>>,
}

impl std::fmt::Debug for SharedBuildState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBuildState").finish_non_exhaustive()
    }
}

impl BuildContext {
    /// Resolve a path from a filter config against the config file's folder.
    pub fn resolve(&self, p: &std::path::Path) -> std::path::PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }
}

type Builder = fn(serde_yaml::Value, &BuildContext) -> Result<Arc<dyn Filter>, BuildError>;

/// Maps a config `kind` to the function that builds it.
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

/// Deserialize a filter's typed config, naming the position of any error.
pub fn parse_config<T: DeserializeOwned>(value: serde_yaml::Value) -> Result<T, BuildError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let inner = e.into_inner().to_string();
        BuildError::new(
            if path.is_empty() {
                "config".to_string()
            } else {
                format!("config.{path}")
            },
            inner,
        )
    })
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
