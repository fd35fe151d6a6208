//! Which route a request takes. The request path is decoded and normalized ([`path`]); the routing table of
//! one configuration holds one [`RouteEntry`] per route — the route, its matcher, its metric handles, its
//! header strip list and its upstream client, all resolved once — and picks the longest prefix that matches
//! at a segment boundary, then `host` and `methods`.

mod path;

use http::{Method, Request};

use crate::config::Route;
use crate::error::{ProxyError, RequestDefect};
use crate::exchange::RequestKey;
use crate::forward::{self, UpstreamClient};
use crate::telemetry::{Metrics, RouteMetrics};

pub(crate) use path::{Prefix, RequestPath};

/// One route with what serving it needs.
pub(crate) struct RouteEntry {
    pub(crate) route: Route,
    pub(crate) prefix: Prefix,
    pub(crate) metrics: RouteMetrics,
    /// Request headers never forwarded on this route ([`forward::request_strip_list`]).
    pub(crate) strip: Vec<String>,
    /// The upstream URL's parts, which every forwarded request's URI starts from (`None` only for a URL
    /// that the configuration's checks refuse).
    pub(crate) upstream: Option<forward::UpstreamBase>,
    /// What the route's token requests are keyed by, when it is the same for every caller.
    pub(crate) request_key: Option<RequestKey>,
    /// One pooled client per proxy worker, so a worker's upstream connections live on its own thread.
    clients: Box<[UpstreamClient]>,
}

impl RouteEntry {
    /// The upstream client of the worker this runs on.
    pub(crate) fn client(&self) -> &UpstreamClient {
        &self.clients[crate::server::worker_index() % self.clients.len()]
    }
}

/// The routes of one configuration, longest prefix first.
pub(crate) struct RouteTable {
    /// Most prefix segments first; for one prefix, routes that also name a host or methods first. So the
    /// first match is the one to take.
    entries: Vec<RouteEntry>,
    /// Some route matches on `host`: only then does routing look at the request's host.
    match_host: bool,
}

impl RouteTable {
    /// The routing table of `routes`, with an upstream client per route for each of `workers`, and each
    /// route's token request key from `request_key`.
    pub(crate) fn new(
        routes: &[Route],
        metrics: &Metrics,
        workers: usize,
        request_key: impl Fn(&Route) -> Option<RequestKey>,
    ) -> Result<RouteTable, crate::tls::TlsError> {
        let claim_names = forward::claim_header_names(routes);
        let mut entries = routes
            .iter()
            .map(|route| {
                let tls = forward::upstream_tls(route)?;
                Ok(RouteEntry {
                    prefix: Prefix::new(&route.match_prefix),
                    metrics: metrics.route(&route.name),
                    strip: forward::request_strip_list(route, &claim_names),
                    upstream: forward::UpstreamBase::new(route),
                    request_key: request_key(route),
                    clients: (0..workers.max(1))
                        .map(|_| forward::upstream_client(route, tls.clone()))
                        .collect(),
                    route: route.clone(),
                })
            })
            .collect::<Result<Vec<_>, crate::tls::TlsError>>()?;
        entries.sort_by_key(|e| {
            std::cmp::Reverse((
                e.prefix.len(),
                e.route.host.is_some(),
                e.route.methods.is_some(),
            ))
        });
        Ok(RouteTable {
            match_host: entries.iter().any(|e| e.route.host.is_some()),
            entries,
        })
    }

    /// The route of a request for `path` on `host` with `method`.
    pub(crate) fn find(
        &self,
        path: &RequestPath,
        host: Option<&str>,
        method: &Method,
    ) -> Option<&RouteEntry> {
        let host = if self.match_host { host } else { None };
        self.entries.iter().find(|e| {
            let r = &e.route;
            r.proxy
                && e.prefix.matches(path)
                && r.host.as_deref().is_none_or(|h| Some(h) == host)
                && r.methods.as_ref().is_none_or(|m| m.contains(method))
        })
    }

    /// The route named `name`.
    pub(crate) fn named(&self, name: &str) -> Option<&RouteEntry> {
        self.entries.iter().find(|e| e.route.name == name)
    }

    /// The one route whose name equals `name` but for letter case; `None` when none or several do.
    pub(crate) fn named_ignoring_case(&self, name: &str) -> Option<&RouteEntry> {
        let mut found = self
            .entries
            .iter()
            .filter(|e| e.route.name.eq_ignore_ascii_case(name));
        let first = found.next()?;
        found.next().is_none().then_some(first)
    }
}

/// The request's host for route matching: the target's authority (HTTP/2 `:authority`, or an HTTP/1.1
/// absolute-form target) or the `Host` header, without its port or a trailing dot, lowercase. Two `Host`
/// headers, a `Host` that is not `host[:port]`, or one that names another authority than the target, are
/// refused (RFC 9112 §3.2, RFC 9113 §8.3.1): the sidecar would route on one and an upstream could read the
/// other.
pub(crate) fn request_host<B>(request: &Request<B>) -> Result<Option<String>, ProxyError> {
    let mut hosts = request.headers().get_all(http::header::HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest(RequestDefect::TwoHosts));
    }
    let header = header.map(|v| authority(v.as_bytes())).transpose()?;
    let authority = match (request.uri().authority(), header.as_ref()) {
        (Some(target), Some(header)) if !target.as_str().eq_ignore_ascii_case(header.as_str()) => {
            return Err(ProxyError::BadRequest(RequestDefect::HostMismatch));
        }
        (Some(authority), _) | (None, Some(authority)) => authority,
        (None, None) => return Ok(None),
    };
    Ok(Some(host_name(authority)))
}

/// The host named by a header that holds `host[:port]` the way `Host` does (an ingress's
/// `X-Forwarded-Host`), for route matching as [`request_host`] reads it.
pub(crate) fn header_host(value: &http::HeaderValue) -> Result<String, ProxyError> {
    Ok(host_name(&authority(value.as_bytes())?))
}

/// `host[:port]` with no userinfo and a port (if any) that is a number.
fn authority(value: &[u8]) -> Result<http::uri::Authority, ProxyError> {
    http::uri::Authority::try_from(value)
        .ok()
        .filter(|a| {
            let port = &a.as_str()[a.host().len()..];
            !a.as_str().contains('@') && (port.is_empty() || a.port_u16().is_some())
        })
        .ok_or(ProxyError::BadRequest(RequestDefect::MalformedHost))
}

/// The host of `authority` without its port or a trailing dot, lowercase: `Host: admin.local.` is the same
/// host to DNS and to most upstreams.
fn host_name(authority: &http::uri::Authority) -> String {
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}
