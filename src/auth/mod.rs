//! Caller token validation: the `Authorization` header is parsed strictly ([`bearer`]), the JWT's header and
//! payload are decoded and checked by us first ([`token`]: size, `alg` allow-list, `crit`, duplicate claims,
//! numeric `exp`), the issuer's keys are chosen ([`issuers`], [`jwks`]), then the signature and registered
//! claims are verified by `jsonwebtoken`. Route policy (required scopes or roles) is applied by
//! [`policy::authorize`].

mod bearer;
mod claims;
mod issuers;
pub(crate) mod jwks;
mod policy;
#[cfg(test)]
mod tests;
mod token;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use jsonwebtoken::Validation;
use serde_json::Value;
use tracing::Instrument as _;

use crate::config::Inbound;
use crate::digest::LastDigest;
use crate::error::{ProxyError, TokenDefect};
use issuers::{Issuers, fetching_equal, key_sources_equal, verification_equal};
use jwks::{IssuerKeys, KEYS_RETRY_AFTER};
use token::{Unverified, caller_claims, parse_unverified};

use crate::oauth::now_unix;
use bearer::{bearer_range, check_b64token};
pub(crate) use claims::{Caller, CallerClaims, CallerToken};
pub(crate) use policy::authorize;

/// Validates callers' tokens against the configured issuers.
pub(crate) struct Authenticator {
    issuers: Arc<Issuers>,
    /// Key sets this generation fetches anew (the others were kept from the previous one).
    fresh: Vec<Arc<IssuerKeys>>,
    validated: Arc<ValidatedCache>,
    /// The `[inbound]` this was built from, for the next reload to compare against.
    inbound: Inbound,
    clock_skew: Duration,
}

type ValidatedCache = moka::sync::Cache<[u8; 32], Arc<CallerClaims>, crate::digest::DigestHash>;

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("issuers", &self.issuers.fixed.keys())
            .finish_non_exhaustive()
    }
}

/// Validated tokens are forgotten at their own `exp` (plus the clock skew they were accepted with).
struct ValidatedExpiry {
    clock_skew: u64,
}

impl moka::Expiry<[u8; 32], Arc<CallerClaims>> for ValidatedExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        claims: &Arc<CallerClaims>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(Duration::from_secs(
            claims
                .exp
                .saturating_add(self.clock_skew)
                .saturating_sub(now_unix()),
        ))
    }
}

impl Authenticator {
    /// Builds the validator; [`Authenticator::start`] begins fetching keys. The validated-token cache holds
    /// up to `validated_capacity` callers (`cache.max_entries`, like the upstream-token cache).
    pub(crate) fn new(
        inbound: &Inbound,
        validated_capacity: u64,
        http: &reqwest::Client,
        metrics: Arc<crate::telemetry::Metrics>,
    ) -> Result<Self, url::ParseError> {
        Self::build(inbound, validated_capacity, http, metrics, None)
    }

    /// The validator of a reloaded `[inbound]`. What did not change is kept: the key sets of every issuer
    /// whose discovery, JWKS and CA settings are the same (so a JWKS outage during a reload does not turn
    /// into 503s), and the validated-token cache when nothing that decides verification changed.
    pub(crate) fn reload(
        &self,
        inbound: &Inbound,
        validated_capacity: u64,
        http: &reqwest::Client,
        metrics: Arc<crate::telemetry::Metrics>,
    ) -> Result<Self, url::ParseError> {
        Self::build(inbound, validated_capacity, http, metrics, Some(self))
    }

