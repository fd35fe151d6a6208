//! The HTTP side of the development IdP: its routes (discovery, JWKS, token endpoint, development hooks).

use crate::oauth::is_guid;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Map, json};

use super::answers::{
    Body, ConnectionReset, error_response, json_response, method_not_allowed, read_body,
};
use super::grants::token;
use super::state::{Authority, State};
use super::types::{DEFAULT_CLAIMS_CHALLENGE, DEFAULT_TOKEN_LIFETIME, Failure, TokenClaims, lock};

pub(super) async fn route(
    state: &State,
    request: Request<Incoming>,
) -> Result<Response<Body>, ConnectionReset> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    if let Some((tenant, endpoint)) = tenant_path(&path) {
        let authority = is_guid(tenant).then(|| state.tenant(tenant));
        return match (endpoint, method, authority) {
            (TenantPath::Discovery, Method::GET, authority) => {
                Ok(discovery_response(state, authority.as_ref()))
            }
            (TenantPath::Token, Method::POST, Some(authority)) => {
                token(state, request, &authority).await
            }
            (_, _, None) => Ok(unknown_tenant()),
            (_, _, Some(_)) => Ok(method_not_allowed()),
        };
    }
    let response = match (path.as_str(), method) {
        ("/.well-known/openid-configuration", Method::GET) => {
            discovery_response(state, Some(&state.root()))
        }
        ("/jwks", Method::GET) => jwks_response(state),
        ("/token", Method::POST) => return token(state, request, &state.root()).await,
        ("/dev/token", Method::POST) => dev_token(state, request).await,
        ("/dev/fail", Method::POST) => dev_fail(state, request).await,
        ("/dev/stats", Method::GET) => json_response(
            StatusCode::OK,
            &json!({
                "token_requests": state.token_requests.load(Ordering::SeqCst),
                "discovery_requests": state.discovery_requests.load(Ordering::SeqCst),
                "jwks_requests": state.jwks_requests.load(Ordering::SeqCst),
            }),
        ),
        (
            "/.well-known/openid-configuration"
            | "/jwks"
            | "/token"
            | "/dev/token"
            | "/dev/fail"
            | "/dev/stats",
            _,
        ) => method_not_allowed(),
        _ => error_response(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    };
    Ok(response)
}

/// An endpoint Entra ID serves per tenant, under `/{tenant}/`.
#[derive(Clone, Copy, Debug)]
pub(super) enum TenantPath {
    /// `/{tenant}/v2.0/.well-known/openid-configuration`
    Discovery,
    /// `/{tenant}/oauth2/v2.0/token`
    Token,
}

/// The tenant segment and endpoint of a per-tenant path; the tenant may still be no GUID.
pub(super) fn tenant_path(path: &str) -> Option<(&str, TenantPath)> {
    let (tenant, rest) = path.strip_prefix('/')?.split_once('/')?;
    match rest {
        "v2.0/.well-known/openid-configuration" => Some((tenant, TenantPath::Discovery)),
        "oauth2/v2.0/token" => Some((tenant, TenantPath::Token)),
        _ => None,
    }
}

/// The discovery document of `authority` (OpenID Connect Discovery §4); `None`: a tenant that is not a
/// GUID, 404. Counted either way.
pub(super) fn discovery_response(state: &State, authority: Option<&Authority>) -> Response<Body> {
    state.discovery_requests.fetch_add(1, Ordering::SeqCst);
    let Some(authority) = authority else {
        return unknown_tenant();
    };
    if state.jwks_unavailable.load(Ordering::SeqCst) {
        return key_set_outage();
    }
    json_response(StatusCode::OK, &state.discovery(authority))
}

/// The JWKS (RFC 7517 §5) with the configured `Cache-Control: max-age`.
pub(super) fn jwks_response(state: &State) -> Response<Body> {
    state.jwks_requests.fetch_add(1, Ordering::SeqCst);
    if state.jwks_unavailable.load(Ordering::SeqCst) {
        return key_set_outage();
    }
    let mut response = json_response(StatusCode::OK, &state.jwks());
    let max_age = *lock(&state.jwks_max_age);
    if let Some(value) =
        max_age.and_then(|max_age| HeaderValue::try_from(format!("max-age={max_age}")).ok())
    {
        response.headers_mut().insert(header::CACHE_CONTROL, value);
    }
    response
}

