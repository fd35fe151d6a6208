//! Interop against an OAuth server this project did not write: panva's `oidc-provider` (npm), configured by
//! `tests/interop/server.mjs` with a jwt-bearer On-Behalf-Of grant, an RFC 8693 token-exchange grant and its
//! built-in client credentials grant. oidc-provider authenticates the sidecar's client (`client_secret_post`,
//! `client_secret_basic`, `private_key_jwt` with a certificate) before any grant runs. Skipped, with a message,
//! only when `node` is not installed.
// Every integration test runs against the development IdP and echo upstream.
#![cfg(feature = "dev")]
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "helpers of tests: a failure is a test failure"
)]

mod support;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use obo_sidecar::config::Config;
use obo_sidecar::dev::EchoUpstream;
use serde_json::{Value, json};
use support::{bind, seen_authorization, start_sidecar};

const SECRET_VARIABLE: &str = "INTEROP_CLIENT_SECRET";
/// Characters that RFC 6749 §2.3.1 makes the sidecar form-urlencode inside HTTP Basic credentials
/// (oidc-provider decodes them, and refuses credentials that are not encoded).
const CLIENT_SECRET: &str = "interop secret+/:%&=~";
const API_AUDIENCE: &str = "api://obo-sidecar";
const DOWNSTREAM: &str = "api://downstream";

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

fn node_installed() -> bool {
    Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// `npm ci` from the committed lockfile; `setup.sh` returns at once when that is already done.
fn install_oidc_provider() {
    let output = Command::new("bash")
        .arg(interop_dir().join("setup.sh"))
        .output()
        .expect("run tests/interop/setup.sh");
    assert!(
        output.status.success(),
        "tests/interop/setup.sh failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        interop_dir().join("node_modules/oidc-provider").is_dir(),
        "tests/interop/setup.sh did not install oidc-provider (is npm installed?)"
    );
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "obo-sidecar-interop-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `private_key_jwt` client's credential: a self-signed RSA certificate and its PKCS#8 key, as files.
struct ClientCertificate {
    cert_file: PathBuf,
    key_file: PathBuf,
}

fn client_certificate(dir: &Path) -> ClientCertificate {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA key");
    let cert = rcgen::CertificateParams::new(vec!["sidecar-pkjwt".to_owned()])
        .expect("certificate params")
        .self_signed(&key)
        .expect("self-signed certificate");
    let cert_file = dir.join("cert.pem");
    let key_file = dir.join("key.pem");
    std::fs::write(&cert_file, cert.pem()).expect("write cert.pem");
    std::fs::write(&key_file, key.serialize_pem()).expect("write key.pem");
    ClientCertificate {
        cert_file,
        key_file,
    }
}

/// `node tests/interop/server.mjs`, killed on drop. Closing its stdin also stops it, so a test process that
/// dies without running drop leaves nothing behind.
struct NodeProcess {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The running oidc-provider and what it announced.
struct NodeIdp {
    _process: NodeProcess,
    issuer: String,
    token_endpoint: String,
}

impl NodeIdp {
    async fn start(client_cert: &Path) -> NodeIdp {
        let mut child = Command::new("node")
            .arg("tests/interop/server.mjs")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env(SECRET_VARIABLE, CLIENT_SECRET)
            .env("INTEROP_CLIENT_CERT_PEM", client_cert)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn node tests/interop/server.mjs");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        // Its log joins the test's captured output (shown when the test fails).
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("node: {line}");
            }
        });
        let (ready, announced) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = ready.send(line);
        });
        let process = NodeProcess { child, stdin };
        let line = tokio::time::timeout(Duration::from_secs(30), announced)
            .await
            .expect("oidc-provider did not print its issuer within 30 s")
            .expect("announcing thread");
        let announced: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!("oidc-provider's first stdout line is not JSON ({e}): {line:?}")
        });
        let field = |name: &str| {
            announced[name]
                .as_str()
                .unwrap_or_else(|| panic!("oidc-provider announced no {name}: {line:?}"))
                .to_owned()
        };
        NodeIdp {
            issuer: field("issuer"),
            token_endpoint: field("token_endpoint"),
            _process: process,
        }
    }
}

