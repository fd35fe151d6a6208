//! End to end through the sidecar: routing, the token swap for each token kind, the token cache, header
//! hygiene, streaming, and upstream failures.
// Every integration test runs against the development IdP and echo upstream.
#![cfg(feature = "dev")]
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "helpers of tests: a failure is a test failure"
)]

mod support;

use obo_sidecar::dev::{DEFAULT_CLIENT_ID, TokenClaims};
use support::{Harness, echoed, raw_request, seen_authorization, seen_header};

fn claims_of(echo: &serde_json::Value) -> &serde_json::Value {
    &echo["authorization"]["claims"]
}

/// The upstream of an `obo` route sees a token for its own audience, for the same user, never the caller's.
#[tokio::test]
async fn obo_route_forwards_an_exchanged_token_for_the_same_user() {
    let h = Harness::start().await;
    let caller = h.token("alice", "access_as_user");
    let echo = echoed(h.get("/obo/hello", Some(&caller)).await).await;
    let sent = seen_authorization(&echo).expect("upstream saw a token");
    assert!(sent.starts_with("Bearer "));
    assert!(
        !sent.contains(&caller),
        "the caller's token must never reach an obo upstream"
    );
    let claims = claims_of(&echo);
    assert_eq!(claims["aud"], "api://downstream");
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["azp"], DEFAULT_CLIENT_ID);
    assert_eq!(h.idp.token_requests(), 1);
    let recorded = h.idp.recorded_requests();
    assert_eq!(
        recorded[0].grant_type.as_deref(),
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    );
    assert_eq!(
        recorded[0].field("requested_token_use"),
        Some("on_behalf_of")
    );
    assert_eq!(
        recorded[0].field("scope"),
        Some("api://downstream/.default")
    );
    assert_eq!(recorded[0].field("client_id"), Some(DEFAULT_CLIENT_ID));
    assert_eq!(
        recorded[0].field("client_secret"),
        Some("[redacted]"),
        "client_secret_post"
    );
    assert_eq!(
        recorded[0].field("assertion"),
        Some(caller.as_str()),
        "the subject token is the assertion"
    );
}

/// A repeat caller is served from the cache: no second IdP call, the same upstream token.
#[tokio::test]
async fn second_request_for_the_same_caller_makes_no_idp_call() {
    let h = Harness::start().await;
    let caller = h.token("alice", "access_as_user");
    let first = seen_authorization(&echoed(h.get("/obo/a", Some(&caller)).await).await);
    let second = seen_authorization(&echoed(h.get("/obo/b", Some(&caller)).await).await);
    assert_eq!(first, second);
    assert_eq!(h.idp.token_requests(), 1);
    assert_eq!(h.metric("obo_token_cache_entries").await, Some(1.0));
}

/// Two callers never share an upstream token, even for the same route and scopes.
#[tokio::test]
async fn two_callers_get_different_upstream_tokens() {
    let h = Harness::start().await;
    let alice = echoed(
        h.get("/obo/x", Some(&h.token("alice", "access_as_user")))
            .await,
    )
    .await;
    let bob = echoed(
        h.get("/obo/x", Some(&h.token("bob", "access_as_user")))
            .await,
    )
    .await;
    assert_ne!(seen_authorization(&alice), seen_authorization(&bob));
    assert_eq!(claims_of(&alice)["sub"], "alice");
    assert_eq!(claims_of(&bob)["sub"], "bob");
    assert_eq!(h.idp.token_requests(), 2);
}

/// Concurrent first requests of one caller make one IdP call (single flight).
#[tokio::test]
async fn concurrent_misses_make_one_idp_call() {
    let h = Harness::start().await;
    let caller = h.token("alice", "access_as_user");
    let requests = (0..32).map(|_| h.get("/obo/x", Some(&caller)));
    let responses = futures_util::future::join_all(requests).await;
    assert!(responses.iter().all(|r| r.status() == 200));
    assert_eq!(h.idp.token_requests(), 1);
}

/// An `app` route sends the sidecar's own client-credentials token, whoever the caller is.
#[tokio::test]
async fn app_route_sends_the_sidecars_own_token() {
    let h = Harness::start().await;
    let echo = echoed(
        h.get("/app/x", Some(&h.token("alice", "access_as_user")))
            .await,
    )
    .await;
    let claims = claims_of(&echo);
    assert_eq!(claims["aud"], "api://downstream");
    assert_eq!(claims["sub"], DEFAULT_CLIENT_ID);
    assert_eq!(
        h.idp.recorded_requests()[0].grant_type.as_deref(),
        Some("client_credentials")
    );
    // A second caller reuses the app token.
    let again = echoed(
        h.get("/app/y", Some(&h.token("bob", "access_as_user")))
            .await,
    )
    .await;
    assert_eq!(seen_authorization(&echo), seen_authorization(&again));
    assert_eq!(h.idp.token_requests(), 1);
}

