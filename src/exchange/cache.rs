//! The upstream-token cache: bounded (least recently used goes first), concurrent misses for one key
//! coalesced into one IdP call (moka's `try_get_with`), refresh-ahead, and a hard expiry that no IdP outage
//! extends. Keys are SHA-256 digests of everything that could change the token (SPEC §8), so no caller's
//! token is ever served to another.
//!
//! Time: each entry carries `stale_at` and `expires_at` as `tokio::time::Instant`s and every lookup checks
//! them, so expiry is exact (moka's own timer only reclaims memory) and tests can run with paused time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared};
use moka::Expiry;
use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::answer::{ExchangeError, Unavailable};
use super::token::UpstreamToken;
use crate::digest::DigestHash;

/// After a failed background refresh, the next one waits this long (the still-valid token keeps serving).
const REFRESH_RETRY_DELAY: Duration = Duration::from_secs(5);
/// An upstream 401 drops the token that was sent at most this often per key, so an upstream that refuses
/// every token cannot turn each request into an IdP call.
pub(crate) const FORGET_INTERVAL: Duration = Duration::from_secs(30);

/// SHA-256 over every input that could change the upstream token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct CacheKey([u8; 32]);

impl CacheKey {
    /// The digest, as the shared cache names and binds its entries with it.
    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A key of `n` repeated, for tests.
    #[cfg(test)]
    pub(crate) fn test(n: u8) -> Self {
        CacheKey([n; 32])
    }
}

/// The inputs of a [`RequestKey`]: which identity at which resolved endpoint, and every target parameter
/// sent.
pub(crate) struct KeyParts<'a> {
    pub(crate) identity: &'a str,
    pub(crate) client_id: &'a str,
    pub(crate) token_endpoint: &'a str,
    pub(crate) flavor: &'a str,
    pub(crate) auth_method: &'a str,
    pub(crate) scopes: &'a [String],
    pub(crate) audience: &'a [String],
    pub(crate) resource: &'a [String],
    pub(crate) requested_token_type: Option<&'a str>,
    pub(crate) claims: Option<&'a str>,
}

/// SHA-256 over everything of a token request but its subject: a route's, computed once per configuration
/// when its token endpoint is fixed (per request when it names `{tenantid}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestKey([u8; 32]);

/// SHA-256 of length-prefixed fields, so no two field lists hash the same bytes.
struct Fields(aws_lc_rs::digest::Context);

impl Fields {
    fn new() -> Fields {
        Fields(aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256))
    }

    fn field(&mut self, bytes: &[u8]) {
        self.0.update(&(bytes.len() as u64).to_be_bytes());
        self.0.update(bytes);
    }

    fn finish(self) -> [u8; 32] {
        let mut key = [0u8; 32];
        key.copy_from_slice(self.0.finish().as_ref());
        key
    }
}

impl CacheKey {
    /// The key of `request`'s token for `subject` (the SHA-256 of the subject token; `None` for app
    /// tokens).
    pub(crate) fn new(request: &RequestKey, subject: Option<&[u8; 32]>) -> Self {
        let mut fields = Fields::new();
        fields.field(b"obo-sidecar token cache v3");
        fields.field(&request.0);
        match subject {
            Some(subject) => {
                fields.field(b"obo");
                fields.field(subject);
            }
            None => fields.field(b"app"),
        }
        CacheKey(fields.finish())
    }
}

impl RequestKey {
    pub(crate) fn new(parts: &KeyParts<'_>) -> Self {
        let mut fields = Fields::new();
        let mut field = |bytes: &[u8]| fields.field(bytes);
        field(b"obo-sidecar token request");
        for text in [
            parts.identity,
            parts.client_id,
            parts.token_endpoint,
            parts.flavor,
            parts.auth_method,
        ] {
            field(text.as_bytes());
        }
        for list in [parts.scopes, parts.audience, parts.resource] {
            let mut sorted: Vec<&str> = list.iter().map(String::as_str).collect();
            sorted.sort_unstable();
            sorted.dedup();
            field(&(sorted.len() as u64).to_be_bytes());
            for item in sorted {
                field(item.as_bytes());
            }
        }
        for optional in [parts.requested_token_type, parts.claims] {
            match optional {
                Some(text) => {
                    field(b"1");
                    field(text.as_bytes());
                }
                None => field(b"0"),
            }
        }
        RequestKey(fields.finish())
    }
}

