//! APIs and their versions: the lifecycle of what the gateway serves (`apis:` in the config).
//!
//! An API groups routes (declared once, without a version) and gives them versions. Each
//! version has a lifecycle state (`draft`, `preview`, `live`, `deprecated`, `retired`), dates
//! (deprecation, sunset), a successor, an owner and a documentation link. At load the gateway
//! expands every route of an API into one route per version (`patient-fhir@v1`): with path
//! versioning under `/{version}{path_prefix}` (forwarded without the version segment), with
//! header or media-type versioning at the same prefix, chosen by the request's `API-Version`
//! header or the `version` parameter of its `Accept` media type. An API with a `sandbox` gets
//! a second copy of each version's routes on the sandbox listener, sent to the sandbox pool.
//! Draft versions exist only on sandbox listeners.
//!
//! At run time ([`Lifecycle::evaluate`]) a retired version, or one past its sunset date,
//! answers `410 api_sunset`; a deprecated one adds `Deprecation` (RFC 9745), `Sunset`
//! (RFC 8594) and `Link` (`rel="deprecation"`, `"sunset"`, `"successor-version"`) to every
//! response; a preview version serves only callers with one of its `preview_roles`.

use crate::config::{ConfigError, RouteConfig};
use caregate_filters::Environment;
use serde::{Deserialize, Deserializer};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// `apis[]`: one API, its versions and the routes that make it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// A short unique name (`patient-api`): the `api` label of metrics and of the access log.
    pub name: String,
    /// A human title for the developer portal; default the name.
    #[serde(default)]
    pub title: Option<String>,
    /// A description for the developer portal.
    #[serde(default)]
    pub description: Option<String>,
    /// The team that owns the API (whom to ask, who approves changes).
    #[serde(default)]
    pub owner: Option<String>,
    /// Where the API's documentation lives (a URL).
    #[serde(default)]
    pub docs: Option<String>,
    /// How a request names its version: `path` (default: `/v1/...`), `header`
    /// (`API-Version: v1`) or `media_type` (`Accept: application/fhir+json; version=v1`).
    #[serde(default)]
    pub versioning: Versioning,
    /// With `header` or `media_type` versioning: the version served to a request that names
    /// none. Required with those; not used with `path`.
    #[serde(default)]
    pub default_version: Option<String>,
    /// The names of the routes that make this API, each declared once in `routes:` (without a
    /// version): the gateway serves them once per version.
    pub routes: Vec<String>,
    pub versions: Vec<ApiVersionConfig>,
    /// Also serve every version (drafts included) on a sandbox listener, against a sandbox pool.
    #[serde(default)]
    pub sandbox: Option<ApiSandbox>,
    /// A file holding the backend's own OpenAPI document (JSON or YAML), merged into the
    /// developer portal's document (its paths under each version's prefix).
    #[serde(default)]
    pub openapi_fragment: Option<std::path::PathBuf>,
}

/// `apis[].sandbox`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSandbox {
    /// An `environment: sandbox` listener.
    pub listener: String,
    /// An `environment: sandbox` pool (typically the built-in synthetic FHIR sandbox).
    pub pool: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Versioning {
    #[default]
    Path,
    Header,
    MediaType,
}

impl Versioning {
    pub fn as_str(self) -> &'static str {
        match self {
            Versioning::Path => "path",
            Versioning::Header => "header",
            Versioning::MediaType => "media_type",
        }
    }
}

/// The header that names a version under `versioning: header`.
pub const VERSION_HEADER: &str = "api-version";

/// `apis[].versions[]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiVersionConfig {
    /// The version as clients write it (`v1`, `2025-01`): letters, digits, `.`, `_`, `-`.
    pub name: String,
    pub state: LifecycleState,
    /// When the version was (or will be) deprecated: `YYYY-MM-DD` or an RFC 3339 time (UTC).
    /// From then on a `live` version counts as deprecated.
    #[serde(default, deserialize_with = "de_time")]
    pub deprecated_at: Option<i64>,
    /// When the version is retired: from then on it answers `410 api_sunset`.
    #[serde(default, deserialize_with = "de_time")]
    pub sunset: Option<i64>,
    /// The version that replaces this one (a version of the same API).
    #[serde(default)]
    pub successor: Option<String>,
    /// The page that explains the deprecation (`Link rel="deprecation"`); default `docs`.
    #[serde(default)]
    pub deprecation_link: Option<String>,
    /// Overrides the API's owner for this version.
    #[serde(default)]
    pub owner: Option<String>,
    /// Overrides the API's documentation link for this version.
    #[serde(default)]
    pub docs: Option<String>,
    /// A `preview` version serves only callers with one of these roles (after authentication).
    #[serde(default)]
    pub preview_roles: Vec<String>,
    /// This version's requests go to this pool instead of the route's.
    #[serde(default)]
    pub pool: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleState {
    Draft,
    Preview,
    Live,
    Deprecated,
    Retired,
}

