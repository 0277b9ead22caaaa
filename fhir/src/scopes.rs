//! SMART App Launch scopes (v2, with v1 compatibility) and the access decision they make on a
//! classified request.
//!
//! Source: SMART App Launch IG 2.2.0, "Scopes and Launch Context"
//! (<https://hl7.org/fhir/smart-app-launch/scopes-and-launch-context.html>), HL7 International,
//! CC-BY-4.0.

use crate::encoding::{percent_decode, unescape};
use crate::params::{parse_params, SearchParam};
use crate::request::{FhirRequest, Interaction};
use crate::resource_types::{is_resource_type, resource_type_ignore_case};
use std::fmt;

/// The URI form prefix of SMART scopes (`http://smarthealthit.org/fhir/scopes/patient/*.r`).
pub const SMART_SCOPE_URI_PREFIX: &str = "http://smarthealthit.org/fhir/scopes/";

/// The context part of a resource scope: whose data it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Context {
    /// `patient/`: only the in-context patient (the token's `patient`), i.e. that patient's compartment.
    Patient,
    /// `user/`: whatever the authorised user may access.
    User,
    /// `system/`: a backend service with no user.
    System,
}

impl Context {
    /// `patient`, `user` or `system`.
    pub fn as_str(self) -> &'static str {
        match self {
            Context::Patient => "patient",
            Context::User => "user",
            Context::System => "system",
        }
    }

    fn parse(s: &str) -> Option<Context> {
        match s {
            "patient" => Some(Context::Patient),
            "user" => Some(Context::User),
            "system" => Some(Context::System),
            _ => None,
        }
    }
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One SMART v2 permission letter.
///
/// | letter | covers |
/// |---|---|
/// | `c` | create (type level; also conditional create, which needs `s` too here) |
/// | `r` | read, vread, instance history |
/// | `u` | update (incl. upsert), patch |
/// | `d` | delete |
/// | `s` | search (type, system, compartment) and type/system history |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    /// `c`
    Create,
    /// `r`
    Read,
    /// `u`
    Update,
    /// `d`
    Delete,
    /// `s`
    Search,
}

impl Permission {
    /// All five, in the order of the spec (`cruds`).
    pub const ALL: [Permission; 5] = [
        Permission::Create,
        Permission::Read,
        Permission::Update,
        Permission::Delete,
        Permission::Search,
    ];

    /// The v2 letter.
    pub fn letter(self) -> char {
        match self {
            Permission::Create => 'c',
            Permission::Read => 'r',
            Permission::Update => 'u',
            Permission::Delete => 'd',
            Permission::Search => 's',
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.letter())
    }
}

/// A set of [`Permission`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Permissions(u8);

impl Permissions {
    /// `.cruds` (and v1 `.*`).
    pub const ALL: Permissions = Permissions(0b11111);

    /// Whether `p` is in the set.
    pub fn contains(self, p: Permission) -> bool {
        self.0 & p.bit() != 0
    }

    /// The set plus `p`.
    pub fn with(self, p: Permission) -> Permissions {
        Permissions(self.0 | p.bit())
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// From v2 letters in canonical order; `None` if not a non-empty, in-order subset of `cruds`.
    pub fn from_letters(s: &str) -> Option<Permissions> {
        parse_v2_permissions(s).ok()
    }
}

impl fmt::Display for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in Permission::ALL {
            if self.contains(p) {
                write!(f, "{}", p.letter())?;
            }
        }
        Ok(())
    }
}

/// How the permissions of a resource scope were written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScopeSyntax {
    /// v2 letters (`.rs`, `.cruds`).
    V2,
    /// v1 `.read` (= `.rs`).
    V1Read,
    /// v1 `.write` (= `.cud`).
    V1Write,
    /// v1 `.*` (= `.cruds`).
    V1All,
}

/// The resource part of a resource scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ScopeTarget {
    /// `*`: every type, including types added later.
    AllTypes,
    /// One R4 resource type.
    Type(String),
}

impl ScopeTarget {
    /// Whether the scope covers `resource_type` (`None` = a need for every type, which only `*` covers).
    pub fn covers(&self, resource_type: Option<&str>) -> bool {
        match (self, resource_type) {
            (ScopeTarget::AllTypes, _) => true,
            (ScopeTarget::Type(t), Some(r)) => t == r,
            (ScopeTarget::Type(_), None) => false,
        }
    }
}

