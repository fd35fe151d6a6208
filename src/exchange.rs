//! Upstream tokens: Entra On-Behalf-Of (jwt-bearer), RFC 8693 token exchange and client-credentials
//! requests to each identity's token endpoint, with the client authentication of [`client_auth`], every IdP
//! answer mapped to an [`ExchangeError`], and the [`cache`] in front of them. Only this module talks to the
//! token endpoint.

pub mod cache;
pub mod client_auth;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_lc_rs::rand::SecureRandom as _;
use base64::Engine as _;
use http::HeaderValue;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::auth::{Caller, now_unix};
use crate::config::{CacheSettings, Flavor, Identity, Route, TENANT_PLACEHOLDER, TokenKind};
use crate::error::ProxyError;
use crate::secret::Secret;
use cache::{CacheKey, Entry, Fetch, KeyParts, Lookup, TokenCache};
use client_auth::{AssertionAlg, AuthMethod, CLIENT_ASSERTION_TYPE, Credential};

/// RFC 7523 / Entra OBO grant type.
pub const GRANT_JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// RFC 8693 grant type.
pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693 §3 token type of an OAuth access token.
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
/// IdP answers are a few KiB; a larger one is refused rather than buffered.
const MAX_IDP_BODY_BYTES: usize = 256 * 1024;
/// A cached token is a miss this close to its `exp`, whatever the margin: it could expire in flight.
pub const MIN_REMAINING_LIFETIME: Duration = Duration::from_secs(30);
/// The one retry of a failed token request waits 50–150 ms (jittered, so a fleet does not retry in step).
const RETRY_BASE_DELAY_MS: u64 = 50;
/// A misconfiguration (`invalid_client`, …) is logged at error at most this often per identity: once per
/// burst, not once per request.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// A `Retry-After` longer than this is shortened: an IdP (or a proxy in front of it) asking for a day must not
/// take an identity offline for a day.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// The longest an upstream token is believed to live, whatever the IdP says: Entra's tokens live 60–90
/// minutes, and an absurd `expires_in` (1e19) must neither overflow a clock nor pin a token for years.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How much of an IdP error description reaches the log.
const MAX_LOGGED_DESCRIPTION: usize = 300;

/// An upstream token ready to send, with its timing.
#[derive(Debug)]
pub struct UpstreamToken {
    /// `Bearer <token>`, marked sensitive.
    pub header: HeaderValue,
    /// Unix seconds of the token's expiry; 0 when unknown.
    pub expires_on: u64,
    /// From here on a cache hit starts a background refresh.
    pub stale_at: Instant,
    /// From here on the token is never sent (`exp` minus 30 s, or the subject token's `exp`).
    pub expires_at: Instant,
}

/// What the proxy sends upstream, and the cache entry it came from (to drop it on an upstream 401).
pub struct Acquired {
    pub header: Option<HeaderValue>,
    pub sent: Option<(CacheKey, Arc<Entry>)>,
    pub lookup: Option<Lookup>,
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
    ClaimsChallenge {
        error: String,
        claims: String,
        authorization_uri: String,
    },
    #[error("IdP reports missing consent ({codes})")]
    ConsentRequired { codes: String },
    #[error("IdP refused the sidecar's request: {error} ({codes})")]
    Misconfigured { error: String, codes: String },
}

impl ExchangeError {
    /// The caller's answer for this failure on `route`.
    pub fn to_proxy_error(&self, route: &Route) -> ProxyError {
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
            ExchangeError::Misconfigured { error, .. } => ProxyError::IdpMisconfigured {
                error: error.clone(),
            },
        }
    }

    fn misconfigured(error: impl Into<String>) -> Self {
        ExchangeError::Misconfigured {
            error: error.into(),
            codes: String::new(),
        }
    }

    fn unavailable(reason: impl Into<String>) -> Self {
        ExchangeError::Unavailable {
            reason: reason.into(),
            retry_after: None,
        }
    }
}

