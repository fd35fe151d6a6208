//! Test harness: the development IdP, the echo upstream and the sidecar, all in-process on `127.0.0.1:0`.
#![allow(dead_code, reason = "each test binary uses part of the harness")]
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a harness failure is a test failure"
)]

#[path = "../../src/telemetry/exposition.rs"]
pub mod exposition;
pub(crate) mod process;
pub(crate) mod redis;

use std::net::SocketAddr;

use obo_sidecar::config::Config;
use obo_sidecar::dev::EchoUpstream;
use obo_sidecar::dev::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DevIdp, DevIdpConfig, TokenClaims,
};
use obo_sidecar::{Listeners, Sidecar};
use tokio::net::TcpListener;

pub(crate) const SECRET_VARIABLE: &str = "TEST_OBO_CLIENT_SECRET";

/// The `obo-sidecar` binary the tests that run a process use: `OBO_SIDECAR_BIN` when set (CI points it at
/// the production build, `--no-default-features`), else the one cargo built for these tests.
pub(crate) fn sidecar_binary() -> std::path::PathBuf {
    std::env::var_os("OBO_SIDECAR_BIN").map_or_else(
        || std::path::PathBuf::from(env!("CARGO_BIN_EXE_obo-sidecar")),
        std::path::PathBuf::from,
    )
}

/// Every log event of this test process at TRACE, from every crate (ours, hyper, reqwest, rustls, moka).
#[derive(Clone, Default)]
pub(crate) struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(
            &self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedLogs;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Installs (once per process) the subscriber that captures every log event; every harness does this, so
/// every scenario of the suite is also a check that no token or secret reaches a log line.
pub(crate) fn captured_logs() -> &'static CapturedLogs {
    static LOGS: std::sync::OnceLock<CapturedLogs> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = CapturedLogs::default();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(logs.clone())
            .with_ansi(false)
            .try_init();
        logs
    })
}

/// Fails when any signature the IdP made (caller tokens, issued upstream tokens, assertions), or the client
/// secret, appears in the captured logs.
pub(crate) fn assert_no_secret_in_logs(idp: &DevIdp) {
    let logs = captured_logs().text();
    // Split into base64url runs once, instead of searching the whole text for each signature.
    let runs: std::collections::HashSet<&str> = logs
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        .filter(|run| run.len() >= 40)
        .collect();
    for signature in idp.signatures() {
        assert!(
            !runs.contains(signature.as_str()),
            "a token signed by the IdP appears in the logs"
        );
    }
    assert!(
        !logs.contains(DEFAULT_CLIENT_SECRET),
        "the client secret appears in the logs"
    );
}

pub(crate) struct Harness {
    pub idp: DevIdp,
    pub upstream: EchoUpstream,
    pub sidecar: Sidecar,
    pub http: reqwest::Client,
}

/// One request a [`RecordingServer`] received.
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) query: Vec<(String, String)>,
    pub(crate) headers: Vec<(String, String)>,
}