/// `context/type.permissions[?query]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourceScope {
    /// `patient`, `user` or `system`.
    pub context: Context,
    /// A type or `*`.
    pub target: ScopeTarget,
    /// The granted permissions (v1 forms already mapped).
    pub permissions: Permissions,
    /// How they were written.
    pub syntax: ScopeSyntax,
    /// The query restriction (`?category=…|laboratory`), parsed like a search query; empty = none.
    /// Parameters in one scope must all hold (AND).
    pub query: Vec<SearchParam>,
    /// The query as written (without `?`), for display.
    pub query_text: Option<String>,
}

impl ResourceScope {
    /// Whether the query restriction uses what the spec calls experimental: modifiers
    /// (`code:in=…`), chains (`patient.birthdate=…`), `_has` or `_filter`.
    pub fn is_experimental(&self) -> bool {
        self.query.iter().any(|p| {
            p.modifier.is_some() || !p.chain.is_empty() || p.name == "_has" || p.name == "_filter"
        })
    }
}

/// One SMART scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `patient/…`, `user/…`, `system/…` (also in the URI form).
    Resource(ResourceScope),
    /// `openid`
    OpenId,
    /// `fhirUser`
    FhirUser,
    /// `profile` (SMART v1's identity scope, still listed by the spec)
    Profile,
    /// `launch` (EHR launch)
    Launch,
    /// `launch/patient`, `launch/encounter`, `launch/<lowercase type>[?role=…]` (standalone launch
    /// context request); `resource_type` is the canonical R4 spelling (`launch/imagingstudy` →
    /// `ImagingStudy`), `role` the percent-decoded role.
    LaunchContext {
        /// The R4 type asked for.
        resource_type: String,
        /// The `role` parameter.
        role: Option<String>,
    },
    /// `offline_access`
    OfflineAccess,
    /// `online_access`
    OnlineAccess,
    /// An extension scope: prefixed `__` or a full URI other than the SMART URI form. Carries no
    /// FHIR access.
    Extension(String),
}

/// Why a scope string is not a scope (never contains the string).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScopeError {
    /// The empty string.
    Empty,
    /// A character outside RFC 6749's scope-token set (`%x21 / %x23-5B / %x5D-7E`): spaces,
    /// quotes, backslashes, non-ASCII.
    InvalidCharacter,
    /// None of the known forms.
    Unrecognized,
    /// `Observation.rs` without `patient/`, `user/` or `system/`.
    MissingContext,
    /// The type is not an R4 resource type.
    UnknownResourceType,
    /// No `.` or nothing after it.
    MissingPermissions,
    /// A letter outside `cruds`, or a v1 word other than `read`, `write`, `*`.
    UnknownPermission,
    /// Letters repeated or not in `cruds` order (`.dus`): the spec says such requests "MAY be
    /// ignored, replaced with server default scopes, or rejected"; we reject.
    PermissionsOutOfOrder,
    /// A query restriction on a v1 scope (`.read?…`), which v1 does not have.
    QueryOnV1Scope,
    /// A malformed query restriction.
    BadQuery,
    /// `launch/…` with a part that is not a lower-case resource type or a query other than `role=`.
    BadLaunchContext,
    /// Bad percent-encoding in a form-encoded scope parameter.
    BadEncoding,
}

impl ScopeError {
    /// A stable code (`unrecognized`, `out_of_order_permissions`, …).
    pub fn reason(self) -> &'static str {
        match self {
            ScopeError::Empty => "empty",
            ScopeError::InvalidCharacter => "invalid_character",
            ScopeError::Unrecognized => "unrecognized",
            ScopeError::MissingContext => "missing_context",
            ScopeError::UnknownResourceType => "unknown_resource_type",
            ScopeError::MissingPermissions => "missing_permissions",
            ScopeError::UnknownPermission => "unknown_permission",
            ScopeError::PermissionsOutOfOrder => "out_of_order_permissions",
            ScopeError::QueryOnV1Scope => "query_on_v1_scope",
            ScopeError::BadQuery => "bad_query",
            ScopeError::BadLaunchContext => "bad_launch_context",
            ScopeError::BadEncoding => "bad_encoding",
        }
    }
}

impl fmt::Display for ScopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid SMART scope: {}", self.reason())
    }
}

impl std::error::Error for ScopeError {}

