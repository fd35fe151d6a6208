//! Everything that must not reach the upstream: bad caller tokens (401), missing scopes (403), and every
//! IdP failure mapped per SPEC §4. None of them ever reaches the upstream or echoes a token.
// Every integration test runs against the development IdP and echo upstream.
#![cfg(feature = "dev")]
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "helpers of tests: a failure is a test failure"
)]

mod support;

use std::time::Duration;

use base64::Engine as _;
use obo_sidecar::dev::{DevIdp, DevIdpConfig, Failure, TokenClaims};
use serde_json::json;
use support::Harness;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs(),
    )
    .expect("time")
}

/// Claims the sidecar would accept, to be spoiled one at a time.
fn good_claims(h: &Harness) -> serde_json::Value {
    json!({
        "iss": h.idp.issuer(),
        "aud": "api://obo-sidecar",
        "sub": "mallory",
        "scp": "access_as_user",
        "iat": now(),
        "exp": now() + 600,
    })
}

fn kid_of(token: &str) -> String {
    let header = token.split('.').next().expect("header");
    let header: serde_json::Value =
        serde_json::from_slice(&B64.decode(header).expect("b64")).expect("json");
    header["kid"].as_str().expect("kid").to_owned()
}

fn rs256(h: &Harness) -> serde_json::Value {
    json!({"alg": "RS256", "typ": "JWT", "kid": kid_of(&h.token("x", "y"))})
}

/// Asserts a 401 `invalid_token` whose body and challenge never quote the token, and that nothing reached
/// the upstream or the IdP.
async fn assert_invalid_token(h: &Harness, token: &str, why: &str) {
    let response = h.get("/obo/x", Some(token)).await;
    assert_eq!(response.status(), 401, "{why}");
    let challenge = response.headers()["www-authenticate"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        challenge.starts_with("Bearer error=\"invalid_token\", error_description=\""),
        "{why}: {challenge}"
    );
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body = response.text().await.expect("body");
    for part in token.split('.').filter(|p| p.len() > 8) {
        assert!(
            !body.contains(part) && !challenge.contains(part),
            "{why}: token echoed"
        );
    }
    assert_eq!(h.upstream.requests(), 0, "{why}: reached the upstream");
    assert_eq!(h.idp.token_requests(), 0, "{why}: reached the IdP");
}

/// No `Authorization` is 401 with a bare `Bearer` challenge.
#[tokio::test]
async fn missing_token_is_401_with_bare_challenge() {
    let h = Harness::start().await;
    let response = h.get("/obo/x", None).await;
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
}

