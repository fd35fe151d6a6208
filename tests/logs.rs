//! No token, secret or assertion reaches a log line at any level. Every harness-based test of the suite
//! checks this when its harness is dropped (`support::assert_no_secret_in_logs`); this test drives the paths
//! most likely to log a token — failures of every kind — and checks the capture itself works.
// Every integration test runs against the development IdP and echo upstream.
#![cfg(feature = "dev")]
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "helpers of tests: a failure is a test failure"
)]

mod support;

use obo_sidecar::dev::{DEFAULT_CLIENT_SECRET, Failure};
use support::{Harness, captured_logs, echoed, seen_authorization};

/// Captures every event at TRACE from every crate while tokens flow through the happy path, IdP failures
/// and bad tokens; none of the tokens or the client secret appears.
#[tokio::test]
async fn no_token_or_secret_in_logs_at_any_level() {
    let h = Harness::start().await;
    let caller = h.token("alice", "access_as_user");
    let echo = echoed(h.get("/obo/x", Some(&caller)).await).await;
    let upstream_token = seen_authorization(&echo)
        .expect("token")
        .trim_start_matches("Bearer ")
        .to_owned();
    echoed(h.get("/pass/x", Some(&caller)).await).await;
    echoed(h.get("/app/x", Some(&caller)).await).await;
    let bob = h.token("bob", "access_as_user");
    for failure in [
        Failure::InvalidGrant,
        Failure::InvalidClient,
        Failure::NotBearer,
        Failure::ConsentRequired,
    ] {
        h.idp.fail_next(failure, 1);
        assert_ne!(h.get("/obo/x", Some(&bob)).await.status(), 200);
    }
    h.idp.fail_next(Failure::ServerError, 2);
    assert_eq!(
        h.get("/obo/y", Some(&h.token("carol", "access_as_user")))
            .await
            .status(),
        503
    );
    let tampered = format!("{}x", &caller[..caller.len() - 1]);
    assert_eq!(h.get("/obo/x", Some(&tampered)).await.status(), 401);

    let logs = captured_logs().text();
    assert!(logs.contains("token request"), "the capture works");
    for (name, secret) in [
        ("caller token", caller.as_str()),
        ("second caller token", bob.as_str()),
        ("upstream token", upstream_token.as_str()),
        ("client secret", DEFAULT_CLIENT_SECRET),
    ] {
        assert!(!logs.contains(secret), "{name} found in logs");
    }
    support::assert_no_secret_in_logs(&h.idp);
}
