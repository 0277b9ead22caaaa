//! What a filter builder gets: its config as written ([`FilterSpec`]), the organisation-wide
//! sections of the gateway config ([`BuildContext`]), and a strict typed config parser that names
//! the place of an error ([`parse_config`]).

use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A filter as written in the config file: `{ kind: cors, config: { ... } }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSpec {
    /// The filter kind (`cors`, `jwt_auth`, or a kind you registered): picks the builder.
    pub kind: String,
    /// The filter's `config` block as written; when it is absent the builder gets an empty
    /// mapping.
    #[serde(default)]
    pub config: Option<serde_yaml::Value>,
}

/// Why a filter could not be built. The gateway (and `caregate check`) prints it after the
/// filter's place in the file: `routes[3].filters[1] (cors): config.allowed_origins[2]: ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildError {
    /// Where the error is. For the filter's own spec, relative to it: `config` or
    /// `config.<field path>` (as [`parse_config`] names it, e.g. `config.allowed_origins[2]`), or
    /// `kind` for an unknown kind. For an error in an organisation-wide section, its place in
    /// the file (`auth.issuers[0].audiences`, `tenants[1].pool`). Empty when no place applies;
    /// the message is then shown alone.
    pub path: String,
    /// What is wrong, for the operator.
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
    /// An error at `path` (see [`BuildError::path`]) saying `message`.
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
    pub auth: crate::auth::AuthConfig,
    /// State built once per config and shared by every filter that needs it.
    pub shared: Arc<SharedBuildState>,
    /// Names of the configured upstream pools.
    pub pools: Vec<String>,
    /// The configured tenants.
    pub tenants: Vec<crate::identity::TenantConfig>,
    /// The folder relative file paths in filter configs resolve against (the config file's).
    pub base_dir: std::path::PathBuf,
}

/// Objects shared by the filters built from one config, one per type: for example the issuers'
/// key sets and the verified-token cache, built by the first `jwt_auth` and shared by every
/// `jwt_auth` route. A filter crate keeps its own shared object here under a type of its own.
#[derive(Default)]
pub struct SharedBuildState {
    slots: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl SharedBuildState {
    /// The shared `T`, built by `init` on first use.
    pub fn get_or_init<T: Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Arc<T> {
        let mut slots = match self.slots.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(v) = slots.get(&TypeId::of::<T>()) {
            if let Ok(v) = v.clone().downcast::<T>() {
                return v;
            }
        }
        let v = Arc::new(init());
        slots.insert(TypeId::of::<T>(), v.clone());
        v
    }

    /// The shared `T`, if some filter built it.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let slots = match self.slots.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        slots
            .get(&TypeId::of::<T>())
            .and_then(|v| v.clone().downcast::<T>().ok())
    }
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

/// Deserialize a filter's typed config, naming the position of any error: the error's
/// [`path`](BuildError::path) is `config` for an error of the block as a whole, else
/// `config.<field path>` (e.g. `config.allowed_origins[2]`). Strictness (such as refusing unknown
/// fields) is the config type's own: `#[serde(deny_unknown_fields)]`.
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
