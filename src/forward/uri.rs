//! The upstream URI of a request (SPEC §4): the route's prefix replaced by its upstream's path, the rest of
//! the normalized path re-encoded so that what the upstream decodes is what the sidecar routed.

use http::Uri;
use http::uri::{Authority, PathAndQuery, Scheme};
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

/// A route's upstream URL in the parts every request's URI is built from, parsed once per configuration.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamBase {
    scheme: Scheme,
    authority: Authority,
    /// The upstream URL's path.
    path: Box<str>,
}

impl UpstreamBase {
    /// The parts of `route`'s upstream URL; `None` if they are not those of a request target, which the
    /// configuration's checks already refuse.
    pub(crate) fn new(route: &Route) -> Option<UpstreamBase> {
        let upstream = &route.upstream;
        Some(UpstreamBase {
            scheme: Scheme::try_from(upstream.scheme()).ok()?,
            authority: Authority::try_from(authority(upstream)).ok()?,
            path: upstream.path().into(),
        })
    }
}

/// The `host[:port]` of an upstream URL.
fn authority(url: &url::Url) -> &str {
    &url[url::Position::BeforeHost..url::Position::AfterPort]
}

/// The upstream URI: the route's prefix replaced by the upstream URL's path, the `remainder` of the normalized
/// path after the prefix re-encoded, the query passed on unchanged.
pub(crate) fn upstream_uri(
    base: &UpstreamBase,
    remainder: &[u8],
    query: Option<&str>,
) -> Result<Uri, ProxyError> {
    let path = &*base.path;
    let mut target =
        String::with_capacity(path.len() + remainder.len() + query.map_or(0, str::len) + 1);
    if remainder.is_empty() {
        target.push_str(path);
    } else {
        target.push_str(path.trim_end_matches('/'));
        target.extend(percent_encoding::percent_encode(remainder, PATH_ENCODE));
    }
    if let Some(query) = query {
        target.push('?');
        target.push_str(query);
    }
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(base.scheme.clone());
    parts.authority = Some(base.authority.clone());
    parts.path_and_query = Some(
        PathAndQuery::try_from(target)
            .map_err(|_| ProxyError::BadRequest(RequestDefect::Unforwardable))?,
    );
    Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest(RequestDefect::Unforwardable))
}
