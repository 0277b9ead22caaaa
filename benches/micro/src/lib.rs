//! Shared fixtures of caregate's criterion micro-benchmarks (`benches/*.rs`; see README.md).
//!
//! Everything here goes through the public APIs of the workspace crates only.
#![forbid(unsafe_code)]

/// The gateway binary's allocator (gateway/src/main.rs), so allocation-heavy paths cost here
/// what they cost there. `--features system_alloc` measures with the system allocator instead.
#[cfg(not(feature = "system_alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use caregate_filters::builtin::jwt_auth::AuthConfig;
use caregate_filters::identity::{AuthMethod, Principal, TenantConfig};
use caregate_filters::{Channel, RequestCtx, RequestHeader};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Whether criterion runs in test mode (`cargo test --benches` / `--all-targets`, where each
/// benchmark runs once in a debug build, or `cargo bench -- --test`): fixtures that are costly to
/// make (thousands of RSA-signed tokens) are then made small.
pub fn test_mode() -> bool {
    let mut bench = false;
    for a in std::env::args() {
        match a.as_str() {
            "--test" => return true,
            "--bench" => bench = true,
            _ => {}
        }
    }
    !bench
}

/// A fresh tokio current-thread runtime (the filter hooks are async).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a current-thread tokio runtime")
}

/// The synthetic patient of the recorded requests (the one in `benches/data/searchset-70k.json`).
pub const PATIENT_ID: &str = "ee9f8dd8-72d2-4769-8020-89e504b1504b";
/// The tenant of the recorded requests, selected by [`TENANT_HOST`].
pub const TENANT: &str = "hospital-a";
pub const TENANT_HOST: &str = "a.example.org";
/// The SMART scopes of the patient-facing app's tokens.
pub const APP_SCOPES: &str =
    "launch/patient openid fhirUser patient/Patient.r patient/Observation.rs patient/Condition.rs";

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Tokens and key sets as `filters/src/builtin/jwt_auth/tests.rs` makes them: RS256 (2048-bit
/// test key `rsa1` of `filters/tests/keys`), JWKS file `jwks-all.json`.
pub mod jwt {
    use super::*;

    pub const ISS: &str = "https://idp.example.org";
    pub const AUD: &str = "https://gateway.test/fhir";

    pub fn keys_dir() -> PathBuf {
        repo_root().join("filters/tests/keys")
    }

    /// The organisation-wide `auth:` section: one RS256 issuer with a JWKS file, and a
    /// verified-token cache of `cache_entries` entries (0 turns the cache off).
    pub fn auth_config(cache_entries: usize) -> AuthConfig {
        let yaml = format!(
            r#"
issuers:
  - name: idp
    issuer: "{ISS}"
    jwks_file: "{jwks}"
    algorithms: [RS256]
    audiences: ["{AUD}"]
    leeway_seconds: 30
    claims: {{ roles: realm_access.roles, patient: patient }}
token_cache: {{ max_entries: {cache_entries}, max_bytes: 67108864 }}
"#,
            jwks = keys_dir().join("jwks-all.json").display()
        );
        serde_yaml::from_str(&yaml).expect("the bench auth config parses")
    }

    /// Signs RS256 access tokens for the patient-facing app.
    pub struct Minter {
        key: EncodingKey,
        header: Header,
    }

    impl Default for Minter {
        fn default() -> Self {
            Self::new()
        }
    }

    impl Minter {
        pub fn new() -> Self {
            let pem = std::fs::read(keys_dir().join("rsa1.pem"))
                .expect("read filters/tests/keys/rsa1.pem (the RS256 test key)");
            let key = EncodingKey::from_rsa_pem(&pem).expect("rsa1.pem is an RSA private key");
            let mut header = Header::new(Algorithm::RS256);
            header.kid = Some("rsa1".into());
            header.typ = Some("at+jwt".into());
            Minter { key, header }
        }

        /// A token for the demo patient; `n` makes it unique (`jti`). Valid for a day.
        pub fn mint(&self, n: u64) -> String {
            let now = now();
            let claims = serde_json::json!({
                "iss": ISS, "aud": AUD, "sub": "portal-user-7", "exp": now + 86_400,
                "iat": now - 10, "jti": format!("bench-{n}"), "client_id": "patient-portal",
                "realm_access": {"roles": ["patient"]}, "scope": APP_SCOPES,
                "tenant": TENANT, "patient": PATIENT_ID, "fhirUser": format!("Patient/{PATIENT_ID}"),
            });
            jsonwebtoken::encode(&self.header, &claims, &self.key).expect("sign a bench token")
        }
    }

    /// The value of `caregate_token_cache_total{result="<result>"}` in the default registry.
    pub fn token_cache_count(result: &str) -> u64 {
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&prometheus::gather())
            .expect("encode the default prometheus registry");
        let prefix = format!("caregate_token_cache_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .map(|v| v.trim().parse::<f64>().unwrap_or(0.0) as u64)
            .unwrap_or(0)
    }
}

/// The recorded request `GET /fhir/Observation?patient=<id>&category=laboratory` of the
/// patient-facing app, with the headers such an app sends.
pub fn recorded_request(token: Option<&str>) -> RequestHeader {
    let uri = format!("/fhir/Observation?patient={PATIENT_ID}&category=laboratory");
    let mut r =
        RequestHeader::build("GET", uri.as_bytes(), None).expect("build the recorded request");
    let mut add = |k: &'static str, v: String| {
        r.insert_header(k, v).expect("a valid recorded header");
    };
    add("host", TENANT_HOST.to_string());
    add("accept", "application/fhir+json".to_string());
    add("user-agent", "PatientPortal/4.2 (iOS 17.4)".to_string());
    add("accept-language", "en-US,en;q=0.9".to_string());
    add(
        "x-request-id",
        "0f8e6c1a-4b7d-4e2f-9a3c-5d6e7f8a9b0c".to_string(),
    );
    if let Some(t) = token {
        add("authorization", format!("Bearer {t}"));
    }
    r
}

