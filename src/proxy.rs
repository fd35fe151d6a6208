//! One request: route -> authenticate -> authorize -> acquire the upstream token -> forward (or answer from
//! the token API). Errors become responses here and only here, each logged once at the level its fault calls
//! for; every request ends with one access-log event.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::FutureExt as _;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::auth::{Authenticator, Caller, authorize};
use crate::config::{CallerAuth, Config, Route, TokenKind};
use crate::error::{Fault, ProxyError};
use crate::exchange::Exchanger;
use crate::exchange::cache::Lookup;
use crate::forward::{self, Outgoing, UpstreamClients};
use crate::route::{Prefix, RequestPath};
use crate::server::{Peer, Tunnels};
use crate::telemetry::{CacheKind, CacheResult, Metrics, RouteMetrics, UpstreamErrorKind};

/// What the proxy answers: the upstream's streamed body, or one the sidecar made.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// The route label of `GET {api_prefix}/validate`; `:` cannot appear in a configured route name.
const VALIDATE_ROUTE: &str = "token-api:validate";

/// A caller-supplied `X-Request-Id` longer than this, or with other than visible ASCII, is replaced.
const MAX_REQUEST_ID_BYTES: usize = 128;

/// One route with what serving it needs, resolved once per configuration: its matcher, metric handles,
/// header strip list and upstream client.
struct RouteEntry {
    route: Route,
    prefix: Prefix,
    metrics: RouteMetrics,
    /// Request headers never forwarded on this route ([`forward::request_strip_list`]).
    strip: Vec<String>,
}

/// The request path of one configuration generation, shared by every connection.
pub struct Proxy {
    /// Most prefix segments first, so the first match is the longest.
    routes: Vec<RouteEntry>,
    authenticator: Arc<Authenticator>,
    exchanger: Exchanger,
    clients: UpstreamClients,
    api_prefix: Option<Prefix>,
    /// `[inbound]`'s policy, for `GET {api_prefix}/validate`.
    inbound_route: Route,
    max_header_bytes: usize,
    idle_timeout: std::time::Duration,
    metrics: Arc<Metrics>,
    validate_metrics: RouteMetrics,
    /// Some route matches on `host`: only then is the request's `Host` parsed.
    match_host: bool,
}

/// How a request ended, for the access log.
struct Outcome<'a> {
    route: Option<&'a str>,
    metrics: Option<&'a RouteMetrics>,
    cache: &'static str,
    idp_call: bool,
    upstream_error: Option<UpstreamErrorKind>,
}

impl Proxy {
    pub fn new(
        config: &Config,
        authenticator: Arc<Authenticator>,
        exchanger: Exchanger,
        clients: UpstreamClients,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let claim_names = forward::claim_header_names(&config.routes);
        let mut routes: Vec<RouteEntry> = config
            .routes
            .iter()
            .map(|route| RouteEntry {
                prefix: Prefix::new(&route.match_prefix),
                metrics: metrics.route(&route.name),
                strip: forward::request_strip_list(route, &claim_names),
                route: route.clone(),
            })
            .collect();
        // Longest prefix first; for one prefix, routes that also name a host or methods first.
        routes.sort_by_key(|e| {
            std::cmp::Reverse((
                e.prefix.len(),
                e.route.host.is_some(),
                e.route.methods.is_some(),
            ))
        });
        Proxy {
            metrics: Arc::clone(metrics),
            validate_metrics: metrics.route(VALIDATE_ROUTE),
            match_host: routes.iter().any(|e| e.route.host.is_some()),
            inbound_route: inbound_route(config),
            max_header_bytes: config.listen.max_header_bytes,
            idle_timeout: config.listen.idle_timeout,
            routes,
            authenticator,
            exchanger,
            clients,
            api_prefix: config.listen.api_prefix.as_deref().map(Prefix::new),
        }
    }

    pub fn exchanger(&self) -> &Exchanger {
        &self.exchanger
    }

    pub fn authenticator(&self) -> &Arc<Authenticator> {
        &self.authenticator
    }