/// `…/oauth2/v2.0/token` -> `…/oauth2/v2.0/authorize`.
fn authorization_uri(token_endpoint: &str) -> String {
    match token_endpoint.strip_suffix("/token") {
        Some(base) => format!("{base}/authorize"),
        None => token_endpoint.to_owned(),
    }
}

/// A successful token endpoint answer (RFC 6749 §5.1, RFC 8693 §2.2.1).
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<Value>,
    #[serde(default)]
    issued_token_type: Option<String>,
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

/// The `Retry-After`s IdPs sent, per client and **resolved** token endpoint: with a `{tenantid}` endpoint, one
/// tenant's throttling never blocks another's (SPEC §8). Kept across reloads, like the token cache.
pub struct IdpBackoff {
    until: moka::sync::Cache<(String, String), Instant>,
}

/// Endpoints remembered at once; each entry lives at most [`MAX_RETRY_AFTER`].
const MAX_BACKOFF_ENTRIES: u64 = 10_000;

impl Default for IdpBackoff {
    fn default() -> Self {
        IdpBackoff {
            until: moka::sync::Cache::builder()
                .max_capacity(MAX_BACKOFF_ENTRIES)
                .time_to_live(MAX_RETRY_AFTER)
                .build(),
        }
    }
}

impl IdpBackoff {
    /// The remaining back-off the IdP asked `client_id` for at `token_endpoint`, if any.
    fn remaining(&self, client_id: &str, token_endpoint: &str) -> Option<Duration> {
        let until = self
            .until
            .get(&(client_id.to_owned(), token_endpoint.to_owned()))?;
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    fn remember(&self, client_id: &str, token_endpoint: &str, retry_after: Duration) {
        let until = Instant::now() + retry_after.min(MAX_RETRY_AFTER);
        self.until
            .entry((client_id.to_owned(), token_endpoint.to_owned()))
            .and_upsert_with(|current| match current {
                Some(current) => (*current.value()).max(until),
                None => until,
            });
    }
}

/// One identity's connection to its IdP: client, concurrency cap and the IdP's remembered back-offs.
struct IdentityClient {
    identity: Arc<Identity>,
    /// The `claims` parameter (client capabilities), built once.
    claims: Option<String>,
    metrics: Arc<crate::telemetry::Metrics>,
    http: reqwest::Client,
    permits: Semaphore,
    backoff: Arc<IdpBackoff>,
    last_error_log_ms: AtomicU64,
    epoch: Instant,
}

impl IdentityClient {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// True at most once per [`ERROR_LOG_INTERVAL`].
    fn should_log_error(&self) -> bool {
        let now = self.now_ms() + 1;
        let last = self.last_error_log_ms.load(Ordering::Acquire);
        let interval = u64::try_from(ERROR_LOG_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        (last == 0 || now.saturating_sub(last) >= interval)
            && self
                .last_error_log_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }
}

/// Acquires upstream tokens for routes, through the cache.
pub struct Exchanger {
    identities: BTreeMap<String, Arc<IdentityClient>>,
    cache: Arc<TokenCache>,
    expiry_margin: Duration,
}

impl Exchanger {
    pub fn new(
        identities: &BTreeMap<String, Arc<Identity>>,
        settings: &CacheSettings,
        cache: Arc<TokenCache>,
        backoff: &Arc<IdpBackoff>,
        metrics: &Arc<crate::telemetry::Metrics>,
    ) -> Result<Self, crate::tls::TlsError> {
        let mut clients = BTreeMap::new();
        for (name, identity) in identities {
            let roots: Vec<&std::path::Path> = identity
                .ca_file
                .iter()
                .map(std::path::PathBuf::as_path)
                .collect();
            let http = crate::tls::idp_client(&roots, identity.timeout)?;
            clients.insert(
                name.clone(),
                Arc::new(IdentityClient {
                    claims: capabilities_claims(identity),
                    identity: Arc::clone(identity),
                    metrics: Arc::clone(metrics),
                    http,
                    permits: Semaphore::new(identity.max_concurrent),
                    backoff: Arc::clone(backoff),
                    last_error_log_ms: AtomicU64::new(0),
                    epoch: Instant::now(),
                }),
            );
        }
        Ok(Exchanger {
            identities: clients,
            cache,
            expiry_margin: settings.expiry_margin,
        })
    }

    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    /// The `Authorization` value `route` sends upstream for `caller`.
    /// `caller` is `None` only on a route with `caller_auth = "none"` (an `app` or `none` route).
    pub async fn acquire(
        &self,
        route: &Route,
        caller: Option<&Caller>,
    ) -> Result<Acquired, ProxyError> {
        let client = match route.token {
            TokenKind::None => {
                return Ok(Acquired {
                    header: None,
                    sent: None,
                    lookup: None,
                });
            }
            TokenKind::Passthrough => {
                let caller =
                    caller.ok_or(ProxyError::Internal("passthrough route without a caller"))?;
                return Ok(Acquired {
                    header: Some(bearer_header(&caller.token)?),
                    sent: None,
                    lookup: None,
                });
            }
            TokenKind::Obo | TokenKind::App => {
                self.identities
                    .get(&route.identity)
                    .ok_or(ProxyError::Internal(
                        "route names an identity that does not exist",
                    ))?
            }
        };
        let identity = &client.identity;
        let token_endpoint = resolve_tenant(&identity.token_endpoint, caller)?;
        let claims = client.claims.as_deref();
        let subject = match (route.token, caller) {
            (TokenKind::Obo, Some(caller)) => Some((caller, caller.claims.exp)),
            (TokenKind::Obo, None) => {
                return Err(ProxyError::Internal("obo route without a caller"));
            }
            _ => None,
        };
        let key = CacheKey::new(&KeyParts {
            subject: subject.map(|(caller, _)| &caller.digest),
            identity: &identity.name,
            client_id: &identity.client_id,
            token_endpoint: &token_endpoint,
            flavor: identity.flavor.as_str(),
            auth_method: identity.auth_method.as_str(),
            scopes: &route.scopes,
            audience: &route.audience,
            resource: &route.resource,
            requested_token_type: route.requested_token_type.as_deref(),
            claims,
        });
        if let Some(entry) = self.cache.fresh(&key).await {
            return Ok(Acquired {
                header: Some(entry.token.header.clone()),
                sent: Some((key, entry)),
                lookup: Some(Lookup::Hit),
            });
        }
        let request = Arc::new(TokenRequest {
            client: Arc::clone(client),
            route: route.name.clone(),
            token_endpoint: token_endpoint.into_owned(),
            grant: match subject {
                Some((subject, subject_exp)) => Grant::OnBehalfOf {
                    subject: subject.token.clone(),
                    subject_exp,
                },
                None => Grant::App,
            },
            scopes: route.scopes.clone(),
            audience: route.audience.clone(),
            resource: route.resource.clone(),
            requested_token_type: route.requested_token_type.clone(),
            claims: claims.map(str::to_owned),
            expiry_margin: self.expiry_margin,
        });
        let fetch: Fetch = Arc::new(move || {
            let request = Arc::clone(&request);
            Box::pin(async move { request.send().await })
        });
        let (entry, lookup) = self
            .cache
            .get_or_fetch(key, &fetch)
            .await
            .map_err(|e| e.to_proxy_error(route))?;
        Ok(Acquired {
            header: Some(entry.token.header.clone()),
            sent: Some((key, entry)),
            lookup: Some(lookup),
        })
    }

