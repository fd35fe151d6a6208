//! Upstream tokens: Entra On-Behalf-Of (jwt-bearer) and client-credentials requests to the IdP's token
//! endpoint, every IdP answer mapped to an [`ExchangeError`], and the [`cache`] in front of them.
//! Only this module talks to the token endpoint.

pub mod cache;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::HeaderValue;
use serde::Deserialize;
use serde_json::Value;

use crate::auth::{Caller, now_unix};
use crate::config::{CacheSettings, Identity, Route, TokenKind};
use crate::error::ProxyError;
use crate::secret::Secret;
use cache::{CacheKey, TokenCache};

/// RFC 7523 / Entra OBO grant type.
pub const GRANT_JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// IdP answers are a few KiB; a larger one is refused rather than buffered.
const MAX_IDP_BODY_BYTES: usize = 256 * 1024;
/// A cached token is a miss this close to its `exp`, whatever the margin: it could expire in flight.
pub const MIN_REMAINING_LIFETIME: Duration = Duration::from_secs(30);
/// Pause before the one retry of a failed token request.
const RETRY_DELAY: Duration = Duration::from_millis(100);

/// An upstream token ready to send.
#[derive(Debug)]
pub struct UpstreamToken {
    /// `Bearer <token>`, marked sensitive.
    pub header: HeaderValue,
    /// Unix seconds; 0 when unknown.
    pub expires_on: u64,
    /// How long the cache may serve it.
    pub cache_for: Duration,
}

/// What the proxy sends upstream, and the cache entry it came from (to drop it on an upstream 401).
pub struct Acquired {
    pub header: Option<HeaderValue>,
    pub key: Option<CacheKey>,
    pub from_cache: bool,
}

/// Why no upstream token could be had. Fields are for logs; the caller sees the mapped [`ProxyError`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExchangeError {
    #[error("IdP unavailable: {reason}")]
    Unavailable {
        reason: String,
        retry_after: Option<Duration>,
    },
    #[error("IdP rejected the subject token ({error}: {codes})")]
    SubjectRejected { error: String, codes: String },
    #[error("IdP requires more claims ({error})")]
    ClaimsChallenge { error: String, claims: String },
    #[error("IdP reports missing consent ({codes})")]
    ConsentRequired { codes: String },
    #[error("IdP refused the sidecar's request: {error} ({codes})")]
    Misconfigured { error: String, codes: String },
}

impl ExchangeError {
    /// The caller's answer for this failure on `route`.
    pub fn to_proxy_error(&self, route: &Route, identity: &Identity) -> ProxyError {
        match self {
            ExchangeError::Unavailable { retry_after, .. } => ProxyError::IdpUnavailable {
                retry_after: *retry_after,
            },
            ExchangeError::SubjectRejected { .. } => ProxyError::IdpRejectedSubject,
            ExchangeError::ClaimsChallenge { claims, .. } => ProxyError::IdpClaimsChallenge {
                authorization_uri: authorization_uri(identity),
                claims: base64::engine::general_purpose::STANDARD.encode(claims),
            },
            ExchangeError::ConsentRequired { .. } => ProxyError::IdpConsentRequired {
                scope: route.scopes.join(" "),
            },
            ExchangeError::Misconfigured { error, .. } => ProxyError::IdpMisconfigured {
                error: error.clone(),
            },
        }
    }
}

/// `…/oauth2/v2.0/token` -> `…/oauth2/v2.0/authorize`.
fn authorization_uri(identity: &Identity) -> String {
    let endpoint = identity.token_endpoint.as_str();
    match endpoint.strip_suffix("/token") {
        Some(base) => format!("{base}/authorize"),
        None => endpoint.to_owned(),
    }
}

/// A successful token endpoint answer (RFC 6749 §5.1).
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    token_type: String,
    #[serde(default)]
    expires_in: Option<Value>,
}

/// An error answer (RFC 6749 §5.2, with Entra's extensions).
#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
    #[serde(default)]
    error_codes: Vec<Value>,
    #[serde(default)]
    suberror: Option<String>,
    #[serde(default)]
    claims: Option<String>,
}

