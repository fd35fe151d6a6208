//! No token, secret or assertion reaches a log line at any level, through success and failure paths.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "helpers of tests: a failure is a test failure"
)]

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use obo_sidecar::dev_idp::{DEFAULT_CLIENT_SECRET, Failure};
use support::{Harness, echoed, seen_authorization};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Captures every event at TRACE from every crate (ours, hyper, reqwest, rustls) while tokens flow through
/// the happy path, IdP failures and bad tokens; none of the tokens or the client secret appears.
#[tokio::test]
async fn no_token_or_secret_in_logs_at_any_level() {
    let captured = Captured::default();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(captured.clone())
        .with_ansi(false)
        .init();

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
    h.idp.fail_next(Failure::InvalidGrant, 1);
    assert_eq!(h.get("/obo/x", Some(&bob)).await.status(), 401);
    h.idp.fail_next(Failure::ServerError, 2);
    assert_eq!(
        h.get("/obo/y", Some(&h.token("carol", "access_as_user")))
            .await
            .status(),
        503
    );
    let tampered = format!("{}x", &caller[..caller.len() - 1]);
    assert_eq!(h.get("/obo/x", Some(&tampered)).await.status(), 401);

    let logs = String::from_utf8(captured.0.lock().expect("log buffer").clone()).expect("utf-8");
    assert!(
        logs.contains("token request"),
        "the capture works: {}",
        &logs[..logs.len().min(2000)]
    );
    for (name, secret) in [
        ("caller token", caller.as_str()),
        ("second caller token", bob.as_str()),
        ("upstream token", upstream_token.as_str()),
        ("client secret", DEFAULT_CLIENT_SECRET),
    ] {
        assert!(!logs.contains(secret), "{name} found in logs");
        let signature = secret.rsplit('.').next().expect("part");
        assert!(
            signature.len() < 16 || !logs.contains(signature),
            "{name}'s signature found in logs"
        );
    }
}