    /// Serves one caller request.
    pub async fn handle(&self, request: Request<Incoming>, peer: Peer) -> Response<ProxyBody> {
        let started = Instant::now();
        let method = request.method().clone();
        let request_id = request_id(&request);
        let mut outcome = Outcome {
            route: None,
            metrics: None,
            cache: "-",
            idp_call: false,
            upstream_error: None,
        };
        // A bug that panics answers this request with 500 instead of resetting the caller's connection (and
        // every other request multiplexed on it).
        let answered =
            std::panic::AssertUnwindSafe(self.answer(request, peer, &request_id, &mut outcome))
                .catch_unwind()
                .await
                .unwrap_or(Err(ProxyError::Internal("the request handler panicked")));
        let mut response = match answered {
            Ok(response) => response,
            Err(error) => {
                log_error(&error, outcome.route, &request_id);
                error.to_response::<Full<Bytes>>().map(Either::Right)
            }
        };
        response
            .headers_mut()
            .insert("x-request-id", request_id.clone());
        let status = response.status().as_u16();
        match outcome.metrics {
            Some(route) => {
                route.record_request(status, started.elapsed());
                if let Some(kind) = outcome.upstream_error {
                    route.record_upstream_error(kind);
                }
            }
            None => {
                self.metrics
                    .record_request(crate::telemetry::NO_ROUTE, status, started.elapsed());
            }
        }
        tracing::info!(
            target: "access",
            route = outcome.route.unwrap_or("-"),
            %method,
            status = response.status().as_u16(),
            cache = outcome.cache,
            idp_call = outcome.idp_call,
            duration_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            request_id = request_id.to_str().unwrap_or("-"),
            "request"
        );
        response
    }