/// A request context as the gateway fills it before the route's filters run (request id,
/// listener, channel, route, client, method, normalised path, query).
pub fn request_ctx(method: &str, path: &str, query: &str) -> RequestCtx {
    let mut ctx = RequestCtx::new(Arc::from("public"), Channel::Public);
    ctx.host().request_id = "0f8e6c1a-4b7d-4e2f-9a3c-5d6e7f8a9b0c".into();
    ctx.host().route = Some(Arc::from("patient-fhir"));
    ctx.host().fhir_route = true;
    ctx.host().client_addr = Some(std::net::IpAddr::from([203, 0, 113, 7]));
    ctx.host().method = method.into();
    ctx.host().path = path.into();
    ctx.host().query = query.into();
    ctx
}

/// The principal `jwt_auth` writes for the app's token.
pub fn app_principal() -> Principal {
    Principal {
        subject: "portal-user-7".into(),
        issuer: Some(jwt::ISS.into()),
        client_id: Some("patient-portal".into()),
        roles: vec!["patient".into()],
        scopes: APP_SCOPES.split(' ').map(str::to_string).collect(),
        tenant: Some(TENANT.into()),
        patient: Some(PATIENT_ID.into()),
        fhir_user: Some(format!("Patient/{PATIENT_ID}")),
        method: AuthMethod::Token,
        system: None,
        expires_at: Some(now() + 3600),
    }
}

/// Two hospitals of the organisation (`tenants:`); the recorded request's host selects the first.
pub fn tenants() -> Vec<TenantConfig> {
    vec![
        TenantConfig {
            id: TENANT.into(),
            hosts: vec![TENANT_HOST.into()],
            path_prefix: Some("/hospital-a".into()),
            issuers: vec![jwt::ISS.into()],
            pool: None,
        },
        TenantConfig {
            id: "hospital-b".into(),
            hosts: vec!["b.example.org".into()],
            path_prefix: Some("/hospital-b".into()),
            issuers: vec![],
            pool: None,
        },
    ]
}

/// The masking profile of the benches (the `fhir_mask` documentation's example): Patient
/// telecom removed, name redacted, address reduced to state and postal code, birth date to the
/// year, identifier values to their last 4 characters.
pub const MASK_RULES_YAML: &str = "\
Patient:
  - { path: telecom, action: remove }
  - { path: name, action: redact }
  - { path: address, action: { keep_only: [state, postalCode] } }
  - { path: birthDate, action: year }
  - { path: identifier.value, action: { last_chars: 4 } }
";

/// The rules of [`MASK_RULES_YAML`] for the `caregate-mask` engine.
pub fn mask_rules() -> caregate_mask::MaskRules {
    let resources: serde_yaml::Value =
        serde_yaml::from_str(MASK_RULES_YAML).expect("MASK_RULES_YAML is YAML");
    let json = serde_json::to_value(resources).expect("mask rules as JSON");
    caregate_mask::MaskRules {
        resources: serde_json::from_value(json).expect("valid mask rules"),
    }
}