/// Acquires upstream tokens for routes, through the cache.
pub struct Exchanger {
    identity: Option<Identity>,
    http: reqwest::Client,
    cache: TokenCache,
    expiry_margin: Duration,
}

impl Exchanger {
    pub fn new(
        identity: Option<Identity>,
        http: reqwest::Client,
        settings: &CacheSettings,
    ) -> Self {
        Exchanger {
            identity,
            http,
            cache: TokenCache::new(settings.max_entries),
            expiry_margin: settings.expiry_margin,
        }
    }

    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    /// The `Authorization` value `route` sends upstream for `caller`.
    pub async fn acquire(&self, route: &Route, caller: &Caller) -> Result<Acquired, ProxyError> {
        let identity = match route.token {
            TokenKind::None => {
                return Ok(Acquired {
                    header: None,
                    key: None,
                    from_cache: false,
                });
            }
            TokenKind::Passthrough => {
                return Ok(Acquired {
                    header: Some(bearer_header(&caller.token)?),
                    key: None,
                    from_cache: false,
                });
            }
            TokenKind::Obo | TokenKind::App => self
                .identity
                .as_ref()
                .ok_or(ProxyError::Internal("route needs an identity"))?,
        };
        let subject = (route.token == TokenKind::Obo).then_some(&caller.token);
        let key = CacheKey::new(identity, route, subject);
        let subject_exp = subject.map(|_| caller.claims.exp);
        let mut fetched = false;
        let token = self
            .cache
            .get_or_fetch(key, async {
                fetched = true;
                self.request(identity, route, subject, subject_exp).await
            })
            .await
            .map_err(|e| {
                log_exchange_error(&e, route);
                e.to_proxy_error(route, identity)
            })?;
        Ok(Acquired {
            header: Some(token.header.clone()),
            key: Some(key),
            from_cache: !fetched,
        })
    }

    /// One token request, retried once when the IdP is unavailable.
    async fn request(
        &self,
        identity: &Identity,
        route: &Route,
        subject: Option<&Secret>,
        subject_exp: Option<u64>,
    ) -> Result<Arc<UpstreamToken>, ExchangeError> {
        match self
            .request_once(identity, route, subject, subject_exp)
            .await
        {
            Err(ExchangeError::Unavailable {
                retry_after: None,
                reason,
            }) => {
                tracing::debug!(route = %route.name, %reason, "token request failed; retrying once");
                tokio::time::sleep(RETRY_DELAY).await;
                self.request_once(identity, route, subject, subject_exp)
                    .await
            }
            other => other,
        }
    }

