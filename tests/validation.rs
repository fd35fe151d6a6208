//! Caller validation under key rotation, IdP outages and multi-tenant issuers, and the route features that
//! build on validated claims: host and method selectors, `caller_auth = "none"`, `forward_claims`.
// Every integration test runs against the development IdP and echo upstream.
#![cfg(feature = "dev")]
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "helpers of tests: a failure is a test failure"
)]

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use obo_sidecar::dev::EchoUpstream;
use obo_sidecar::dev::{DEFAULT_CLIENT_ID, DevIdp, DevIdpConfig, TokenClaims};
use support::{Harness, SECRET_VARIABLE, echoed, seen_authorization, seen_header};

const TENANT_A: &str = "11111111-1111-4111-8111-111111111111";
const TENANT_B: &str = "22222222-2222-4222-8222-222222222222";

fn route(name: &str, upstream: &str, extra: &str) -> String {
    format!(
        "\n[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}/\"\nupstream = \"{upstream}/{name}/\"\n{extra}\n"
    )
}

fn identity(endpoint: &str) -> String {
    format!(
        "\n[identity]\ntoken_endpoint = \"{endpoint}\"\nclient_id = \"{DEFAULT_CLIENT_ID}\"\nclient_secret = {{ env = \"{SECRET_VARIABLE}\" }}\n"
    )
}

fn user(sub: &str) -> TokenClaims {
    TokenClaims {
        scp: Some("access_as_user".into()),
        ..TokenClaims::user(sub)
    }
}

