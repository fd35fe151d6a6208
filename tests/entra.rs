//! Entra-native credentials end to end (SPEC §13): a managed identity as the client assertion (through IMDS
//! and through App Service's `IDENTITY_ENDPOINT`) or as the identity itself, and secret, certificate and
//! assertion files rotated under load, each checked at the token endpoint and at the managed identity
//! endpoint (a loopback stand-in that records what it received).
// Every integration test runs against the development IdP and echo upstream.
#![cfg(feature = "dev")]
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test failure is the point"
)]

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use obo_sidecar::dev::{
    ClientAuth, DEFAULT_CLIENT_ID, DevClient, DevIdp, FEDERATED_AUDIENCE, TokenClaims,
};
use support::{Harness, RecordingServer, echoed, seen_authorization};

const PATIENCE: Duration = Duration::from_secs(10);
/// The principal id of the stand-in managed identity: the subject of the app's federated credential.
const MI_PRINCIPAL: &str = "5f2c1b1e-0000-4000-8000-00000000a11c";
const MI_CLIENT: &str = "mi-app";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token the IdP signed for `aud` and `sub`, as Entra would issue a managed identity's token.
fn managed_identity_token(idp: &DevIdp, sub: &str, aud: &str) -> String {
    let kid = idp
        .mint(&TokenClaims::user("k"))
        .split('.')
        .next()
        .map(|header| {
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(header)
                .unwrap();
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["kid"].clone()
        });
    let now = now();
    idp.sign(
        &serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": kid}),
        &serde_json::json!({"iss": idp.issuer(), "sub": sub, "oid": sub, "aud": aud, "iat": now, "exp": now + 3600}),
    )
}

/// What IMDS and App Service answer: `expires_on` and `expires_in` as strings of digits.
fn managed_identity_answer(token: &str, resource: &str) -> serde_json::Value {
    serde_json::json!({
        "access_token": token,
        "expires_on": (now() + 3600).to_string(),
        "expires_in": "3600",
        "not_before": now().to_string(),
        "resource": resource,
        "token_type": "Bearer",
    })
}

fn caller(h: &Harness, sub: &str) -> String {
    h.idp.mint(&TokenClaims {
        aud: Some(format!("api://{MI_CLIENT}")),
        scp: Some("access_as_user".into()),
        ..TokenClaims::user(sub)
    })
}

fn mi_config(idp: &DevIdp, upstream: &str, managed_identity: &str) -> String {
    idp.add_client(DevClient::with_federated_subject(MI_CLIENT, MI_PRINCIPAL));
    support::inbound_config_for(idp, &[&format!("api://{MI_CLIENT}")])
        + &format!(
            "\n[identity]\ntoken_endpoint = \"{}\"\nclient_id = \"{MI_CLIENT}\"\nmanaged_identity = {managed_identity}\n\n[[routes]]\nname = \"obo\"\npath_prefix = \"/obo/\"\nupstream = \"{upstream}/\"\ntoken = \"obo\"\nscopes = [\"api://downstream/.default\"]\n",
            idp.token_endpoint()
        )
}