impl LifecycleState {
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleState::Draft => "draft",
            LifecycleState::Preview => "preview",
            LifecycleState::Live => "live",
            LifecycleState::Deprecated => "deprecated",
            LifecycleState::Retired => "retired",
        }
    }
}

fn de_time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    match s {
        None => Ok(None),
        Some(s) => parse_time(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

/// `YYYY-MM-DD` (midnight UTC) or `YYYY-MM-DDTHH:MM:SS[.fff](Z|+HH:MM|-HH:MM)`, as Unix seconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    let bad = || format!("`{s}`: not a date (YYYY-MM-DD) or an RFC 3339 time");
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        let part = s.get(r).ok_or_else(bad)?;
        if part.is_empty() || !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        part.parse::<i64>().map_err(|_| bad())
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(bad());
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) {
        return Err(bad());
    }
    let mut secs = caregate_audit::calendar::days_from_civil(y, mo, d) * 86_400;
    if b.len() == 10 {
        return Ok(secs);
    }
    if b.len() < 20 || !(b[10] == b'T' || b[10] == b't') || b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    secs += h * 3600 + mi * 60 + se;
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return Err(bad());
        }
        rest = &frac[n..];
    }
    match rest {
        "Z" | "z" => Ok(secs),
        _ if rest.len() == 6 && (rest.starts_with('+') || rest.starts_with('-')) => {
            let oh: i64 = rest[1..3].parse().map_err(|_| bad())?;
            let om: i64 = rest[4..6].parse().map_err(|_| bad())?;
            if &rest[3..4] != ":" || oh > 23 || om > 59 {
                return Err(bad());
            }
            let off = oh * 3600 + om * 60;
            Ok(if rest.starts_with('+') {
                secs - off
            } else {
                secs + off
            })
        }
        _ => Err(bad()),
    }
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), as RFC 8594's `Sunset` wants.
pub fn http_date(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = caregate_audit::calendar::civil_from_days(days);
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(m - 1) as usize];
    format!(
        "{wd}, {d:02} {mon} {y:04} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// How an expanded route is chosen among the versions of its API at the same prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionSelect {
    /// The version is in the path: nothing more to match.
    Path,
    /// `API-Version: {version}`; `default`: also a request without the header.
    Header { default: bool },
    /// `Accept: ...; version={version}`; `default`: also a request without the parameter.
    MediaType { default: bool },
}

/// What a request says of its version, read once per request (only where an API uses them).
#[derive(Debug, Default, Clone)]
pub struct RequestedVersion {
    pub header: Option<String>,
    pub media_type: Option<String>,
}

impl RequestedVersion {
    pub fn from_headers(h: &http::HeaderMap) -> Self {
        let header = h
            .get(VERSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty());
        let media_type = h
            .get_all(http::header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|mt| {
                mt.split(';').skip(1).find_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    (k.trim().eq_ignore_ascii_case("version"))
                        .then(|| v.trim().trim_matches('"').to_string())
                })
            })
            .filter(|v| !v.is_empty());
        RequestedVersion { header, media_type }
    }
}

/// The lifecycle of one API version, as the running gateway applies it.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    pub state: LifecycleState,
    pub deprecated_at: Option<i64>,
    pub sunset: Option<i64>,
    /// Where the successor version is (a path on this gateway), if any.
    pub successor_link: Option<String>,
    pub deprecation_link: Option<String>,
    /// The sunset policy page (`Link rel="sunset"`): the API's docs.
    pub sunset_link: Option<String>,
    pub preview_roles: Vec<String>,
}

/// What the lifecycle says of one request at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effective {
    Draft = 0,
    Preview,
    Live,
    Deprecated,
    /// Retired by hand or past the sunset date: `410 api_sunset`.
    Retired,
}

