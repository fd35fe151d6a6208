//! Signing keys per issuer: discovery -> `jwks_uri` -> JWK set, fetched in the background at start, retried
//! with capped backoff until it succeeds, refreshed periodically, and refetched (rate-limited, one at a time)
//! when a token names an unknown `kid`. The last good set survives every failed fetch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::{Mutex, watch};
use tokio::time::Instant;
use url::Url;

/// A failed first fetch is retried with doubling delays up to this cap, so a late IdP is picked up within
/// seconds without hammering it.
pub(crate) const MAX_FETCH_BACKOFF: Duration = Duration::from_secs(10);
/// What a caller refused for missing keys is told to wait.
pub(crate) const KEYS_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Discovery documents and key sets are small; anything larger is refused.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// One verification key from a JWK set.
pub(crate) struct Key {
    pub decoding: DecodingKey,
    pub family: AlgorithmFamily,
    /// The `alg` the JWK pins, if any: a token must then use exactly this one.
    pub alg: Option<Algorithm>,
    /// The key itself (`kty`, `alg` and the public numbers), to tell a key kept across a refetch from a new
    /// one published under the same `kid`.
    material: String,
    /// Set when a refetched key set no longer holds this key: tokens it verified stop validating at once,
    /// also those in the validated-token cache (SPEC §8).
    withdrawn: AtomicBool,
}

impl Key {
    /// A key that verifies nothing, for unit tests of what follows verification.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Arc<Key> {
        Arc::new(Key {
            decoding: DecodingKey::from_secret(b""),
            family: AlgorithmFamily::Hmac,
            alg: None,
            material: String::new(),
            withdrawn: AtomicBool::new(false),
        })
    }

    /// Whether the issuer has stopped publishing this key.
    pub(crate) fn is_withdrawn(&self) -> bool {
        self.withdrawn.load(Ordering::Acquire)
    }
}

/// The keys of one issuer, by `kid`.
#[derive(Default)]
pub(crate) struct KeySet {
    pub by_kid: HashMap<String, Arc<Key>>,
    /// Keys published without a `kid`.
    pub anonymous: Vec<Arc<Key>>,
}

/// What is known of an issuer's keys.
#[derive(Clone, Default)]
pub(crate) struct KeyState {
    pub keys: Option<Arc<KeySet>>,
    /// The first fetch has finished, whatever its outcome.
    pub attempted: bool,
}

/// Why a fetch failed; logged, never shown to callers.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("request to {url} failed")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url} answered a document that is not valid JSON of the expected shape")]
    Json {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{url} answered more than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge { url: String },
    #[error(
        "discovery document names issuer {found:?}, expected {expected:?} (OpenID Discovery §4.3)"
    )]
    IssuerMismatch { expected: String, found: String },
    #[error("discovery document's jwks_uri is not an https URL (or loopback http): {0:?}")]
    BadJwksUri(String),
    #[error("key set {url} holds no usable signing key")]
    NoKeys { url: String },
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

#[derive(Deserialize)]
struct RawJwkSet {
    keys: Vec<serde_json::Value>,
}

/// Where an issuer's keys come from, and how often to look again.
#[derive(Clone)]
pub(crate) struct FetchPolicy {
    pub http: reqwest::Client,
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// Background refresh when the key set carries no `Cache-Control: max-age`.
    pub refresh: Duration,
    /// Unknown-`kid` refetches at most this often.
    pub min_refetch: Duration,
}

/// `Cache-Control: max-age` of a key set is honoured within these bounds.
const MIN_HONOURED_MAX_AGE: Duration = Duration::from_secs(300);
const MAX_HONOURED_MAX_AGE: Duration = Duration::from_secs(86_400);

