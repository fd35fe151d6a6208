//! One token request to an identity's token endpoint: the form for each grant (Entra On-Behalf-Of, RFC 8693
//! token exchange, client credentials), client authentication, one jittered retry, the IdP's `Retry-After`
//! remembered per endpoint, the concurrency cap, and the answer read into an [`UpstreamToken`]. Only this
//! file talks to the token endpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tracing::Instrument as _;

use aws_lc_rs::rand::SecureRandom as _;
use http::HeaderValue;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::{AuthMethod, Credential, Flavor, Identity, Refresh, Watched};
use crate::oauth::{
    CLIENT_ASSERTION_TYPE, GRANT_CLIENT_CREDENTIALS, GRANT_JWT_BEARER, GRANT_TOKEN_EXCHANGE,
    TOKEN_TYPE_ACCESS_TOKEN, now_unix,
};
use crate::secret::Secret;
use crate::telemetry::{Grant as GrantLabel, IdpOutcome, Metrics};

use super::answer::{
    ExchangeError, MAX_RETRY_AFTER, MAX_TOKEN_LIFETIME, Misconfiguration, TokenResponse,
    Unavailable, cache_lifetime, expires_in_seconds, jwt_exp, map_error_answer, read_limited,
    redacted_answer, retry_after,
};
use super::client_auth::{self, AssertionAlg};
use super::managed_identity::ManagedIdentityTokens;
use super::token::{UpstreamToken, bearer_header};

/// IdP answers are a few KiB; a larger one is refused rather than buffered.
const MAX_IDP_BODY_BYTES: usize = 256 * 1024;
/// The one retry of a failed token request waits 50–150 ms (jittered, so a fleet does not retry in step).
const RETRY_BASE_DELAY_MS: u64 = 50;
/// A misconfiguration (`invalid_client`, …) is logged at error at most this often per identity: once per
/// burst, not once per request.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Endpoints whose `Retry-After` is remembered at once; each entry lives at most [`MAX_RETRY_AFTER`].
const MAX_BACKOFF_ENTRIES: u64 = 10_000;

/// The `Retry-After`s IdPs sent, per client and **resolved** token endpoint: with a `{tenantid}` endpoint, one
/// tenant's throttling never blocks another's (SPEC §8). Kept across reloads, like the token cache.
pub(crate) struct IdpBackoff {
    until: moka::sync::Cache<(String, String), Instant>,
}

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
pub(crate) struct IdentityClient {
    pub(crate) identity: Arc<Identity>,
    /// The `claims` parameter (client capabilities), built once.
    pub(crate) claims: Option<String>,
    metrics: Arc<Metrics>,
    http: reqwest::Client,
    permits: Semaphore,
    backoff: Arc<IdpBackoff>,
    /// The identity's managed identity, when it authenticates with one or is one.
    managed_identity: Option<ManagedIdentityTokens>,
    last_error_log_ms: AtomicU64,
    epoch: Instant,
}