    async fn answer<'a>(
        &'a self,
        request: Request<Incoming>,
        peer: Peer,
        request_id: &HeaderValue,
        outcome: &mut Outcome<'a>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let header_bytes: usize = request
            .headers()
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        if header_bytes > self.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge);
        }
        let host = request_host(&request)?;
        let path = RequestPath::parse(request.uri().path())?;
        if let Some(prefix) = &self.api_prefix
            && prefix.matches(&path)
        {
            return self.token_api(&request, prefix, &path, outcome).await;
        }
        let host = if self.match_host { host } else { None };
        let entry = self
            .routes
            .iter()
            .find(|e| {
                let r = &e.route;
                e.prefix.matches(&path)
                    && r.host.as_deref().is_none_or(|h| Some(h) == host.as_deref())
                    && r.methods
                        .as_ref()
                        .is_none_or(|m| m.contains(request.method()))
            })
            .ok_or(ProxyError::NoRoute)?;
        let route = &entry.route;
        outcome.route = Some(&route.name);
        outcome.metrics = Some(&entry.metrics);
        let deadline = tokio::time::Instant::now() + route.timeout;
        let caller = self.caller(&request, route, deadline).await?;
        let acquired =
            tokio::time::timeout_at(deadline, self.exchanger.acquire(route, caller.as_ref()))
                .await
                .map_err(|_| ProxyError::TokenDeadline)??;
        record_lookup(route, acquired.lookup, outcome);
        let claim_headers = match &caller {
            Some(caller) if !route.forward_claims.is_empty() => claim_headers(route, caller),
            _ => Vec::new(),
        };
        let uri = forward::upstream_uri(route, &path, entry.prefix.len(), request.uri().query())?;
        let upgrade = forward::requested_upgrade(&request).filter(|_| !route.http2);
        let mut request = request;
        let caller_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut request));
        let tunnels = request.extensions().get::<Tunnels>().cloned();
        let upstream = forward::upstream_request(
            request,
            Outgoing {
                uri,
                peer,
                route,
                authorization: acquired.header.clone(),
                claim_headers,
                request_id: request_id.clone(),
                upgrade,
                strip: &entry.strip,
            },
        );
        let client = self
            .clients
            .get(route)
            .ok_or(ProxyError::Internal("route without an upstream client"))?;
        let mut response = match tokio::time::timeout_at(deadline, client.request(upstream)).await {
            Err(_) => {
                outcome.upstream_error = Some(UpstreamErrorKind::Timeout);
                return Err(ProxyError::UpstreamTimeout);
            }
            Ok(Err(error)) => {
                outcome.upstream_error = Some(upstream_error_kind(&error));
                return Err(ProxyError::UpstreamConnect(Box::new(error)));
            }
            Ok(Ok(response)) => response,
        };
        if response.status() == StatusCode::UNAUTHORIZED
            && let Some(sent) = &acquired.sent
            && self.exchanger.forget(sent).await
        {
            tracing::info!(route = %route.name, "upstream refused its token; dropped the cached one");
        }
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        let agreed = response
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        if switching && (caller_upgrade.is_none() || !agreed) {
            // A 101 nobody asked for, or to another protocol: never splice an unvalidated tunnel.
            outcome.upstream_error = Some(UpstreamErrorKind::Reset);
            return Err(ProxyError::UpstreamConnect(
                "the upstream switched protocols unasked".into(),
            ));
        }
        if switching && let Some(caller_upgrade) = caller_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            let route_name = route.name.clone();
            let idle_timeout = self.idle_timeout;
            let tunnel = async move {
                match tokio::try_join!(caller_upgrade, upstream_upgrade) {
                    Ok((caller, upstream)) => {
                        // The tunnel left hyper's connection: it gets its own idle timeout.
                        let mut caller =
                            crate::server::IdleIo::new(hyper_util::rt::TokioIo::new(caller));
                        let activity = caller.activity();
                        let mut upstream = hyper_util::rt::TokioIo::new(upstream);
                        tokio::select! {
                            copied = tokio::io::copy_bidirectional(&mut caller, &mut upstream) => {
                                if let Err(error) = copied {
                                    tracing::debug!(route = %route_name, %error, "upgraded connection ended");
                                }
                            }
                            () = activity.idle_for(idle_timeout) => {
                                tracing::debug!(route = %route_name, "upgraded connection idle: closed");
                            }
                        }
                    }
                    Err(error) => tracing::debug!(route = %route_name, %error, "upgrade failed"),
                }
            };
            // In the caller's connection task: the tunnel holds its max_connections permit and is drained
            // with it. A connection served outside `server` (none today) runs it on its own.
            match tunnels {
                Some(tunnels) => tunnels.run(Box::pin(tunnel)),
                None => drop(tokio::spawn(tunnel)),
            }
        }
        forward::clean_response_headers(response.headers_mut(), switching);
        Ok(response.map(Either::Left))
    }

    /// The validated caller of `route` (none for `caller_auth = "none"`), its policy applied.
    async fn caller(
        &self,
        request: &Request<Incoming>,
        route: &Route,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Caller>, ProxyError> {
        if route.caller_auth == CallerAuth::None {
            return Ok(None);
        }
        let caller =
            tokio::time::timeout_at(deadline, self.authenticator.authenticate(request.headers()))
                .await
                .map_err(|_| ProxyError::KeysUnavailable {
                    retry_after: crate::auth::jwks::KEYS_RETRY_AFTER,
                })??;
        authorize(&caller.claims, route)?;
        Ok(Some(caller))
    }

    /// The token API (SPEC §5): `GET {prefix}/validate` and `GET {prefix}/authorization-header/{route}`,
    /// with the proxy's validation, policy, cache and errors; answers carry `Cache-Control: no-store`.
    async fn token_api<'a>(
        &'a self,
        request: &Request<Incoming>,
        prefix: &Prefix,
        path: &RequestPath,
        outcome: &mut Outcome<'a>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if request.method() != http::Method::GET && request.method() != http::Method::HEAD {
            return Err(ProxyError::NoRoute);
        }
        let mut rest = prefix.rest(path).map(|segment| segment.name);
        let (endpoint, name, extra) = (rest.next(), rest.next(), rest.next());
        if extra.is_some() {
            return Err(ProxyError::NoRoute);
        }
        if let (Some(endpoint), None) = (endpoint, name)
            && endpoint.eq_ignore_ascii_case(b"validate")
        {
            outcome.route = Some(VALIDATE_ROUTE);
            outcome.metrics = Some(&self.validate_metrics);
            let deadline = tokio::time::Instant::now() + self.inbound_route.timeout;
            let caller = self.caller(request, &self.inbound_route, deadline).await?;
            let claims = caller.map(|c| serde_json::Value::Object(c.all_claims()));
            return Ok(api_response(&serde_json::json!({ "claims": claims })));
        }
        let name = match (endpoint, name) {
            (Some(endpoint), Some(name))
                if endpoint.eq_ignore_ascii_case(b"authorization-header") =>
            {
                std::str::from_utf8(name).map_err(|_| ProxyError::NoRoute)?
            }
            _ => return Err(ProxyError::NoRoute),
        };
        let entry = self
            .routes
            .iter()
            .find(|e| e.route.name == name && e.route.token_api)
            .ok_or(ProxyError::NoRoute)?;
        let route = &entry.route;
        outcome.route = Some(&route.name);
        outcome.metrics = Some(&entry.metrics);
        let deadline = tokio::time::Instant::now() + route.timeout;
        let caller = self.caller(request, route, deadline).await?;
        let acquired =
            tokio::time::timeout_at(deadline, self.exchanger.acquire(route, caller.as_ref()))
                .await
                .map_err(|_| ProxyError::TokenDeadline)??;
        record_lookup(route, acquired.lookup, outcome);
        let expires_on = match (&acquired.sent, route.token, &caller) {
            (Some((_, entry)), _, _) => entry.token.expires_on,
            (None, TokenKind::Passthrough, Some(caller)) => caller.claims.exp,
            _ => 0,
        };
        let header = acquired
            .header
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .ok_or(ProxyError::NoRoute)?;
        Ok(api_response(&serde_json::json!({
            "authorization_header": header,
            "expires_on": expires_on,
        })))
    }
}

