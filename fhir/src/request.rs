//! Classifying an HTTP request into a FHIR R4 RESTful interaction.

use crate::encoding::percent_decode;
use crate::error::ClassifyError;
use crate::params::{parse_params, parse_params_into, SearchParam};
use crate::resource_types::{is_compartment_type, is_resource_type};

/// The FHIR R4 interaction a request performs (<http://hl7.org/fhir/R4/http.html>).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interaction {
    /// `GET [type]/[id]`
    Read,
    /// `GET [type]/[id]/_history/[vid]`
    Vread,
    /// `PUT [type]/[id]` (update, or create with a client-chosen id: "upsert")
    Update,
    /// `PUT [type]?[search]`
    ConditionalUpdate,
    /// `PATCH [type]/[id]`
    Patch,
    /// `PATCH [type]?[search]`
    ConditionalPatch,
    /// `DELETE [type]/[id]`
    Delete,
    /// `DELETE [type]?[search]`
    ConditionalDelete,
    /// `POST [type]`
    Create,
    /// `POST [type]` with an `If-None-Exist` header; only produced by
    /// [`FhirRequest::with_if_none_exist`], since [`classify`] does not see headers.
    ConditionalCreate,
    /// `GET [type]/[id]/_history`
    HistoryInstance,
    /// `GET [type]/_history`
    HistoryType,
    /// `GET _history`
    HistorySystem,
    /// `GET [type]?…` or `POST [type]/_search`
    SearchType,
    /// `GET [base]?…` or `POST [base]/_search`
    SearchSystem,
    /// `GET [Compartment]/[id]/[type]` or `…/*` (and `POST …/[type]/_search`)
    SearchCompartment,
    /// `GET metadata`
    Capabilities,
    /// `POST [base]` with a Bundle; whether it is a batch or a transaction is read from the body later.
    BatchOrTransaction,
    /// `GET|POST $[name]`
    OperationSystem,
    /// `GET|POST [type]/$[name]`
    OperationType,
    /// `GET|POST [type]/[id]/$[name]` (or `[type]/[id]/_history/[vid]/$[name]`)
    OperationInstance,
}

impl Interaction {
    /// A stable lower-case name for logs and metric labels (`read`, `conditional-update`,
    /// `search-compartment`, `operation-instance`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Interaction::Read => "read",
            Interaction::Vread => "vread",
            Interaction::Update => "update",
            Interaction::ConditionalUpdate => "conditional-update",
            Interaction::Patch => "patch",
            Interaction::ConditionalPatch => "conditional-patch",
            Interaction::Delete => "delete",
            Interaction::ConditionalDelete => "conditional-delete",
            Interaction::Create => "create",
            Interaction::ConditionalCreate => "conditional-create",
            Interaction::HistoryInstance => "history-instance",
            Interaction::HistoryType => "history-type",
            Interaction::HistorySystem => "history-system",
            Interaction::SearchType => "search-type",
            Interaction::SearchSystem => "search-system",
            Interaction::SearchCompartment => "search-compartment",
            Interaction::Capabilities => "capabilities",
            Interaction::BatchOrTransaction => "batch-or-transaction",
            Interaction::OperationSystem => "operation-system",
            Interaction::OperationType => "operation-type",
            Interaction::OperationInstance => "operation-instance",
        }
    }

    /// Conditional create/update/patch/delete: the `params` select the target.
    pub fn is_conditional(self) -> bool {
        matches!(
            self,
            Interaction::ConditionalCreate
                | Interaction::ConditionalUpdate
                | Interaction::ConditionalPatch
                | Interaction::ConditionalDelete
        )
    }

    /// Search of any kind (type, system, compartment).
    pub fn is_search(self) -> bool {
        matches!(
            self,
            Interaction::SearchType | Interaction::SearchSystem | Interaction::SearchCompartment
        )
    }

    /// An operation (`$name`) at any level.
    pub fn is_operation(self) -> bool {
        matches!(
            self,
            Interaction::OperationSystem
                | Interaction::OperationType
                | Interaction::OperationInstance
        )
    }
}