fn parse_v2_permissions(s: &str) -> Result<Permissions, ScopeError> {
    if s.is_empty() {
        return Err(ScopeError::MissingPermissions);
    }
    let mut set = Permissions::default();
    let mut last: Option<Permission> = None;
    for c in s.chars() {
        let p = match c {
            'c' => Permission::Create,
            'r' => Permission::Read,
            'u' => Permission::Update,
            'd' => Permission::Delete,
            's' => Permission::Search,
            _ => return Err(ScopeError::UnknownPermission),
        };
        if last.is_some_and(|l| l >= p) {
            return Err(ScopeError::PermissionsOutOfOrder);
        }
        last = Some(p);
        set = set.with(p);
    }
    Ok(set)
}

fn is_scope_token_char(c: char) -> bool {
    matches!(c, '\x21' | '\x23'..='\x5b' | '\x5d'..='\x7e')
}

fn looks_like_uri(s: &str) -> bool {
    match s.split_once(':') {
        Some((scheme, rest)) => {
            let b = scheme.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphabetic()
                && b.iter()
                    .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.'))
                && !rest.is_empty()
        }
        None => false,
    }
}

impl Scope {
    /// Parse one scope token.
    ///
    /// Accepts SMART v2 resource scopes with optional query restriction, v1 resource scopes
    /// (`.read`, `.write`, `.*`), the launch/identity/refresh scopes, extension scopes (`__name` or a
    /// full URI) and the URI form `http://smarthealthit.org/fhir/scopes/<scope>`. Resource types are
    /// checked against R4. The query restriction is percent-decoded and read like a search query.
    pub fn parse(s: &str) -> Result<Scope, ScopeError> {
        if s.is_empty() {
            return Err(ScopeError::Empty);
        }
        if !s.chars().all(is_scope_token_char) {
            return Err(ScopeError::InvalidCharacter);
        }
        if let Some(rest) = s.strip_prefix(SMART_SCOPE_URI_PREFIX) {
            return match Self::parse_plain(rest)? {
                Scope::Extension(_) => Err(ScopeError::Unrecognized),
                scope => Ok(scope),
            };
        }
        Self::parse_plain(s)
    }

    fn parse_plain(s: &str) -> Result<Scope, ScopeError> {
        match s {
            "" => return Err(ScopeError::Empty),
            "openid" => return Ok(Scope::OpenId),
            "fhirUser" => return Ok(Scope::FhirUser),
            "profile" => return Ok(Scope::Profile),
            "launch" => return Ok(Scope::Launch),
            "offline_access" => return Ok(Scope::OfflineAccess),
            "online_access" => return Ok(Scope::OnlineAccess),
            _ => {}
        }
        if let Some(rest) = s.strip_prefix("launch/") {
            return parse_launch_context(rest);
        }
        if s.len() > 2 && s.starts_with("__") {
            return Ok(Scope::Extension(s.to_owned()));
        }
        if let Some((ctx, rest)) = s.split_once('/') {
            if let Some(context) = Context::parse(ctx) {
                return parse_resource_scope(context, rest).map(Scope::Resource);
            }
        }
        if looks_like_uri(s) {
            return Ok(Scope::Extension(s.to_owned()));
        }
        // `Observation.rs…` as the spec's experimental examples are written: a resource scope
        // without its context.
        let head = s.split(['?', '.']).next().unwrap_or_default();
        if s.contains('.') && (head == "*" || is_resource_type(head)) {
            return Err(ScopeError::MissingContext);
        }
        Err(ScopeError::Unrecognized)
    }

    /// The resource scope, if this is one.
    pub fn as_resource(&self) -> Option<&ResourceScope> {
        match self {
            Scope::Resource(r) => Some(r),
            _ => None,
        }
    }
}

fn parse_launch_context(rest: &str) -> Result<Scope, ScopeError> {
    let (ty, query) = match rest.split_once('?') {
        Some((t, q)) => (t, Some(q)),
        None => (rest, None),
    };
    if ty.is_empty() || !ty.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(ScopeError::BadLaunchContext);
    }
    let resource_type = resource_type_ignore_case(ty).ok_or(ScopeError::BadLaunchContext)?;
    let role = match query {
        None => None,
        Some(q) => {
            let value = q
                .strip_prefix("role=")
                .ok_or(ScopeError::BadLaunchContext)?;
            if value.is_empty() || value.contains('&') {
                return Err(ScopeError::BadLaunchContext);
            }
            Some(percent_decode(value, false).map_err(|_| ScopeError::BadLaunchContext)?)
        }
    };
    Ok(Scope::LaunchContext {
        resource_type: resource_type.to_owned(),
        role,
    })
}