/// `passthrough` forwards the caller's own validated token; `none` forwards no `Authorization` at all.
#[tokio::test]
async fn passthrough_forwards_the_callers_token_and_none_forwards_none() {
    let h = Harness::start().await;
    let caller = h.token("alice", "access_as_user");
    let echo = echoed(h.get("/pass/x", Some(&caller)).await).await;
    assert_eq!(seen_authorization(&echo), Some(format!("Bearer {caller}")));
    let reader = h.idp.mint(&TokenClaims {
        roles: vec!["Reader".to_owned()],
        ..TokenClaims::user("svc")
    });
    let echo = echoed(h.get("/none/x", Some(&reader)).await).await;
    assert_eq!(seen_authorization(&echo), None);
    assert_eq!(h.idp.token_requests(), 0);
}

/// The longest matching prefix wins at segment boundaries; the prefix is replaced by the upstream path and
/// the query is kept as sent.
#[tokio::test]
async fn longest_prefix_wins_and_path_is_mapped_with_query_kept() {
    let h = Harness::start().await;
    let caller = h.token("alice", "access_as_user read");
    let echo = echoed(h.get("/obo/v1.0/me?$select=id&x=%2F", Some(&caller)).await).await;
    assert_eq!(echo["uri"], "/base/v1.0/me?$select=id&x=%2F");
    let echo = echoed(h.get("/obo/other/items", Some(&caller)).await).await;
    assert_eq!(echo["uri"], "/other/items");
    assert_eq!(claims_of(&echo)["aud"], "api://other");
    let echo = echoed(h.get("/obo/a/../b//c/%252e%252e", Some(&caller)).await).await;
    assert_eq!(echo["uri"], "/base/b/c/%252e%252e");
    assert_eq!(h.get("/obother", Some(&caller)).await.status(), 404);
}

/// Paths with an encoded slash, a backslash or a climb above the root are refused before any routing.
#[tokio::test]
async fn dangerous_paths_are_400_and_unknown_paths_404() {
    let h = Harness::start().await;
    for path in ["/obo/a%2Fb", "/obo/a%5cb", "/obo/%00", "/obo/../../etc"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (status, _) = raw_request(h.sidecar.proxy_addr, request.as_bytes()).await;
        assert_eq!(status, 400, "{path}");
    }
    let response = h.get("/nowhere", None).await;
    assert_eq!(response.status(), 404);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(h.upstream.requests(), 0);
}

