//! End to end, the operations features: HTTP/2 on both sides (h2c, and ALPN `h2` over TLS), inbound mTLS,
//! WebSocket upgrades, the SIGTERM drain of the real binary, reloads under traffic and from the watched file,
//! `/metrics` after traffic, and the token API.
// Every integration test runs against the development IdP and echo upstream.
#![cfg(feature = "dev")]
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "helpers of tests: a failure is a test failure"
)]
#![allow(
    clippy::float_cmp,
    reason = "metric samples compared here are small counts, exact in f64"
)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use obo_sidecar::dev::EchoUpstream;
use obo_sidecar::dev::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DevIdp, DevIdpConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use support::process::SidecarProcess;
use support::{Harness, SECRET_VARIABLE, echoed, seen_authorization, seen_header};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// How long any single wait in these tests may take before it counts as a hang.
const PATIENCE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------------------
// Configuration pieces

/// `[identity]` for the development IdP; `secret` is the TOML value of `client_secret`.
fn identity(idp: &DevIdp, secret: &str) -> String {
    format!(
        r#"
[identity]
flavor = "entra"
token_endpoint = "{endpoint}"
client_id = "{DEFAULT_CLIENT_ID}"
client_secret = {secret}
timeout = "2s"
"#,
        endpoint = idp.token_endpoint()
    )
}

/// The client secret from the variable `support::parse` answers.
fn env_secret() -> String {
    format!("{{ env = \"{SECRET_VARIABLE}\" }}")
}

/// The client secret from a file written into `dir` (for configs read with the process environment).
fn file_secret(dir: &Path) -> String {
    let path = dir.join("client-secret");
    std::fs::write(&path, DEFAULT_CLIENT_SECRET).expect("write secret");
    format!("{{ file = \"{}\" }}", path.display())
}

/// An `obo` route exchanging the caller's token for `api://downstream`, with `extra` keys.
fn obo_route(name: &str, prefix: &str, upstream: &str, extra: &str) -> String {
    format!(
        r#"
[[routes]]
name = "{name}"
path_prefix = "{prefix}"
upstream = "{upstream}"
token = "obo"
scopes = ["api://downstream/.default"]
{extra}
"#
    )
}

/// `support::inbound_config` with `line` added to `[listen]`.
fn inbound_with_listen(idp: &DevIdp, line: &str) -> String {
    let text = support::inbound_config(idp);
    let admin = "admin = \"127.0.0.1:0\"\n";
    assert!(text.contains(admin), "the support config changed shape");
    text.replacen(admin, &format!("{admin}{line}\n"), 1)
}

// ---------------------------------------------------------------------------------------------------------
// A throwaway PKI: a CA and the leaf certificates the tests need, as PEM files and rustls configs