impl Recorded {
    pub(crate) fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A status, a JSON body and maybe one more header.
type Answer = (u16, String, Option<(&'static str, &'static str)>);

/// A loopback HTTP server that records every request and answers what the test set (status, JSON body):
/// the stand-in for a managed identity endpoint (IMDS or App Service's `IDENTITY_ENDPOINT`).
pub(crate) struct RecordingServer {
    pub(crate) addr: SocketAddr,
    requests: std::sync::Arc<std::sync::Mutex<Vec<Recorded>>>,
    answer: std::sync::Arc<std::sync::Mutex<Answer>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RecordingServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RecordingServer {
    pub(crate) async fn start() -> RecordingServer {
        let listener = bind().await;
        let addr = listener.local_addr().expect("addr");
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let answer = std::sync::Arc::new(std::sync::Mutex::new((503_u16, String::new(), None)));
        let task = tokio::spawn({
            let requests = std::sync::Arc::clone(&requests);
            let answer = std::sync::Arc::clone(&answer);
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let requests = std::sync::Arc::clone(&requests);
                    let answer = std::sync::Arc::clone(&answer);
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(
                            move |request: http::Request<hyper::body::Incoming>| {
                                let uri = request.uri();
                                let recorded = Recorded {
                                    method: request.method().to_string(),
                                    path: uri.path().to_owned(),
                                    query: url::form_urlencoded::parse(
                                        uri.query().unwrap_or("").as_bytes(),
                                    )
                                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                                    .collect(),
                                    headers: request
                                        .headers()
                                        .iter()
                                        .map(|(n, v)| {
                                            (
                                                n.to_string(),
                                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                            )
                                        })
                                        .collect(),
                                };
                                requests.lock().unwrap().push(recorded);
                                let (status, body, header) = answer.lock().unwrap().clone();
                                async move {
                                    let mut response = http::Response::new(
                                        http_body_util::Full::new(bytes::Bytes::from(body)),
                                    );
                                    *response.status_mut() =
                                        http::StatusCode::from_u16(status).unwrap();
                                    response.headers_mut().insert(
                                        http::header::CONTENT_TYPE,
                                        http::HeaderValue::from_static("application/json"),
                                    );
                                    if let Some((name, value)) = header {
                                        response.headers_mut().insert(
                                            http::HeaderName::from_static(name),
                                            http::HeaderValue::from_static(value),
                                        );
                                    }
                                    Ok::<_, std::convert::Infallible>(response)
                                }
                            },
                        );
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        RecordingServer {
            addr,
            requests,
            answer,
            task,
        }
    }

    /// What the next requests are answered.
    pub(crate) fn answer(&self, status: u16, body: &serde_json::Value) {
        *self.answer.lock().unwrap() = (status, body.to_string(), None);
    }

    /// What the next requests are answered: `body` as it is (empty for none).
    pub(crate) fn answer_raw(&self, status: u16, body: &str) {
        *self.answer.lock().unwrap() = (status, body.to_owned(), None);
    }

    /// What the next requests are answered, with one more header.
    pub(crate) fn answer_with_header(
        &self,
        status: u16,
        body: &serde_json::Value,
        header: (&'static str, &'static str),
    ) {
        *self.answer.lock().unwrap() = (status, body.to_string(), Some(header));
    }

    pub(crate) fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// An address where nothing listens.
pub(crate) async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

/// `[listen]` and `[inbound]` for the dev IdP, to which tests add identities and routes.
pub(crate) fn inbound_config(idp: &DevIdp) -> String {
    inbound_config_for(idp, &[&format!("api://{DEFAULT_CLIENT_ID}")])
}

/// `[listen]` and `[inbound]` accepting these audiences.
pub(crate) fn inbound_config_for(idp: &DevIdp, audiences: &[&str]) -> String {
    format!(
        r#"
[listen]
proxy = "127.0.0.1:0"
admin = "127.0.0.1:0"

[inbound]
issuers = ["{issuer}"]
audiences = {audiences:?}
clock_skew = "5s"
"#,
        issuer = idp.issuer()
    )
}

/// A fresh temporary directory for one test's files.
pub(crate) fn temp_dir(name: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("obo-sidecar-{name}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// An RSA client certificate and key written as PEM into `dir`: (cert path, key path, certificate DER).
pub(crate) fn rsa_client_certificate(
    dir: &std::path::Path,
    name: &str,
) -> (String, String, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA key");
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let cert_path = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, cert.pem()).expect("write certificate");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    (
        cert_path.display().to_string(),
        key_path.display().to_string(),
        cert.der().to_vec(),
    )
}

/// The base configuration: every token kind, plus a dead and a slow upstream.
pub(crate) fn base_config(
    idp: &DevIdp,
    upstream: &str,
    token_endpoint: &str,
    dead: SocketAddr,
) -> String {
    format!(
        r#"
[listen]
proxy = "127.0.0.1:0"
admin = "127.0.0.1:0"

[inbound]
issuers = ["{issuer}"]
audiences = ["api://{DEFAULT_CLIENT_ID}"]
clock_skew = "5s"

[identity]
flavor = "entra"
token_endpoint = "{token_endpoint}"
client_id = "{DEFAULT_CLIENT_ID}"
client_secret = {{ env = "{SECRET_VARIABLE}" }}
timeout = "2s"

[[routes]]
name = "obo"
path_prefix = "/obo/"
upstream = "{upstream}/base/"
token = "obo"
scopes = ["api://downstream/.default"]
required_scopes = ["access_as_user"]

[[routes]]
name = "obo-other"
path_prefix = "/obo/other"
upstream = "{upstream}/other/"
token = "obo"
scopes = ["api://other/read"]

[[routes]]
name = "app"
path_prefix = "/app"
upstream = "{upstream}/"
token = "app"
scopes = ["api://downstream/.default"]

[[routes]]
name = "passthrough"
path_prefix = "/pass/"
upstream = "{upstream}/"
token = "passthrough"

[[routes]]
name = "none"
path_prefix = "/none/"
upstream = "{upstream}/"
token = "none"
required_roles = ["Reader"]

[[routes]]
name = "dead"
path_prefix = "/dead/"
upstream = "http://{dead}/"
token = "none"

[[routes]]
name = "obo-fast"
path_prefix = "/obo-fast/"
upstream = "{upstream}/"
token = "obo"
scopes = ["api://downstream/.default"]
timeout = "1s"

[[routes]]
name = "slow"
path_prefix = "/slow/"
upstream = "{upstream}/"
token = "none"
timeout = "1s"
"#,
        issuer = idp.issuer(),
    )
}

pub(crate) fn parse(text: &str) -> Config {
    parse_with_env(text, &[])
}

/// As [`parse`], with these environment variables besides the test secret.
pub(crate) fn parse_with_env(text: &str, vars: &[(String, String)]) -> Config {
    Config::parse(text, &|name| {
        if name == SECRET_VARIABLE {
            return Some(DEFAULT_CLIENT_SECRET.to_owned());
        }
        vars.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    })
    .unwrap_or_else(|e| panic!("test config invalid: {e}"))
}

impl Drop for Harness {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_no_secret_in_logs(&self.idp);
        }
    }
}

impl Harness {
    /// IdP, upstream and sidecar with the base configuration.
    pub(crate) async fn start() -> Harness {
        Harness::start_with(|idp, _| idp.token_endpoint()).await
    }

    /// As [`Harness::start`], with the token endpoint chosen by `token_endpoint`.
    pub(crate) async fn start_with(
        token_endpoint: impl FnOnce(&DevIdp, SocketAddr) -> String,
    ) -> Harness {
        let dead = dead_addr().await;
        Harness::start_custom(|idp, upstream| {
            base_config(idp, upstream, &token_endpoint(idp, dead), dead)
        })
        .await
    }

    /// IdP, upstream and a sidecar whose whole configuration `config` writes (from the IdP and upstream URL).
    pub(crate) async fn start_custom(config: impl FnOnce(&DevIdp, &str) -> String) -> Harness {
        Harness::start_custom_env(config, &[]).await
    }

    /// As [`Harness::start_custom`], with Microsoft's `DownstreamApis__*` variables `vars` read as routes.
    pub(crate) async fn start_custom_downstream_apis(
        config: impl FnOnce(&DevIdp, &str) -> String,
        vars: &[(&str, &str)],
    ) -> Harness {
        let (idp, upstream) = idp_and_upstream().await;
        let text = config(&idp, &upstream.url());
        let overrides: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let parsed = Config::parse_with_overrides(
            &text,
            &|name| (name == SECRET_VARIABLE).then(|| DEFAULT_CLIENT_SECRET.to_owned()),
            &overrides,
        )
        .unwrap_or_else(|e| panic!("test config invalid: {e}"));
        Harness::running(idp, upstream, parsed).await
    }

    /// As [`Harness::start_custom`], with these environment variables seen by the configuration.
    pub(crate) async fn start_custom_env(
        config: impl FnOnce(&DevIdp, &str) -> String,
        vars: &[(String, String)],
    ) -> Harness {
        let (idp, upstream) = idp_and_upstream().await;
        let text = config(&idp, &upstream.url());
        Harness::running(idp, upstream, parse_with_env(&text, vars)).await
    }

    /// The sidecar of `config` in front of `idp` and `upstream`, once ready.
    async fn running(idp: DevIdp, upstream: EchoUpstream, config: Config) -> Harness {
        let sidecar = start_sidecar(config).await;
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let harness = Harness {
            idp,
            upstream,
            sidecar,
            http,
        };
        harness.wait_ready().await;
        harness
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.sidecar.proxy_addr)
    }

    pub(crate) fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.sidecar.admin_addr)
    }

