//! Token acquisition end to end against the development IdP: single flight under load, both exchange
//! flavors, every client authentication method, Entra wire parity, and the IdP answers of SPEC §4.
// Every integration test runs against the development IdP and echo upstream.
#![cfg(feature = "dev")]
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "helpers of tests: a failure is a test failure"
)]

mod support;

use std::time::Duration;

use futures_util::StreamExt as _;
use obo_sidecar::dev::{DEFAULT_CLIENT_ID, Failure};
use support::{Harness, SECRET_VARIABLE, echoed, inbound_config, seen_authorization};

fn claims_of(echo: &serde_json::Value) -> &serde_json::Value {
    &echo["authorization"]["claims"]
}

/// One `[identities.NAME]` table with a secret and the given extra lines.
fn identity(name: &str, endpoint: &str, extra: &str) -> String {
    format!(
        "\n[identities.{name}]\ntoken_endpoint = \"{endpoint}\"\nclient_id = \"{DEFAULT_CLIENT_ID}\"\nclient_secret = {{ env = \"{SECRET_VARIABLE}\" }}\n{extra}\n"
    )
}

fn route(name: &str, upstream: &str, extra: &str) -> String {
    format!(
        "\n[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}/\"\nupstream = \"{upstream}/\"\n{extra}\n"
    )
}

/// 256 concurrent first requests of one caller against an IdP that takes 300 ms make exactly one IdP call,
/// and all 256 succeed with the same upstream token.
#[tokio::test]
async fn concurrent_cold_requests_of_one_caller_make_one_idp_call() {
    let h = Harness::start().await;
    h.idp
        .fail_next(Failure::Delay(Duration::from_millis(300)), 1);
    let caller = h.token("alice", "access_as_user");
    let responses = futures_util::stream::iter(0..256)
        .map(|_| h.get("/obo/x", Some(&caller)))
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await;
    let mut tokens = std::collections::HashSet::new();
    for response in responses {
        tokens.insert(seen_authorization(&echoed(response).await));
    }
    assert_eq!(
        tokens.len(),
        1,
        "every caller request got the one exchanged token"
    );
    assert_eq!(h.idp.token_requests(), 1);
}

/// 1 000 callers × 5 requests each make 1 000 IdP calls: one per caller, never shared.
#[tokio::test]
async fn thousand_callers_times_five_make_a_thousand_idp_calls() {
    let h = Harness::start().await;
    let callers: Vec<String> = (0..1000)
        .map(|i| h.token(&format!("user-{i}"), "access_as_user"))
        .collect();
    let requests = (0..5).flat_map(|_| callers.iter());
    let statuses = futures_util::stream::iter(requests)
        .map(|caller| async { h.get("/obo/x", Some(caller)).await.status().as_u16() })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    assert_eq!(statuses.len(), 5000);
    assert!(statuses.iter().all(|s| *s == 200));
    assert_eq!(h.idp.token_requests(), 1000);
}

/// `flavor = "rfc8693"` sends a token-exchange request with the subject token, its type, every audience and
/// resource, the scope and the requested token type; the upstream gets the exchanged token.
#[tokio::test]
async fn rfc8693_identity_exchanges_with_audience_resource_and_scope() {
    let h = Harness::start_custom(|idp, upstream| {
        inbound_config(idp)
            + &identity("exchange", &idp.token_endpoint(), "flavor = \"rfc8693\"")
            + &route(
                "x",
                upstream,
                "token = \"obo\"\nidentity = \"exchange\"\naudience = [\"api://downstream\"]\nresource = [\"https://downstream.example/\"]\nscopes = [\"read\"]\nrequested_token_type = \"urn:ietf:params:oauth:token-type:access_token\"",
            )
    })
    .await;
    let caller = h.token("alice", "access_as_user");
    let echo = echoed(h.get("/x/y", Some(&caller)).await).await;
    assert_eq!(claims_of(&echo)["sub"], "alice");
    assert_eq!(claims_of(&echo)["aud"], "api://downstream");
    let recorded = &h.idp.recorded_requests()[0];
    assert_eq!(
        recorded.grant_type.as_deref(),
        Some("urn:ietf:params:oauth:grant-type:token-exchange")
    );
    assert_eq!(recorded.field("subject_token"), Some(caller.as_str()));
    assert_eq!(
        recorded.field("subject_token_type"),
        Some("urn:ietf:params:oauth:token-type:access_token")
    );
    assert_eq!(recorded.field("audience"), Some("api://downstream"));
    assert_eq!(
        recorded.field("resource"),
        Some("https://downstream.example/")
    );
    assert_eq!(recorded.field("scope"), Some("read"));
    assert_eq!(
        recorded.field("requested_token_type"),
        Some("urn:ietf:params:oauth:token-type:access_token")
    );
    assert_eq!(recorded.field("assertion"), None);
}