fn parse_resource_scope(context: Context, rest: &str) -> Result<ResourceScope, ScopeError> {
    let (head, query) = match rest.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (rest, None),
    };
    let (ty, perms) = head.split_once('.').ok_or(ScopeError::MissingPermissions)?;
    let target = if ty == "*" {
        ScopeTarget::AllTypes
    } else if is_resource_type(ty) {
        ScopeTarget::Type(ty.to_owned())
    } else {
        return Err(ScopeError::UnknownResourceType);
    };
    let (permissions, syntax) = match perms {
        "read" => (
            Permissions::default()
                .with(Permission::Read)
                .with(Permission::Search),
            ScopeSyntax::V1Read,
        ),
        "write" => (
            Permissions::default()
                .with(Permission::Create)
                .with(Permission::Update)
                .with(Permission::Delete),
            ScopeSyntax::V1Write,
        ),
        "*" => (Permissions::ALL, ScopeSyntax::V1All),
        letters => (parse_v2_permissions(letters)?, ScopeSyntax::V2),
    };
    let query_params = match query {
        None => Vec::new(),
        Some(_) if syntax != ScopeSyntax::V2 => return Err(ScopeError::QueryOnV1Scope),
        Some(q) => {
            let params = parse_params(q).map_err(|_| ScopeError::BadQuery)?;
            if params.is_empty() || params.iter().any(|p| p.values.is_empty()) {
                return Err(ScopeError::BadQuery);
            }
            params
        }
    };
    Ok(ResourceScope {
        context,
        target,
        permissions,
        syntax,
        query: query_params,
        query_text: query.map(str::to_owned),
    })
}

impl fmt::Display for Scope {
    /// The canonical form: v1 permissions are shown as their v2 letters, the URI form without its
    /// prefix.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Resource(r) => {
                write!(f, "{}/", r.context)?;
                match &r.target {
                    ScopeTarget::AllTypes => f.write_str("*")?,
                    ScopeTarget::Type(t) => f.write_str(t)?,
                }
                write!(f, ".{}", r.permissions)?;
                if let Some(q) = &r.query_text {
                    write!(f, "?{q}")?;
                }
                Ok(())
            }
            Scope::OpenId => f.write_str("openid"),
            Scope::FhirUser => f.write_str("fhirUser"),
            Scope::Profile => f.write_str("profile"),
            Scope::Launch => f.write_str("launch"),
            Scope::LaunchContext {
                resource_type,
                role,
            } => {
                write!(f, "launch/{}", resource_type.to_ascii_lowercase())?;
                if let Some(role) = role {
                    write!(f, "?role={}", crate::encoding::percent_encode(role))?;
                }
                Ok(())
            }
            Scope::OfflineAccess => f.write_str("offline_access"),
            Scope::OnlineAccess => f.write_str("online_access"),
            Scope::Extension(s) => f.write_str(s),
        }
    }
}

/// The granted scopes of one token: a union (`Observation.rs` = `Observation.r Observation.s`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeSet {
    scopes: Vec<Scope>,
}

impl FromIterator<Scope> for ScopeSet {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        ScopeSet {
            scopes: iter.into_iter().collect(),
        }
    }
}

impl ScopeSet {
    /// Parse a space-separated scope string (the token's `scope` claim); any invalid scope fails
    /// the whole string.
    pub fn parse(s: &str) -> Result<ScopeSet, ScopeError> {
        s.split_ascii_whitespace().map(Scope::parse).collect()
    }

    /// Parse a space-separated scope string, dropping invalid scopes (which only ever takes access
    /// away) and returning why each was dropped.
    pub fn parse_lenient(s: &str) -> (ScopeSet, Vec<ScopeError>) {
        let mut errors = Vec::new();
        let set = s
            .split_ascii_whitespace()
            .filter_map(|t| Scope::parse(t).map_err(|e| errors.push(e)).ok())
            .collect();
        (set, errors)
    }

    /// Parse a form-encoded `scope` parameter (`launch+patient%2FObservation.rs+openid`): `+` is a
    /// space, then percent-decoding, then [`ScopeSet::parse`].
    pub fn parse_form_encoded(s: &str) -> Result<ScopeSet, ScopeError> {
        let decoded = percent_decode(s, true).map_err(|_| ScopeError::BadEncoding)?;
        Self::parse(&decoded)
    }

