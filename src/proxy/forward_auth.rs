//! Forward-auth (SPEC §16): an ingress that already proxies (nginx `auth_request`, Envoy `ext_authz` over
//! HTTP, Traefik `ForwardAuth`) asks `{api_prefix}/forward-auth/{route}` whether the request it holds may pass,
//! and copies the upstream `Authorization` (and the route's claim headers) from a 200 answer.
//!
//! The original request is what the ingress says it was: the method from `X-Original-Method` (nginx) or
//! `X-Forwarded-Method` (Traefik), the URI from `X-Original-URI` or `X-Forwarded-Uri`, the host from
//! `X-Forwarded-Host` or `X-Original-Host`. Envoy instead appends the original path to the configured path
//! and keeps the original method: with no URI header, the path after `{route}` is the original path. The
//! original request must match the named route in the routing table, as if it were proxied.

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, header};

use crate::error::{ProxyError, RequestDefect};
use crate::route::{RequestPath, header_host, request_host};

/// The request the ingress holds, as its headers describe it.
pub(super) struct Original {
    pub(super) method: Method,
    pub(super) path: RequestPath,
    pub(super) host: Option<String>,
}

/// The headers that name the original method, URI and host, in the order they are read.
const METHOD_HEADERS: [&str; 2] = ["x-original-method", "x-forwarded-method"];
const URI_HEADERS: [&str; 2] = ["x-original-uri", "x-forwarded-uri"];
const HOST_HEADERS: [&str; 2] = ["x-forwarded-host", "x-original-host"];

/// The original request of a forward-auth request. With `suffix` (the path Envoy appended after
/// `/forward-auth/{route}`, parsed on its own) the original is that path with this request's own method, and
/// the URI and method headers are not read: a caller could have sent them. Otherwise the headers name it, and
/// where an ingress sets one family and a caller sent the other (Traefik passes a caller's headers on, nginx
/// too), they must agree. A missing, malformed, unsafe or contradicted original is 400.
pub(super) fn original<B>(
    request: &Request<B>,
    suffix: Option<RequestPath>,
) -> Result<Original, ProxyError> {
    let headers = request.headers();
    let (method, path) = if let Some(suffix) = suffix {
        (request.method().clone(), suffix)
    } else {
        let method = match agreed(headers, &METHOD_HEADERS)? {
            Some(value) => Method::from_bytes(value.as_bytes())
                .map_err(|_| ProxyError::BadRequest(RequestDefect::MalformedOriginalMethod))?,
            None => request.method().clone(),
        };
        let uri = agreed(headers, &URI_HEADERS)?
            .ok_or(ProxyError::BadRequest(RequestDefect::NoOriginalUri))?;
        let uri = http::uri::PathAndQuery::try_from(uri.as_bytes())
            .map_err(|_| ProxyError::BadRequest(RequestDefect::NotAbsolutePath))?;
        (method, RequestPath::parse(uri.path())?)
    };
    let host = match agreed(headers, &HOST_HEADERS)? {
        Some(value) => Some(header_host(value)?),
        None => request_host(request)?,
    };
    Ok(Original { method, path, host })
}

/// The value `names` give in `headers`: none, or one (each header once, all present ones equal).
fn agreed<'a>(
    headers: &'a HeaderMap,
    names: &[&str],
) -> Result<Option<&'a HeaderValue>, ProxyError> {
    let mut found: Option<&HeaderValue> = None;
    for name in names {
        let mut values = headers.get_all(*name).iter();
        let Some(value) = values.next() else { continue };
        if values.next().is_some() || found.is_some_and(|seen| seen != value) {
            return Err(ProxyError::BadRequest(RequestDefect::OriginalsDisagree));
        }
        found = Some(value);
    }
    Ok(found)
}