/// `client_secret_basic` sends the id and secret form-urlencoded in HTTP Basic and nothing in the form; the
/// IdP checks it. Every request carries a UUID `client-request-id` (Entra parity).
#[tokio::test]
async fn client_secret_basic_is_verified_by_the_idp() {
    let h = Harness::start_custom(|idp, upstream| {
        inbound_config(idp)
            + &identity(
                "basic",
                &idp.token_endpoint(),
                "auth_method = \"client_secret_basic\"",
            )
            + &route(
                "x",
                upstream,
                "token = \"obo\"\nidentity = \"basic\"\nscopes = [\"api://downstream/.default\"]",
            )
    })
    .await;
    echoed(
        h.get("/x/y", Some(&h.token("alice", "access_as_user")))
            .await,
    )
    .await;
    let recorded = &h.idp.recorded_requests()[0];
    assert!(recorded.basic_auth);
    assert_eq!(recorded.field("client_secret"), None);
    let id = recorded
        .client_request_id
        .as_deref()
        .expect("client-request-id");
    assert_eq!(id.len(), 36);
    assert_eq!(&id[14..15], "4", "a version 4 UUID");
}

/// Routes on different identities never share a token, and app tokens are per identity and scope.
#[tokio::test]
async fn identities_and_scopes_key_the_cache() {
    let h = Harness::start_custom(|idp, upstream| {
        inbound_config(idp)
            + &identity("second", &idp.token_endpoint(), "")
            + &route(
                "one",
                upstream,
                "token = \"app\"\nscopes = [\"api://downstream/.default\"]\nidentity = \"second\"",
            )
            + &route(
                "two",
                upstream,
                "token = \"app\"\nscopes = [\"api://other/.default\"]\nidentity = \"second\"",
            )
            + &route(
                "three",
                upstream,
                "token = \"obo\"\nscopes = [\"api://downstream/.default\"]\nidentity = \"second\"",
            )
    })
    .await;
    let caller = h.token("alice", "access_as_user");
    let one = seen_authorization(&echoed(h.get("/one/", Some(&caller)).await).await);
    let two = seen_authorization(&echoed(h.get("/two/", Some(&caller)).await).await);
    let three = seen_authorization(&echoed(h.get("/three/", Some(&caller)).await).await);
    assert_ne!(one, two);
    assert_ne!(one, three);
    assert_eq!(h.idp.token_requests(), 3);
    assert_eq!(
        seen_authorization(&echoed(h.get("/one/", Some(&caller)).await).await),
        one
    );
    assert_eq!(h.idp.token_requests(), 3);
}