/// Expired, wrong audience, wrong issuer, bad signature, `alg: none`, HS256, missing or string `exp`,
/// unknown key and malformed tokens are each 401 `invalid_token`.
#[tokio::test]
async fn bad_caller_tokens_are_401() {
    let h = Harness::start().await;
    let header = rs256(&h);
    let with = |patch: serde_json::Value| {
        let mut claims = good_claims(&h);
        for (k, v) in patch.as_object().expect("object") {
            if v.is_null() {
                claims.as_object_mut().expect("object").remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        h.idp.sign(&header, &claims)
    };
    let mut past = serde_json::Map::new();
    past.insert("exp".into(), json!(now() - 60));
    past.insert("iat".into(), json!(now() - 3600));
    let expired = h.idp.mint(&TokenClaims {
        scp: Some("access_as_user".into()),
        extra: past,
        ..TokenClaims::user("alice")
    });
    let good = h.token("alice", "access_as_user");
    let mut parts: Vec<&str> = good.split('.').collect();
    let other = h.token("bob", "access_as_user");
    parts[2] = other.split('.').nth(2).expect("signature");
    let bad_signature = parts.join(".");
    let unsigned = |alg: &str| {
        format!(
            "{}.{}.",
            B64.encode(json!({"alg": alg, "typ": "JWT"}).to_string()),
            B64.encode(good_claims(&h).to_string())
        )
    };
    let hs256 = format!(
        "{}.{}.{}",
        B64.encode(json!({"alg": "HS256", "kid": kid_of(&good)}).to_string()),
        B64.encode(good_claims(&h).to_string()),
        B64.encode([7u8; 32])
    );
    let stranger = DevIdp::start(support::bind().await, DevIdpConfig::default())
        .await
        .expect("idp");
    let foreign = stranger.sign(&header, &good_claims(&h));
    let cases: Vec<(String, &str)> = vec![
        (
            with(json!({"exp": now() - 600, "iat": now() - 1200})),
            "expired",
        ),
        (expired, "expired (minted)"),
        (with(json!({"aud": "api://someone-else"})), "wrong aud"),
        (with(json!({"aud": null})), "no aud"),
        (
            with(json!({"iss": "https://evil.example.com"})),
            "unknown iss",
        ),
        (with(json!({"iss": null})), "no iss"),
        (with(json!({"exp": null})), "no exp"),
        (
            with(json!({"exp": (now() + 600).to_string()})),
            "string exp",
        ),
        (with(json!({"nbf": now() + 600})), "not yet valid"),
        (with(json!({"iat": now() + 600})), "issued in the future"),
        (bad_signature, "bad signature"),
        (foreign, "signed by another IdP's key"),
        (unsigned("none"), "alg none"),
        (unsigned("None"), "alg None"),
        (hs256, "HS256"),
        (
            h.idp.sign(
                &json!({"alg": "RS256", "kid": "no-such-key"}),
                &good_claims(&h),
            ),
            "unknown kid",
        ),
        (
            h.idp.sign(
                &json!({"alg": "RS256", "kid": kid_of(&good), "crit": ["exp"]}),
                &good_claims(&h),
            ),
            "crit",
        ),
        ("not-a-jwt".to_owned(), "one part"),
        ("a.b.c".to_owned(), "garbage parts"),
    ];
    for (token, why) in &cases {
        assert_invalid_token(&h, token, why).await;
    }
}

/// A valid token without the route's scope is 403 `insufficient_scope` naming the scope.
#[tokio::test]
async fn missing_scope_is_403() {
    let h = Harness::start().await;
    let response = h.get("/obo/x", Some(&h.token("alice", "other"))).await;
    assert_eq!(response.status(), 403);
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer error=\"insufficient_scope\", scope=\"access_as_user\""
    );
    let app_only = h.idp.mint(&TokenClaims {
        roles: vec!["Reader".into()],
        ..TokenClaims::user("daemon")
    });
    let response = h.get("/obo/x", Some(&app_only)).await;
    assert_eq!(
        response.status(),
        403,
        "an app-only token cannot be exchanged On-Behalf-Of"
    );
    assert_eq!(h.idp.token_requests(), 0);
    assert_eq!(h.upstream.requests(), 0);
}

/// The token endpoint unreachable is 503.
#[tokio::test]
async fn idp_down_is_503() {
    let h = Harness::start_with(|_, dead| format!("http://{dead}/token")).await;
    let response = h
        .get("/obo/x", Some(&h.token("alice", "access_as_user")))
        .await;
    assert_eq!(response.status(), 503);
    assert_eq!(h.upstream.requests(), 0);
}

/// IdP 5xx is retried once, then 503; one transient failure is absorbed by the retry; 429 is 503 with its
/// `Retry-After`, which is remembered: until it passes, requests needing the IdP get 503 without a call.
#[tokio::test]
async fn idp_5xx_and_429_are_503() {
    let h = Harness::start().await;
    h.idp.fail_next(Failure::ServerError, 2);
    let response = h
        .get("/obo/x", Some(&h.token("alice", "access_as_user")))
        .await;
    assert_eq!(response.status(), 503);
    assert_problem(response, "idp-unavailable").await;
    assert_eq!(h.idp.token_requests(), 2, "one retry");
    h.idp.fail_next(Failure::ServerError, 1);
    let carol = h.token("carol", "access_as_user");
    assert_eq!(h.get("/obo/x", Some(&carol)).await.status(), 200);
    assert_eq!(h.idp.token_requests(), 4);

    h.idp.fail_next(
        Failure::TooManyRequests {
            retry_after_secs: 7,
        },
        1,
    );
    let response = h
        .get("/obo/x", Some(&h.token("bob", "access_as_user")))
        .await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "7");
    assert_eq!(h.idp.token_requests(), 5, "no retry against a Retry-After");
    let response = h
        .get("/obo/x", Some(&h.token("dave", "access_as_user")))
        .await;
    assert_eq!(
        response.status(),
        503,
        "back-off remembered for the identity"
    );
    let wait: u64 = response.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=7).contains(&wait), "{wait}");
    assert_eq!(h.idp.token_requests(), 5, "no IdP call while backing off");
    // A cached token still serves during the back-off.
    assert_eq!(h.get("/obo/y", Some(&carol)).await.status(), 200);
    assert_eq!(h.upstream.requests(), 2);
}

