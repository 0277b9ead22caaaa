//! Per-listener route tables. A listener's table holds only the routes configured for it, so an
//! internal route can never be matched on the public listener, whatever the path or Host.

use crate::apis::{ApiBinding, RequestedVersion, VersionSelect};
use caregate_filters::Filter;
use std::collections::HashMap;
use std::sync::Arc;

/// A route, built and immutable.
pub struct Route {
    pub name: Arc<str>,
    pub hosts: Vec<String>,
    pub path_prefix: String,
    /// Upper-case methods; empty = any.
    pub methods: Vec<String>,
    pub fhir: bool,
    /// The route carries PHI: audited, tenant isolation enforced.
    pub phi: bool,
    /// Index of the route's pool in its generation (none for an `hl7: true` route).
    pub pool: usize,
    /// HL7 v2 ingestion: the gateway answers each POST with the message's acknowledgement.
    pub hl7: bool,
    pub upstream_prefix: Option<String>,
    pub filters: Vec<Arc<dyn Filter>>,
    /// The API version this route serves (a copy of an API's route), if any.
    pub api: Option<Arc<ApiBinding>>,
    /// The developer portal's own route: answered by the gateway.
    pub portal: bool,
}

impl Route {
    fn host_matches(&self, host: Option<&str>) -> bool {
        if self.hosts.is_empty() {
            return true;
        }
        let Some(host) = host else { return false };
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
    }

