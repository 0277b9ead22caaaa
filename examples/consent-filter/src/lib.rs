//! `consent`: refuse access to a patient's data when that patient has opted out of sharing it
//! with the caller's organisation.
//!
//! ```yaml
//! - kind: consent
//!   config:
//!     opt_outs: opt-outs.csv       # `patient_id,organisation` lines; relative to the config file
//!     organisation: tenant_claim   # tenant_claim (default) | tenant | client_id
//!     unnamed_patient: allow       # allow (default) | refuse
//!     reload_ms: 1000              # how often the file's modification time is checked
//!     mode: enforce                # enforce | shadow | off
//! ```
//!
//! The patients a request touches are the ones it names — the `Patient` it reads or changes,
//! the Patient compartment it searches, the patients its parameters reference — and the
//! caller's patient context. When one of them opted out for the caller's organisation (or for
//! every organisation, `*`), the request is refused with `403 consent_refused`; the reply names
//! no patient.

use async_trait::async_trait;
use caregate_fhir::{FhirRequest, Interaction, PatientCompartment};
use caregate_filter_api::ctx::Writer;
use caregate_filter_api::identity::{Principal, Tenant};
use caregate_filter_api::{
    parse_config, BackgroundTask, BuildContext, BuildError, Capability, Decision, Declaration,
    Filter, FilterError, LocalReply, Mode, RequestCtx, RequestHeader, Result,
};
use http::StatusCode;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

/// The kind, as written in config (`kind: consent`) and registered on the builder.
pub const KIND: &str = "consent";

/// The stable reason code of every refusal: what clients, metrics and the audit trail key on.
pub const REASON: &str = "consent_refused";

/// What the filter provides to the filters after it: the request's patients consented.
pub const CONSENT: Capability = Capability::Custom("consent");

/// The typed config: strict, so a typo is an error that names its place.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentConfig {
    /// The opt-outs: a CSV file of `patient_id,organisation` lines (`*` as the organisation:
    /// every organisation). Blank lines, `#` comments and a `patient_id,organisation` header
    /// are skipped. Relative to the config file's folder.
    pub opt_outs: PathBuf,
    /// Where the caller's organisation comes from.
    #[serde(default)]
    pub organisation: OrganisationFrom,
    /// What to do with a request to patient data that names no patient (a search across
    /// patients, a read of an `Observation` by id): its patients are known only from the
    /// response, which this filter does not read.
    #[serde(default)]
    pub unnamed_patient: Unnamed,
    /// How often the background task checks the file's modification time, in milliseconds.
    #[serde(default = "default_reload_ms")]
    pub reload_ms: u64,
    #[serde(default)]
    pub mode: Mode,
}

fn default_reload_ms() -> u64 {
    1000
}

/// Where the caller's organisation comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrganisationFrom {
    /// The verified token's tenant claim (`Principal::tenant`).
    #[default]
    TenantClaim,
    /// The verified tenant of the request (the `tenant` filter's `Tenant` fact); the chain must
    /// run `tenant` first.
    Tenant,
    /// The OAuth client the token was issued to (`Principal::client_id`).
    ClientId,
}

/// What to do with a request to patient data that names no patient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unnamed {
    /// Let it through: consent is checked where the request names its patient.
    #[default]
    Allow,
    /// Refuse it (`403 consent_refused`): callers must name the patient.
    Refuse,
}

/// The opt-outs read from one file: for each patient, the organisations it opted out for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OptOuts {
    by_patient: HashMap<String, HashSet<String>>,
    len: usize,
}