fn config_text(idp: &NodeIdp, upstream: &str, cert: &ClientCertificate) -> String {
    format!(
        r#"
[listen]
proxy = "127.0.0.1:0"
admin = "127.0.0.1:0"

[inbound]
issuers = ["{issuer}"]
audiences = ["{API_AUDIENCE}"]

[identity]
flavor = "entra"
token_endpoint = "{token_endpoint}"
client_id = "sidecar-post"
client_secret = {{ env = "{SECRET_VARIABLE}" }}

[identities.basic]
flavor = "rfc8693"
token_endpoint = "{token_endpoint}"
client_id = "sidecar-basic"
client_secret = {{ env = "{SECRET_VARIABLE}" }}
auth_method = "client_secret_basic"

[identities.pkjwt]
flavor = "rfc8693"
token_endpoint = "{token_endpoint}"
client_id = "sidecar-pkjwt"
client_certificate = {{ cert_file = '{cert_file}', key_file = '{key_file}' }}

[[routes]]
name = "obo"
path_prefix = "/obo/"
upstream = "{upstream}/"
token = "obo"
scopes = ["{DOWNSTREAM}/.default"]

[[routes]]
name = "exchange-basic"
path_prefix = "/exchange-basic/"
upstream = "{upstream}/"
token = "obo"
identity = "basic"
audience = ["{DOWNSTREAM}"]
scopes = ["read"]

[[routes]]
name = "exchange-pkjwt"
path_prefix = "/exchange-pkjwt/"
upstream = "{upstream}/"
token = "obo"
identity = "pkjwt"
audience = ["{DOWNSTREAM}"]

[[routes]]
name = "app"
path_prefix = "/app/"
upstream = "{upstream}/"
token = "app"
identity = "basic"
scopes = ["{DOWNSTREAM}/.default"]
"#,
        issuer = idp.issuer,
        token_endpoint = idp.token_endpoint,
        cert_file = cert.cert_file.display(),
        key_file = cert.key_file.display(),
    )
}

struct Interop {
    idp: NodeIdp,
    http: reqwest::Client,
    proxy: std::net::SocketAddr,
}

impl Interop {
    /// A caller token from oidc-provider's key, for the sidecar's API.
    async fn caller_token(&self, sub: &str) -> String {
        let response = self
            .http
            .post(format!("{}/dev/token", self.idp.issuer))
            .json(&json!({"sub": sub, "scp": "access_as_user"}))
            .send()
            .await
            .expect("POST /dev/token");
        assert_eq!(response.status(), 200, "POST /dev/token");
        response.text().await.expect("caller token")
    }

    /// POSTs to oidc-provider's token endpoint so far.
    async fn token_requests(&self) -> u64 {
        let stats: Value = self
            .http
            .get(format!("{}/dev/stats", self.idp.issuer))
            .send()
            .await
            .expect("GET /dev/stats")
            .json()
            .await
            .expect("stats JSON");
        stats["token_requests"].as_u64().expect("token_requests")
    }

    async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.http
            .get(format!("http://{}{path}", self.proxy))
            .bearer_auth(token)
            .send()
            .await
            .expect("request to the sidecar")
    }

    /// GET `path` through the sidecar; the echo upstream's JSON, or a panic that shows the sidecar's answer.
    async fn echo(&self, path: &str, token: &str, why: &str) -> Value {
        let response = self.get(path, token).await;
        let status = response.status();
        if status != 200 {
            let challenge = response
                .headers()
                .get("www-authenticate")
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            let body = response.text().await.unwrap_or_default();
            panic!(
                "{why}: GET {path} answered {status}, WWW-Authenticate {challenge:?}, body {body}"
            );
        }
        response.json().await.expect("echo JSON")
    }
}

/// The token the upstream saw: its raw value (must not be the caller's) and its claims.
fn upstream_token<'a>(echo: &'a Value, caller: &str, why: &str) -> (String, &'a Value) {
    let sent = seen_authorization(echo).unwrap_or_else(|| panic!("{why}: upstream saw no token"));
    let token = sent
        .strip_prefix("Bearer ")
        .unwrap_or_else(|| panic!("{why}: upstream saw {sent:?}, not a Bearer token"))
        .to_owned();
    assert_ne!(
        token, caller,
        "{why}: the caller's token reached the upstream"
    );
    (token, &echo["authorization"]["claims"])
}

fn audience_contains(claims: &Value, audience: &str) -> bool {
    match &claims["aud"] {
        Value::String(aud) => aud == audience,
        Value::Array(auds) => auds.iter().any(|a| a == audience),
        _ => false,
    }
}

/// Asserts an exchanged token: minted by oidc-provider for the downstream API, for `sub`, to `client_id`.
fn assert_exchanged(claims: &Value, issuer: &str, sub: &str, client_id: &str, why: &str) {
    assert_eq!(claims["iss"], issuer, "{why}: issued by oidc-provider");
    assert!(
        audience_contains(claims, DOWNSTREAM),
        "{why}: aud must be {DOWNSTREAM}, got {}",
        claims["aud"]
    );
    assert_eq!(claims["sub"], sub, "{why}: on behalf of the caller");
    assert_eq!(
        claims["azp"], client_id,
        "{why}: requested by this identity"
    );
}

