//! One request: route -> authenticate -> acquire the upstream token -> forward (or answer from the token
//! API). Errors become responses here and only here, each logged once at the level its fault calls for;
//! every request ends with one access-log event.

mod compat;
mod forward_auth;
mod microsoft;
mod request_id;
mod token_api;
mod tunnel;

use std::sync::Arc;
use tokio::time::Instant;

use bytes::Bytes;
use futures_util::FutureExt as _;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::auth::{Authenticator, Caller, authorize};
use crate::config::{CallerAuth, Config, Route, TokenKind};
use crate::error::{Fault, ProxyError};
use crate::exchange::cache::Lookup;
use crate::exchange::{Acquired, Exchanger, Subject};
use crate::forward::{self, Outgoing};
use crate::route::{Prefix, RequestPath, RouteEntry, RouteTable, request_host};
use crate::server::Peer;
use crate::telemetry::trace::{self, SPAN_TARGET};
use crate::telemetry::{CacheKind, CacheResult, Metrics, RouteMetrics, UpstreamErrorKind};

/// What the proxy answers: the upstream's streamed body, or one the sidecar made.
pub(crate) type ProxyBody = Either<Incoming, Full<Bytes>>;

/// The request path of one configuration generation, shared by every connection.
pub(crate) struct Proxy {
    routes: RouteTable,
    authenticator: Arc<Authenticator>,
    exchanger: Exchanger,
    api_prefix: Option<Prefix>,
    /// `[inbound]`'s policy, for `GET {api_prefix}/validate`.
    inbound_route: Route,
    max_header_bytes: usize,
    idle_timeout: std::time::Duration,
    /// `[compat] microsoft_sidecar`: Microsoft's sidecar endpoints are served.
    microsoft_sidecar: bool,
    /// Permits to buffer a `/DownstreamApi` answer (each up to `compat::MAX_DOWNSTREAM_BODY_BYTES`).
    downstream_buffers: tokio::sync::Semaphore,
    metrics: Arc<Metrics>,
    validate_metrics: RouteMetrics,
}

/// How a request ended, for the access log.
struct Outcome<'a> {
    /// When the request started: the one clock read its deadlines and its duration are measured from.
    started: Instant,
    route: Option<&'a str>,
    metrics: Option<&'a RouteMetrics>,
    cache: &'static str,
    idp_call: bool,
    upstream_error: Option<UpstreamErrorKind>,
    /// The request's server span (disabled with traces off).
    span: tracing::Span,
    /// Whether its trace is exported: only then are its child spans opened.
    sampled: bool,
}

/// A request that passed its route's checks: its validated caller (none for `caller_auth = "none"`), the
/// upstream token acquired for it, and the deadline that still runs.
struct Admitted {
    caller: Option<Caller>,
    acquired: Acquired,
    deadline: tokio::time::Instant,
}

impl Proxy {
    pub(crate) fn new(
        config: &Config,
        authenticator: Arc<Authenticator>,
        exchanger: Exchanger,
        metrics: &Arc<Metrics>,
        workers: usize,
    ) -> Result<Self, crate::tls::TlsError> {
        Ok(Proxy {
            routes: RouteTable::new(&config.routes, metrics, workers, |route| {
                exchanger.request_key(route)
            })?,
            metrics: Arc::clone(metrics),
            validate_metrics: metrics.route(token_api::VALIDATE_ROUTE),
            inbound_route: token_api::inbound_route(config),
            max_header_bytes: config.listen.max_header_bytes,
            microsoft_sidecar: config.compat.microsoft_sidecar,
            downstream_buffers: tokio::sync::Semaphore::new(
                compat::MAX_BUFFERED_DOWNSTREAM_ANSWERS,
            ),
            idle_timeout: config.listen.idle_timeout,
            authenticator,
            exchanger,
            api_prefix: config.listen.api_prefix.as_deref().map(Prefix::new),
        })
    }

    pub(crate) fn authenticator(&self) -> &Arc<Authenticator> {
        &self.authenticator
    }

