//! The upstream URI of a request (SPEC §4): the route's prefix replaced by its upstream's path, the rest of
//! the normalized path re-encoded so that what the upstream decodes is what the sidecar routed.

use http::Uri;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};

use crate::config::Route;
use crate::error::{ProxyError, RequestDefect};

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

/// The upstream URI: the route's prefix replaced by the upstream URL's path, the `remainder` of the normalized
/// path after the prefix re-encoded, the query passed on unchanged.
pub(crate) fn upstream_uri(
    route: &Route,
    remainder: &[u8],
    query: Option<&str>,
) -> Result<Uri, ProxyError> {
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
        .map_err(|_| ProxyError::BadRequest(RequestDefect::Unforwardable))
}