/// Checks the token endpoint saw a federated client assertion, and no secret.
fn assert_federated_assertion(h: &Harness, client_id: &str) {
    let recorded = h.idp.recorded_requests();
    let last = recorded.last().expect("a token request");
    assert_eq!(last.client_auth, Some(ClientAuth::FederatedAssertion));
    assert_eq!(
        last.field("client_assertion_type"),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    assert_eq!(last.field("client_id"), Some(client_id));
    assert!(last.field("client_assertion").is_some());
    assert!(last.field("client_secret").is_none(), "no secret sent");
    assert!(!last.basic_auth);
}

/// App Service, Container Apps, Functions: the managed identity's token for `api://AzureADTokenExchange`,
/// fetched from `IDENTITY_ENDPOINT` with `X-IDENTITY-HEADER` and `api-version=2019-08-01`, is the client
/// assertion; one fetch serves later exchanges.
#[tokio::test]
async fn managed_identity_through_identity_endpoint_is_the_client_assertion() {
    let endpoint = RecordingServer::start().await;
    let vars = vec![
        ("IDENTITY_ENDPOINT".to_owned(), endpoint.url("/msi/token")),
        (
            "IDENTITY_HEADER".to_owned(),
            "the-identity-header".to_owned(),
        ),
    ];
    let h = Harness::start_custom_env(|idp, upstream| mi_config(idp, upstream, "{}"), &vars).await;
    endpoint.answer(
        200,
        &managed_identity_answer(
            &managed_identity_token(&h.idp, MI_PRINCIPAL, FEDERATED_AUDIENCE),
            FEDERATED_AUDIENCE,
        ),
    );
    for sub in ["alice", "bob"] {
        let echo = echoed(h.get("/obo/x", Some(&caller(&h, sub))).await).await;
        assert_eq!(echo["authorization"]["claims"]["sub"], sub);
        assert_federated_assertion(&h, MI_CLIENT);
    }
    let requests = endpoint.requests();
    assert_eq!(requests.len(), 1, "one managed identity token serves both");
    let request = &requests[0];
    assert_eq!(
        (request.method.as_str(), request.path.as_str()),
        ("GET", "/msi/token")
    );
    assert_eq!(request.query("api-version"), Some("2019-08-01"));
    assert_eq!(
        request.query("resource"),
        Some("api://AzureADTokenExchange")
    );
    assert_eq!(request.query("client_id"), None, "system-assigned");
    assert_eq!(
        request.header("x-identity-header"),
        Some("the-identity-header")
    );
    assert!(
        !support::captured_logs()
            .text()
            .contains("the-identity-header"),
        "IDENTITY_HEADER never reaches a log line"
    );
}

/// A VM: IMDS at `/metadata/identity/oauth2/token` with `Metadata: true` and `api-version=2018-02-01`, a
/// user-assigned identity named by `client_id`.
#[tokio::test]
async fn managed_identity_through_imds_with_a_user_assigned_identity() {
    let imds = RecordingServer::start().await;
    let vars = vec![("AZURE_POD_IDENTITY_AUTHORITY_HOST".to_owned(), imds.url(""))];
    let h = Harness::start_custom_env(
        |idp, upstream| {
            mi_config(
                idp,
                upstream,
                "{ client_id = \"11111111-2222-3333-4444-555555555555\" }",
            )
        },
        &vars,
    )
    .await;
    imds.answer(
        200,
        &managed_identity_answer(
            &managed_identity_token(&h.idp, MI_PRINCIPAL, FEDERATED_AUDIENCE),
            FEDERATED_AUDIENCE,
        ),
    );
    echoed(h.get("/obo/x", Some(&caller(&h, "alice"))).await).await;
    assert_federated_assertion(&h, MI_CLIENT);
    let request = &imds.requests()[0];
    assert_eq!(request.path, "/metadata/identity/oauth2/token");
    assert_eq!(request.query("api-version"), Some("2018-02-01"));
    assert_eq!(
        request.query("resource"),
        Some("api://AzureADTokenExchange")
    );
    assert_eq!(
        request.query("client_id"),
        Some("11111111-2222-3333-4444-555555555555")
    );
    assert_eq!(request.header("metadata"), Some("true"));
    assert_eq!(request.header("x-identity-header"), None);
}

/// A harness whose managed identity comes from a fresh IMDS stand-in.
async fn with_imds() -> (RecordingServer, Harness) {
    let imds = RecordingServer::start().await;
    let vars = vec![("AZURE_POD_IDENTITY_AUTHORITY_HOST".to_owned(), imds.url(""))];
    let h = Harness::start_custom_env(|idp, upstream| mi_config(idp, upstream, "{}"), &vars).await;
    (imds, h)
}

/// The managed identity endpoint down or refusing: 503 with its `Retry-After` (or 5 s), remembered, while it
/// is unavailable; 500 when it refuses (the identity is not assigned); never the caller's token upstream.
#[tokio::test]
async fn managed_identity_failures_map_like_idp_failures() {
    let (imds, h) = with_imds().await;
    imds.answer(410, &serde_json::json!({"error": "IMDS is updating"}));
    let response = h.get("/obo/x", Some(&caller(&h, "alice"))).await;
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.headers()["retry-after"],
        "5",
        "the endpoint named none"
    );
    let response = h.get("/obo/x", Some(&caller(&h, "bob"))).await;
    assert_eq!(response.status(), 503);
    assert_eq!(imds.requests().len(), 1, "the Retry-After is honoured");
    assert_eq!(h.upstream.requests(), 0);
    assert_eq!(
        h.idp.token_requests(),
        0,
        "no exchange without an assertion"
    );

    let (imds, h) = with_imds().await;
    imds.answer_with_header(429, &serde_json::json!({}), ("retry-after", "17"));
    let response = h.get("/obo/x", Some(&caller(&h, "carol"))).await;
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.headers()["retry-after"],
        "17",
        "the endpoint's own"
    );

    let (imds, h) = with_imds().await;
    imds.answer(
        400,
        &serde_json::json!({"error": "invalid_request", "error_description": "Identity not found"}),
    );
    assert_eq!(
        h.get("/obo/x", Some(&caller(&h, "dave"))).await.status(),
        500
    );
    assert_eq!(h.upstream.requests(), 0);
}