    /// Serves one caller request.
    pub(crate) async fn handle(
        &self,
        request: Request<Incoming>,
        peer: Arc<Peer>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let _in_flight = self.metrics.request_started();
        let method = request.method().clone();
        let request_id = request_id::of(&request);
        // What only the access log reads, taken (cheap clones of shared bytes) only when it is on.
        let logged = tracing::enabled!(target: "access", tracing::Level::INFO).then(|| {
            (
                request.uri().clone(),
                request.headers().get("traceparent").cloned(),
            )
        });
        // HTTP semantic-convention attributes; the path without its query (SPEC §15).
        let span = tracing::info_span!(
            target: SPAN_TARGET,
            "request",
            otel.name = method.as_str(),
            otel.kind = "server",
            otel.status_code = Empty,
            http.request.method = method.as_str(),
            url.path = request.uri().path(),
            url.scheme = if peer.tls { "https" } else { "http" },
            network.protocol.version = protocol_version(request.version()),
            http.route = Empty,
            http.response.status_code = Empty,
            obo.route = Empty,
            obo.request_id = request_id.to_str().unwrap_or("-"),
            obo.refusal = Empty,
        );
        trace::continue_trace(&span, request.headers());
        let sampled = trace::sampled(&span);
        let mut reason = None;
        let mut outcome = Outcome {
            started,
            route: None,
            metrics: None,
            cache: "-",
            idp_call: false,
            upstream_error: None,
            span: span.clone(),
            sampled,
        };
        // A bug that panics answers this request with 500 instead of resetting the caller's connection (and
        // every other request multiplexed on it).
        let answered =
            std::panic::AssertUnwindSafe(self.answer(request, peer, &request_id, &mut outcome))
                .catch_unwind()
                .instrument(span.clone())
                .await
                .unwrap_or(Err(ProxyError::Internal("the request handler panicked")));
        let mut response = match answered {
            Ok(response) => response,
            Err(error) => {
                log_error(&error, outcome.route, &request_id);
                // The refusal's code is for the access log and the trace only.
                if logged.is_some() || sampled {
                    reason = error.reason();
                }
                error.to_response::<Full<Bytes>>().map(Either::Right)
            }
        };
        response
            .headers_mut()
            .insert("x-request-id", request_id.clone());
        let status = response.status().as_u16();
        let elapsed = started.elapsed();
        span.record("http.response.status_code", status);
        if let Some(reason) = &reason {
            span.record("obo.refusal", reason.as_ref());
        }
        if status >= 500 {
            span.record("otel.status_code", "error");
        }
        match outcome.metrics {
            Some(route) => {
                route.record_request(status, elapsed);
                if let Some(kind) = outcome.upstream_error {
                    route.record_upstream_error(kind);
                }
            }
            None => {
                self.metrics
                    .record_request(crate::telemetry::NO_ROUTE, status, elapsed);
            }
        }
        if let Some((uri, traceparent)) = logged {
            // Microsecond resolution, printed as such (4.164, not 4.164372999999999).
            #[allow(
                clippy::cast_precision_loss,
                reason = "microseconds of one request fit f64"
            )]
            let duration_ms = elapsed.as_micros() as f64 / 1000.0;
            // Flat fields (SPEC §15); the path without its query; a refusal's reason is a short code that
            // names what was wrong, never the token.
            tracing::info!(
                target: "access",
                route = outcome.route.unwrap_or("-"),
                method = method.as_str(),
                path = uri.path(),
                status,
                duration_ms,
                cache = outcome.cache,
                idp_call = outcome.idp_call,
                request_id = request_id.to_str().unwrap_or("-"),
                trace_id = trace::trace_id(&span)
                    .as_deref()
                    .or_else(|| traceparent.as_ref().and_then(trace_id))
                    .unwrap_or("-"),
                reason = reason.as_deref().unwrap_or("-"),
                "request"
            );
        }
        response
    }

    /// route -> authenticate -> acquire -> forward.
    async fn answer<'a>(
        &'a self,
        request: Request<Incoming>,
        peer: Arc<Peer>,
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
        if let Some(prefix) = &self.api_prefix {
            if prefix.matches(&path) {
                return self
                    .token_api(
                        &request,
                        &peer,
                        token_api::endpoint(request.method(), prefix, &path, request.uri().path())?,
                        outcome,
                    )
                    .await;
            }
            // A token API path that dot segments lead out of (`/.obo/forward-auth/x/..;/..;/..;/other`, as
            // an ingress may append a caller's path) never reaches a route.
            if prefix.opens(request.uri().path()) {
                return Err(ProxyError::BadRequest(
                    crate::error::RequestDefect::AboveRoot,
                ));
            }
        }
        if self.microsoft_sidecar
            && let Some(endpoint) = compat::endpoint(request.method(), &path)
        {
            return self
                .microsoft_sidecar(request, &peer, endpoint, request_id, outcome)
                .await;
        }
        let entry = self
            .routes
            .find(&path, host.as_deref(), request.method())
            .ok_or(ProxyError::NoRoute)?;
        let admitted = self.admit(&request, &peer, entry, None, outcome).await?;
        self.forward(request, peer, &path, entry, admitted, request_id, outcome)
            .await
    }

    /// The checks every way of using a route shares (proxying, the token API): the route's deadline
    /// starts, its caller is authenticated and authorized, and its upstream token is acquired.
    /// `changed` is the route as a caller's overrides changed its token (Microsoft's sidecar endpoints): its
    /// token is acquired instead, keyed afresh; the policy and deadline stay the route's.
    async fn admit<'a>(
        &self,
        request: &Request<Incoming>,
        peer: &Peer,
        entry: &'a RouteEntry,
        changed: Option<&Route>,
        outcome: &mut Outcome<'a>,
    ) -> Result<Admitted, ProxyError> {
        let route = &entry.route;
        outcome.route = Some(&route.name);
        outcome.metrics = Some(&entry.metrics);
        if !outcome.span.is_disabled() {
            trace::rename(
                &outcome.span,
                format!("{} {}", request.method(), route.path_prefix),
            );
            outcome
                .span
                .record("http.route", route.path_prefix.as_str())
                .record("obo.route", route.name.as_str());
        }
        let deadline = outcome.started + route.timeout;
        let caller = self.caller(request, peer, route, deadline, outcome).await?;
        let acquisition = if outcome.sampled {
            tracing::info_span!(
                target: SPAN_TARGET,
                "acquire token",
                obo.token = route.token.as_str(),
                obo.cache = Empty,
            )
        } else {
            tracing::Span::none()
        };
        let (token_route, request_key) = match changed {
            Some(changed) => (changed, None),
            None => (route, entry.request_key.as_ref()),
        };
        let acquired = tokio::time::timeout_at(
            deadline,
            self.exchanger
                .acquire(token_route, request_key, subject(caller.as_ref()))
                .instrument(acquisition.clone()),
        )
        .await
        .map_err(|_| ProxyError::TokenDeadline)??;
        record_lookup(token_route, acquired.lookup, outcome);
        acquisition.record("obo.cache", outcome.cache);
        Ok(Admitted {
            caller,
            acquired,
            deadline,
        })
    }

    /// Sends the request upstream with the acquired token and streams the answer back; a WebSocket upgrade
    /// both sides agreed to becomes a tunnel.
    #[allow(
        clippy::too_many_arguments,
        reason = "the one request's parts, each used once"
    )]
    async fn forward<'a>(
        &'a self,
        mut request: Request<Incoming>,
        peer: Arc<Peer>,
        path: &RequestPath,
        entry: &'a RouteEntry,
        admitted: Admitted,
        request_id: &HeaderValue,
        outcome: &mut Outcome<'a>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let route = &entry.route;
        let Admitted {
            caller,
            acquired,
            deadline,
        } = admitted;
        let claim_headers = claim_headers(route, caller.as_ref());
        let uri = forward::upstream_uri(
            entry.upstream.as_ref().ok_or(ProxyError::Internal(
                "the route's upstream URL is not a request target",
            ))?,
            path.after(entry.prefix.len()),
            request.uri().query(),
        )?;
        let upgrade = forward::requested_upgrade(&request).filter(|_| !route.http2);
        let caller_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut request));
        let upstream = forward::upstream_request(
            request,
            Outgoing {
                uri,
                peer: &peer,
                route,
                authorization: acquired.header.clone(),
                claim_headers,
                request_id: request_id.clone(),
                upgrade,
                strip: &entry.strip,
            },
        );
        let mut response = self
            .send(entry, upstream, &acquired, deadline, outcome)
            .await?;
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            let agreed = response
                .headers()
                .get(header::UPGRADE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
            let Some(caller_upgrade) = caller_upgrade.filter(|_| agreed) else {
                // A 101 nobody asked for, or to another protocol: never splice an unvalidated tunnel.
                outcome.upstream_error = Some(UpstreamErrorKind::Reset);
                return Err(ProxyError::UpstreamSwitched);
            };
            let tunnel = tunnel::splice(
                caller_upgrade,
                hyper::upgrade::on(&mut response),
                route.name.clone(),
                self.idle_timeout,
            );
            // In the caller's connection task: the tunnel holds its max_connections permit and is drained
            // with it.
            peer.tunnels.run(Box::pin(tunnel));
        }
        forward::clean_response_headers(response.headers_mut(), switching);
        Ok(response.map(Either::Left))
    }

    /// Sends `upstream` to `entry`'s upstream before `deadline`, in a client span whose context the upstream
    /// receives as its `traceparent`; a 401 drops the cached token that was sent (`acquired`). Every request the sidecar
    /// makes to an upstream goes through here.
    async fn send(
        &self,
        entry: &RouteEntry,
        mut upstream: Request<Incoming>,
        acquired: &Acquired,
        deadline: Instant,
        outcome: &mut Outcome<'_>,
    ) -> Result<Response<Incoming>, ProxyError> {
        // A client span until the upstream's response head; the upstream's own spans hang under it.
        let span = if outcome.sampled {
            tracing::info_span!(
                target: SPAN_TARGET,
                "upstream",
                otel.name = upstream.method().as_str(),
                otel.kind = "client",
                otel.status_code = Empty,
                http.request.method = upstream.method().as_str(),
                server.address = upstream.uri().host().unwrap_or_default(),
                server.port = upstream.uri().port_u16().unwrap_or(
                    match upstream.uri().scheme_str() {
                        Some("https") => 443,
                        _ => 80,
                    }
                ),
                url.path = upstream.uri().path(),
                http.response.status_code = Empty,
                error.type = Empty,
            )
        } else {
            tracing::Span::none()
        };
        // An unsampled request still tells the upstream its trace (and that it is not sampled).
        let parent = if span.is_disabled() {
            &outcome.span
        } else {
            &span
        };
        trace::inject(parent, upstream.headers_mut());
        let answered = tokio::time::timeout_at(deadline, entry.client().request(upstream))
            .instrument(span.clone())
            .await;
        let response = match answered {
            Err(_) => {
                outcome.upstream_error = Some(UpstreamErrorKind::Timeout);
                span.record("error.type", "timeout")
                    .record("otel.status_code", "error");
                return Err(ProxyError::UpstreamTimeout);
            }
            Ok(Err(error)) => {
                let kind = forward::upstream_error_kind(&error);
                outcome.upstream_error = Some(kind);
                span.record("error.type", kind.as_str())
                    .record("otel.status_code", "error");
                return Err(ProxyError::UpstreamConnect(Box::new(error)));
            }
            Ok(Ok(response)) => response,
        };
        span.record("http.response.status_code", response.status().as_u16());
        if response.status().is_server_error() {
            span.record("otel.status_code", "error");
        }
        if response.status() == StatusCode::UNAUTHORIZED
            && let Some(sent) = &acquired.sent
            && self.exchanger.forget(sent).await
        {
            tracing::info!(route = %entry.route.name, "upstream refused its token; dropped the cached one");
        }
        Ok(response)
    }

    /// Forward-auth (SPEC §16): the ingress's original request must be one the routing table gives to route
    /// `name` (which has `forward_auth = true`); its caller is admitted as a proxied request's would be, and
    /// the answer carries the upstream `Authorization` and the claim headers instead of the request going on.
    async fn forward_auth<'a>(
        &'a self,
        request: &Request<Incoming>,
        peer: &Peer,
        name: &str,
        suffix: Option<RequestPath>,
        outcome: &mut Outcome<'a>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let entry = self
            .routes
            .named(name)
            .filter(|e| e.route.forward_auth)
            .ok_or(ProxyError::NoRoute)?;
        let original = forward_auth::original(request, suffix)?;
        // An original request that another route (or none) would serve is not this route's to allow: the
        // ingress's location and the route disagree.
        let matched = self
            .routes
            .find(&original.path, original.host.as_deref(), &original.method);
        if !matched.is_some_and(|m| std::ptr::eq(m, entry)) {
            return Err(ProxyError::NoRoute);
        }
        let admitted = self.admit(request, peer, entry, None, outcome).await?;
        let claims = claim_headers(&entry.route, admitted.caller.as_ref());
        let names = entry
            .route
            .forward_claims
            .iter()
            .map(|(name, _)| name.clone());
        Ok(
            forward_auth::allow::<Full<Bytes>>(admitted.acquired.header, claims, names)
                .map(Either::Right),
        )
    }

    /// Serves a token API endpoint with the proxy's validation, policy, cache and errors.
    async fn token_api<'a>(
        &'a self,
        request: &Request<Incoming>,
        peer: &Peer,
        endpoint: token_api::Endpoint<'_>,
        outcome: &mut Outcome<'a>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let body = match endpoint {
            token_api::Endpoint::Validate => {
                outcome.route = Some(token_api::VALIDATE_ROUTE);
                outcome.metrics = Some(&self.validate_metrics);
                let deadline = outcome.started + self.inbound_route.timeout;
                let caller = self
                    .caller(request, peer, &self.inbound_route, deadline, outcome)
                    .await?;
                let claims = caller.map(|c| serde_json::Value::Object(c.all_claims()));
                serde_json::json!({ "claims": claims })
            }
            token_api::Endpoint::AuthorizationHeader(name) => {
                let entry = self
                    .routes
                    .named(name)
                    .filter(|e| e.route.token_api)
                    .ok_or(ProxyError::NoRoute)?;
                let admitted = self.admit(request, peer, entry, None, outcome).await?;
                let expires_on = admitted
                    .acquired
                    .expires_on(subject(admitted.caller.as_ref()));
                let header = admitted
                    .acquired
                    .header
                    .as_ref()
                    .and_then(|h| h.to_str().ok())
                    .ok_or(ProxyError::NoRoute)?;
                serde_json::json!({ "authorization_header": header, "expires_on": expires_on })
            }
            token_api::Endpoint::ForwardAuth { route, suffix } => {
                return self
                    .forward_auth(request, peer, route, suffix, outcome)
                    .await;
            }
        };
        Ok(token_api::answer(&body).map(Either::Right))
    }

    /// The validated caller of `route` (none for `caller_auth = "none"`), its policy applied.
    async fn caller(
        &self,
        request: &Request<Incoming>,
        peer: &Peer,
        route: &Route,
        deadline: tokio::time::Instant,
        outcome: &Outcome<'_>,
    ) -> Result<Option<Caller>, ProxyError> {
        if route.caller_auth == CallerAuth::None {
            return Ok(None);
        }
        let span = if outcome.sampled {
            tracing::info_span!(
                target: SPAN_TARGET,
                "validate caller",
                obo.validated_cache = Empty,
                obo.refusal = Empty,
            )
        } else {
            tracing::Span::none()
        };
        let authenticated = self
            .authenticator
            .authenticate(request.headers(), &peer.last_token)
            .instrument(span.clone());
        let caller = tokio::time::timeout_at(deadline, authenticated)
            .await
            .map_err(|_| ProxyError::KeysUnavailable {
                retry_after: crate::auth::jwks::KEYS_RETRY_AFTER,
            })
            .and_then(|authenticated| {
                let caller = authenticated?;
                authorize(&caller.claims, route)?;
                Ok(caller)
            });
        if let Err(error) = &caller
            && !span.is_disabled()
            && let Some(reason) = error.reason()
        {
            span.record("obo.refusal", reason.as_ref());
        }
        caller.map(Some)
    }
}