/// A classified FHIR R4 request.
///
/// Field use by interaction (`-` = `None`/empty):
///
/// | interaction | resource_type | id | version_id | compartment | operation |
/// |---|---|---|---|---|---|
/// | read, update, patch, delete, history-instance | type | id | - | - | - |
/// | vread | type | id | vid | - | - |
/// | create, search-type, history-type, conditional-* | type | - | - | - | - |
/// | search-system, history-system, capabilities, batch-or-transaction | - | - | - | - | - |
/// | search-compartment | searched type, `None` for `*` | - | - | (type, id) | - |
/// | operation-system / -type / -instance | -, type, type | -, -, id | vid if on a version | - | `$name` |
///
/// `params` holds the URL's parameters, then (for a form POST) the body's, in order; for a
/// conditional interaction they are the search criteria.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FhirRequest {
    /// What the request does.
    pub interaction: Interaction,
    /// The resource type in the path (for a compartment search: the type searched for).
    pub resource_type: Option<String>,
    /// The logical id in the path.
    pub id: Option<String>,
    /// The version id after `_history/`.
    pub version_id: Option<String>,
    /// For a compartment search: the compartment type (`Patient`, `Encounter`, `RelatedPerson`,
    /// `Practitioner`, `Device`) and its id.
    pub compartment: Option<(String, String)>,
    /// The operation name with its `$` (`"$everything"`, `"$export"`).
    pub operation: Option<String>,
    /// Search / operation parameters (URL first, then form body).
    pub params: Vec<SearchParam>,
}

impl FhirRequest {
    fn new(interaction: Interaction) -> Self {
        FhirRequest {
            interaction,
            resource_type: None,
            id: None,
            version_id: None,
            compartment: None,
            operation: None,
            params: Vec::new(),
        }
    }

    /// The parameters called `name` (any modifier or chain).
    pub fn params_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a SearchParam> + 'a {
        self.params.iter().filter(move |p| p.name == name)
    }

    /// Turn a create into a conditional create, given the value of its `If-None-Exist` header
    /// (`identifier=http://…|123`, a leading `?` tolerated). The header's parameters are appended to
    /// `params`. Errors: `bad_request` if this is not a create or the header has no parameters,
    /// `bad_param` if they are malformed.
    pub fn with_if_none_exist(mut self, header_value: &str) -> Result<FhirRequest, ClassifyError> {
        if self.interaction != Interaction::Create {
            return Err(ClassifyError::bad_request(
                "If-None-Exist is only meaningful on a create",
            ));
        }
        let criteria = parse_params(header_value.trim())?;
        if criteria.is_empty() {
            return Err(ClassifyError::bad_request(
                "conditional create needs search criteria",
            ));
        }
        self.params.extend(criteria);
        self.interaction = Interaction::ConditionalCreate;
        Ok(self)
    }
}

/// The most path segments any R4 URL has (`[type]/[id]/_history/[vid]/$[op]`); longer is
/// rejected before any allocation per segment.
const MAX_SEGMENTS: usize = 5;

/// Parameters that shape the response and select nothing: a conditional update/patch/delete that
/// has only these has no criteria.
const RESULT_ONLY_PARAMS: [&str; 4] = ["_format", "_pretty", "_summary", "_elements"];

/// Classify an HTTP request to a FHIR R4 server.
///
/// * `method`: the HTTP method, upper case as sent (`HEAD` is read as `GET`). `GET HEAD POST PUT
///   PATCH DELETE` are known; anything else is `bad_request`.
/// * `path_below_base`: the path after the FHIR base (`/Patient/123` or `Patient/123`; the base
///   itself is `""` or `"/"`), without the query. Each segment is percent-decoded before it is
///   matched. Empty segments (`Patient//1`, a trailing `/`) are rejected.
/// * `query`: the raw query string, without `?` (tolerated), possibly empty.
/// * `content_type`: the `Content-Type` header. It matters only for POST: a form body
///   (`application/x-www-form-urlencoded`) carries parameters for `_search` and operations, and is
///   refused on create and batch/transaction (where a server might otherwise run it as a search).
/// * `form_body`: the body when it is form-encoded and the caller has buffered it; ignored otherwise.
///   When a POST `_search` or operation is form-encoded and `form_body` is `None`, only the URL's
///   parameters are seen; parameters in the body (a `_has`, a `_type`) can change the access
///   decision, so classify again with the body before deciding.
///
/// Never panics. Errors carry a stable [`ClassifyError::reason`] and never echo request data.
pub fn classify(
    method: &str,
    path_below_base: &str,
    query: &str,
    content_type: Option<&str>,
    form_body: Option<&[u8]>,
) -> Result<FhirRequest, ClassifyError> {
    let method = Method::parse(method)?;
    let segments = split_path(path_below_base)?;
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let is_form = content_type.is_some_and(is_form_content_type);

    let mut req = route(method, &segs)?;
    parse_params_into(query, &mut req.params)?;

    if method == Method::Post {
        let takes_form = req.interaction.is_search() || req.interaction.is_operation();
        match content_type {
            Some(_) if is_form && !takes_form => {
                return Err(ClassifyError::bad_request(
                    "a form-encoded body is only allowed on _search and operations",
                ));
            }
            Some(_) if !is_form && req.interaction.is_search() => {
                return Err(ClassifyError::bad_request(
                    "POST _search needs an application/x-www-form-urlencoded body",
                ));
            }
            _ => {}
        }
        if is_form && takes_form {
            if let Some(body) = form_body {
                let body = std::str::from_utf8(body)
                    .map_err(|_| ClassifyError::bad_param("form body is not UTF-8"))?;
                parse_params_into(body, &mut req.params)?;
            }
        }
    }

    if matches!(
        req.interaction,
        Interaction::ConditionalUpdate
            | Interaction::ConditionalPatch
            | Interaction::ConditionalDelete
    ) && req
        .params
        .iter()
        .all(|p| RESULT_ONLY_PARAMS.contains(&p.name.as_str()))
    {
        return Err(ClassifyError::bad_request(
            "a conditional update, patch or delete needs search criteria",
        ));
    }
    Ok(req)
}