    /// The scopes, in the order given.
    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.scopes.iter()
    }

    /// The number of scopes.
    pub fn len(&self) -> usize {
        self.scopes.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
    }

    /// Whether `scope` is in the set.
    pub fn contains(&self, scope: &Scope) -> bool {
        self.scopes.contains(scope)
    }

    /// The resource scopes of `context`.
    pub fn resource_scopes(&self, context: Context) -> impl Iterator<Item = &ResourceScope> {
        self.scopes
            .iter()
            .filter_map(Scope::as_resource)
            .filter(move |r| r.context == context)
    }

    /// Whether the `context/` scopes of this set allow `req`, and under which conditions.
    ///
    /// Only scopes of `context` are considered; a caller whose token may use several contexts asks
    /// once per context. What each interaction needs:
    ///
    /// | interaction | needs |
    /// |---|---|
    /// | read, vread, history-instance | `r` on the type |
    /// | update, patch | `u` |
    /// | delete | `d` |
    /// | create | `c` |
    /// | conditional create / update / patch / delete | `c` / `u` / `u` / `d` **and** `s` (the criteria are a search whose outcome the response reveals) |
    /// | search-type, history-type | `s` on the type |
    /// | search-compartment | `s` on the searched type (`*`: on every type, so a `*` scope) |
    /// | search-system | `s` on each `_type` value, else on every type |
    /// | history-system | `s` on every type |
    /// | any search with `_has:T:…` or a typed chain `ref:T.param` | also `s` on `T`, from a scope **without** query restriction (the filter's effect cannot be checked on what is returned) |
    /// | operations | by [`OPERATION_RULES`]; others are denied ([`Denial::UnmappedOperation`]) |
    /// | capabilities | nothing (always allowed) |
    /// | batch / transaction | [`Permit::PerEntry`]: classify and check every entry |
    ///
    /// "Every type" is only covered by a `*` scope. When the only scopes that grant a need carry
    /// query restrictions, the need becomes a [`Condition`]: one of its restrictions must hold for
    /// each resource of that type the request reads, writes or returns (or the search must carry
    /// it, see [`Restriction::carried_by_request`]). A `patient/` grant is in addition limited to the
    /// launch patient's compartment ([`Grant::patient_compartment`]; see
    /// [`crate::PatientCompartment`]).
    ///
    /// Not covered here (the caller checks them on the response): resources of other types that a
    /// search returns through `_include`/`_revinclude` (use [`ScopeSet::permits_resource`]), and
    /// untyped chains (`subject.name=…`), whose target type depends on the parameter definition.
    pub fn permits(&self, context: Context, req: &FhirRequest) -> Permit {
        let needs = match needs_for(req) {
            Needs::Nothing => {
                return Permit::Allow(Grant {
                    context,
                    patient_compartment: false,
                    conditions: Vec::new(),
                })
            }
            Needs::PerEntry => return Permit::PerEntry,
            Needs::Unmapped => return Permit::Deny(Denial::UnmappedOperation),
            Needs::These(n) => n,
        };
        let mut conditions = Vec::new();
        for need in &needs {
            match self.evaluate(context, need, Some(req)) {
                Ok(Some(c)) => conditions.push(c),
                Ok(None) => {}
                Err(d) => return Permit::Deny(d),
            }
        }
        Permit::Allow(Grant {
            context,
            patient_compartment: context == Context::Patient,
            conditions,
        })
    }

    /// Whether the `context/` scopes allow `permission` on resources of `resource_type`: for a
    /// resource returned in a Bundle (`_include`, `$everything`) or for one entry of a batch.
    pub fn permits_resource(
        &self,
        context: Context,
        resource_type: &str,
        permission: Permission,
    ) -> Permit {
        let need = Need {
            permission,
            resource_type: Some(resource_type.to_owned()),
            filter_only: false,
        };
        match self.evaluate(context, &need, None) {
            Ok(c) => Permit::Allow(Grant {
                context,
                patient_compartment: context == Context::Patient,
                conditions: c.into_iter().collect(),
            }),
            Err(d) => Permit::Deny(d),
        }
    }

    fn evaluate(
        &self,
        context: Context,
        need: &Need,
        req: Option<&FhirRequest>,
    ) -> Result<Option<Condition>, Denial> {
        let ty = need.resource_type.as_deref();
        let grants: Vec<&ResourceScope> = self
            .resource_scopes(context)
            .filter(|s| s.permissions.contains(need.permission) && s.target.covers(ty))
            .collect();
        let missing = || Denial::MissingPermission {
            permission: need.permission,
            resource_type: need.resource_type.clone(),
        };
        if grants.is_empty() {
            return Err(missing());
        }
        if grants.iter().any(|g| g.query.is_empty()) {
            return Ok(None);
        }
        if need.filter_only {
            return Err(Denial::RestrictedFilter {
                resource_type: need.resource_type.clone(),
            });
        }
        let can_carry = need.permission == Permission::Search
            && req.is_some_and(|r| {
                matches!(
                    r.interaction,
                    Interaction::SearchType
                        | Interaction::SearchCompartment
                        | Interaction::ConditionalCreate
                        | Interaction::ConditionalUpdate
                        | Interaction::ConditionalPatch
                        | Interaction::ConditionalDelete
                ) && r.resource_type.is_some()
                    && r.resource_type == need.resource_type
            });
        let mut any_of: Vec<Restriction> = Vec::new();
        for g in grants {
            let carried = match req {
                Some(r) if can_carry => carries(&r.params, &g.query),
                _ => false,
            };
            let restriction = Restriction {
                params: g.query.clone(),
                carried_by_request: carried,
            };
            if !any_of.contains(&restriction) {
                any_of.push(restriction);
            }
        }
        Ok(Some(Condition {
            permission: need.permission,
            resource_type: need.resource_type.clone(),
            any_of,
        }))
    }
}

