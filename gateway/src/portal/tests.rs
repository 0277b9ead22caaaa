#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::fetch::{summarize, CapResource, CapSummary};
use super::openapi::{self, CapKey};
use super::*;
use serde_json::json;

const SECRET_VAR: &str = "CAREGATE_PORTAL_UNIT_SECRET";

/// A small config: a FHIR API in two versions (v1 deprecated with a sunset, v2 live, v3
/// draft), a non-API route, a sandbox issuer, the portal on the sandbox listener.
fn yaml(fragment: Option<&str>, redoc: Option<&str>) -> String {
    let frag = fragment
        .map(|f| format!("    openapi_fragment: {f}\n"))
        .unwrap_or_default();
    let redoc = redoc
        .map(|d| format!("  redoc_dir: {d}\n"))
        .unwrap_or_default();
    format!(
        r#"
listeners:
  - {{ name: public, channel: public, listen: "127.0.0.1:18080" }}
  - {{ name: sandbox, channel: public, listen: "127.0.0.1:18081", environment: sandbox }}
auth:
  issuers:
    - {{ name: sb, issuer: "https://sandbox.test", algorithms: [HS256], hs_secret: "${{{SECRET_VAR}}}", audiences: [dev], sandbox: true }}
pools:
  - {{ name: sbpool, environment: sandbox, zones: [ {{ name: a, backends: [ {{ address: "127.0.0.1:18082" }} ] }} ] }}
  - {{ name: web, zones: [ {{ name: a, backends: [ {{ address: "127.0.0.1:18083" }} ] }} ] }}
routes:
  - name: patient-fhir
    listener: sandbox
    path_prefix: /fhir
    fhir: true
    methods: [GET, HEAD, POST]
    pool: sbpool
    filters:
      - {{ kind: jwt_auth }}
      - {{ kind: smart_scopes }}
  - {{ name: status, listener: public, path_prefix: /status, methods: [GET], pool: web }}
apis:
  - name: patient-api
    title: Patient API
    owner: records-team
    docs: https://dev.example.org/patient-api
    routes: [patient-fhir]
{frag}    sandbox: {{ listener: sandbox, pool: sbpool }}
    versions:
      - {{ name: v1, state: deprecated, sunset: "2999-01-01", successor: v2 }}
      - {{ name: v2, state: live }}
      - {{ name: v3, state: draft }}
      - {{ name: v0, state: retired }}
portal:
  listener: sandbox
  title: Test APIs
{redoc}"#
    )
}