/// Classify a relative URL as found in a Bundle entry's `request.url` (`Patient/123`,
/// `/Patient/example`, `Observation?code=…`): the part before the first `?` is the path, the rest
/// the query. No body parameters.
pub fn classify_relative_url(method: &str, url: &str) -> Result<FhirRequest, ClassifyError> {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    classify(method, path, query, None, None)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    fn parse(m: &str) -> Result<Method, ClassifyError> {
        match m {
            "GET" | "HEAD" => Ok(Method::Get),
            "POST" => Ok(Method::Post),
            "PUT" => Ok(Method::Put),
            "PATCH" => Ok(Method::Patch),
            "DELETE" => Ok(Method::Delete),
            _ => Err(ClassifyError::bad_request(
                "method not used by the FHIR REST API",
            )),
        }
    }
}

fn is_form_content_type(ct: &str) -> bool {
    let essence = ct.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/x-www-form-urlencoded")
}

fn split_path(path: &str) -> Result<Vec<String>, ClassifyError> {
    let path = path.strip_prefix('/').unwrap_or(path);
    if path.is_empty() {
        return Ok(Vec::new());
    }
    if path.split('/').nth(MAX_SEGMENTS).is_some() {
        return Err(ClassifyError::bad_request("too many path segments"));
    }
    path.split('/')
        .map(|seg| {
            if seg.is_empty() {
                return Err(ClassifyError::bad_request("empty path segment"));
            }
            percent_decode(seg, false)
                .map_err(|_| ClassifyError::bad_request("bad percent-encoding in the path"))
        })
        .collect()
}

/// `[A-Za-z0-9\-\.]{1,64}`, and not a dot segment (`.`/`..` would be resolved by URL normalisation
/// further down the line and change the target).
fn check_id(s: &str, what: &'static str) -> Result<String, ClassifyError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && s != "."
        && s != "..";
    if ok {
        Ok(s.to_owned())
    } else {
        Err(ClassifyError::bad_id(what))
    }
}

fn check_type(s: &str) -> Result<String, ClassifyError> {
    if is_resource_type(s) {
        Ok(s.to_owned())
    } else if s.starts_with('_') || s.starts_with('$') {
        Err(ClassifyError::bad_request("unknown special path segment"))
    } else {
        Err(ClassifyError::unknown_type("not an R4 resource type"))
    }
}

/// `$name` with name `[A-Za-z][A-Za-z0-9_.-]{0,63}`.
fn operation_name(seg: &str) -> Option<Result<String, ClassifyError>> {
    let name = seg.strip_prefix('$')?;
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphabetic()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.');
    Some(if ok {
        Ok(seg.to_owned())
    } else {
        Err(ClassifyError::bad_request("malformed operation name"))
    })
}

fn wrong_method() -> ClassifyError {
    ClassifyError::bad_request("method not allowed for this path")
}

fn operation(
    method: Method,
    interaction: Interaction,
    op: Result<String, ClassifyError>,
) -> Result<FhirRequest, ClassifyError> {
    if !matches!(method, Method::Get | Method::Post) {
        return Err(wrong_method());
    }
    let mut r = FhirRequest::new(interaction);
    r.operation = Some(op?);
    Ok(r)
}