/// How a lookup was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    Hit,
    /// Served while one background refresh runs.
    Stale,
    Miss,
}

impl Lookup {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Stale => "stale",
            Lookup::Miss => "miss",
        }
    }
}

/// A cache entry: the token and its refresh state.
pub(crate) struct Entry {
    pub(crate) token: UpstreamToken,
    refreshing: AtomicBool,
    fetched_at: Instant,
}

impl Entry {
    pub(crate) fn new(token: UpstreamToken) -> Arc<Entry> {
        Arc::new(Entry {
            token,
            refreshing: AtomicBool::new(false),
            fetched_at: Instant::now(),
        })
    }

    /// A token of unknown (or too short) lifetime: served to the requests that waited for its fetch, never
    /// cached.
    fn uncacheable(&self) -> bool {
        self.token.expires_at <= self.fetched_at
    }
}

struct EntryExpiry;

impl Expiry<CacheKey, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(
            value
                .token
                .expires_at
                .saturating_duration_since(Instant::now()),
        )
    }

    fn expire_after_update(
        &self,
        key: &CacheKey,
        value: &Arc<Entry>,
        updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, updated_at)
    }
}

/// What a fetch is for: callers waiting (any unexpired token will do), or a background refresh (only a token
/// fresher than the one it refreshes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    Miss,
    Refresh,
}

/// A token request that can be started again (for the background refresh).
pub(crate) type Fetch =
    Arc<dyn Fn(Purpose) -> BoxFuture<'static, Result<UpstreamToken, ExchangeError>> + Send + Sync>;

/// One token request in flight, shared by every request waiting for its key.
type Flight = Shared<BoxFuture<'static, Result<Arc<Entry>, Arc<ExchangeError>>>>;

/// Bounded, expiring, single-flight, refresh-ahead cache of upstream tokens.
pub(crate) struct TokenCache {
    inner: moka::future::Cache<CacheKey, Arc<Entry>, DigestHash>,
    /// Token requests in flight, by key. A flight runs in its own task: no waiter's deadline (nor the first
    /// waiter's) can cancel or fail it for the others (SPEC §8).
    flights: Arc<DashMap<CacheKey, Flight, DigestHash>>,
    forgotten: DashMap<CacheKey, Instant>,
}

impl TokenCache {
    pub(crate) fn new(max_entries: u64) -> Self {
        let inner = moka::future::Cache::builder()
            .max_capacity(max_entries)
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(EntryExpiry)
            .build_with_hasher(DigestHash::default());
        TokenCache {
            inner,
            flights: Arc::new(DashMap::with_hasher(DigestHash::default())),
            forgotten: DashMap::new(),
        }
    }

    /// A fresh cached token for `key`, if there is one: the hot path, which needs no token request built.
    pub(crate) async fn fresh(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        self.inner
            .get(key)
            .await
            .filter(|entry| Instant::now() < entry.token.stale_at)
    }

