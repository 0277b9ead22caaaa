//! The `hl7:` section of the config: MLLP listeners, the known sending facilities and the
//! message routes (see `docs/hl7.md`), and their validation.

use crate::config::{Config, PoolProtocol, TlsListenerConfig};
use caregate_filters::Channel;
use ipnet::IpNet;
use serde::Deserialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hl7Config {
    /// Sending facilities (MSH-4) the gateway knows, each with the tenant its messages belong
    /// to. Metrics label facilities from this set only.
    #[serde(default)]
    pub facilities: Vec<FacilityConfig>,
    #[serde(default)]
    pub listeners: Vec<MllpListenerConfig>,
    /// First match wins.
    #[serde(default)]
    pub routes: Vec<Hl7RouteConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FacilityConfig {
    /// MSH-4.1 (the namespace id), or MSH-4.2 when 4.1 is empty.
    pub name: String,
    #[serde(default)]
    pub tenant: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MllpListenerConfig {
    pub name: String,
    pub listen: SocketAddr,
    #[serde(default = "internal")]
    pub channel: Channel,
    #[serde(default)]
    pub tls: Option<TlsListenerConfig>,
    /// Peer addresses admitted at connect; empty = any.
    #[serde(default)]
    pub clients: Vec<IpNet>,
    /// The largest message (frame content) accepted.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// A connection silent this long (between messages) is closed.
    #[serde(default = "default_idle")]
    pub idle_timeout_seconds: u64,
    /// Messages handled at once on this listener, across its connections.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
}

fn internal() -> Channel {
    Channel::Internal
}
fn default_max_message() -> usize {
    caregate_hl7::mllp::DEFAULT_MAX_FRAME
}
fn default_idle() -> u64 {
    300
}
fn default_in_flight() -> usize {
    256
}
fn default_ack_timeout() -> u64 {
    10_000
}
fn default_path() -> String {
    "/".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hl7RouteConfig {
    pub name: String,
    /// The MLLP listener whose messages this route takes ...
    #[serde(default)]
    pub listener: Option<String>,
    /// ... or the `hl7: true` HTTP route whose messages it takes.
    #[serde(default)]
    pub http_route: Option<String>,
    /// `TYPE` or `TYPE^TRIGGER`; empty = any.
    #[serde(default)]
    pub message_types: Vec<String>,
    /// Match: the sending facility (MSH-4); empty = any.
    #[serde(default)]
    pub sending_facilities: Vec<String>,
    /// Match: the tenant of the sending facility; empty = any.
    #[serde(default)]
    pub tenants: Vec<String>,
    /// Allowlist: the sending application (MSH-3); empty = any.
    #[serde(default)]
    pub sending_applications: Vec<String>,
    /// Allowlist: the peer address; empty = any.
    #[serde(default)]
    pub clients: Vec<IpNet>,
    /// Allowlist: the common name of the verified client certificate; empty = any.
    #[serde(default)]
    pub client_certs: Vec<String>,
    /// The destination pool (`protocol: mllp` or `http`).
    pub pool: String,
    /// HTTP pools: the path messages are POSTed to.
    #[serde(default = "default_path")]
    pub path: String,
    /// Sent, and no acknowledgement by then: the sender gets `AR`.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_ms: u64,
}

/// `TYPE` or `TYPE^TRIGGER`: letters and digits, 1–3 + 1–4 of them (a bounded label set).
pub fn valid_message_type(t: &str) -> bool {
    let ok = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_alphanumeric())
    };
    match t.split_once('^') {
        Some((ty, trig)) => ok(ty, 3) && (trig == "*" || ok(trig, 4)),
        None => ok(t, 3),
    }
}

fn names_unique<'a>(what: &str, names: impl Iterator<Item = &'a str>) -> Result<(), String> {
    let mut seen = HashSet::new();
    for (i, n) in names.enumerate() {
        if n.trim().is_empty() {
            return Err(format!("{what}[{i}].name: must not be empty"));
        }
        if !seen.insert(n) {
            return Err(format!("{what}[{i}].name: duplicate name `{n}`"));
        }
    }
    Ok(())
}

