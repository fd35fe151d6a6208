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
use crate::route::RequestPath;

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

/// The upstream URI: the route's prefix (its first `prefix_segments` segments) replaced by the upstream URL's
/// path, the rest of the normalized path re-encoded, the query passed on unchanged.
pub fn upstream_uri(
    route: &Route,
    path: &RequestPath,
    prefix_segments: usize,
    query: Option<&str>,
) -> Result<Uri, ProxyError> {
    let remainder = path.after(prefix_segments);
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
    "x-request-id",
];

/// Request headers that make an upstream framework rewrite the request after the sidecar's policy check
/// (SPEC §4): a method override turns an allowed `GET` into a `DELETE` (ASP.NET Core, Express, Rails,
/// Laravel), `X-Original-URL`/`X-Rewrite-URL` re-route it (IIS URL Rewrite, Symfony, older Spring), and the
/// `X-Forwarded-*` variants below change the scheme, port or base path an upstream believes it was called
/// with (Spring's `ForwardedHeaderFilter`, ASP.NET Core `UsePathBase`, Tomcat's `RemoteIpValve`). The SPEC
/// list, then the names the ingresses of SPEC §16 and other proxies use for the same thing.
const REWRITING: &[&str] = &[
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
    "x-forwarded-prefix",
    "x-forwarded-port",
    "x-forwarded-server",
    "x-forwarded-ssl",
    "front-end-https",
    "x-original-uri",
    "x-original-method",
    "x-original-host",
    "x-forwarded-uri",
    "x-forwarded-path",
    "x-forwarded-method",
    "x-forwarded-scheme",
    "x-forwarded-protocol",
    "x-url-scheme",
];

/// Whether the sidecar owns request header `name` (lowercase): hop-by-hop, set by the sidecar itself, never
/// trusted from the caller, or able to rewrite the request upstream. `forward_claims` may not name one (`_`
/// read as `-`).
pub fn sidecar_owns(name: &str) -> bool {
    let name = name.replace('_', "-");
    let name = name.as_str();
    HOP_BY_HOP.contains(&name)
        || CALLER_NEVER.contains(&name)
        || REWRITING.contains(&name)
        || name == "content-length"
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
/// spoofable, request-rewriting and sidecar-owned headers, the route's `remove_request_headers`, and the
/// `forward_claims` names of **every** route (`claim_names`): an upstream may trust a claim header only if no
/// caller can send it on any route, a catch-all included.
pub fn request_strip_list(route: &Route, claim_names: &[String]) -> Vec<String> {
    let mut names: Vec<String> = CALLER_NEVER
        .iter()
        .chain(REWRITING)
        .map(|n| (*n).to_owned())
        .collect();
    names.extend(claim_names.iter().cloned());
    names.extend(route.remove_request_headers.iter().cloned());
    names.sort_unstable();
    names.dedup();
    names
}

/// The `forward_claims` header names of every route, canonical (lowercase, `_` read as `-`).
pub fn claim_header_names(routes: &[Route]) -> Vec<String> {
    let mut names: Vec<String> = routes
        .iter()
        .flat_map(|r| &r.forward_claims)
        .map(|(name, _)| name.as_str().replace('_', "-"))
        .collect();
    names.sort_unstable();
    names.dedup();
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
    use crate::route::Prefix;

    fn route(prefix: &str, upstream: &str) -> Route {
        Route::for_tests(prefix, upstream, crate::config::TokenKind::None)
    }

    fn mapped(r: &Route, p: &str, q: Option<&str>) -> String {
        let prefix = Prefix::new(&r.match_prefix);
        let path = RequestPath::parse(p).expect("path");
        assert!(prefix.matches(&path), "{p}");
        upstream_uri(r, &path, prefix.len(), q)
            .expect("uri")
            .to_string()
    }

    #[test]
    fn prefix_is_replaced_by_upstream_path_and_remainder_reencoded() {
        let r = route("/graph/", "https://graph.example.com/");
        assert_eq!(
            mapped(&r, "/graph/v1.0/me", Some("a=1&b")),
            "https://graph.example.com/v1.0/me?a=1&b"
        );
        assert_eq!(mapped(&r, "/graph", None), "https://graph.example.com/");
        assert_eq!(
            mapped(&r, "/graph/%252e%252e/x", None),
            "https://graph.example.com/%252e%252e/x"
        );
        assert_eq!(
            mapped(&r, "/graph/a%20b", None),
            "https://graph.example.com/a%20b"
        );
        // Case and the prefix's parameters go with the prefix; the rest keeps its parameters.
        assert_eq!(
            mapped(&r, "/GRAPH;v=1/me;x=2", None),
            "https://graph.example.com/me;x=2"
        );
        let r = route("/api", "http://127.0.0.1:8080/base/");
        assert_eq!(mapped(&r, "/api/x", None), "http://127.0.0.1:8080/base/x");
        assert_eq!(mapped(&r, "/api", None), "http://127.0.0.1:8080/base/");
        assert_eq!(
            mapped(&r, "/api/a%3Bb/x", None),
            "http://127.0.0.1:8080/base/a;b/x"
        );
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
            ("x-http-method-override", "DELETE"),
            ("x_original_url", "/admin"),
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
        let list = request_strip_list(&route("/", "http://127.0.0.1/"), &[]);
        strip(&mut h, &list, true);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["accept", "te"]);
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip::<&str>(&mut h, &[], true);
        assert!(h.is_empty());
    }

    #[test]
    fn every_routes_claim_headers_are_stripped_on_every_route() {
        let mut claims = route("/legacy/", "http://127.0.0.1/");
        claims.forward_claims = vec![(
            HeaderName::from_static("x-caller-roles"),
            "roles".to_owned(),
        )];
        let other = route("/", "http://127.0.0.1/");
        let names = claim_header_names(&[claims, other.clone()]);
        let mut h = HeaderMap::new();
        h.insert("X-Caller-Roles", HeaderValue::from_static("Admin"));
        h.insert("x_caller_roles", HeaderValue::from_static("Admin"));
        strip(&mut h, &request_strip_list(&other, &names), true);
        assert!(h.is_empty(), "{h:?}");
    }

    mod no_panic {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any request path: what normalization accepts maps to a valid upstream URI under every
            /// prefix it matches.
            #[test]
            fn mapping_never_panics(
                path in "(/|%2[eEfF]|%3[bB]|%[0-9a-fA-F]{2}|\\.\\.?|[a-zA-Z;=]{1,3}|//){0,12}",
                prefix in prop_oneof![Just("/"), Just("/a"), Just("/a/b/"), Just("/.x")],
                query in proptest::option::of("[a-z=&%0-9]{0,12}"),
            ) {
                if let Ok(normalized) = RequestPath::parse(&path) {
                    let r = route(prefix, "http://127.0.0.1:1/base/");
                    let prefix = Prefix::new(&r.match_prefix);
                    if prefix.matches(&normalized) {
                        let uri = upstream_uri(&r, &normalized, prefix.len(), query.as_deref());
                        prop_assert!(uri.is_ok() || query.is_some());
                    }
                }
            }
        }
    }
}
