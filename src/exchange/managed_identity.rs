//! Azure managed identity tokens (SPEC §13), from IMDS (`GET …?api-version=2018-02-01&resource=…` with
//! `Metadata: true`) or from App Service's `IDENTITY_ENDPOINT` (`api-version=2019-08-01`,
//! `X-IDENTITY-HEADER`), the requests the Azure SDKs make. A token is kept until five minutes before its
//! `expires_on`, and one fetch serves every caller that waits for it. They are client assertions for an
//! Entra app's federated identity credential (resource `api://AzureADTokenExchange`), or, for
//! `flavor = "managed_identity"`, the upstream tokens of `app` routes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use serde::Deserialize;
use serde_json::Value;

use crate::config::{ManagedIdentity, ManagedIdentityEndpoint};
use crate::oauth::now_unix;
use crate::secret::Secret;

use super::answer::{
    ExchangeError, MAX_RETRY_AFTER, MAX_TOKEN_LIFETIME, Misconfiguration, Unavailable,
    read_limited, retry_after,
};

/// The IMDS API version every Azure SDK sends.
const IMDS_API_VERSION: &str = "2018-02-01";
/// The App Service (Container Apps, Functions) API version with `X-IDENTITY-HEADER`.
const APP_SERVICE_API_VERSION: &str = "2019-08-01";
/// A token is fetched again this long before its `expires_on`, as MSAL does.
const REFRESH_BEFORE_EXPIRY: u64 = 300;
/// The `Retry-After` callers get when the managed identity endpoint is unavailable and names none: the
/// endpoint is local, and the Azure SDKs retry it within seconds.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);
/// While the endpoint fails, a cached token with this many seconds left still serves.
const GRACE: u64 = 60;
/// Managed identity answers are small.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// One managed identity's tokens, per resource.
pub(crate) struct ManagedIdentityTokens {
    http: reqwest::Client,
    identity: ManagedIdentity,
    /// One slot per resource (the routes' resources and the token-exchange audience: a handful).
    slots: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
}

/// A resource's token and last failure. Its lock is held across a fetch: one fetch at a time per resource,
/// and the requests waiting for it get its token, or its failure.
#[derive(Default)]
struct Slot {
    /// The token and its `expires_on`.
    token: Option<(Arc<Secret>, u64)>,
    /// The last failure, which answers for the endpoint until its `Retry-After` (or 5 s) has passed.
    failed: Option<(ExchangeError, std::time::Instant)>,
}

impl Slot {
    /// The cached token while it has at least `margin` seconds left.
    fn token_with(&self, margin: u64) -> Option<(Arc<Secret>, u64)> {
        self.token
            .as_ref()
            .filter(|(_, expires_on)| now_unix().saturating_add(margin) < *expires_on)
            .map(|(token, expires_on)| (Arc::clone(token), *expires_on))
    }
}

/// A managed identity token's answer (`expires_on` and `expires_in` are strings of digits, or numbers).
#[derive(Deserialize)]
struct Answer {
    access_token: String,
    #[serde(default)]
    expires_on: Option<Value>,
    #[serde(default)]
    expires_in: Option<Value>,
}