    /// The upstream answered 401 to `sent`: drop that cached token so the next request exchanges afresh.
    pub async fn forget(&self, sent: &(CacheKey, Arc<Entry>)) -> bool {
        self.cache.forget(sent.0, &sent.1).await
    }
}

/// Fills `{tenantid}` from the caller's validated `tid`, which must be a GUID (nothing else may reach a URL).
fn resolve_tenant<'a>(
    template: &'a str,
    caller: Option<&Caller>,
) -> Result<std::borrow::Cow<'a, str>, ProxyError> {
    if !template.contains(TENANT_PLACEHOLDER) {
        return Ok(std::borrow::Cow::Borrowed(template));
    }
    let tid = caller
        .ok_or(ProxyError::Internal(
            "a {tenantid} token endpoint needs a validated caller",
        ))?
        .claims
        .tid
        .as_deref()
        .filter(|tid| is_guid(tid))
        .ok_or(ProxyError::InvalidToken(
            "token has no valid tenant id (tid)",
        ))?;
    Ok(std::borrow::Cow::Owned(
        template.replace(TENANT_PLACEHOLDER, &tid.to_ascii_lowercase()),
    ))
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, hex.
pub fn is_guid(text: &str) -> bool {
    text.len() == 36
        && text.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Entra client capabilities (CAE `cp1`) as the `claims` request parameter, the way MSAL merges them.
fn capabilities_claims(identity: &Identity) -> Option<String> {
    if identity.flavor != Flavor::Entra || identity.client_capabilities.is_empty() {
        return None;
    }
    Some(
        serde_json::json!({"access_token": {"xms_cc": {"values": identity.client_capabilities}}})
            .to_string(),
    )
}

enum Grant {
    OnBehalfOf { subject: Secret, subject_exp: u64 },
    App,
}

/// Everything one token request needs, owned, so the background refresh can send it again.
struct TokenRequest {
    client: Arc<IdentityClient>,
    route: String,
    token_endpoint: String,
    grant: Grant,
    scopes: Vec<String>,
    audience: Vec<String>,
    resource: Vec<String>,
    requested_token_type: Option<String>,
    claims: Option<String>,
    expiry_margin: Duration,
}

impl TokenRequest {
    /// The token request, retried once (with jitter) when the IdP is unavailable and gave no `Retry-After`.
    /// A `Retry-After` is remembered for the identity: until it passes, requests fail at once.
    async fn send(&self) -> Result<UpstreamToken, ExchangeError> {
        let identity = &self.client.identity;
        let grant = match (&self.grant, identity.flavor) {
            (Grant::App, _) => crate::telemetry::Grant::ClientCredentials,
            (Grant::OnBehalfOf { .. }, Flavor::Entra) => crate::telemetry::Grant::Obo,
            (Grant::OnBehalfOf { .. }, Flavor::Rfc8693) => crate::telemetry::Grant::TokenExchange,
        };
        let started = std::time::Instant::now();
        if let Some(wait) = self
            .client
            .backoff
            .remaining(&identity.client_id, &self.token_endpoint)
        {
            self.client.metrics.record_idp(
                &identity.name,
                grant,
                crate::telemetry::IdpOutcome::Throttled,
                started.elapsed(),
            );
            return Err(ExchangeError::Unavailable {
                reason: "the IdP asked to back off (Retry-After)".to_owned(),
                retry_after: Some(wait),
            });
        }
        let _permit = self
            .client
            .permits
            .acquire()
            .await
            .map_err(|_| ExchangeError::unavailable("shutting down"))?;
        let mut outcome = self.send_once().await;
        if let Err(ExchangeError::Unavailable {
            retry_after: None,
            reason,
        }) = &outcome
        {
            tracing::debug!(route = %self.route, identity = %identity.name, %reason, "token request failed; retrying once");
            tokio::time::sleep(jitter()).await;
            outcome = self.send_once().await;
        }
        let recorded = match &outcome {
            Ok(_) => crate::telemetry::IdpOutcome::Ok,
            Err(ExchangeError::Unavailable {
                retry_after: Some(_),
                ..
            }) => crate::telemetry::IdpOutcome::Throttled,
            Err(ExchangeError::Unavailable { .. }) => crate::telemetry::IdpOutcome::Unavailable,
            Err(ExchangeError::SubjectRejected { .. }) => {
                crate::telemetry::IdpOutcome::InvalidGrant
            }
            Err(ExchangeError::ClaimsChallenge { .. }) => {
                crate::telemetry::IdpOutcome::ClaimsChallenge
            }
            Err(ExchangeError::ConsentRequired { .. }) => {
                crate::telemetry::IdpOutcome::ConsentRequired
            }
            Err(ExchangeError::Misconfigured { .. }) => crate::telemetry::IdpOutcome::Misconfigured,
        };
        self.client
            .metrics
            .record_idp(&identity.name, grant, recorded, started.elapsed());
        match &outcome {
            Ok(_) => {}
            Err(error @ ExchangeError::Unavailable { retry_after, .. }) => {
                if let Some(wait) = retry_after {
                    self.client
                        .backoff
                        .remember(&identity.client_id, &self.token_endpoint, *wait);
                }
                tracing::warn!(route = %self.route, identity = %identity.name, %error, "token request failed");
            }
            Err(error @ ExchangeError::Misconfigured { .. }) => {
                if self.client.should_log_error() {
                    tracing::error!(route = %self.route, identity = %identity.name, %error,
                        "token request refused: check this identity's configuration (logged once per minute)");
                } else {
                    tracing::debug!(route = %self.route, identity = %identity.name, %error, "token request refused");
                }
            }
            Err(error) => {
                tracing::info!(route = %self.route, identity = %identity.name, %error, "token request declined for this caller");
            }
        }
        outcome
    }

    async fn send_once(&self) -> Result<UpstreamToken, ExchangeError> {
        let identity = &self.client.identity;
        let client_request_id = client_auth::random_uuid();
        let mut form: Vec<(&str, String)> = Vec::new();
        let grant = match (&self.grant, identity.flavor) {
            (Grant::OnBehalfOf { subject, .. }, Flavor::Entra) => {
                form.push(("grant_type", GRANT_JWT_BEARER.to_owned()));
                form.push(("requested_token_use", "on_behalf_of".to_owned()));
                form.push(("assertion", subject.expose().to_owned()));
                "obo"
            }
            (Grant::OnBehalfOf { subject, .. }, Flavor::Rfc8693) => {
                form.push(("grant_type", GRANT_TOKEN_EXCHANGE.to_owned()));
                form.push(("subject_token", subject.expose().to_owned()));
                form.push(("subject_token_type", TOKEN_TYPE_ACCESS_TOKEN.to_owned()));
                form.extend(self.audience.iter().map(|a| ("audience", a.clone())));
                form.extend(self.resource.iter().map(|r| ("resource", r.clone())));
                if let Some(kind) = &self.requested_token_type {
                    form.push(("requested_token_type", kind.clone()));
                }
                "token_exchange"
            }
            (Grant::App, _) => {
                form.push(("grant_type", "client_credentials".to_owned()));
                "client_credentials"
            }
        };
        if !self.scopes.is_empty() {
            form.push(("scope", self.scopes.join(" ")));
        }
        if let Some(claims) = &self.claims {
            form.push(("claims", claims.clone()));
        }
        let mut basic = None;
        match (&identity.credential, identity.auth_method) {
            (Credential::Secret(secret), AuthMethod::ClientSecretBasic) => {
                basic = Some(client_auth::basic_authorization(
                    &identity.client_id,
                    secret,
                ));
            }
            (Credential::Secret(secret), _) => {
                form.push(("client_id", identity.client_id.clone()));
                form.push(("client_secret", secret.expose().to_owned()));
            }
            (Credential::Certificate(certificate), _) => {
                let alg = match identity.flavor {
                    Flavor::Entra => AssertionAlg::PS256,
                    Flavor::Rfc8693 => AssertionAlg::RS256,
                };
                let assertion = certificate
                    .sign_assertion(&identity.client_id, &self.token_endpoint, alg, now_unix())
                    .map_err(|e| ExchangeError::misconfigured(e.to_string()))?;
                form.push(("client_id", identity.client_id.clone()));
                form.push(("client_assertion_type", CLIENT_ASSERTION_TYPE.to_owned()));
                form.push(("client_assertion", assertion.expose().to_owned()));
            }
            (Credential::AssertionFile(path), _) => {
                let assertion = client_auth::read_assertion_file(path)
                    .await
                    .map_err(|e| ExchangeError::misconfigured(e.to_string()))?;
                form.push(("client_id", identity.client_id.clone()));
                form.push(("client_assertion_type", CLIENT_ASSERTION_TYPE.to_owned()));
                form.push(("client_assertion", assertion.expose().to_owned()));
            }
        }
        let started = std::time::Instant::now();
        let mut request = self
            .client
            .http
            .post(&self.token_endpoint)
            .header(http::header::ACCEPT, "application/json")
            .header("client-request-id", &client_request_id)
            .header("return-client-request-id", "true")
            .form(&form);
        if let Some(basic) = &basic {
            let mut value = HeaderValue::from_str(basic.expose()).map_err(|_| {
                ExchangeError::misconfigured("client credentials are not a valid header value")
            })?;
            value.set_sensitive(true);
            request = request.header(http::header::AUTHORIZATION, value);
        }
        drop(form);
        let response = request.send().await.map_err(|e| {
            ExchangeError::unavailable(if e.is_timeout() {
                "token request timed out".to_owned()
            } else {
                format!(
                    "token request failed: {}",
                    crate::auth::jwks::error_chain(&e)
                )
            })
        })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|secs| Duration::from_secs(secs.min(MAX_RETRY_AFTER.as_secs())));
        let body = read_limited(response).await?;
        tracing::debug!(
            route = %self.route,
            identity = %identity.name,
            grant,
            status = status.as_u16(),
            client_request_id = %client_request_id,
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "token request answered"
        );
        if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
            return Err(ExchangeError::Unavailable {
                reason: format!(
                    "token endpoint answered {status} (client-request-id {client_request_id})"
                ),
                retry_after,
            });
        }
        if !status.is_success() {
            let error = map_error_answer(status, &body, &self.token_endpoint);
            tracing::info!(
                route = %self.route,
                identity = %identity.name,
                client_request_id = %client_request_id,
                idp_answer = %redacted_answer(&body, identity),
                "token request refused by the IdP"
            );
            return Err(error);
        }
        let answer: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
            ExchangeError::unavailable(format!(
                "token endpoint answered 200 without a token response (client-request-id {client_request_id})"
            ))
        })?;
        let token_type = answer.token_type.as_deref().unwrap_or_default();
        if !token_type.eq_ignore_ascii_case("bearer") {
            return Err(ExchangeError::misconfigured(format!(
                "token_type {:?} is not Bearer",
                token_type.chars().take(16).collect::<String>()
            )));
        }
        if answer.access_token.is_empty() {
            return Err(ExchangeError::unavailable(
                "token endpoint answered an empty access_token",
            ));
        }
        if let Some(issued) = &answer.issued_token_type {
            tracing::debug!(route = %self.route, issued_token_type = %issued, "token exchanged");
        }
        let now = now_unix();
        let latest = now.saturating_add(MAX_TOKEN_LIFETIME.as_secs());
        let expires_on = expires_in_seconds(answer.expires_in.as_ref())
            .map(|secs| now.saturating_add(secs))
            .or_else(|| jwt_exp(&answer.access_token))
            .map_or(0, |exp| exp.min(latest));
        let subject_exp = match &self.grant {
            Grant::OnBehalfOf { subject_exp, .. } => Some(*subject_exp),
            Grant::App => None,
        };
        let (until_stale, until_expired) =
            cache_lifetime(now, expires_on, subject_exp, self.expiry_margin);
        let token = Secret::new(answer.access_token);
        let instant = Instant::now();
        Ok(UpstreamToken {
            header: bearer_header(&token).map_err(|_| {
                ExchangeError::misconfigured("access_token is not a valid header value")
            })?,
            expires_on,
            stale_at: instant + until_stale,
            expires_at: instant + until_expired,
        })
    }
}