/// What the exchanger needs of a validated caller.
fn subject(caller: Option<&Caller>) -> Option<Subject<'_>> {
    caller.map(|caller| Subject {
        token: &caller.token,
        digest: &caller.digest,
        exp: caller.claims.exp,
        tid: caller.claims.tid.as_deref(),
    })
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

/// The `forward_claims` headers of `route` from the caller's validated claims. Strings as they are, numbers
/// and booleans as JSON, arrays of those joined with `,`; a claim that is absent, an object, or not a valid
/// header value is not sent.
fn claim_headers(route: &Route, caller: Option<&Caller>) -> Vec<(http::HeaderName, HeaderValue)> {
    fn text(value: &serde_json::Value) -> Option<String> {
        match value {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            serde_json::Value::Bool(b) => Some(b.to_string()),
            serde_json::Value::Null
            | serde_json::Value::Array(_)
            | serde_json::Value::Object(_) => None,
        }
    }
    let Some(caller) = caller.filter(|_| !route.forward_claims.is_empty()) else {
        return Vec::new();
    };
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

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, not all zeros); `None` for anything
/// else.
fn trace_id(traceparent: &HeaderValue) -> Option<&str> {
    let text = traceparent.to_str().ok()?;
    let mut parts = text.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    (hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0'))
    .then_some(trace)
}

/// Logs a refused request once. IdP failures were already logged where they happened (with the
/// `client-request-id`), so here they are only a debug line.
fn log_error(error: &ProxyError, route: Option<&str>, request_id: &HeaderValue) {
    let route = route.unwrap_or("-");
    let request_id = request_id.to_str().unwrap_or("-");
    let detail = crate::error::chain(error);
    match (error.fault(), error) {
        (Fault::Caller | Fault::Idp, _) | (Fault::Internal, ProxyError::IdpMisconfigured) => {
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

/// The `network.protocol.version` of a request's HTTP version.
fn protocol_version(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "0.9",
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "1.1",
    }
}