    /// A caller token for `sub` with scopes `scp`.
    pub(crate) fn token(&self, sub: &str, scp: &str) -> String {
        self.idp.mint(&TokenClaims {
            scp: Some(scp.to_owned()),
            ..TokenClaims::user(sub)
        })
    }

    /// GET `path` with a bearer token.
    pub(crate) async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.http.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("request")
    }

    /// The value of the unlabelled sample `name` on `/metrics`.
    pub(crate) async fn metric(&self, name: &str) -> Option<f64> {
        exposition::value(
            &scrape(&self.http, &self.admin_url("/metrics")).await,
            name,
            &[],
        )
    }

    /// Waits until the sidecar has its signing keys (fetched in the background), then checks `/readyz`.
    pub(crate) async fn wait_ready(&self) {
        tokio::time::timeout(std::time::Duration::from_secs(20), self.sidecar.ready())
            .await
            .expect("sidecar never became ready");
        let readyz = self
            .http
            .get(self.admin_url("/readyz"))
            .send()
            .await
            .expect("readyz");
        assert_eq!(readyz.status(), 200);
    }
}

/// The development IdP and the echo upstream, each on its own loopback port, with the test's logs captured.
pub(crate) async fn idp_and_upstream() -> (DevIdp, EchoUpstream) {
    captured_logs();
    let idp = DevIdp::start(bind().await, DevIdpConfig::default())
        .await
        .expect("idp");
    let upstream = EchoUpstream::start(bind().await).await.expect("upstream");
    (idp, upstream)
}