/// Unreachable (nothing listens) is unavailable: 503 with a `Retry-After`, never the caller's token.
#[tokio::test]
async fn an_unreachable_managed_identity_endpoint_is_503_with_retry_after() {
    let dead = support::dead_addr().await;
    let vars = vec![(
        "AZURE_POD_IDENTITY_AUTHORITY_HOST".to_owned(),
        format!("http://{dead}"),
    )];
    let h = Harness::start_custom_env(|idp, upstream| mi_config(idp, upstream, "{}"), &vars).await;
    let response = h.get("/obo/x", Some(&caller(&h, "alice"))).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    assert_eq!(h.upstream.requests(), 0);
}

/// Concurrent cold callers wait for one managed identity fetch; a token is fetched again once it is within
/// five minutes of its `expires_on` (a number or a string of digits; or only `expires_in`).
#[tokio::test]
async fn one_fetch_serves_concurrent_callers_until_five_minutes_before_expiry() {
    let (imds, h) = with_imds().await;
    let token = managed_identity_token(&h.idp, MI_PRINCIPAL, FEDERATED_AUDIENCE);
    imds.answer(200, &managed_identity_answer(&token, FEDERATED_AUDIENCE));
    let callers: Vec<String> = (0..20).map(|n| caller(&h, &format!("user-{n}"))).collect();
    let responses =
        futures_util::future::join_all(callers.iter().map(|token| h.get("/obo/x", Some(token))))
            .await;
    assert!(responses.iter().all(|r| r.status() == 200));
    assert_eq!(
        imds.requests().len(),
        1,
        "one fetch for 20 concurrent callers"
    );

    // 200 s from expiry (a number, this time): fetched again for the next exchange.
    let (imds, h) = with_imds().await;
    let token = managed_identity_token(&h.idp, MI_PRINCIPAL, FEDERATED_AUDIENCE);
    imds.answer(
        200,
        &serde_json::json!({"access_token": token, "expires_on": now() + 200, "token_type": "Bearer"}),
    );
    echoed(h.get("/obo/x", Some(&caller(&h, "alice"))).await).await;
    echoed(h.get("/obo/x", Some(&caller(&h, "bob"))).await).await;
    assert_eq!(
        imds.requests().len(),
        2,
        "a token 200 s from expiry is not reused"
    );
    // `expires_in` alone, an hour: reused.
    imds.answer(
        200,
        &serde_json::json!({"access_token": token, "expires_in": 3600, "token_type": "Bearer"}),
    );
    echoed(h.get("/obo/x", Some(&caller(&h, "carol"))).await).await;
    echoed(h.get("/obo/x", Some(&caller(&h, "dave"))).await).await;
    assert_eq!(imds.requests().len(), 3);
}

