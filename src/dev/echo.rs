//! The echo upstream for `obo-sidecar demo` and the tests: an HTTP/1.1 and HTTP/2 (h2c prior knowledge, or
//! ALPN over TLS with [`EchoUpstream::start_tls`]) server that answers every request with what it received
//! (method, URI, HTTP version, headers, the unverified claims of the bearer token, the body size), so a test
//! can see exactly what the sidecar forwarded upstream. Not for production.
//!
//! Request headers steer it: `x-echo-delay-ms: N` waits N ms first (a slow upstream), `x-echo-status: NNN`
//! answers that status, and `x-echo-body: stream` streams the request body straight back without buffering it.
//!
//! A WebSocket handshake (`Connection: upgrade`, `Upgrade: websocket`, RFC 6455 §4.2.2) is accepted with
//! `101 Switching Protocols`, `x-echo-authorization-sub`/`-aud` naming the bearer token seen at the handshake;
//! after it every byte read is written back verbatim until EOF (frames are not parsed).

use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Sleep this many milliseconds before answering.
const DELAY_HEADER: &str = "x-echo-delay-ms";
/// Answer this status code instead of echoing.
const STATUS_HEADER: &str = "x-echo-status";
/// `stream`: send the request body back as the response body.
const BODY_HEADER: &str = "x-echo-body";
/// The `sub` claim of the bearer token seen at a WebSocket handshake (on the `101`).
const UPGRADE_SUB_HEADER: &str = "x-echo-authorization-sub";
/// The `aud` claim of the bearer token seen at a WebSocket handshake (on the `101`).
const UPGRADE_AUD_HEADER: &str = "x-echo-authorization-aud";
/// RFC 6455 §1.3: appended to `Sec-WebSocket-Key` before hashing into `Sec-WebSocket-Accept`.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

type Body = BoxBody<Bytes, hyper::Error>;

/// A running echo upstream. Dropping the handle stops the server and every connection it serves.
pub struct EchoUpstream {
    addr: SocketAddr,
    tls: bool,
    requests: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl fmt::Debug for EchoUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EchoUpstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EchoUpstream {
    /// Serves the echo upstream on `listener` until the handle is dropped.
    // `async` like `DevIdp::start`, so callers start every test server the same way.
    #[allow(clippy::unused_async)]
    pub async fn start(listener: TcpListener) -> std::io::Result<EchoUpstream> {
        Self::spawn(listener, None)
    }

    /// Serves the echo upstream over TLS with `tls` (its `alpn_protocols` decide whether `h2` is offered)
    /// until the handle is dropped.
    #[allow(clippy::unused_async)]
    pub async fn start_tls(
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<EchoUpstream> {
        Self::spawn(listener, Some(tls))
    }

    fn spawn(
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<EchoUpstream> {
        let addr = listener.local_addr()?;
        let requests = Arc::new(AtomicU64::new(0));
        let secure = tls.is_some();
        let counted = Arc::clone(&requests);
        let task = crate::dev::serve::spawn_server(listener, "echo", tls, move |request| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, Infallible>(echo(request).await) }
        });
        Ok(EchoUpstream {
            addr,
            tls: secure,
            requests,
            task,
        })
    }

    /// The address the upstream listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (`https://` when started with TLS), no trailing slash.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// How many requests the upstream has received.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let full = Full::new(Bytes::from(body.to_string())).map_err(|never| match never {});
    let mut response = Response::new(full.boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn header_str<'a>(request: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    request
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
}

async fn echo(request: Request<Incoming>) -> Response<Body> {
    if crate::forward::requested_upgrade(&request).is_some() {
        return upgrade(request);
    }
    if let Some(delay) = header_str(&request, DELAY_HEADER) {
        match delay.parse::<u64>() {
            Ok(millis) => tokio::time::sleep(Duration::from_millis(millis)).await,
            Err(_) => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": format!("{DELAY_HEADER} must be a number of milliseconds")}),
                );
            }
        }
    }
    if let Some(status) = header_str(&request, STATUS_HEADER) {
        return match status
            .parse::<u16>()
            .ok()
            .and_then(|code| StatusCode::from_u16(code).ok())
        {
            Some(status) => json_response(status, &json!({"status": status.as_u16()})),
            None => json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": format!("{STATUS_HEADER} must be a status code 100-999")}),
            ),
        };
    }
    if header_str(&request, BODY_HEADER).is_some_and(|mode| mode.eq_ignore_ascii_case("stream")) {
        let content_type = request.headers().get(header::CONTENT_TYPE).cloned();
        let mut response = Response::new(request.into_body().boxed());
        if let Some(content_type) = content_type {
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, content_type);
        }
        return response;
    }

    let (parts, mut body) = request.into_parts();
    let headers: Vec<Value> = parts
        .headers
        .iter()
        .map(|(name, value)| json!([name.as_str(), String::from_utf8_lossy(value.as_bytes())]))
        .collect();
    let authorization = parts
        .headers
        .get(header::AUTHORIZATION)
        .map(|value| authorization(&String::from_utf8_lossy(value.as_bytes())));
    let uri = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.to_string(), |path| path.as_str().to_owned());
    let mut body_bytes: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    body_bytes += data.len() as u64;
                }
            }
            Err(error) => {
                tracing::debug!(%error, "echo upstream could not read a request body");
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": "the request body could not be read", "body_bytes": body_bytes}),
                );
            }
        }
    }
    json_response(
        StatusCode::OK,
        &json!({
            "method": parts.method.as_str(),
            "uri": uri,
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "authorization": authorization,
            "body_bytes": body_bytes,
        }),
    )
}