/// The body of a sidecar-made answer: an RFC 9457 problem of `kind` that quotes no token.
async fn assert_problem(response: reqwest::Response, kind: &str) -> serde_json::Value {
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.expect("problem JSON");
    assert_eq!(body["type"], format!("urn:obo-sidecar:problem:{kind}"));
    assert_eq!(body["status"], status);
    assert!(body["title"].is_string() && body["detail"].is_string());
    body
}

/// IdP `invalid_grant` is 401 `invalid_token`; the failure is not cached.
#[tokio::test]
async fn idp_invalid_grant_is_401() {
    let h = Harness::start().await;
    let caller = h.token("alice", "access_as_user");
    h.idp.fail_next(Failure::InvalidGrant, 1);
    let response = h.get("/obo/x", Some(&caller)).await;
    assert_eq!(response.status(), 401);
    assert!(
        response.headers()["www-authenticate"]
            .to_str()
            .expect("ascii")
            .contains("invalid_token")
    );
    assert_eq!(
        h.get("/obo/x", Some(&caller)).await.status(),
        200,
        "failures are not cached"
    );
}

/// IdP `interaction_required` with claims is 401 `insufficient_claims` carrying the claims (base64).
#[tokio::test]
async fn idp_claims_challenge_is_relayed() {
    let h = Harness::start().await;
    let claims = r#"{"access_token":{"capolids":{"essential":true,"values":["c1"]}}}"#;
    h.idp.fail_next(
        Failure::InteractionRequired {
            claims: claims.to_owned(),
        },
        1,
    );
    let response = h
        .get("/obo/x", Some(&h.token("alice", "access_as_user")))
        .await;
    assert_eq!(response.status(), 401);
    let challenge = response.headers()["www-authenticate"]
        .to_str()
        .expect("ascii")
        .to_owned();
    let encoded = base64::engine::general_purpose::STANDARD.encode(claims);
    assert!(
        challenge.contains("error=\"insufficient_claims\""),
        "{challenge}"
    );
    assert!(
        challenge.contains(&format!("claims=\"{encoded}\"")),
        "{challenge}"
    );
    assert!(
        challenge.contains(&format!(
            "authorization_uri=\"{}/authorize\"",
            h.idp.issuer()
        )),
        "{challenge}"
    );
}

/// IdP consent missing is 403 `insufficient_scope` with the route's scopes.
#[tokio::test]
async fn idp_consent_required_is_403() {
    let h = Harness::start().await;
    h.idp.fail_next(Failure::ConsentRequired, 1);
    let response = h
        .get("/obo/x", Some(&h.token("alice", "access_as_user")))
        .await;
    assert_eq!(response.status(), 403);
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer error=\"insufficient_scope\", scope=\"api://downstream/.default\""
    );
}

/// A wrong client secret (`invalid_client`) is our misconfiguration: 500.
#[tokio::test]
async fn idp_invalid_client_is_500() {
    let idp = DevIdp::start(support::bind().await, DevIdpConfig::default())
        .await
        .expect("idp");
    let upstream = obo_sidecar::dev::EchoUpstream::start(support::bind().await)
        .await
        .expect("upstream");
    let dead = support::dead_addr().await;
    let text = support::base_config(&idp, &upstream.url(), &idp.token_endpoint(), dead);
    let config = obo_sidecar::config::Config::parse(&text, &|name| {
        (name == support::SECRET_VARIABLE).then(|| "wrong-secret".to_owned())
    })
    .expect("config");
    let sidecar = support::start_sidecar(config).await;
    sidecar.ready().await;
    let token = idp.mint(&TokenClaims {
        scp: Some("access_as_user".into()),
        ..TokenClaims::user("alice")
    });
    let response = reqwest::Client::new()
        .get(format!("http://{}/obo/x", sidecar.proxy_addr))
        .bearer_auth(token)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 500);
    let body = response.text().await.expect("body");
    assert!(!body.contains("wrong-secret"));
    assert_eq!(upstream.requests(), 0);
}