impl Effective {
    pub fn as_str(self) -> &'static str {
        match self {
            Effective::Draft => "draft",
            Effective::Preview => "preview",
            Effective::Live => "live",
            Effective::Deprecated => "deprecated",
            Effective::Retired => "retired",
        }
    }
}

impl Lifecycle {
    /// The state at `now` (Unix seconds): dates move a version on without a config change.
    pub fn evaluate(&self, now: i64) -> Effective {
        if self.state == LifecycleState::Retired || self.sunset.is_some_and(|s| now >= s) {
            return Effective::Retired;
        }
        match self.state {
            LifecycleState::Draft => Effective::Draft,
            LifecycleState::Preview => Effective::Preview,
            LifecycleState::Deprecated => Effective::Deprecated,
            LifecycleState::Live if self.deprecated_at.is_some_and(|d| now >= d) => {
                Effective::Deprecated
            }
            _ => Effective::Live,
        }
    }

    /// The response header fields of a version in state `eff`: `Deprecation`, `Sunset` and
    /// `Link`. Empty for a live version without dates.
    pub fn headers(&self, eff: Effective) -> Vec<(&'static str, String)> {
        self.header_fields(self.announced(eff))
    }

    /// Whether the responses of a version in state `eff` announce its deprecation.
    fn announced(&self, eff: Effective) -> bool {
        matches!(eff, Effective::Deprecated | Effective::Retired) || self.deprecated_at.is_some()
    }

    fn header_fields(&self, deprecated: bool) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if deprecated {
            // RFC 9745: a Structured Field Date; a future date announces the deprecation.
            match self.deprecated_at {
                Some(d) => out.push(("deprecation", format!("@{d}"))),
                None => out.push(("deprecation", "@0".to_string())),
            }
        }
        if let Some(s) = self.sunset {
            out.push(("sunset", http_date(s)));
        }
        let mut links = Vec::new();
        if deprecated {
            if let Some(l) = &self.deprecation_link {
                links.push(format!("<{l}>; rel=\"deprecation\"; type=\"text/html\""));
            }
        }
        if self.sunset.is_some() {
            if let Some(l) = &self.sunset_link {
                links.push(format!("<{l}>; rel=\"sunset\"; type=\"text/html\""));
            }
        }
        if deprecated || self.sunset.is_some() {
            if let Some(l) = &self.successor_link {
                links.push(format!("<{l}>; rel=\"successor-version\""));
            }
        }
        if !links.is_empty() {
            out.push(("link", links.join(", ")));
        }
        out
    }
}

