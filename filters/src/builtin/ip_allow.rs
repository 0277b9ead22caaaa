//! `ip_allow`: refuse requests by client address (CIDR allow/deny lists, IPv4 and IPv6) and,
//! optionally, by country (geofencing from a MaxMind-format database, e.g. GeoLite2-Country).
//!
//! ```yaml
//! - kind: ip_allow
//!   config:
//!     mode: enforce                      # enforce | shadow | off (default enforce)
//!     allow: [10.0.0.0/8, 192.0.2.10, "2001:db8:100::/48"]   # optional: the address must be in it
//!     deny: [10.66.0.0/16]               # optional: always refused (deny wins over allow)
//!     geoip:                             # optional
//!       database: geo/GeoLite2-Country.mmdb   # relative to the config file's folder
//!       allow_countries: [NL, DE]        # optional: the address's country must be listed
//!       deny_countries: [KP]             # optional
//! ```
//! The address judged is the real client address the gateway computed (`RequestCtx::client_addr`:
//! the peer, or the forwarded client behind a trusted proxy); an IPv4-mapped IPv6 address
//! (`::ffff:192.0.2.1`) is judged as the IPv4 address. A request without a client address is
//! refused. Every configured check must pass: not in `deny`; in `allow` when given; and, with
//! `geoip`, a country not in `deny_countries` and, when `allow_countries` is given, a country in
//! it. The country is the record's `country.iso_code`, or `registered_country.iso_code` when the
//! record has no `country`; an address the database does not know has no country (so it is
//! refused when `allow_countries` is given). A bare address in `allow`/`deny` means that one host.
//!
//! The database is loaded and fully verified (search tree, data section and metadata, as MaxMind's
//! own verifier does; e.g. the metadata must carry a description) when the filter is built, so a
//! lookup cannot fail on a request; a file that cannot be read or does not verify is a build error
//! naming `config.geoip.database`.
//!
//! Reason code: 403 `ip_not_allowed` (the detail never names the address or its country).

use crate::registry::{parse_config, BuildContext, BuildError};
use crate::{Decision, Filter, FilterError, LocalReply, Mode, RequestCtx, RequestHeader, Result};
use async_trait::async_trait;
use http::StatusCode;
use ipnet::IpNet;
use serde::Deserialize;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpAllowConfig {
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    #[serde(default)]
    pub deny: Vec<String>,
    #[serde(default)]
    pub geoip: Option<GeoIpConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoIpConfig {
    pub database: PathBuf,
    #[serde(default)]
    pub allow_countries: Option<Vec<String>>,
    #[serde(default)]
    pub deny_countries: Vec<String>,
}

struct GeoFence {
    reader: maxminddb::Reader<Vec<u8>>,
    /// The database holds IPv4 addresses only.
    ipv4_only: bool,
    allow: Option<Vec<String>>,
    deny: Vec<String>,
}

pub struct IpAllowFilter {
    mode: Mode,
    allow: Option<Vec<IpNet>>,
    deny: Vec<IpNet>,
    geo: Option<GeoFence>,
}

/// The part of a GeoIP2/GeoLite2 Country or City record this filter reads.
#[derive(Debug, Default, Deserialize)]
struct GeoRecord<'a> {
    #[serde(borrow, default)]
    country: Option<IsoCode<'a>>,
    #[serde(borrow, default)]
    registered_country: Option<IsoCode<'a>>,
}

#[derive(Debug, Default, Deserialize)]
struct IsoCode<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
}

fn parse_nets(place: &str, list: &[String]) -> std::result::Result<Vec<IpNet>, BuildError> {
    let mut out = Vec::with_capacity(list.len());
    for (i, s) in list.iter().enumerate() {
        let s = s.trim();
        let net = s
            .parse::<IpNet>()
            .map(|n| n.trunc())
            .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| {
                BuildError::new(
                    format!("{place}[{i}]"),
                    format!("`{s}` is not an IP network (CIDR) or address"),
                )
            })?;
        out.push(net);
    }
    Ok(out)
}

fn parse_countries(place: &str, list: &[String]) -> std::result::Result<Vec<String>, BuildError> {
    let mut out = Vec::with_capacity(list.len());
    for (i, c) in list.iter().enumerate() {
        let c = c.trim();
        if c.len() != 2 || !c.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(BuildError::new(
                format!("{place}[{i}]"),
                format!("`{c}` is not an ISO 3166-1 alpha-2 country code"),
            ));
        }
        out.push(c.to_ascii_uppercase());
    }
    Ok(out)
}