/// `Sec-WebSocket-Accept` for `key` (RFC 6455 §4.2.2): base64 of the SHA-1 of the key and the GUID.
fn websocket_accept(key: &str) -> String {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{WEBSOCKET_GUID}").as_bytes(),
    );
    STANDARD.encode(digest.as_ref())
}

/// Accepts a WebSocket handshake with `101`, then echoes every byte of the upgraded connection until EOF.
fn upgrade(mut request: Request<Incoming>) -> Response<Body> {
    let Some(key) = header_str(&request, "sec-websocket-key").map(str::to_owned) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "a WebSocket handshake needs Sec-WebSocket-Key"}),
        );
    };
    let claims = request
        .headers()
        .get(header::AUTHORIZATION)
        .map_or(Value::Null, |value| {
            authorization(&String::from_utf8_lossy(value.as_bytes()))["claims"].clone()
        });
    let upgraded = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgraded.await {
            Ok(upgraded) => {
                if let Err(error) = echo_bytes(TokioIo::new(upgraded)).await {
                    tracing::debug!(%error, "echo upstream upgraded connection failed");
                }
            }
            Err(error) => tracing::debug!(%error, "echo upstream upgrade failed"),
        }
    });
    let mut response = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&websocket_accept(&key)) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    for (name, claim) in [(UPGRADE_SUB_HEADER, "sub"), (UPGRADE_AUD_HEADER, "aud")] {
        let value = match &claims[claim] {
            Value::String(text) => HeaderValue::from_str(text).ok(),
            Value::Null => None,
            other => HeaderValue::from_str(&other.to_string()).ok(),
        };
        if let Some(value) = value {
            headers.insert(name, value);
        }
    }
    response
}

/// Writes back every byte read from `io` until EOF, then closes the write side.
async fn echo_bytes<I: AsyncRead + AsyncWrite + Unpin>(mut io: I) -> std::io::Result<()> {
    let mut buffer = vec![0_u8; 16 * 1024];
    loop {
        let n = io.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        io.write_all(&buffer[..n]).await?;
        io.flush().await?;
    }
    io.shutdown().await
}

/// `{"scheme": .., "claims": ..}` for an `Authorization` value: the claims are the base64url-decoded JSON
/// payload of a bearer JWT, unverified, or `null` when the scheme is not Bearer or the token is not a JWT.
fn authorization(value: &str) -> Value {
    let value = value.trim();
    let (scheme, credentials) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return json!({"scheme": scheme, "claims": null});
    }
    json!({"scheme": "Bearer", "claims": jwt_claims(credentials.trim()).unwrap_or(Value::Null)})
}