/// The Synthea transaction Bundles of the demo (`conf/demo/data/*.json`), by file stem, sorted.
pub fn synthea_bundles() -> Vec<(String, Vec<u8>)> {
    let dir = repo_root().join("conf/demo/data");
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("read conf/demo/data")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let name = p
                .file_stem()
                .and_then(|s| s.to_str())
                .map(|s| s.split('_').take(2).collect::<Vec<_>>().join("_"))
                .unwrap_or_default();
            let body = std::fs::read(&p).expect("read a Synthea bundle");
            (name, body)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        !out.is_empty(),
        "no Synthea bundles found in {}",
        dir.display()
    );
    out
}

/// Route tables like the gateway builds them (`gateway/src/router.rs`).
pub mod routes {
    use caregate::router::Route;
    use caregate_filters::Filter;
    use std::sync::Arc;

    pub fn route(
        name: &str,
        hosts: &[&str],
        prefix: &str,
        methods: &[&str],
        fhir: bool,
    ) -> Arc<Route> {
        route_with(name, hosts, prefix, methods, fhir, vec![])
    }

    /// A route with its filter chain.
    pub fn route_with(
        name: &str,
        hosts: &[&str],
        prefix: &str,
        methods: &[&str],
        fhir: bool,
        filters: Vec<Arc<dyn Filter>>,
    ) -> Arc<Route> {
        Arc::new(Route {
            name: Arc::from(name),
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
            path_prefix: prefix.to_string(),
            methods: methods.iter().map(|s| s.to_string()).collect(),
            fhir,
            phi: fhir,
            pool: 0,
            hl7: false,
            upstream_prefix: None,
            filters,
            api: None,
            portal: false,
        })
    }

    /// Ten routes of a typical deployment (no catch-all `/`, so a miss scans them all).
    pub fn ten_routes() -> Vec<Arc<Route>> {
        ten_routes_with_chain(vec![])
    }

    /// [`ten_routes`], the `patient-fhir` route (`/fhir`) running `chain`.
    pub fn ten_routes_with_chain(chain: Vec<Arc<dyn Filter>>) -> Vec<Arc<Route>> {
        vec![
            route_with(
                "patient-fhir",
                &[],
                "/fhir",
                &["GET", "POST", "OPTIONS"],
                true,
                chain,
            ),
            route("ehr-fhir", &[], "/internal/fhir", &[], true),
            route("fhir-admin", &[], "/fhir/admin", &["GET"], true),
            route("smart-config", &[], "/fhir/.well-known", &["GET"], false),
            route("auth", &[], "/auth", &["GET", "POST"], false),
            route("portal-a", &["a.example.org"], "/portal", &["GET"], false),
            route("portal-b", &["b.example.org"], "/portal", &["GET"], false),
            route("billing", &[], "/api/v1/billing", &["GET", "POST"], false),
            route("lab", &[], "/lab/hl7", &["POST"], false),
            route("health", &[], "/healthz", &["GET"], false),
        ]
    }

    /// The ten routes plus 990 more whose prefixes are all longer than `/fhir`, so (longest
    /// prefix first) a `/fhir/...` request is matched only after them.
    ///
    /// `spread_over_hosts == false`: the 990 are host-less (per-service and per-partner
    /// prefixes), the worst case for a scan. `true`: each names one of 99 hospital hosts
    /// (`h0.example.org` .. `h98.example.org`; ten routes each), none of them the request's.
    pub fn thousand_routes(spread_over_hosts: bool) -> Vec<Arc<Route>> {
        let mut v = ten_routes();
        for i in 0..990 {
            let host = format!("h{}.example.org", i % 99);
            let hosts: Vec<&str> = if spread_over_hosts {
                vec![host.as_str()]
            } else {
                vec![]
            };
            let prefix = match i % 3 {
                0 => format!("/tenant-{i:03}/fhir"),
                1 => format!("/api/v{}/svc-{i:03}", i % 4),
                _ => format!("/partner/{i:03}/hl7"),
            };
            v.push(route(
                &format!("r{i}"),
                &hosts,
                &prefix,
                &["GET", "POST"],
                i % 2 == 0,
            ));
        }
        v
    }
}