/// The pseudo-route of `GET {api_prefix}/validate`: caller validation with `[inbound]`'s policy.
fn inbound_route(config: &Config) -> Route {
    Route {
        name: VALIDATE_ROUTE.to_owned(),
        path_prefix: String::new(),
        match_prefix: String::new(),
        upstream: url::Url::parse("http://127.0.0.1/")
            .unwrap_or_else(|_| unreachable!("a fixed valid URL")),
        token: TokenKind::None,
        identity: crate::config::DEFAULT_IDENTITY.to_owned(),
        scopes: Vec::new(),
        audience: Vec::new(),
        resource: Vec::new(),
        requested_token_type: None,
        policy: config.inbound.policy.clone(),
        timeout: crate::config::DEFAULT_ROUTE_TIMEOUT,
        host: None,
        methods: None,
        caller_auth: CallerAuth::Required,
        forward_claims: Vec::new(),
        remove_request_headers: Vec::new(),
        preserve_host: false,
        token_api: false,
        http2: false,
        connect_timeout: crate::config::DEFAULT_CONNECT_TIMEOUT,
        ca_file: None,
    }
}

/// How an upstream request failed, for `obo_upstream_errors_total{kind}`.
fn upstream_error_kind(error: &hyper_util::client::legacy::Error) -> UpstreamErrorKind {
    let chain = crate::auth::jwks::error_chain(error).to_ascii_lowercase();
    if chain.contains("certificate") || chain.contains("tls") || chain.contains("handshake") {
        UpstreamErrorKind::Tls
    } else if error.is_connect() {
        UpstreamErrorKind::Connect
    } else {
        UpstreamErrorKind::Reset
    }
}

