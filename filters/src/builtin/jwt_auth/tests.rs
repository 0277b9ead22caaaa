//! Every rejection class with its exact status, challenge and reason code; the happy paths for
//! each algorithm family; certificate identities; the token cache under virtual time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::keys::{Clock, ManualClock, SystemClock};
use super::*;
use crate::ctx::writers;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

const NOW: u64 = 1_800_000_000;
const ISS: &str = "https://idp.example.org";
const AUD: &str = "https://gateway.test/fhir";

fn keys_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys")
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(keys_dir().join(name)).unwrap()
}

fn auth_config(jwks: &str, extra: &str) -> AuthConfig {
    let yaml = format!(
        r#"
issuers:
  - name: idp
    issuer: "{ISS}"
    jwks_file: "{jwks}"
    algorithms: [RS256, PS256, ES256, EdDSA]
    audiences: ["{AUD}"]
    leeway_seconds: 30
    unknown_kid_refresh_seconds: 10
    max_stale_seconds: 3600
    claims: {{ roles: realm_access.roles, patient: patient }}
  - name: hs
    issuer: "https://hs.example.org"
    algorithms: [HS256]
    hs_secret: "a-shared-secret-of-reasonable-length"
    audiences: ["{AUD}"]
token_cache: {{ max_entries: 100, max_bytes: 1000000 }}
client_certificates:
  - {{ common_name: lab-interface-engine, system: lab-interface-engine, tenant: hospital-a, roles: [lab_system] }}
{extra}
"#,
        jwks = keys_dir().join(jwks).display()
    );
    serde_yaml::from_str(&yaml).unwrap()
}

struct Fx {
    set: Arc<IssuerSet>,
    clock: Arc<ManualClock>,
}

async fn fixture(jwks: &str) -> Fx {
    let clock = Arc::new(ManualClock::default());
    clock.set(NOW);
    let set =
        IssuerSet::build(&auth_config(jwks, ""), &|p| p.to_path_buf(), clock.clone()).unwrap();
    let set = Arc::new(set);
    set.refresh(0).await.unwrap();
    Fx { set, clock }
}

fn filter(fx: &Fx, yaml: &str) -> JwtAuthFilter {
    JwtAuthFilter::new(fx.set.clone(), serde_yaml::from_str(yaml).unwrap()).unwrap()
}

fn claims() -> Value {
    json!({
        "iss": ISS, "aud": AUD, "sub": "dr-house", "exp": NOW + 600, "iat": NOW - 10,
        "client_id": "ehr-app", "realm_access": {"roles": ["clinician"]}, "scope": "user/*.rs",
        "tenant": "hospital-a", "patient": "p-1", "fhirUser": "Practitioner/7"
    })
}

fn sign(alg: Algorithm, kid: Option<&str>, key_pem: &str, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    h.typ = Some("at+jwt".into());
    let key = match alg {
        Algorithm::RS256 | Algorithm::PS256 => EncodingKey::from_rsa_pem(&pem(key_pem)).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem(key_pem)).unwrap(),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem(key_pem)).unwrap(),
        _ => unreachable!(),
    };
    encode(&h, claims, &key).unwrap()
}

fn rs(claims: &Value) -> String {
    sign(Algorithm::RS256, Some("rsa1"), "rsa1.pem", claims)
}

/// A token with a hand-made header and a fake signature.
fn forged(header: Value, claims: &Value) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(b"not-a-signature")
    )
}

fn req(auth: Option<&str>) -> RequestHeader {
    let mut r = RequestHeader::build("GET", b"/fhir/Patient", None).unwrap();
    if let Some(a) = auth {
        r.insert_header("authorization", a).unwrap();
    }
    r
}

async fn run(f: &JwtAuthFilter, auth: Option<&str>) -> (Option<LocalReply>, RequestCtx) {
    let mut ctx = RequestCtx::for_test("GET", "/fhir/Patient");
    let mut r = req(auth);
    match f.request_filter(&mut r, &mut ctx).await.unwrap() {
        Decision::Continue => (None, ctx),
        Decision::Respond(reply) => (Some(reply), ctx),
    }
}

