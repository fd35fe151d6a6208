//! Caller token validation: the `Authorization` header is parsed strictly, the JWT's header and payload are
//! decoded and checked by us first (size, `alg` allow-list, `crit`, duplicate claims, numeric `exp`), then the
//! signature and registered claims are verified by `jsonwebtoken` against the issuer's published keys.
//! Route policy (required scopes or roles) is applied by [`authorize`].

pub mod jwks;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::HeaderMap;
use jsonwebtoken::{Algorithm, Validation};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use url::Url;

use crate::config::{Inbound, Policy, Route, TENANT_PLACEHOLDER, TokenKind};
use crate::error::ProxyError;
use crate::secret::Secret;
use jwks::{IssuerKeys, KEYS_RETRY_AFTER};

/// RFC 6750 bearer tokens from Entra are 1–3 KiB; 16 KiB leaves room for big group claims and refuses
/// decompression-bomb-sized input before any decoding.
pub const MAX_BEARER_BYTES: usize = 16 * 1024;

/// Resolved `{tenantid}` issuers held at once; beyond it the least recently used tenant's keys are dropped.
pub const MAX_TENANT_ISSUERS: u64 = 1024;

/// A validated caller.
pub struct Caller {
    /// The caller's own token: the subject token of an OBO exchange, or what `passthrough` forwards.
    pub token: Secret,
    /// SHA-256 of `token`, computed once: the validated-token cache and the upstream-token cache key on it.
    pub digest: [u8; 32],
    pub claims: Arc<CallerClaims>,
}

impl Caller {
    /// Every claim of the caller's token (for the token API and `forward_claims`). Only what every request
    /// needs is kept in [`CallerClaims`], so that a validated-token cache entry stays small; the rest is read
    /// again from the token, whose signature was verified when these same bytes were first seen.
    pub fn all_claims(&self) -> Map<String, Value> {
        self.token
            .expose()
            .split('.')
            .nth(1)
            .and_then(decode_object)
            .unwrap_or_default()
    }
}

/// The claims of a validated caller token that every request needs; the validated-token cache holds these.
#[derive(Clone)]
pub struct CallerClaims {
    pub exp: u64,
    /// The `tid` claim, when it is a string (a `{tenantid}` token endpoint is filled from it).
    pub tid: Option<Box<str>>,
    /// The delegated scopes, from every `scope_claims` claim; sorted, without duplicates.
    pub scopes: Words,
    /// The application roles (`roles_claim`).
    pub roles: Words,
    /// The key that verified the token: when its issuer withdraws it, the cached token stops validating.
    key: Arc<jwks::Key>,
}

impl fmt::Debug for CallerClaims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallerClaims")
            .field("exp", &self.exp)
            .field("tid", &self.tid)
            .field("scopes", &self.scopes)
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

/// A set of names (scopes, roles) in one allocation: joined by spaces. A name that itself contains a space
/// is left out rather than split, so no name can stand for two.
#[derive(Debug, Clone, Default)]
pub struct Words(Box<str>);

impl Words {
    fn new(mut names: Vec<&str>) -> Words {
        names.retain(|n| !n.is_empty() && !n.contains(' '));
        names.sort_unstable();
        names.dedup();
        Words(names.join(" ").into_boxed_str())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        !name.is_empty() && self.0.split(' ').any(|n| n == name)
    }
}

/// A `{tenantid}` issuer and how its URLs are made.
#[derive(PartialEq, Eq)]
struct IssuerTemplate {
    issuer: String,
    discovery_url: Option<String>,
    jwks_uri: Option<String>,
}

/// First discovery fetches for `{tenantid}` tenants not seen before, across all of them: a steady rate and a
/// burst (SPEC §8). A token naming a fresh GUID costs nothing to forge (its signature is never checked
/// before its keys are fetched), so without a budget each one would be an outbound fetch.
pub const TENANT_FETCHES_PER_SECOND: f64 = 5.0;
pub const TENANT_FETCH_BURST: f64 = 10.0;