/// Whether the request's parameters narrow the search to `restriction`: for every restriction
/// parameter, some request parameter with the same name, modifier and chain has only values
/// (alternatives) that the restriction allows.
fn carries(params: &[SearchParam], restriction: &[SearchParam]) -> bool {
    restriction.iter().all(|rp| {
        params.iter().any(|p| {
            p.name == rp.name
                && p.modifier == rp.modifier
                && p.chain == rp.chain
                && !p.values.is_empty()
                && p.values.iter().all(|v| rp.values.contains(v))
        })
    })
}

/// The outcome of [`ScopeSet::permits`].
#[must_use]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permit {
    /// Some scope allows the request, under the grant's conditions (which may be none).
    Allow(Grant),
    /// No scope of the context allows it.
    Deny(Denial),
    /// A batch or transaction: scopes apply to each entry ("validated based on the actual requests
    /// within them"), so every entry must be classified and checked.
    PerEntry,
}

impl Permit {
    /// Allowed with nothing left to check (no conditions and no patient-compartment limit).
    pub fn is_unconditional(&self) -> bool {
        matches!(self, Permit::Allow(g) if g.conditions.is_empty() && !g.patient_compartment)
    }

    /// Allowed (possibly with conditions).
    pub fn is_allowed(&self) -> bool {
        matches!(self, Permit::Allow(_))
    }
}

/// What an allowed request must still satisfy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The context whose scopes granted it.
    pub context: Context,
    /// Granted by `patient/` scopes: everything read, written or returned must be in the launch
    /// patient's compartment (a compartment search must name that patient; a type search must be
    /// limited to them; returned resources must reference them).
    pub patient_compartment: bool,
    /// All must hold; empty = nothing beyond the compartment.
    pub conditions: Vec<Condition>,
}

/// A permission granted only by scopes with query restrictions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// The permission concerned.
    pub permission: Permission,
    /// The resources it applies to: `Some(type)`, or `None` for resources of every type (a need
    /// that only `*` scopes could meet).
    pub resource_type: Option<String>,
    /// At least one must hold for each such resource (union of the granting scopes).
    pub any_of: Vec<Restriction>,
}

/// The query restriction of one granting scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restriction {
    /// Parameters that must all match (AND), as parsed from the scope.
    pub params: Vec<SearchParam>,
    /// The search itself already carries this restriction (same parameter, and its values are
    /// among the restriction's), so the server's filtering enforces it. The comparison is textual:
    /// `category=laboratory` does not carry `category=http://…|laboratory`. Only ever `true` for the
    /// `s` need of a type or compartment search (or of a conditional interaction's criteria) on
    /// that type.
    pub carried_by_request: bool,
}

/// Why a request was denied. Names only permissions and types, never ids or values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// No scope of the context grants `permission` on `resource_type` (`None` = on every type, which
    /// needs a `*` scope).
    MissingPermission {
        /// The permission needed.
        permission: Permission,
        /// The type it is needed on.
        resource_type: Option<String>,
    },
    /// A `_has` or typed-chain filter looks into a type for which only restricted scopes exist.
    RestrictedFilter {
        /// The type filtered on.
        resource_type: Option<String>,
    },
    /// An operation that [`OPERATION_RULES`] does not map to permissions.
    UnmappedOperation,
}

