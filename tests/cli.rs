//! The binary's `check` command: the repository's `sidecar.toml` passes; bad configs exit 64 naming every
//! problem with its key path.
// Every integration test runs against the development IdP and echo upstream.
#![cfg(feature = "dev")]
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "helpers of tests: a failure is a test failure"
)]

mod support;

use std::process::Command;

fn check(config: &std::path::Path, secret: Option<&str>) -> (i32, String, String) {
    let mut command = Command::new(support::sidecar_binary());
    command
        .arg("check")
        .arg("-c")
        .arg(config)
        .env_remove("OBO_CLIENT_SECRET");
    if let Some(secret) = secret {
        command.env("OBO_CLIENT_SECRET", secret);
    }
    let output = command.output().expect("run obo-sidecar");
    (
        output.status.code().expect("exit code"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The example `sidecar.toml` passes `check` when its secret is set, and prints the route table.
#[test]
fn repository_sidecar_toml_passes_check() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sidecar.toml");
    let (code, stdout, stderr) = check(&path, Some("from-the-environment"));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ROUTE"), "{stdout}");
    assert!(stdout.contains("graph"), "{stdout}");
    assert!(!stdout.contains("from-the-environment") && !stderr.contains("from-the-environment"));
}

/// Without its secret, the same file fails `check` with 64 naming the key.
#[test]
fn unset_secret_fails_check_with_64() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sidecar.toml");
    let (code, _, stderr) = check(&path, None);
    assert_eq!(code, 64);
    assert!(
        stderr.contains(
            "identity.client_secret.env: environment variable OBO_CLIENT_SECRET is not set"
        ),
        "{stderr}"
    );
}

/// Every problem of a bad config is listed with its key path, not only the first.
#[test]
fn bad_config_lists_every_problem_and_exits_64() {
    let dir = std::env::temp_dir().join(format!("obo-sidecar-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        r#"
[listen]
proxy = "not an address"

[inbound]
issuers = ["https://login.example.com/t/v2.0"]
audiences = []
algorithms = ["none"]
clock_skew = "forever"

[identity]
token_endpoint = "http://login.example.com/t/oauth2/v2.0/token"
client_id = "x"
client_secret = "inline"
colour = "blue"

[[routes]]
name = "a"
path_prefix = "/a"
upstream = "graph/v1.0"
token = "obo"

[[routes]]
name = "a"
path_prefix = "b"
upstream = "https://example.com/"
token = "sometimes"
"#,
    )
    .expect("write");
    let (code, _, stderr) = check(&path, Some("x"));
    assert_eq!(code, 64);
    let run = Command::new(support::sidecar_binary())
        .arg("-c")
        .arg(&path)
        .output()
        .expect("run obo-sidecar");
    assert_eq!(
        run.status.code(),
        Some(64),
        "`run` is the default command and refuses a bad config"
    );
    for expected in [
        "listen.proxy: not an IP:port address",
        "inbound.audiences: at least one audience is required",
        "inbound.algorithms[0]: \"none\" is never accepted",
        "inbound.clock_skew: not a duration",
        "identity.token_endpoint: an IdP URL must use https",
        "identity.client_secret: secrets are never written inline",
        "identity.colour: unknown key",
        "routes[0].upstream: relative URL without a base",
        "routes[0].scopes: required",
        "routes[1].name: duplicate route name",
        "routes[1].path_prefix: \"b\" must start with '/'",
        "routes[1].token: unknown token kind",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