/// 50–150 ms.
fn jitter() -> Duration {
    let mut byte = [0u8; 1];
    let _ = aws_lc_rs::rand::SystemRandom::new().fill(&mut byte);
    Duration::from_millis(RETRY_BASE_DELAY_MS + u64::from(byte[0]) * 100 / 255)
}

/// An IdP error answer for the log: only the OAuth fields, the description shortened, anything shaped like
/// a JWT or equal to the client secret replaced by `[redacted]`.
fn redacted_answer(body: &[u8], identity: &Identity) -> String {
    let Ok(answer) = serde_json::from_slice::<ErrorResponse>(body) else {
        return format!("{} bytes, not an OAuth error", body.len());
    };
    let mut description = answer.error_description.unwrap_or_default();
    // Redact before shortening, so a secret cut in half cannot leak its prefix.
    if let Credential::Secret(secret) = &identity.credential {
        description = description.replace(secret.expose(), "[redacted]");
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

fn looks_like_jwt(word: &str) -> bool {
    word.split('.').filter(|part| part.len() >= 8).count() >= 2 && word.len() >= 40
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
                    return Err(ExchangeError::unavailable(
                        "token endpoint answer too large",
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(ExchangeError::unavailable(format!(
                    "reading the token answer failed: {}",
                    crate::auth::jwks::error_chain(&e)
                )));
            }
        }
    }
}

/// Maps an RFC 6749 §5.2 error answer (SPEC §4's table).
fn map_error_answer(status: http::StatusCode, body: &[u8], token_endpoint: &str) -> ExchangeError {
    let Ok(answer) = serde_json::from_slice::<ErrorResponse>(body) else {
        return ExchangeError::misconfigured(format!(
            "token endpoint answered {status} without an OAuth error"
        ));
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
                authorization_uri: authorization_uri(token_endpoint),
            }
        }
        "invalid_grant" | "interaction_required" => ExchangeError::SubjectRejected { error, codes },
        "temporarily_unavailable" => {
            ExchangeError::unavailable("token endpoint is temporarily unavailable")
        }
        _ => ExchangeError::Misconfigured { error, codes },
    }
}

