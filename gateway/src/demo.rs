//! `caregate demo`: the tour of the product. The demo config (`conf/demo.yaml`) is a sandbox
//! environment with its own sandbox issuer; this module keeps the demo's state folder (the
//! issuer's secret, the audit key, the audit trail and the access log), mints tokens for it
//! (`caregate demo token`), and prints the banner: ready-to-run requests, each with what it
//! should answer (`# expect: ...`), which a test runs one by one.

use crate::config::Loaded;
use std::path::{Path, PathBuf};

/// The environment variables `conf/demo.yaml` reads, set by `caregate demo` from its state.
pub const ENV_STATE: &str = "CAREGATE_DEMO_STATE";
pub const ENV_TOKEN_SECRET: &str = "CAREGATE_DEMO_TOKEN_SECRET";
pub const ENV_AUDIT_KEY: &str = "CAREGATE_DEMO_AUDIT_KEY";

/// The demo's default state folder (relative to where it runs: the repository root).
pub const DEFAULT_STATE_DIR: &str = "target/caregate-demo";

/// The demo's secrets, created once per state folder.
pub struct DemoState {
    pub dir: PathBuf,
    pub token_secret: String,
    pub audit_key: String,
}

fn random_secret() -> String {
    let a: u128 = rand::random();
    let b: u128 = rand::random();
    format!("{a:032x}{b:032x}")
}

fn read_or_create(path: &Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().len() >= 32 => Ok(s.trim().to_string()),
        Ok(_) | Err(_) => {
            let s = random_secret();
            write_private(path, &s)?;
            Ok(s)
        }
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    o.mode(0o600);
    let mut f = o
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

impl DemoState {
    /// Open (creating when needed) the state folder and its secrets.
    pub fn open(dir: &Path, create: bool) -> Result<DemoState, String> {
        if create {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        } else if !dir.join("token-secret").exists() {
            return Err(format!(
                "{} holds no demo state: start `caregate demo` first (with the same --state-dir)",
                dir.display()
            ));
        }
        Ok(DemoState {
            dir: dir.to_path_buf(),
            token_secret: read_or_create(&dir.join("token-secret"))?,
            audit_key: read_or_create(&dir.join("audit.key"))?,
        })
    }

    /// Set the variables the demo config reads (before the config is loaded, before any
    /// thread starts).
    pub fn export(&self) {
        let dir = std::path::absolute(&self.dir).unwrap_or_else(|_| self.dir.clone());
        std::env::set_var(ENV_STATE, dir);
        std::env::set_var(ENV_TOKEN_SECRET, &self.token_secret);
        std::env::set_var(ENV_AUDIT_KEY, &self.audit_key);
    }
}

/// `caregate demo token` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct TokenArgs {
    /// A patient context (a Patient id of the demo data): a patient app's token.
    #[arg(long)]
    pub patient: Option<String>,
    /// A role (repeat for several): a staff member's or a system's token.
    #[arg(long)]
    pub role: Vec<String>,
    /// The SMART scopes (space separated). Default: `patient/*.rs` with --patient, else
    /// `user/*.rs`.
    #[arg(long)]
    pub scope: Option<String>,
    /// The OAuth client id. Default `demo-patient-app` with --patient, else `demo-staff-app`.
    #[arg(long)]
    pub client_id: Option<String>,
    /// The subject. Default `demo-user`.
    #[arg(long, default_value = "demo-user")]
    pub subject: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub expires_in: u64,
}

/// The issuer and audience of the demo's sandbox issuer (`conf/demo.yaml`).
const DEMO_ISSUER: &str = "https://sandbox.caregate.invalid/demo";
const DEMO_AUDIENCE: &str = "caregate-demo";

/// A signed token of the demo's sandbox issuer.
pub fn mint(state: &DemoState, a: &TokenArgs) -> Result<String, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let scope = a.scope.clone().unwrap_or_else(|| {
        if a.patient.is_some() {
            "launch/patient openid fhirUser patient/*.rs".into()
        } else {
            "openid fhirUser user/*.rs".into()
        }
    });
    let client_id = a.client_id.clone().unwrap_or_else(|| {
        if a.patient.is_some() {
            "demo-patient-app".into()
        } else {
            "demo-staff-app".into()
        }
    });
    let mut claims = serde_json::json!({
        "iss": DEMO_ISSUER,
        "aud": DEMO_AUDIENCE,
        "sub": a.subject,
        "client_id": client_id,
        "scope": scope,
        "iat": now,
        "exp": now + a.expires_in.max(1),
    });
    if let Some(p) = &a.patient {
        claims["patient"] = serde_json::Value::String(p.clone());
    }
    if !a.role.is_empty() {
        claims["roles"] = serde_json::json!(a.role);
    }
    let key = jsonwebtoken::EncodingKey::from_secret(state.token_secret.as_bytes())
        .map_err(|e| format!("cannot use the demo secret: {e}"))?;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &key,
    )
    .map_err(|e| format!("cannot sign the token: {e}"))
}

