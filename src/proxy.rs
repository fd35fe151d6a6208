//! One request: route -> authenticate -> authorize -> acquire the upstream token -> forward. Errors become
//! responses here and only here, each logged once at the level its fault calls for.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::auth::{Authenticator, authorize};
use crate::config::{Config, Route};
use crate::error::{Fault, ProxyError};
use crate::exchange::Exchanger;
use crate::forward::{self, UpstreamClient};

/// What the proxy answers: the upstream's streamed body, or one the sidecar made.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// The request path's state, shared by every connection.
pub struct Proxy {
    /// Longest `match_prefix` first, so the first match is the longest.
    routes: Vec<Route>,
    authenticator: Arc<Authenticator>,
    exchanger: Exchanger,
    client: UpstreamClient,
}

/// How a request ended, for the access log.
struct Outcome<'a> {
    route: Option<&'a str>,
    status: StatusCode,
    cache: &'static str,
}

impl Proxy {
    pub fn new(
        config: &Config,
        authenticator: Arc<Authenticator>,
        exchanger: Exchanger,
        client: UpstreamClient,
    ) -> Self {
        let mut routes = config.routes.clone();
        routes.sort_by_key(|r| std::cmp::Reverse(r.match_prefix.len()));
        Proxy {
            routes,
            authenticator,
            exchanger,
            client,
        }
    }

    pub fn exchanger(&self) -> &Exchanger {
        &self.exchanger
    }

    /// Serves one caller request.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        remote: SocketAddr,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let method = request.method().clone();
        let mut outcome = Outcome {
            route: None,
            status: StatusCode::OK,
            cache: "-",
        };
        let response = match self.proxy(request, remote, &mut outcome).await {
            Ok(response) => response,
            Err(error) => {
                log_error(&error, outcome.route);
                error.to_response::<Full<Bytes>>().map(Either::Right)
            }
        };
        outcome.status = response.status();
        tracing::info!(
            target: "access",
            route = outcome.route.unwrap_or("-"),
            %method,
            status = outcome.status.as_u16(),
            cache = outcome.cache,
            duration_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "request"
        );
        response
    }

    async fn proxy<'a>(
        &'a self,
        request: Request<Incoming>,
        remote: SocketAddr,
        outcome: &mut Outcome<'a>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let header_bytes: usize = request
            .headers()
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        if header_bytes > crate::server::MAX_HEADER_BYTES {
            return Err(ProxyError::HeadersTooLarge);
        }
        let path = forward::normalize_path(request.uri().path())?;
        let route = self
            .routes
            .iter()
            .find(|r| forward::prefix_matches(&r.match_prefix, &path))
            .ok_or(ProxyError::NoRoute)?;
        outcome.route = Some(&route.name);
        let deadline = tokio::time::Instant::now() + route.timeout;

        let caller =
            tokio::time::timeout_at(deadline, self.authenticator.authenticate(request.headers()))
                .await
                .map_err(|_| ProxyError::KeysUnavailable {
                    retry_after: crate::auth::jwks::KEYS_RETRY_AFTER,
                })??;
        authorize(&caller.claims, route)?;

        let acquired = tokio::time::timeout_at(deadline, self.exchanger.acquire(route, &caller))
            .await
            .map_err(|_| ProxyError::TokenDeadline)??;
        if let Some(lookup) = acquired.lookup {
            outcome.cache = lookup.as_str();
        }

        let uri = forward::upstream_uri(route, &path, request.uri().query())?;
        let upstream = forward::upstream_request(request, uri, remote, acquired.header.clone());
        let mut response =
            match tokio::time::timeout_at(deadline, self.client.request(upstream)).await {
                Err(_) => return Err(ProxyError::UpstreamTimeout),
                Ok(Err(error)) => return Err(ProxyError::UpstreamConnect(Box::new(error))),
                Ok(Ok(response)) => response,
            };
        if response.status() == StatusCode::UNAUTHORIZED
            && let Some(sent) = &acquired.sent
            && self.exchanger.forget(sent).await
        {
            tracing::info!(route = %route.name, "upstream refused its token; dropped the cached one");
        }
        forward::clean_response_headers(response.headers_mut());
        Ok(response.map(Either::Left))
    }
}

/// Logs a refused request once. IdP failures were already logged where they happened (with the
/// `client-request-id`), so here they are only a debug line.
fn log_error(error: &ProxyError, route: Option<&str>) {
    let route = route.unwrap_or("-");
    let detail = crate::auth::jwks::error_chain(error);
    match (error.fault(), error) {
        (Fault::Caller | Fault::Idp, _)
        | (Fault::Internal, ProxyError::IdpMisconfigured { .. }) => {
            tracing::debug!(route, error = %detail, "request refused");
        }
        (Fault::Upstream, _) => tracing::warn!(route, error = %detail, "request failed"),
        (Fault::Internal, _) => tracing::error!(route, error = %detail, "request failed"),
    }
}