/// `expires_in` as a number or a numeric string (some IdPs send either), whole seconds; a fraction is cut,
/// anything negative, non-finite or not a number is ignored (the JWT's `exp` is used instead).
fn expires_in_seconds(value: Option<&Value>) -> Option<u64> {
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
fn jwt_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_u64()
}

/// (until stale, until expired) from now. Stale from `exp - margin` (the margin capped at half the
/// lifetime); expired [`MIN_REMAINING_LIFETIME`] before `exp`, and never later than the subject token's own
/// `exp`. Both zero (used for this request only, never cached) when the expiry is unknown or past.
fn cache_lifetime(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_lifetime_honours_margin_half_life_and_subject_expiry() {
        let m = Duration::from_secs(300);
        let secs = |(a, b): (Duration, Duration)| (a.as_secs(), b.as_secs());
        assert_eq!(
            secs(cache_lifetime(1000, 1000 + 3600, None, m)),
            (3300, 3570)
        );
        // margin capped at half of a short lifetime
        assert_eq!(secs(cache_lifetime(1000, 1000 + 240, None, m)), (120, 210));
        // never within 30 s of exp
        assert_eq!(
            secs(cache_lifetime(1000, 1000 + 40, None, Duration::ZERO)),
            (10, 10)
        );
        // dies with the subject token
        assert_eq!(
            secs(cache_lifetime(1000, 1000 + 3600, Some(1600), m)),
            (600, 600)
        );
        // unknown or past expiry: not cached
        assert_eq!(secs(cache_lifetime(1000, 0, None, m)), (0, 0));
    }

    #[test]
    fn idp_errors_map_per_spec_table() {
        let map = |body: &str| {
            map_error_answer(
                http::StatusCode::BAD_REQUEST,
                body.as_bytes(),
                "https://idp/t/oauth2/v2.0/token",
            )
        };
        assert!(matches!(
            map(r#"{"error":"invalid_grant","error_codes":[50013]}"#),
            ExchangeError::SubjectRejected { .. }
        ));
        match map(r#"{"error":"interaction_required","claims":"{\"access_token\":{}}"}"#) {
            ExchangeError::ClaimsChallenge {
                authorization_uri, ..
            } => {
                assert_eq!(authorization_uri, "https://idp/t/oauth2/v2.0/authorize");
            }
            other => panic!("{other:?}"),
        }
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
        assert_eq!(expires_in_seconds(Some(&Value::from(59.9))), Some(59));
        assert_eq!(expires_in_seconds(Some(&Value::from("nan"))), None);
    }

    #[test]
    fn absurd_lifetimes_are_clamped_to_a_day() {
        let day = MAX_TOKEN_LIFETIME.as_secs();
        for absurd in [
            serde_json::json!(10_000_000_000_000_000_000_u64),
            serde_json::json!(1e19),
            serde_json::json!(1e300),
            serde_json::json!("18446744073709551615"),
        ] {
            assert_eq!(expires_in_seconds(Some(&absurd)), Some(day), "{absurd}");
        }
        let (stale, expired) = cache_lifetime(1000, 1000 + day, None, Duration::from_secs(300));
        assert!(stale < expired && expired <= MAX_TOKEN_LIFETIME);
    }

    #[test]
    fn guids_are_recognized() {
        assert!(is_guid("72f988bf-86f1-41af-91ab-2d7cd011db47"));
        assert!(!is_guid("72f988bf-86f1-41af-91ab-2d7cd011db4"));
        assert!(!is_guid("../../evil/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"));
    }

    #[test]
    fn jwt_shaped_words_are_redacted_from_logged_answers() {
        assert!(looks_like_jwt(
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXBhcnQ"
        ));
        assert!(!looks_like_jwt("AADSTS50013:"));
    }

    #[test]
    fn a_jwt_at_the_length_limit_is_redacted_whole() {
        let config = crate::config::Config::parse(
            r#"
[inbound]
issuers = ["https://idp.example/"]
audiences = ["api://a"]
[identity]
token_endpoint = "https://idp.example/token"
client_id = "a"
client_secret = { env = "S" }
[[routes]]
name = "r"
path_prefix = "/r/"
upstream = "https://up.example/"
token = "app"
scopes = ["api://b/.default"]
"#,
            &|name| (name == "S").then(|| "s3cret".to_owned()),
        )
        .expect("valid");
        let identity = &config.identities["default"];
        let jwt = format!(
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.{}",
            "c2ln".repeat(200)
        );
        // The token straddles the cut: shortening first would leave a prefix that no longer looks like a JWT.
        let padding = "x".repeat(MAX_LOGGED_DESCRIPTION - 20);
        let body = serde_json::json!({
            "error": "invalid_grant",
            "error_description": format!("{padding} {jwt}"),
        });
        let logged = redacted_answer(body.to_string().as_bytes(), identity);
        assert!(logged.contains("[redacted]"), "{logged}");
        assert!(!logged.contains("eyJhbGci"), "{logged}");
    }
}