/// A token bucket.
struct FetchBudget {
    /// Tokens left, and when they were counted.
    state: std::sync::Mutex<(f64, Instant)>,
}

impl FetchBudget {
    fn new() -> Self {
        FetchBudget {
            state: std::sync::Mutex::new((TENANT_FETCH_BURST, Instant::now())),
        }
    }

    /// Takes one fetch, or says how long until one is available.
    fn take(&self) -> Result<(), Duration> {
        let Ok(mut state) = self.state.lock() else {
            return Err(Duration::from_secs(1));
        };
        let now = Instant::now();
        let (tokens, counted) = *state;
        let tokens = (tokens
            + now.duration_since(counted).as_secs_f64() * TENANT_FETCHES_PER_SECOND)
            .min(TENANT_FETCH_BURST);
        if tokens >= 1.0 {
            *state = (tokens - 1.0, now);
            Ok(())
        } else {
            *state = (tokens, now);
            Err(Duration::from_secs_f64(
                (1.0 - tokens) / TENANT_FETCHES_PER_SECOND,
            ))
        }
    }
}

/// Why an on-demand tenant's keys could not be had.
#[derive(Debug, thiserror::Error)]
enum TenantError {
    #[error("first fetches for new tenants are over budget")]
    OverBudget(Duration),
    #[error("the tenant's discovery or key set could not be fetched")]
    Fetch,
    #[error("the tenant's URLs are not valid")]
    Url(#[source] url::ParseError),
}

/// Where callers' keys come from: the configured issuers, fixed and `{tenantid}` templates, with their key
/// sets. Kept across reloads that do not change what it was built from.
struct Issuers {
    /// Fixed issuers, and the allowed tenants of `{tenantid}` issuers, by exact `iss`: fetched at start.
    fixed: HashMap<String, Arc<IssuerKeys>>,
    /// The tenant of each fixed issuer made from a `{tenantid}` template.
    fixed_tenants: HashMap<String, String>,
    templates: Vec<IssuerTemplate>,
    /// `allowed_tenants` is set: only the fixed issuers made from it are accepted, no tenant on demand.
    tenants_listed: bool,
    /// `{tenantid}` issuers resolved on demand (any GUID tenant), bounded; a tenant whose first fetch failed
    /// holds no slot.
    tenants: moka::future::Cache<String, Arc<IssuerKeys>>,
    budget: FetchBudget,
    policy: jwks::FetchPolicy,
}

/// What in `[inbound]` decides where keys come from.
fn key_sources_equal(a: &Inbound, b: &Inbound) -> bool {
    a.issuers == b.issuers
        && a.discovery_url == b.discovery_url
        && a.jwks_uri == b.jwks_uri
        && a.allowed_tenants == b.allowed_tenants
        && fetching_equal(a, b)
}

/// What in `[inbound]` decides how keys are fetched.
fn fetching_equal(a: &Inbound, b: &Inbound) -> bool {
    a.ca_file == b.ca_file
        && a.jwks_refresh == b.jwks_refresh
        && a.jwks_min_refetch == b.jwks_min_refetch
}

/// What in `[inbound]` decides whether a token verifies: when it is unchanged, a reload keeps the
/// validated-token cache. Policy and `allow_acl_tokens` are applied on every request, cached or not.
fn verification_equal(a: &Inbound, b: &Inbound) -> bool {
    key_sources_equal(a, b)
        && a.audiences == b.audiences
        && a.algorithms == b.algorithms
        && a.clock_skew == b.clock_skew
        && a.scope_claims == b.scope_claims
        && a.roles_claim == b.roles_claim
}

impl Issuers {
    /// The issuers of `inbound`, reusing the key sets of `previous` whose issuer, discovery URL and JWKS URI
    /// are unchanged (when the fetch settings are). Also returns the key sets that are new, whose
    /// maintenance must be started.
    fn new(
        inbound: &Inbound,
        policy: jwks::FetchPolicy,
        previous: Option<&Issuers>,
    ) -> Result<(Issuers, Vec<Arc<IssuerKeys>>), url::ParseError> {
        let mut fixed = HashMap::new();
        let mut fixed_tenants = HashMap::new();
        let mut templates = Vec::new();
        let mut fresh = Vec::new();
        let mut add = |keys: IssuerKeys, fixed: &mut HashMap<String, Arc<IssuerKeys>>| {
            let kept = previous
                .and_then(|p| p.fixed.get(&keys.issuer))
                .filter(|old| old.same_source(&keys));
            let keys = if let Some(old) = kept {
                Arc::clone(old)
            } else {
                let keys = Arc::new(keys);
                fresh.push(Arc::clone(&keys));
                keys
            };
            fixed.insert(keys.issuer.clone(), keys);
        };
        for issuer in &inbound.issuers {
            let template = IssuerTemplate {
                issuer: issuer.clone(),
                discovery_url: inbound.discovery_url.clone(),
                jwks_uri: inbound.jwks_uri.clone(),
            };
            if issuer.contains(TENANT_PLACEHOLDER) {
                for tenant in &inbound.allowed_tenants {
                    let keys = issuer_keys(&template, tenant, &policy)?;
                    fixed_tenants.insert(keys.issuer.clone(), tenant.clone());
                    add(keys, &mut fixed);
                }
                templates.push(template);
            } else {
                add(issuer_keys(&template, "", &policy)?, &mut fixed);
            }
        }
        let issuers = Issuers {
            fixed,
            fixed_tenants,
            templates,
            tenants_listed: !inbound.allowed_tenants.is_empty(),
            tenants: moka::future::Cache::builder()
                .max_capacity(MAX_TENANT_ISSUERS)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build(),
            budget: FetchBudget::new(),
            policy,
        };
        Ok((issuers, fresh))
    }