pub(super) fn key_set_outage() -> Response<Body> {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
        "injected outage: the key set and discovery documents are unavailable",
    )
}

pub(super) fn unknown_tenant() -> Response<Body> {
    error_response(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such tenant: a tenant id is a GUID",
    )
}

/// The body of `POST /dev/token`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DevTokenRequest {
    pub(super) sub: String,
    #[serde(default)]
    pub(super) aud: Option<String>,
    #[serde(default)]
    pub(super) scp: Option<String>,
    #[serde(default)]
    pub(super) roles: Vec<String>,
    #[serde(default)]
    pub(super) tid: Option<String>,
    #[serde(default)]
    pub(super) oid: Option<String>,
    #[serde(default)]
    pub(super) lifetime_secs: Option<u64>,
}

pub(super) async fn dev_token(state: &State, request: Request<Incoming>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let bytes = match read_body(&parts.headers, body).await {
        Ok(bytes) => bytes,
        Err(response) => return response,
    };
    let body: DevTokenRequest = match serde_json::from_slice(&bytes) {
        Ok(body) => body,
        Err(error) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("expected a JSON object with at least 'sub': {error}"),
            );
        }
    };
    let lifetime = body
        .lifetime_secs
        .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
    let claims = TokenClaims {
        sub: body.sub,
        aud: body.aud,
        scp: body.scp,
        roles: body.roles,
        tid: body.tid,
        oid: body.oid,
        lifetime,
        extra: Map::new(),
    };
    let access_token = state.mint(&claims);
    let wants_text = parts
        .headers
        .get_all(header::ACCEPT)
        .iter()
        .any(|value| String::from_utf8_lossy(value.as_bytes()).contains("text/plain"));
    if wants_text {
        let mut response = Response::new(Full::new(Bytes::from(access_token)));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        return response;
    }
    json_response(
        StatusCode::OK,
        &json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": lifetime.as_secs(),
        }),
    )
}

/// The body of `POST /dev/fail`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DevFailRequest {
    pub(super) mode: String,
    #[serde(default = "one")]
    pub(super) count: u32,
    #[serde(default)]
    pub(super) delay_ms: Option<u64>,
    #[serde(default)]
    pub(super) retry_after: Option<u64>,
    #[serde(default)]
    pub(super) claims: Option<String>,
}

pub(super) fn one() -> u32 {
    1
}

pub(super) async fn dev_fail(state: &State, request: Request<Incoming>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let bytes = match read_body(&parts.headers, body).await {
        Ok(bytes) => bytes,
        Err(response) => return response,
    };
    let body: DevFailRequest = match serde_json::from_slice(&bytes) {
        Ok(body) => body,
        Err(error) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("expected a JSON object with 'mode': {error}"),
            );
        }
    };
    let failure = match body.mode.as_str() {
        "500" => Failure::ServerError,
        "429" => Failure::TooManyRequests {
            retry_after_secs: body.retry_after.unwrap_or(1),
        },
        "delay" => match body.delay_ms {
            Some(delay_ms) => Failure::Delay(Duration::from_millis(delay_ms)),
            None => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "mode 'delay' needs 'delay_ms'",
                );
            }
        },
        "invalid_grant" => Failure::InvalidGrant,
        "interaction_required" => Failure::InteractionRequired {
            claims: body
                .claims
                .unwrap_or_else(|| DEFAULT_CLAIMS_CHALLENGE.to_owned()),
        },
        "consent_required" => Failure::ConsentRequired,
        "invalid_client" => Failure::InvalidClient,
        "non_json_200" => Failure::NonJson200,
        "empty_body_200" => Failure::EmptyBody200,
        "not_bearer" => Failure::NotBearer,
        "expires_in_absent" => Failure::ExpiresInAbsent,
        "reset_connection" => Failure::ResetConnection,
        _ => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "mode must be one of 500, 429, delay, invalid_grant, interaction_required, \
                 consent_required, invalid_client, non_json_200, empty_body_200, not_bearer, \
                 expires_in_absent, reset_connection",
            );
        }
    };
    state.fail_next(failure, body.count);
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}