/// `flavor = "managed_identity"`: an `app` route's token comes straight from the managed identity, for the
/// route's resource; no app registration, no token endpoint.
#[tokio::test]
async fn a_managed_identity_flavor_serves_app_routes_directly() {
    let imds = RecordingServer::start().await;
    let vars = vec![("AZURE_POD_IDENTITY_AUTHORITY_HOST".to_owned(), imds.url(""))];
    let h = Harness::start_custom_env(
        |idp, upstream| {
            support::inbound_config(idp)
                + &format!(
                    "\n[identities.vm]\nflavor = \"managed_identity\"\n\n[[routes]]\nname = \"vault\"\npath_prefix = \"/vault/\"\nupstream = \"{upstream}/\"\ntoken = \"app\"\nidentity = \"vm\"\nscopes = [\"https://vault.azure.net/.default\"]\n"
                )
        },
        &vars,
    )
    .await;
    let token = managed_identity_token(&h.idp, MI_PRINCIPAL, "https://vault.azure.net");
    imds.answer(
        200,
        &managed_identity_answer(&token, "https://vault.azure.net"),
    );
    for sub in ["alice", "bob"] {
        let echo = echoed(
            h.get("/vault/secrets", Some(&h.token(sub, "access_as_user")))
                .await,
        )
        .await;
        assert_eq!(seen_authorization(&echo), Some(format!("Bearer {token}")));
    }
    let requests = imds.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].query("resource"),
        Some("https://vault.azure.net")
    );
    assert_eq!(h.idp.token_requests(), 0);
}

// ---------------------------------------------------------------------------------------------------------
// Rotation

/// Replaces `path`'s content the way the kubelet does: a new file renamed over the old one.
fn replace(path: &Path, content: &[u8]) {
    let fresh = path.with_extension("new");
    std::fs::write(&fresh, content).unwrap();
    std::fs::rename(&fresh, path).unwrap();
}

/// Requests from fresh callers until stopped, each minted by the IdP's `POST /dev/token` just before its
/// request, so that every request is a token request; counts failures.
fn load(
    h: &Harness,
    path: &'static str,
) -> (
    Arc<AtomicBool>,
    Arc<AtomicU32>,
    tokio::task::JoinHandle<u32>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU32::new(0));
    let task = tokio::spawn({
        let stop = Arc::clone(&stop);
        let failures = Arc::clone(&failures);
        let http = h.http.clone();
        let url = h.url(path);
        let mint = format!("{}/dev/token", h.idp.issuer().trim_end_matches('/'));
        async move {
            let mut sent = 0;
            while !stop.load(Ordering::SeqCst) {
                let token = http
                    .post(&mint)
                    .header("accept", "text/plain")
                    .json(&serde_json::json!({"sub": format!("user-{sent}"), "scp": "access_as_user"}))
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                let status = http
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .map(|r| r.status().as_u16());
                if status.ok() != Some(200) {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                sent += 1;
            }
            sent
        }
    });
    (stop, failures, task)
}

/// The count of `obo_credential_reload_total{outcome}`.
async fn credential_reloads(h: &Harness, outcome: &str) -> f64 {
    support::metric_sum(
        &h.http,
        &h.admin_url("/metrics"),
        "obo_credential_reload_total",
        Some(("outcome", outcome)),
    )
    .await
}