/// What an expanded route knows of its API version.
#[derive(Debug, Clone)]
pub struct ApiBinding {
    pub api: Arc<str>,
    pub version: Arc<str>,
    /// Index of the API in `apis`, of the version in its `versions`, and of the template route
    /// in the config's route list as written (for lint positions and the portal).
    pub api_index: usize,
    pub version_index: usize,
    pub template: String,
    pub select: VersionSelect,
    pub lifecycle: Lifecycle,
    /// The environment of the listener this copy is on.
    pub environment: Environment,
    /// [`Lifecycle::headers`] as header values, built once: without and with the deprecation
    /// announced.
    response_headers: [Vec<(&'static str, http::HeaderValue)>; 2],
    /// This version's `caregate_api_requests_total` series, per state, looked up once.
    counters: [std::sync::OnceLock<prometheus::IntCounter>; 5],
}

impl ApiBinding {
    fn new(
        api: &str,
        version: &str,
        (api_index, version_index): (usize, usize),
        template: String,
        select: VersionSelect,
        lifecycle: Lifecycle,
        environment: Environment,
    ) -> ApiBinding {
        let values = |announced: bool| {
            lifecycle
                .header_fields(announced)
                .into_iter()
                .filter_map(|(n, v)| http::HeaderValue::from_str(&v).ok().map(|v| (n, v)))
                .collect()
        };
        ApiBinding {
            api: Arc::from(api),
            version: Arc::from(version),
            api_index,
            version_index,
            template,
            select,
            response_headers: [values(false), values(true)],
            lifecycle,
            environment,
            counters: Default::default(),
        }
    }

    /// The lifecycle header fields of a response in state `eff`.
    pub fn response_headers(&self, eff: Effective) -> &[(&'static str, http::HeaderValue)] {
        &self.response_headers[usize::from(self.lifecycle.announced(eff))]
    }

    /// The `caregate_api_requests_total` series of this version in state `eff`.
    pub fn requests(&self, eff: Effective) -> &prometheus::IntCounter {
        self.counters[eff as usize].get_or_init(|| {
            crate::metrics::API_REQUESTS.with_label_values(&[
                &self.api,
                &self.version,
                eff.as_str(),
                self.environment.as_str(),
            ])
        })
    }

    /// Whether this version serves a request that asked for `req` (routes at the same prefix).
    pub fn matches(&self, req: &RequestedVersion) -> bool {
        match &self.select {
            VersionSelect::Path => true,
            VersionSelect::Header { default } => match &req.header {
                Some(v) => v.eq_ignore_ascii_case(&self.version),
                None => *default,
            },
            VersionSelect::MediaType { default } => match &req.media_type {
                Some(v) => v.eq_ignore_ascii_case(&self.version),
                None => *default,
            },
        }
    }
}

fn valid_version_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The path prefix of `route` under version `v` of an API versioned by path.
pub fn versioned_prefix(version: &str, route_prefix: &str) -> String {
    if route_prefix == "/" {
        format!("/{version}")
    } else {
        format!("/{version}{route_prefix}")
    }
}

/// Expand the routes of every API into one route per version (and per sandbox), replacing the
/// templates in `routes`. Routes of no API stay as they are. `env_of_listener` and
/// `env_of_pool` give the environment of a named listener or pool (`None`: no such name).
pub fn expand(
    apis: &[ApiConfig],
    routes: Vec<RouteConfig>,
    env_of_listener: &dyn Fn(&str) -> Option<Environment>,
    env_of_pool: &dyn Fn(&str) -> Option<Environment>,
) -> Result<Vec<RouteConfig>, ConfigError> {
    if apis.is_empty() {
        return Ok(routes);
    }
    let e = |m: String| Err(ConfigError(m));
    let mut names = HashSet::new();
    let mut owned: HashSet<&str> = HashSet::new();
    for (ai, a) in apis.iter().enumerate() {
        let at = format!("apis[{ai}] ({})", a.name);
        if a.name.is_empty() || !names.insert(a.name.as_str()) {
            return e(format!("apis[{ai}].name: empty or duplicate"));
        }
        if a.versions.is_empty() {
            return e(format!("{at}.versions: at least one version is required"));
        }
        if a.routes.is_empty() {
            return e(format!("{at}.routes: at least one route is required"));
        }
        for (ri, r) in a.routes.iter().enumerate() {
            if !routes.iter().any(|x| &x.name == r) {
                return e(format!("{at}.routes[{ri}]: no route named `{r}`"));
            }
            if !owned.insert(r.as_str()) {
                return e(format!(
                    "{at}.routes[{ri}]: route `{r}` already belongs to an API"
                ));
            }
        }
        let mut vnames = HashSet::new();
        for (vi, v) in a.versions.iter().enumerate() {
            let vat = format!("{at}.versions[{vi}] ({})", v.name);
            if !valid_version_name(&v.name) {
                return e(format!(
                    "{vat}.name: use letters, digits, `.`, `_` and `-` (starting with a letter or digit)"
                ));
            }
            if !vnames.insert(v.name.to_ascii_lowercase()) {
                return e(format!("{vat}.name: duplicate version"));
            }
        }
        for (vi, v) in a.versions.iter().enumerate() {
            let vat = format!("{at}.versions[{vi}] ({})", v.name);
            if let Some(s) = &v.successor {
                if s == &v.name || !a.versions.iter().any(|x| &x.name == s) {
                    return e(format!(
                        "{vat}.successor: `{s}` is not another version of this API"
                    ));
                }
            }
            if let (Some(d), Some(s)) = (v.deprecated_at, v.sunset) {
                if s < d {
                    return e(format!("{vat}.sunset: is before deprecated_at"));
                }
            }
            if v.state == LifecycleState::Preview && v.preview_roles.is_empty() {
                return e(format!(
                    "{vat}.preview_roles: a preview version needs the roles it is shown to"
                ));
            }
            if v.state != LifecycleState::Preview && !v.preview_roles.is_empty() {
                return e(format!(
                    "{vat}.preview_roles: only a `preview` version has preview roles"
                ));
            }
            if let Some(p) = &v.pool {
                if env_of_pool(p).is_none() {
                    return e(format!("{vat}.pool: no pool named `{p}`"));
                }
            }
        }
        match a.versioning {
            Versioning::Path => {
                if a.default_version.is_some() {
                    return e(format!(
                        "{at}.default_version: only with header or media_type versioning (the path names the version)"
                    ));
                }
            }
            _ => match &a.default_version {
                None => {
                    return e(format!(
                        "{at}.default_version: required with {} versioning",
                        a.versioning.as_str()
                    ))
                }
                Some(d) if !a.versions.iter().any(|v| &v.name == d) => {
                    return e(format!(
                        "{at}.default_version: `{d}` is not a version of this API"
                    ))
                }
                Some(_) => {}
            },
        }
        if let Some(sb) = &a.sandbox {
            match env_of_listener(&sb.listener) {
                None => {
                    return e(format!(
                        "{at}.sandbox.listener: no listener named `{}`",
                        sb.listener
                    ))
                }
                Some(Environment::Production) => {
                    return e(format!(
                        "{at}.sandbox.listener: `{}` is a production listener (set `environment: sandbox` on it)",
                        sb.listener
                    ))
                }
                Some(Environment::Sandbox) => {}
            }
            match env_of_pool(&sb.pool) {
                None => return e(format!("{at}.sandbox.pool: no pool named `{}`", sb.pool)),
                Some(Environment::Production) => {
                    return e(format!(
                        "{at}.sandbox.pool: `{}` is a production pool; sandbox traffic never reaches production pools",
                        sb.pool
                    ))
                }
                Some(Environment::Sandbox) => {}
            }
        }
    }

    let mut out = Vec::with_capacity(routes.len() * 2);
    for r in &routes {
        let Some((ai, api)) = apis
            .iter()
            .enumerate()
            .find(|(_, a)| a.routes.iter().any(|n| n == &r.name))
        else {
            out.push(r.clone());
            continue;
        };
        for (vi, v) in api.versions.iter().enumerate() {
            let listener_env = env_of_listener(&r.listener).unwrap_or_default();
            let mut copies: Vec<(String, Option<&str>, Environment)> = Vec::new();
            // Draft versions never reach a production listener.
            if v.state != LifecycleState::Draft || listener_env == Environment::Sandbox {
                copies.push((r.listener.clone(), None, listener_env));
            }
            if let Some(sb) = &api.sandbox {
                if sb.listener != r.listener {
                    copies.push((
                        sb.listener.clone(),
                        Some(sb.pool.as_str()),
                        Environment::Sandbox,
                    ));
                }
            }
            for (listener, sandbox_pool, environment) in copies {
                let mut c = r.clone();
                c.name = match sandbox_pool {
                    None => format!("{}@{}", r.name, v.name),
                    Some(_) => format!("{}@{}.sandbox", r.name, v.name),
                };
                c.listener = listener;
                c.pool = match (sandbox_pool, &v.pool) {
                    (Some(p), _) => p.to_string(),
                    (None, Some(p)) => p.clone(),
                    (None, None) => r.pool.clone(),
                };
                let select = match api.versioning {
                    Versioning::Path => {
                        c.path_prefix = versioned_prefix(&v.name, &r.path_prefix);
                        c.upstream_prefix = Some(
                            r.upstream_prefix
                                .clone()
                                .unwrap_or_else(|| r.path_prefix.clone()),
                        );
                        VersionSelect::Path
                    }
                    Versioning::Header => VersionSelect::Header {
                        default: api.default_version.as_deref() == Some(v.name.as_str()),
                    },
                    Versioning::MediaType => VersionSelect::MediaType {
                        default: api.default_version.as_deref() == Some(v.name.as_str()),
                    },
                };
                let successor_link = v.successor.as_ref().map(|s| match api.versioning {
                    Versioning::Path => versioned_prefix(s, &r.path_prefix),
                    _ => r.path_prefix.clone(),
                });
                let docs = v.docs.clone().or_else(|| api.docs.clone());
                c.api = Some(Arc::new(ApiBinding::new(
                    &api.name,
                    &v.name,
                    (ai, vi),
                    r.name.clone(),
                    select,
                    Lifecycle {
                        state: v.state,
                        deprecated_at: v.deprecated_at,
                        sunset: v.sunset,
                        successor_link,
                        deprecation_link: v.deprecation_link.clone().or_else(|| docs.clone()),
                        sunset_link: docs,
                        preview_roles: v.preview_roles.clone(),
                    },
                    environment,
                )));
                out.push(c);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_parse_and_format() {
        assert_eq!(parse_time("1970-01-01"), Ok(0));
        assert_eq!(parse_time("1994-11-06T08:49:37Z"), Ok(784_111_777));
        assert_eq!(parse_time("1994-11-06T09:49:37+01:00"), Ok(784_111_777));
        assert_eq!(parse_time("1994-11-06T08:49:37.250Z"), Ok(784_111_777));
        assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(
            http_date(parse_time("2024-02-29").unwrap_or(0)),
            "Thu, 29 Feb 2024 00:00:00 GMT"
        );
        for bad in [
            "",
            "2024-02-30",
            "2023-02-29",
            "24-01-01",
            "2024-13-01",
            "2024-01-01T25:00:00Z",
            "2024-01-01T10:00:00",
            "2024-01-01 10:00:00Z",
            "2024-01-01T10:00:00+0100",
            "２０２４-01-01",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    fn lc(state: LifecycleState, dep: Option<i64>, sunset: Option<i64>) -> Lifecycle {
        Lifecycle {
            state,
            deprecated_at: dep,
            sunset,
            successor_link: Some("/v2/fhir".into()),
            deprecation_link: Some("https://dev.example.org/v1".into()),
            sunset_link: Some("https://dev.example.org/policy".into()),
            preview_roles: vec![],
        }
    }

    /// Under a controlled clock: a live version with dates becomes deprecated on its
    /// deprecation date and retired on its sunset date, with the headers of each state.
    #[test]
    fn the_lifecycle_moves_on_with_the_clock() {
        let dep = 1_000_000;
        let sunset = 2_000_000;
        let v = lc(LifecycleState::Live, Some(dep), Some(sunset));
        assert_eq!(v.evaluate(dep - 1), Effective::Live);
        assert_eq!(v.evaluate(dep), Effective::Deprecated);
        assert_eq!(v.evaluate(sunset - 1), Effective::Deprecated);
        assert_eq!(v.evaluate(sunset), Effective::Retired);
        let h = v.headers(Effective::Deprecated);
        assert_eq!(h[0], ("deprecation", format!("@{dep}")));
        assert_eq!(h[1], ("sunset", http_date(sunset)));
        assert_eq!(
            h[2].1,
            "<https://dev.example.org/v1>; rel=\"deprecation\"; type=\"text/html\", <https://dev.example.org/policy>; rel=\"sunset\"; type=\"text/html\", </v2/fhir>; rel=\"successor-version\""
        );
        // Announced before the date: a future Deprecation date is already sent.
        assert_eq!(
            v.headers(Effective::Live)[0],
            ("deprecation", format!("@{dep}"))
        );
        // Retired by hand: 410 whatever the dates.
        assert_eq!(
            lc(LifecycleState::Retired, None, None).evaluate(0),
            Effective::Retired
        );
        // A live version without dates sends nothing.
        assert!(lc(LifecycleState::Live, None, None)
            .headers(Effective::Live)
            .is_empty());
        assert_eq!(
            lc(LifecycleState::Draft, None, Some(sunset)).evaluate(sunset),
            Effective::Retired
        );
        assert_eq!(
            lc(LifecycleState::Preview, None, None).evaluate(0),
            Effective::Preview
        );
    }

    #[test]
    fn versions_are_read_from_the_header_or_the_media_type() {
        let mut h = http::HeaderMap::new();
        h.insert("api-version", http::HeaderValue::from_static(" v2 "));
        h.append(
            http::header::ACCEPT,
            http::HeaderValue::from_static(
                "text/html, application/fhir+json; fhirVersion=4.0; Version=\"v3\"",
            ),
        );
        let r = RequestedVersion::from_headers(&h);
        assert_eq!(r.header.as_deref(), Some("v2"));
        assert_eq!(r.media_type.as_deref(), Some("v3"));
        let none = RequestedVersion::from_headers(&http::HeaderMap::new());
        assert!(none.header.is_none() && none.media_type.is_none());
    }
}
