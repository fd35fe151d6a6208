//! Serves Microsoft's auth sidecar endpoints (`compat`: what they are and how they answer) with the proxy's
//! own admission and upstream calls.

use http::{HeaderValue, Request, Response, header};
use http_body_util::{BodyExt as _, Either};
use hyper::body::Incoming;

use super::compat::{Endpoint, MAX_DOWNSTREAM_BODY_BYTES, Overrides, answer, downstream_result};
use super::{Outcome, Proxy, ProxyBody};
use crate::config::{CallerAuth, TokenKind};
use crate::error::ProxyError;
use crate::forward;
use crate::route::{RequestPath, RouteEntry};
use crate::server::Peer;

impl Proxy {
    /// Serves one of Microsoft's sidecar endpoints.
    pub(super) async fn microsoft_sidecar<'a>(
        &'a self,
        request: Request<Incoming>,
        peer: &Peer,
        endpoint: Endpoint<'_>,
        request_id: &HeaderValue,
        outcome: &mut Outcome<'a>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (api, authenticated, downstream) = match endpoint {
            Endpoint::Validate => {
                // The token API's `/validate` under Microsoft's name: one label for both in logs and metrics.
                outcome.route = Some(super::token_api::VALIDATE_ROUTE);
                outcome.metrics = Some(&self.validate_metrics);
                let deadline = outcome.started + self.inbound_route.timeout;
                let caller = self
                    .caller(&request, peer, &self.inbound_route, deadline, outcome)
                    .await?
                    .ok_or(ProxyError::Internal("/Validate without a caller"))?;
                // Theirs hands the caller its own token back, with the token's claims as they are.
                let body = serde_json::json!({
                    "protocol": "Bearer",
                    "token": caller.token.expose(),
                    "claims": caller.all_claims(),
                });
                return Ok(answer(&body, &[]).map(Either::Right));
            }
            Endpoint::AuthorizationHeader { api, authenticated } => (api, authenticated, false),
            Endpoint::DownstreamApi { api, authenticated } => (api, authenticated, true),
        };
        let entry = self.api(api, authenticated)?;
        let overrides = Overrides::read(
            request.uri().query(),
            &entry.route.compat.overrides,
            &entry.route.compat.scopes,
        );
        let changed = overrides.route(&entry.route);
        // Scopes come from the route or the call; with neither, Microsoft's 400.
        let token_route = changed.as_ref().unwrap_or(&entry.route);
        if matches!(token_route.token, TokenKind::Obo | TokenKind::App)
            && token_route.scopes.is_empty()
            && token_route.audience.is_empty()
            && token_route.resource.is_empty()
        {
            return Err(ProxyError::UnknownApi(api.to_owned()));
        }
        let admitted = self
            .admit(&request, peer, entry, changed.as_ref(), outcome)
            .await?;
        // Logged once the caller is known to be one (an anonymous flood of junk parameters logs nothing).
        if !overrides.ignored.is_empty() {
            tracing::warn!(
                route = %entry.route.name,
                ignored = %overrides.ignored.join(", "),
                "optionsOverride parameters ignored (not in the route's compat_overrides, BaseUrl, or not supported)"
            );
        }
        if !downstream {
            let header = admitted
                .acquired
                .header
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .ok_or(ProxyError::UnknownApi(api.to_owned()))?;
            let body = serde_json::json!({ "authorizationHeader": header });
            return Ok(answer(&body, &overrides.ignored).map(Either::Right));
        }
        let route = &entry.route;
        let relative = overrides
            .relative_path
            .as_deref()
            .unwrap_or(&route.compat.relative_path);
        let (relative, query) = relative
            .split_once('?')
            .map_or((relative, None), |(path, query)| (path, Some(query)));
        let relative = RequestPath::parse(&format!("/{}", relative.trim_start_matches('/')))?;
        let uri = forward::upstream_uri(
            entry.upstream.as_ref().ok_or(ProxyError::Internal(
                "the route's upstream URL is not a request target",
            ))?,
            relative.after(0),
            query,
        )?;
        // The caller's body goes on as it is (theirs re-encodes it as UTF-8 text); no other header of the
        // caller's does.
        let content_type = overrides
            .content_type
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
            .or_else(|| request.headers().get(header::CONTENT_TYPE).cloned());
        let accept = overrides
            .accept
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
            .unwrap_or_else(|| HeaderValue::from_static("application/json"));
        let method = overrides
            .http_method
            .clone()
            .unwrap_or_else(|| route.compat.http_method.clone());
        // A body on a method that carries none could be read by the upstream as the next request.
        let has_body = request.headers().contains_key(header::TRANSFER_ENCODING)
            || request
                .headers()
                .get(header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() != b"0");
        if has_body && matches!(method, http::Method::GET | http::Method::HEAD) {
            return Err(ProxyError::BadRequest(
                crate::error::RequestDefect::Unforwardable,
            ));
        }
        let mut upstream = Request::new(request.into_body());
        *upstream.method_mut() = method;
        *upstream.uri_mut() = uri;
        let headers = upstream.headers_mut();
        if let Some(mut authorization) = admitted.acquired.header.clone() {
            authorization.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, authorization);
        }
        headers.insert(header::ACCEPT, accept);
        // The route's claim headers, as the proxy sends them.
        for (name, value) in super::claim_headers(route, admitted.caller.as_ref()) {
            headers.insert(name, value);
        }
        if let Some(content_type) = content_type {
            headers.insert(header::CONTENT_TYPE, content_type);
        }
        headers.insert("x-request-id", request_id.clone());
        let response = self
            .send(
                entry,
                upstream,
                &admitted.acquired,
                admitted.deadline,
                outcome,
            )
            .await?;
        let (parts, body) = response.into_parts();
        let _permit = tokio::time::timeout_at(admitted.deadline, self.downstream_buffers.acquire())
            .await
            .map_err(|_| ProxyError::Busy)?
            .map_err(|_| ProxyError::Internal("the downstream buffer permits were closed"))?;
        let body = tokio::time::timeout_at(
            admitted.deadline,
            http_body_util::Limited::new(body, MAX_DOWNSTREAM_BODY_BYTES).collect(),
        )
        .await
        .map_err(|_| ProxyError::UpstreamTimeout)?
        .map_err(ProxyError::UpstreamConnect)?
        .to_bytes();
        let result = downstream_result(parts.status.as_u16(), &parts.headers, &body);
        Ok(answer(&result, &overrides.ignored).map(Either::Right))
    }

    /// The route `name` names for one of Microsoft's endpoints: served on the token API for the authenticated
    /// ones; without caller authentication for the `…Unauthenticated` ones (which need no `token_api`). The
    /// exact name first, then one that differs in letter case only (.NET names match so).
    fn api(&self, name: &str, authenticated: bool) -> Result<&RouteEntry, ProxyError> {
        let entry = self
            .routes
            .named(name)
            .or_else(|| self.routes.named_ignoring_case(name))
            .ok_or_else(|| ProxyError::UnknownApi(name.to_owned()))?;
        let open = entry.route.caller_auth == CallerAuth::None;
        match (authenticated, open) {
            (true, false) if entry.route.token_api => Ok(entry),
            (true, _) => Err(ProxyError::UnknownApi(name.to_owned())),
            (false, true) => Ok(entry),
            (false, false) => Err(ProxyError::ApiNeedsCaller(name.to_owned())),
        }
    }
}
