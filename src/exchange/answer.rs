//! What the token endpoint answers (RFC 6749 §5, RFC 8693 §2.2, Entra's extensions), read into an upstream
//! token's lifetime or an [`ExchangeError`], and what of an error answer may reach the log.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;

use crate::config::{CredentialError, Identity, Route};
use crate::error::ProxyError;

use super::client_auth::SigningError;

/// A cached token is a miss this close to its `exp`, whatever the margin: it could expire in flight.
pub(crate) const MIN_REMAINING_LIFETIME: Duration = Duration::from_secs(30);
/// The longest an upstream token is believed to live, whatever the IdP says: Entra's tokens live 60–90
/// minutes, and an absurd `expires_in` (1e19) must neither overflow a clock nor pin a token for years.
pub(crate) const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How much of an IdP error description reaches the log.
pub(super) const MAX_LOGGED_DESCRIPTION: usize = 300;

/// Why the IdP could not be reached, or answered nothing usable: the caller gets 503.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum Unavailable {
    #[error("token request failed")]
    Transport(#[source] Arc<reqwest::Error>),
    #[error("token request timed out")]
    Timeout,
    #[error("reading the token answer failed")]
    Read(#[source] Arc<reqwest::Error>),
    #[error("token endpoint answered {status} (client-request-id {client_request_id})")]
    Status {
        status: u16,
        client_request_id: String,
    },
    #[error("token endpoint answered 200 without a token response (client-request-id {0})")]
    NotATokenResponse(String),
    #[error("token endpoint answered an empty access_token")]
    EmptyToken,
    #[error("token endpoint answer too large")]
    TooLarge,
    #[error("token endpoint is temporarily unavailable")]
    Temporarily,
    #[error("the IdP asked to back off (Retry-After)")]
    BackingOff,
    #[error("the IdP issued a token that is already expired")]
    AlreadyExpired,
    #[error("the token request did not finish")]
    Interrupted,
    #[error("the managed identity endpoint could not be reached")]
    ManagedIdentity(#[source] Arc<reqwest::Error>),
    #[error("the managed identity endpoint answered {0}")]
    ManagedIdentityStatus(u16),
    #[error("the managed identity endpoint answered no token")]
    ManagedIdentityAnswer,
    #[error("another replica is refreshing this token")]
    RefreshedElsewhere,
}

/// Why the IdP refused the sidecar's own request, or the sidecar could not make one: our misconfiguration,
/// the caller gets 500.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum Misconfiguration {
    #[error("the IdP refused the token request: {error} ({codes})")]
    Refused { error: String, codes: String },
    #[error("token endpoint answered {0} without an OAuth error")]
    NotOAuth(u16),
    #[error("token_type {0:?} is not Bearer")]
    NotBearer(String),
    #[error("the access_token is not a valid header value")]
    TokenNotAHeader,
    #[error("the client credentials are not a valid header value")]
    CredentialNotAHeader,
    #[error("signing the client assertion")]
    Signing(#[source] SigningError),
    #[error("reading the client credential")]
    Credential(#[source] Arc<CredentialError>),
    #[error("the managed identity endpoint refused with {0}: is the identity assigned?")]
    ManagedIdentityRefused(u16),
    #[error("a managed identity cannot act on behalf of a caller")]
    ManagedIdentityOnBehalfOf,
    #[error("the identity has no managed identity")]
    NoManagedIdentity,
}

/// Why no upstream token could be had. Fields are for logs; the caller sees the mapped [`ProxyError`].
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ExchangeError {
    #[error("IdP unavailable")]
    Unavailable {
        #[source]
        cause: Unavailable,
        retry_after: Option<Duration>,
    },
    #[error("IdP rejected the subject token ({error}: {codes})")]
    SubjectRejected { error: String, codes: String },
    #[error("IdP requires more claims ({error})")]
    ClaimsChallenge {
        error: String,
        claims: String,
        authorization_uri: String,
    },
    #[error("IdP reports missing consent ({codes})")]
    ConsentRequired { codes: String },
    #[error("IdP refused the sidecar's request")]
    Misconfigured(#[source] Misconfiguration),
}

impl From<Unavailable> for ExchangeError {
    fn from(cause: Unavailable) -> Self {
        ExchangeError::Unavailable {
            cause,
            retry_after: None,
        }
    }
}

impl From<Misconfiguration> for ExchangeError {
    fn from(cause: Misconfiguration) -> Self {
        ExchangeError::Misconfigured(cause)
    }
}

impl ExchangeError {
    /// The caller's answer for this failure on `route`.
    pub(crate) fn to_proxy_error(&self, route: &Route) -> ProxyError {
        match self {
            ExchangeError::Unavailable { retry_after, .. } => ProxyError::IdpUnavailable {
                retry_after: *retry_after,
            },
            ExchangeError::SubjectRejected { .. } => ProxyError::IdpRejectedSubject,
            ExchangeError::ClaimsChallenge {
                claims,
                authorization_uri,
                ..
            } => ProxyError::IdpClaimsChallenge {
                authorization_uri: authorization_uri.clone(),
                claims: base64::engine::general_purpose::STANDARD.encode(claims),
            },
            ExchangeError::ConsentRequired { .. } => ProxyError::IdpConsentRequired {
                scope: route.scopes.join(" "),
            },
            ExchangeError::Misconfigured(_) => ProxyError::IdpMisconfigured,
        }
    }
}

/// A successful token endpoint answer (RFC 6749 §5.1, RFC 8693 §2.2.1).
#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    pub(crate) access_token: String,
    #[serde(default)]
    pub(crate) token_type: Option<String>,
    #[serde(default)]
    pub(crate) expires_in: Option<Value>,
    #[serde(default)]
    pub(crate) issued_token_type: Option<String>,
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

/// `…/oauth2/v2.0/token` -> `…/oauth2/v2.0/authorize`.
fn authorization_uri(token_endpoint: &str) -> String {
    match token_endpoint.strip_suffix("/token") {
        Some(base) => format!("{base}/authorize"),
        None => token_endpoint.to_owned(),
    }
}

/// A `Retry-After` longer than this is shortened: an IdP, a managed-identity endpoint (or a proxy in front of
/// either) asking for a day must not take an identity offline for a day.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// An answer's `Retry-After` in seconds (the HTTP-date form is not used by IdPs), at most `max`: a broken
/// or hostile endpoint cannot park the sidecar for longer.
pub(super) fn retry_after(headers: &http::HeaderMap, max: Duration) -> Option<Duration> {
    headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|secs| Duration::from_secs(secs).min(max))
}

/// An answer's body, refused beyond `max` bytes (read chunk by chunk, so an endless body is not buffered).
pub(super) async fn read_limited(
    mut response: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, Unavailable> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > max {
                    return Err(Unavailable::TooLarge);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(Unavailable::Read(Arc::new(e))),
        }
    }
}

/// Maps an RFC 6749 §5.2 error answer (SPEC §4's table).
pub(crate) fn map_error_answer(
    status: http::StatusCode,
    body: &[u8],
    token_endpoint: &str,
) -> ExchangeError {
    let Ok(answer) = serde_json::from_slice::<ErrorResponse>(body) else {
        return Misconfiguration::NotOAuth(status.as_u16()).into();
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
    let claims = answer.claims.filter(|c| !c.is_empty());
    match (answer.error.as_str(), claims) {
        _ if consent => ExchangeError::ConsentRequired { codes },
        ("interaction_required" | "invalid_grant", Some(claims)) => {
            ExchangeError::ClaimsChallenge {
                error,
                claims,
                authorization_uri: authorization_uri(token_endpoint),
            }
        }
        ("invalid_grant" | "interaction_required", None) => {
            ExchangeError::SubjectRejected { error, codes }
        }
        ("temporarily_unavailable", _) => Unavailable::Temporarily.into(),
        (_, _) => Misconfiguration::Refused { error, codes }.into(),
    }
}

/// An IdP error answer for the log: only the OAuth fields, the description shortened, anything shaped like
/// a JWT or equal to the client secret replaced by `[redacted]`.
pub(crate) fn redacted_answer(body: &[u8], identity: &Identity) -> String {
    let Ok(answer) = serde_json::from_slice::<ErrorResponse>(body) else {
        return format!("{} bytes, not an OAuth error", body.len());
    };
    let mut description = answer.error_description.unwrap_or_default();
    // Redact before shortening, so a secret cut in half cannot leak its prefix.
    if let crate::config::Credential::Secret(secret) = &identity.credential {
        description = description.replace(secret.get().expose(), "[redacted]");
    }
    // JWT-shaped words too: a token cut at the length limit would no longer look like one.
    let description = description
        .split(|c: char| c.is_whitespace())
        .map(|word| {
            if looks_like_jwt(word) {
                "[redacted]"
            } else {
                word
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    let description: String = description.chars().take(MAX_LOGGED_DESCRIPTION).collect();
    format!(
        "error={} suberror={} codes={:?} description={description:?}",
        answer.error.chars().take(64).collect::<String>(),
        answer.suberror.unwrap_or_default(),
        answer.error_codes
    )
}

pub(super) fn looks_like_jwt(word: &str) -> bool {
    word.split('.').filter(|part| part.len() >= 8).count() >= 2 && word.len() >= 40
}

/// `expires_in` as a number or a numeric string (some IdPs send either), whole seconds, at most
/// [`MAX_TOKEN_LIFETIME`]; a fraction is cut, anything negative, non-finite or not a number is ignored (the
/// JWT's `exp` is used instead).
pub(crate) fn expires_in_seconds(value: Option<&Value>) -> Option<u64> {
    let seconds = match value? {
        Value::Number(n) => n.as_u64().or_else(|| n.as_f64().and_then(whole_seconds)),
        Value::String(s) => {
            let s = s.trim();
            s.parse()
                .ok()
                .or_else(|| s.parse::<f64>().ok().and_then(whole_seconds))
        }
        _ => None,
    }?;
    Some(seconds.min(MAX_TOKEN_LIFETIME.as_secs()))
}

/// Whole seconds of a finite, non-negative `f64`, saturating.
fn whole_seconds(f: f64) -> Option<u64> {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "checked finite and non-negative; `as` saturates"
    )]
    (f.is_finite() && f >= 0.0).then_some(f as u64)
}

/// The `exp` of a JWT access token, read without verification: the IdP answered over TLS and the token is
/// not ours to verify; it only bounds how long we cache it.
pub(crate) fn jwt_exp(token: &str) -> Option<u64> {
    crate::jwt::unverified_claims(token)?.get("exp")?.as_u64()
}

/// (until stale, until expired) from now. Stale from `exp - margin` (the margin capped at half the
/// lifetime); expired [`MIN_REMAINING_LIFETIME`] before `exp`, and never later than the subject token's own
/// `exp`. Both zero (used for this request only, never cached) when the expiry is unknown or past.
pub(crate) fn cache_lifetime(
    now: u64,
    expires_on: u64,
    subject_exp: Option<u64>,
    margin: Duration,
) -> (Duration, Duration) {
    if expires_on <= now {
        return (Duration::ZERO, Duration::ZERO);
    }
    let lifetime = expires_on - now;
    let mut hard = expires_on.saturating_sub(MIN_REMAINING_LIFETIME.as_secs());
    if let Some(subject_exp) = subject_exp {
        hard = hard.min(subject_exp);
    }
    let stale = expires_on
        .saturating_sub(margin.as_secs().min(lifetime / 2))
        .min(hard);
    (
        Duration::from_secs(stale.saturating_sub(now)),
        Duration::from_secs(hard.saturating_sub(now)),
    )
}