    fn path_matches(&self, path: &str) -> bool {
        if self.path_prefix == "/" {
            return true;
        }
        match path.strip_prefix(self.path_prefix.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }

    fn version_matches(&self, v: Option<&RequestedVersion>) -> bool {
        match (&self.api, v) {
            (None, _) => true,
            (Some(b), Some(v)) => b.matches(v),
            (Some(b), None) => b.matches(&RequestedVersion::default()),
        }
    }

    fn method_matches(&self, method: &str) -> bool {
        self.methods.is_empty() || self.methods.iter().any(|m| m == method)
    }

    /// The path sent upstream for a (normalised) request path.
    pub fn upstream_path(&self, path: &str) -> String {
        match &self.upstream_prefix {
            None => path.to_string(),
            Some(up) => {
                let rest = if self.path_prefix == "/" {
                    path
                } else {
                    path.strip_prefix(self.path_prefix.as_str()).unwrap_or(path)
                };
                let up = up.trim_end_matches('/');
                if rest.is_empty() {
                    if up.is_empty() {
                        "/".to_string()
                    } else {
                        up.to_string()
                    }
                } else {
                    format!("{up}{rest}")
                }
            }
        }
    }
}

/// Outcome of a route lookup.
pub enum RouteMatch<'a> {
    Found(&'a Arc<Route>),
    /// A route matches host and path but not the method.
    MethodNotAllowed(&'a Arc<Route>),
    NotFound,
}

/// The routes of one listener, longest prefix first, indexed by host: a lookup scans only the
/// routes that name the request's host and the host-less ones, so a thousand routes spread over a
/// hundred hospitals cost what ten do.
#[derive(Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    /// Lower-case host -> indexes (in table order) of the routes naming it and of host-less routes.
    by_host: HashMap<String, Vec<usize>>,
    /// Indexes of the host-less routes: the candidates for a host no route names.
    hostless: Vec<usize>,
    /// Some route is chosen by the request's `API-Version` header or `Accept` version.
    by_version: bool,
}

impl RouteTable {
    pub fn new(mut routes: Vec<Arc<Route>>) -> Self {
        // Longest prefix first; routes with host constraints before host-less ones of the same
        // prefix; otherwise config order (stable sort).
        routes.sort_by(|a, b| {
            b.path_prefix
                .len()
                .cmp(&a.path_prefix.len())
                .then_with(|| a.hosts.is_empty().cmp(&b.hosts.is_empty()))
        });
        let hostless: Vec<usize> = (0..routes.len())
            .filter(|&i| routes[i].hosts.is_empty())
            .collect();
        let mut by_host: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, r) in routes.iter().enumerate() {
            for h in &r.hosts {
                let list = by_host.entry(h.to_ascii_lowercase()).or_default();
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
        }
        for list in by_host.values_mut() {
            list.extend_from_slice(&hostless);
            list.sort_unstable();
            list.dedup();
        }
        let by_version = routes.iter().any(|r| {
            r.api
                .as_ref()
                .is_some_and(|b| b.select != VersionSelect::Path)
        });
        RouteTable {
            routes,
            by_host,
            hostless,
            by_version,
        }
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Whether some route is chosen by the version a request names in a header (then pass
    /// that version to [`RouteTable::lookup_version`]).
    pub fn by_version(&self) -> bool {
        self.by_version
    }

    /// Every route, longest prefix first.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// Match a normalised path. `host` is the request host without port, lower-case.
    ///
    /// The most specific route for host and path decides: when its method list refuses the
    /// method, only routes of exactly the same host constraint and prefix (a prefix split by
    /// method) are considered, never a shorter or looser route — otherwise a `DELETE` refused
    /// by a strict route would slip through to a permissive parent route.
    pub fn lookup(&self, host: Option<&str>, path: &str, method: &str) -> RouteMatch<'_> {
        self.lookup_version(host, path, method, None)
    }

    /// [`RouteTable::lookup`], with the version the request names (`API-Version`, or the
    /// `version` parameter of its `Accept` media type) choosing among the versions of an API
    /// served at the same prefix. A request naming no version gets the API's default version.
    pub fn lookup_version(
        &self,
        host: Option<&str>,
        path: &str,
        method: &str,
        version: Option<&RequestedVersion>,
    ) -> RouteMatch<'_> {
        let indexes = match host {
            Some(h) if h.bytes().any(|b| b.is_ascii_uppercase()) => {
                self.by_host.get(&h.to_ascii_lowercase())
            }
            Some(h) => self.by_host.get(h),
            None => None,
        }
        .unwrap_or(&self.hostless);
        let mut candidates = indexes
            .iter()
            .map(|&i| &self.routes[i])
            .filter(|r| r.host_matches(host) && r.path_matches(path) && r.version_matches(version));
        let Some(first) = candidates.next() else {
            return RouteMatch::NotFound;
        };
        if first.method_matches(method) {
            return RouteMatch::Found(first);
        }
        for r in candidates {
            if r.path_prefix != first.path_prefix || r.hosts != first.hosts {
                break;
            }
            if r.method_matches(method) {
                return RouteMatch::Found(r);
            }
        }
        RouteMatch::MethodNotAllowed(first)
    }
}

/// The host of a request (Host header, or the URI authority), without port, lower-case.
pub fn request_host(host_header: Option<&str>, uri_host: Option<&str>) -> Option<String> {
    let raw = host_header.or(uri_host)?;
    let raw = raw.trim();
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or("")
    } else {
        raw.rsplit_once(':').map(|(h, _)| h).unwrap_or(raw)
    };
    let host = host.trim_end_matches('.');
    if host.is_empty() {
        None
    } else {
        Some(host.to_ascii_lowercase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, hosts: &[&str], prefix: &str, methods: &[&str]) -> Arc<Route> {
        Arc::new(Route {
            name: Arc::from(name),
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
            path_prefix: prefix.to_string(),
            methods: methods.iter().map(|s| s.to_string()).collect(),
            fhir: false,
            phi: false,
            pool: 0,
            hl7: false,
            upstream_prefix: None,
            filters: vec![],
            api: None,
            portal: false,
        })
    }

    fn found(t: &RouteTable, host: Option<&str>, path: &str, method: &str) -> Option<String> {
        match t.lookup(host, path, method) {
            RouteMatch::Found(r) => Some(r.name.to_string()),
            RouteMatch::MethodNotAllowed(_) => Some("405".into()),
            RouteMatch::NotFound => None,
        }
    }

    #[test]
    fn longest_prefix_host_and_method() {
        let t = RouteTable::new(vec![
            route("root", &[], "/", &[]),
            route("fhir", &[], "/fhir", &["GET", "POST"]),
            route("fhir-admin", &[], "/fhir/admin", &["GET"]),
            route("portal", &["portal.example.org"], "/fhir", &["GET"]),
        ]);
        assert_eq!(
            found(&t, None, "/fhir/Patient", "GET").as_deref(),
            Some("fhir")
        );
        assert_eq!(
            found(&t, Some("portal.example.org"), "/fhir/Patient", "GET").as_deref(),
            Some("portal")
        );
        assert_eq!(found(&t, None, "/fhirx", "GET").as_deref(), Some("root"));
        assert_eq!(
            found(&t, None, "/fhir/admin/x", "GET").as_deref(),
            Some("fhir-admin")
        );
        // A method refused by the most specific route is a 405 there, never a fall-through to
        // the looser parent route.
        assert_eq!(
            found(&t, None, "/fhir/admin/x", "POST").as_deref(),
            Some("405")
        );
        assert_eq!(
            found(&t, Some("portal.example.org"), "/fhir/Patient", "POST").as_deref(),
            Some("405")
        );
        // The same prefix split by method is still one decision.
        let split = RouteTable::new(vec![
            route("read", &[], "/fhir", &["GET"]),
            route("write", &[], "/fhir", &["POST"]),
        ]);
        assert_eq!(
            found(&split, None, "/fhir/Patient", "POST").as_deref(),
            Some("write")
        );
        assert_eq!(
            found(&split, None, "/fhir/Patient", "DELETE").as_deref(),
            Some("405")
        );
        let t2 = RouteTable::new(vec![route("fhir", &[], "/fhir", &["GET"])]);
        assert_eq!(found(&t2, None, "/fhir", "DELETE").as_deref(), Some("405"));
        assert_eq!(found(&t2, None, "/other", "GET"), None);
    }

    /// The host index answers exactly what a scan of every route in table order answers.
    #[test]
    fn host_index_agrees_with_a_full_scan() {
        let mut routes = vec![];
        let prefixes = ["/", "/fhir", "/fhir/admin", "/svc1", "/billing"];
        let methods: [&[&str]; 3] = [&[], &["GET"], &["POST", "PUT"]];
        for i in 0..300 {
            let hosts: Vec<String> = match i % 4 {
                0 => vec![],
                1 => vec![format!("h{}.example.org", i % 30)],
                2 => vec![format!("H{}.Example.org", i % 30), "shared.example".into()],
                _ => vec![format!("h{}.example.org", (i + 7) % 30)],
            };
            let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
            routes.push(route(
                &format!("r{i}"),
                &hosts,
                prefixes[i % prefixes.len()],
                methods[i % methods.len()],
            ));
        }
        let t = RouteTable::new(routes);
        let scan = |host: Option<&str>, path: &str, method: &str| -> Option<String> {
            let mut c = t
                .routes
                .iter()
                .filter(|r| r.host_matches(host) && r.path_matches(path));
            let first = c.next()?;
            if first.method_matches(method) {
                return Some(first.name.to_string());
            }
            for r in c {
                if r.path_prefix != first.path_prefix || r.hosts != first.hosts {
                    break;
                }
                if r.method_matches(method) {
                    return Some(r.name.to_string());
                }
            }
            Some("405".into())
        };
        let mut checked = 0;
        for h in (0..32).map(|i| Some(format!("h{i}.example.org"))).chain([
            None,
            Some("shared.example".into()),
            Some("nowhere".into()),
        ]) {
            for path in [
                "/",
                "/fhir/Patient/1",
                "/fhir/admin/x",
                "/svc1/a",
                "/billing",
                "/x",
            ] {
                for m in ["GET", "POST", "DELETE"] {
                    assert_eq!(
                        found(&t, h.as_deref(), path, m),
                        scan(h.as_deref(), path, m),
                        "{h:?} {path} {m}"
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 35 * 6 * 3);
        // Upper case in a request host finds the same routes as lower case.
        assert_eq!(
            found(&t, Some("H3.EXAMPLE.ORG"), "/fhir/Patient/1", "GET"),
            found(&t, Some("h3.example.org"), "/fhir/Patient/1", "GET")
        );
    }

    #[test]
    fn upstream_prefix_rewrites() {
        let mut r = route("v1", &[], "/v1/fhir", &[]);
        if let Some(r) = Arc::get_mut(&mut r) {
            r.upstream_prefix = Some("/fhir".into());
        }
        assert_eq!(r.upstream_path("/v1/fhir/Patient/1"), "/fhir/Patient/1");
        assert_eq!(r.upstream_path("/v1/fhir"), "/fhir");
    }

    #[test]
    fn hosts() {
        assert_eq!(
            request_host(Some("Example.ORG:8080"), None).as_deref(),
            Some("example.org")
        );
        assert_eq!(request_host(Some("[::1]:80"), None).as_deref(), Some("::1"));
        assert_eq!(request_host(None, Some("a.b")).as_deref(), Some("a.b"));
        assert_eq!(
            request_host(Some("example.org."), None).as_deref(),
            Some("example.org")
        );
        assert_eq!(request_host(None, None), None);
    }
}