impl OptOuts {
    /// Parse the file's text. An error names the line, never its content (a patient id).
    pub fn parse(text: &str) -> std::result::Result<OptOuts, String> {
        let mut out = OptOuts::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line == "patient_id,organisation" {
                continue;
            }
            let mut fields = line.split(',').map(str::trim);
            match (fields.next(), fields.next(), fields.next()) {
                (Some(patient), Some(org), None) if !patient.is_empty() && !org.is_empty() => {
                    let orgs = out.by_patient.entry(patient.to_string()).or_default();
                    if orgs.insert(org.to_string()) {
                        out.len += 1;
                    }
                }
                _ => {
                    return Err(format!(
                        "line {}: expected `patient_id,organisation`",
                        n + 1
                    ))
                }
            }
        }
        Ok(out)
    }

    /// Read and parse the file at `path`.
    pub fn load(path: &Path) -> std::result::Result<OptOuts, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        OptOuts::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Whether `patient` opted out for `organisation` (or for every organisation).
    pub fn refuses(&self, patient: &str, organisation: &str) -> bool {
        self.by_patient
            .get(patient)
            .is_some_and(|orgs| orgs.contains(organisation) || orgs.contains("*"))
    }

    /// How many (patient, organisation) opt-outs the list holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The file's modification time and length: a change of either means "read it again".
type Stamp = (SystemTime, u64);

fn stamp_of(path: &Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    Ok((m.modified()?, m.len()))
}

/// The opt-out list in force, shared by the filter (which reads it on every request) and its
/// background task (which replaces it when the file changes).
pub struct OptOutList {
    path: PathBuf,
    current: RwLock<Arc<OptOuts>>,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    /// The stamp of the file the current list was read from.
    stamp: Option<Stamp>,
    /// The last failure logged, so a file that stays broken is logged once.
    failing: Option<String>,
}

/// What one [`OptOutList::refresh`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refresh {
    /// The file did not change.
    Unchanged,
    /// The file changed and was read: the new list holds this many opt-outs.
    Reloaded(usize),
    /// The file could not be read or parsed: the last good list stays in force.
    Failed(String),
}

impl OptOutList {
    /// Read the file at `path`: a missing or malformed file is an error (the filter is not
    /// built, so `check` refuses the config and the gateway does not start).
    pub fn open(path: PathBuf) -> std::result::Result<OptOutList, String> {
        let stamp = stamp_of(&path).ok();
        let list = OptOuts::load(&path)?;
        Ok(OptOutList {
            path,
            current: RwLock::new(Arc::new(list)),
            seen: Mutex::new(Seen {
                stamp,
                failing: None,
            }),
        })
    }

    /// The list in force.
    pub fn current(&self) -> Arc<OptOuts> {
        match self.current.read() {
            Ok(list) => Arc::clone(&list),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Read the file again if its modification time or length changed. A file that cannot be
    /// read or parsed leaves the last good list in force and is logged (its path and the line
    /// number, never its content).
    pub fn refresh(&self) -> Refresh {
        let mut seen = match self.seen.lock() {
            Ok(seen) => seen,
            Err(poisoned) => poisoned.into_inner(),
        };
        let loaded = stamp_of(&self.path)
            .map_err(|e| format!("cannot read {}: {e}", self.path.display()))
            .and_then(|stamp| {
                if seen.stamp == Some(stamp) {
                    return Ok(None);
                }
                let list = OptOuts::load(&self.path)?;
                Ok(Some((stamp, list)))
            });
        match loaded {
            Ok(None) => Refresh::Unchanged,
            Ok(Some((stamp, list))) => {
                // A file that changed while it was read is read again on the next refresh.
                seen.stamp = (stamp_of(&self.path).ok() == Some(stamp)).then_some(stamp);
                seen.failing = None;
                let n = list.len();
                match self.current.write() {
                    Ok(mut current) => *current = Arc::new(list),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(list),
                }
                log::info!("consent: {n} opt-outs loaded from {}", self.path.display());
                Refresh::Reloaded(n)
            }
            Err(e) => {
                if seen.failing.as_deref() != Some(e.as_str()) {
                    log::warn!(
                        "consent: {e}; keeping the last good list ({} opt-outs)",
                        self.current().len()
                    );
                    seen.failing = Some(e.clone());
                }
                // Read it again once it is back, even with the same stamp.
                seen.stamp = None;
                Refresh::Failed(e)
            }
        }
    }
}

/// The background task that keeps the list in step with the file. The gateway runs it while the
/// filter's configuration is in force: until a reload retires it, or the process stops.
pub struct OptOutWatcher {
    list: Arc<OptOutList>,
    every: Duration,
}

#[async_trait]
impl BackgroundTask for OptOutWatcher {
    async fn run(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // File IO off the async threads.
                    let list = Arc::clone(&self.list);
                    let _ = tokio::task::spawn_blocking(move || list.refresh()).await;
                }
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
            }
        }
    }
}

