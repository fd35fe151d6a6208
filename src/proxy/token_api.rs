//! The token API (SPEC §5), under `listen.api_prefix`: `GET {prefix}/validate` and
//! `GET {prefix}/authorization-header/{route}`. What the endpoints are and how they answer; the proxy serves
//! them with its own validation, policy, cache and errors.

use bytes::Bytes;
use http::{HeaderValue, Method, Response, header};
use http_body_util::Full;

use crate::config::{CallerAuth, Config, Route, TokenKind};
use crate::error::{ProxyError, RequestDefect};
use crate::route::{Prefix, RequestPath};

/// The route label of `GET {api_prefix}/validate`; `:` cannot appear in a configured route name.
pub(super) const VALIDATE_ROUTE: &str = "token-api:validate";

/// A token API endpoint.
pub(super) enum Endpoint<'a> {
    /// `GET {prefix}/validate`: the caller's claims, validated with `[inbound]`'s policy.
    Validate,
    /// `GET {prefix}/authorization-header/{route}`: the header the route would send upstream.
    AuthorizationHeader(&'a str),
    /// `{prefix}/forward-auth/{route}[/original path]` (SPEC §16), any method: may the ingress's request
    /// pass, and with which `Authorization`. `suffix` is the original path when one follows the route name
    /// (Envoy), decoded and normalized with the whole path.
    ForwardAuth {
        route: &'a str,
        suffix: Option<RequestPath>,
    },
}

/// The endpoint a request under the API prefix asks for; anything else is 404.
pub(super) fn endpoint<'a>(
    method: &Method,
    prefix: &Prefix,
    path: &'a RequestPath,
    raw: &str,
) -> Result<Endpoint<'a>, ProxyError> {
    let mut rest = prefix.rest(path).map(|segment| segment.name);
    let first = rest.next();
    if let Some(endpoint) = first
        && endpoint.eq_ignore_ascii_case(b"forward-auth")
    {
        // Envoy's ext_authz sends the original method and appends the original path.
        let name = rest.next().ok_or(ProxyError::NoRoute)?;
        let route = std::str::from_utf8(name).map_err(|_| ProxyError::NoRoute)?;
        let suffix = appended_path(raw, prefix.len() + 2, route)?;
        return Ok(Endpoint::ForwardAuth { route, suffix });
    }
    if method != Method::GET && method != Method::HEAD {
        return Err(ProxyError::NoRoute);
    }
    match (first, rest.next(), rest.next()) {
        (Some(endpoint), None, None) if endpoint.eq_ignore_ascii_case(b"validate") => {
            Ok(Endpoint::Validate)
        }
        (Some(endpoint), Some(name), None)
            if endpoint.eq_ignore_ascii_case(b"authorization-header") =>
        {
            let name = std::str::from_utf8(name).map_err(|_| ProxyError::NoRoute)?;
            Ok(Endpoint::AuthorizationHeader(name))
        }
        _ => Err(ProxyError::NoRoute),
    }
}

/// The original path an ingress appended to `{prefix}/forward-auth/{route}` (Envoy's `ext_authz`), parsed on its
/// own from the raw path: the `leading` segments before it must be plain (no escape, no `;`, no dot segment)
/// and end with `route`, so nothing in the appended part can climb back into them and name another route.
/// `None` when nothing is appended.
fn appended_path(
    raw: &str,
    leading: usize,
    route: &str,
) -> Result<Option<RequestPath>, ProxyError> {
    let mut rest = raw.strip_prefix('/').unwrap_or(raw);
    let mut last = "";
    for _ in 0..leading {
        let end = rest.find('/').unwrap_or(rest.len());
        let segment = &rest[..end];
        if matches!(segment, "" | "." | "..") || segment.contains(['%', ';']) {
            return Err(ProxyError::BadRequest(RequestDefect::Unforwardable));
        }
        last = segment;
        rest = rest.get(end + 1..).unwrap_or("");
    }
    if last != route {
        return Err(ProxyError::BadRequest(RequestDefect::Unforwardable));
    }
    if rest.is_empty() {
        return Ok(None);
    }
    RequestPath::parse(&raw[raw.len() - rest.len() - 1..]).map(Some)
}

/// The pseudo-route of `GET {api_prefix}/validate`: caller validation with `[inbound]`'s policy.
pub(super) fn inbound_route(config: &Config) -> Route {
    Route {
        name: VALIDATE_ROUTE.to_owned(),
        policy: config.inbound.policy.clone(),
        caller_auth: CallerAuth::Required,
        ..Route::placeholder(TokenKind::None)
    }
}

/// A token API answer: JSON, never cached.
pub(super) fn answer(body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