struct Pki {
    dir: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca: CertificateDer<'static>,
    ca_file: PathBuf,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        obo_sidecar::install_crypto_provider();
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("obo-sidecar {name} CA"));
        let cert = params.self_signed(&key).expect("CA certificate");
        let ca_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, cert.pem()).expect("write CA");
        Pki {
            dir: dir.to_owned(),
            issuer: rcgen::Issuer::new(params, key),
            ca: cert.der().clone(),
            ca_file,
        }
    }

    /// A leaf certificate for `names` with extended key usage `usage`, and its key.
    fn leaf(
        &self,
        names: &[&str],
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .expect("leaf params");
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        (cert, key)
    }

    /// A server certificate for `127.0.0.1` and `localhost`, written as PEM: (certificate, key) paths.
    fn server_files(&self, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = self.leaf(
            &["127.0.0.1", "localhost"],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        let cert_path = self.dir.join(format!("{name}.crt"));
        let key_path = self.dir.join(format!("{name}.key"));
        std::fs::write(&cert_path, cert.pem()).expect("write certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }

    /// A server configuration (ALPN `h2`, `http/1.1`) for `127.0.0.1` and `localhost`.
    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let (cert, key) = self.leaf(
            &["127.0.0.1", "localhost"],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        let key = PrivateKeyDer::try_from(key.serialize_der()).expect("key DER");
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .expect("server config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// A client certificate chain and key issued by this CA.
    fn client_identity(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let (cert, key) = self.leaf(&["client.test"], rcgen::ExtendedKeyUsagePurpose::ClientAuth);
        let key = PrivateKeyDer::try_from(key.serialize_der()).expect("key DER");
        (vec![cert.der().clone()], key)
    }

    /// A client trusting this CA, offering `alpn`, presenting `identity` when given.
    fn client_config(
        &self,
        alpn: &[&[u8]],
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).expect("CA root");
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .expect("client certificate"),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

// ---------------------------------------------------------------------------------------------------------
// Clients

/// An error and its sources on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Sends `request` on a new HTTP/2 connection over `io` (h2c prior knowledge, or TLS after ALPN `h2`).
async fn send_h2<I>(io: I, request: Request<Empty<Bytes>>) -> (http::response::Parts, Bytes)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let response = tokio::time::timeout(PATIENCE, sender.send_request(request))
        .await
        .expect("HTTP/2 response in time")
        .expect("HTTP/2 response");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("HTTP/2 body").to_bytes();
    (parts, body)
}

/// `GET path` with `token` over TLS (HTTP/1.1) with `config`; `Err` says where it failed.
async fn get_over_tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    path: &str,
    token: &str,
) -> Result<(StatusCode, Bytes), String> {
    let attempt = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP/1 handshake: {e}"))?;
        tokio::spawn(connection);
        let request = Request::get(path)
            .header(header::HOST, "localhost")
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {}", error_chain(&e)))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(PATIENCE, attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()))
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// Reads an HTTP/1.1 response head byte by byte (so nothing after it is consumed): the status and the
/// headers, names lowercased.
async fn read_head(stream: &mut TcpStream) -> (u16, BTreeMap<String, String>) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0_u8; 1];
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut byte))
            .await
            .expect("response head in time")
            .expect("read");
        assert_eq!(
            n,
            1,
            "EOF inside the response head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("ASCII head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    (status, headers)
}

// ---------------------------------------------------------------------------------------------------------
// OpenMetrics text

use support::exposition::{Sample, value as sample};

/// The exposition text parsed; a line that is not `OpenMetrics` fails the test.
fn parse_exposition(text: &str) -> Vec<Sample> {
    support::exposition::parse(text).unwrap_or_else(|e| panic!("unparsable metrics: {e}\n{text}"))
}

async fn metrics(h: &Harness) -> (Option<String>, Vec<Sample>) {
    let response = h
        .http
        .get(h.admin_url("/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(response.status(), 200);
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = response.text().await.expect("metrics text");
    (content_type, parse_exposition(&text))
}

async fn reload_count(h: &Harness, outcome: &str) -> f64 {
    let (_, samples) = metrics(h).await;
    sample(&samples, "obo_config_reload_total", &[("outcome", outcome)])
        .unwrap_or_else(|| panic!("no obo_config_reload_total{{outcome={outcome:?}}}"))
}

// ---------------------------------------------------------------------------------------------------------
// HTTP/2 and TLS

/// An HTTP/2 caller over h2c reaches an `http2 = true` upstream over h2c with the swapped token; a route
/// without `http2` speaks HTTP/1.1 to its upstream for the same caller.
#[tokio::test]
async fn h2c_caller_reaches_http2_upstream_with_the_swapped_token() {
    let h = Harness::start_custom(|idp, upstream| {
        support::inbound_config(idp)
            + &identity(idp, &env_secret())
            + &obo_route("h2", "/h2/", &format!("{upstream}/two/"), "http2 = true")
            + &obo_route("h1", "/h1/", &format!("{upstream}/one/"), "")
    })
    .await;
    let caller = h.token("alice", "access_as_user");
    for (path, version, uri) in [
        ("/h2/x?q=1", "HTTP/2.0", "/two/x?q=1"),
        ("/h1/x", "HTTP/1.1", "/one/x"),
    ] {
        let stream = TcpStream::connect(h.sidecar.proxy_addr)
            .await
            .expect("connect");
        let request = Request::get(format!("http://{}{path}", h.sidecar.proxy_addr))
            .header(header::AUTHORIZATION, format!("Bearer {caller}"))
            .body(Empty::new())
            .expect("request");
        let (parts, body) = send_h2(stream, request).await;
        assert_eq!(
            parts.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(parts.version, http::Version::HTTP_2);
        let echo = json(&body);
        assert_eq!(echo["version"], version, "{path}");
        assert_eq!(echo["uri"], uri);
        let sent = seen_authorization(&echo).expect("upstream saw a token");
        assert!(
            !sent.contains(&caller),
            "the caller's token must not reach the upstream"
        );
        assert_eq!(echo["authorization"]["claims"]["aud"], "api://downstream");
        assert_eq!(echo["authorization"]["claims"]["sub"], "alice");
        assert_eq!(seen_header(&echo, "x-forwarded-proto"), ["http"]);
    }
    assert_eq!(h.idp.token_requests(), 1, "both routes share one exchange");
}

/// An HTTP/2 caller over TLS negotiates `h2` by ALPN on the `[listen] tls` listener and reaches an HTTPS
/// upstream (verified against the route's `ca_file`, `h2` by ALPN) with the swapped token and
/// `X-Forwarded-Proto: https`.
#[tokio::test]
async fn tls_caller_negotiates_h2_and_reaches_an_https_http2_upstream() {
    let dir = support::temp_dir("tls-h2");
    let pki = Pki::new(&dir, "test");
    let (cert_file, key_file) = pki.server_files("listener");
    let tls_upstream = EchoUpstream::start_tls(support::bind().await, pki.server_config())
        .await
        .expect("TLS upstream");
    assert!(tls_upstream.url().starts_with("https://"));
    let h = Harness::start_custom(|idp, _| {
        inbound_with_listen(
            idp,
            &format!(
                "tls = {{ cert_file = \"{}\", key_file = \"{}\" }}",
                cert_file.display(),
                key_file.display()
            ),
        ) + &identity(idp, &env_secret())
            + &obo_route(
                "h2",
                "/h2/",
                &format!("{}/two/", tls_upstream.url()),
                &format!("http2 = true\nca_file = \"{}\"", pki.ca_file.display()),
            )
    })
    .await;
    let caller = h.token("alice", "access_as_user");
    let tcp = TcpStream::connect(h.sidecar.proxy_addr)
        .await
        .expect("connect");
    let tls = tokio_rustls::TlsConnector::from(pki.client_config(&[b"h2", b"http/1.1"], None))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS handshake with the sidecar");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let request = Request::get(format!(
        "https://localhost:{}/h2/secure",
        h.sidecar.proxy_addr.port()
    ))
    .header(header::AUTHORIZATION, format!("Bearer {caller}"))
    .body(Empty::new())
    .expect("request");
    let (parts, body) = send_h2(tls, request).await;
    assert_eq!(parts.status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(parts.version, http::Version::HTTP_2);
    let echo = json(&body);
    assert_eq!(
        echo["version"], "HTTP/2.0",
        "the upstream hop negotiated h2"
    );
    assert_eq!(echo["uri"], "/two/secure");
    assert_eq!(echo["authorization"]["claims"]["aud"], "api://downstream");
    assert_eq!(echo["authorization"]["claims"]["sub"], "alice");
    assert_eq!(seen_header(&echo, "x-forwarded-proto"), ["https"]);
    assert_eq!(tls_upstream.requests(), 1);
}

/// With `client_ca_file`, a client without a certificate, or with one from another CA, is refused at the
/// TLS handshake and never reaches the upstream; a client with a certificate from that CA gets through.
#[tokio::test]
async fn mtls_refuses_clients_without_a_valid_certificate() {
    let dir = support::temp_dir("mtls");
    let pki = Pki::new(&dir, "trusted");
    let stranger = Pki::new(&dir, "stranger");
    let (cert_file, key_file) = pki.server_files("listener");
    let h = Harness::start_custom(|idp, upstream| {
        inbound_with_listen(
            idp,
            &format!(
                "tls = {{ cert_file = \"{}\", key_file = \"{}\", client_ca_file = \"{}\" }}",
                cert_file.display(),
                key_file.display(),
                pki.ca_file.display()
            ),
        ) + &identity(idp, &env_secret())
            + &obo_route("m", "/m/", &format!("{upstream}/"), "")
    })
    .await;
    let caller = h.token("alice", "access_as_user");
    let addr = h.sidecar.proxy_addr;

    let anonymous = get_over_tls(
        addr,
        pki.client_config(&[b"http/1.1"], None),
        "/m/x",
        &caller,
    )
    .await;
    assert!(
        anonymous
            .as_ref()
            .is_err_and(|e| e.contains("alert: CertificateRequired")),
        "a client without a certificate got {anonymous:?}"
    );
    let foreign = get_over_tls(
        addr,
        pki.client_config(&[b"http/1.1"], Some(stranger.client_identity())),
        "/m/x",
        &caller,
    )
    .await;
    assert!(
        foreign
            .as_ref()
            .is_err_and(|e| e.contains("alert: UnknownCA")),
        "a certificate from another CA got {foreign:?}"
    );
    assert_eq!(h.upstream.requests(), 0);

    let (status, body) = get_over_tls(
        addr,
        pki.client_config(&[b"http/1.1"], Some(pki.client_identity())),
        "/m/x",
        &caller,
    )
    .await
    .expect("a client with a trusted certificate gets through");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let echo = json(&body);
    assert_eq!(echo["uri"], "/x");
    assert_eq!(echo["authorization"]["claims"]["aud"], "api://downstream");
    assert_eq!(seen_header(&echo, "x-forwarded-proto"), ["https"]);
    assert_eq!(h.upstream.requests(), 1);
}

// ---------------------------------------------------------------------------------------------------------
// WebSocket

/// A WebSocket handshake through an `obo` route gets `101`; the upstream saw the swapped token (not the
/// caller's) at the handshake, and a masked frame round-trips byte for byte until the caller closes.
#[tokio::test]
async fn websocket_round_trips_with_the_swapped_token_at_the_handshake() {
    let h = Harness::start().await;
    let caller = h.token("alice", "access_as_user");
    let mut stream = TcpStream::connect(h.sidecar.proxy_addr)
        .await
        .expect("connect");
    let handshake = format!(
        "GET /obo/socket HTTP/1.1\r\nHost: api.example\r\nAuthorization: Bearer {caller}\r\n\
         Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    stream
        .write_all(handshake.as_bytes())
        .await
        .expect("handshake");
    let (status, headers) = read_head(&mut stream).await;
    assert_eq!(status, 101, "{headers:?}");
    assert!(headers["upgrade"].eq_ignore_ascii_case("websocket"));
    assert!(headers["connection"].eq_ignore_ascii_case("upgrade"));
    // RFC 6455 §1.3's example key and answer.
    assert_eq!(
        headers["sec-websocket-accept"],
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
    assert_eq!(headers["x-echo-authorization-aud"], "api://downstream");
    assert_eq!(headers["x-echo-authorization-sub"], "alice");

    // A masked text frame (client to server frames are masked, RFC 6455 §5.3).
    let payload = b"hello through the sidecar";
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![
        0x81,
        0x80 | u8::try_from(payload.len()).expect("short payload"),
    ];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    for _ in 0..2 {
        stream.write_all(&frame).await.expect("frame");
        let mut back = vec![0_u8; frame.len()];
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut back))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(back, frame);
    }
    stream.shutdown().await.expect("close");
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
        .await
        .expect("the upgraded connection closes after the caller's EOF")
        .expect("read to EOF");
    assert!(rest.is_empty());
    assert_eq!(h.upstream.requests(), 1);
    assert_eq!(h.idp.token_requests(), 1);
}

// ---------------------------------------------------------------------------------------------------------
// Lifecycle: SIGTERM, reload

/// SIGTERM to the real binary during a slow in-flight request: the proxy listener stops accepting new
/// connections, the in-flight request still completes 200, and the process exits 0 within `drain_timeout`.
/// Its JSON log has one flat access line per request (SPEC §15).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_request_finish_and_exits_zero() {
    const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    let idp = DevIdp::start(support::bind().await, DevIdpConfig::default())
        .await
        .expect("idp");
    let upstream = EchoUpstream::start(support::bind().await)
        .await
        .expect("upstream");
    let dir = support::temp_dir("sigterm");
    let config = support::inbound_config(&idp).replacen(
        "proxy = \"127.0.0.1:0\"",
        &format!(
            "proxy = \"127.0.0.1:0\"\ndrain_timeout = \"{}s\"",
            DRAIN_TIMEOUT.as_secs()
        ),
        1,
    ) + &identity(&idp, &file_secret(&dir))
        + &obo_route("obo", "/obo/", &format!("{}/", upstream.url()), "");
    let mut child = SidecarProcess::start(&dir, &config, &["--log-format", "json"], &[]).await;
    let proxy_addr = child.proxy;
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");

    let caller = idp.mint(&obo_sidecar::dev::TokenClaims {
        scp: Some("access_as_user".to_owned()),
        ..obo_sidecar::dev::TokenClaims::user("alice")
    });
    // For the access log: one request carrying a trace and a query, one refused.
    let traced = http
        .get(format!("http://{proxy_addr}/obo/traced?q=private"))
        .bearer_auth(&caller)
        .header("traceparent", format!("00-{TRACE}-00f067aa0ba902b7-01"))
        .send()
        .await
        .expect("traced request");
    assert_eq!(traced.status(), 200);
    let refused = http
        .get(format!("http://{proxy_addr}/obo/refused"))
        .bearer_auth("not-a-jwt")
        .send()
        .await
        .expect("refused request");
    assert_eq!(refused.status(), 401);
    let before = upstream.requests();
    let in_flight = tokio::spawn({
        let request = http
            .get(format!("http://{proxy_addr}/obo/slow"))
            .bearer_auth(&caller)
            .header("x-echo-delay-ms", "1500");
        async move {
            let response = request.send().await?;
            let status = response.status();
            Ok::<_, reqwest::Error>((status, response.text().await?))
        }
    });
    let started = Instant::now();
    while upstream.requests() == before {
        assert!(
            started.elapsed() < PATIENCE,
            "the request never reached the upstream:\n{}",
            child.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let signalled = Instant::now();
    child.terminate();

    // New connections are refused once the listener is closed, while the slow request is still running. A
    // connect racing the close may be reset instead of refused (the kernel completed the handshake just as the
    // listener closed): that is not an accepted connection either.
    let mut refused = false;
    while signalled.elapsed() < Duration::from_secs(1) {
        match TcpStream::connect(proxy_addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused = true;
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("unexpected connect error: {e}"),
            Ok(stream) => drop(stream),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the proxy listener still accepts after SIGTERM");
    if in_flight.is_finished() {
        let early = in_flight.await.expect("in-flight task");
        panic!(
            "the slow request finished before the listener closed ({early:?}): the test proves nothing\n{}",
            child.log()
        );
    }

    let (status, body) = in_flight
        .await
        .expect("in-flight task")
        .unwrap_or_else(|e| panic!("in-flight request failed: {e:?}\n{}", child.log()));
    assert_eq!(status, 200, "{body}\n{}", child.log());
    assert_eq!(
        json(body.as_bytes())["authorization"]["claims"]["sub"],
        "alice"
    );

    let exit = child
        .wait(DRAIN_TIMEOUT.saturating_sub(signalled.elapsed()))
        .await;
    assert_eq!(exit.code(), Some(0), "{}", child.log());
    assert!(TcpStream::connect(proxy_addr).await.is_err());

    // One flat JSON line per request: the fields at the top level, the path without its query, the caller's
    // trace id, and a refusal's reason code (never the token).
    let text = child.log();
    let access: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["target"] == "access")
        .collect();
    assert_eq!(access.len(), 3, "{text}");
    let traced = &access[0];
    assert_eq!(traced["route"], "obo", "{traced}");
    assert_eq!(traced["method"], "GET");
    assert_eq!(traced["path"], "/obo/traced");
    assert_eq!(traced["status"], 200);
    assert_eq!(traced["trace_id"], TRACE);
    assert_eq!(traced["cache"], "miss");
    assert_eq!(traced["idp_call"], true);
    assert!(traced["duration_ms"].as_f64().is_some_and(|ms| ms > 0.0));
    assert!(
        traced["request_id"]
            .as_str()
            .is_some_and(|id| id.len() == 36)
    );
    assert!(traced.get("fields").is_none());
    let refused = &access[1];
    assert_eq!(refused["status"], 401, "{refused}");
    assert_eq!(refused["reason"], "invalid_token:NotThreeParts");
    assert_eq!(refused["trace_id"], "-");
    assert!(
        !text.contains("private") && !text.contains("not-a-jwt"),
        "{text}"
    );
}

/// About 500 requests, 16 at a time, across five reloads that add route `b` and move `a`'s upstream path:
/// none fails, both generations of `a` answered, `b` answers after the reload, and the cached upstream token
/// survives every reload (one IdP call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_continuous_traffic_fails_no_request() {
    const TOTAL: usize = 512;
    const CONCURRENCY: usize = 16;
    const RELOADS: usize = 5;
    let mut configs = (String::new(), String::new());
    let h = Harness::start_custom(|idp, upstream| {
        let common = support::inbound_config(idp) + &identity(idp, &env_secret());
        let before = common.clone() + &obo_route("a", "/a/", &format!("{upstream}/v1/"), "");
        let after = common
            + &obo_route("a", "/a/", &format!("{upstream}/v2/"), "")
            + &obo_route("b", "/b/", &format!("{upstream}/b/"), "");
        configs = (before.clone(), after);
        before
    })
    .await;
    let (before, after) = configs;
    let caller = h.token("alice", "access_as_user");
    assert_eq!(h.get("/b/x", Some(&caller)).await.status(), 404);

    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (next, done) = (Arc::clone(&next), Arc::clone(&done));
            let (http, url, caller) = (h.http.clone(), h.url("/a/x"), caller.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while next.fetch_add(1, Ordering::SeqCst) < TOTAL {
                    let outcome = match http.get(&url).bearer_auth(&caller).send().await {
                        Ok(response) if response.status() == 200 => {
                            let echo: Value = response.json().await.expect("echo JSON");
                            Ok(echo["uri"].as_str().unwrap_or_default().to_owned())
                        }
                        Ok(response) => Err(format!(
                            "{}: {}",
                            response.status(),
                            response.text().await.unwrap_or_default()
                        )),
                        Err(error) => Err(format!("{error:?}")),
                    };
                    seen.push(outcome);
                    done.fetch_add(1, Ordering::SeqCst);
                }
                seen
            })
        })
        .collect();

    let started = Instant::now();
    for round in 0..RELOADS {
        while done.load(Ordering::SeqCst) < (round + 1) * TOTAL / (RELOADS + 2) {
            assert!(started.elapsed() < PATIENCE * 2, "traffic stalled");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let text = if round % 2 == 0 { &after } else { &before };
        h.sidecar
            .reload(support::parse(text))
            .await
            .expect("valid reload");
    }
    let mut outcomes = Vec::new();
    for worker in workers {
        outcomes.extend(worker.await.expect("worker"));
    }
    assert_eq!(outcomes.len(), TOTAL);
    let failures: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    let on = |uri: &str| outcomes.iter().filter(|o| o.as_deref() == Ok(uri)).count();
    assert!(
        on("/v1/x") > 0 && on("/v2/x") > 0,
        "v1 {} v2 {}",
        on("/v1/x"),
        on("/v2/x")
    );
    assert_eq!(on("/v1/x") + on("/v2/x"), TOTAL);

    // The last reload applied `after`.
    assert_eq!(
        echoed(h.get("/b/y", Some(&caller)).await).await["uri"],
        "/b/y"
    );
    assert_eq!(
        echoed(h.get("/a/z", Some(&caller)).await).await["uri"],
        "/v2/z"
    );
    assert_eq!(
        h.idp.token_requests(),
        1,
        "the upstream token cache survives reloads of an unchanged identity"
    );
}

/// `watch_config` rejects an invalid rewrite of the file (the old routes keep serving, the new route is
/// absent, `obo_config_reload_total{outcome="rejected"}` is 1), then applies a valid one (`outcome="ok"` 1).
#[tokio::test]
async fn watched_config_rejects_a_bad_file_and_applies_a_good_one() {
    let dir = support::temp_dir("watch");
    let path = dir.join("sidecar.toml");
    let mut texts = (String::new(), String::new());
    let h = Harness::start_custom(|idp, upstream| {
        let base = support::inbound_config(idp)
            + &identity(idp, &file_secret(&dir))
            + &obo_route("a", "/a/", &format!("{upstream}/v1/"), "");
        let invalid = base.clone()
            + &obo_route(
                "b",
                "/b/",
                &format!("{upstream}/b/"),
                "favourite_colour = \"blue\"",
            );
        let valid = base.clone() + &obo_route("b", "/b/", &format!("{upstream}/b/"), "");
        std::fs::write(&path, &base).expect("write config");
        texts = (invalid, valid);
        base
    })
    .await;
    let (invalid, valid) = texts;
    let caller = h.token("alice", "access_as_user");
    let status = |path: &'static str| {
        let caller = caller.clone();
        let h = &h;
        async move { h.get(path, Some(&caller)).await.status() }
    };

    let body = async {
        assert_eq!(reload_count(&h, "rejected").await, 0.0);
        std::fs::write(&path, &invalid).expect("write invalid config");
        let started = Instant::now();
        while reload_count(&h, "rejected").await < 1.0 {
            assert!(
                started.elapsed() < PATIENCE,
                "the invalid config was never looked at"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(reload_count(&h, "rejected").await, 1.0);
        assert_eq!(reload_count(&h, "ok").await, 0.0);
        assert_eq!(status("/a/x").await, 200, "the old routes keep serving");
        assert_eq!(
            status("/b/x").await,
            404,
            "nothing of the rejected config applies"
        );

        std::fs::write(&path, &valid).expect("write valid config");
        let started = Instant::now();
        while status("/b/x").await != 200 {
            assert!(
                started.elapsed() < PATIENCE,
                "the valid config was never applied"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(reload_count(&h, "ok").await, 1.0);
        assert_eq!(reload_count(&h, "rejected").await, 1.0);
        assert_eq!(status("/a/x").await, 200);
    };
    // `biased`: the watcher takes its first look at the file before the body rewrites it.
    tokio::select! {
        biased;
        () = obo_sidecar::watch_config(&h.sidecar, &path) => panic!("watch_config returned"),
        () = body => {}
    }
}

// ---------------------------------------------------------------------------------------------------------
// Metrics

/// After traffic (ok, 401, 404, an IdP miss and a hit, an upstream error) `/metrics` parses as `OpenMetrics`
/// text, names every SPEC §6 metric with the samples that traffic made, and no label value is a path.
#[tokio::test]
async fn metrics_after_traffic_parse_and_name_every_spec_metric() {
    let h = Harness::start().await;
    let caller = h.token("alice", "access_as_user");
    assert_eq!(h.get("/obo/m-one", Some(&caller)).await.status(), 200);
    assert_eq!(h.get("/obo/m-two", Some(&caller)).await.status(), 200);
    assert_eq!(h.get("/obo/m-three", None).await.status(), 401);
    assert_eq!(h.get("/nowhere/m-four", Some(&caller)).await.status(), 404);
    assert_eq!(h.get("/dead/m-five", Some(&caller)).await.status(), 502);

    let (content_type, samples) = metrics(&h).await;
    assert_eq!(
        content_type.as_deref(),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    for name in [
        "obo_requests_total",
        "obo_request_duration_seconds_bucket",
        "obo_request_duration_seconds_sum",
        "obo_request_duration_seconds_count",
        "obo_token_cache_requests_total",
        "obo_token_cache_entries",
        "obo_idp_requests_total",
        "obo_idp_request_duration_seconds_bucket",
        "obo_idp_request_duration_seconds_sum",
        "obo_idp_request_duration_seconds_count",
        "obo_jwks_refresh_total",
        "obo_upstream_errors_total",
        "obo_config_reload_total",
    ] {
        assert!(samples.iter().any(|s| s.name == name), "no {name} sample");
    }
    let value = |name: &str, labels: &[(&str, &str)]| {
        sample(&samples, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?}"))
    };
    assert_eq!(
        value("obo_requests_total", &[("route", "obo"), ("status", "200")]),
        2.0
    );
    assert_eq!(
        value("obo_requests_total", &[("route", "obo"), ("status", "401")]),
        1.0
    );
    assert_eq!(
        value("obo_requests_total", &[("route", "-"), ("status", "404")]),
        1.0
    );
    assert_eq!(
        value(
            "obo_requests_total",
            &[("route", "dead"), ("status", "502")]
        ),
        1.0
    );
    assert_eq!(
        value("obo_request_duration_seconds_count", &[("route", "obo")]),
        3.0
    );
    let cache = |result| {
        value(
            "obo_token_cache_requests_total",
            &[("route", "obo"), ("kind", "obo"), ("result", result)],
        )
    };
    assert_eq!((cache("miss"), cache("hit")), (1.0, 1.0));
    assert_eq!(
        value(
            "obo_idp_requests_total",
            &[("identity", "default"), ("grant", "obo"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "obo_idp_request_duration_seconds_count",
            &[("identity", "default"), ("grant", "obo")]
        ),
        1.0
    );
    assert!(
        value(
            "obo_jwks_refresh_total",
            &[("issuer", &h.idp.issuer()), ("outcome", "ok")]
        ) >= 1.0
    );
    assert_eq!(
        value(
            "obo_upstream_errors_total",
            &[("route", "dead"), ("kind", "connect")]
        ),
        1.0
    );
    assert_eq!(value("obo_config_reload_total", &[("outcome", "ok")]), 0.0);
    assert_eq!(
        value("obo_config_reload_total", &[("outcome", "rejected")]),
        0.0
    );
    for s in &samples {
        for (key, label) in &s.labels {
            assert!(
                !label.starts_with('/') && !label.contains("m-"),
                "label {key}={label:?} of {} looks like a request path",
                s.name
            );
        }
    }
    // Last, so the checks above run even while this one fails: the one cached upstream token is counted.
    assert_eq!(
        value("obo_token_cache_entries", &[]),
        1.0,
        "obo_token_cache_entries must count the cached upstream token"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Token API

/// The token API returns, with `Cache-Control: no-store`, exactly the `Authorization` the proxy sends
/// upstream for the same caller and route; `/validate` returns the caller's claims; an `app` route is 404
/// there; a token without the route's scope gets the same 403 as proxying.
#[tokio::test]
async fn token_api_returns_the_header_the_proxy_sends_upstream() {
    let h = Harness::start().await;
    let caller = h.token("alice", "access_as_user");

    let response = h.get("/.obo/authorization-header/obo", Some(&caller)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    let api: Value = response.json().await.expect("token API JSON");
    let from_api = api["authorization_header"]
        .as_str()
        .expect("authorization_header")
        .to_owned();
    assert!(from_api.starts_with("Bearer "));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let expires_on = api["expires_on"].as_u64().expect("expires_on");
    assert!(
        expires_on > now && expires_on <= now + 3700,
        "expires_on {expires_on}, now {now}"
    );

    let echo = echoed(h.get("/obo/x", Some(&caller)).await).await;
    assert_eq!(seen_authorization(&echo), Some(from_api));
    assert_eq!(
        h.idp.token_requests(),
        1,
        "the proxy reused the token API's exchange"
    );
    // `expires_on` is the sidecar's clock at the IdP's answer plus its `expires_in` (OAuth's own figure; an
    // upstream token need not be a JWT); the JWT's `exp` is the IdP's clock at issue plus the same lifetime.
    // A second boundary between the two clock reads makes them one apart (a flake seen once in ~300 runs
    // when this asserted equality).
    let exp = echo["authorization"]["claims"]["exp"]
        .as_u64()
        .expect("upstream exp");
    assert!(
        (exp..=exp + 1).contains(&expires_on),
        "expires_on {expires_on} is the upstream token's exp {exp}"
    );

    let response = h.get("/.obo/validate", Some(&caller)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
    let claims = &response.json::<Value>().await.expect("validate JSON")["claims"];
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["scp"], "access_as_user");
    assert_eq!(claims["aud"], format!("api://{DEFAULT_CLIENT_ID}"));
    assert_eq!(h.get("/.obo/validate", None).await.status(), 401);

    assert_eq!(
        h.get("/.obo/authorization-header/app", Some(&caller))
            .await
            .status(),
        404,
        "an app token is never handed to a caller"
    );
    assert_eq!(
        h.get("/.obo/authorization-header/nonexistent", Some(&caller))
            .await
            .status(),
        404
    );

    let unscoped = h.token("bob", "something_else");
    let proxied = h.get("/obo/x", Some(&unscoped)).await;
    let api = h
        .get("/.obo/authorization-header/obo", Some(&unscoped))
        .await;
    assert_eq!(proxied.status(), 403);
    assert_eq!(api.status(), 403);
    assert_eq!(
        proxied.headers()[header::WWW_AUTHENTICATE],
        api.headers()[header::WWW_AUTHENTICATE]
    );
    let problem = |body: Value| {
        (
            body["type"].clone(),
            body["title"].clone(),
            body["status"].clone(),
        )
    };
    assert_eq!(
        problem(proxied.json().await.expect("problem")),
        problem(api.json().await.expect("problem"))
    );
    assert_eq!(
        h.idp.token_requests(),
        1,
        "a refused caller causes no exchange"
    );
}

/// A renewed listener certificate (the files rewritten in place) is served to new connections without a
/// restart; connections made before keep working.
#[tokio::test]
async fn renewed_listener_certificate_is_served_without_restart() {
    let dir = support::temp_dir("tls-reload");
    let old_ca = Pki::new(&dir, "old");
    let new_ca = Pki::new(&dir, "new");
    let (cert_file, key_file) = old_ca.server_files("listener");
    let h = Harness::start_custom(|idp, upstream| {
        inbound_with_listen(
            idp,
            &format!(
                "tls = {{ cert_file = \"{}\", key_file = \"{}\" }}",
                cert_file.display(),
                key_file.display()
            ),
        ) + &identity(idp, &env_secret())
            + &obo_route("r", "/r/", &format!("{upstream}/"), "")
    })
    .await;
    let caller = h.token("alice", "access_as_user");
    let old_client = old_ca.client_config(&[b"http/1.1"], None);
    let new_client = new_ca.client_config(&[b"http/1.1"], None);
    let (status, _) = get_over_tls(
        h.sidecar.proxy_addr,
        Arc::clone(&old_client),
        "/r/x",
        &caller,
    )
    .await
    .expect("the first certificate is served");
    assert_eq!(status, 200);
    assert!(
        get_over_tls(
            h.sidecar.proxy_addr,
            Arc::clone(&new_client),
            "/r/x",
            &caller
        )
        .await
        .is_err()
    );

    let (renewed_cert, renewed_key) = new_ca.server_files("renewed");
    std::fs::copy(&renewed_key, &key_file).expect("renew key");
    std::fs::copy(&renewed_cert, &cert_file).expect("renew certificate");
    let mut served = None;
    for _ in 0..60 {
        if let Ok((status, _)) = get_over_tls(
            h.sidecar.proxy_addr,
            Arc::clone(&new_client),
            "/r/x",
            &caller,
        )
        .await
        {
            served = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        served,
        Some(StatusCode::OK),
        "the renewed certificate is picked up (checked about once a second)"
    );
    assert!(
        get_over_tls(h.sidecar.proxy_addr, old_client, "/r/x", &caller)
            .await
            .is_err(),
        "the old certificate is no longer served"
    );
}