fn build_geo(g: GeoIpConfig, cx: &BuildContext) -> std::result::Result<GeoFence, BuildError> {
    let allow = match &g.allow_countries {
        None => None,
        Some(list) if list.is_empty() => {
            return Err(BuildError::new(
                "config.geoip.allow_countries",
                "an empty list would refuse every request; omit it to allow all countries",
            ))
        }
        Some(list) => Some(parse_countries("config.geoip.allow_countries", list)?),
    };
    let deny = parse_countries("config.geoip.deny_countries", &g.deny_countries)?;
    if allow.is_none() && deny.is_empty() {
        return Err(BuildError::new(
            "config.geoip",
            "name allow_countries or deny_countries",
        ));
    }
    let path = cx.resolve(&g.database);
    let reader = maxminddb::Reader::open_readfile(&path).map_err(|e| {
        BuildError::new(
            "config.geoip.database",
            format!("cannot load MaxMind database {}: {e}", path.display()),
        )
    })?;
    reader.verify().map_err(|e| {
        BuildError::new(
            "config.geoip.database",
            format!("{} is not a valid MaxMind database: {e}", path.display()),
        )
    })?;
    let ipv4_only = reader.metadata().ip_version == 4;
    Ok(GeoFence {
        reader,
        ipv4_only,
        allow,
        deny,
    })
}

pub fn build(
    config: serde_yaml::Value,
    cx: &BuildContext,
) -> std::result::Result<Arc<dyn Filter>, BuildError> {
    let c: IpAllowConfig = parse_config(config)?;
    let allow =
        match &c.allow {
            None => None,
            Some(list) if list.is_empty() => return Err(BuildError::new(
                "config.allow",
                "an empty allow list would refuse every request; omit it to allow all addresses",
            )),
            Some(list) => Some(parse_nets("config.allow", list)?),
        };
    let deny = parse_nets("config.deny", &c.deny)?;
    if allow.is_none() && deny.is_empty() && c.geoip.is_none() {
        return Err(BuildError::new(
            "config",
            "name at least one of allow, deny or geoip",
        ));
    }
    let geo = c.geoip.map(|g| build_geo(g, cx)).transpose()?;
    Ok(Arc::new(IpAllowFilter {
        mode: c.mode,
        allow,
        deny,
        geo,
    }))
}

fn denied(detail: &'static str) -> Decision {
    Decision::Respond(LocalReply::error(
        StatusCode::FORBIDDEN,
        "ip_not_allowed",
        detail,
    ))
}

impl GeoFence {
    /// The ISO country code of `ip`, if the database knows one.
    fn country(&self, ip: IpAddr) -> Result<Option<String>> {
        if self.ipv4_only && ip.is_ipv6() {
            return Ok(None);
        }
        let failed = |_| FilterError {
            filter: "ip_allow",
            message: "geoip database lookup failed".to_string(),
        };
        let found = self.reader.lookup(ip).map_err(failed)?;
        let record: Option<GeoRecord<'_>> = found.decode().map_err(failed)?;
        let Some(record) = record else {
            return Ok(None);
        };
        let code = record
            .country
            .and_then(|c| c.iso_code)
            .or_else(|| record.registered_country.and_then(|c| c.iso_code));
        Ok(code.map(|c| c.to_ascii_uppercase()))
    }

    fn allows(&self, ip: IpAddr) -> Result<bool> {
        let country = self.country(ip)?;
        if let Some(c) = &country {
            if self.deny.contains(c) {
                return Ok(false);
            }
        }
        Ok(match (&self.allow, &country) {
            (None, _) => true,
            (Some(list), Some(c)) => list.contains(c),
            (Some(_), None) => false,
        })
    }
}

impl IpAllowFilter {
    fn decide(&self, addr: Option<IpAddr>) -> Result<Decision> {
        let Some(ip) = addr.map(|a| a.to_canonical()) else {
            return Ok(denied("the client address is unknown"));
        };
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return Ok(denied("the client address is not allowed on this route"));
        }
        if let Some(allow) = &self.allow {
            if !allow.iter().any(|n| n.contains(&ip)) {
                return Ok(denied("the client address is not allowed on this route"));
            }
        }
        if let Some(geo) = &self.geo {
            if !geo.allows(ip)? {
                return Ok(denied("the client location is not allowed on this route"));
            }
        }
        Ok(Decision::Continue)
    }
}