impl IdentityClient {
    pub(crate) fn new(
        identity: &Arc<Identity>,
        http: reqwest::Client,
        backoff: &Arc<IdpBackoff>,
        metrics: &Arc<Metrics>,
    ) -> IdentityClient {
        IdentityClient {
            claims: capabilities_claims(identity),
            managed_identity: match &identity.credential {
                Credential::ManagedIdentity(mi) => {
                    Some(ManagedIdentityTokens::new(mi, http.clone()))
                }
                Credential::Secret(_)
                | Credential::Certificate(_)
                | Credential::AssertionFile(_) => None,
            },
            identity: Arc::clone(identity),
            metrics: Arc::clone(metrics),
            http,
            permits: Semaphore::new(identity.max_concurrent),
            backoff: Arc::clone(backoff),
            last_error_log_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A watched credential, re-read first if its files changed (a rotated secret is used at once; one that
    /// does not load keeps the last good one, and is logged once).
    async fn refreshed<T: Send + Sync + 'static>(&self, watched: &Arc<Watched<T>>) -> Arc<T> {
        self.report(watched.refresh().await);
        watched.get()
    }

    /// Logs and counts what a look at a credential's files found.
    fn report(&self, refresh: Refresh) {
        let identity = &self.identity.name;
        match refresh {
            Refresh::Unchanged => {}
            Refresh::Reloaded => {
                tracing::info!(%identity, "client credential changed on disk: reloaded");
                self.metrics.record_credential_reload(identity, true);
            }
            Refresh::Rejected(error) => {
                tracing::error!(%identity, error = %crate::error::chain(&error),
                    "client credential changed on disk but does not load; keeping the last good one");
                self.metrics.record_credential_reload(identity, false);
            }
        }
    }

    fn managed_identity(&self) -> Result<&ManagedIdentityTokens, ExchangeError> {
        self.managed_identity
            .as_ref()
            .ok_or(ExchangeError::Misconfigured(
                Misconfiguration::NoManagedIdentity,
            ))
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

/// What the token is requested for: a caller (On-Behalf-Of or RFC 8693), or the app itself.
pub(crate) enum Grant {
    OnBehalfOf { subject: Secret, subject_exp: u64 },
    App,
}

/// Everything one token request needs, owned, so the background refresh can send it again.
pub(crate) struct TokenRequest {
    pub(crate) client: Arc<IdentityClient>,
    pub(crate) route: String,
    pub(crate) token_endpoint: String,
    pub(crate) grant: Grant,
    pub(crate) scopes: Vec<String>,
    pub(crate) audience: Vec<String>,
    pub(crate) resource: Vec<String>,
    pub(crate) requested_token_type: Option<String>,
    pub(crate) claims: Option<String>,
    pub(crate) expiry_margin: Duration,
}

impl TokenRequest {
    /// The token request, retried once (with jitter) when the IdP is unavailable and gave no `Retry-After`.
    /// A `Retry-After` is remembered for the client at this endpoint: until it passes, requests fail at once.
    pub(crate) async fn send(&self) -> Result<UpstreamToken, ExchangeError> {
        let identity = &self.client.identity;
        let grant = match (&self.grant, identity.flavor) {
            (Grant::App, Flavor::ManagedIdentity) => GrantLabel::ManagedIdentity,
            (Grant::App, Flavor::Entra | Flavor::Rfc8693) => GrantLabel::ClientCredentials,
            (Grant::OnBehalfOf { .. }, Flavor::Entra | Flavor::ManagedIdentity) => GrantLabel::Obo,
            (Grant::OnBehalfOf { .. }, Flavor::Rfc8693) => GrantLabel::TokenExchange,
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
                IdpOutcome::Throttled,
                started.elapsed(),
            );
            return Err(ExchangeError::Unavailable {
                cause: Unavailable::BackingOff,
                retry_after: Some(wait),
            });
        }
        let _permit = self
            .client
            .permits
            .acquire()
            .await
            .map_err(|_| Unavailable::Interrupted)?;
        let mut outcome = self.send_once().await;
        if let Err(ExchangeError::Unavailable {
            retry_after: None,
            cause,
        }) = &outcome
        {
            tracing::debug!(route = %self.route, identity = %identity.name, error = %crate::error::chain(cause), "token request failed; retrying once");
            tokio::time::sleep(jitter()).await;
            outcome = self.send_once().await;
        }
        let recorded = match &outcome {
            Ok(_) => IdpOutcome::Ok,
            Err(ExchangeError::Unavailable {
                retry_after: Some(_),
                ..
            }) => IdpOutcome::Throttled,
            Err(ExchangeError::Unavailable { .. }) => IdpOutcome::Unavailable,
            Err(ExchangeError::SubjectRejected { .. }) => IdpOutcome::InvalidGrant,
            Err(ExchangeError::ClaimsChallenge { .. }) => IdpOutcome::ClaimsChallenge,
            Err(ExchangeError::ConsentRequired { .. }) => IdpOutcome::ConsentRequired,
            Err(ExchangeError::Misconfigured(_)) => IdpOutcome::Misconfigured,
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
                tracing::warn!(route = %self.route, identity = %identity.name, error = %crate::error::chain(error), "token request failed");
            }
            Err(error @ ExchangeError::Misconfigured(_)) => {
                if self.client.should_log_error() {
                    tracing::error!(route = %self.route, identity = %identity.name, error = %crate::error::chain(error),
                        "token request refused: check this identity's configuration (logged once per minute)");
                } else {
                    tracing::debug!(route = %self.route, identity = %identity.name, error = %crate::error::chain(error), "token request refused");
                }
            }
            Err(error) => {
                tracing::info!(route = %self.route, identity = %identity.name, %error, "token request declined for this caller");
            }
        }
        outcome
    }

    /// The form of this request's grant, targets and client authentication, and the `Authorization: Basic`
    /// value for `client_secret_basic`.
    async fn form(&self) -> Result<(Vec<(&'static str, String)>, Option<Secret>), ExchangeError> {
        let identity = &self.client.identity;
        let mut form: Vec<(&'static str, String)> = Vec::new();
        match (&self.grant, identity.flavor) {
            (Grant::OnBehalfOf { subject, .. }, Flavor::Entra | Flavor::ManagedIdentity) => {
                form.push(("grant_type", GRANT_JWT_BEARER.to_owned()));
                form.push(("requested_token_use", "on_behalf_of".to_owned()));
                form.push(("assertion", subject.expose().to_owned()));
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
            }
            (Grant::App, _) => form.push(("grant_type", GRANT_CLIENT_CREDENTIALS.to_owned())),
        }
        if !self.scopes.is_empty() {
            form.push(("scope", self.scopes.join(" ")));
        }
        if let Some(claims) = &self.claims {
            form.push(("claims", claims.clone()));
        }
        let mut basic = None;
        let assertion = match (&identity.credential, identity.auth_method) {
            (Credential::Secret(secret), AuthMethod::ClientSecretBasic) => {
                basic = Some(client_auth::basic_authorization(
                    &identity.client_id,
                    &*self.client.refreshed(secret).await,
                ));
                None
            }
            (Credential::Secret(secret), _) => {
                form.push(("client_id", identity.client_id.clone()));
                form.push((
                    "client_secret",
                    self.client.refreshed(secret).await.expose().to_owned(),
                ));
                None
            }
            (Credential::ManagedIdentity(_), _) => {
                let audience = crate::config::token_exchange_audience(&self.token_endpoint);
                let (token, _) = self.client.managed_identity()?.token(audience).await?;
                Some((*token).clone())
            }
            (Credential::Certificate(certificate), _) => {
                let alg = match identity.flavor {
                    Flavor::Entra | Flavor::ManagedIdentity => AssertionAlg::PS256,
                    Flavor::Rfc8693 => AssertionAlg::RS256,
                };
                Some(
                    client_auth::sign_assertion(
                        &*self.client.refreshed(certificate).await,
                        &identity.client_id,
                        &self.token_endpoint,
                        alg,
                        now_unix(),
                    )
                    .map_err(Misconfiguration::Signing)?,
                )
            }
            (Credential::AssertionFile(file), _) => {
                let (assertion, refresh) = file
                    .read()
                    .await
                    .map_err(|e| Misconfiguration::Credential(Arc::new(e)))?;
                self.client.report(refresh);
                Some(assertion)
            }
        };
        if let Some(assertion) = assertion {
            form.push(("client_id", identity.client_id.clone()));
            form.push(("client_assertion_type", CLIENT_ASSERTION_TYPE.to_owned()));
            form.push(("client_assertion", assertion.expose().to_owned()));
        }
        Ok((form, basic))
    }

    async fn send_once(&self) -> Result<UpstreamToken, ExchangeError> {
        let identity = &self.client.identity;
        if identity.flavor == Flavor::ManagedIdentity {
            // A managed identity's token is its own: it never stands for a caller (`check` refuses an
            // `obo` route on one; this holds whatever the configuration says).
            if let Grant::OnBehalfOf { .. } = self.grant {
                return Err(Misconfiguration::ManagedIdentityOnBehalfOf.into());
            }
            return self.managed_identity_token().await;
        }
        let client_request_id = crate::ids::random_uuid();
        let (form, basic) = self.form().await?;
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
            let mut value = HeaderValue::from_str(basic.expose())
                .map_err(|_| Misconfiguration::CredentialNotAHeader)?;
            value.set_sensitive(true);
            request = request.header(http::header::AUTHORIZATION, value);
        }
        drop(form);
        // A client span per attempt, with Entra's `client-request-id`; the endpoint's host and port only,
        // since its path may hold the caller's tenant (SPEC §15).
        let span = tracing::info_span!(
            target: crate::telemetry::trace::SPAN_TARGET,
            "token request",
            otel.name = "POST",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            http.request.method = "POST",
            server.address = tracing::field::Empty,
            server.port = tracing::field::Empty,
            client_request_id = client_request_id.as_str(),
            obo.grant = match self.grant {
                Grant::OnBehalfOf { .. } => "on_behalf_of",
                Grant::App => "app",
            },
            http.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        crate::telemetry::trace::record_server(&span, &identity.token_endpoint);
        let answered = async {
            let response = request.send().await.map_err(|e| {
                if e.is_timeout() {
                    Unavailable::Timeout
                } else {
                    Unavailable::Transport(Arc::new(e))
                }
            })?;
            let status = response.status();
            let retry_after = retry_after(response.headers(), MAX_RETRY_AFTER);
            let body = read_limited(response, MAX_IDP_BODY_BYTES).await?;
            Ok::<_, ExchangeError>((status, retry_after, body))
        }
        .instrument(span.clone())
        .await;
        let (status, retry_after, body) = match answered {
            Ok(answered) => answered,
            Err(error) => {
                let kind = match &error {
                    ExchangeError::Unavailable {
                        cause: Unavailable::Timeout,
                        ..
                    } => "timeout",
                    _ => "transport",
                };
                span.record("error.type", kind)
                    .record("otel.status_code", "error");
                return Err(error);
            }
        };
        span.record("http.response.status_code", status.as_u16());
        if !status.is_success() {
            span.record("otel.status_code", "error");
        }
        drop(span);
        tracing::debug!(
            route = %self.route,
            identity = %identity.name,
            status = status.as_u16(),
            client_request_id = %client_request_id,
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "token request answered"
        );
        if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
            return Err(ExchangeError::Unavailable {
                cause: Unavailable::Status {
                    status: status.as_u16(),
                    client_request_id,
                },
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
        let answer: TokenResponse = serde_json::from_slice(&body)
            .map_err(|_| Unavailable::NotATokenResponse(client_request_id))?;
        let token_type = answer.token_type.as_deref().unwrap_or_default();
        if !token_type.eq_ignore_ascii_case("bearer") {
            return Err(Misconfiguration::NotBearer(token_type.chars().take(16).collect()).into());
        }
        if answer.access_token.is_empty() {
            return Err(Unavailable::EmptyToken.into());
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
            header: bearer_header(token.expose()).ok_or(Misconfiguration::TokenNotAHeader)?,
            expires_on,
            stale_at: instant + until_stale,
            expires_at: instant + until_expired,
        })
    }
}

impl TokenRequest {
    /// An `app` route's token straight from the managed identity (`flavor = "managed_identity"`): its
    /// resource is the route's one scope without `/.default`.
    async fn managed_identity_token(&self) -> Result<UpstreamToken, ExchangeError> {
        let scope = self.scopes.first().map_or("", String::as_str);
        let resource = scope.strip_suffix("/.default").unwrap_or(scope);
        let (token, expires_on) = self.client.managed_identity()?.token(resource).await?;
        let now = now_unix();
        let (until_stale, until_expired) =
            cache_lifetime(now, expires_on, None, self.expiry_margin);
        let instant = Instant::now();
        Ok(UpstreamToken {
            header: bearer_header(token.expose()).ok_or(Misconfiguration::TokenNotAHeader)?,
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
