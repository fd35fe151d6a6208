//! The upstream request: path normalization and mapping (SPEC §4), header hygiene (hop-by-hop headers of
//! RFC 9110 §7.6.1 and those named in `Connection`, spoofable forwarding headers), the `Authorization` swap,
//! and the pooled client that streams bodies both ways.

use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};

use crate::config::Route;
use crate::error::ProxyError;

/// The pooled HTTP/1.1 client to upstreams.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Incoming>;

/// Idle upstream connections are kept this long for reuse; below common upstream keep-alive timeouts
/// (nginx 75 s, Node 5 s is the outlier and answers with a clean close).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One pooled client per route, built from its `http2`, `connect_timeout` and `ca_file`.
pub struct UpstreamClients {
    by_route: std::collections::HashMap<String, UpstreamClient>,
}

impl UpstreamClients {
    pub fn new(routes: &[Route]) -> Result<Self, crate::tls::TlsError> {
        let mut by_route = std::collections::HashMap::new();
        for route in routes {
            let roots: Vec<&std::path::Path> = route
                .ca_file
                .iter()
                .map(std::path::PathBuf::as_path)
                .collect();
            let tls = crate::tls::client_config(&roots)?;
            by_route.insert(route.name.clone(), upstream_client(tls, route));
        }
        Ok(UpstreamClients { by_route })
    }

    pub fn get(&self, route: &Route) -> Option<&UpstreamClient> {
        self.by_route.get(&route.name)
    }
}

/// The upstream client of `route` over `tls`: HTTP/1.1, or with `http2` HTTP/2 (prior knowledge for
/// `http://`, ALPN for `https://`).
fn upstream_client(tls: rustls::ClientConfig, route: &Route) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(route.connect_timeout));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let https = if route.http2 {
        builder.enable_all_versions().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    };
    let mut client = Client::builder(TokioExecutor::new());
    client
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .timer(hyper_util::rt::TokioTimer::new());
    if route.http2 && route.upstream.scheme() == "http" {
        client.http2_only(true);
    }
    client.build(https)
}

/// RFC 3986 `pchar` plus `/` pass; every other byte, and `%` itself, is percent-encoded.
const PATH_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'!')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b';')
    .remove(b'=')
    .remove(b':')
    .remove(b'@')
    .remove(b'/');

/// The request path, percent-decoded once and normalized: `.` and `..` resolved, `//` merged, a trailing
/// `/` kept. Refuses an encoded `/` or `\`, a raw `\`, a NUL, malformed escapes and a `..` above the root.
pub fn normalize_path(raw: &str) -> Result<Vec<u8>, ProxyError> {
    if !raw.starts_with('/') {
        return Err(ProxyError::BadRequest(
            "request target is not an absolute path",
        ));
    }
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(ProxyError::BadRequest("malformed percent-encoding in path"));
                };
                // Two hex digits fit a byte.
                let byte = u8::try_from(hi * 16 + lo)
                    .map_err(|_| ProxyError::BadRequest("malformed percent-encoding in path"))?;
                match byte {
                    b'/' | b'\\' => {
                        return Err(ProxyError::BadRequest("encoded '/' or '\\' in path"));
                    }
                    0 => return Err(ProxyError::BadRequest("NUL in path")),
                    _ => decoded.push(byte),
                }
                i += 3;
            }
            b'\\' => return Err(ProxyError::BadRequest("'\\' in path")),
            0 => return Err(ProxyError::BadRequest("NUL in path")),
            _ => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut trailing = false;
    for segment in decoded[1..].split(|b| *b == b'/') {
        trailing = matches!(segment, b"" | b"." | b"..");
        match segment {
            b"" | b"." => {}
            b".." => {
                if segments.pop().is_none() {
                    return Err(ProxyError::BadRequest("path climbs above the root"));
                }
            }
            other => segments.push(other),
        }
    }
    let mut path = Vec::with_capacity(decoded.len());
    for segment in &segments {
        path.push(b'/');
        path.extend_from_slice(segment);
    }
    if path.is_empty() || trailing {
        path.push(b'/');
    }
    Ok(path)
}