    async fn request_once(
        &self,
        identity: &Identity,
        route: &Route,
        subject: Option<&Secret>,
        subject_exp: Option<u64>,
    ) -> Result<Arc<UpstreamToken>, ExchangeError> {
        let scope = route.scopes.join(" ");
        let mut form: Vec<(&str, &str)> = vec![
            ("client_id", identity.client_id.as_str()),
            ("client_secret", identity.client_secret.expose()),
            ("scope", scope.as_str()),
        ];
        match subject {
            Some(assertion) => form.extend([
                ("grant_type", GRANT_JWT_BEARER),
                ("requested_token_use", "on_behalf_of"),
                ("assertion", assertion.expose()),
            ]),
            None => form.push(("grant_type", "client_credentials")),
        }
        let grant = if subject.is_some() { "obo" } else { "app" };
        let started = std::time::Instant::now();
        let response = self
            .http
            .post(identity.token_endpoint.clone())
            .header(http::header::ACCEPT, "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| ExchangeError::Unavailable {
                reason: if e.is_timeout() {
                    "token request timed out".to_owned()
                } else {
                    format!(
                        "token request failed: {}",
                        crate::auth::jwks::error_chain(&e)
                    )
                },
                retry_after: None,
            })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = read_limited(response).await?;
        tracing::debug!(route = %route.name, identity = %identity.name, grant, status = status.as_u16(),
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "token request answered");
        if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
            return Err(ExchangeError::Unavailable {
                reason: format!("token endpoint answered {status}"),
                retry_after: retry_after.or((status == http::StatusCode::TOO_MANY_REQUESTS)
                    .then_some(Duration::from_secs(1))),
            });
        }
        if !status.is_success() {
            return Err(map_error_answer(status, &body));
        }
        let answer: TokenResponse =
            serde_json::from_slice(&body).map_err(|_| ExchangeError::Unavailable {
                reason: "token endpoint answered 200 without a token response".to_owned(),
                retry_after: None,
            })?;
        if !answer.token_type.eq_ignore_ascii_case("bearer") {
            return Err(ExchangeError::Misconfigured {
                error: format!(
                    "token_type {:?} is not Bearer",
                    answer.token_type.chars().take(16).collect::<String>()
                ),
                codes: String::new(),
            });
        }
        if answer.access_token.is_empty() {
            return Err(ExchangeError::Unavailable {
                reason: "token endpoint answered an empty access_token".to_owned(),
                retry_after: None,
            });
        }
        let now = now_unix();
        let expires_on = expires_in_seconds(answer.expires_in.as_ref())
            .map(|secs| now.saturating_add(secs))
            .or_else(|| jwt_exp(&answer.access_token))
            .unwrap_or(0);
        let cache_for = cache_lifetime(now, expires_on, subject_exp, self.expiry_margin);
        let token = Secret::new(answer.access_token);
        Ok(Arc::new(UpstreamToken {
            header: bearer_header(&token).map_err(|_| ExchangeError::Misconfigured {
                error: "access_token is not a valid header value".to_owned(),
                codes: String::new(),
            })?,
            expires_on,
            cache_for,
        }))
    }
}

fn log_exchange_error(error: &ExchangeError, route: &Route) {
    match error {
        ExchangeError::Misconfigured { .. } => {
            tracing::error!(route = %route.name, %error, "token request refused");
        }
        ExchangeError::Unavailable { .. } => {
            tracing::warn!(route = %route.name, %error, "token request failed");
        }
        ExchangeError::SubjectRejected { .. }
        | ExchangeError::ClaimsChallenge { .. }
        | ExchangeError::ConsentRequired { .. } => {
            tracing::info!(route = %route.name, %error, "token request declined for this caller");
        }
    }
}

/// `Authorization: Bearer <token>`, marked sensitive (never logged by hyper, never HPACK-indexed).
pub fn bearer_header(token: &Secret) -> Result<HeaderValue, ProxyError> {
    let mut value = HeaderValue::try_from(format!("Bearer {}", token.expose()))
        .map_err(|_| ProxyError::InvalidToken("malformed bearer token"))?;
    value.set_sensitive(true);
    Ok(value)
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, ExchangeError> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_IDP_BODY_BYTES {
                    return Err(ExchangeError::Unavailable {
                        reason: "token endpoint answer too large".to_owned(),
                        retry_after: None,
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(ExchangeError::Unavailable {
                    reason: format!("reading the token answer failed: {e}"),
                    retry_after: None,
                });
            }
        }
    }
}