fn jwt_claims(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    async fn upstream() -> EchoUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        EchoUpstream::start(listener).await.unwrap()
    }

    #[tokio::test]
    async fn plain_request_is_echoed_with_bearer_claims() {
        let upstream = upstream().await;
        assert!(upstream.url().starts_with("http://127.0.0.1:"));
        let payload = URL_SAFE_NO_PAD.encode(r#"{"sub":"alice","aud":"api://down"}"#);
        let response = reqwest::Client::new()
            .put(format!("{}/a/b?x=1&y=%20", upstream.url()))
            .header(
                header::AUTHORIZATION,
                format!("Bearer eyJhbGciOiJub25lIn0.{payload}.sig"),
            )
            .header("x-first", "1")
            .header("x-bytes", HeaderValue::from_bytes(b"caf\xe9").unwrap())
            .body("hello")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["method"], "PUT");
        assert_eq!(body["uri"], "/a/b?x=1&y=%20");
        assert_eq!(body["body_bytes"], 5);
        assert_eq!(body["authorization"]["scheme"], "Bearer");
        assert_eq!(
            body["authorization"]["claims"],
            json!({"sub": "alice", "aud": "api://down"})
        );
        let headers = body["headers"].as_array().unwrap();
        assert!(headers.contains(&json!(["x-first", "1"])));
        assert!(headers.contains(&json!(["x-bytes", "caf\u{fffd}"])));
        assert_eq!(upstream.requests(), 1);
    }

    #[tokio::test]
    async fn missing_or_opaque_authorization_is_reported() {
        let upstream = upstream().await;
        let client = reqwest::Client::new();
        let body: Value = client
            .get(upstream.url())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["authorization"], Value::Null);
        assert_eq!(body["uri"], "/");
        for (value, scheme) in [
            ("Bearer opaque", "Bearer"),
            ("Bearer a.!!!.c", "Bearer"),
            ("Basic Zm9vOmJhcg==", "Basic"),
        ] {
            let body: Value = client
                .get(upstream.url())
                .header(header::AUTHORIZATION, value)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(
                body["authorization"],
                json!({"scheme": scheme, "claims": null}),
                "{value}"
            );
        }
        assert_eq!(upstream.requests(), 4);
    }

    #[tokio::test]
    async fn status_header_sets_the_status() {
        let upstream = upstream().await;
        let client = reqwest::Client::new();
        let response = client
            .get(upstream.url())
            .header(STATUS_HEADER, "503")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body, json!({"status": 503}));
        let response = client
            .get(upstream.url())
            .header(STATUS_HEADER, "abc")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn stream_header_sends_the_body_back() {
        let upstream = upstream().await;
        let sent: Vec<u8> = (0..8 * 1024 * 1024_u32).map(|i| (i % 251) as u8).collect();
        let response = reqwest::Client::new()
            .post(upstream.url())
            .header(BODY_HEADER, "stream")
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(sent.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/octet-stream"
        );
        let received = response.bytes().await.unwrap();
        assert_eq!(received.len(), sent.len());
        assert!(received == sent);
    }

    #[tokio::test]
    async fn large_body_is_counted() {
        let upstream = upstream().await;
        let body: Value = reqwest::Client::new()
            .post(upstream.url())
            .body(vec![7_u8; 3 * 1024 * 1024 + 1])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["body_bytes"], 3 * 1024 * 1024 + 1);
    }

    #[test]
    fn websocket_accept_matches_rfc_6455_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test]
    async fn http1_and_h2c_requests_report_their_version() {
        let upstream = upstream().await;
        let body: Value = reqwest::Client::new()
            .get(upstream.url())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["version"], "HTTP/1.1");

        let stream = tokio::net::TcpStream::connect(upstream.addr())
            .await
            .unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(connection);
        let request = Request::get(format!("{}/h2?x=1", upstream.url()))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["version"], "HTTP/2.0");
        assert_eq!(body["uri"], "/h2?x=1");
    }

    #[tokio::test]
    async fn websocket_handshake_is_accepted_and_bytes_are_echoed() {
        let upstream = upstream().await;
        let payload = URL_SAFE_NO_PAD.encode(r#"{"sub":"alice","aud":"api://down"}"#);
        let mut stream = tokio::net::TcpStream::connect(upstream.addr())
            .await
            .unwrap();
        let handshake = format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Authorization: Bearer eyJhbGciOiJub25lIn0.{payload}.sig\r\n\r\n"
        );
        stream.write_all(handshake.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0_u8; 1];
            assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "EOF in the head");
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101 "), "{head}");
        assert!(head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"));
        assert!(head.contains("x-echo-authorization-sub: alice\r\n"));
        assert!(head.contains("x-echo-authorization-aud: api://down\r\n"));
        let frame = [0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
        stream.write_all(&frame).await.unwrap();
        let mut back = [0_u8; 8];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(back, frame);
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn delay_header_delays_the_answer() {
        let upstream = upstream().await;
        let started = std::time::Instant::now();
        let response = reqwest::Client::new()
            .get(upstream.url())
            .header(DELAY_HEADER, "150")
            .header(STATUS_HEADER, "204")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert!(started.elapsed() >= Duration::from_millis(150));
    }
}