    fn build(
        inbound: &Inbound,
        validated_capacity: u64,
        http: &reqwest::Client,
        metrics: Arc<crate::telemetry::Metrics>,
        previous: Option<&Authenticator>,
    ) -> Result<Self, url::ParseError> {
        let (issuers, fresh) = match previous {
            Some(previous) if key_sources_equal(&previous.inbound, inbound) => {
                (Arc::clone(&previous.issuers), Vec::new())
            }
            _ => {
                let policy = jwks::FetchPolicy {
                    http: http.clone(),
                    metrics,
                    refresh: inbound.jwks_refresh,
                    min_refetch: inbound.jwks_min_refetch,
                };
                let reusable = previous
                    .filter(|p| fetching_equal(&p.inbound, inbound))
                    .map(|p| &*p.issuers);
                let (issuers, fresh) = Issuers::new(inbound, policy, reusable)?;
                (Arc::new(issuers), fresh)
            }
        };
        let validated = match previous {
            Some(previous) if verification_equal(&previous.inbound, inbound) => {
                Arc::clone(&previous.validated)
            }
            _ => Arc::new(
                moka::sync::Cache::builder()
                    .max_capacity(validated_capacity)
                    .expire_after(ValidatedExpiry {
                        clock_skew: inbound.clock_skew.as_secs(),
                    })
                    .build_with_hasher(crate::digest::DigestHash::default()),
            ),
        };
        Ok(Authenticator {
            issuers,
            fresh,
            validated,
            inbound: inbound.clone(),
            clock_skew: inbound.clock_skew,
        })
    }

    /// Spawns the background fetch and refresh of the fixed issuers' keys that this generation did not keep
    /// from the previous one (those are maintained already).
    pub(crate) fn start(&self) -> Vec<tokio::task::JoinHandle<()>> {
        self.fresh
            .iter()
            .map(|keys| tokio::spawn(IssuerKeys::maintain(Arc::downgrade(keys))))
            .collect()
    }

    /// Resolves once every fixed issuer's keys have been fetched (what `/readyz` reports).
    pub(crate) async fn ready(&self) {
        for keys in self.issuers.fixed.values() {
            keys.fetched().await;
        }
    }

    /// Fixed issuers whose keys have not been fetched yet (empty when ready).
    pub(crate) fn issuers_without_keys(&self) -> Vec<String> {
        let mut missing: Vec<String> = self
            .issuers
            .fixed
            .values()
            .filter(|k| k.state().keys.is_none())
            .map(|k| k.issuer.clone())
            .collect();
        missing.sort();
        missing
    }

    /// Validates the caller's bearer token from the request headers. A token seen before (same bytes) is
    /// answered from the validated-token cache, with its expiry and its signing key checked again.
    pub(crate) async fn authenticate(
        &self,
        headers: &HeaderMap,
        last: &LastDigest,
    ) -> Result<Caller, ProxyError> {
        // The characters are checked only for a token not seen before: the same bytes passed that check.
        let (header, range) = bearer_range(headers)?;
        // Hashed as bytes (`bearer_range` checked them); read as text only to verify a new token.
        let key = last.sha256(header.as_bytes().get(range.clone()).unwrap_or_default());
        let token = CallerToken::new(header.clone(), range);
        let claims = if let Some(claims) = self.validated.get(&key) {
            if now_unix() > claims.exp.saturating_add(self.clock_skew.as_secs()) {
                self.validated.invalidate(&key);
                return Err(ProxyError::InvalidToken(TokenDefect::Expired));
            }
            if claims.key.is_withdrawn() {
                self.validated.invalidate(&key);
                return Err(ProxyError::InvalidToken(TokenDefect::KeyWithdrawn));
            }
            tracing::Span::current().record("obo.validated_cache", "hit");
            claims
        } else {
            tracing::Span::current().record("obo.validated_cache", "miss");
            check_b64token(token.expose())?;
            let claims = Arc::new(self.verify(token.expose()).await?);
            self.validated.insert(key, Arc::clone(&claims));
            claims
        };
        // An ID token, or an app token authorized only by an ACL: Microsoft.Identity.Web refuses these too.
        if claims.scopes.is_empty() && claims.roles.is_empty() && !self.inbound.allow_acl_tokens {
            return Err(ProxyError::InvalidToken(TokenDefect::NoScopesOrRoles));
        }
        Ok(Caller {
            token,
            digest: key,
            claims,
        })
    }