fn route(method: Method, segs: &[&str]) -> Result<FhirRequest, ClassifyError> {
    use Interaction as I;
    use Method as M;
    match segs {
        [] => match method {
            M::Get => Ok(FhirRequest::new(I::SearchSystem)),
            M::Post => Ok(FhirRequest::new(I::BatchOrTransaction)),
            _ => Err(wrong_method()),
        },
        ["metadata"] => match method {
            M::Get => Ok(FhirRequest::new(I::Capabilities)),
            _ => Err(wrong_method()),
        },
        ["_history"] => match method {
            M::Get => Ok(FhirRequest::new(I::HistorySystem)),
            _ => Err(wrong_method()),
        },
        ["_search"] => match method {
            M::Post => Ok(FhirRequest::new(I::SearchSystem)),
            _ => Err(wrong_method()),
        },
        [op] if op.starts_with('$') => operation(
            method,
            I::OperationSystem,
            operation_name(op).unwrap_or(Err(wrong_method())),
        ),
        [ty] => {
            let ty = check_type(ty)?;
            let interaction = match method {
                M::Get => I::SearchType,
                M::Post => I::Create,
                M::Put => I::ConditionalUpdate,
                M::Patch => I::ConditionalPatch,
                M::Delete => I::ConditionalDelete,
            };
            let mut r = FhirRequest::new(interaction);
            r.resource_type = Some(ty);
            Ok(r)
        }
        [ty, second] => {
            let ty = check_type(ty)?;
            let mut r = match (*second, method) {
                ("_search", M::Post) => FhirRequest::new(I::SearchType),
                ("_history", M::Get) => FhirRequest::new(I::HistoryType),
                ("_search" | "_history", _) => return Err(wrong_method()),
                (op, _) if op.starts_with('$') => operation(
                    method,
                    I::OperationType,
                    operation_name(op).unwrap_or(Err(wrong_method())),
                )?,
                (id, _) => {
                    if id.starts_with('_') {
                        return Err(ClassifyError::bad_request("unknown special path segment"));
                    }
                    let id = check_id(id, "malformed logical id")?;
                    let mut r = FhirRequest::new(match method {
                        M::Get => I::Read,
                        M::Put => I::Update,
                        M::Patch => I::Patch,
                        M::Delete => I::Delete,
                        M::Post => return Err(wrong_method()),
                    });
                    r.id = Some(id);
                    r
                }
            };
            r.resource_type = Some(ty);
            Ok(r)
        }
        [ty, id, third] => {
            let ty = check_type(ty)?;
            let id = check_id(id, "malformed logical id")?;
            if *third == "_history" {
                if method != M::Get {
                    return Err(wrong_method());
                }
                let mut r = FhirRequest::new(I::HistoryInstance);
                r.resource_type = Some(ty);
                r.id = Some(id);
                return Ok(r);
            }
            if let Some(op) = operation_name(third) {
                let mut r = operation(method, I::OperationInstance, op)?;
                r.resource_type = Some(ty);
                r.id = Some(id);
                return Ok(r);
            }
            if method != M::Get {
                return Err(wrong_method());
            }
            compartment_search(ty, id, third)
        }
        [ty, id, "_history", vid] => {
            let ty = check_type(ty)?;
            let id = check_id(id, "malformed logical id")?;
            let vid = check_id(vid, "malformed version id")?;
            if method != M::Get {
                return Err(wrong_method());
            }
            let mut r = FhirRequest::new(I::Vread);
            r.resource_type = Some(ty);
            r.id = Some(id);
            r.version_id = Some(vid);
            Ok(r)
        }
        [ty, id, target, "_search"] if !target.starts_with('_') && !target.starts_with('$') => {
            let ty = check_type(ty)?;
            let id = check_id(id, "malformed logical id")?;
            if method != M::Post {
                return Err(wrong_method());
            }
            compartment_search(ty, id, target)
        }
        [ty, id, "_history", vid, op] if op.starts_with('$') => {
            let ty = check_type(ty)?;
            let id = check_id(id, "malformed logical id")?;
            let vid = check_id(vid, "malformed version id")?;
            let mut r = operation(
                method,
                I::OperationInstance,
                operation_name(op).unwrap_or(Err(wrong_method())),
            )?;
            r.resource_type = Some(ty);
            r.id = Some(id);
            r.version_id = Some(vid);
            Ok(r)
        }
        [ty, ..] => {
            // Check the type first so that `/NotAType/…` reads as an unknown type.
            check_type(ty)?;
            Err(ClassifyError::bad_request(
                "path does not match any FHIR interaction",
            ))
        }
    }
}

fn compartment_search(
    compartment: String,
    id: String,
    target: &str,
) -> Result<FhirRequest, ClassifyError> {
    if !is_compartment_type(&compartment) {
        return Err(ClassifyError::bad_request("not a compartment type"));
    }
    let mut r = FhirRequest::new(Interaction::SearchCompartment);
    if target != "*" {
        r.resource_type = Some(check_type(target)?);
    }
    r.compartment = Some((compartment, id));
    Ok(r)
}
