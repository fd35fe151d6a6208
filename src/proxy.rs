//! One request: route -> authenticate -> authorize -> acquire the upstream token -> forward. Errors become
//! responses here and only here, each logged once at the level its fault calls for.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::auth::CallerClaims;
use crate::auth::{Authenticator, authorize};
use crate::config::{CallerAuth, Config, Route};
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
        // Longest prefix first; for one prefix, routes that also name a host or methods first.
        routes.sort_by_key(|r| {
            std::cmp::Reverse((r.match_prefix.len(), r.host.is_some(), r.methods.is_some()))
        });
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
        let host = request_host(&request);
        let route = self
            .routes
            .iter()
            .find(|r| {
                forward::prefix_matches(&r.match_prefix, &path)
                    && r.host.as_deref().is_none_or(|h| Some(h) == host.as_deref())
                    && r.methods
                        .as_ref()
                        .is_none_or(|m| m.contains(request.method()))
            })
            .ok_or(ProxyError::NoRoute)?;
        outcome.route = Some(&route.name);
        let deadline = tokio::time::Instant::now() + route.timeout;

        let caller = match route.caller_auth {
            CallerAuth::None => None,
            CallerAuth::Required => {
                let caller = tokio::time::timeout_at(
                    deadline,
                    self.authenticator.authenticate(request.headers()),
                )
                .await
                .map_err(|_| ProxyError::KeysUnavailable {
                    retry_after: crate::auth::jwks::KEYS_RETRY_AFTER,
                })??;
                authorize(&caller.claims, route)?;
                Some(caller)
            }
        };

        let acquired =
            tokio::time::timeout_at(deadline, self.exchanger.acquire(route, caller.as_ref()))
                .await
                .map_err(|_| ProxyError::TokenDeadline)??;
        if let Some(lookup) = acquired.lookup {
            outcome.cache = lookup.as_str();
        }
        let claim_headers = caller
            .as_ref()
            .map(|c| claim_headers(route, &c.claims))
            .unwrap_or_default();

        let uri = forward::upstream_uri(route, &path, request.uri().query())?;
        let upstream = forward::upstream_request(
            request,
            uri,
            remote,
            acquired.header.clone(),
            &route.forward_claims,
            claim_headers,
        );
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

/// The request's host for route matching: `Host` (or the URI's authority) without its port, lowercase.
fn request_host(request: &Request<Incoming>) -> Option<String> {
    let authority = request
        .headers()
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| request.uri().authority().map(http::uri::Authority::as_str))?;
    let host = match authority.strip_prefix('[') {
        // [v6]:port
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    Some(host.to_ascii_lowercase())
}

/// The `forward_claims` headers of `route` from the caller's validated claims. Strings as they are, numbers
/// and booleans as JSON, arrays of those joined with `,`; a claim that is absent, an object, or not a valid
/// header value is not sent.
fn claim_headers(
    route: &Route,
    claims: &CallerClaims,
) -> Vec<(http::HeaderName, http::HeaderValue)> {
    fn text(value: &serde_json::Value) -> Option<String> {
        match value {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            serde_json::Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
    route
        .forward_claims
        .iter()
        .filter_map(|(header, claim)| {
            let value = match claims.all.get(claim)? {
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(text)
                    .collect::<Option<Vec<_>>>()?
                    .join(","),
                other => text(other)?,
            };
            Some((header.clone(), http::HeaderValue::from_str(&value).ok()?))
        })
        .collect()
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