    /// Full validation: structure and header checks, issuer and key selection, signature and claims.
    async fn verify(&self, token: &str) -> Result<CallerClaims, ProxyError> {
        let parsed = parse_unverified(token, &self.inbound.algorithms)?;
        let issuer = self.issuers.for_token(&parsed).await?;
        let key = self.key_for(&issuer, &parsed).await?;
        if key.family != parsed.alg.family() || key.alg.is_some_and(|a| a != parsed.alg) {
            return Err(ProxyError::InvalidToken(TokenDefect::AlgorithmMismatch));
        }
        let mut validation = Validation::new(parsed.alg);
        validation.leeway = self.clock_skew.as_secs();
        validation.validate_nbf = true;
        validation.set_audience(&self.inbound.audiences);
        validation.set_issuer(&[&issuer.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        jsonwebtoken::decode::<serde::de::IgnoredAny>(token, &key.decoding, &validation).map_err(
            |e| {
                use jsonwebtoken::errors::ErrorKind;
                ProxyError::InvalidToken(match e.kind() {
                    ErrorKind::ExpiredSignature => TokenDefect::Expired,
                    ErrorKind::ImmatureSignature => TokenDefect::NotYetValid,
                    ErrorKind::InvalidAudience => TokenDefect::AudienceNotAccepted,
                    ErrorKind::InvalidIssuer => TokenDefect::IssuerNotAccepted,
                    ErrorKind::InvalidSignature => TokenDefect::SignatureInvalid,
                    ErrorKind::InvalidAlgorithm => TokenDefect::AlgorithmNotAllowed,
                    ErrorKind::MissingRequiredClaim(_) => TokenDefect::RequiredClaimMissing,
                    _ => TokenDefect::Unverifiable,
                })
            },
        )?;
        let now = now_unix();
        if let Some(iat) = parsed.claims.get("iat").and_then(Value::as_f64) {
            #[allow(
                clippy::cast_precision_loss,
                reason = "seconds since 1970 fit f64 exactly"
            )]
            if iat > (now + self.clock_skew.as_secs()) as f64 {
                return Err(ProxyError::InvalidToken(TokenDefect::IssuedInTheFuture));
            }
        }
        Ok(caller_claims(
            &parsed.claims,
            parsed.exp,
            &self.inbound.scope_claims,
            &self.inbound.roles_claim,
            key,
        ))
    }

    async fn key_for(
        &self,
        issuer: &IssuerKeys,
        parsed: &Unverified,
    ) -> Result<Arc<jwks::Key>, ProxyError> {
        let mut state = issuer.state();
        if !state.attempted {
            state = issuer
                .first_attempt()
                .instrument(key_fetch_span("first fetch"))
                .await;
        }
        if state.keys.is_none() {
            // Never fetched: try again now (rate-limited, one fetch at a time).
            issuer
                .refetch_for_unknown_kid()
                .instrument(key_fetch_span("no keys"))
                .await;
            state = issuer.state();
        }
        let Some(mut keys) = state.keys else {
            return Err(ProxyError::KeysUnavailable {
                retry_after: KEYS_RETRY_AFTER,
            });
        };
        let Some(kid) = &parsed.kid else {
            return match keys.anonymous.as_slice() {
                [only] => Ok(Arc::clone(only)),
                _ => Err(ProxyError::InvalidToken(TokenDefect::NoKeyId)),
            };
        };
        if !keys.by_kid.contains_key(kid) {
            issuer
                .refetch_for_unknown_kid()
                .instrument(key_fetch_span("unknown kid"))
                .await;
            if let Some(fresh) = issuer.state().keys {
                keys = fresh;
            }
        }
        keys.by_kid
            .get(kid)
            .cloned()
            .ok_or(ProxyError::InvalidToken(TokenDefect::KeyUnknown))
    }
}

/// The span of a wait for an issuer's signing keys (SPEC §15: validation with the key-fetch wait), and why
/// the keys were fetched.
fn key_fetch_span(reason: &'static str) -> tracing::Span {
    tracing::info_span!(
        target: crate::telemetry::trace::SPAN_TARGET,
        "key fetch wait",
        obo.key_fetch = reason
    )
}