/// Whether `prefix` (normalized, no trailing `/`) matches `path` at a segment boundary.
pub fn prefix_matches(prefix: &str, path: &[u8]) -> bool {
    let prefix = prefix.as_bytes();
    path.starts_with(prefix) && (path.len() == prefix.len() || path[prefix.len()] == b'/')
}

/// The upstream URI: the route's prefix replaced by the upstream URL's path, the remainder re-encoded,
/// the query passed on unchanged.
pub fn upstream_uri(route: &Route, path: &[u8], query: Option<&str>) -> Result<Uri, ProxyError> {
    let remainder = &path[route.match_prefix.len()..];
    let base = route.upstream.path();
    let mut target =
        String::with_capacity(base.len() + remainder.len() + query.map_or(0, str::len) + 1);
    if remainder.is_empty() {
        target.push_str(base);
    } else {
        target.push_str(base.trim_end_matches('/'));
        target.extend(percent_encoding::percent_encode(remainder, PATH_ENCODE));
    }
    if let Some(query) = query {
        target.push('?');
        target.push_str(query);
    }
    let authority = &route.upstream[url::Position::BeforeHost..url::Position::AfterPort];
    Uri::builder()
        .scheme(route.upstream.scheme())
        .authority(authority)
        .path_and_query(target)
        .build()
        .map_err(|_| ProxyError::BadRequest("request path cannot be forwarded"))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and others never forwarded in either direction.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "trailer",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Request headers the sidecar sets itself or must not trust from the caller.
const CALLER_NEVER: &[&str] = &[
    "authorization",
    "host",
    "forwarded",
    "x-real-ip",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// Whether the sidecar owns request header `name` (lowercase): hop-by-hop, set by the sidecar itself, or
/// never trusted from the caller. `forward_claims` may not name one (`_` read as `-`).
pub fn sidecar_owns(name: &str) -> bool {
    let name = name.replace('_', "-");
    let name = name.as_str();
    HOP_BY_HOP.contains(&name)
        || CALLER_NEVER.contains(&name)
        || matches!(name, "x-request-id" | "content-length")
}

/// `X_Forwarded-For` and `x-forwarded-for` are the same header to many upstream frameworks (CGI maps `-`
/// to `_`): compare names with `_` read as `-`.
fn canonical(name: &HeaderName) -> std::borrow::Cow<'_, str> {
    let s = name.as_str();
    if s.contains('_') {
        std::borrow::Cow::Owned(s.replace('_', "-"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// Removes hop-by-hop headers, those named in `Connection`, and `extra` names, matching `_`/`-` variants.
fn strip<S: AsRef<str>>(headers: &mut HeaderMap, extra: &[S], keep_te_trailers: bool) {
    let mut named: Vec<String> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        // Byte-wise: one non-ASCII byte must not hide the other names in the list.
        for name in value.as_bytes().split(|b| *b == b',') {
            let name = String::from_utf8_lossy(name)
                .trim()
                .to_ascii_lowercase()
                .replace('_', "-");
            if !name.is_empty() {
                named.push(name);
            }
        }
    }
    let te_trailers = keep_te_trailers
        && headers.get_all(header::TE).iter().all(|v| {
            v.to_str()
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case("trailers"))
        })
        && headers.contains_key(header::TE);
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let c = canonical(name);
            let c = c.as_ref();
            if c == "te" && te_trailers {
                return false;
            }
            HOP_BY_HOP.contains(&c)
                || extra.iter().any(|e| e.as_ref() == c)
                || named.iter().any(|n| n == c)
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(&name);
    }
}

/// What the upstream request carries besides the caller's request.
pub struct Outgoing<'a> {
    pub uri: Uri,
    pub peer: crate::server::Peer,
    pub route: &'a Route,
    /// `Authorization` to send (`None`: none).
    pub authorization: Option<HeaderValue>,
    /// `forward_claims` headers to set.
    pub claim_headers: Vec<(HeaderName, HeaderValue)>,
    pub request_id: HeaderValue,
    /// An accepted `Upgrade` keeps `Connection: upgrade` and `Upgrade`.
    pub upgrade: Option<HeaderValue>,
    /// The route's [`request_strip_list`], computed once per configuration.
    pub strip: &'a [String],
}

/// Every request header name (canonical: lowercase, `_` read as `-`) never forwarded on `route`: the
/// spoofable and sidecar-owned headers, the route's `forward_claims` targets and `remove_request_headers`.
pub fn request_strip_list(route: &Route) -> Vec<String> {
    let mut names: Vec<String> = CALLER_NEVER.iter().map(|n| (*n).to_owned()).collect();
    names.push("x-request-id".to_owned());
    names.extend(
        route
            .forward_claims
            .iter()
            .map(|(name, _)| name.as_str().replace('_', "-")),
    );
    names.extend(route.remove_request_headers.iter().cloned());
    names
}

/// Turns the caller's request into the upstream request: new URI, clean headers (hop-by-hop, proxy
/// credentials, spoofable forwarding headers, the route's `remove_request_headers` and every spelling of its
/// `forward_claims` names), `X-Forwarded-*` and `X-Request-Id` set, `Authorization` replaced (or removed).
pub fn upstream_request(mut request: Request<Incoming>, out: Outgoing<'_>) -> Request<Incoming> {
    let original_host = request.headers().get(header::HOST).cloned().or_else(|| {
        request
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    *request.uri_mut() = out.uri;
    *request.version_mut() = http::Version::HTTP_11;
    let headers = request.headers_mut();
    let route = out.route;
    strip(headers, out.strip, true);
    if route.preserve_host
        && let Some(host) = &original_host
    {
        headers.insert(header::HOST, host.clone());
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-for"),
        HeaderValue::from_str(&out.peer.remote.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
    );
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(if out.peer.tls { "https" } else { "http" }),
    );
    if let Some(host) = original_host {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host);
    }
    headers.insert(HeaderName::from_static("x-request-id"), out.request_id);
    for (name, value) in out.claim_headers {
        headers.insert(name, value);
    }
    if let Some(value) = out.authorization {
        headers.insert(header::AUTHORIZATION, value);
    }
    if let Some(protocol) = out.upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
    request
}

/// Cleans the upstream's response headers before they go back to the caller; a `101 Switching Protocols`
/// keeps `Connection: upgrade` and `Upgrade`.
pub fn clean_response_headers(headers: &mut HeaderMap, upgraded: bool) {
    let upgrade = upgraded
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    strip::<&str>(headers, &[], false);
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
}

/// The WebSocket upgrade an HTTP/1.1 request asks for (`Connection: upgrade` + `Upgrade: websocket`).
/// Other protocols (`h2c`, custom ones) are not tunnelled: inside a tunnel later requests would skip routing,
/// policy and header hygiene.
pub fn requested_upgrade(request: &Request<Incoming>) -> Option<HeaderValue> {
    if request.version() != http::Version::HTTP_11
        || !request
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
    {
        return None;
    }
    let asks = request
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| {
            v.as_bytes().split(|b| *b == b',').any(|token| {
                String::from_utf8_lossy(token)
                    .trim()
                    .eq_ignore_ascii_case("upgrade")
            })
        });
    asks.then(|| request.headers().get(header::UPGRADE).cloned())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, u16> {
        normalize_path(p)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .map_err(|e| e.status().as_u16())
    }

    #[test]
    fn paths_normalize_per_spec() {
        assert_eq!(norm("/graph/v1.0/me"), Ok("/graph/v1.0/me".into()));
        assert_eq!(norm("//graph///x"), Ok("/graph/x".into()));
        assert_eq!(norm("/a/./b/../c/"), Ok("/a/c/".into()));
        assert_eq!(norm("/a/b/.."), Ok("/a/".into()));
        assert_eq!(norm("/a/%2e%2e/b"), Ok("/b".into()));
        assert_eq!(norm("/graph/%252e%252e/x"), Ok("/graph/%2e%2e/x".into()));
        assert_eq!(norm("/"), Ok("/".into()));
        assert_eq!(norm("/%41"), Ok("/A".into()));
    }

    #[test]
    fn dangerous_paths_are_400() {
        for p in [
            "/a%2Fb", "/a%2fb", "/a%5Cb", "/a\\b", "/a%00", "/..", "/a/../..", "/%zz", "/%4", "*",
        ] {
            assert_eq!(norm(p), Err(400), "{p}");
        }
    }

    #[test]
    fn prefixes_match_at_segment_boundaries() {
        assert!(prefix_matches("/graph", b"/graph"));
        assert!(prefix_matches("/graph", b"/graph/x"));
        assert!(!prefix_matches("/graph", b"/graphql"));
        assert!(prefix_matches("", b"/anything"));
    }

    fn route(prefix: &str, upstream: &str) -> Route {
        Route::for_tests(prefix, upstream, crate::config::TokenKind::None)
    }

    #[test]
    fn prefix_is_replaced_by_upstream_path_and_remainder_reencoded() {
        let r = route("/graph/", "https://graph.example.com/");
        let uri = |p: &str, q| {
            upstream_uri(&r, &normalize_path(p).expect("path"), q)
                .expect("uri")
                .to_string()
        };
        assert_eq!(
            uri("/graph/v1.0/me", Some("a=1&b")),
            "https://graph.example.com/v1.0/me?a=1&b"
        );
        assert_eq!(uri("/graph", None), "https://graph.example.com/");
        assert_eq!(
            uri("/graph/%252e%252e/x", None),
            "https://graph.example.com/%252e%252e/x"
        );
        assert_eq!(uri("/graph/a%20b", None), "https://graph.example.com/a%20b");
        let r = route("/api", "http://127.0.0.1:8080/base/");
        let uri = |p: &str| {
            upstream_uri(&r, &normalize_path(p).expect("path"), None)
                .expect("uri")
                .to_string()
        };
        assert_eq!(uri("/api/x"), "http://127.0.0.1:8080/base/x");
        assert_eq!(uri("/api"), "http://127.0.0.1:8080/base/");
    }

    #[test]
    fn hop_by_hop_connection_named_and_spoofable_headers_are_stripped() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("connection", "close, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x_forwarded_for", "6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
            ("proxy-authorization", "Basic x"),
            ("te", "trailers"),
            ("accept", "application/json"),
        ] {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_static(v),
            );
        }
        h.append(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-other, \xff").expect("obs-text"),
        );
        h.insert(
            HeaderName::from_static("x-other"),
            HeaderValue::from_static("1"),
        );
        strip(&mut h, CALLER_NEVER, true);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["accept", "te"]);
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip::<&str>(&mut h, &[], true);
        assert!(h.is_empty());
    }

    mod no_panic {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any request path: normalization answers, never panics; what it accepts is absolute, has no
            /// empty, `.` or `..` segment, and maps to a valid upstream URI under every prefix.
            #[test]
            fn normalization_and_mapping_never_panic(
                path in "(/|%2[eEfF]|%5[cC]|%00|%[0-9a-fA-F]{2}|\\.\\.?|[a-z;=]{1,3}|//){0,12}",
                prefix in prop_oneof![Just("/"), Just("/a"), Just("/a/b/"), Just("/.x")],
                query in proptest::option::of("[a-z=&%0-9]{0,12}"),
            ) {
                if let Ok(normalized) = normalize_path(&path) {
                    prop_assert!(normalized.starts_with(b"/"));
                    let text = String::from_utf8_lossy(&normalized).into_owned();
                    prop_assert!(!text.contains("//"));
                    prop_assert!(text.split('/').all(|s| s != "." && s != ".."));
                    let r = route(prefix, "http://127.0.0.1:1/base/");
                    if prefix_matches(&r.match_prefix, &normalized) {
                        let uri = upstream_uri(&r, &normalized, query.as_deref());
                        prop_assert!(uri.is_ok() || query.is_some());
                    }
                }
            }
        }
    }
}