/// A token API answer: JSON, never cached.
fn api_response(body: &serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Notes a token cache lookup in the access log fields and the route's metrics.
fn record_lookup(route: &Route, lookup: Option<Lookup>, outcome: &mut Outcome<'_>) {
    let Some(lookup) = lookup else { return };
    outcome.cache = lookup.as_str();
    outcome.idp_call = lookup == Lookup::Miss;
    let kind = match route.token {
        TokenKind::Obo => CacheKind::Obo,
        TokenKind::App => CacheKind::App,
        TokenKind::Passthrough | TokenKind::None => CacheKind::Passthrough,
    };
    let result = match lookup {
        Lookup::Hit => CacheResult::Hit,
        Lookup::Stale => CacheResult::Stale,
        Lookup::Miss => CacheResult::Miss,
    };
    if let Some(metrics) = outcome.metrics {
        metrics.record_cache(kind, result);
    }
}

/// The caller's `X-Request-Id` when it is short visible ASCII, else a new UUID.
fn request_id(request: &Request<Incoming>) -> HeaderValue {
    request
        .headers()
        .get("x-request-id")
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_REQUEST_ID_BYTES
                && v.as_bytes().iter().all(u8::is_ascii_graphic)
        })
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&crate::exchange::client_auth::request_uuid())
                .unwrap_or_else(|_| HeaderValue::from_static("-"))
        })
}

/// The request's host for route matching: the target's authority (HTTP/2 `:authority`, or an HTTP/1.1
/// absolute-form target) or the `Host` header, without its port, lowercase. Two `Host` headers, or a `Host`
/// that names another authority than the target, are refused (RFC 9112 §3.2, RFC 9113 §8.3.1): the sidecar
/// would route on one and an upstream could read the other.
fn request_host(request: &Request<Incoming>) -> Result<Option<String>, ProxyError> {
    let mut hosts = request.headers().get_all(http::header::HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    let header = header
        .map(|v| {
            http::uri::Authority::try_from(v.as_bytes())
                .ok()
                .filter(|a| {
                    // No userinfo, and a port (if any) that is a number.
                    let port = &a.as_str()[a.host().len()..];
                    !a.as_str().contains('@') && (port.is_empty() || a.port_u16().is_some())
                })
                .ok_or(ProxyError::BadRequest("Host is not a host[:port]"))
        })
        .transpose()?;
    let authority = match (request.uri().authority(), header.as_ref()) {
        (Some(target), Some(header)) if !target.as_str().eq_ignore_ascii_case(header.as_str()) => {
            return Err(ProxyError::BadRequest(
                "Host does not match the request target's authority",
            ));
        }
        (Some(authority), _) | (None, Some(authority)) => authority,
        (None, None) => return Ok(None),
    };
    // `Host: admin.local.` is the same host to DNS and to most upstreams.
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let host = host.strip_suffix('.').unwrap_or(host);
    Ok(Some(host.to_ascii_lowercase()))
}

/// The `forward_claims` headers of `route` from the caller's validated claims. Strings as they are, numbers
/// and booleans as JSON, arrays of those joined with `,`; a claim that is absent, an object, or not a valid
/// header value is not sent.
fn claim_headers(route: &Route, caller: &Caller) -> Vec<(http::HeaderName, HeaderValue)> {
    fn text(value: &serde_json::Value) -> Option<String> {
        match value {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            serde_json::Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
    let claims = caller.all_claims();
    route
        .forward_claims
        .iter()
        .filter_map(|(header, claim)| {
            let value = match claims.get(claim)? {
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(text)
                    .collect::<Option<Vec<_>>>()?
                    .join(","),
                other => text(other)?,
            };
            Some((header.clone(), HeaderValue::from_str(&value).ok()?))
        })
        .collect()
}

/// Logs a refused request once. IdP failures were already logged where they happened (with the
/// `client-request-id`), so here they are only a debug line.
fn log_error(error: &ProxyError, route: Option<&str>, request_id: &HeaderValue) {
    let route = route.unwrap_or("-");
    let request_id = request_id.to_str().unwrap_or("-");
    let detail = crate::auth::jwks::error_chain(error);
    match (error.fault(), error) {
        (Fault::Caller | Fault::Idp, _)
        | (Fault::Internal, ProxyError::IdpMisconfigured { .. }) => {
            tracing::debug!(route, request_id, error = %detail, "request refused");
        }
        (Fault::Upstream, _) => {
            tracing::warn!(route, request_id, error = %detail, "request failed");
        }
        (Fault::Internal, _) => {
            tracing::error!(route, request_id, error = %detail, "request failed");
        }
    }
}