/// The keys of one (resolved) issuer.
pub(crate) struct IssuerKeys {
    pub issuer: String,
    /// The configured issuer (`{tenantid}` unfilled): the bounded metric label.
    label: String,
    discovery_url: Url,
    jwks_uri: Option<Url>,
    policy: FetchPolicy,
    state: watch::Sender<KeyState>,
    /// Held while a fetch runs, so fetches never overlap; holds when the last one started.
    last_fetch: Mutex<Option<Instant>>,
    /// Completed fetches, so a caller that waited for another's fetch does not fetch again.
    generation: AtomicU64,
    /// The refresh interval the last key set asked for.
    next_refresh: std::sync::Mutex<Duration>,
}

impl IssuerKeys {
    pub(crate) fn new(
        issuer: String,
        label: String,
        discovery_url: Url,
        jwks_uri: Option<Url>,
        policy: FetchPolicy,
    ) -> Self {
        let (state, _) = watch::channel(KeyState::default());
        let refresh = policy.refresh;
        IssuerKeys {
            issuer,
            label,
            discovery_url,
            jwks_uri,
            policy,
            state,
            last_fetch: Mutex::new(None),
            generation: AtomicU64::new(0),
            next_refresh: std::sync::Mutex::new(refresh),
        }
    }

    pub(crate) fn state(&self) -> KeyState {
        self.state.borrow().clone()
    }

    /// Waits for the first fetch to finish (the caller bounds the wait with its deadline).
    pub(crate) async fn first_attempt(&self) -> KeyState {
        let mut rx = self.state.subscribe();
        match rx.wait_for(|s| s.attempted).await {
            Ok(state) => state.clone(),
            Err(_) => self.state(),
        }
    }