/// Against oidc-provider, every flavor and client authentication method gets a token the upstream can use:
/// OBO (`client_secret_post`), RFC 8693 (`client_secret_basic`, `private_key_jwt` with a certificate),
/// client credentials; the cache spares the IdP repeats, and a rejected subject token is 401 `invalid_token`.
#[tokio::test]
async fn sidecar_exchanges_tokens_at_oidc_provider() {
    if !node_installed() {
        eprintln!("interop: node not found, skipping the oidc-provider interop suite");
        return;
    }
    install_oidc_provider();

    let dir = TempDir::new();
    let cert = client_certificate(&dir.0);
    let idp = NodeIdp::start(&cert.cert_file).await;
    let upstream = EchoUpstream::start(bind().await).await.expect("upstream");
    let text = config_text(&idp, &upstream.url(), &cert);
    let config = Config::parse(&text, &|name| {
        (name == SECRET_VARIABLE).then(|| CLIENT_SECRET.to_owned())
    })
    .unwrap_or_else(|e| panic!("interop config invalid: {e}"));
    let sidecar = start_sidecar(config).await;
    tokio::time::timeout(Duration::from_secs(20), sidecar.ready())
        .await
        .expect("sidecar never fetched oidc-provider's keys (discovery + jwks_uri)");
    let h = Interop {
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client"),
        proxy: sidecar.proxy_addr,
        idp,
    };
    let issuer = h.idp.issuer.clone();
    let alice = h.caller_token("alice").await;

    // On-Behalf-Of, Entra's jwt-bearer grammar, client_secret_post.
    let why = "OBO with client_secret_post";
    let echo = h.echo("/obo/x", &alice, why).await;
    let (obo_token, claims) = upstream_token(&echo, &alice, why);
    assert_exchanged(claims, &issuer, "alice", "sidecar-post", why);
    assert_eq!(h.token_requests().await, 1, "{why}: one token request");

    // RFC 8693 with client_secret_basic (a secret that must be form-urlencoded inside Basic).
    let why = "RFC 8693 with client_secret_basic";
    let echo = h.echo("/exchange-basic/x", &alice, why).await;
    let (_, claims) = upstream_token(&echo, &alice, why);
    assert_exchanged(claims, &issuer, "alice", "sidecar-basic", why);
    assert_eq!(claims["scope"], "read", "{why}: the route's scopes");
    assert_eq!(h.token_requests().await, 2, "{why}: one token request");

    // RFC 8693 with private_key_jwt: a certificate-bound assertion, verified by oidc-provider.
    let why = "RFC 8693 with private_key_jwt";
    let echo = h.echo("/exchange-pkjwt/x", &alice, why).await;
    let (_, claims) = upstream_token(&echo, &alice, why);
    assert_exchanged(claims, &issuer, "alice", "sidecar-pkjwt", why);
    assert_eq!(h.token_requests().await, 3, "{why}: one token request");

    // oidc-provider refuses a replayed assertion `jti`: a second caller needs a freshly signed assertion.
    let why = "a second private_key_jwt exchange (fresh assertion)";
    let bob = h.caller_token("bob").await;
    let echo = h.echo("/exchange-pkjwt/y", &bob, why).await;
    let (_, claims) = upstream_token(&echo, &bob, why);
    assert_exchanged(claims, &issuer, "bob", "sidecar-pkjwt", why);
    assert_eq!(h.token_requests().await, 4, "{why}: one token request");

    // Client credentials (oidc-provider's built-in grant) with client_secret_basic.
    let why = "client credentials with client_secret_basic";
    let echo = h.echo("/app/x", &alice, why).await;
    let (app_token, claims) = upstream_token(&echo, &alice, why);
    assert_eq!(claims["iss"], issuer, "{why}: issued by oidc-provider");
    assert!(
        audience_contains(claims, DOWNSTREAM),
        "{why}: aud {}",
        claims["aud"]
    );
    assert_eq!(claims["sub"], "sidecar-basic", "{why}: the app itself");
    assert_eq!(
        claims["client_id"], "sidecar-basic",
        "{why}: the app itself"
    );
    assert_eq!(h.token_requests().await, 5, "{why}: one token request");

    // The cache: repeats make no token request and send the same tokens.
    let why = "a repeated OBO request";
    let echo = h.echo("/obo/again", &alice, why).await;
    assert_eq!(
        upstream_token(&echo, &alice, why).0,
        obo_token,
        "{why}: cached"
    );
    let why = "a repeated app request";
    let echo = h.echo("/app/again", &bob, why).await;
    assert_eq!(
        upstream_token(&echo, &bob, why).0,
        app_token,
        "{why}: cached"
    );
    let echo = h
        .echo(
            "/exchange-basic/again",
            &alice,
            "a repeated RFC 8693 request",
        )
        .await;
    upstream_token(&echo, &alice, "a repeated RFC 8693 request");
    assert_eq!(
        h.token_requests().await,
        5,
        "repeats are served from the cache"
    );

    // Error mapping: a caller token the sidecar accepts but oidc-provider refuses (invalid_grant) is 401
    // invalid_token, for both grammars.
    let revoked = h.caller_token("revoked").await;
    for path in ["/obo/x", "/exchange-basic/x"] {
        let response = h.get(path, &revoked).await;
        let status = response.status();
        let challenge = response
            .headers()
            .get("www-authenticate")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(
            status, 401,
            "invalid_grant from oidc-provider on {path} must be 401 (body {body})"
        );
        assert!(
            challenge.contains(r#"error="invalid_token""#),
            "invalid_grant on {path}: WWW-Authenticate {challenge:?}"
        );
        assert!(
            !body.contains(&revoked),
            "the problem body must not quote the token"
        );
    }
    assert_eq!(
        h.token_requests().await,
        7,
        "one token request per refused exchange (invalid_grant is not retried)"
    );

    sidecar.stop().await;
    drop(upstream);
}