impl Denial {
    /// A stable code: `missing_permission`, `restricted_filter`, `unmapped_operation`.
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::MissingPermission { .. } => "missing_permission",
            Denial::RestrictedFilter { .. } => "restricted_filter",
            Denial::UnmappedOperation => "unmapped_operation",
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::MissingPermission {
                permission,
                resource_type,
            } => write!(
                f,
                "no scope grants '{}' on {}",
                permission,
                resource_type.as_deref().unwrap_or("all types")
            ),
            Denial::RestrictedFilter { resource_type } => write!(
                f,
                "only restricted scopes cover {}, which the search filters on",
                resource_type.as_deref().unwrap_or("all types")
            ),
            Denial::UnmappedOperation => f.write_str("operation not mapped to SMART permissions"),
        }
    }
}

/// Where an operation is invoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationLevel {
    /// `[base]/$op`
    System,
    /// `[base]/[type]/$op`
    Type,
    /// `[base]/[type]/[id]/$op`
    Instance,
}

/// The type an operation's need applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationTarget {
    /// The type in the path.
    ThisType,
    /// Every type (only `*` scopes).
    AllTypes,
    /// Each `_type` parameter value, or every type without `_type` (Bulk Data `$export`).
    TypeParam,
}

/// The permissions one operation needs at one level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OperationRule {
    /// `$name`.
    pub name: &'static str,
    /// Level.
    pub level: OperationLevel,
    /// Types it is defined on (type and instance level); empty = any type.
    pub types: &'static [&'static str],
    /// What it needs.
    pub needs: &'static [(Permission, OperationTarget)],
}

macro_rules! op {
    ($name:literal, $level:ident, [$($t:literal),*], [$(($p:ident, $target:ident)),*]) => {
        OperationRule {
            name: $name,
            level: OperationLevel::$level,
            types: &[$($t),*],
            needs: &[$((Permission::$p, OperationTarget::$target)),*],
        }
    };
}

/// How operations map to SMART permissions. SMART defines no scopes for operations; this is
/// caregate's reading of what each one reads or writes (an operation not listed is denied).
pub const OPERATION_RULES: &[OperationRule] = &[
    op!(
        "$everything",
        Instance,
        ["Patient", "Encounter"],
        [(Read, ThisType), (Search, AllTypes)]
    ),
    op!(
        "$everything",
        Type,
        ["Patient", "Encounter"],
        [(Search, ThisType), (Search, AllTypes)]
    ),
    op!(
        "$export",
        System,
        [],
        [(Read, TypeParam), (Search, TypeParam)]
    ),
    op!(
        "$export",
        Type,
        ["Patient"],
        [(Read, TypeParam), (Search, TypeParam)]
    ),
    op!(
        "$export",
        Instance,
        ["Group"],
        [(Read, ThisType), (Read, TypeParam), (Search, TypeParam)]
    ),
    op!("$lastn", Type, ["Observation"], [(Search, ThisType)]),
    op!("$stats", Type, ["Observation"], [(Search, ThisType)]),
    op!("$match", Type, ["Patient"], [(Search, ThisType)]),
    op!(
        "$document",
        Instance,
        ["Composition"],
        [(Read, ThisType), (Read, AllTypes)]
    ),
    op!("$meta", System, [], [(Search, AllTypes)]),
    op!("$meta", Type, [], [(Search, ThisType)]),
    op!("$meta", Instance, [], [(Read, ThisType)]),
    op!("$meta-add", Instance, [], [(Update, ThisType)]),
    op!("$meta-delete", Instance, [], [(Update, ThisType)]),
    op!("$validate", Type, [], [(Read, ThisType)]),
    op!("$validate", Instance, [], [(Read, ThisType)]),
    op!("$expand", Type, ["ValueSet"], [(Read, ThisType)]),
    op!("$expand", Instance, ["ValueSet"], [(Read, ThisType)]),
    op!(
        "$validate-code",
        Type,
        ["ValueSet", "CodeSystem"],
        [(Read, ThisType)]
    ),
    op!(
        "$validate-code",
        Instance,
        ["ValueSet", "CodeSystem"],
        [(Read, ThisType)]
    ),
    op!("$lookup", Type, ["CodeSystem"], [(Read, ThisType)]),
    op!("$subsumes", Type, ["CodeSystem"], [(Read, ThisType)]),
    op!("$subsumes", Instance, ["CodeSystem"], [(Read, ThisType)]),
    op!("$translate", Type, ["ConceptMap"], [(Read, ThisType)]),
    op!("$translate", Instance, ["ConceptMap"], [(Read, ThisType)]),
];