    /// The keys for the token's (unverified) `iss`: a fixed issuer, or a `{tenantid}` issuer filled from an
    /// allowed `tid` — checked before any network fetch, so a token cannot make us fetch from anywhere.
    async fn for_token(&self, parsed: &Unverified) -> Result<Arc<IssuerKeys>, ProxyError> {
        let iss = parsed
            .claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or(ProxyError::InvalidToken("issuer not accepted"))?;
        if let Some(keys) = self.fixed.get(iss) {
            // An allowed tenant's issuer: the token's tid must name that same tenant (the token endpoint is
            // filled from it).
            if let Some(tenant) = self.fixed_tenants.get(iss)
                && parsed.claims.get("tid").and_then(Value::as_str) != Some(tenant.as_str())
            {
                return Err(ProxyError::InvalidToken("tenant does not match the issuer"));
            }
            return Ok(Arc::clone(keys));
        }
        if self.templates.is_empty() {
            return Err(ProxyError::InvalidToken("issuer not accepted"));
        }
        // With `allowed_tenants`, every allowed tenant's issuer is a fixed one (above): any other is refused.
        if self.tenants_listed {
            return Err(ProxyError::InvalidToken("tenant not accepted"));
        }
        let tenant = parsed
            .claims
            .get("tid")
            .and_then(Value::as_str)
            .filter(|tid| crate::exchange::is_guid(tid))
            .ok_or(ProxyError::InvalidToken("tenant not accepted"))?;
        let template = self
            .templates
            .iter()
            .find(|t| fill(&t.issuer, tenant) == iss)
            .ok_or(ProxyError::InvalidToken("issuer not accepted"))?;
        let resolved = fill(&template.issuer, tenant);
        let init = async {
            self.budget.take().map_err(TenantError::OverBudget)?;
            let keys =
                Arc::new(issuer_keys(template, tenant, &self.policy).map_err(TenantError::Url)?);
            if !keys.refetch().await {
                return Err(TenantError::Fetch);
            }
            tokio::spawn(IssuerKeys::refresh(Arc::downgrade(&keys)));
            Ok(keys)
        };
        self.tenants
            .try_get_with(resolved, init)
            .await
            .map_err(|error| match *error {
                TenantError::OverBudget(wait) => ProxyError::KeysUnavailable {
                    retry_after: wait.max(Duration::from_secs(1)),
                },
                TenantError::Fetch => ProxyError::KeysUnavailable {
                    retry_after: KEYS_RETRY_AFTER,
                },
                TenantError::Url(_) => ProxyError::InvalidToken("issuer not accepted"),
            })
    }
}

/// Validates callers' tokens against the configured issuers.
pub struct Authenticator {
    issuers: Arc<Issuers>,
    /// Key sets this generation fetches anew (the others were kept from the previous one).
    fresh: Vec<Arc<IssuerKeys>>,
    validated: Arc<ValidatedCache>,
    /// The `[inbound]` this was built from, for the next reload to compare against.
    inbound: Inbound,
    clock_skew: Duration,
}

type ValidatedCache =
    moka::sync::Cache<[u8; 32], Arc<CallerClaims>, crate::exchange::cache::DigestHash>;

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

fn fill(template: &str, tenant: &str) -> String {
    template.replace(TENANT_PLACEHOLDER, tenant)
}

impl Authenticator {
    /// Builds the validator; [`Authenticator::start`] begins fetching keys. The validated-token cache holds
    /// up to `validated_capacity` callers (`cache.max_entries`, like the upstream-token cache).
    pub fn new(
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
    pub fn reload(
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
                    .build_with_hasher(crate::exchange::cache::DigestHash::default()),
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
    pub fn start(&self) -> Vec<tokio::task::JoinHandle<()>> {
        self.fresh
            .iter()
            .map(|keys| tokio::spawn(IssuerKeys::maintain(Arc::downgrade(keys))))
            .collect()
    }

    /// Resolves once every fixed issuer's keys have been fetched (what `/readyz` reports).
    pub async fn ready(&self) {
        for keys in self.issuers.fixed.values() {
            keys.fetched().await;
        }
    }

    /// Fixed issuers whose keys have not been fetched yet (empty when ready).
    pub fn issuers_without_keys(&self) -> Vec<String> {
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
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, ProxyError> {
        // The characters are checked only for a token not seen before: the same bytes passed that check.
        let token = bearer_text(headers)?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        let claims = if let Some(claims) = self.validated.get(&key) {
            if now_unix() > claims.exp.saturating_add(self.clock_skew.as_secs()) {
                self.validated.invalidate(&key);
                return Err(ProxyError::InvalidToken("token expired"));
            }
            if claims.key.is_withdrawn() {
                self.validated.invalidate(&key);
                return Err(ProxyError::InvalidToken(
                    "signing key withdrawn by the issuer",
                ));
            }
            claims
        } else {
            check_b64token(token)?;
            let claims = Arc::new(self.verify(token).await?);
            self.validated.insert(key, Arc::clone(&claims));
            claims
        };
        // An ID token, or an app token authorized only by an ACL: Microsoft.Identity.Web refuses these too.
        if claims.scopes.is_empty() && claims.roles.is_empty() && !self.inbound.allow_acl_tokens {
            return Err(ProxyError::InvalidToken(
                "the token carries neither scopes nor roles",
            ));
        }
        Ok(Caller {
            token: Secret::new(token),
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
            return Err(ProxyError::InvalidToken(
                "algorithm does not match the signing key",
            ));
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
                    ErrorKind::ExpiredSignature => "token expired",
                    ErrorKind::ImmatureSignature => "token not yet valid",
                    ErrorKind::InvalidAudience => "audience not accepted",
                    ErrorKind::InvalidIssuer => "issuer not accepted",
                    ErrorKind::InvalidSignature => "signature invalid",
                    ErrorKind::InvalidAlgorithm => "algorithm not allowed",
                    ErrorKind::MissingRequiredClaim(_) => "required claim missing",
                    _ => "token could not be verified",
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
                return Err(ProxyError::InvalidToken("token issued in the future"));
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
            state = issuer.first_attempt().await;
        }
        if state.keys.is_none() {
            // Never fetched: try again now (rate-limited, one fetch at a time).
            issuer.refetch_for_unknown_kid().await;
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
                _ => Err(ProxyError::InvalidToken("token names no key id")),
            };
        };
        if !keys.by_kid.contains_key(kid) {
            issuer.refetch_for_unknown_kid().await;
            if let Some(fresh) = issuer.state().keys {
                keys = fresh;
            }
        }
        keys.by_kid
            .get(kid)
            .cloned()
            .ok_or(ProxyError::InvalidToken("signing key unknown"))
    }
}

/// The key source of `template` for `tenant` (ignored for fixed issuers).
fn issuer_keys(
    template: &IssuerTemplate,
    tenant: &str,
    policy: &jwks::FetchPolicy,
) -> Result<IssuerKeys, url::ParseError> {
    let issuer = fill(&template.issuer, tenant);
    let discovery_url = match &template.discovery_url {
        Some(url) => Url::parse(&fill(url, tenant))?,
        None => jwks::default_discovery_url(&issuer)?,
    };
    let jwks_uri = template
        .jwks_uri
        .as_deref()
        .map(|u| Url::parse(&fill(u, tenant)))
        .transpose()?;
    Ok(IssuerKeys::new(
        issuer,
        template.issuer.clone(),
        discovery_url,
        jwks_uri,
        policy.clone(),
    ))
}

/// Applies a route's policy to a validated caller: one of the required scopes, or one of the required roles.
/// An `obo` route also needs a delegated (user) token: an app-only token has no user to act for.
pub fn authorize(claims: &CallerClaims, route: &Route) -> Result<(), ProxyError> {
    if route.token == TokenKind::Obo && claims.scopes.is_empty() {
        return Err(ProxyError::InsufficientScope {
            scope: route
                .policy
                .required_scopes
                .as_deref()
                .unwrap_or_default()
                .join(" "),
            detail: "an app-only token (no scopes) cannot be exchanged on behalf of a user",
        });
    }
    let Policy {
        required_scopes,
        required_roles,
    } = &route.policy;
    if required_scopes.is_none() && required_roles.is_none() {
        return Ok(());
    }
    let scope_ok = required_scopes
        .as_ref()
        .is_some_and(|need| need.iter().any(|s| claims.scopes.contains(s)));
    let role_ok = required_roles
        .as_ref()
        .is_some_and(|need| need.iter().any(|r| claims.roles.contains(r)));
    if scope_ok || role_ok {
        return Ok(());
    }
    // RFC 6750 §3: `scope` lists scopes; a roles-only policy has none to name.
    Err(ProxyError::InsufficientScope {
        scope: required_scopes.as_deref().unwrap_or_default().join(" "),
        detail: "the token lacks a scope or role this route requires",
    })
}

/// The one bearer token of the request. The scheme is matched case-insensitively (RFC 9110 §11.1); a request
/// with no `Authorization`, or another scheme, has no token; two headers, or two tokens in one, are refused.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, ProxyError> {
    let token = bearer_text(headers)?;
    check_b64token(token)?;
    Ok(token)
}

/// RFC 6750 §2.1 b64token: one token, no spaces, no commas.
fn check_b64token(token: &str) -> Result<(), ProxyError> {
    const fn table() -> [bool; 256] {
        let mut table = [false; 256];
        let mut c = 0;
        while c < 256 {
            #[allow(clippy::cast_possible_truncation, reason = "c < 256")]
            let b = c as u8;
            table[c] = b.is_ascii_alphanumeric()
                || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=');
            c += 1;
        }
        table
    }
    const B64TOKEN: [bool; 256] = table();
    if token.bytes().all(|b| B64TOKEN[usize::from(b)]) {
        Ok(())
    } else {
        Err(ProxyError::InvalidToken("malformed bearer token"))
    }
}

/// The text of the one bearer token of the request, before its characters are checked.
fn bearer_text(headers: &HeaderMap) -> Result<&str, ProxyError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(ProxyError::MissingToken);
    };
    if values.next().is_some() {
        return Err(ProxyError::InvalidToken(
            "more than one Authorization header",
        ));
    }
    if value.len() > MAX_BEARER_BYTES + 16 {
        return Err(ProxyError::InvalidToken("token too large"));
    }
    let value = value
        .to_str()
        .map_err(|_| ProxyError::InvalidToken("malformed Authorization header"))?;
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ProxyError::MissingToken);
    }
    let token = rest.trim_matches(' ');
    if token.is_empty() {
        return Err(ProxyError::InvalidToken("empty bearer token"));
    }
    if token.len() > MAX_BEARER_BYTES {
        return Err(ProxyError::InvalidToken("token too large"));
    }
    Ok(token)
}

