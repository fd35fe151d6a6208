//! Header hygiene on the way to the upstream and back (SPEC §4): hop-by-hop headers (RFC 9110 §7.6.1) and
//! those named in `Connection`, the headers the sidecar owns ([`crate::headers`]), each route's
//! `remove_request_headers` and every route's `forward_claims` names; `X-Forwarded-*` and `X-Request-Id`
//! set; the `Authorization` swap.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri};
use hyper::body::Incoming;

use crate::config::Route;
use crate::headers::{CALLER_NEVER, HOP_BY_HOP, REWRITING, canonical};

/// Removes hop-by-hop headers, those named in `Connection`, and `extra` names (canonical and sorted, as
/// [`request_strip_list`] makes them), matching `_`/`-` variants. Allocates only for a `Connection` header
/// and for the names it removes.
pub(crate) fn strip<S: AsRef<str>>(headers: &mut HeaderMap, extra: &[S], keep_te_trailers: bool) {
    debug_assert!(extra.is_sorted_by(|a, b| a.as_ref() < b.as_ref()));
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
        && headers.contains_key(header::TE)
        && headers.get_all(header::TE).iter().all(|v| {
            v.to_str()
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case("trailers"))
        });
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let c = canonical(name.as_str());
            let c = c.as_ref();
            if c == "te" && te_trailers {
                return false;
            }
            HOP_BY_HOP.contains(&c)
                || extra.binary_search_by(|e| e.as_ref().cmp(c)).is_ok()
                || named.iter().any(|n| n == c)
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(&name);
    }
}

/// What the upstream request carries besides the caller's request.
pub(crate) struct Outgoing<'a> {
    pub(crate) uri: Uri,
    pub(crate) peer: &'a crate::server::Peer,
    pub(crate) route: &'a Route,
    /// `Authorization` to send (`None`: none).
    pub(crate) authorization: Option<HeaderValue>,
    /// `forward_claims` headers to set.
    pub(crate) claim_headers: Vec<(HeaderName, HeaderValue)>,
    pub(crate) request_id: HeaderValue,
    /// An accepted `Upgrade` keeps `Connection: upgrade` and `Upgrade`.
    pub(crate) upgrade: Option<HeaderValue>,
    /// The route's [`request_strip_list`], computed once per configuration.
    pub(crate) strip: &'a [String],
}

/// Every request header name (canonical: lowercase, `_` read as `-`) never forwarded on `route`: the
/// spoofable, request-rewriting and sidecar-owned headers, the route's `remove_request_headers`, and the
/// `forward_claims` names of **every** route (`claim_names`): an upstream may trust a claim header only if no
/// caller can send it on any route, a catch-all included.
pub(crate) fn request_strip_list(route: &Route, claim_names: &[String]) -> Vec<String> {
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
pub(crate) fn claim_header_names(routes: &[Route]) -> Vec<String> {
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
pub(crate) fn upstream_request(
    mut request: Request<Incoming>,
    out: Outgoing<'_>,
) -> Request<Incoming> {
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
        out.peer.forwarded_for.clone(),
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
pub(crate) fn clean_response_headers(headers: &mut HeaderMap, upgraded: bool) {
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
pub(crate) fn requested_upgrade(request: &Request<Incoming>) -> Option<HeaderValue> {
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