/// A token request slower than the route's deadline is 503, not a hang.
#[tokio::test]
async fn idp_slower_than_the_deadline_is_503() {
    let h = Harness::start().await;
    h.idp.fail_next(Failure::Delay(Duration::from_secs(5)), 1);
    let started = std::time::Instant::now();
    let response = h
        .get("/obo-fast/x", Some(&h.token("alice", "access_as_user")))
        .await;
    assert_eq!(
        response.status(),
        503,
        "the route's 1 s deadline covers token acquisition"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A header block over 64 KiB is 431; a bearer token over 16 KiB is 401, before any decoding.
#[tokio::test]
async fn oversized_headers_are_431_and_oversized_bearer_401() {
    let h = Harness::start().await;
    let huge = "a".repeat(70 * 1024);
    let request =
        format!("GET /obo/x HTTP/1.1\r\nHost: x\r\nx-big: {huge}\r\nConnection: close\r\n\r\n");
    let (status, _) = support::raw_request(h.sidecar.proxy_addr, request.as_bytes()).await;
    assert_eq!(status, 431);
    let big_token = format!(
        "{}.{}.{}",
        "a".repeat(6000),
        "b".repeat(6000),
        "c".repeat(6000)
    );
    let response = h.get("/obo/x", Some(&big_token)).await;
    assert_eq!(response.status(), 401);
    assert_eq!(h.upstream.requests(), 0);
}

/// (IdP answer, times, status, challenge part, problem type, token requests)
type Row = (Failure, u32, u16, Option<&'static str>, &'static str, u64);

/// Every IdP row of SPEC §4, one table: the injected IdP answer, the status, the challenge and the problem
/// type the caller gets, and how many token requests it took (one retry for transient failures).
#[tokio::test]
async fn every_idp_answer_maps_to_its_status_challenge_and_problem() {
    let claims = r#"{"access_token":{"acrs":{"essential":true,"value":"c1"}}}"#;
    let rows: Vec<Row> = vec![
        (
            Failure::InteractionRequired {
                claims: claims.into(),
            },
            1,
            401,
            Some("error=\"insufficient_claims\""),
            "idp-claims-challenge",
            1,
        ),
        (
            Failure::ConsentRequired,
            1,
            403,
            Some("error=\"insufficient_scope\", scope=\"api://downstream/.default\""),
            "idp-consent-required",
            1,
        ),
        (
            Failure::InvalidGrant,
            1,
            401,
            Some("error=\"invalid_token\""),
            "idp-invalid-grant",
            1,
        ),
        (Failure::InvalidClient, 1, 500, None, "idp-misconfigured", 1),
        (Failure::NotBearer, 1, 500, None, "idp-misconfigured", 1),
        (Failure::ServerError, 2, 503, None, "idp-unavailable", 2),
        (Failure::NonJson200, 2, 503, None, "idp-unavailable", 2),
        (Failure::EmptyBody200, 2, 503, None, "idp-unavailable", 2),
        (Failure::ResetConnection, 2, 503, None, "idp-unavailable", 2),
        (
            Failure::Delay(Duration::from_secs(3)),
            2,
            503,
            None,
            "idp-unavailable",
            2,
        ),
    ];
    for (failure, count, status, challenge, kind, calls) in rows {
        let h = Harness::start().await;
        let why = format!("{failure:?}");
        h.idp.fail_next(failure, count);
        let caller = h.token("alice", "access_as_user");
        let response = h.get("/obo/x", Some(&caller)).await;
        assert_eq!(response.status(), status, "{why}");
        let seen = response
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().expect("ascii").to_owned());
        match challenge {
            Some(expected) => assert!(
                seen.as_deref().is_some_and(|c| c.contains(expected)),
                "{why}: {seen:?}"
            ),
            None => assert_eq!(seen, None, "{why}"),
        }
        let body = assert_problem(response, kind).await;
        assert!(
            !body.to_string().contains(&caller[caller.len() - 20..]),
            "{why}: token in body"
        );
        assert_eq!(h.idp.token_requests(), calls, "{why}");
        assert_eq!(h.upstream.requests(), 0, "{why}: reached the upstream");
    }
}