/// `private_key_jwt`: the sidecar signs a fresh assertion per request with the certificate's key — PS256 for
/// Entra, RS256 for RFC 8693 — and the IdP verifies it against the registered certificate; a certificate the
/// IdP does not know is refused (500: our misconfiguration).
#[tokio::test]
async fn private_key_jwt_is_verified_against_the_registered_certificate() {
    use obo_sidecar::dev::{ClientAuth, DevClient};
    let dir = support::temp_dir("pkjwt");
    let (cert, key, der) = support::rsa_client_certificate(&dir, "client-a");
    let (other_cert, other_key, _) = support::rsa_client_certificate(&dir, "client-b");
    let h = Harness::start_custom(|idp, upstream| {
        idp.add_client(DevClient::with_certificate("cert-client", der.clone()));
        let identity = |name: &str, flavor: &str, cert: &str, key: &str| {
            format!(
                "\n[identities.{name}]\nflavor = \"{flavor}\"\ntoken_endpoint = \"{}\"\nclient_id = \"cert-client\"\nclient_certificate = {{ cert_file = \"{cert}\", key_file = \"{key}\" }}\n",
                idp.token_endpoint()
            )
        };
        support::inbound_config_for(idp, &["api://cert-client"])
            + &identity("entra", "entra", &cert, &key)
            + &identity("exchange", "rfc8693", &cert, &key)
            + &identity("stranger", "entra", &other_cert, &other_key)
            + &route("entra", upstream, "token = \"obo\"\nidentity = \"entra\"\nscopes = [\"api://downstream/.default\"]")
            + &route("exchange", upstream, "token = \"obo\"\nidentity = \"exchange\"\naudience = [\"api://downstream\"]")
            + &route("stranger", upstream, "token = \"obo\"\nidentity = \"stranger\"\nscopes = [\"api://downstream/.default\"]")
    })
    .await;
    let caller = h.idp.mint(&obo_sidecar::dev::TokenClaims {
        aud: Some("api://cert-client".into()),
        scp: Some("access_as_user".into()),
        ..obo_sidecar::dev::TokenClaims::user("alice")
    });
    assert_eq!(
        claims_of(&echoed(h.get("/entra/x", Some(&caller)).await).await)["sub"],
        "alice"
    );
    assert_eq!(
        claims_of(&echoed(h.get("/exchange/x", Some(&caller)).await).await)["sub"],
        "alice"
    );
    let recorded = h.idp.recorded_requests();
    assert_eq!(recorded[0].client_auth, Some(ClientAuth::PrivateKeyJwt));
    assert_eq!(
        recorded[0].assertion_alg.as_deref(),
        Some("PS256"),
        "Entra gets PS256"
    );
    assert_eq!(
        recorded[1].assertion_alg.as_deref(),
        Some("RS256"),
        "RFC 8693 IdPs get RS256"
    );
    assert_eq!(
        recorded[0].field("client_assertion_type"),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    assert_eq!(recorded[0].field("client_secret"), None);
    let refused = h.get("/stranger/x", Some(&caller)).await;
    assert_eq!(
        refused.status(),
        500,
        "a key the IdP does not know is our misconfiguration"
    );
    assert_eq!(h.upstream.requests(), 2);
    let _ = std::fs::remove_dir_all(dir);
}

/// A client assertion file (Kubernetes workload identity) is read on every token request, so a rotated file
/// is used at once; a rejected one is 500, never a forwarded caller token; an unreadable one falls back to
/// the last good assertion while it lasts, and without one is 500.
#[tokio::test]
async fn client_assertion_file_is_reread_on_every_token_request() {
    use obo_sidecar::dev::{ClientAuth, DevClient, FEDERATED_AUDIENCE};
    let dir = support::temp_dir("assertion");
    let file = dir.join("azure-identity-token");
    std::fs::write(&file, "projected later").unwrap();
    let h = Harness::start_custom(|idp, upstream| {
        idp.add_client(DevClient::with_federated_subject("wi-client", "system:serviceaccount:apps:api"));
        support::inbound_config_for(idp, &["api://wi-client"])
            + &format!(
                "\n[identity]\ntoken_endpoint = \"{}\"\nclient_id = \"wi-client\"\nclient_assertion_file = \"{}\"\n",
                idp.token_endpoint(),
                file.display()
            )
            + &route("wi", upstream, "token = \"obo\"\nscopes = [\"api://downstream/.default\"]")
    })
    .await;
    let kubelet_token = |sub: &str| {
        let now = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
        .unwrap();
        let kid = h.token("x", "y").split('.').next().map(|header| {
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(header)
                .unwrap();
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["kid"].clone()
        });
        h.idp.sign(
            &serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": kid}),
            &serde_json::json!({"iss": h.idp.issuer(), "sub": sub, "aud": [FEDERATED_AUDIENCE], "iat": now, "exp": now + 3600}),
        )
    };
    let caller = |sub: &str| {
        h.idp.mint(&obo_sidecar::dev::TokenClaims {
            aud: Some("api://wi-client".into()),
            scp: Some("access_as_user".into()),
            ..obo_sidecar::dev::TokenClaims::user(sub)
        })
    };
    assert_eq!(
        h.get("/wi/x", Some(&caller("zoe"))).await.status(),
        500,
        "a file that holds no token yet, and no earlier one: our misconfiguration"
    );
    std::fs::write(&file, kubelet_token("system:serviceaccount:apps:api")).unwrap();
    assert_eq!(
        claims_of(&echoed(h.get("/wi/x", Some(&caller("alice"))).await).await)["sub"],
        "alice"
    );
    assert_eq!(
        h.idp.recorded_requests()[0].client_auth,
        Some(ClientAuth::FederatedAssertion)
    );
    // The kubelet rotates the file to a token the IdP does not accept: the next exchange is refused.
    std::fs::write(
        &file,
        kubelet_token("system:serviceaccount:apps:someone-else"),
    )
    .unwrap();
    assert_eq!(h.get("/wi/x", Some(&caller("bob"))).await.status(), 500);
    // Rotated back to a good one: used at once, no restart.
    std::fs::write(&file, kubelet_token("system:serviceaccount:apps:api")).unwrap();
    assert_eq!(
        claims_of(&echoed(h.get("/wi/x", Some(&caller("carol"))).await).await)["sub"],
        "carol"
    );
    // Gone (or half-written): the last good assertion serves until its exp.
    std::fs::remove_file(&file).unwrap();
    assert_eq!(
        claims_of(&echoed(h.get("/wi/x", Some(&caller("dave"))).await).await)["sub"],
        "dave"
    );
    assert_eq!(h.upstream.requests(), 3);
    let _ = std::fs::remove_dir_all(dir);
}

/// Entra client capabilities (`cp1`) go into the `claims` parameter as MSAL sends them; the key of the cache
/// includes them.
#[tokio::test]
async fn client_capabilities_are_sent_in_claims() {
    let h = Harness::start_custom(|idp, upstream| {
        support::inbound_config(idp)
            + &identity(
                "cae",
                &idp.token_endpoint(),
                "client_capabilities = [\"cp1\"]",
            )
            + &route(
                "x",
                upstream,
                "token = \"obo\"\nidentity = \"cae\"\nscopes = [\"api://downstream/.default\"]",
            )
    })
    .await;
    let echo = echoed(
        h.get("/x/y", Some(&h.token("alice", "access_as_user")))
            .await,
    )
    .await;
    let claims: serde_json::Value = serde_json::from_str(
        h.idp.recorded_requests()[0]
            .field("claims")
            .expect("claims"),
    )
    .expect("JSON");
    assert_eq!(
        claims,
        serde_json::json!({"access_token": {"xms_cc": {"values": ["cp1"]}}})
    );
    assert_eq!(claims_of(&echo)["xms_cc"], serde_json::json!(["cp1"]));
}

/// A token answer without `expires_in` is cached until the JWT's own `exp` (minus the margin).
#[tokio::test]
async fn expires_in_absent_uses_the_jwt_exp() {
    let h = Harness::start().await;
    h.idp.fail_next(Failure::ExpiresInAbsent, 1);
    let caller = h.token("alice", "access_as_user");
    echoed(h.get("/obo/x", Some(&caller)).await).await;
    echoed(h.get("/obo/x", Some(&caller)).await).await;
    assert_eq!(h.idp.token_requests(), 1, "cached by the JWT's exp");
}