/// The 200 answer: the upstream `Authorization` (none on a `token = "none"` route) and every one of the
/// route's claim headers (`claim_names`), empty where the caller's token has no such claim, so an ingress that
/// copies them overwrites whatever the caller sent under those names. What it cannot overwrite it is asked to
/// remove (Envoy's `x-envoy-auth-headers-to-remove`): the caller's `Authorization` on a route that sends none.
/// Never to be cached by the ingress.
pub(super) fn allow<B: Default>(
    authorization: Option<HeaderValue>,
    claim_headers: Vec<(HeaderName, HeaderValue)>,
    claim_names: impl Iterator<Item = HeaderName>,
) -> Response<B> {
    let mut response = Response::new(B::default());
    let headers = response.headers_mut();
    match authorization {
        Some(mut authorization) => {
            authorization.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, authorization);
        }
        None => {
            headers.insert(
                "x-envoy-auth-headers-to-remove",
                HeaderValue::from_static("authorization"),
            );
        }
    }
    for name in claim_names {
        headers.insert(name, HeaderValue::from_static(""));
    }
    for (name, value) in claim_headers {
        headers.insert(name, value);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::get("/.obo/forward-auth/orders").header("host", "sidecar:7080");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn nginx_and_traefik_headers_name_the_original_request() {
        let nginx = original(
            &request(&[
                ("x-original-method", "POST"),
                ("x-original-uri", "/api/orders/42?x=1"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(nginx.method, Method::POST);
        assert_eq!(nginx.path.as_bytes(), b"/api/orders/42");
        assert_eq!(nginx.host.as_deref(), Some("sidecar"));
        let traefik = original(
            &request(&[
                ("x-forwarded-method", "DELETE"),
                ("x-forwarded-uri", "/api/orders/42"),
                ("x-forwarded-host", "Shop.Example.com:443"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(traefik.method, Method::DELETE);
        assert_eq!(traefik.host.as_deref(), Some("shop.example.com"));
    }

    #[test]
    fn envoy_appends_the_original_path_and_keeps_the_method() {
        let appended = RequestPath::parse("/api/orders/%34%32").unwrap();
        let envoy = original(
            &request(&[
                ("x-original-uri", "/elsewhere"),
                ("x-original-method", "DELETE"),
            ]),
            Some(appended),
        )
        .unwrap();
        assert_eq!(envoy.method, Method::GET);
        assert_eq!(envoy.path.as_bytes(), b"/api/orders/42");
    }

    #[test]
    fn missing_malformed_or_unsafe_originals_are_400() {
        for (headers, defect) in [
            (vec![], RequestDefect::NoOriginalUri),
            (
                vec![("x-original-uri", "/api/%2e%2e/%2e%2e/admin")],
                RequestDefect::AboveRoot,
            ),
            (
                vec![("x-original-uri", "/api/a%2fb")],
                RequestDefect::EncodedSlash,
            ),
            (
                vec![("x-original-uri", "api/orders")],
                RequestDefect::NotAbsolutePath,
            ),
            (
                vec![("x-original-uri", "/api"), ("x-original-method", "GE T")],
                RequestDefect::MalformedOriginalMethod,
            ),
            (
                vec![("x-original-uri", "/api"), ("x-forwarded-host", "a@b")],
                RequestDefect::MalformedHost,
            ),
            (
                vec![
                    ("x-original-uri", "/api/x"),
                    ("x-forwarded-uri", "/api/admin"),
                ],
                RequestDefect::OriginalsDisagree,
            ),
            (
                vec![
                    ("x-original-uri", "/api/x"),
                    ("x-original-method", "GET"),
                    ("x-forwarded-method", "DELETE"),
                ],
                RequestDefect::OriginalsDisagree,
            ),
            (
                vec![
                    ("x-original-uri", "/api/x"),
                    ("x-forwarded-host", "a.example"),
                    ("x-original-host", "b.example"),
                ],
                RequestDefect::OriginalsDisagree,
            ),
        ] {
            match original(&request(&headers), None) {
                Err(ProxyError::BadRequest(found)) => assert_eq!(found, defect, "{headers:?}"),
                Err(other) => panic!("{headers:?}: {other:?}"),
                Ok(_) => panic!("{headers:?}: accepted"),
            }
        }
    }
}