#[async_trait]
impl Filter for IpAllowFilter {
    fn kind(&self) -> &'static str {
        "ip_allow"
    }

    fn mode(&self) -> Mode {
        self.mode
    }

    /// Declares nothing. Reads no fact (the client address is the gateway's own field of the ctx).
    fn declaration(&self) -> crate::Declaration {
        crate::Declaration::NONE
    }

    async fn request_filter(
        &self,
        _req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<Decision> {
        self.decide(ctx.client_addr)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn filter_in(yaml: &str, cx: &BuildContext) -> Arc<dyn Filter> {
        build(serde_yaml::from_str(yaml).unwrap(), cx).unwrap()
    }

    fn filter(yaml: &str) -> Arc<dyn Filter> {
        filter_in(yaml, &Default::default())
    }

    fn build_err(yaml: &str, cx: &BuildContext) -> BuildError {
        build(serde_yaml::from_str(yaml).unwrap(), cx)
            .err()
            .unwrap()
    }

    async fn run(f: &Arc<dyn Filter>, addr: Option<&str>) -> Option<&'static str> {
        let mut ctx = RequestCtx::for_test("GET", "/fhir/Patient");
        ctx.host().client_addr = addr.map(|a| a.parse().unwrap());
        let mut req = RequestHeader::build("GET", b"/fhir/Patient", None).unwrap();
        match f.request_filter(&mut req, &mut ctx).await.unwrap() {
            Decision::Continue => None,
            Decision::Respond(r) => {
                assert_eq!(r.status, StatusCode::FORBIDDEN);
                assert!(
                    !r.detail.contains('.') && !r.detail.contains(':'),
                    "{}",
                    r.detail
                );
                Some(r.reason)
            }
        }
    }

    /// A folder of its own under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "caregate-ip-allow-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[derive(serde::Serialize)]
    struct Iso {
        iso_code: &'static str,
        names: BTreeMap<&'static str, &'static str>,
    }

    #[derive(serde::Serialize)]
    struct Record {
        #[serde(skip_serializing_if = "Option::is_none")]
        country: Option<Iso>,
        #[serde(skip_serializing_if = "Option::is_none")]
        registered_country: Option<Iso>,
    }

    fn iso(code: &'static str) -> Option<Iso> {
        Some(Iso {
            iso_code: code,
            names: [("en", "somewhere")].into(),
        })
    }

    /// A small GeoIP2-Country-shaped database (IPv6 tree with the IPv4 aliases), written with
    /// `mmdb-writer` into `dir/geo.mmdb`.
    fn write_country_db(dir: &TempDir) {
        let mut w = mmdb_writer::Writer::builder("GeoIP2-Country")
            .description(&[("en", "caregate test countries")])
            .build();
        let mut put = |net: &str, country: Option<Iso>, registered: Option<Iso>| {
            w.insert(
                net.parse::<IpNet>().unwrap(),
                &Record {
                    country,
                    registered_country: registered,
                },
            )
            .unwrap();
        };
        put("192.0.2.0/24", iso("NL"), iso("NL"));
        put("198.51.100.0/24", iso("DE"), iso("NL"));
        put("203.0.113.0/25", iso("US"), iso("US"));
        put("203.0.113.128/25", iso("KP"), iso("KP"));
        // no `country`, only the registration country
        put("100.64.0.0/16", None, iso("DE"));
        put("2001:db8:1::/48", iso("DE"), None);
        put("2001:db8:2::/48", iso("FR"), None);
        std::fs::write(dir.0.join("geo.mmdb"), w.to_bytes().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn cidr_lists_with_deny_winning() {
        let f = filter(
            "allow: [10.0.0.0/8, 192.0.2.10, '2001:db8:100::/48']\n\
             deny: [10.66.0.0/16, '2001:db8:100:bad::/64']",
        );
        assert_eq!(run(&f, Some("10.1.2.3")).await, None);
        assert_eq!(run(&f, Some("192.0.2.10")).await, None);
        assert_eq!(run(&f, Some("::ffff:10.1.2.3")).await, None, "IPv4-mapped");
        assert_eq!(run(&f, Some("2001:db8:100::1")).await, None);
        assert_eq!(run(&f, Some("10.66.0.1")).await, Some("ip_not_allowed"));
        assert_eq!(
            run(&f, Some("::ffff:10.66.0.1")).await,
            Some("ip_not_allowed")
        );
        assert_eq!(
            run(&f, Some("2001:db8:100:bad::9")).await,
            Some("ip_not_allowed")
        );
        assert_eq!(run(&f, Some("192.0.2.11")).await, Some("ip_not_allowed"));
        assert_eq!(
            run(&f, Some("2001:db8:101::1")).await,
            Some("ip_not_allowed")
        );
        assert_eq!(
            run(&f, None).await,
            Some("ip_not_allowed"),
            "no client address"
        );

        let deny_only = filter("deny: [203.0.113.0/24, '::1']");
        assert_eq!(run(&deny_only, Some("8.8.8.8")).await, None);
        assert_eq!(run(&deny_only, Some("2001:db8::1")).await, None);
        assert_eq!(
            run(&deny_only, Some("203.0.113.99")).await,
            Some("ip_not_allowed")
        );
        assert_eq!(run(&deny_only, Some("::1")).await, Some("ip_not_allowed"));
        assert_eq!(run(&deny_only, None).await, Some("ip_not_allowed"));
    }

    #[tokio::test]
    async fn geofencing_by_allowed_countries() {
        let dir = TempDir::new();
        write_country_db(&dir);
        let cx = BuildContext {
            base_dir: dir.0.clone(),
            ..Default::default()
        };
        // relative database path, resolved against the config folder
        let f = filter_in(
            "geoip: {database: geo.mmdb, allow_countries: [nl, DE]}",
            &cx,
        );
        assert_eq!(run(&f, Some("192.0.2.7")).await, None, "NL");
        assert_eq!(
            run(&f, Some("198.51.100.7")).await,
            None,
            "DE (registered NL)"
        );
        assert_eq!(
            run(&f, Some("100.64.3.4")).await,
            None,
            "registered_country fallback"
        );
        assert_eq!(
            run(&f, Some("::ffff:192.0.2.7")).await,
            None,
            "IPv4-mapped NL"
        );
        assert_eq!(run(&f, Some("2001:db8:1::5")).await, None, "IPv6 DE");
        assert_eq!(
            run(&f, Some("203.0.113.5")).await,
            Some("ip_not_allowed"),
            "US"
        );
        assert_eq!(
            run(&f, Some("2001:db8:2::5")).await,
            Some("ip_not_allowed"),
            "IPv6 FR"
        );
        assert_eq!(
            run(&f, Some("8.8.8.8")).await,
            Some("ip_not_allowed"),
            "not in db"
        );
        assert_eq!(
            run(&f, Some("2001:db8:3::1")).await,
            Some("ip_not_allowed"),
            "not in db"
        );
        assert_eq!(run(&f, None).await, Some("ip_not_allowed"));
    }

    #[tokio::test]
    async fn geofencing_by_denied_countries_and_cidr_together() {
        let dir = TempDir::new();
        write_country_db(&dir);
        let db = dir.0.join("geo.mmdb");
        let f = filter(&format!(
            "deny: [192.0.2.66]\ngeoip: {{database: '{}', deny_countries: [KP, fr]}}",
            db.display()
        ));
        assert_eq!(run(&f, Some("203.0.113.5")).await, None, "US");
        assert_eq!(
            run(&f, Some("8.8.8.8")).await,
            None,
            "unknown is fine without allow list"
        );
        assert_eq!(run(&f, Some("192.0.2.7")).await, None, "NL");
        assert_eq!(
            run(&f, Some("192.0.2.66")).await,
            Some("ip_not_allowed"),
            "CIDR deny"
        );
        assert_eq!(
            run(&f, Some("203.0.113.200")).await,
            Some("ip_not_allowed"),
            "KP"
        );
        assert_eq!(
            run(&f, Some("2001:db8:2::1")).await,
            Some("ip_not_allowed"),
            "FR"
        );

        // allow list and countries must both pass
        let f = filter(&format!(
            "allow: [192.0.2.0/24, 203.0.113.0/24]\n\
             geoip: {{database: '{}', allow_countries: [NL, US], deny_countries: [US]}}",
            db.display()
        ));
        assert_eq!(run(&f, Some("192.0.2.1")).await, None);
        assert_eq!(
            run(&f, Some("203.0.113.1")).await,
            Some("ip_not_allowed"),
            "deny wins"
        );
        assert_eq!(
            run(&f, Some("198.51.100.1")).await,
            Some("ip_not_allowed"),
            "not in allow"
        );
    }

    #[tokio::test]
    async fn ipv6_addresses_are_unknown_to_an_ipv4_database() {
        let dir = TempDir::new();
        let mut w = mmdb_writer::Writer::builder("GeoIP2-Country")
            .ip_version(mmdb_writer::IpVersion::V4)
            .description(&[("en", "caregate test countries, IPv4")])
            .build();
        w.insert(
            "192.0.2.0/24".parse::<IpNet>().unwrap(),
            &Record {
                country: iso("NL"),
                registered_country: None,
            },
        )
        .unwrap();
        let db = dir.0.join("v4.mmdb");
        std::fs::write(&db, w.to_bytes().unwrap()).unwrap();
        let f = filter(&format!(
            "geoip: {{database: '{}', allow_countries: [NL]}}",
            db.display()
        ));
        assert_eq!(run(&f, Some("192.0.2.1")).await, None);
        assert_eq!(run(&f, Some("::ffff:192.0.2.1")).await, None);
        assert_eq!(run(&f, Some("2001:db8::1")).await, Some("ip_not_allowed"));
    }

    #[test]
    fn unreadable_or_invalid_database_is_a_build_error() {
        let dir = TempDir::new();
        let cx = BuildContext {
            base_dir: dir.0.clone(),
            ..Default::default()
        };
        let e = build_err(
            "geoip: {database: missing.mmdb, allow_countries: [NL]}",
            &cx,
        );
        assert_eq!(e.path, "config.geoip.database", "{e}");
        std::fs::write(dir.0.join("junk.mmdb"), b"not a maxmind database").unwrap();
        let e = build_err("geoip: {database: junk.mmdb, allow_countries: [NL]}", &cx);
        assert_eq!(e.path, "config.geoip.database", "{e}");
        // a valid file cut short
        write_country_db(&dir);
        let bytes = std::fs::read(dir.0.join("geo.mmdb")).unwrap();
        std::fs::write(dir.0.join("cut.mmdb"), &bytes[..bytes.len() / 2]).unwrap();
        let e = build_err("geoip: {database: cut.mmdb, allow_countries: [NL]}", &cx);
        assert_eq!(e.path, "config.geoip.database", "{e}");
    }

    #[test]
    fn bad_config_names_its_place() {
        let cx = BuildContext::default();
        let cases = [
            ("allow: [10.0.0.0/8, 10.0.0.0/33]", "config.allow[1]"),
            ("deny: [nonsense]", "config.deny[0]"),
            ("allow: []", "config.allow"),
            ("{}", "config"),
            ("{deny: [10.0.0.0/8], extra: 1}", "config"),
            ("geoip: {database: x.mmdb}", "config.geoip"),
            (
                "geoip: {database: x.mmdb, allow_countries: []}",
                "config.geoip.allow_countries",
            ),
            (
                "geoip: {database: x.mmdb, allow_countries: [NL, NLD]}",
                "config.geoip.allow_countries[1]",
            ),
            (
                "geoip: {database: x.mmdb, deny_countries: ['1A']}",
                "config.geoip.deny_countries[0]",
            ),
            ("{deny: [10.0.0.0/8], mode: loud}", "config.mode"),
        ];
        for (yaml, path) in cases {
            let e = build_err(yaml, &cx);
            assert!(e.path.starts_with(path), "{yaml}: {e}");
        }
        assert_eq!(
            build_err("allow: [10.0.0.0/8, 10.0.0.0/33]", &cx).path,
            "config.allow[1]"
        );
    }

    #[test]
    fn mode_and_kind() {
        assert_eq!(filter("deny: [10.0.0.0/8]").mode(), Mode::Enforce);
        assert_eq!(
            filter("{deny: [10.0.0.0/8], mode: shadow}").mode(),
            Mode::Shadow
        );
        assert_eq!(filter("{deny: [10.0.0.0/8], mode: off}").mode(), Mode::Off);
        assert_eq!(filter("deny: [10.0.0.0/8]").kind(), "ip_allow");
    }

    #[test]
    fn registered_under_its_kind() {
        let spec = crate::FilterSpec {
            kind: "ip_allow".into(),
            config: Some(serde_yaml::from_str("deny: [10.0.0.0/8]").unwrap()),
        };
        let f = crate::FilterRegistry::builtin()
            .build(&spec, &Default::default())
            .unwrap();
        assert_eq!(f.kind(), "ip_allow");
    }
}
