//! The request header names the sidecar owns: hop-by-hop ones, the ones it sets itself, and the ones no
//! caller may send because an upstream would trust or act on them. One list, read by the forwarding code
//! (what to strip) and by the configuration (what `forward_claims` may not name).

/// Hop-by-hop headers (RFC 9110 §7.6.1) and others never forwarded in either direction.
pub(crate) const HOP_BY_HOP: &[&str] = &[
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
pub(crate) const CALLER_NEVER: &[&str] = &[
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
pub(crate) const REWRITING: &[&str] = &[
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

/// A header name as upstream frameworks compare it: lowercase, with `_` read as `-` (CGI maps `-` to `_`, so
/// `X_Forwarded_For` and `x-forwarded-for` are one header to many of them).
pub(crate) fn canonical(name: &str) -> std::borrow::Cow<'_, str> {
    if name.bytes().any(|b| b == b'_' || b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(name.to_ascii_lowercase().replace('_', "-"))
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

/// Whether the sidecar owns request header `name`: hop-by-hop, set by the sidecar itself, never trusted from
/// the caller, or able to rewrite the request upstream. `forward_claims` may not name one.
pub(crate) fn sidecar_owns(name: &str) -> bool {
    let name = canonical(name);
    let name = name.as_ref();
    HOP_BY_HOP.contains(&name)
        || CALLER_NEVER.contains(&name)
        || REWRITING.contains(&name)
        || name == "content-length"
}