/// The writer of the consent filter's facts: a type, so a misspelt writer does not compile.
pub struct Consent;

impl Writer for Consent {
    const NAME: &'static str = KIND;
}

/// The fact the filter writes when it lets a request through: whose consent it checked, for
/// which organisation. Later filters read it with `ctx.facts.get::<ConsentChecked>()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentChecked {
    /// The caller's organisation, as configured (`organisation:`).
    pub organisation: String,
    /// The patients the request names (none for a request that names none).
    pub patients: Vec<String>,
}

/// The `consent` filter: built once per configured filter, immutable; per-request state lives
/// in the request's ctx only.
pub struct ConsentFilter {
    list: Arc<OptOutList>,
    watcher: Arc<OptOutWatcher>,
    organisation: OrganisationFrom,
    unnamed: Unnamed,
    mode: Mode,
}

impl ConsentFilter {
    /// Build the filter from its config; relative paths resolve against the config file's
    /// folder (`cx.resolve`).
    pub fn new(
        config: ConsentConfig,
        cx: &BuildContext,
    ) -> std::result::Result<ConsentFilter, BuildError> {
        if config.reload_ms < 10 {
            return Err(BuildError::new("config.reload_ms", "must be at least 10"));
        }
        let list = OptOutList::open(cx.resolve(&config.opt_outs))
            .map_err(|e| BuildError::new("config.opt_outs", e))?;
        let list = Arc::new(list);
        Ok(ConsentFilter {
            watcher: Arc::new(OptOutWatcher {
                list: Arc::clone(&list),
                every: Duration::from_millis(config.reload_ms),
            }),
            list,
            organisation: config.organisation,
            unnamed: config.unnamed_patient,
            mode: config.mode,
        })
    }

    /// The opt-out list the filter reads.
    pub fn opt_outs(&self) -> &Arc<OptOutList> {
        &self.list
    }
}

/// The kind's builder, registered with `.filter_kind("consent", consent_filter::build)`.
pub fn build(
    config: serde_yaml::Value,
    cx: &BuildContext,
) -> std::result::Result<Arc<dyn Filter>, BuildError> {
    let config: ConsentConfig = parse_config(config)?;
    Ok(Arc::new(ConsentFilter::new(config, cx)?))
}

fn refuse(detail: &'static str) -> Decision {
    Decision::Respond(LocalReply::error(StatusCode::FORBIDDEN, REASON, detail))
}

/// Its needs when the organisation comes from the verified caller, and when it comes from the
/// verified tenant.
const FROM_CALLER: Declaration = Declaration::new()
    .needs(&[Capability::Principal, Capability::Classification])
    .provides(&[CONSENT])
    .once()
    .confining();
const FROM_TENANT: Declaration = Declaration::new()
    .needs(&[
        Capability::Principal,
        Capability::Classification,
        Capability::Tenant,
    ])
    .provides(&[CONSENT])
    .once()
    .confining();

#[async_trait]
impl Filter for ConsentFilter {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn mode(&self) -> Mode {
        self.mode
    }

    fn declaration(&self) -> Declaration {
        match self.organisation {
            OrganisationFrom::Tenant => FROM_TENANT,
            OrganisationFrom::TenantClaim | OrganisationFrom::ClientId => FROM_CALLER,
        }
    }

    fn background(&self) -> Option<Arc<dyn BackgroundTask>> {
        Some(self.watcher.clone())
    }

