//! The upstream-token cache: bounded (least recently used goes first), each entry living until its token's
//! `exp - expiry_margin` and never past its subject token's `exp`, with concurrent misses for one key
//! coalesced into one IdP call (moka's `try_get_with`). Keys are SHA-256 digests of everything that could
//! change the token (SPEC §8), so no caller's token is ever served to another.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::policy::EvictionPolicy;

use super::{ExchangeError, UpstreamToken};
use crate::config::{Identity, Route};
use crate::secret::Secret;

/// SHA-256 over the subject token (for OBO), identity, token endpoint, flavor, grant and sorted scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    pub fn new(identity: &Identity, route: &Route, subject: Option<&Secret>) -> Self {
        let mut scopes: Vec<&str> = route.scopes.iter().map(String::as_str).collect();
        scopes.sort_unstable();
        scopes.dedup();
        let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut field = |bytes: &[u8]| {
            // Length-prefixed, so no two field lists hash the same bytes.
            digest.update(&(bytes.len() as u64).to_be_bytes());
            digest.update(bytes);
        };
        field(b"obo-sidecar token cache v1");
        field(subject.map_or(b"app".as_slice(), |_| b"obo".as_slice()));
        field(subject.map_or(b"".as_slice(), |s| s.expose().as_bytes()));
        field(identity.name.as_bytes());
        field(identity.token_endpoint.as_str().as_bytes());
        field(identity.flavor.as_str().as_bytes());
        field(&(scopes.len() as u64).to_be_bytes());
        for scope in scopes {
            field(scope.as_bytes());
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.finish().as_ref());
        CacheKey(key)
    }
}

struct TokenExpiry;

impl Expiry<CacheKey, Arc<UpstreamToken>> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<UpstreamToken>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.cache_for)
    }
}

/// Bounded, expiring, single-flight cache of upstream tokens.
pub struct TokenCache {
    inner: moka::future::Cache<CacheKey, Arc<UpstreamToken>>,
}

impl TokenCache {
    pub fn new(max_entries: u64) -> Self {
        let inner = moka::future::Cache::builder()
            .max_capacity(max_entries)
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(TokenExpiry)
            .build();
        TokenCache { inner }
    }

    /// The cached token for `key`, or the result of `fetch`, which runs once however many callers miss
    /// together; all of them share its result. Failures are not cached.
    pub async fn get_or_fetch(
        &self,
        key: CacheKey,
        fetch: impl Future<Output = Result<Arc<UpstreamToken>, ExchangeError>>,
    ) -> Result<Arc<UpstreamToken>, ExchangeError> {
        self.inner
            .try_get_with(key, fetch)
            .await
            .map_err(|shared: Arc<ExchangeError>| (*shared).clone())
    }

    /// Drops the entry for `key` (the upstream refused its token).
    pub async fn forget(&self, key: &CacheKey) {
        self.inner.invalidate(key).await;
    }

    /// Live entries, after pending maintenance has run.
    pub async fn entry_count(&self) -> u64 {
        self.inner.run_pending_tasks().await;
        self.inner.entry_count()
    }
}
