//! Per-listener route tables. A listener's table holds only the routes configured for it, so an
//! internal route can never be matched on the public listener, whatever the path or Host.

use caregate_filters::Filter;
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
    pub pool: usize,
    pub upstream_prefix: Option<String>,
    pub filters: Vec<Arc<dyn Filter>>,
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

/// The routes of one listener, longest prefix first.
#[derive(Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
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
        RouteTable { routes }
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Match a normalised path. `host` is the request host without port, lower-case.
    ///
    /// The most specific route for host and path decides: when its method list refuses the
    /// method, only routes of exactly the same host constraint and prefix (a prefix split by
    /// method) are considered, never a shorter or looser route — otherwise a `DELETE` refused
    /// by a strict route would slip through to a permissive parent route.
    pub fn lookup(&self, host: Option<&str>, path: &str, method: &str) -> RouteMatch<'_> {
        let mut candidates = self
            .routes
            .iter()
            .filter(|r| r.host_matches(host) && r.path_matches(path));
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
            upstream_prefix: None,
            filters: vec![],
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