    /// The token for `key`: a fresh cached one; a stale one (starting one background refresh); or the result
    /// of `fetch`, which runs once however many callers miss together, and runs to the end whatever happens
    /// to them. Failures are not cached, and a token past its expiry is never returned.
    pub(crate) async fn get_or_fetch(
        &self,
        key: CacheKey,
        fetch: &Fetch,
    ) -> Result<(Arc<Entry>, Lookup), ExchangeError> {
        let now = Instant::now();
        if let Some(entry) = self.inner.get(&key).await {
            if now < entry.token.stale_at {
                return Ok((entry, Lookup::Hit));
            }
            if now < entry.token.expires_at {
                if !entry.refreshing.swap(true, Ordering::AcqRel) {
                    drop(self.flight(key, fetch, Some(Arc::clone(&entry))));
                }
                return Ok((entry, Lookup::Stale));
            }
            self.remove_if_same(key, &entry).await;
        }
        let entry = match self.flight(key, fetch, None).await {
            Ok(entry) => entry,
            // This miss joined a background refresh that another replica is doing (the shared cache): a flight
            // of its own fetches the token.
            Err(error)
                if matches!(
                    *error,
                    ExchangeError::Unavailable {
                        cause: Unavailable::RefreshedElsewhere,
                        ..
                    }
                ) =>
            {
                self.flight(key, fetch, None)
                    .await
                    .map_err(|shared| (*shared).clone())?
            }
            Err(error) => return Err((*error).clone()),
        };
        // A token of unknown lifetime serves the requests that waited for its fetch; one that expired while
        // they waited serves nobody.
        if entry.uncacheable() || Instant::now() < entry.token.expires_at {
            Ok((entry, Lookup::Miss))
        } else {
            Err(Unavailable::AlreadyExpired.into())
        }
    }

    /// The flight for `key`: the one in the air, or a new one running `fetch` in its own task. A new token is
    /// cached unless its lifetime is unknown; a refresh (`stale`) replaces only the entry that went stale (a
    /// newer one, after an upstream 401, stays) and, when it fails, lets the next refresh start after
    /// [`REFRESH_RETRY_DELAY`] while the stale token keeps serving.
    fn flight(&self, key: CacheKey, fetch: &Fetch, stale: Option<Arc<Entry>>) -> Flight {
        let vacant = match self.flights.entry(key) {
            dashmap::Entry::Occupied(flight) => return flight.get().clone(),
            dashmap::Entry::Vacant(vacant) => vacant,
        };
        let request = fetch(if stale.is_some() {
            Purpose::Refresh
        } else {
            Purpose::Miss
        });
        let inner = self.inner.clone();
        let flights = Arc::clone(&self.flights);
        let flight: Flight = async move {
            let outcome = request.await.map(Entry::new);
            match (&outcome, stale) {
                (Ok(fresh), _) if fresh.uncacheable() => {}
                (Ok(fresh), None) => inner.insert(key, Arc::clone(fresh)).await,
                (Ok(fresh), Some(stale)) => {
                    let fresh = Arc::clone(fresh);
                    inner
                        .entry(key)
                        .and_compute_with(|current| async move {
                            match current {
                                Some(current) if !Arc::ptr_eq(current.value(), &stale) => Op::Nop,
                                _ => Op::Put(fresh),
                            }
                        })
                        .await;
                }
                (Err(error), Some(stale)) => {
                    tracing::debug!(%error, "background token refresh failed; serving the current token until it expires");
                    tokio::spawn(async move {
                        tokio::time::sleep(REFRESH_RETRY_DELAY).await;
                        stale.refreshing.store(false, Ordering::Release);
                    });
                }
                (Err(_), None) => {}
            }
            // The flight was registered before its task started, so this removes this flight, no other.
            flights.remove(&key);
            outcome.map_err(Arc::new)
        }
        // The token request's spans belong to the acquisition that started it, whichever task runs it.
        .instrument(tracing::Span::current())
        .boxed()
        .shared();
        vacant.insert(flight.clone());
        tokio::spawn(flight.clone());
        flight
    }

    async fn remove_if_same(&self, key: CacheKey, stale: &Arc<Entry>) {
        self.inner
            .entry(key)
            .and_compute_with(|current| async move {
                match current {
                    Some(current) if Arc::ptr_eq(current.value(), stale) => Op::Remove,
                    _ => Op::Nop,
                }
            })
            .await;
    }