#[derive(Debug, Clone, PartialEq, Eq)]
struct Need {
    permission: Permission,
    /// `None` = every type.
    resource_type: Option<String>,
    /// Needed to filter, not to return: restricted scopes cannot satisfy it.
    filter_only: bool,
}

enum Needs {
    Nothing,
    PerEntry,
    Unmapped,
    These(Vec<Need>),
}

fn push_need(
    needs: &mut Vec<Need>,
    permission: Permission,
    resource_type: Option<String>,
    filter_only: bool,
) {
    let need = Need {
        permission,
        resource_type,
        filter_only,
    };
    if !needs.contains(&need) {
        needs.push(need);
    }
}

/// `_type` values, or `[None]` (every type) without `_type`.
fn type_param_targets(req: &FhirRequest) -> Vec<Option<String>> {
    let types: Vec<Option<String>> = req
        .params_named("_type")
        .flat_map(|p| p.values.iter())
        .map(|v| Some(unescape(v)))
        .collect();
    if types.is_empty() {
        vec![None]
    } else {
        types
    }
}

fn needs_for(req: &FhirRequest) -> Needs {
    use Interaction as I;
    use Permission as P;
    let ty = req.resource_type.clone();
    let mut needs = Vec::new();
    match req.interaction {
        I::Capabilities => return Needs::Nothing,
        I::BatchOrTransaction => return Needs::PerEntry,
        I::Read | I::Vread | I::HistoryInstance => push_need(&mut needs, P::Read, ty, false),
        I::Update | I::Patch => push_need(&mut needs, P::Update, ty, false),
        I::Delete => push_need(&mut needs, P::Delete, ty, false),
        I::Create => push_need(&mut needs, P::Create, ty, false),
        I::ConditionalCreate => {
            push_need(&mut needs, P::Create, ty.clone(), false);
            push_need(&mut needs, P::Search, ty, false);
        }
        I::ConditionalUpdate | I::ConditionalPatch => {
            push_need(&mut needs, P::Update, ty.clone(), false);
            push_need(&mut needs, P::Search, ty, false);
        }
        I::ConditionalDelete => {
            push_need(&mut needs, P::Delete, ty.clone(), false);
            push_need(&mut needs, P::Search, ty, false);
        }
        I::SearchType | I::HistoryType | I::SearchCompartment => {
            push_need(&mut needs, P::Search, ty, false)
        }
        I::HistorySystem => push_need(&mut needs, P::Search, None, false),
        I::SearchSystem => {
            for t in type_param_targets(req) {
                push_need(&mut needs, P::Search, t, false);
            }
        }
        I::OperationSystem | I::OperationType | I::OperationInstance => {
            let level = match req.interaction {
                I::OperationSystem => OperationLevel::System,
                I::OperationType => OperationLevel::Type,
                _ => OperationLevel::Instance,
            };
            let name = req.operation.as_deref().unwrap_or_default();
            let rule = OPERATION_RULES.iter().find(|r| {
                r.name == name
                    && r.level == level
                    && (r.types.is_empty() || ty.as_deref().is_some_and(|t| r.types.contains(&t)))
            });
            let Some(rule) = rule else {
                return Needs::Unmapped;
            };
            for &(p, target) in rule.needs {
                match target {
                    OperationTarget::ThisType => push_need(&mut needs, p, ty.clone(), false),
                    OperationTarget::AllTypes => push_need(&mut needs, p, None, false),
                    OperationTarget::TypeParam => {
                        for t in type_param_targets(req) {
                            push_need(&mut needs, p, t, false);
                        }
                    }
                }
            }
        }
    }
    // Filters that look into other types reveal facts about them without returning them.
    if req.interaction.is_search() || req.interaction.is_conditional() {
        for p in &req.params {
            for t in p.has_types().into_iter().chain(p.chain_types()) {
                push_need(&mut needs, P::Search, Some(t.to_owned()), true);
            }
        }
    }
    Needs::These(needs)
}