fn loaded(text: &str, dir: &Path) -> crate::config::Loaded {
    std::env::set_var(SECRET_VAR, "unit-test-secret-0123456789abcdef");
    crate::config::load_str(text, dir.to_path_buf()).expect("config loads")
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("caregate-portal-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn caps() -> CapSummary {
    CapSummary {
        resources: vec![CapResource {
            type_name: "Patient".into(),
            interactions: vec!["read".into(), "search-type".into(), "create".into()],
            search_params: vec![
                ("name".into(), "string".into()),
                ("birthdate".into(), "date".into()),
            ],
        }],
    }
}

fn doc_with(
    l: &crate::config::Loaded,
    caps: Option<CapSummary>,
    fragments: HashMap<usize, Value>,
) -> Value {
    let mut m = HashMap::new();
    if let Some(c) = caps {
        m.insert(
            CapKey {
                pool: "sbpool".into(),
                path: "/fhir/metadata".into(),
            },
            c,
        );
    }
    openapi::document(&openapi::Inputs {
        config: &l.config,
        fragments: &fragments,
        caps: &m,
        now: crate::apis::unix_now(),
    })
}

#[test]
fn the_document_describes_versions_security_and_errors() {
    let dir = temp_dir("shape");
    let l = loaded(&yaml(None, None), &dir);
    assert!(validate(&l.config, &dir).is_ok());
    // Every FHIR copy shares one CapabilityStatement (same pool, same upstream path).
    assert_eq!(
        openapi::cap_keys(&l.config, crate::apis::unix_now()),
        vec![CapKey {
            pool: "sbpool".into(),
            path: "/fhir/metadata".into()
        }]
    );
    let d = doc_with(&l, Some(caps()), HashMap::new());
    assert_eq!(d["openapi"], "3.1.0");
    assert_eq!(d["info"]["title"], "Test APIs");
    assert!(d["info"]["version"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    assert_eq!(d["servers"][0]["url"], "http://127.0.0.1:18081");
    let paths = d["paths"].as_object().unwrap();
    // v1 and v2, and the draft v3 (the portal is on a sandbox listener); never the retired v0.
    for v in ["v1", "v2", "v3"] {
        for p in ["/fhir/Patient/{id}", "/fhir/Patient", "/fhir/metadata"] {
            assert!(paths.contains_key(&format!("/{v}{p}")), "/{v}{p}");
        }
    }
    assert!(!paths.keys().any(|p| p.starts_with("/v0/")));
    // The portal's own route is not in it; the non-API route is, with its own server.
    assert!(!paths.keys().any(|p| p.starts_with("/developer")));
    assert_eq!(
        paths["/status/{path}"]["servers"][0]["url"],
        "http://127.0.0.1:18080"
    );
    assert!(paths["/status/{path}"].get("post").is_none());
    assert_eq!(
        paths["/status/{path}"]["get"]["responses"]["404"]["$ref"],
        "#/components/responses/problem-404"
    );

    let read = &paths["/v1/fhir/Patient/{id}"]["get"];
    assert_eq!(read["operationId"], "patient-fhir@v1.read.Patient");
    assert_eq!(read["summary"], "Read a Patient");
    assert_eq!(read["deprecated"], true);
    assert_eq!(read["tags"][0], "patient-api v1 (deprecated)");
    let desc = read["description"].as_str().unwrap();
    assert!(desc.contains("deprecated") && desc.contains("2999") && desc.contains("v2"));
    assert!(desc.contains("records-team") && desc.contains("https://dev.example.org/patient-api"));
    assert_eq!(
        read["responses"]["200"]["content"]["application/fhir+json"]["schema"]["$ref"],
        "#/components/schemas/Resource"
    );
    for s in [
        "400", "401", "403", "404", "410", "413", "429", "502", "503", "504", "default",
    ] {
        assert_eq!(
            read["responses"][s]["$ref"],
            format!("#/components/responses/fhir-{}", s),
            "{s}"
        );
    }
    // The security: the sandbox issuer's scheme, alternatives per SMART context.
    let sec = read["security"].as_array().unwrap();
    assert!(sec.iter().any(|r| r["smart"] == json!(["user/Patient.rs"])));
    assert!(sec
        .iter()
        .any(|r| r["smart"] == json!(["patient/Patient.rs", "launch/patient"])));
    assert_eq!(
        d["components"]["securitySchemes"]["smart"]["type"],
        "openIdConnect"
    );
    assert_eq!(
        d["components"]["securitySchemes"]["smart"]["openIdConnectUrl"],
        "https://sandbox.test/.well-known/openid-configuration"
    );
    // The live version: not deprecated, no 410.
    let v2 = &paths["/v2/fhir/Patient/{id}"]["get"];
    assert!(v2.get("deprecated").is_none());
    assert_eq!(v2["tags"][0], "patient-api v2");
    // Search: the CapabilityStatement's parameters; create because the route allows POST.
    let search = &paths["/v2/fhir/Patient"]["get"];
    let names: Vec<&str> = search["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["name", "birthdate"]);
    assert_eq!(
        search["responses"]["200"]["content"]["application/fhir+json"]["schema"]["$ref"],
        "#/components/schemas/Bundle"
    );
    let create = &paths["/v2/fhir/Patient"]["post"];
    assert!(create["responses"]["201"].is_object());
    assert_eq!(create["security"][1]["smart"][0], "user/Patient.c");
    // The metadata operation is public.
    assert_eq!(paths["/v2/fhir/metadata"]["get"]["security"], json!([]));
    // operationIds are unique.
    let mut ids = std::collections::HashSet::new();
    for item in paths.values() {
        for (m, op) in item.as_object().unwrap() {
            if m == "servers" {
                continue;
            }
            assert!(ids.insert(op["operationId"].as_str().unwrap().to_string()));
        }
    }
    // The error shapes of the contract.
    let oo = &d["components"]["responses"]["fhir-401"]["content"]["application/fhir+json"]
        ["schema"]["$ref"];
    assert_eq!(oo, "#/components/schemas/OperationOutcome");
    let problem = &d["components"]["schemas"]["Problem"]["required"];
    assert_eq!(
        problem,
        &json!(["type", "title", "status", "reason", "request_id"])
    );
    // Without a CapabilityStatement: the generic pair.
    let d = doc_with(&l, None, HashMap::new());
    assert!(d["paths"]["/v2/fhir/{type}/{id}"]["get"].is_object());
    assert!(d["paths"]["/v2/fhir/{type}"]["get"].is_object());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn drafts_are_listed_only_on_a_sandbox_portal() {
    let dir = temp_dir("drafts");
    let text = yaml(None, None).replace(
        "portal:\n  listener: sandbox",
        "portal:\n  listener: public",
    );
    let l = loaded(&text, &dir);
    let d = doc_with(&l, Some(caps()), HashMap::new());
    let paths = d["paths"].as_object().unwrap();
    assert!(paths.contains_key("/v2/fhir/Patient/{id}"));
    assert!(
        !paths.keys().any(|p| p.starts_with("/v3/")),
        "{:?}",
        paths.keys()
    );
    assert_eq!(d["servers"][0]["url"], "http://127.0.0.1:18080");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_public_portal_leaves_out_internal_routes() {
    let dir = temp_dir("channels");
    let internal = yaml(None, None).replace(
        "  - { name: status, listener: public,",
        "  - { name: status, listener: internal,",
    );
    let internal = internal.replace(
        "listeners:\n",
        "listeners:\n  - { name: internal, channel: internal, listen: \"127.0.0.1:18084\" }\n",
    );
    assert!(internal.contains("listener: internal,"));
    // On a public portal: the internal route is not described.
    let l = loaded(&internal, &dir);
    let d = doc_with(&l, Some(caps()), HashMap::new());
    let paths = d["paths"].as_object().unwrap();
    assert!(paths.contains_key("/v2/fhir/Patient/{id}"));
    assert!(
        !paths.keys().any(|p| p.starts_with("/status")),
        "{:?}",
        paths.keys()
    );
    // On a portal of the internal channel, it is.
    let on_internal = internal.replace(
        "portal:\n  listener: sandbox",
        "portal:\n  listener: internal",
    );
    let l = loaded(&on_internal, &dir);
    let d = doc_with(&l, Some(caps()), HashMap::new());
    assert!(d["paths"]
        .as_object()
        .unwrap()
        .keys()
        .any(|p| p.starts_with("/status")));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fragments_are_merged_under_each_version() {
    let dir = temp_dir("fragment");
    std::fs::write(
        dir.join("frag.yaml"),
        r##"
openapi: 3.1.0
paths:
  /fhir/Patient/$match:
    post:
      operationId: match
      summary: Find matching patients
      responses:
        "200": { description: ok, content: { application/fhir+json: { schema: { $ref: "#/components/schemas/MatchBundle" } } } }
  /fhir/Patient/{id}:
    get:
      summary: theirs, not ours
      responses: { "200": { description: ok } }
components:
  schemas:
    MatchBundle: { type: object }
    Resource: { type: string }
"##,
    )
    .unwrap();
    let l = loaded(&yaml(Some("frag.yaml"), None), &dir);
    assert!(validate(&l.config, &dir).is_ok());
    let state = PortalState::build(&l).unwrap();
    let d: Value = serde_json::from_slice(&state.document_json()).unwrap();
    let op = &d["paths"]["/v2/fhir/Patient/$match"]["post"];
    assert_eq!(op["operationId"], "patient-fhir@v2.match");
    assert_eq!(op["tags"][0], "patient-api v2");
    assert_eq!(
        op["responses"]["401"]["$ref"],
        "#/components/responses/fhir-401"
    );
    assert_eq!(
        d["paths"]["/v1/fhir/Patient/$match"]["post"]["deprecated"],
        true
    );
    assert!(d["components"]["schemas"]["MatchBundle"].is_object());
    // Ours win on a clash, and the document says so.
    assert_eq!(d["components"]["schemas"]["Resource"]["type"], "object");
    assert!(d["info"]["description"]
        .as_str()
        .unwrap()
        .contains("components.schemas.Resource"));

    // A fragment without paths, not an object, or missing: the config does not load (`check`
    // refuses it).
    let load = |f: &str| {
        std::env::set_var(SECRET_VAR, "unit-test-secret-0123456789abcdef");
        crate::config::load_str(&yaml(Some(f), None), dir.clone())
            .err()
            .map(|e| e.0)
            .unwrap_or_default()
    };
    std::fs::write(dir.join("bad.json"), r#"{"openapi": "3.1.0"}"#).unwrap();
    let e = load("bad.json");
    assert!(e.contains("openapi_fragment") && e.contains("paths"), "{e}");
    std::fs::write(dir.join("bad.json"), "- a\n- b\n").unwrap();
    assert!(load("bad.json").contains("openapi_fragment"));
    assert!(load("missing.json").contains("openapi_fragment"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_portal_listener_must_exist() {
    let dir = temp_dir("listener");
    let mut l = loaded(&yaml(None, None), &dir);
    if let Some(p) = l.config.portal.as_mut() {
        p.listener = "nope".into();
    }
    assert!(validate(&l.config, &dir)
        .unwrap_err()
        .contains("portal.listener"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn assets_are_plain_names_in_redoc_dir_only() {
    let dir = temp_dir("assets");
    let redoc = dir.join("bundles");
    std::fs::create_dir_all(&redoc).unwrap();
    std::fs::write(redoc.join(REDOC_BUNDLE), "/* redoc */").unwrap();
    std::fs::write(dir.join("secret.txt"), "secret").unwrap();
    let l = loaded(&yaml(None, Some(redoc.to_str().unwrap())), &dir);
    let p = PortalState::build(&l).unwrap();
    let ok = p.respond("/assets/redoc.standalone.js");
    assert_eq!(ok.status, 200);
    assert_eq!(ok.content_type, "text/javascript; charset=utf-8");
    assert_eq!(&ok.body[..], b"/* redoc */");
    for bad in [
        "/assets/../secret.txt",
        "/assets/..%2Fsecret.txt",
        "/assets/%2e%2e/secret.txt",
        "/assets/sub/redoc.standalone.js",
        "/assets/.hidden",
        "/assets/",
        "/assets/..",
        "/assets/a\\b",
        "/assets/missing.js",
        "/secret.txt",
        "/../secret.txt",
    ] {
        assert_eq!(p.respond(bad).status, 404, "{bad}");
    }
    assert!(!valid_asset_name("a..b"));
    assert!(valid_asset_name("cfb294d7f6536ffa8d42.worker.js"));

    // The page: Redoc from our own origin, a strict CSP, no external URL.
    let page = p.respond("/");
    assert_eq!(page.status, 200);
    let html = String::from_utf8(page.body.to_vec()).unwrap();
    assert!(html.contains(r#"<script src="/developer/assets/redoc.standalone.js">"#));
    assert!(html.contains(r#"spec-url="/developer/openapi.json""#));
    assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("//fonts"));
    let csp = page
        .headers
        .iter()
        .find(|(k, _)| *k == "content-security-policy")
        .map(|(_, v)| v.clone())
        .unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"));
    assert!(csp.contains("worker-src blob:"));
    assert!(!csp.contains("https:") && !csp.contains('*'));
    // The document and its YAML form.
    let j = p.respond("/openapi.json");
    assert_eq!((j.status, j.content_type), (200, "application/json"));
    let v: Value = serde_json::from_slice(&j.body).unwrap();
    assert_eq!(v["openapi"], "3.1.0");
    let y = p.respond("/openapi.yaml");
    let yv: Value = serde_yaml::from_slice(&y.body).unwrap();
    assert_eq!(yv, v);
    assert_eq!(p.respond("/nothing").status, 404);

    // Without Redoc: the page says how to install it and links the document.
    std::fs::remove_file(redoc.join(REDOC_BUNDLE)).unwrap();
    let l = loaded(&yaml(None, Some(redoc.to_str().unwrap())), &dir);
    let p = PortalState::build(&l).unwrap();
    let html = String::from_utf8(p.respond("").body.to_vec()).unwrap();
    assert!(html.contains("bash scripts/deps.sh --with-portal"));
    assert!(html.contains(r#"href="/developer/openapi.json""#));
    assert!(!html.contains("<script"));
    let l = loaded(&yaml(None, None), &dir);
    let p = PortalState::build(&l).unwrap();
    assert_eq!(p.respond("/assets/redoc.standalone.js").status, 404);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn capability_statements_are_summarised_within_bounds() {
    let cs = json!({
        "resourceType": "CapabilityStatement",
        "rest": [{
            "mode": "server",
            "resource": [
                {
                    "type": "Patient",
                    "interaction": [{"code": "read"}, {"code": "search-type"}, {"code": "read"}, {"code": "bogus"}],
                    "searchParam": [
                        {"name": "name", "type": "string"},
                        {"name": "birthdate", "type": "date"},
                        {"name": "bad name", "type": "string"},
                        {"name": "x", "type": "nonsense"}
                    ]
                },
                {"type": "not a type", "interaction": [{"code": "read"}]},
                {"type": "Observation"},
                {"type": "Patient", "interaction": [{"code": "delete"}]}
            ]
        }]
    });
    let s = summarize(cs.to_string().as_bytes()).unwrap();
    assert_eq!(s.resources.len(), 2);
    assert_eq!(s.resources[0].type_name, "Patient");
    assert_eq!(s.resources[0].interactions, ["read", "search-type"]);
    assert_eq!(
        s.resources[0].search_params,
        [
            ("name".to_string(), "string".to_string()),
            ("birthdate".to_string(), "date".to_string())
        ]
    );
    assert!(s.resources[1].interactions.is_empty());
    assert!(summarize(br#"{"resourceType": "Patient"}"#).is_err());
    assert!(summarize(b"not json").is_err());
    assert!(summarize(&vec![b' '; fetch::MAX_BODY + 1]).is_err());
    // A large statement keeps at most 300 types of 100 parameters.
    let store_cs = json!({"resourceType": "CapabilityStatement", "rest": [{"mode": "server", "resource": (0..400).map(|i| json!({"type": format!("T{i}"), "searchParam": (0..150).map(|j| json!({"name": format!("p{j}"), "type": "token"})).collect::<Vec<_>>()})).collect::<Vec<_>>()}]});
    let s = summarize(store_cs.to_string().as_bytes()).unwrap();
    assert_eq!(s.resources.len(), 300);
    assert_eq!(s.resources[0].search_params.len(), 100);
}