    async fn request_filter(
        &self,
        _req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        // `check` refuses a chain without the classification; at run time, fail closed.
        let Some(class) = ctx.facts.get::<FhirRequest>() else {
            return Ok(refuse("the request was not classified as FHIR"));
        };
        let context = ctx
            .facts
            .get::<Principal>()
            .and_then(|p| p.patient.as_deref());
        let patients = patients_of(class, context);
        if patients.is_empty() {
            if !touches_patient_data(class) {
                return Ok(Decision::Continue);
            }
            if self.unnamed == Unnamed::Refuse {
                return Ok(refuse(
                    "the request names no patient, so consent cannot be checked",
                ));
            }
        }
        let Some(principal) = ctx.facts.get::<Principal>() else {
            return Ok(refuse("consent needs a verified caller"));
        };
        let organisation = match self.organisation {
            OrganisationFrom::TenantClaim => principal.tenant.clone(),
            OrganisationFrom::ClientId => principal.client_id.clone(),
            OrganisationFrom::Tenant => ctx.facts.get::<Tenant>().map(|t| t.id.clone()),
        };
        let Some(organisation) = organisation else {
            return Ok(refuse(
                "the caller's organisation is unknown, so consent cannot be checked",
            ));
        };
        let opt_outs = self.list.current();
        if patients.iter().any(|p| opt_outs.refuses(p, &organisation)) {
            return Ok(refuse(
                "the patient has not consented to sharing with the caller's organisation",
            ));
        }
        ctx.facts
            .insert(
                Consent,
                ConsentChecked {
                    organisation,
                    patients,
                },
            )
            .map_err(|e| FilterError {
                filter: KIND,
                message: e.to_string(),
            })?;
        Ok(Decision::Continue)
    }
}

/// The patients a classified request names, and the caller's patient context. Bare ids count
/// where the parameter can only name a patient (`patient`, `Patient?_id`, `:Patient`) or may
/// (the type's Patient compartment links, e.g. `subject`): a false match only refuses more.
pub fn patients_of(class: &FhirRequest, context: Option<&str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |id: &str| {
        if !id.is_empty() && !out.iter().any(|p| p == id) {
            out.push(id.to_string());
        }
    };
    if let Some(p) = context {
        add(p);
    }
    let on_patient = class.resource_type.as_deref() == Some("Patient");
    if on_patient {
        if let Some(id) = &class.id {
            add(id);
        }
    }
    if let Some((compartment, id)) = &class.compartment {
        if compartment == "Patient" {
            add(id);
        }
    }
    let links = class
        .resource_type
        .as_deref()
        .map(PatientCompartment::params_for)
        .unwrap_or(&[]);
    for p in &class.params {
        if !p.chain.is_empty() {
            // `subject:Patient.name=...` names no id.
            continue;
        }
        let bare_is_patient = p.name == "patient"
            || (on_patient && p.name == "_id")
            || p.modifier.as_deref() == Some("Patient")
            || links.contains(&p.name);
        for v in &p.values {
            match patient_reference(v) {
                Some(id) => add(id),
                None if bare_is_patient && !v.contains('/') => add(v),
                None => {}
            }
        }
    }
    out
}

/// Whether a request may return or change patient data: anything but the capability statement
/// and types outside the Patient compartment (`Practitioner`, `Organization`, ...).
pub fn touches_patient_data(class: &FhirRequest) -> bool {
    if class.interaction == Interaction::Capabilities {
        return false;
    }
    match class.resource_type.as_deref() {
        Some(t) => t == "Patient" || PatientCompartment::contains(t),
        // System-level searches and history, batches and transactions, compartment searches.
        None => true,
    }
}