    /// Waits until a key set has been fetched.
    pub(crate) async fn fetched(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|s| s.keys.is_some()).await;
    }

    /// Whether `other` fetches the same keys the same way (issuer, discovery URL and JWKS URI).
    pub(crate) fn same_source(&self, other: &IssuerKeys) -> bool {
        self.issuer == other.issuer
            && self.discovery_url == other.discovery_url
            && self.jwks_uri == other.jwks_uri
    }

    /// Fetches at start until it succeeds (backoff capped at [`MAX_FETCH_BACKOFF`]), then keeps the keys
    /// fresh ([`IssuerKeys::refresh`]). Ends when the issuer is dropped.
    pub(crate) async fn maintain(keys: std::sync::Weak<Self>) {
        let mut backoff = Duration::from_millis(250);
        loop {
            let Some(this) = keys.upgrade() else { return };
            if this.refetch().await {
                break;
            }
            drop(this);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_FETCH_BACKOFF);
        }
        Self::refresh(keys).await;
    }

    /// Refreshes fetched keys as the key set's `Cache-Control` or the configured interval says. Ends when the
    /// issuer is dropped (a tenant evicted from the bounded set, or a reload that no longer names it).
    pub(crate) async fn refresh(keys: std::sync::Weak<Self>) {
        loop {
            let Some(wait) = keys.upgrade().map(|this| this.refresh_interval()) else {
                return;
            };
            tokio::time::sleep(wait).await;
            let Some(this) = keys.upgrade() else { return };
            this.refetch().await;
        }
    }

    fn refresh_interval(&self) -> Duration {
        self.next_refresh.lock().map_or(self.policy.refresh, |d| *d)
    }

    /// Fetches now; true when the key set was replaced. A failure keeps the last good set.
    pub(crate) async fn refetch(&self) -> bool {
        let mut last = self.last_fetch.lock().await;
        self.refetch_locked(&mut last).await
    }

    /// The fetch itself, with the fetch lock held by the caller.
    async fn refetch_locked(&self, last: &mut Option<Instant>) -> bool {
        *last = Some(Instant::now());
        let outcome = self.fetch().await;
        self.generation.fetch_add(1, Ordering::AcqRel);
        let ok = outcome.is_ok();
        self.policy.metrics.record_jwks(&self.label, ok);
        match outcome {
            Ok((mut set, max_age)) => {
                if let Some(previous) = self.state.borrow().keys.as_deref() {
                    carry_over(previous, &mut set);
                }
                tracing::info!(issuer = %self.issuer, keys = set.by_kid.len() + set.anonymous.len(), "signing keys fetched");
                let refresh = max_age.map_or(self.policy.refresh, |age| {
                    age.clamp(MIN_HONOURED_MAX_AGE, MAX_HONOURED_MAX_AGE)
                });
                if let Ok(mut next) = self.next_refresh.lock() {
                    *next = refresh;
                }
                self.state.send_modify(|s| {
                    s.keys = Some(Arc::new(set));
                    s.attempted = true;
                });
            }
            Err(error) => {
                tracing::warn!(issuer = %self.issuer, error = %crate::error::chain(&error), "signing keys fetch failed; keeping the last good set");
                self.state.send_modify(|s| s.attempted = true);
            }
        }
        ok
    }

    /// For an unknown `kid`: one refetch at a time, at most once per `min_refetch`; callers that arrive while
    /// a fetch runs wait for it and use its result instead of fetching again.
    pub(crate) async fn refetch_for_unknown_kid(&self) {
        let seen = self.generation.load(Ordering::Acquire);
        let mut last = self.last_fetch.lock().await;
        if self.generation.load(Ordering::Acquire) != seen
            || last.is_some_and(|t| t.elapsed() < self.policy.min_refetch)
        {
            return;
        }
        // Fetch under the same guard: callers queued behind this one see the new generation and return.
        self.refetch_locked(&mut last).await;
    }

    async fn fetch(&self) -> Result<(KeySet, Option<Duration>), FetchError> {
        let jwks_uri = if let Some(uri) = &self.jwks_uri {
            uri.clone()
        } else {
            let (discovery, _): (Discovery, _) = self.get_json(&self.discovery_url).await?;
            if discovery.issuer != self.issuer {
                return Err(FetchError::IssuerMismatch {
                    expected: self.issuer.clone(),
                    found: discovery.issuer,
                });
            }
            match Url::parse(&discovery.jwks_uri) {
                Ok(url)
                    if url.scheme() == "https"
                        || (url.scheme() == "http" && crate::config::is_loopback(&url)) =>
                {
                    url
                }
                _ => return Err(FetchError::BadJwksUri(discovery.jwks_uri)),
            }
        };
        let (raw, max_age): (RawJwkSet, _) = self.get_json(&jwks_uri).await?;
        let set = key_set(&raw.keys);
        if set.by_kid.is_empty() && set.anonymous.is_empty() {
            return Err(FetchError::NoKeys {
                url: jwks_uri.to_string(),
            });
        }
        Ok((set, max_age))
    }

    /// GETs a small JSON document; also returns its `Cache-Control: max-age`.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &Url,
    ) -> Result<(T, Option<Duration>), FetchError> {
        let http = |source| FetchError::Http {
            url: url.to_string(),
            source,
        };
        let mut response = self
            .policy
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(http)?;
        if !response.status().is_success() {
            return Err(FetchError::Status {
                url: url.to_string(),
                status: response.status().as_u16(),
            });
        }
        let max_age = response
            .headers()
            .get_all(http::header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|directive| {
                let (name, value) = directive.trim().split_once('=')?;
                name.trim()
                    .eq_ignore_ascii_case("max-age")
                    .then(|| value.trim().trim_matches('"').parse::<u64>().ok())?
            })
            .map(Duration::from_secs);
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(http)? {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(FetchError::TooLarge {
                    url: url.to_string(),
                });
            }
            body.extend_from_slice(&chunk);
        }
        let document = serde_json::from_slice(&body).map_err(|source| FetchError::Json {
            url: url.to_string(),
            source,
        })?;
        Ok((document, max_age))
    }
}

/// Keeps the keys of `previous` that `fresh` still publishes (same `kid`, same material) as the same `Key`, so
/// tokens they verified stay valid, and withdraws every other one: a key the issuer dropped (rotated out, or
/// compromised) must stop validating at once.
fn carry_over(previous: &KeySet, fresh: &mut KeySet) {
    for (kid, old) in &previous.by_kid {
        match fresh.by_kid.get_mut(kid) {
            Some(new) if new.material == old.material => *new = Arc::clone(old),
            _ => old.withdrawn.store(true, Ordering::Release),
        }
    }
    for old in &previous.anonymous {
        match fresh
            .anonymous
            .iter_mut()
            .find(|new| new.material == old.material)
        {
            Some(new) => *new = Arc::clone(old),
            None => old.withdrawn.store(true, Ordering::Release),
        }
    }
}

