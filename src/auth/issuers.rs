//! Where callers' keys come from: the configured issuers, fixed and `{tenantid}` templates, with their key
//! sets; tenants resolved on demand within a fetch budget; what a reload may keep.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use url::Url;

use crate::config::{Inbound, TENANT_PLACEHOLDER};
use crate::error::{ProxyError, TokenDefect};

use super::jwks::{self, IssuerKeys, KEYS_RETRY_AFTER};
use super::token::Unverified;

/// Resolved `{tenantid}` issuers held at once; beyond it the least recently used tenant's keys are dropped.
pub(crate) const MAX_TENANT_ISSUERS: u64 = 1024;

/// A `{tenantid}` issuer and how its URLs are made.
#[derive(PartialEq, Eq)]
pub(super) struct IssuerTemplate {
    issuer: String,
    discovery_url: Option<String>,
    jwks_uri: Option<String>,
}

/// First discovery fetches for `{tenantid}` tenants not seen before, across all of them: a steady rate and a
/// burst (SPEC §8). A token naming a fresh GUID costs nothing to forge (its signature is never checked
/// before its keys are fetched), so without a budget each one would be an outbound fetch.
pub(super) const TENANT_FETCHES_PER_SECOND: f64 = 5.0;
pub(super) const TENANT_FETCH_BURST: f64 = 10.0;

/// A token bucket.
pub(super) struct FetchBudget {
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
pub(super) struct Issuers {
    /// Fixed issuers, and the allowed tenants of `{tenantid}` issuers, by exact `iss`: fetched at start.
    pub(super) fixed: HashMap<String, Arc<IssuerKeys>>,
    /// The tenant of each fixed issuer made from a `{tenantid}` template.
    pub(super) fixed_tenants: HashMap<String, String>,
    pub(super) templates: Vec<IssuerTemplate>,
    /// `allowed_tenants` is set: only the fixed issuers made from it are accepted, no tenant on demand.
    pub(super) tenants_listed: bool,
    /// `{tenantid}` issuers resolved on demand (any GUID tenant), bounded; a tenant whose first fetch failed
    /// holds no slot.
    pub(super) tenants: moka::future::Cache<String, Arc<IssuerKeys>>,
    pub(super) budget: FetchBudget,
    pub(super) policy: jwks::FetchPolicy,
}

/// What in `[inbound]` decides where keys come from.
pub(super) fn key_sources_equal(a: &Inbound, b: &Inbound) -> bool {
    a.issuers == b.issuers
        && a.discovery_url == b.discovery_url
        && a.jwks_uri == b.jwks_uri
        && a.allowed_tenants == b.allowed_tenants
        && fetching_equal(a, b)
}

/// What in `[inbound]` decides how keys are fetched.
pub(super) fn fetching_equal(a: &Inbound, b: &Inbound) -> bool {
    a.ca_file == b.ca_file
        && a.jwks_refresh == b.jwks_refresh
        && a.jwks_min_refetch == b.jwks_min_refetch
}

/// What in `[inbound]` decides whether a token verifies: when it is unchanged, a reload keeps the
/// validated-token cache. Policy and `allow_acl_tokens` are applied on every request, cached or not.
pub(super) fn verification_equal(a: &Inbound, b: &Inbound) -> bool {
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
    pub(super) fn new(
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
    pub(super) async fn for_token(
        &self,
        parsed: &Unverified,
    ) -> Result<Arc<IssuerKeys>, ProxyError> {
        let iss = parsed
            .claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or(ProxyError::InvalidToken(TokenDefect::IssuerNotAccepted))?;
        if let Some(keys) = self.fixed.get(iss) {
            // An allowed tenant's issuer: the token's tid must name that same tenant (the token endpoint is
            // filled from it).
            if let Some(tenant) = self.fixed_tenants.get(iss)
                && parsed.claims.get("tid").and_then(Value::as_str) != Some(tenant.as_str())
            {
                return Err(ProxyError::InvalidToken(TokenDefect::TenantMismatch));
            }
            return Ok(Arc::clone(keys));
        }
        if self.templates.is_empty() {
            return Err(ProxyError::InvalidToken(TokenDefect::IssuerNotAccepted));
        }
        // With `allowed_tenants`, every allowed tenant's issuer is a fixed one (above): any other is refused.
        if self.tenants_listed {
            return Err(ProxyError::InvalidToken(TokenDefect::TenantNotAccepted));
        }
        let tenant = parsed
            .claims
            .get("tid")
            .and_then(Value::as_str)
            .filter(|tid| crate::oauth::is_guid(tid))
            .ok_or(ProxyError::InvalidToken(TokenDefect::TenantNotAccepted))?;
        let template = self
            .templates
            .iter()
            .find(|t| fill(&t.issuer, tenant) == iss)
            .ok_or(ProxyError::InvalidToken(TokenDefect::IssuerNotAccepted))?;
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
                TenantError::Url(_) => ProxyError::InvalidToken(TokenDefect::IssuerNotAccepted),
            })
    }
}

fn fill(template: &str, tenant: &str) -> String {
    template.replace(TENANT_PLACEHOLDER, tenant)
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