pub(crate) async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

/// The samples of a `/metrics` page.
pub(crate) async fn scrape(http: &reqwest::Client, url: &str) -> Vec<exposition::Sample> {
    let text = http
        .get(url)
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    exposition::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// The sum of the samples of `name` on a `/metrics` page, those with `label` only when one is given.
pub(crate) async fn metric_sum(
    http: &reqwest::Client,
    url: &str,
    name: &str,
    label: Option<(&str, &str)>,
) -> f64 {
    scrape(http, url)
        .await
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| label.is_none_or(|(k, v)| s.label(k) == Some(v)))
        .map(|s| s.value)
        .sum()
}

pub(crate) async fn start_sidecar(config: Config) -> Sidecar {
    let listeners = Listeners {
        proxy: bind().await,
        admin: bind().await,
    };
    obo_sidecar::start(config, listeners)
        .await
        .expect("sidecar starts")
}

/// The JSON the echo upstream answered.
pub(crate) async fn echoed(response: reqwest::Response) -> serde_json::Value {
    assert_eq!(response.status(), 200, "expected the upstream's answer");
    response.json().await.expect("echo JSON")
}

/// The `Authorization` header value the upstream saw, if any.
pub(crate) fn seen_authorization(echo: &serde_json::Value) -> Option<String> {
    echo["headers"].as_array()?.iter().find_map(|pair| {
        (pair[0].as_str()?.eq_ignore_ascii_case("authorization"))
            .then(|| pair[1].as_str().map(str::to_owned))?
    })
}

/// Every value of header `name` the upstream saw.
pub(crate) fn seen_header(echo: &serde_json::Value, name: &str) -> Vec<String> {
    echo["headers"]
        .as_array()
        .map(|pairs| {
            pairs
                .iter()
                .filter(|pair| {
                    pair[0]
                        .as_str()
                        .is_some_and(|n| n.eq_ignore_ascii_case(name))
                })
                .filter_map(|pair| pair[1].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Sends `request` verbatim on a new connection and reads the whole answer (the request should say
/// `Connection: close`). Returns the status and the raw response text.
pub(crate) async fn raw_request(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, text)
}

/// A throwaway CA and a server certificate for `127.0.0.1` and `localhost` signed by it.
pub(crate) struct TestPki {
    pub ca_pem: String,
    pub server: std::sync::Arc<rustls::ServerConfig>,
    /// The server certificate and its key, PEM, for servers that read files (`redis-server`).
    pub leaf_pem: String,
    pub leaf_key_pem: String,
}

impl TestPki {
    pub(crate) fn new() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        obo_sidecar::install_crypto_provider();
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "obo-sidecar test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf_params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("leaf params");
        let leaf = leaf_params
            .signed_by(&leaf_key, &issuer)
            .expect("leaf cert");
        let key =
            rustls_pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).expect("key der");
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .expect("server config");
        TestPki {
            ca_pem: ca_cert.pem(),
            server: std::sync::Arc::new(server),
            leaf_pem: leaf.pem(),
            leaf_key_pem: leaf_key.serialize_pem(),
        }
    }

    /// Writes the CA certificate to a fresh temporary file and returns its path.
    pub(crate) fn ca_file(&self) -> std::path::PathBuf {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "obo-sidecar-test-ca-{}-{n}.pem",
            std::process::id()
        ));
        std::fs::write(&path, &self.ca_pem).expect("write CA");
        path
    }
}