/// A JWT whose header and payload have been decoded and checked, but whose signature has not.
struct Unverified {
    alg: Algorithm,
    kid: Option<String>,
    exp: u64,
    claims: Map<String, Value>,
}

const B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

fn parse_unverified(token: &str, allowed: &[Algorithm]) -> Result<Unverified, ProxyError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ProxyError::InvalidToken("not a signed JWT (three parts)"));
    };
    let header = decode_object(header).ok_or(ProxyError::InvalidToken("malformed token header"))?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .and_then(|name| allowed.iter().copied().find(|a| alg_name(*a) == name))
        .ok_or(ProxyError::InvalidToken("signing algorithm not allowed"))?;
    if header.contains_key("crit") {
        return Err(ProxyError::InvalidToken(
            "critical header extensions are not supported",
        ));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(ProxyError::InvalidToken("malformed key id")),
    };
    let claims =
        decode_object(payload).ok_or(ProxyError::InvalidToken("malformed token payload"))?;
    let exp = match claims.get("exp") {
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(seconds_from_f64))
            .ok_or(ProxyError::InvalidToken("exp is not a valid time"))?,
        Some(_) => return Err(ProxyError::InvalidToken("exp is not numeric")),
        None => return Err(ProxyError::InvalidToken("required claim missing")),
    };
    for claim in ["nbf", "iat"] {
        if claims.get(claim).is_some_and(|v| !v.is_number()) {
            return Err(ProxyError::InvalidToken("time claim is not numeric"));
        }
    }
    Ok(Unverified {
        alg,
        kid,
        exp,
        claims,
    })
}