/// The Patient ids of the demo data (in file-name order), each with the id of one of that
/// patient's Observations.
fn patient_ids(dir: &Path) -> Vec<(String, String)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut ids = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        let entries = v
            .get("entry")
            .and_then(|e| e.as_array())
            .cloned()
            .unwrap_or_default();
        let of_type = |t: &str| {
            entries
                .iter()
                .map(|e| &e["resource"])
                .find(|r| r["resourceType"] == t)
                .and_then(|r| r["id"].as_str())
                .map(str::to_string)
        };
        if let (Some(p), Some(o)) = (of_type("Patient"), of_type("Observation")) {
            ids.push((p, o));
        }
    }
    ids
}

/// How the banner names this program: relative to the working folder when it can.
fn program() -> String {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("caregate"));
    let cwd = std::env::current_dir().unwrap_or_default();
    match exe.strip_prefix(&cwd) {
        Ok(rel) => format!("./{}", rel.display()),
        Err(_) => exe.display().to_string(),
    }
}

/// The banner: ready-to-run requests against the running demo, each line ending with what it
/// answers (`# expect: TEXT`: the line's output contains TEXT).
pub fn banner(loaded: &Loaded, state_dir: &Path) -> String {
    let cfg = &loaded.config;
    let addr = |name: &str, default: &str| {
        cfg.listeners
            .iter()
            .find(|l| l.name == name)
            .map(|l| l.listen.to_string())
            .unwrap_or_else(|| default.into())
    };
    let public = addr("public", "127.0.0.1:8080");
    let internal = addr("internal", "127.0.0.1:8081");
    let admin = cfg.admin.listen.to_string();
    let zone_a = cfg
        .sandboxes
        .first()
        .map(|s| s.name.clone())
        .unwrap_or_default();
    let data = cfg
        .sandboxes
        .first()
        .map(|s| loaded.resolve(&s.data_dir))
        .unwrap_or_default();
    let ids = patient_ids(&data);
    let p1 = ids.first().map(|x| x.0.clone()).unwrap_or_default();
    let p2 = ids.get(1).map(|x| x.0.clone()).unwrap_or_default();
    let o2 = ids.get(1).map(|x| x.1.clone()).unwrap_or_default();
    let exe = program();
    let sd = if state_dir == Path::new(DEFAULT_STATE_DIR) {
        String::new()
    } else {
        format!(" --state-dir {}", state_dir.display())
    };
    let state = state_dir.display();
    let portal = cfg
        .portal
        .as_ref()
        .map(|p| p.path_prefix.trim_end_matches('/').to_string())
        .unwrap_or_else(|| "/developer".into());
    let code = "-o /dev/null -w '%{http_code}\\n'";
    format!(
        r#"
caregate demo: a sandbox environment. The gateway fronts two sandbox FHIR servers (zone-a
preferred, zone-b standby) holding synthetic Synthea patients; tokens come from the demo's
sandbox issuer. Try, in another terminal, from this folder (each line says what it answers):

  # tokens from the sandbox issuer: a patient app (patient {p1}), a narrower one, billing staff
  PATIENT=$({exe} demo token{sd} --patient {p1})
  NARROW=$({exe} demo token{sd} --patient {p1} --scope 'patient/Observation.rs')
  BILLING=$({exe} demo token{sd} --role billing --scope 'user/Patient.rs')
  CLINICIAN=$({exe} demo token{sd} --role clinician)

  # the patient app reads its own record; another patient's Observation (found only in the
  # backend's answer) is a clean 404, and asking for another Patient by id is refused outright
  curl -s {code} -H "Authorization: Bearer $PATIENT" http://{public}/v2/fhir/Patient/{p1}   # expect: 200
  curl -s {code} -H "Authorization: Bearer $PATIENT" http://{public}/v2/fhir/Observation/{o2}   # expect: 404
  curl -s -H "Authorization: Bearer $PATIENT" http://{public}/v2/fhir/Patient/{p2}   # expect: patient_compartment
  # its searches (scoped to its patient) page through the gateway: the links name this version's base
  curl -s -H "Authorization: Bearer $PATIENT" 'http://{public}/v2/fhir/Observation?patient={p1}&_count=2' | grep -o '"relation":"next","url":"[^"]*' | head -n 1   # expect: http://{public}/v2/fhir/Observation
  # no token, and a token whose scopes do not cover Patient
  curl -s {code} http://{public}/v2/fhir/Patient/{p1}   # expect: 401
  curl -s -H "Authorization: Bearer $NARROW" http://{public}/v2/fhir/Patient/{p1}   # expect: insufficient_scope

  # billing staff get the Patient masked: no telecom, name redacted, birth year only, labelled REDACTED
  curl -s -H "Authorization: Bearer $BILLING" http://{public}/v2/fhir/Patient/{p1} | grep -o '"code":"REDACTED"'   # expect: REDACTED

  # API versions: v1 is deprecated (Deprecation, Sunset and Link headers), v0 is retired (410),
  # v3 is a draft (served here, in the sandbox, and on no production listener)
  curl -s -D - -o /dev/null -H "Authorization: Bearer $PATIENT" http://{public}/v1/fhir/Patient/{p1} | grep -iE '^(deprecation|sunset|link):'   # expect: successor-version
  curl -s -H "Authorization: Bearer $PATIENT" http://{public}/v0/fhir/Patient/{p1}   # expect: api_sunset
  curl -s {code} -H "Authorization: Bearer $PATIENT" http://{public}/v3/fhir/Patient/{p1}   # expect: 200
  {exe} usage {state}/access.jsonl   # expect: demo-patient-app

  # the EHR API on the internal listener, versioned by header (API-Version: r4 is the default)
  curl -s {code} -H "Authorization: Bearer $CLINICIAN" -H 'API-Version: r4' 'http://{internal}/internal/fhir/Patient?_count=1'   # expect: 200
  curl -s {code} -H "Authorization: Bearer $PATIENT" 'http://{internal}/internal/fhir/Patient?_count=1'   # expect: 403

  # the developer portal: open http://{public}{portal}/ in a browser (Redoc, served offline)
  curl -s {code} http://{public}{portal}/   # expect: 200
  curl -s http://{public}{portal}/openapi.json | head -c 120; echo   # expect: 3.1.0

  # take zone-a down: its sandbox closes its socket; traffic fails over to zone-b
  curl -s -X POST http://{admin}/sandbox/{zone_a}/outage   # expect: sandbox down
  for i in 1 2 3 4 5 6; do curl -s {code} -H "Authorization: Bearer $PATIENT" http://{public}/v2/fhir/Patient/{p1}; done | tail -n 1   # expect: 200
  curl -s http://{admin}/metrics | grep -E '^caregate_upstream_failovers_total'   # expect: caregate_upstream_failovers_total
  curl -s -X POST http://{admin}/sandbox/{zone_a}/restore   # expect: sandbox restored

  # every request above on a PHI route is in the demo's tamper-evident audit trail
  CAREGATE_AUDIT_KEY="$(cat {state}/audit.key)" {exe} audit verify {state}/audit.jsonl   # expect: : ok

Stop with Ctrl-C.
"#
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn state_is_created_once_and_tokens_verify() {
        let dir =
            std::env::temp_dir().join(format!("caregate-demo-test-{}", rand::random::<u64>()));
        assert!(DemoState::open(&dir, false).is_err());
        let s = DemoState::open(&dir, true).unwrap();
        let again = DemoState::open(&dir, false).unwrap();
        assert_eq!(s.token_secret, again.token_secret);
        assert_eq!(s.audit_key, again.audit_key);
        assert!(s.token_secret.len() >= 64 && s.token_secret != s.audit_key);
        let t = mint(
            &s,
            &TokenArgs {
                patient: Some("p-1".into()),
                role: vec![],
                scope: None,
                client_id: None,
                subject: "u".into(),
                expires_in: 60,
            },
        )
        .unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.set_audience(&[DEMO_AUDIENCE]);
        v.set_issuer(&[DEMO_ISSUER]);
        let d = jsonwebtoken::decode::<serde_json::Value>(
            &t,
            &jsonwebtoken::DecodingKey::from_secret(s.token_secret.as_bytes()).unwrap(),
            &v,
        )
        .unwrap();
        assert_eq!(d.claims["patient"], "p-1");
        assert_eq!(d.claims["client_id"], "demo-patient-app");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