/// After the IdP starts signing with a newly published key, tokens carrying it are accepted within the
/// refetch interval, with no restart, and the old key's tokens keep working.
#[tokio::test]
async fn rotated_signing_key_is_accepted_without_restart() {
    let h = Harness::start_custom(|idp, upstream| {
        support::inbound_config(idp).replace(
            "clock_skew = \"5s\"",
            "clock_skew = \"5s\"\njwks_min_refetch = \"1s\"",
        ) + &route("pass", upstream, "token = \"passthrough\"")
    })
    .await;
    let old = h.idp.mint(&user("alice"));
    assert_eq!(h.get("/pass/x", Some(&old)).await.status(), 200);
    let fetches = h.idp.jwks_requests();
    h.idp.rotate_key();
    let new = h.idp.mint(&user("bob"));
    let first = Instant::now();
    let mut status = 0;
    for _ in 0..40 {
        status = h.get("/pass/x", Some(&new)).await.status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(status, 200, "the rotated key is picked up");
    assert!(
        first.elapsed() <= Duration::from_secs(5),
        "accepted within 5 s: {:?}",
        first.elapsed()
    );
    assert!(
        h.idp.jwks_requests() - fetches <= 2,
        "one refetch, perhaps a second after the interval"
    );
    assert_eq!(
        h.get("/pass/x", Some(&h.idp.mint(&user("carol"))))
            .await
            .status(),
        200
    );
}

/// A flood of 1 000 tokens with random key ids is refused (401) and costs the IdP at most one key-set fetch
/// per refetch interval.
#[tokio::test]
async fn random_kid_flood_fetches_keys_at_most_once_per_interval() {
    let h = Harness::start().await;
    let fetches = h.idp.jwks_requests() + h.idp.discovery_requests();
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    let tokens: Vec<String> = (0..1000)
        .map(|i| {
            h.idp.sign(
                &serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": format!("random-{i}-{}", i * 7919)}),
                &serde_json::json!({"iss": h.idp.issuer(), "aud": "api://obo-sidecar", "sub": "x", "scp": "access_as_user", "exp": now + 600}),
            )
        })
        .collect();
    let started = Instant::now();
    let statuses = futures_util::stream::iter(tokens.iter())
        .map(|t| async { h.get("/pass/x", Some(t)).await.status().as_u16() })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    assert!(statuses.iter().all(|s| *s == 401));
    let intervals = 1 + started.elapsed().as_secs() / 5;
    let made = h.idp.jwks_requests() + h.idp.discovery_requests() - fetches;
    // Each refetch is one discovery document and one key set.
    assert!(
        made <= 2 * intervals,
        "{made} fetches in {intervals} interval(s)"
    );
    assert_eq!(h.upstream.requests(), 0);
}

/// JWKS down at start: the proxy serves, `/readyz` is 503 with a reason, callers get 503 with `Retry-After`;
/// when the IdP returns the sidecar becomes ready by itself and callers get 200.
#[tokio::test]
async fn jwks_down_at_start_is_503_until_the_idp_returns() {
    let idp = DevIdp::start(support::bind().await, DevIdpConfig::default())
        .await
        .expect("idp");
    idp.jwks_unavailable(true);
    let upstream = EchoUpstream::start(support::bind().await)
        .await
        .expect("upstream");
    let text =
        support::inbound_config(&idp) + &route("pass", &upstream.url(), "token = \"passthrough\"");
    let sidecar = support::start_sidecar(support::parse(&text)).await;
    let http = reqwest::Client::new();
    let token = idp.mint(&user("alice"));
    let readyz = http
        .get(format!("http://{}/readyz", sidecar.admin_addr))
        .send()
        .await
        .expect("readyz");
    assert_eq!(readyz.status(), 503);
    let reason: serde_json::Value = readyz.json().await.expect("json");
    assert_eq!(reason["issuers"][0], idp.issuer());
    let response = http
        .get(format!("http://{}/pass/x", sidecar.proxy_addr))
        .bearer_auth(&token)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    idp.jwks_unavailable(false);
    tokio::time::timeout(Duration::from_secs(15), sidecar.ready())
        .await
        .expect("ready within the retry interval");
    let response = http
        .get(format!("http://{}/pass/x", sidecar.proxy_addr))
        .bearer_auth(&token)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
}

/// JWKS down later: the last good keys keep validating, even after a refetch attempt fails.
#[tokio::test]
async fn jwks_down_later_keeps_the_last_good_keys() {
    let h = Harness::start().await;
    h.idp.jwks_unavailable(true);
    let stranger = h.idp.sign(
        &serde_json::json!({"alg": "RS256", "kid": "unknown"}),
        &serde_json::json!({"iss": h.idp.issuer(), "aud": "api://obo-sidecar", "exp": 4_000_000_000u64}),
    );
    assert_eq!(
        h.get("/pass/x", Some(&stranger)).await.status(),
        401,
        "unknown kid, refetch fails"
    );
    assert_eq!(
        h.get("/pass/x", Some(&h.token("alice", "access_as_user")))
            .await
            .status(),
        200
    );
}

fn tenant_config(idp: &DevIdp, upstream: &str, allowed: &[&str]) -> String {
    format!(
        "[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n[inbound]\nissuers = [\"{}/{{tenantid}}/v2.0\"]\naudiences = [\"api://{DEFAULT_CLIENT_ID}\"]\nallowed_tenants = {allowed:?}\n",
        idp.issuer()
    ) + &identity(&format!("{}/{{tenantid}}/oauth2/v2.0/token", idp.issuer()))
        + &route(
            "obo",
            upstream,
            "token = \"obo\"\nscopes = [\"api://downstream/.default\"]",
        )
}

/// A `{tenantid}` issuer: an allowed tenant's token is validated against that tenant's issuer and exchanged
/// at that tenant's token endpoint; a tenant not allowed, or a `tid` that does not match `iss`, is 401 with
/// no fetch for it.
#[tokio::test]
async fn allowed_tenants_are_validated_and_exchanged_per_tenant() {
    let h = Harness::start_custom(|idp, upstream| tenant_config(idp, upstream, &[TENANT_A])).await;
    let token = h.idp.mint_for_tenant(TENANT_A, &user("alice"));
    let echo = echoed(h.get("/obo/x", Some(&token)).await).await;
    assert_eq!(
        echo["authorization"]["claims"]["iss"],
        h.idp.tenant_issuer(TENANT_A)
    );
    assert_eq!(
        h.idp.recorded_requests()[0].tenant.as_deref(),
        Some(TENANT_A)
    );
    let discovery = h.idp.discovery_requests();
    let other = h.idp.mint_for_tenant(TENANT_B, &user("bob"));
    assert_eq!(
        h.get("/obo/x", Some(&other)).await.status(),
        401,
        "tenant not allowed"
    );
    let mut mixed = user("mallory");
    mixed.tid = Some(TENANT_A.into());
    mixed.extra.insert(
        "iss".into(),
        serde_json::json!(h.idp.tenant_issuer(TENANT_B)),
    );
    assert_eq!(
        h.get("/obo/x", Some(&h.idp.mint(&mixed))).await.status(),
        401,
        "tid and iss disagree"
    );
    let mut swapped = user("mallory");
    swapped.tid = Some(TENANT_B.into());
    swapped.extra.insert(
        "iss".into(),
        serde_json::json!(h.idp.tenant_issuer(TENANT_A)),
    );
    assert_eq!(
        h.get("/obo/x", Some(&h.idp.mint(&swapped))).await.status(),
        401,
        "an allowed tenant's iss with another tid"
    );
    assert_eq!(
        h.idp.discovery_requests(),
        discovery,
        "nothing fetched for refused tenants"
    );
    assert_eq!(h.upstream.requests(), 1);
}

/// With no `allowed_tenants`, any GUID tenant is resolved on demand; a `tid` that is not a GUID is refused
/// before any fetch.
#[tokio::test]
async fn any_guid_tenant_is_resolved_on_demand() {
    let h = Harness::start_custom(|idp, upstream| tenant_config(idp, upstream, &[])).await;
    for (tenant, sub) in [(TENANT_A, "alice"), (TENANT_B, "bob")] {
        let echo = echoed(
            h.get("/obo/x", Some(&h.idp.mint_for_tenant(tenant, &user(sub))))
                .await,
        )
        .await;
        assert_eq!(echo["authorization"]["claims"]["tid"], tenant);
    }
    let discovery = h.idp.discovery_requests();
    let bad = h.idp.mint_for_tenant("not-a-guid", &user("mallory"));
    assert_eq!(h.get("/obo/x", Some(&bad)).await.status(), 401);
    assert_eq!(h.idp.discovery_requests(), discovery);
}

/// `forward_claims` headers carry the validated claims and replace what the caller sent, in any spelling.
#[tokio::test]
async fn forward_claims_replace_caller_supplied_headers() {
    let h = Harness::start_custom(|idp, upstream| {
        support::inbound_config(idp)
            + &route(
                "legacy",
                upstream,
                "token = \"none\"\nforward_claims = { \"x-caller-oid\" = \"oid\", \"x-caller-roles\" = \"roles\", \"x-caller-missing\" = \"nope\" }",
            )
    })
    .await;
    let token = h.idp.mint(&TokenClaims {
        oid: Some("0000aaaa-0000-4000-8000-00000000beef".into()),
        roles: vec!["Reader".into(), "Writer".into()],
        ..user("alice")
    });
    let request = format!(
        "GET /legacy/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nX-Caller-Oid: spoofed\r\nx_caller_oid: spoofed\r\nX-Caller-Missing: spoofed\r\nConnection: close\r\n\r\n"
    );
    let (status, text) = support::raw_request(h.sidecar.proxy_addr, request.as_bytes()).await;
    assert_eq!(status, 200, "{text}");
    let echo: serde_json::Value =
        serde_json::from_str(text.split("\r\n\r\n").nth(1).expect("body").trim()).expect("json");
    assert_eq!(
        seen_header(&echo, "x-caller-oid"),
        vec!["0000aaaa-0000-4000-8000-00000000beef"]
    );
    assert!(seen_header(&echo, "x_caller_oid").is_empty());
    assert_eq!(seen_header(&echo, "x-caller-roles"), vec!["Reader,Writer"]);
    assert!(
        seen_header(&echo, "x-caller-missing").is_empty(),
        "a missing claim sends nothing, not the spoof: {echo}"
    );
    assert_eq!(seen_authorization(&echo), None);
}

/// Routes sharing a prefix are told apart by host (port ignored) and method.
#[tokio::test]
async fn host_and_methods_select_among_routes_of_one_prefix() {
    let h = Harness::start_custom(|idp, upstream| {
        support::inbound_config(idp)
            + &format!("\n[[routes]]\nname = \"by-host\"\npath_prefix = \"/api/\"\nhost = \"Reports.Example\"\nupstream = \"{upstream}/host/\"\ntoken = \"none\"\n")
            + &format!("\n[[routes]]\nname = \"writes\"\npath_prefix = \"/api/\"\nmethods = [\"post\", \"PUT\"]\nupstream = \"{upstream}/writes/\"\ntoken = \"none\"\n")
            + &format!("\n[[routes]]\nname = \"reads\"\npath_prefix = \"/api/\"\nupstream = \"{upstream}/reads/\"\ntoken = \"none\"\n")
    })
    .await;
    let token = h.token("alice", "access_as_user");
    let uri = |request: reqwest::RequestBuilder| async {
        echoed(request.bearer_auth(&token).send().await.expect("request")).await["uri"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(
        uri(h
            .http
            .get(h.url("/api/x"))
            .header("host", "reports.example:8443"))
        .await,
        "/host/x"
    );
    assert_eq!(uri(h.http.post(h.url("/api/x"))).await, "/writes/x");
    assert_eq!(uri(h.http.get(h.url("/api/x"))).await, "/reads/x");
}

/// `caller_auth = "none"` on a loopback listener: no token needed, and a caller's `Authorization` is still
/// never forwarded.
#[tokio::test]
async fn caller_auth_none_needs_no_token_and_forwards_none() {
    let h = Harness::start_custom(|idp, upstream| {
        support::inbound_config(idp)
            + &route("open", upstream, "token = \"none\"\ncaller_auth = \"none\"")
    })
    .await;
    assert_eq!(h.get("/open/x", None).await.status(), 200);
    let echo = echoed(h.get("/open/x", Some("whatever.it.is")).await).await;
    assert_eq!(seen_authorization(&echo), None);
}

/// `caller_auth = "none"` is refused by `check` on a listener beyond loopback, and on `obo` routes.
#[test]
fn caller_auth_none_is_refused_beyond_loopback_and_on_obo() {
    let text = "[listen]\nproxy = \"0.0.0.0:7080\"\n[inbound]\nissuers = [\"https://idp.example/\"]\naudiences = [\"a\"]\n[[routes]]\nname = \"open\"\npath_prefix = \"/open\"\nupstream = \"http://127.0.0.1:9/\"\ntoken = \"passthrough\"\ncaller_auth = \"none\"\n";
    let problems = obo_sidecar::config::Config::parse(text, &|_| None)
        .expect_err("refused")
        .problems;
    let texts: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert!(
        texts
            .iter()
            .any(|p| p.starts_with("routes[0].caller_auth: \"none\" only with token")),
        "{texts:?}"
    );
    assert!(
        texts.iter().any(|p| p.starts_with(
            "routes[0].caller_auth: \"none\" only when the proxy listener is loopback"
        )),
        "{texts:?}"
    );
}

/// A repeat caller is served from the validated-token cache, and route policy still applies on every hit.
#[tokio::test]
async fn validated_token_cache_still_applies_route_policy() {
    let h = Harness::start().await;
    let token = h.token("alice", "other-scope");
    for _ in 0..3 {
        assert_eq!(h.get("/obo/x", Some(&token)).await.status(), 403);
        assert_eq!(h.get("/pass/x", Some(&token)).await.status(), 200);
    }
}