/// Cross-references and values of the `hl7:` section (and of `hl7: true` HTTP routes).
pub fn validate(c: &Config, base_dir: &Path) -> Result<(), String> {
    let h = &c.hl7;
    names_unique(
        "hl7.facilities",
        h.facilities.iter().map(|f| f.name.as_str()),
    )?;
    names_unique("hl7.listeners", h.listeners.iter().map(|l| l.name.as_str()))?;
    names_unique("hl7.routes", h.routes.iter().map(|r| r.name.as_str()))?;
    for (i, f) in h.facilities.iter().enumerate() {
        if let Some(t) = &f.tenant {
            if !c.tenants.iter().any(|x| x.id == *t) {
                return Err(format!(
                    "hl7.facilities[{i}] ({}).tenant: no tenant with id `{t}`",
                    f.name
                ));
            }
        }
    }
    for (i, l) in h.listeners.iter().enumerate() {
        let at = format!("hl7.listeners[{i}] ({})", l.name);
        if l.max_message_bytes < 64 || l.max_message_bytes > 64 << 20 {
            return Err(format!(
                "{at}.max_message_bytes: between 64 bytes and 64 MiB"
            ));
        }
        if l.idle_timeout_seconds == 0 {
            return Err(format!("{at}.idle_timeout_seconds: must be at least 1"));
        }
        if l.max_in_flight == 0 {
            return Err(format!("{at}.max_in_flight: must be at least 1"));
        }
        if c.listeners.iter().any(|x| x.name == l.name) {
            return Err(format!(
                "{at}.name: `{}` is also the name of an HTTP listener",
                l.name
            ));
        }
        if let Some(t) = &l.tls {
            for (what, p) in [
                ("cert", Some(&t.cert)),
                ("key", Some(&t.key)),
                ("client_ca", t.client_ca.as_ref()),
            ] {
                if let Some(p) = p {
                    let full = if p.is_absolute() {
                        p.clone()
                    } else {
                        base_dir.join(p)
                    };
                    if !full.is_file() && !crate::config::offline() {
                        return Err(format!("{at}.tls.{what}: cannot read {}", full.display()));
                    }
                }
            }
            if t.require_client_cert && t.client_ca.is_none() {
                return Err(format!("{at}.tls.require_client_cert: needs `client_ca`"));
            }
        }
    }
    for (i, r) in h.routes.iter().enumerate() {
        let at = format!("hl7.routes[{i}] ({})", r.name);
        match (&r.listener, &r.http_route) {
            (Some(l), None) => {
                if !h.listeners.iter().any(|x| x.name == *l) {
                    return Err(format!("{at}.listener: no hl7 listener named `{l}`"));
                }
            }
            (None, Some(hr)) => match c.routes.iter().find(|x| x.name == *hr) {
                Some(x) if x.hl7 => {}
                Some(_) => {
                    return Err(format!(
                        "{at}.http_route: route `{hr}` does not have `hl7: true`"
                    ))
                }
                None => return Err(format!("{at}.http_route: no route named `{hr}`")),
            },
            _ => {
                return Err(format!(
                    "{at}: give exactly one of `listener` (an hl7 listener) or `http_route`"
                ))
            }
        }
        for (j, t) in r.message_types.iter().enumerate() {
            if !valid_message_type(t) {
                return Err(format!(
                    "{at}.message_types[{j}]: `{t}` is not TYPE or TYPE^TRIGGER (e.g. ORU^R01)"
                ));
            }
        }
        for (j, f) in r.sending_facilities.iter().enumerate() {
            if !h.facilities.iter().any(|x| x.name == *f) {
                return Err(format!(
                    "{at}.sending_facilities[{j}]: `{f}` is not in hl7.facilities"
                ));
            }
        }
        for (j, t) in r.tenants.iter().enumerate() {
            if !c.tenants.iter().any(|x| x.id == *t) {
                return Err(format!("{at}.tenants[{j}]: no tenant with id `{t}`"));
            }
        }
        match c.pools.iter().find(|p| p.name == r.pool) {
            None => return Err(format!("{at}.pool: no pool named `{}`", r.pool)),
            Some(p) if p.protocol == PoolProtocol::Http => {
                if !r.path.starts_with('/') || crate::hygiene::normalize_path(&r.path).is_err() {
                    return Err(format!("{at}.path: must be an absolute path"));
                }
            }
            Some(_) => {}
        }
        if r.ack_timeout_ms == 0 || r.ack_timeout_ms > 600_000 {
            return Err(format!("{at}.ack_timeout_ms: between 1 and 600000"));
        }
    }
    for (i, r) in c.routes.iter().enumerate() {
        if r.hl7
            && !h
                .routes
                .iter()
                .any(|x| x.http_route.as_deref() == Some(&r.name))
        {
            return Err(format!(
                "routes[{i}] ({}).hl7: no hl7.routes entry names this route in `http_route`",
                r.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const BASE: &str = r#"
listeners: [ { name: internal, channel: internal, listen: "127.0.0.1:0" } ]
tenants: [ { id: north } ]
pools:
  - { name: lab, protocol: mllp, zones: [ { name: a, backends: [ { address: "127.0.0.1:9" } ] } ] }
  - { name: web, zones: [ { name: a, backends: [ { address: "127.0.0.1:9" } ] } ] }
routes:
  - { name: api, listener: internal, path_prefix: /api, pool: web }
  - { name: ingest, listener: internal, path_prefix: /hl7, hl7: true }
hl7:
  facilities: [ { name: NORTH_LAB, tenant: north }, { name: REF_LAB } ]
  listeners: [ { name: mllp, listen: "127.0.0.1:0" } ]
  routes:
    - { name: results, listener: mllp, message_types: [ "ORU^R01", "ADT" ], sending_facilities: [ NORTH_LAB ], tenants: [ north ], pool: lab }
    - { name: over-http, http_route: ingest, pool: web, path: /v2 }
"#;

    fn check(text: &str) -> Result<(), String> {
        crate::config::load_str(text, std::path::PathBuf::from("."))
            .map(|_| ())
            .map_err(|e| e.0)
    }

    #[test]
    fn the_base_config_is_valid_and_defaults_apply() {
        check(BASE).unwrap();
        let c = crate::config::parse(BASE).unwrap();
        let l = &c.hl7.listeners[0];
        assert_eq!(l.max_message_bytes, 1 << 20);
        assert_eq!((l.idle_timeout_seconds, l.max_in_flight), (300, 256));
        assert_eq!(l.channel, Channel::Internal);
        assert_eq!(c.hl7.routes[0].ack_timeout_ms, 10_000);
        assert_eq!(c.pools[0].protocol, PoolProtocol::Mllp);
        assert_eq!(c.pools[1].protocol, PoolProtocol::Http);
    }

    #[test]
    fn message_types_are_bounded() {
        for ok in ["ORU", "ORU^R01", "ADT^A08", "ADT^*", "QBP^Q11"] {
            assert!(valid_message_type(ok), "{ok}");
        }
        for bad in [
            "",
            "ORUX",
            "ORU^",
            "^R01",
            "OR U",
            "ORU^R01^ORU_R01",
            "ORU^R0101",
        ] {
            assert!(!valid_message_type(bad), "{bad}");
        }
    }

    #[test]
    fn each_mistake_is_named_with_its_place() {
        let cases = [
            (
                "listener: mllp, message_types",
                "listener: nope, message_types",
                "hl7.routes[0] (results).listener: no hl7 listener named `nope`",
            ),
            (
                "{ name: over-http, http_route: ingest,",
                "{ name: over-http, http_route: api,",
                "hl7.routes[1] (over-http).http_route: route `api` does not have `hl7: true`",
            ),
            (
                "sending_facilities: [ NORTH_LAB ]",
                "sending_facilities: [ SOUTH_LAB ]",
                "hl7.routes[0] (results).sending_facilities[0]: `SOUTH_LAB` is not in hl7.facilities",
            ),
            (
                "\"ORU^R01\", \"ADT\"",
                "\"ORU^R01\", \"ADT A01\"",
                "hl7.routes[0] (results).message_types[1]: `ADT A01` is not TYPE or TYPE^TRIGGER (e.g. ORU^R01)",
            ),
            (
                "tenants: [ north ], pool: lab",
                "tenants: [ east ], pool: lab",
                "hl7.routes[0] (results).tenants[0]: no tenant with id `east`",
            ),
            (
                "tenants: [ north ], pool: lab",
                "tenants: [ north ], pool: gone",
                "hl7.routes[0] (results).pool: no pool named `gone`",
            ),
            (
                "{ name: over-http, http_route: ingest,",
                "{ name: over-http, listener: mllp, http_route: ingest,",
                "hl7.routes[1] (over-http): give exactly one of `listener` (an hl7 listener) or `http_route`",
            ),
            (
                "path_prefix: /api, pool: web",
                "path_prefix: /api, pool: lab",
                "routes[0] (api).pool: `lab` is an MLLP pool; HTTP routes need an HTTP pool",
            ),
            (
                "path_prefix: /hl7, hl7: true",
                "path_prefix: /hl7, hl7: true, pool: web",
                "routes[1] (ingest).pool: an `hl7: true` route sends each message where its `hl7.routes` say; remove `pool`",
            ),
            (
                "{ name: REF_LAB }",
                "{ name: REF_LAB, tenant: west }",
                "hl7.facilities[1] (REF_LAB).tenant: no tenant with id `west`",
            ),
            (
                "{ name: mllp, listen: \"127.0.0.1:0\" }",
                "{ name: mllp, listen: \"127.0.0.1:0\", max_in_flight: 0 }",
                "hl7.listeners[0] (mllp).max_in_flight: must be at least 1",
            ),
        ];
        for (from, to, want) in cases {
            assert!(BASE.contains(from), "{from}");
            let e = check(&BASE.replacen(from, to, 1)).unwrap_err();
            assert_eq!(e, want);
        }
        // An hl7: true route that no hl7 route takes messages from.
        let e = check(&BASE.replace(
            "- { name: over-http, http_route: ingest, pool: web, path: /v2 }",
            "",
        ))
        .unwrap_err();
        assert_eq!(
            e,
            "routes[1] (ingest).hl7: no hl7.routes entry names this route in `http_route`"
        );
    }
}
