//! The upstream request: its URI ([`uri`]), its headers ([`headers`]), and the pooled client of each route
//! that streams bodies both ways.

mod headers;
#[cfg(test)]
mod tests;
mod uri;

use std::time::Duration;

use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::Route;
use crate::telemetry::UpstreamErrorKind;

pub(crate) use headers::{
    Outgoing, claim_header_names, clean_response_headers, request_strip_list, requested_upgrade,
    upstream_request,
};
pub(crate) use uri::{UpstreamBase, upstream_uri};

/// The pooled HTTP/1.1 (or HTTP/2) client of one route's upstream.
pub(crate) type UpstreamClient = Client<HttpsConnector<HttpConnector>, Incoming>;

/// Idle upstream connections are kept this long for reuse; below common upstream keep-alive timeouts
/// (nginx 75 s, Node 5 s is the outlier and answers with a clean close).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The TLS client configuration of `route`'s upstream: the system roots and its `ca_file`.
pub(crate) fn upstream_tls(route: &Route) -> Result<rustls::ClientConfig, crate::tls::TlsError> {
    let roots: Vec<&std::path::Path> = route
        .ca_file
        .iter()
        .map(std::path::PathBuf::as_path)
        .collect();
    crate::tls::client_config(&roots)
}

/// A pooled client of `route`'s upstream over `tls` (its [`upstream_tls`], one for all the route's clients),
/// built from its `http2` and `connect_timeout`: HTTP/1.1, or with `http2` HTTP/2 (prior knowledge for
/// `http://`, ALPN for `https://`).
pub(crate) fn upstream_client(route: &Route, tls: rustls::ClientConfig) -> UpstreamClient {
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

/// How an upstream request failed, for `obo_upstream_errors_total{kind}`: a TLS failure is found by its
/// type anywhere in the error's chain (rustls errors arrive wrapped in `io::Error`s).
pub(crate) fn upstream_error_kind(error: &hyper_util::client::legacy::Error) -> UpstreamErrorKind {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        let tls = current.is::<rustls::Error>()
            || current
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .is_some_and(
                    <dyn std::error::Error + std::marker::Send + std::marker::Sync + 'static>::is::<
                        rustls::Error,
                    >,
                );
        if tls {
            return UpstreamErrorKind::Tls;
        }
        source = current.source();
    }
    if error.is_connect() {
        UpstreamErrorKind::Connect
    } else {
        UpstreamErrorKind::Reset
    }
}