/// Waits until the sidecar has counted `count` credential reloads with `outcome`.
async fn wait_for_credential_reload(h: &Harness, outcome: &str, count: f64) {
    let started = std::time::Instant::now();
    while credential_reloads(h, outcome).await < count {
        assert!(
            started.elapsed() < PATIENCE,
            "no credential reload ({outcome})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the IdP has answered `more` token requests after now.
async fn wait_for_token_requests(h: &Harness, more: u64) {
    let target = h.idp.token_requests() + more;
    let started = std::time::Instant::now();
    while h.idp.token_requests() < target {
        assert!(started.elapsed() < PATIENCE, "the load stopped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A harness configuration whose one identity authenticates with `credential` (a TOML line), and one obo
/// route `/r/`.
fn rotation_config(idp: &DevIdp, upstream: &str, credential: &str) -> String {
    support::inbound_config(idp)
        + &format!(
            "\n[identity]\ntoken_endpoint = \"{}\"\nclient_id = \"{DEFAULT_CLIENT_ID}\"\n{credential}\n\n[[routes]]\nname = \"r\"\npath_prefix = \"/r/\"\nupstream = \"{upstream}/\"\ntoken = \"obo\"\nscopes = [\"api://downstream/.default\"]\n",
            idp.token_endpoint()
        )
}

/// Stops the load and checks that it ran and that no request failed.
async fn stop_load(stop: &AtomicBool, failures: &AtomicU32, task: tokio::task::JoinHandle<u32>) {
    stop.store(true, Ordering::SeqCst);
    let sent = task.await.unwrap();
    assert!(sent >= 10, "the load ran ({sent} requests)");
    assert_eq!(failures.load(Ordering::SeqCst), 0, "{sent} requests");
}

/// A client secret file rotated under load (the way a Kubernetes Secret is): once the IdP accepts the new
/// secret and the file holds it, the old one can be deleted with no failed request; a half-written (empty)
/// file keeps the last good secret and is reported once.
#[tokio::test]
async fn a_rotated_secret_file_is_used_without_a_restart() {
    let dir = support::temp_dir("secret-rotation");
    let file = dir.join("client-secret");
    std::fs::write(&file, "first-secret").unwrap();
    let h = Harness::start_custom(|idp, upstream| {
        idp.add_client(DevClient::new(DEFAULT_CLIENT_ID, "first-secret"));
        rotation_config(
            idp,
            upstream,
            &format!("client_secret = {{ file = \"{}\" }}", file.display()),
        )
    })
    .await;
    let (stop, failures, task) = load(&h, "/r/x");
    wait_for_token_requests(&h, 5).await;
    // Half-written: the last good secret stays, and the failure is reported once however many token
    // requests look at the file.
    replace(&file, b"");
    wait_for_credential_reload(&h, "rejected", 1.0).await;
    wait_for_token_requests(&h, 10).await;
    let rejected = credential_reloads(&h, "rejected").await;
    assert!(
        (rejected - 1.0).abs() < f64::EPSILON,
        "reported once, not {rejected}"
    );
    // The IdP accepts both for the rotation; the file gets the new one; then the old one is deleted.
    h.idp.add_client(DevClient {
        retiring_secret: Some("first-secret".into()),
        ..DevClient::new(DEFAULT_CLIENT_ID, "second-secret")
    });
    replace(&file, b"second-secret\n");
    wait_for_credential_reload(&h, "ok", 1.0).await;
    h.idp
        .add_client(DevClient::new(DEFAULT_CLIENT_ID, "second-secret"));
    // Token requests after the old secret is gone: only the new one is accepted now.
    wait_for_token_requests(&h, 10).await;
    stop_load(&stop, &failures, task).await;
    let last = h.idp.recorded_requests().pop().unwrap();
    assert_eq!(last.client_auth, Some(ClientAuth::SecretPost));
    assert!(last.field("client_secret").is_some());
    assert_eq!(last.field("client_assertion"), None);
    assert_eq!(last.field("client_assertion_type"), None);
    let logs = support::captured_logs().text();
    assert!(!logs.contains("first-secret") && !logs.contains("second-secret"));
    let _ = std::fs::remove_dir_all(dir);
}

/// A certificate and key rotated on disk (a renewed certificate): used for the next token request, no
/// restart, no failed request.
#[tokio::test]
async fn a_renewed_certificate_is_used_without_a_restart() {
    let dir = support::temp_dir("cert-rotation");
    let (cert_a, key_a, der_a) = support::rsa_client_certificate(&dir, "a");
    let (cert_b, key_b, der_b) = support::rsa_client_certificate(&dir, "b");
    let cert = dir.join("client.crt");
    let key = dir.join("client.key");
    std::fs::copy(&cert_a, &cert).unwrap();
    std::fs::copy(&key_a, &key).unwrap();
    let h = Harness::start_custom(|idp, upstream| {
        idp.add_client(DevClient::with_certificate(
            DEFAULT_CLIENT_ID,
            der_a.clone(),
        ));
        rotation_config(
            idp,
            upstream,
            &format!(
                "client_certificate = {{ cert_file = \"{}\", key_file = \"{}\" }}",
                cert.display(),
                key.display()
            ),
        )
    })
    .await;
    let (stop, failures, task) = load(&h, "/r/x");
    wait_for_token_requests(&h, 5).await;
    h.idp.add_client(DevClient {
        retiring_certificate_der: Some(der_a),
        ..DevClient::with_certificate(DEFAULT_CLIENT_ID, der_b.clone())
    });
    // The key first, then the certificate: between the two the pair does not match and is not used.
    replace(&key, &std::fs::read(&key_b).unwrap());
    replace(&cert, &std::fs::read(&cert_b).unwrap());
    wait_for_credential_reload(&h, "ok", 1.0).await;
    h.idp
        .add_client(DevClient::with_certificate(DEFAULT_CLIENT_ID, der_b));
    wait_for_token_requests(&h, 10).await;
    stop_load(&stop, &failures, task).await;
    let last = h.idp.recorded_requests().pop().unwrap();
    assert_eq!(last.client_auth, Some(ClientAuth::PrivateKeyJwt));
    assert_eq!(
        last.field("client_assertion_type"),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    assert!(last.field("client_assertion").is_some());
    assert_eq!(last.field("client_secret"), None, "no secret sent");
    let _ = std::fs::remove_dir_all(dir);
}

/// A client assertion file rotated under load (the kubelet swapping the projected token): every token
/// request reads the current file, so none fails; a half-written one falls back to the last good assertion
/// and is reported once.
#[tokio::test]
async fn a_rotated_assertion_file_is_used_without_a_restart() {
    let dir = support::temp_dir("assertion-rotation");
    let file = dir.join("azure-identity-token");
    std::fs::write(&file, "projected later").unwrap();
    let h = Harness::start_custom(|idp, upstream| {
        idp.add_client(DevClient::with_federated_subject(
            DEFAULT_CLIENT_ID,
            "system:serviceaccount:apps:api",
        ));
        rotation_config(
            idp,
            upstream,
            &format!("client_assertion_file = \"{}\"", file.display()),
        )
    })
    .await;
    let projected =
        || managed_identity_token(&h.idp, "system:serviceaccount:apps:api", FEDERATED_AUDIENCE);
    replace(&file, projected().as_bytes());
    let (stop, failures, task) = load(&h, "/r/x");
    for _ in 0..5 {
        wait_for_token_requests(&h, 3).await;
        replace(&file, projected().as_bytes());
    }
    replace(&file, b"eyJhbGciOi");
    wait_for_credential_reload(&h, "rejected", 1.0).await;
    wait_for_token_requests(&h, 10).await;
    let rejected = credential_reloads(&h, "rejected").await;
    assert!(
        (rejected - 1.0).abs() < f64::EPSILON,
        "reported once, not {rejected}"
    );
    replace(&file, projected().as_bytes());
    wait_for_credential_reload(&h, "ok", 1.0).await;
    wait_for_token_requests(&h, 5).await;
    stop_load(&stop, &failures, task).await;
    assert_federated_assertion(&h, DEFAULT_CLIENT_ID);
    let _ = std::fs::remove_dir_all(dir);
}