impl ManagedIdentityTokens {
    pub(crate) fn new(identity: &ManagedIdentity, http: reqwest::Client) -> Self {
        ManagedIdentityTokens {
            http,
            identity: identity.clone(),
            slots: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// A token for `resource` (no `/.default`), and its `expires_on`: the cached one until five minutes
    /// before it expires, else a fresh one. While the endpoint fails, a cached token with a minute left
    /// still serves (as MSAL keeps serving when a proactive refresh fails), and the failure answers every
    /// request until its `Retry-After` has passed, without asking the endpoint again.
    pub(crate) async fn token(&self, resource: &str) -> Result<(Arc<Secret>, u64), ExchangeError> {
        let slot = {
            let Ok(mut slots) = self.slots.lock() else {
                return Err(Unavailable::Interrupted.into());
            };
            Arc::clone(slots.entry(resource.to_owned()).or_default())
        };
        let mut slot = slot.lock().await;
        if let Some(fresh) = slot.token_with(REFRESH_BEFORE_EXPIRY) {
            return Ok(fresh);
        }
        if let Some((error, until)) = &slot.failed
            && std::time::Instant::now() < *until
        {
            return slot.token_with(GRACE).ok_or_else(|| error.clone());
        }
        match self.fetch(resource).await {
            Ok((token, expires_on)) => {
                let token = Arc::new(token);
                slot.token = Some((Arc::clone(&token), expires_on));
                slot.failed = None;
                Ok((token, expires_on))
            }
            Err(error) => {
                let error = match error {
                    ExchangeError::Unavailable { cause, retry_after } => {
                        ExchangeError::Unavailable {
                            cause,
                            retry_after: Some(
                                retry_after
                                    .unwrap_or(DEFAULT_RETRY_AFTER)
                                    .min(MAX_RETRY_AFTER),
                            ),
                        }
                    }
                    other => other,
                };
                let hold = match &error {
                    ExchangeError::Unavailable {
                        retry_after: Some(after),
                        ..
                    } => *after,
                    _ => DEFAULT_RETRY_AFTER,
                };
                slot.failed = Some((error.clone(), std::time::Instant::now() + hold));
                slot.token_with(GRACE).ok_or(error)
            }
        }
    }

    async fn fetch(&self, resource: &str) -> Result<(Secret, u64), ExchangeError> {
        let mut query = vec![("resource", resource)];
        if let Some(client_id) = &self.identity.client_id {
            query.push(("client_id", client_id));
        }
        let (url, api_version) = match &self.identity.endpoint {
            ManagedIdentityEndpoint::Imds { url } => (url, IMDS_API_VERSION),
            ManagedIdentityEndpoint::AppService { url, .. } => (url, APP_SERVICE_API_VERSION),
        };
        let mut url = url.clone();
        url.query_pairs_mut()
            .append_pair("api-version", api_version)
            .append_pair("resource", resource);
        if let Some(client_id) = &self.identity.client_id {
            url.query_pairs_mut().append_pair("client_id", client_id);
        }
        let request = match &self.identity.endpoint {
            ManagedIdentityEndpoint::Imds { .. } => self.http.get(url).header("Metadata", "true"),
            ManagedIdentityEndpoint::AppService { header, .. } => {
                let mut value = HeaderValue::from_str(header.expose())
                    .map_err(|_| Misconfiguration::CredentialNotAHeader)?;
                value.set_sensitive(true);
                self.http.get(url).header("X-IDENTITY-HEADER", value)
            }
        };
        let response = request
            .header(http::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    Unavailable::Timeout
                } else {
                    Unavailable::ManagedIdentity(Arc::new(e))
                }
            })?;
        let status = response.status();
        let retry_after = retry_after(response.headers(), MAX_RETRY_AFTER);
        let body = read_limited(response, MAX_ANSWER_BYTES).await?;
        // IMDS: 404 and 410 while it updates, 429 when throttled; 5xx anywhere: all pass.
        if matches!(status.as_u16(), 404 | 408 | 410 | 429) || status.is_server_error() {
            return Err(ExchangeError::Unavailable {
                cause: Unavailable::ManagedIdentityStatus(status.as_u16()),
                retry_after,
            });
        }
        if !status.is_success() {
            tracing::error!(
                status = status.as_u16(),
                answer = %error_summary(&body),
                "the managed identity endpoint refused: is the identity assigned to this resource?"
            );
            return Err(Misconfiguration::ManagedIdentityRefused(status.as_u16()).into());
        }
        let answer: Answer =
            serde_json::from_slice(&body).map_err(|_| Unavailable::ManagedIdentityAnswer)?;
        if answer.access_token.is_empty() {
            return Err(Unavailable::ManagedIdentityAnswer.into());
        }
        let now = now_unix();
        let expires_on = seconds(answer.expires_on.as_ref())
            .or_else(|| seconds(answer.expires_in.as_ref()).map(|s| now.saturating_add(s)))
            .or_else(|| super::answer::jwt_exp(&answer.access_token))
            .ok_or(Unavailable::ManagedIdentityAnswer)?
            .min(now.saturating_add(MAX_TOKEN_LIFETIME.as_secs()));
        Ok((Secret::new(answer.access_token), expires_on))
    }
}

/// Whole seconds from a number or a string of digits.
fn seconds(value: Option<&Value>) -> Option<u64> {
    match value? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// An error answer's OAuth (IMDS) or App Service fields for the log, nothing else.
fn error_summary(body: &[u8]) -> String {
    let Ok(Value::Object(answer)) = serde_json::from_slice::<Value>(body) else {
        return format!("{} bytes", body.len());
    };
    let field = |name: &str| {
        answer
            .get(name)
            .and_then(Value::as_str)
            .map(|s| s.chars().take(200).collect::<String>())
            .unwrap_or_default()
    };
    format!(
        "error={:?} description={:?} message={:?}",
        field("error"),
        field("error_description"),
        field("message")
    )
}