/// The id in a reference to a Patient: `Patient/1`, `https://ehr.example/fhir/Patient/1`,
/// `Patient/1/_history/2`.
fn patient_reference(value: &str) -> Option<&str> {
    let v = match value.find("/_history/") {
        Some(i) => &value[..i],
        None => value,
    };
    let i = v.rfind("Patient/")?;
    if i > 0 && !v[..i].ends_with('/') {
        return None;
    }
    let id = &v[i + "Patient/".len()..];
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use caregate_filter_api::ctx::writers;
    use caregate_testkit::{principal, Harness};

    /// A folder with an opt-outs file, removed at the end of the test.
    struct Folder(PathBuf);

    impl Folder {
        fn with_opt_outs(tag: &str, text: &str) -> Folder {
            let dir =
                std::env::temp_dir().join(format!("consent-test-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("opt-outs.csv"), text).unwrap();
            Folder(dir)
        }

        fn file(&self) -> PathBuf {
            self.0.join("opt-outs.csv")
        }
    }

    impl Drop for Folder {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const OPT_OUTS: &str = "\
# Patients who opted out, and for which organisation.
patient_id,organisation
p1,hospital-b
p2,*
";

    /// The chain `- kind: consent` with `config`, built by the custom binary's registry (the
    /// built-in kinds and `consent`), on a FHIR route below `/fhir`. Relative paths resolve
    /// against `folder`, as against the config file's folder in the gateway.
    fn harness(folder: &Folder, config: &str) -> Harness {
        let app = caregate::App::builder()
            .filter_kind(KIND, build)
            .build()
            .unwrap();
        let cx = BuildContext {
            base_dir: folder.0.clone(),
            ..BuildContext::default()
        };
        let yaml = format!("- kind: consent\n  config: {config}");
        Harness::from_yaml_with(app.registry(), &cx, &yaml)
            .unwrap()
            .fhir("/fhir")
    }

    #[tokio::test]
    async fn refuses_an_opted_out_patient_for_that_organisation_only() {
        let folder = Folder::with_opt_outs("refuses", OPT_OUTS);
        let h = harness(&folder, "{opt_outs: opt-outs.csv}");
        let staff = |tenant| principal("dr-x").tenant(tenant).scopes("user/*.rs");

        let mut x = h
            .request("GET", "/fhir/Observation?patient=p1")
            .principal(staff("hospital-b"));
        let out = x.run_request().await;
        assert_eq!((out.status(), out.reason()), (Some(403), Some(REASON)));
        assert_eq!(x.decisions(), [(KIND, "deny", REASON)]);
        let detail = out.reply().map(|r| r.detail.to_string()).unwrap();
        assert!(
            !detail.contains("p1"),
            "the reply names no patient: {detail}"
        );

        // The same patient for another organisation: let through, and the fact written.
        let mut x = h
            .request("GET", "/fhir/Observation?patient=p1")
            .principal(staff("hospital-a"));
        assert!(x.run_request().await.is_continue());
        assert_eq!(x.decisions(), [(KIND, "allow", "none")]);
        assert_eq!(
            x.ctx.facts.get::<ConsentChecked>(),
            Some(&ConsentChecked {
                organisation: "hospital-a".into(),
                patients: vec!["p1".into()],
            })
        );
        assert_eq!(x.ctx.facts.writer_of::<ConsentChecked>(), Some(KIND));

        // `*`: every organisation.
        for tenant in ["hospital-a", "hospital-b"] {
            let mut x = h
                .request("GET", "/fhir/Patient/p2")
                .principal(staff(tenant));
            assert_eq!(x.run_request().await.reason(), Some(REASON), "{tenant}");
        }
    }

    #[tokio::test]
    async fn every_way_a_request_names_its_patient() {
        let folder = Folder::with_opt_outs("names", OPT_OUTS);
        let h = harness(&folder, "{opt_outs: opt-outs.csv}");
        let staff = || principal("dr-x").tenant("hospital-b");
        for uri in [
            "/fhir/Patient/p1",
            "/fhir/Patient/p1/_history/3",
            "/fhir/Patient/p1/Observation",
            "/fhir/Patient/p1/$everything",
            "/fhir/Patient?_id=p1",
            "/fhir/Observation?subject=Patient/p1",
            "/fhir/Observation?subject:Patient=p1",
            "/fhir/Observation?subject=https://ehr.example/fhir/Patient/p1",
            "/fhir/Observation?patient=p3,p1",
            "/fhir/Encounter?patient=p3&patient=p1",
        ] {
            let mut x = h.request("GET", uri).principal(staff());
            assert_eq!(x.run_request().await.reason(), Some(REASON), "{uri}");
        }
        // A patient-context caller (a patient-facing app) touches its own patient's data.
        let mut x = h
            .request("GET", "/fhir/Observation?code=8867-4")
            .principal(principal("app").tenant("hospital-b").patient("p1"));
        assert_eq!(x.run_request().await.reason(), Some(REASON));
        // Others' data goes on.
        for uri in ["/fhir/Patient/p3", "/fhir/Observation?patient=p3"] {
            let mut x = h.request("GET", uri).principal(staff());
            assert!(x.run_request().await.is_continue(), "{uri}");
        }
    }

    #[tokio::test]
    async fn requests_that_name_no_patient() {
        let folder = Folder::with_opt_outs("unnamed", OPT_OUTS);
        let allow = harness(&folder, "{opt_outs: opt-outs.csv}");
        let refuse = harness(&folder, "{opt_outs: opt-outs.csv, unnamed_patient: refuse}");
        let staff = || principal("dr-x").tenant("hospital-b");
        // No patient data at all: through, even without a caller.
        for h in [&allow, &refuse] {
            for uri in ["/fhir/metadata", "/fhir/Practitioner/7"] {
                let mut x = h.request("GET", uri);
                assert!(x.run_request().await.is_continue(), "{uri}");
            }
        }
        // Patient data whose patient the request does not name: as configured.
        for uri in ["/fhir/Observation?code=8867-4", "/fhir/Observation/o1"] {
            let mut x = allow.request("GET", uri).principal(staff());
            assert!(x.run_request().await.is_continue(), "{uri}");
            let mut x = refuse.request("GET", uri).principal(staff());
            assert_eq!(x.run_request().await.reason(), Some(REASON), "{uri}");
        }
    }

    #[tokio::test]
    async fn fails_closed_without_a_caller_or_an_organisation() {
        let folder = Folder::with_opt_outs("closed", OPT_OUTS);
        let h = harness(&folder, "{opt_outs: opt-outs.csv}");
        let mut x = h.request("GET", "/fhir/Observation?patient=p3");
        assert_eq!(x.run_request().await.reason(), Some(REASON));
        let mut x = h
            .request("GET", "/fhir/Observation?patient=p3")
            .principal(principal("dr-x"));
        assert_eq!(x.run_request().await.reason(), Some(REASON));
        // Not on a FHIR route (no classification): refused too.
        let plain = Harness::from_filters(h.filters().to_vec());
        let mut x = plain
            .request("GET", "/fhir/Observation?patient=p3")
            .principal(principal("dr-x").tenant("hospital-a"));
        assert_eq!(x.run_request().await.reason(), Some(REASON));
    }

    #[tokio::test]
    async fn the_organisation_comes_from_where_it_is_configured() {
        let folder = Folder::with_opt_outs("organisation", OPT_OUTS);
        let by_client = harness(&folder, "{opt_outs: opt-outs.csv, organisation: client_id}");
        let mut x = by_client.request("GET", "/fhir/Patient/p1").principal(
            principal("dr-x")
                .tenant("hospital-a")
                .client_id("hospital-b"),
        );
        assert_eq!(x.run_request().await.reason(), Some(REASON));

        let by_tenant = harness(&folder, "{opt_outs: opt-outs.csv, organisation: tenant}");
        let mut x = by_tenant
            .request("GET", "/fhir/Patient/p1")
            .principal(principal("dr-x").tenant("hospital-a"))
            .fact(
                writers::Tenant,
                Tenant {
                    id: "hospital-b".into(),
                    pool: None,
                },
            );
        assert_eq!(x.run_request().await.reason(), Some(REASON));
        // ...which it needs from a filter before it: `check` holds the chain to that.
        let needs = by_tenant.filters()[0].declaration().needs;
        assert!(needs.contains(&Capability::Tenant), "{needs:?}");
    }

    #[tokio::test]
    async fn shadow_counts_the_refusal_and_lets_the_request_through() {
        let folder = Folder::with_opt_outs("shadow", OPT_OUTS);
        let h = harness(&folder, "{opt_outs: opt-outs.csv, mode: shadow}");
        let mut x = h
            .request("GET", "/fhir/Patient/p1")
            .principal(principal("dr-x").tenant("hospital-b"));
        assert!(x.run_request().await.is_continue());
        assert_eq!(x.decisions(), [(KIND, "shadow_deny", REASON)]);
        assert!(x.ctx.facts.get::<ConsentChecked>().is_none());
    }

    #[test]
    fn a_missing_or_malformed_file_or_a_typo_is_a_build_error() {
        let folder = Folder::with_opt_outs("config", "p1,hospital-b\n\np2 hospital-a\n");
        let cx = BuildContext {
            base_dir: folder.0.clone(),
            ..BuildContext::default()
        };
        let error = |yaml: &str| {
            build(serde_yaml::from_str(yaml).unwrap(), &cx)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let e = error("{opt_outs: opt-outs.csv}");
        assert!(e.starts_with("config.opt_outs: "), "{e}");
        assert!(
            e.ends_with("opt-outs.csv: line 3: expected `patient_id,organisation`"),
            "{e}"
        );
        assert!(!e.contains("p2"), "no file content in errors: {e}");
        let e = error("{opt_outs: missing.csv}");
        assert!(e.starts_with("config.opt_outs: cannot read "), "{e}");
        let e = error("{opt_outs: opt-outs.csv, organisaton: client_id}");
        assert!(
            e.starts_with("config.organisaton: unknown field `organisaton`"),
            "{e}"
        );
        let e = error("{opt_outs: opt-outs.csv, mode: loud}");
        assert!(e.starts_with("config.mode: unknown variant `loud`"), "{e}");
        std::fs::write(folder.file(), OPT_OUTS).unwrap();
        let e = error("{opt_outs: opt-outs.csv, reload_ms: 0}");
        assert_eq!(e, "config.reload_ms: must be at least 10");
        assert_eq!(error("{opt_outs: opt-outs.csv}"), "");
    }

    #[test]
    fn a_changed_file_is_read_again_and_a_broken_one_keeps_the_last_list() {
        let folder = Folder::with_opt_outs("refresh", OPT_OUTS);
        let list = OptOutList::open(folder.file()).unwrap();
        assert_eq!(list.current().len(), 2);
        assert_eq!(list.refresh(), Refresh::Unchanged);

        std::fs::write(folder.file(), "p3,hospital-a\n").unwrap();
        assert_eq!(list.refresh(), Refresh::Reloaded(1));
        assert!(list.current().refuses("p3", "hospital-a"));
        assert!(!list.current().refuses("p1", "hospital-b"));

        // Broken, then gone: the last good list stays in force.
        std::fs::write(folder.file(), "p3;hospital-a\np4,hospital-a\n").unwrap();
        assert_eq!(
            list.refresh(),
            Refresh::Failed(format!(
                "{}: line 1: expected `patient_id,organisation`",
                folder.file().display()
            ))
        );
        std::fs::remove_file(folder.file()).unwrap();
        assert!(matches!(list.refresh(), Refresh::Failed(e) if e.starts_with("cannot read")));
        assert!(list.current().refuses("p3", "hospital-a"));

        // Back: read again.
        std::fs::write(folder.file(), OPT_OUTS).unwrap();
        assert_eq!(list.refresh(), Refresh::Reloaded(2));
    }

    #[tokio::test]
    async fn the_background_task_applies_a_change_until_shutdown() {
        let folder = Folder::with_opt_outs("task", OPT_OUTS);
        let h = harness(&folder, "{opt_outs: opt-outs.csv, reload_ms: 10}");
        let task = h.filters()[0].background().expect("a background task");
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let running = tokio::spawn(async move { task.run(shutdown).await });

        std::fs::write(folder.file(), "p1,hospital-b\np3,hospital-b\n").unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut x = h
                .request("GET", "/fhir/Patient/p3")
                .principal(principal("dr-x").tenant("hospital-b"));
            if x.run_request().await.reason() == Some(REASON) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the change never took effect"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("the task stops at shutdown")
            .unwrap();
    }

    #[test]
    fn patient_references() {
        assert_eq!(patient_reference("Patient/1"), Some("1"));
        assert_eq!(patient_reference("http://x/fhir/Patient/1"), Some("1"));
        assert_eq!(patient_reference("Patient/1/_history/2"), Some("1"));
        assert_eq!(patient_reference("RelatedPatient/1"), None);
        assert_eq!(patient_reference("Patient/"), None);
        assert_eq!(patient_reference("Group/1"), None);
        assert_eq!(patient_reference("1"), None);
    }
}