    /// The upstream refused `sent`: drop it (only it — a newer entry under the same key stays), at most once
    /// per key per [`FORGET_INTERVAL`]. True when it was dropped.
    pub(crate) async fn forget(&self, key: CacheKey, sent: &Arc<Entry>) -> bool {
        let now = Instant::now();
        let mut allowed = false;
        self.forgotten
            .entry(key)
            .and_modify(|last| {
                if now.duration_since(*last) >= FORGET_INTERVAL {
                    *last = now;
                    allowed = true;
                }
            })
            .or_insert_with(|| {
                allowed = true;
                now
            });
        if self.forgotten.len() > 10_000 {
            self.forgotten
                .retain(|_, last| now.duration_since(*last) < FORGET_INTERVAL);
        }
        if allowed {
            self.remove_if_same(key, sent).await;
        }
        allowed
    }

    /// Live entries, after pending maintenance has run.
    pub(crate) async fn entry_count(&self) -> u64 {
        self.inner.run_pending_tasks().await;
        self.inner.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    use http::HeaderValue;

    fn token(n: u32, lifetime: Duration, margin: Duration) -> UpstreamToken {
        let now = Instant::now();
        UpstreamToken {
            header: HeaderValue::from_str(&format!("Bearer token-{n}")).expect("header"),
            expires_on: 0,
            stale_at: now + lifetime - margin,
            expires_at: now + lifetime - Duration::from_secs(30),
        }
    }

    /// A fetch that counts its calls and fails while `down` is set.
    fn counting_fetch(calls: Arc<AtomicU32>, down: Arc<AtomicBool>) -> Fetch {
        Arc::new(move |_| {
            let calls = Arc::clone(&calls);
            let down = Arc::clone(&down);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                if down.load(Ordering::SeqCst) {
                    return Err(Unavailable::Interrupted.into());
                }
                Ok(token(
                    n,
                    Duration::from_secs(3600),
                    Duration::from_secs(300),
                ))
            })
        })
    }

    fn key(n: u8) -> CacheKey {
        CacheKey([n; 32])
    }

    fn header(entry: &Entry) -> &str {
        entry.token.header.to_str().expect("ascii")
    }

    #[tokio::test(start_paused = true)]
    async fn token_is_refreshed_ahead_and_never_served_past_expiry() {
        let calls = Arc::new(AtomicU32::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let fetch = counting_fetch(Arc::clone(&calls), Arc::clone(&down));
        let cache = TokenCache::new(100);

        let (first, lookup) = cache.get_or_fetch(key(1), &fetch).await.expect("miss");
        assert_eq!((header(&first), lookup), ("Bearer token-1", Lookup::Miss));
        let (again, lookup) = cache.get_or_fetch(key(1), &fetch).await.expect("hit");
        assert_eq!((header(&again), lookup), ("Bearer token-1", Lookup::Hit));

        // Past exp - margin: the current token is served and one background refresh starts.
        tokio::time::advance(Duration::from_secs(3600 - 299)).await;
        let (stale, lookup) = cache.get_or_fetch(key(1), &fetch).await.expect("stale");
        assert_eq!((header(&stale), lookup), ("Bearer token-1", Lookup::Stale));
        let (stale, _) = cache.get_or_fetch(key(1), &fetch).await.expect("stale");
        assert_eq!(header(&stale), "Bearer token-1");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "exactly one background refresh"
        );
        let (fresh, lookup) = cache.get_or_fetch(key(1), &fetch).await.expect("refreshed");
        assert_eq!((header(&fresh), lookup), ("Bearer token-2", Lookup::Hit));

        // The IdP goes down: the valid token keeps serving until it expires, then 503, never the old token.
        down.store(true, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(3600 - 299)).await;
        let (stale, lookup) = cache
            .get_or_fetch(key(1), &fetch)
            .await
            .expect("stale while down");
        assert_eq!((header(&stale), lookup), ("Bearer token-2", Lookup::Stale));
        tokio::time::advance(Duration::from_secs(300)).await;
        let result = cache.get_or_fetch(key(1), &fetch).await;
        assert!(
            matches!(result, Err(ExchangeError::Unavailable { .. })),
            "an expired token is never sent"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_misses_share_one_fetch() {
        let calls = Arc::new(AtomicU32::new(0));
        let fetch = counting_fetch(Arc::clone(&calls), Arc::new(AtomicBool::new(false)));
        let cache = Arc::new(TokenCache::new(100));
        let tasks: Vec<_> = (0..256)
            .map(|_| {
                let cache = Arc::clone(&cache);
                let fetch = Arc::clone(&fetch);
                tokio::spawn(async move {
                    cache
                        .get_or_fetch(key(7), &fetch)
                        .await
                        .map(|(e, _)| header(&e).to_owned())
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.expect("join").expect("token"), "Bearer token-1");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// The request that started a fetch gives up (its deadline): the fetch goes on, and the requests still
    /// waiting get its token, with no second IdP call.
    #[tokio::test(start_paused = true)]
    async fn a_fetch_outlives_the_request_that_started_it() {
        let calls = Arc::new(AtomicU32::new(0));
        let fetch = counting_fetch(Arc::clone(&calls), Arc::new(AtomicBool::new(false)));
        let cache = Arc::new(TokenCache::new(100));
        let impatient = tokio::time::timeout(
            Duration::from_millis(10),
            cache.get_or_fetch(key(4), &fetch),
        )
        .await;
        assert!(impatient.is_err(), "the first request's deadline passed");
        let (entry, lookup) = cache.get_or_fetch(key(4), &fetch).await.expect("token");
        assert_eq!((header(&entry), lookup), ("Bearer token-1", Lookup::Miss));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one IdP call");
        let (entry, lookup) = cache.get_or_fetch(key(4), &fetch).await.expect("token");
        assert_eq!((header(&entry), lookup), ("Bearer token-1", Lookup::Hit));
    }

    #[tokio::test(start_paused = true)]
    async fn forget_drops_only_the_token_sent_at_most_once_per_interval() {
        let calls = Arc::new(AtomicU32::new(0));
        let fetch = counting_fetch(Arc::clone(&calls), Arc::new(AtomicBool::new(false)));
        let cache = TokenCache::new(100);
        let (first, _) = cache.get_or_fetch(key(2), &fetch).await.expect("token");
        assert!(cache.forget(key(2), &first).await);
        let (second, lookup) = cache.get_or_fetch(key(2), &fetch).await.expect("token");
        assert_eq!((header(&second), lookup), ("Bearer token-2", Lookup::Miss));
        // A late 401 for the old token does not drop the new one.
        tokio::time::advance(FORGET_INTERVAL).await;
        assert!(cache.forget(key(2), &first).await);
        let (still, _) = cache.get_or_fetch(key(2), &fetch).await.expect("token");
        assert_eq!(header(&still), "Bearer token-2");
        // Within the interval a second 401 drops nothing.
        assert!(!cache.forget(key(2), &still).await);
        assert_eq!(
            header(&cache.get_or_fetch(key(2), &fetch).await.expect("token").0),
            "Bearer token-2"
        );
    }

    /// A token of unknown lifetime is shared by the requests coalesced on its fetch, and never cached.
    #[tokio::test(start_paused = true)]
    async fn uncacheable_token_serves_its_waiters_and_is_not_cached() {
        let calls = Arc::new(AtomicU32::new(0));
        let counter = Arc::clone(&calls);
        let fetch: Fetch = Arc::new(move |_| {
            let counter = Arc::clone(&counter);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let now = Instant::now();
                Ok(UpstreamToken {
                    header: HeaderValue::from_str(&format!("Bearer once-{n}")).expect("header"),
                    expires_on: 0,
                    stale_at: now,
                    expires_at: now,
                })
            })
        });
        let cache = Arc::new(TokenCache::new(100));
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let cache = Arc::clone(&cache);
                let fetch = Arc::clone(&fetch);
                tokio::spawn(async move {
                    cache
                        .get_or_fetch(key(9), &fetch)
                        .await
                        .map(|(e, _)| header(&e).to_owned())
                })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.expect("join").expect("token"), "Bearer once-1");
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one fetch for the coalesced requests"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let (later, _) = cache.get_or_fetch(key(9), &fetch).await.expect("token");
        assert_eq!(
            header(&later),
            "Bearer once-2",
            "never served from the cache"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_not_cached() {
        let calls = Arc::new(AtomicU32::new(0));
        let down = Arc::new(AtomicBool::new(true));
        let fetch = counting_fetch(Arc::clone(&calls), Arc::clone(&down));
        let cache = TokenCache::new(100);
        assert!(cache.get_or_fetch(key(3), &fetch).await.is_err());
        down.store(false, Ordering::SeqCst);
        assert!(cache.get_or_fetch(key(3), &fetch).await.is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    mod isolation {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Get { caller: u8, route: u8 },
            Advance { secs: u16 },
            Forget { caller: u8, route: u8 },
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => (0..6u8, 0..3u8).prop_map(|(caller, route)| Op::Get { caller, route }),
                2 => (0..700u16).prop_map(|secs| Op::Advance { secs }),
                1 => (0..6u8, 0..3u8).prop_map(|(caller, route)| Op::Forget { caller, route }),
            ]
        }

        fn key_for(caller: u8, route: u8) -> CacheKey {
            let subject = aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA256,
                format!("subject-token-of-caller-{caller}").as_bytes(),
            );
            let subject: [u8; 32] = subject.as_ref().try_into().expect("32 bytes");
            let scopes = vec![format!("api://route-{route}/.default")];
            let request = RequestKey::new(&KeyParts {
                identity: "default",
                client_id: "client",
                token_endpoint: "https://idp.example/token",
                flavor: "entra",
                auth_method: "client_secret_post",
                scopes: &scopes,
                audience: &[],
                resource: &[],
                requested_token_type: None,
                claims: None,
            });
            CacheKey::new(&request, Some(&subject))
        }

        /// A fetch that mints `c{caller}-r{route}-{n}` tokens living 600 s (stale after 300 s).
        fn minting(caller: u8, route: u8, counter: Arc<AtomicU32>) -> Fetch {
            Arc::new(move |_| {
                let counter = Arc::clone(&counter);
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    let now = Instant::now();
                    Ok(UpstreamToken {
                        header: HeaderValue::from_str(&format!("Bearer c{caller}-r{route}-{n}"))
                            .expect("header"),
                        expires_on: 0,
                        stale_at: now + Duration::from_secs(300),
                        expires_at: now + Duration::from_secs(570),
                    })
                })
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// Whatever the interleaving of lookups, refreshes, expiries, evictions (4 entries for 18 keys)
            /// and upstream-401 drops, a caller only ever receives a token minted for its own key.
            #[test]
            fn no_caller_ever_receives_another_callers_token(ops in proptest::collection::vec(op(), 1..80)) {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .start_paused(true)
                    .build()
                    .expect("runtime");
                runtime.block_on(async {
                    let cache = TokenCache::new(4);
                    let counter = Arc::new(AtomicU32::new(0));
                    for op in ops {
                        match op {
                            Op::Get { caller, route } => {
                                let fetch = minting(caller, route, Arc::clone(&counter));
                                let (entry, _) = cache.get_or_fetch(key_for(caller, route), &fetch).await.expect("token");
                                let prefix = format!("Bearer c{caller}-r{route}-");
                                assert!(header(&entry).starts_with(&prefix), "{} served to {prefix}", header(&entry));
                                assert!(Instant::now() < entry.token.expires_at || entry.token.expires_at == entry.token.stale_at);
                            }
                            Op::Advance { secs } => tokio::time::sleep(Duration::from_secs(u64::from(secs))).await,
                            Op::Forget { caller, route } => {
                                let fetch = minting(caller, route, Arc::clone(&counter));
                                let (entry, _) = cache.get_or_fetch(key_for(caller, route), &fetch).await.expect("token");
                                cache.forget(key_for(caller, route), &entry).await;
                            }
                        }
                    }
                    assert!(cache.entry_count().await <= 4, "bounded by max_entries");
                });
            }
        }
    }
}