fn www(r: &LocalReply) -> String {
    r.headers
        .iter()
        .find(|(k, _)| k == header::WWW_AUTHENTICATE)
        .map(|(_, v)| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

async fn expect_invalid(f: &JwtAuthFilter, token: &str, reason: &str) {
    let (reply, ctx) = run(f, Some(&format!("Bearer {token}"))).await;
    let reply = reply.unwrap_or_else(|| panic!("accepted a token that must fail with {reason}"));
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{reason}");
    assert_eq!(reply.reason, reason);
    let w = www(&reply);
    assert!(
        w.starts_with("Bearer realm=\"caregate\", error=\"invalid_token\""),
        "{w}"
    );
    assert!(ctx.facts.get::<Principal>().is_none());
}

#[tokio::test]
async fn accepts_each_algorithm_family_and_maps_claims() {
    let fx = fixture("jwks-all.json").await;
    let f = filter(&fx, "{}");
    let c = claims();
    for token in [
        rs(&c),
        sign(Algorithm::PS256, Some("rsa1"), "rsa1.pem", &c),
        sign(Algorithm::ES256, Some("ec1"), "ec1.pem", &c),
        sign(Algorithm::EdDSA, Some("ed1"), "ed1.pem", &c),
    ] {
        let (reply, ctx) = run(&f, Some(&format!("Bearer {token}"))).await;
        assert!(reply.is_none(), "{:?}", reply.map(|r| r.detail));
        let p = ctx.facts.get::<Principal>().unwrap();
        assert_eq!(p.subject, "dr-house");
        assert_eq!(p.roles, vec!["clinician"]);
        assert_eq!(p.scopes, vec!["user/*.rs"]);
        assert_eq!(p.tenant.as_deref(), Some("hospital-a"));
        assert_eq!(p.patient.as_deref(), Some("p-1"));
        assert_eq!(p.client_id.as_deref(), Some("ehr-app"));
        assert_eq!(p.fhir_user.as_deref(), Some("Practitioner/7"));
        assert_eq!(p.method, AuthMethod::Token);
        assert_eq!(ctx.facts.writer_of::<Principal>(), Some("jwt_auth"));
    }
    // `scp` arrays work as well as `scope` strings; lower-case scheme too.
    let mut c2 = claims();
    c2.as_object_mut().unwrap().remove("scope");
    c2["scp"] = json!(["patient/Observation.rs"]);
    let (reply, ctx) = run(&f, Some(&format!("bearer {}", rs(&c2)))).await;
    assert!(reply.is_none());
    assert_eq!(
        ctx.facts.get::<Principal>().unwrap().scopes,
        vec!["patient/Observation.rs"]
    );
}

#[tokio::test]
async fn missing_token_gets_a_plain_challenge() {
    let fx = fixture("jwks-all.json").await;
    let f = filter(&fx, "{}");
    for auth in [None, Some("Basic dXNlcjpwYXNz")] {
        let (reply, _) = run(&f, auth).await;
        let reply = reply.unwrap();
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        assert_eq!(reply.reason, "token_missing");
        assert_eq!(
            www(&reply),
            "Bearer realm=\"caregate\"",
            "no error= without a token (RFC 6750 §3.1)"
        );
    }
}

#[tokio::test]
async fn every_rejection_class() {
    let fx = fixture("jwks-all.json").await;
    let f = filter(&fx, "{}");
    let c = claims();
    let with = |k: &str, v: Value| {
        let mut c = claims();
        c[k] = v;
        c
    };
    let without = |k: &str| {
        let mut c = claims();
        c.as_object_mut().unwrap().remove(k);
        c
    };
    // alg none, and "none" hidden in case.
    expect_invalid(
        &f,
        &forged(json!({"alg": "none", "typ": "JWT"}), &c),
        "token_invalid",
    )
    .await;
    expect_invalid(
        &f,
        &format!(
            "{}.",
            &forged(json!({"alg": "nOnE"}), &c)
                [..forged(json!({"alg": "nOnE"}), &c).rfind('.').unwrap()]
        ),
        "token_invalid",
    )
    .await;
    // RS/HS confusion: HS256 signed with the RSA public key as the secret.
    let rsa_pub = pem("rsa1.pub.pem");
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("rsa1".into());
    let confused = encode(&h, &c, &EncodingKey::from_secret(&rsa_pub).unwrap()).unwrap();
    expect_invalid(&f, &confused, "token_invalid").await;
    // An algorithm not listed for the issuer.
    let mut h = Header::new(Algorithm::RS512);
    h.kid = Some("rsa1".into());
    let rs512 = encode(
        &h,
        &c,
        &EncodingKey::from_rsa_pem(&pem("rsa1.pem")).unwrap(),
    )
    .unwrap();
    expect_invalid(&f, &rs512, "token_invalid").await;
    // Embedded / referenced keys, unknown crit, bad kids.
    for header in [
        json!({"alg": "RS256", "kid": "rsa1", "jwk": {"kty": "RSA", "n": "x", "e": "AQAB"}}),
        json!({"alg": "RS256", "kid": "rsa1", "jku": "https://evil.example/jwks"}),
        json!({"alg": "RS256", "kid": "rsa1", "x5u": "https://evil.example/cert"}),
        json!({"alg": "RS256", "kid": "rsa1", "x5c": ["MIIB"]}),
        json!({"alg": "RS256", "kid": "rsa1", "crit": ["b64"], "b64": false}),
        json!({"alg": "RS256", "kid": "../../etc/passwd\u{0}"}),
        json!({"alg": "RS256", "kid": "k".repeat(1000)}),
        json!({"alg": "RS256", "kid": 12}),
    ] {
        expect_invalid(&f, &forged(header, &c), "token_invalid").await;
    }
    // An unknown kid (refresh is tried once, then refused).
    expect_invalid(
        &f,
        &sign(Algorithm::RS256, Some("nope"), "rsa1.pem", &c),
        "token_invalid",
    )
    .await;
    // A valid signature by a key that is not in the set.
    let fx2 = fixture("jwks-without-rsa2.json").await;
    let f2 = filter(&fx2, "{}");
    expect_invalid(
        &f2,
        &sign(Algorithm::RS256, Some("rsa2"), "rsa2.pem", &c),
        "token_invalid",
    )
    .await;
    // A signature that does not match (kid of rsa1, signed by rsa2).
    expect_invalid(
        &f,
        &sign(Algorithm::RS256, Some("rsa1"), "rsa2.pem", &c),
        "token_invalid",
    )
    .await;
    // Time: expired, not yet valid, issued in the future, exp as a string, no exp.
    expect_invalid(&f, &rs(&with("exp", json!(NOW - 31))), "token_expired").await;
    expect_invalid(&f, &rs(&with("nbf", json!(NOW + 120))), "token_invalid").await;
    expect_invalid(&f, &rs(&with("iat", json!(NOW + 120))), "token_invalid").await;
    expect_invalid(
        &f,
        &rs(&with("exp", json!((NOW + 600).to_string()))),
        "token_invalid",
    )
    .await;
    expect_invalid(&f, &rs(&without("exp")), "token_invalid").await;
    // Wrong iss, aud, typ; no sub.
    expect_invalid(
        &f,
        &rs(&with("iss", json!("https://evil.example"))),
        "token_invalid",
    )
    .await;
    expect_invalid(
        &f,
        &rs(&with("aud", json!("https://other.example"))),
        "token_invalid",
    )
    .await;
    expect_invalid(&f, &rs(&without("aud")), "token_invalid").await;
    expect_invalid(&f, &rs(&without("sub")), "token_invalid").await;
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("rsa1".into());
    h.typ = Some("JOSE+JSON".into());
    let bad_typ = encode(
        &h,
        &c,
        &EncodingKey::from_rsa_pem(&pem("rsa1.pem")).unwrap(),
    )
    .unwrap();
    expect_invalid(&f, &bad_typ, "token_invalid").await;
    // Oversized (capped before decoding), malformed, repeated Authorization.
    expect_invalid(&f, &"a".repeat(9000), "token_invalid").await;
    expect_invalid(&f, "not.a.jwt", "token_invalid").await;
    expect_invalid(&f, "two tokens", "token_invalid").await;
    let (reply, _) = run(&f, Some("Bearer")).await;
    assert_eq!(reply.unwrap().reason, "token_invalid");
    let mut ctx = RequestCtx::for_test("GET", "/");
    let mut r = req(Some(&format!("Bearer {}", rs(&c))));
    r.append_header("authorization", format!("Bearer {}", rs(&c)))
        .unwrap();
    match f.request_filter(&mut r, &mut ctx).await.unwrap() {
        Decision::Respond(reply) => assert_eq!(reply.reason, "token_invalid"),
        Decision::Continue => panic!("two Authorization headers must be refused"),
    }
    // None of these leaked token content into the reply.
    let (reply, _) = run(
        &f,
        Some(&format!("Bearer {}", rs(&with("exp", json!(NOW - 100))))),
    )
    .await;
    let r = reply.unwrap();
    assert!(!r.detail.contains("dr-house") && !www(&r).contains("dr-house"));
}

#[tokio::test]
async fn hs_only_with_its_secret_and_route_issuer_restriction() {
    let fx = fixture("jwks-all.json").await;
    let mut c = claims();
    c["iss"] = json!("https://hs.example.org");
    let good = encode(
        &Header::new(Algorithm::HS256),
        &c,
        &EncodingKey::from_secret(b"a-shared-secret-of-reasonable-length").unwrap(),
    )
    .unwrap();
    let bad = encode(
        &Header::new(Algorithm::HS256),
        &c,
        &EncodingKey::from_secret(b"guessed").unwrap(),
    )
    .unwrap();
    let all = filter(&fx, "{}");
    assert!(run(&all, Some(&format!("Bearer {good}"))).await.0.is_none());
    expect_invalid(&all, &bad, "token_invalid").await;
    // A route that trusts only `idp` refuses the HS issuer's tokens, cached or not.
    let only_idp = filter(&fx, "{issuers: [idp]}");
    expect_invalid(&only_idp, &good, "token_invalid").await;
    // Building an HS issuer without a secret is refused.
    let cfg: AuthConfig = serde_yaml::from_str(
        "issuers: [{name: x, issuer: y, algorithms: [HS256], audiences: [z]}]",
    )
    .unwrap();
    let e = IssuerSet::build(&cfg, &|p| p.to_path_buf(), Arc::new(SystemClock))
        .err()
        .unwrap();
    assert_eq!(e.path, "auth.issuers[0].algorithms[0]");
}

#[tokio::test]
async fn token_cache_hit_expiry_and_key_removal_under_virtual_time() {
    let dir = std::env::temp_dir().join(format!("caregate-jwks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jwks = dir.join("jwks.json");
    std::fs::copy(keys_dir().join("jwks-all.json"), &jwks).unwrap();
    let clock = Arc::new(ManualClock::default());
    clock.set(NOW);
    let cfg = auth_config(jwks.to_str().unwrap(), "");
    let set = Arc::new(IssuerSet::build(&cfg, &|p| p.to_path_buf(), clock.clone()).unwrap());
    set.refresh(0).await.unwrap();
    let fx = Fx {
        set: set.clone(),
        clock: clock.clone(),
    };
    let f = filter(&fx, "{}");

    let token = sign(Algorithm::RS256, Some("rsa2"), "rsa2.pem", &claims());
    let auth = format!("Bearer {token}");
    assert!(run(&f, Some(&auth)).await.0.is_none());
    assert_eq!(set.cache.stats().entries, 1, "verified once, cached");
    assert!(run(&f, Some(&auth)).await.0.is_none(), "cache hit");
    // A forged token with the same claims is not a cache hit (the key is the whole token).
    expect_invalid(
        &f,
        &sign(Algorithm::RS256, Some("rsa2"), "rsa1.pem", &claims()),
        "token_invalid",
    )
    .await;

    // The key leaves the set: the cached token is flushed and refused.
    std::fs::copy(keys_dir().join("jwks-without-rsa2.json"), &jwks).unwrap();
    set.refresh(0).await.unwrap();
    assert_eq!(set.cache.stats().entries, 0);
    expect_invalid(&f, &token, "token_invalid").await;

    // Expiry in virtual time: valid (and cached) now, refused after exp + leeway.
    let t2 = rs(&claims());
    assert!(run(&f, Some(&format!("Bearer {t2}"))).await.0.is_none());
    fx.clock.set(NOW + 600 + 31);
    expect_invalid(&f, &t2, "token_expired").await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn stale_key_sets_and_unknown_kid_rate_limit() {
    let dir = std::env::temp_dir().join(format!("caregate-jwks-stale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jwks = dir.join("jwks.json");
    std::fs::copy(keys_dir().join("jwks-without-rsa2.json"), &jwks).unwrap();
    let clock = Arc::new(ManualClock::default());
    clock.set(NOW);
    let set = Arc::new(
        IssuerSet::build(
            &auth_config(jwks.to_str().unwrap(), ""),
            &|p| p.to_path_buf(),
            clock.clone(),
        )
        .unwrap(),
    );
    set.refresh(0).await.unwrap();
    let fx = Fx {
        set: set.clone(),
        clock: clock.clone(),
    };
    let f = filter(&fx, "{}");

    // rsa2 appears in the file, but an unknown-kid refresh just happened: refused until the
    // rate limit allows the next one.
    std::fs::copy(keys_dir().join("jwks-all.json"), &jwks).unwrap();
    let t = sign(Algorithm::RS256, Some("rsa2"), "rsa2.pem", &claims());
    expect_invalid(&f, &t, "token_invalid").await;
    clock.set(NOW + 11);
    assert!(
        run(&f, Some(&format!("Bearer {t}"))).await.0.is_none(),
        "refreshed on the unknown kid"
    );

    // The provider disappears: the last good set is trusted for max_stale_seconds, then not.
    std::fs::remove_file(&jwks).unwrap();
    assert!(set.refresh(0).await.is_err());
    let fresh = |c: &ManualClock| {
        let mut cl = claims();
        cl["exp"] = json!(c.now() + 600);
        cl["iat"] = json!(c.now());
        cl
    };
    clock.set(NOW + 3000);
    assert!(run(&f, Some(&format!("Bearer {}", rs(&fresh(&clock)))))
        .await
        .0
        .is_none());
    clock.set(NOW + 11 + 3601);
    expect_invalid(&f, &rs(&fresh(&clock)), "token_invalid").await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn certificates_identify_systems() {
    let fx = fixture("jwks-all.json").await;
    let cert = PeerCertificate {
        subject: "CN=lab-interface-engine,O=Test Hospital".into(),
        common_name: Some("lab-interface-engine".into()),
        organization: Some("Test Hospital".into()),
        sha256: "ab".repeat(32),
    };
    let unknown = PeerCertificate {
        subject: "CN=someone-else".into(),
        common_name: Some("someone-else".into()),
        organization: None,
        sha256: "cd".repeat(32),
    };
    async fn go(
        f: &JwtAuthFilter,
        cert: Option<&PeerCertificate>,
        auth: Option<&str>,
    ) -> (Option<LocalReply>, RequestCtx) {
        let mut ctx = RequestCtx::for_test("GET", "/lab");
        if let Some(c) = cert {
            ctx.facts.insert(writers::Gateway, c.clone()).unwrap();
        }
        let mut r = req(auth);
        match f.request_filter(&mut r, &mut ctx).await.unwrap() {
            Decision::Continue => (None, ctx),
            Decision::Respond(reply) => (Some(reply), ctx),
        }
    }
    // Certificate only.
    let f = filter(&fx, "{bearer: off, client_certificate: required}");
    let (reply, ctx) = go(&f, Some(&cert), None).await;
    assert!(reply.is_none());
    let p = ctx.facts.get::<Principal>().unwrap();
    assert_eq!(
        (p.subject.as_str(), p.method),
        ("lab-interface-engine", AuthMethod::ClientCertificate)
    );
    assert_eq!(p.tenant.as_deref(), Some("hospital-a"));
    assert_eq!(p.roles, vec!["lab_system"]);
    let (reply, _) = go(&f, None, None).await;
    assert_eq!(
        reply.map(|r| (r.status.as_u16(), r.reason)),
        Some((403, "client_certificate_required"))
    );
    let (reply, _) = go(&f, Some(&unknown), None).await;
    assert_eq!(
        reply.map(|r| (r.status.as_u16(), r.reason)),
        Some((403, "client_certificate_unknown"))
    );

    // Token and certificate: the token's subject acts, the certificate names the system.
    let f = filter(&fx, "{bearer: required, client_certificate: optional}");
    let (reply, ctx) = go(&f, Some(&cert), Some(&format!("Bearer {}", rs(&claims())))).await;
    assert!(reply.is_none());
    let p = ctx.facts.get::<Principal>().unwrap();
    assert_eq!(p.subject, "dr-house");
    assert_eq!(p.method, AuthMethod::TokenAndClientCertificate);
    assert_eq!(p.system.as_ref().unwrap().name, "lab-interface-engine");
    // bearer optional: a certificate alone is enough, nothing at all is not.
    let f = filter(&fx, "{bearer: optional, client_certificate: optional}");
    assert!(go(&f, Some(&cert), None).await.0.is_none());
    assert_eq!(go(&f, None, None).await.0.unwrap().reason, "token_missing");
    // Config errors.
    assert!(JwtAuthFilter::new(
        fx.set.clone(),
        serde_yaml::from_str("{bearer: off}").unwrap()
    )
    .is_err());
    let e = JwtAuthFilter::new(
        fx.set.clone(),
        serde_yaml::from_str("{issuers: [ghost]}").unwrap(),
    )
    .err()
    .unwrap();
    assert_eq!(e.path, "config.issuers[0]");
}
