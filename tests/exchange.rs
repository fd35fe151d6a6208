//! Token acquisition end to end against the development IdP: single flight under load, both exchange
//! flavors, every client authentication method, Entra wire parity, and the IdP answers of SPEC §4.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "helpers of tests: a failure is a test failure"
)]

mod support;

use std::time::Duration;

use futures_util::StreamExt as _;
use obo_sidecar::dev_idp::{DEFAULT_CLIENT_ID, Failure};
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