/// Hop-by-hop headers, headers named in `Connection`, proxy credentials and caller-supplied forwarding
/// headers never reach the upstream; `X-Forwarded-*` are set by the sidecar.
#[tokio::test]
async fn hop_by_hop_and_spoofed_forwarding_headers_are_not_forwarded() {
    let h = Harness::start().await;
    let caller = h.token("alice", "access_as_user");
    let request = format!(
        "GET /pass/x HTTP/1.1\r\nHost: api.example\r\nAuthorization: Bearer {caller}\r\n\
         Connection: close, x-hop\r\nx-hop: secret\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic eDp5\r\n\
         X-Forwarded-For: 6.6.6.6\r\nX_Forwarded_For: 6.6.6.6\r\nX-Forwarded-Host: evil\r\nX-Forwarded-Proto: https\r\n\
         Forwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nTE: trailers\r\nx-kept: yes\r\n\
         traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\nX-Request-Id: req-42\r\n\r\n"
    );
    let (status, text) = raw_request(h.sidecar.proxy_addr, request.as_bytes()).await;
    assert_eq!(status, 200, "{text}");
    let body = text.split("\r\n\r\n").nth(1).expect("body");
    let echo: serde_json::Value = serde_json::from_str(body.trim()).expect("json");
    for gone in [
        "x-hop",
        "keep-alive",
        "proxy-authorization",
        "forwarded",
        "x-real-ip",
        "x_forwarded_for",
    ] {
        assert!(seen_header(&echo, gone).is_empty(), "{gone} was forwarded");
    }
    assert_eq!(seen_header(&echo, "x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(seen_header(&echo, "x-forwarded-host"), vec!["api.example"]);
    assert_eq!(seen_header(&echo, "x-forwarded-proto"), vec!["http"]);
    assert_eq!(seen_header(&echo, "te"), vec!["trailers"]);
    assert_eq!(seen_header(&echo, "x-kept"), vec!["yes"]);
    assert_eq!(
        seen_header(&echo, "traceparent"),
        vec!["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"],
        "trace context passes unchanged"
    );
    assert_eq!(
        seen_header(&echo, "x-request-id"),
        vec!["req-42"],
        "the caller's request id is kept"
    );
    assert!(
        text.to_ascii_lowercase().contains("x-request-id: req-42"),
        "and returned to the caller"
    );
    assert_eq!(seen_header(&echo, "authorization").len(), 1);
    let host = seen_header(&echo, "host");
    assert_eq!(
        host,
        vec![h.upstream.addr().to_string()],
        "Host is the upstream's authority"
    );
}

/// A 64 MiB body streams to the upstream and back intact.
#[tokio::test]
async fn large_streamed_body_passes_intact() {
    let h = Harness::start().await;
    let caller = h.token("alice", "access_as_user");
    let body: Vec<u8> = (0..64 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
        .collect();
    let digest = |b: &[u8]| {
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b)
            .as_ref()
            .to_vec()
    };
    let expected = digest(&body);
    let response = h
        .http
        .post(h.url("/obo/upload"))
        .bearer_auth(&caller)
        .header("x-echo-body", "stream")
        .body(body)
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status(), 200);
    let returned = response.bytes().await.expect("download");
    assert_eq!(returned.len(), 64 * 1024 * 1024);
    assert_eq!(digest(&returned), expected);
}

/// Upstream unreachable is 502, an upstream slower than the route's timeout is 504.
#[tokio::test]
async fn upstream_down_is_502_and_slow_is_504() {
    let h = Harness::start().await;
    let caller = h.token("alice", "access_as_user");
    assert_eq!(h.get("/dead/x", Some(&caller)).await.status(), 502);
    let slow = h
        .http
        .get(h.url("/slow/x"))
        .bearer_auth(&caller)
        .header("x-echo-delay-ms", "3000")
        .send()
        .await
        .expect("request");
    assert_eq!(slow.status(), 504);
}

/// An upstream 401 is passed back unchanged and drops the cached token, so the next request exchanges anew.
#[tokio::test]
async fn upstream_401_passes_back_and_drops_the_cached_token() {
    let h = Harness::start().await;
    let caller = h.token("alice", "access_as_user");
    echoed(h.get("/obo/x", Some(&caller)).await).await;
    let refused = h
        .http
        .get(h.url("/obo/x"))
        .bearer_auth(&caller)
        .header("x-echo-status", "401")
        .send()
        .await
        .expect("request");
    assert_eq!(refused.status(), 401);
    assert_eq!(h.idp.token_requests(), 1);
    echoed(h.get("/obo/x", Some(&caller)).await).await;
    assert_eq!(h.idp.token_requests(), 2);
}

/// `/healthz` and `/readyz` answer on the admin listener.
#[tokio::test]
async fn admin_endpoints_answer() {
    let h = Harness::start().await;
    let health = h
        .http
        .get(h.admin_url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    let ready: serde_json::Value = h
        .http
        .get(h.admin_url("/readyz"))
        .send()
        .await
        .expect("readyz")
        .json()
        .await
        .expect("json");
    assert_eq!(ready["ready"], true);
}

/// An IdP served over TLS by a private CA is trusted through `ca_file` (JWKS and token endpoint), and an
/// `obo` route forwards with an exchanged token; without the CA file the keys never load and callers get 503.
#[tokio::test]
async fn idp_over_tls_is_trusted_through_ca_file() {
    let pki = support::TestPki::new();
    let config = obo_sidecar::dev::DevIdpConfig {
        tls: Some(pki.server.clone()),
        ..obo_sidecar::dev::DevIdpConfig::default()
    };
    let idp = obo_sidecar::dev::DevIdp::start(support::bind().await, config)
        .await
        .expect("idp");
    assert!(idp.issuer().starts_with("https://"));
    let upstream = obo_sidecar::dev::EchoUpstream::start(support::bind().await)
        .await
        .expect("upstream");
    let ca = pki.ca_file();
    let dead = support::dead_addr().await;
    let base = support::base_config(&idp, &upstream.url(), &idp.token_endpoint(), dead);
    let with_ca = base
        .replace(
            "clock_skew = \"5s\"",
            &format!(
                "clock_skew = \"5s\"\nca_file = {:?}",
                ca.display().to_string()
            ),
        )
        .replace(
            "timeout = \"2s\"",
            &format!("timeout = \"2s\"\nca_file = {:?}", ca.display().to_string()),
        );
    let sidecar = support::start_sidecar(support::parse(&with_ca)).await;
    tokio::time::timeout(std::time::Duration::from_secs(20), sidecar.ready())
        .await
        .expect("ready");
    let caller = idp.mint(&TokenClaims {
        scp: Some("access_as_user".into()),
        ..TokenClaims::user("alice")
    });
    let http = reqwest::Client::new();
    let response = http
        .get(format!("http://{}/obo/x", sidecar.proxy_addr))
        .bearer_auth(&caller)
        .send()
        .await
        .expect("request");
    let echo = echoed(response).await;
    assert_eq!(claims_of(&echo)["aud"], "api://downstream");
    assert_eq!(claims_of(&echo)["iss"], idp.issuer());

    let without_ca = support::start_sidecar(support::parse(&base)).await;
    let response = http
        .get(format!("http://{}/obo/x", without_ca.proxy_addr))
        .bearer_auth(&caller)
        .send()
        .await
        .expect("request");
    assert_eq!(
        response.status(),
        503,
        "an untrusted IdP certificate means no keys"
    );
    assert!(response.headers().contains_key("retry-after"));
    let _ = std::fs::remove_file(ca);
}
