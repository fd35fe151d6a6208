use super::headers::strip;
use super::*;
use crate::config::Route;
use crate::route::{Prefix, RequestPath};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

fn route(prefix: &str, upstream: &str) -> Route {
    Route::for_tests(prefix, upstream, crate::config::TokenKind::None)
}

fn mapped(r: &Route, p: &str, q: Option<&str>) -> String {
    let prefix = Prefix::new(&r.match_prefix);
    let path = RequestPath::parse(p).expect("path");
    assert!(prefix.matches(&path), "{p}");
    upstream_uri(
        &UpstreamBase::new(r).expect("base"),
        path.after(prefix.len()),
        q,
    )
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
                    let base = UpstreamBase::new(&r).expect("base");
                    let uri = upstream_uri(&base, normalized.after(prefix.len()), query.as_deref());
                    prop_assert!(uri.is_ok() || query.is_some());
                }
            }
        }
    }
}