#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "checked non-negative; saturating cast"
)]
fn seconds_from_f64(f: f64) -> u64 {
    f as u64
}

fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::EdDSA => "EdDSA",
    }
}

/// Base64url JSON object, refusing duplicate member names (RFC 7515 §5.2 / RFC 7519 §4).
fn decode_object(part: &str) -> Option<Map<String, Value>> {
    let bytes = B64.decode(part).ok()?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let object = de.deserialize_map(UniqueObject).ok()?;
    de.end().ok()?;
    Some(object)
}

struct UniqueObject;

impl<'de> Visitor<'de> for UniqueObject {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object with unique member names")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut map = Map::new();
        while let Some((key, value)) = access.next_entry::<String, Value>()? {
            if map.contains_key(&key) {
                return Err(serde::de::Error::custom("duplicate member"));
            }
            map.insert(key, value);
        }
        Ok(map)
    }
}

fn caller_claims(
    all: &Map<String, Value>,
    exp: u64,
    scope_claims: &[String],
    roles_claim: &str,
    key: Arc<jwks::Key>,
) -> CallerClaims {
    // A space-separated string (`scp`), or an array of names.
    fn strings(v: Option<&Value>) -> Vec<&str> {
        match v {
            Some(Value::String(s)) => s.split(' ').collect(),
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }
    CallerClaims {
        exp,
        tid: all.get("tid").and_then(Value::as_str).map(Box::from),
        scopes: Words::new(
            scope_claims
                .iter()
                .flat_map(|c| strings(all.get(c)))
                .collect(),
        ),
        roles: Words::new(strings(all.get(roles_claim))),
        key,
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                http::header::AUTHORIZATION,
                HeaderValue::from_str(v).expect("header"),
            );
        }
        h
    }

    fn jwt(header: &Value, payload: &str) -> String {
        format!(
            "{}.{}.c2ln",
            B64.encode(header.to_string()),
            B64.encode(payload)
        )
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(
            bearer_token(&headers(&["bEaReR abc.def.ghi"])).ok(),
            Some("abc.def.ghi")
        );
    }

    #[test]
    fn missing_or_other_scheme_is_missing_token() {
        assert!(matches!(
            bearer_token(&headers(&[])),
            Err(ProxyError::MissingToken)
        ));
        assert!(matches!(
            bearer_token(&headers(&["Basic dXNlcjpwYXNz"])),
            Err(ProxyError::MissingToken)
        ));
    }

    #[test]
    fn two_headers_or_two_tokens_are_invalid() {
        assert!(matches!(
            bearer_token(&headers(&["Bearer a.b.c", "Bearer d.e.f"])),
            Err(ProxyError::InvalidToken(_))
        ));
        assert!(matches!(
            bearer_token(&headers(&["Bearer a.b.c d.e.f"])),
            Err(ProxyError::InvalidToken(_))
        ));
        assert!(matches!(
            bearer_token(&headers(&["Bearer a.b.c,d.e.f"])),
            Err(ProxyError::InvalidToken(_))
        ));
    }

    #[test]
    fn oversized_bearer_is_invalid() {
        let big = format!("Bearer {}", "a".repeat(MAX_BEARER_BYTES + 1));
        assert!(matches!(
            bearer_token(&headers(&[&big])),
            Err(ProxyError::InvalidToken("token too large"))
        ));
    }

    #[test]
    fn alg_none_and_hs256_are_refused_before_verification() {
        let allowed = [Algorithm::RS256];
        for alg in ["none", "None", "NONE", "HS256", "nOnE", ""] {
            let token = jwt(&serde_json::json!({"alg": alg}), r#"{"exp": 1}"#);
            assert!(
                matches!(
                    parse_unverified(&token, &allowed),
                    Err(ProxyError::InvalidToken("signing algorithm not allowed"))
                ),
                "{alg}"
            );
        }
    }

    #[test]
    fn crit_duplicate_claims_and_string_exp_are_refused() {
        let allowed = [Algorithm::RS256];
        let rs = serde_json::json!({"alg": "RS256", "kid": "k"});
        let crit = jwt(
            &serde_json::json!({"alg": "RS256", "crit": ["b64"]}),
            r#"{"exp": 1}"#,
        );
        assert!(parse_unverified(&crit, &allowed).is_err());
        let dup = jwt(&rs, r#"{"exp": 1, "aud": "a", "aud": "b"}"#);
        assert!(parse_unverified(&dup, &allowed).is_err());
        let string_exp = jwt(&rs, r#"{"exp": "99999999999"}"#);
        assert!(matches!(
            parse_unverified(&string_exp, &allowed),
            Err(ProxyError::InvalidToken("exp is not numeric"))
        ));
        let no_exp = jwt(&rs, r#"{"sub": "x"}"#);
        assert!(parse_unverified(&no_exp, &allowed).is_err());
        let array = jwt(&rs, "[1, 2]");
        assert!(parse_unverified(&array, &allowed).is_err());
        let ok = jwt(&rs, r#"{"exp": 1.5e9, "scp": "a b"}"#);
        assert!(parse_unverified(&ok, &allowed).is_ok());
    }

    fn route(token: TokenKind, policy: Policy) -> Route {
        Route {
            policy,
            ..Route::for_tests("/r", "http://127.0.0.1/", token)
        }
    }

    fn claims(scp: &str, roles: &[&str]) -> CallerClaims {
        let mut all = Map::new();
        all.insert("scp".into(), Value::from(scp));
        all.insert("roles".into(), Value::from(roles.to_vec()));
        caller_claims(
            &all,
            0,
            &["scp".to_owned()],
            "roles",
            jwks::Key::for_tests(),
        )
    }

    #[test]
    fn a_name_with_a_space_is_never_two_names() {
        let mut all = Map::new();
        all.insert("roles".into(), Value::from(vec!["Reader Admin", "User"]));
        all.insert("scp".into(), Value::from("b  a b"));
        let claims = caller_claims(
            &all,
            0,
            &["scp".to_owned()],
            "roles",
            jwks::Key::for_tests(),
        );
        assert!(claims.roles.contains("User"));
        assert!(!claims.roles.contains("Admin") && !claims.roles.contains("Reader"));
        assert!(claims.scopes.contains("a") && claims.scopes.contains("b"));
        assert!(!claims.scopes.contains(""));
    }

    #[test]
    fn policy_needs_one_scope_or_one_role() {
        let policy = Policy {
            required_scopes: Some(vec!["read".into()]),
            required_roles: Some(vec!["Admin".into()]),
        };
        let r = route(TokenKind::Passthrough, policy);
        assert!(authorize(&claims("read write", &[]), &r).is_ok());
        assert!(authorize(&claims("", &["Admin"]), &r).is_ok());
        assert!(matches!(
            authorize(&claims("write", &["User"]), &r),
            Err(ProxyError::InsufficientScope { .. })
        ));
        let open = route(TokenKind::Passthrough, Policy::default());
        assert!(authorize(&claims("", &[]), &open).is_ok());
    }

    #[test]
    fn app_only_token_on_obo_route_is_refused() {
        let r = route(TokenKind::Obo, Policy::default());
        assert!(matches!(
            authorize(&claims("", &["Reader"]), &r),
            Err(ProxyError::InsufficientScope { .. })
        ));
    }

    mod no_panic {
        use super::*;
        use proptest::prelude::*;

        fn segment() -> impl Strategy<Value = String> {
            prop_oneof![
                "[A-Za-z0-9_=+/ -]{0,40}",
                proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| B64.encode(b)),
                (any::<u8>(), "[a-z]{1,8}", any::<i64>()).prop_map(|(n, k, v)| B64.encode(
                    format!(
                        "{{\"alg\":\"RS256\",\"kid\":\"{k}\",\"exp\":{v},\"n\":{n},\"{k}\":[{v}]}}"
                    )
                )),
            ]
        }

        proptest! {
            /// Any header value: the Authorization parser answers, never panics.
            #[test]
            fn authorization_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
                let mut h = HeaderMap::new();
                if let Ok(value) = http::HeaderValue::from_bytes(&bytes) {
                    h.insert(http::header::AUTHORIZATION, value);
                }
                let _ = bearer_token(&h);
            }

            /// Any dotted token shape: the pre-verification parser answers, never panics.
            #[test]
            fn token_parser_never_panics(parts in proptest::collection::vec(segment(), 0..6), raw in ".{0,200}") {
                let allowed = [Algorithm::RS256, Algorithm::ES256, Algorithm::PS256];
                let _ = parse_unverified(&parts.join("."), &allowed);
                let _ = parse_unverified(&raw, &allowed);
            }
        }
    }
}