/// Maps an RFC 6749 §5.2 error answer (SPEC §4's table).
fn map_error_answer(status: http::StatusCode, body: &[u8]) -> ExchangeError {
    let Ok(answer) = serde_json::from_slice::<ErrorResponse>(body) else {
        return ExchangeError::Misconfigured {
            error: format!("token endpoint answered {status} without an OAuth error"),
            codes: String::new(),
        };
    };
    let codes = answer
        .error_codes
        .iter()
        .map(std::string::ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let description = answer.error_description.as_deref().unwrap_or_default();
    let consent = answer.suberror.as_deref() == Some("consent_required")
        || answer.error == "consent_required"
        || codes.split(',').any(|c| c == "65001")
        || description.contains("AADSTS65001");
    let error = answer.error.chars().take(64).collect::<String>();
    match answer.error.as_str() {
        _ if consent => ExchangeError::ConsentRequired { codes },
        "interaction_required" | "invalid_grant"
            if answer.claims.as_deref().is_some_and(|c| !c.is_empty()) =>
        {
            ExchangeError::ClaimsChallenge {
                error,
                claims: answer.claims.unwrap_or_default(),
            }
        }
        "invalid_grant" | "interaction_required" => ExchangeError::SubjectRejected { error, codes },
        "temporarily_unavailable" => ExchangeError::Unavailable {
            reason: "token endpoint is temporarily unavailable".to_owned(),
            retry_after: None,
        },
        _ => ExchangeError::Misconfigured { error, codes },
    }
}

/// `expires_in` as a number or a numeric string (some IdPs send either).
fn expires_in_seconds(value: Option<&Value>) -> Option<u64> {
    match value? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The `exp` of a JWT access token, read without verification: the IdP answered over TLS and the token is
/// not ours to verify; it only bounds how long we cache it.
fn jwt_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_u64()
}

/// How long a token may be served from the cache: until `exp - margin` (the margin capped at half the
/// lifetime), never closer than [`MIN_REMAINING_LIFETIME`] to `exp`, and never past the subject token's own
/// `exp`. Zero (not cached) when the expiry is unknown.
fn cache_lifetime(
    now: u64,
    expires_on: u64,
    subject_exp: Option<u64>,
    margin: Duration,
) -> Duration {
    if expires_on <= now {
        return Duration::ZERO;
    }
    let lifetime = expires_on - now;
    let margin = margin
        .as_secs()
        .min(lifetime / 2)
        .max(MIN_REMAINING_LIFETIME.as_secs());
    let mut until = expires_on.saturating_sub(margin);
    if let Some(subject_exp) = subject_exp {
        until = until.min(subject_exp);
    }
    Duration::from_secs(until.saturating_sub(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_lifetime_honours_margin_half_life_and_subject_expiry() {
        let m = Duration::from_secs(300);
        assert_eq!(
            cache_lifetime(1000, 1000 + 3600, None, m),
            Duration::from_secs(3300)
        );
        // margin capped at half of a short lifetime
        assert_eq!(
            cache_lifetime(1000, 1000 + 240, None, m),
            Duration::from_secs(120)
        );
        // never within 30 s of exp
        assert_eq!(
            cache_lifetime(1000, 1000 + 40, None, Duration::ZERO),
            Duration::from_secs(10)
        );
        // dies with the subject token
        assert_eq!(
            cache_lifetime(1000, 1000 + 3600, Some(1600), m),
            Duration::from_secs(600)
        );
        // unknown or past expiry: not cached
        assert_eq!(cache_lifetime(1000, 0, None, m), Duration::ZERO);
    }

    #[test]
    fn idp_errors_map_per_spec_table() {
        let map = |body: &str| map_error_answer(http::StatusCode::BAD_REQUEST, body.as_bytes());
        assert!(matches!(
            map(r#"{"error":"invalid_grant","error_codes":[50013]}"#),
            ExchangeError::SubjectRejected { .. }
        ));
        assert!(matches!(
            map(r#"{"error":"interaction_required","claims":"{\"access_token\":{}}"}"#),
            ExchangeError::ClaimsChallenge { .. }
        ));
        assert!(matches!(
            map(r#"{"error":"invalid_grant","error_codes":[65001],"suberror":"consent_required"}"#),
            ExchangeError::ConsentRequired { .. }
        ));
        for error in [
            "invalid_client",
            "unauthorized_client",
            "invalid_scope",
            "invalid_request",
        ] {
            assert!(matches!(
                map(&format!(r#"{{"error":"{error}"}}"#)),
                ExchangeError::Misconfigured { .. }
            ));
        }
        assert!(matches!(map("<html>"), ExchangeError::Misconfigured { .. }));
    }

    #[test]
    fn expires_in_may_be_a_string() {
        assert_eq!(expires_in_seconds(Some(&Value::from("3599"))), Some(3599));
        assert_eq!(expires_in_seconds(Some(&Value::from(60))), Some(60));
        assert_eq!(expires_in_seconds(Some(&Value::from(-1))), None);
    }
}