/// `<issuer>/.well-known/openid-configuration` (OpenID Discovery §4).
pub(crate) fn default_discovery_url(issuer: &str) -> Result<Url, url::ParseError> {
    Url::parse(&format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    ))
}

/// The usable signature keys of a JWK set: RSA and EC only (an `oct` key in a public set would let anyone
/// forge HS* tokens), `use` absent or `sig`. Keys that do not parse are skipped.
fn key_set(raw: &[serde_json::Value]) -> KeySet {
    let mut set = KeySet::default();
    for value in raw {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value.clone()) else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            continue;
        }
        let family = match &jwk.algorithm {
            jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
            jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
            _ => continue,
        };
        let alg = match jwk.common.key_algorithm {
            None => None,
            Some(ka) => match key_algorithm(ka) {
                Some(alg) => Some(alg),
                None => continue,
            },
        };
        let Ok(decoding) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        let material = ["kty", "alg", "n", "e", "crv", "x", "y"]
            .iter()
            .map(|field| {
                value
                    .get(field)
                    .map_or_else(String::new, ToString::to_string)
            })
            .collect::<Vec<_>>()
            .join(" ");
        let key = Arc::new(Key {
            decoding,
            family,
            alg,
            material,
            withdrawn: AtomicBool::new(false),
        });
        match jwk.common.key_id {
            Some(kid) => {
                set.by_kid.insert(kid, key);
            }
            None => set.anonymous.push(key),
        }
    }
    set
}

fn key_algorithm(ka: KeyAlgorithm) -> Option<Algorithm> {
    Some(match ka {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oct_and_encryption_keys_are_not_signing_keys() {
        let raw = vec![
            serde_json::json!({"kty": "oct", "kid": "h", "k": "c2VjcmV0"}),
            serde_json::json!({"kty": "RSA", "kid": "enc", "use": "enc", "n": "sXch", "e": "AQAB"}),
            serde_json::json!({"kty": "RSA", "kid": "sig", "use": "sig", "alg": "RS256", "n": "sXch", "e": "AQAB"}),
            serde_json::json!({"kty": "RSA", "kid": "junk"}),
        ];
        let set = key_set(&raw);
        assert_eq!(set.by_kid.keys().collect::<Vec<_>>(), vec!["sig"]);
        assert_eq!(set.by_kid["sig"].alg, Some(Algorithm::RS256));
    }

    #[test]
    fn a_refetch_keeps_published_keys_and_withdraws_the_others() {
        let rsa = |kid: &str, n: &str| serde_json::json!({"kty": "RSA", "kid": kid, "alg": "RS256", "n": n, "e": "AQAB"});
        let first = key_set(&[
            rsa("kept", "sXch"),
            rsa("dropped", "sXch"),
            rsa("changed", "sXch"),
        ]);
        let mut second = key_set(&[
            rsa("kept", "sXch"),
            rsa("changed", "oXch"),
            rsa("new", "sXch"),
        ]);
        carry_over(&first, &mut second);
        assert!(Arc::ptr_eq(&first.by_kid["kept"], &second.by_kid["kept"]));
        assert!(!first.by_kid["kept"].is_withdrawn());
        assert!(first.by_kid["dropped"].is_withdrawn());
        assert!(first.by_kid["changed"].is_withdrawn());
        assert!(!second.by_kid["changed"].is_withdrawn());
    }

    #[test]
    fn discovery_url_is_under_the_issuer() {
        assert_eq!(
            default_discovery_url("https://login.example.com/t/v2.0/").map(String::from),
            Ok("https://login.example.com/t/v2.0/.well-known/openid-configuration".to_owned())
        );
    }
}
