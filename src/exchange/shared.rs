//! The fleet's token cache on Redis (SPEC §14): the second level behind each replica's in-process cache.
//! On an in-process miss one script call reads the entry or, when there is none, takes a short lease
//! (`SET NX PX`); the replica holding the lease exchanges (renewing the lease while it does) and writes the
//! entry while the others poll for it, bounded by the lease and half the route's deadline, after which they
//! exchange themselves. Values are sealed ([`super::seal`]).
//!
//! Redis never fails a request: every call is bounded by `timeout`, a flight makes at most three calls
//! between two polls, and a failure or an answer this sidecar does not understand marks the cache degraded
//! (`obo_shared_cache_up` 0, logged at most once a minute); from then on requests skip it while a probe,
//! backing off, asks Redis the way requests do and builds a new connection when the old one does not
//! recover. Writes run in the background.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use futures_util::future::BoxFuture;
use http::HeaderValue;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use tokio::time::Instant;

use super::answer::{ExchangeError, Unavailable};
use super::cache::{CacheKey, FORGET_INTERVAL, Purpose};
use super::seal::Sealer;
use super::token::UpstreamToken;
use crate::config::SharedCacheSettings;
use crate::digest::DigestHash;
use crate::telemetry::{Metrics, SharedResult};

/// Reads the first entry found among `KEYS[2..]` (`{index, value, ms left}`); else, unless `ARGV[1]` is
/// empty, takes the lease `KEYS[1]` for `ARGV[2]` ms (`{-1}`); else `{0}` (the lease is someone else's).
/// With `ARGV[3]` set, entries are not read (a refresh, or an entry that did not open, needs the lease).
const GET_OR_LEASE: &str = r"
if ARGV[3] == '' then
  for i = 2, #KEYS do
    local v = redis.call('GET', KEYS[i])
    if v then return {i - 1, v, redis.call('PTTL', KEYS[i])} end
  end
end
if ARGV[1] == '' then return {0} end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {-1} end
return {0}
";

/// Writes the entry `KEYS[2]` = `ARGV[1]` for `ARGV[2]` ms, and gives back the lease `KEYS[1]` if it is
/// still `ARGV[3]`.
const PUT: &str = r"
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if ARGV[3] ~= '' and redis.call('GET', KEYS[1]) == ARGV[3] then redis.call('DEL', KEYS[1]) end
return 1
";

/// Deletes `KEYS[1]` if it still holds `ARGV[1]` (a lease given back, or the entry an upstream refused).
const DELETE_IF: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Extends the lease `KEYS[1]` to `ARGV[2]` ms if it is still `ARGV[1]` (an exchange that takes a while).
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
";

/// While the lease is someone else's, polls start this often and back off to [`MAX_POLL`] (with jitter).
const FIRST_POLL: Duration = Duration::from_millis(2);
const MAX_POLL: Duration = Duration::from_millis(50);
/// Calls a flight may make without sleeping: look, look for the lease, one more; a fourth is an answer this
/// sidecar does not understand.
const MAX_LOOKS_WITHOUT_POLL: u32 = 3;
/// A degraded cache is probed after this, doubling up to [`MAX_PROBE_INTERVAL`].
const FIRST_PROBE_INTERVAL: Duration = Duration::from_secs(1);
const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// Good probes in a row before the cache is used again.
const PROBES_TO_RECOVER: u32 = 3;
/// Failed probes in a row after which the connection is built anew (the old one may hold a failure for
/// good, or a half-open socket).
const PROBES_TO_RECONNECT: u32 = 2;
/// Degradations are logged at most this often (the count of those not logged comes with the next line).
const LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Unacknowledged data for this long ends the connection (a peer gone without a reset).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a shared cache could not be set up (the configuration was checked; this is the client library).
#[derive(Debug, thiserror::Error)]
pub enum SharedCacheError {
    #[error("the shared cache URL")]
    Url(#[source] redis::RedisError),
    #[error("reading the shared cache's ca_file")]
    CaFile(#[source] std::io::Error),
}

/// What one look at Redis found.
enum Found {
    Token(UpstreamToken),
    /// An entry that did not open (another key, garbage, or a token an upstream just refused): a miss, to be
    /// overwritten. Its bytes, to tell it from a new entry later.
    Unreadable(Vec<u8>),
    /// The lease is ours: exchange and write.
    Leased,
    /// Another replica holds the lease.
    Held,
    /// Redis did not answer (in time), answered what this sidecar does not understand, or is degraded.
    Unavailable,
}

/// The scripts, sent by SHA (`EVALSHA`, loaded on `NOSCRIPT`).
struct Scripts {
    get_or_lease: Script,
    put: Script,
    delete_if: Script,
    renew: Script,
}

/// Whether Redis is used, and the probe that brings it back.
#[derive(Default)]
struct Health {
    down: AtomicBool,
    /// The last degradation was logged: its recovery is logged too.
    logged_down: AtomicBool,
    last_log: std::sync::Mutex<Option<std::time::Instant>>,
    not_logged: AtomicU64,
}

/// The shared cache of one sidecar process; it outlives configuration reloads.
pub(crate) struct SharedCache {
    client: redis::Client,
    manager_config: ConnectionManagerConfig,
    connection: ArcSwap<ConnectionManager>,
    scripts: Scripts,
    sealer: Sealer,
    prefix: String,
    timeout: Duration,
    lease: Duration,
    display: String,
    health: Health,
    /// Tokens an upstream refused, by key, for [`FORGET_INTERVAL`]: never taken back from Redis.
    refused: DashMap<CacheKey, (HeaderValue, Instant), DigestHash>,
    metrics: Arc<Metrics>,
}

impl SharedCache {
    /// Sets up the client; the connection is made in the background, so Redis being down never stops a
    /// start (nor `/readyz`).
    pub(crate) fn new(
        settings: &SharedCacheSettings,
        metrics: &Arc<Metrics>,
    ) -> Result<Arc<SharedCache>, SharedCacheError> {
        let mut info = redis::IntoConnectionInfo::into_connection_info(settings.url.expose())
            .map_err(SharedCacheError::Url)?;
        let mut redis_settings = info.redis_settings().clone();
        if let Some(username) = &settings.username {
            redis_settings = redis_settings.set_username(username);
        }
        if let Some(password) = &settings.password {
            redis_settings = redis_settings.set_password(password.expose());
        }
        let tcp = info
            .tcp_settings()
            .clone()
            .set_nodelay(true)
            .set_user_timeout(TCP_USER_TIMEOUT);
        info = info
            .set_redis_settings(redis_settings)
            .set_tcp_settings(tcp);
        let client = match &settings.ca_file {
            Some(path) => {
                let root_cert = std::fs::read(path).map_err(SharedCacheError::CaFile)?;
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root_cert),
                    },
                )
            }
            None => redis::Client::open(info),
        }
        .map_err(SharedCacheError::Url)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(settings.timeout.max(Duration::from_millis(500))))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let connection =
            ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
                .map_err(SharedCacheError::Url)?;
        let cache = Arc::new(SharedCache {
            client,
            manager_config,
            connection: ArcSwap::from_pointee(connection),
            scripts: Scripts {
                get_or_lease: Script::new(GET_OR_LEASE),
                put: Script::new(PUT),
                delete_if: Script::new(DELETE_IF),
                renew: Script::new(RENEW),
            },
            sealer: Sealer::new(&settings.keys),
            prefix: settings.key_prefix.clone(),
            timeout: settings.timeout,
            lease: settings.lease,
            display: settings.display.clone(),
            health: Health::default(),
            refused: DashMap::with_hasher(DigestHash::default()),
            metrics: Arc::clone(metrics),
        });
        // Connect now, in the background: the gauge says whether Redis answers before the first miss does.
        let this = Arc::clone(&cache);
        tokio::spawn(async move {
            let up = this.probe_once(Duration::from_secs(2)).await;
            if up {
                this.metrics.set_shared_cache_up(true);
            } else {
                this.degrade("no answer at start");
            }
        });
        Ok(cache)
    }

    /// The token for `key`: from Redis, or from `exchange` (run here when this replica holds the lease,
    /// Redis is unavailable, or the wait for another replica ran out after `wait`), written back for the
    /// fleet.
    pub(crate) async fn fetch(
        self: &Arc<Self>,
        key: CacheKey,
        purpose: Purpose,
        wait: Duration,
        exchange: impl Fn() -> BoxFuture<'static, Result<UpstreamToken, ExchangeError>>,
    ) -> Result<UpstreamToken, ExchangeError> {
        let lease_id = crate::ids::random_uuid();
        let waited_until = Instant::now() + self.lease.min(wait);
        let mut poll = FIRST_POLL;
        let mut first = true;
        let mut entries = true;
        let mut unreadable: Option<Vec<u8>> = None;
        let mut looks = 0;
        loop {
            looks += 1;
            let found = if looks > MAX_LOOKS_WITHOUT_POLL {
                self.degrade("answers that go round in circles");
                Found::Unavailable
            } else {
                self.look(&key, &lease_id, entries).await
            };
            let found = match found {
                Found::Token(token) if self.was_refused(&key, &token.header) => {
                    Found::Unreadable(Vec::new())
                }
                other => other,
            };
            if first {
                self.metrics.record_shared_cache(match found {
                    Found::Token(_) => SharedResult::Hit,
                    Found::Unavailable => SharedResult::Error,
                    Found::Unreadable(_) | Found::Leased | Found::Held => SharedResult::Miss,
                });
                first = false;
            }
            match found {
                Found::Token(token) => {
                    if purpose == Purpose::Refresh && Instant::now() >= token.stale_at {
                        // Not fresher than ours: this refresh needs the lease.
                        entries = false;
                        continue;
                    }
                    return Ok(token);
                }
                // What we saw before: another replica holds the lease to overwrite it; keep waiting.
                Found::Unreadable(bytes) if unreadable.as_ref() == Some(&bytes) => {
                    if !self.pause(&mut poll, &mut looks, waited_until).await {
                        return self.exchange_unshared(key, &exchange).await;
                    }
                }
                Found::Unreadable(bytes) => {
                    unreadable = Some(bytes);
                    entries = false;
                }
                Found::Leased => return self.exchange_leased(key, lease_id, &exchange).await,
                Found::Held if purpose == Purpose::Refresh => {
                    // Another replica refreshes; the current token keeps serving here meanwhile.
                    return Err(Unavailable::RefreshedElsewhere.into());
                }
                Found::Held => {
                    entries = true;
                    if !self.pause(&mut poll, &mut looks, waited_until).await {
                        return self.exchange_unshared(key, &exchange).await;
                    }
                }
                Found::Unavailable => return self.exchange_unshared(key, &exchange).await,
            }
        }
    }

    /// Waits for the next poll; false when the wait for the lease holder has run out.
    async fn pause(&self, poll: &mut Duration, looks: &mut u32, until: Instant) -> bool {
        if Instant::now() + *poll >= until {
            return false;
        }
        let mut byte = [0u8; 1];
        let _ = aws_lc_rs::rand::fill(&mut byte);
        let jitter = poll.mul_f64(f64::from(byte[0]) / 1024.0);
        tokio::time::sleep(*poll + jitter).await;
        *poll = (*poll * 2).min(MAX_POLL);
        *looks = 0;
        true
    }

    /// Exchanges holding the lease (renewed while the exchange lasts), then writes the token and gives the
    /// lease back.
    async fn exchange_leased(
        self: &Arc<Self>,
        key: CacheKey,
        lease_id: String,
        exchange: &impl Fn() -> BoxFuture<'static, Result<UpstreamToken, ExchangeError>>,
    ) -> Result<UpstreamToken, ExchangeError> {
        let renewal = {
            let this = Arc::clone(self);
            let lease_id = lease_id.clone();
            tokio::spawn(async move {
                let lease = this.sealer.lease_name(&this.prefix, &key);
                let ms = millis(this.lease);
                loop {
                    tokio::time::sleep(this.lease / 2).await;
                    let mut renew = this.scripts.renew.key(lease.as_bytes());
                    renew.arg(lease_id.as_bytes()).arg(ms.as_bytes());
                    let mut connection = (*this.connection.load_full()).clone();
                    let call = renew.invoke_async::<Value>(&mut connection);
                    let _ = tokio::time::timeout(this.timeout, call).await;
                }
            })
        };
        let outcome = exchange().await;
        renewal.abort();
        match &outcome {
            Ok(token) => self.put(key, token, Some(lease_id)),
            Err(_) => self.give_back(key, lease_id),
        }
        outcome
    }

    /// Exchanges without the lease (Redis unavailable, or the holder took too long), and shares the result.
    async fn exchange_unshared(
        self: &Arc<Self>,
        key: CacheKey,
        exchange: &impl Fn() -> BoxFuture<'static, Result<UpstreamToken, ExchangeError>>,
    ) -> Result<UpstreamToken, ExchangeError> {
        let outcome = exchange().await;
        if let Ok(token) = &outcome {
            self.put(key, token, None);
        }
        outcome
    }

    /// The upstream refused `sent`: it is never taken back from Redis for this key while the in-process
    /// cache would not forget it again, and the shared entry is deleted if it is still that token.
    pub(crate) fn forget(self: &Arc<Self>, key: CacheKey, sent: HeaderValue) {
        let now = Instant::now();
        if self.refused.len() > 10_000 {
            self.refused
                .retain(|_, (_, at)| now.duration_since(*at) < FORGET_INTERVAL);
        }
        self.refused.insert(key, (sent.clone(), now));
        let this = Arc::clone(self);
        tokio::spawn(async move {
            for name in this.sealer.names(&this.prefix, &key) {
                let mut get = redis::cmd("GET");
                get.arg(&name);
                let Some(Value::BulkString(value)) = this.call(&get).await else {
                    continue;
                };
                if this
                    .sealer
                    .open(&key, &value)
                    .is_some_and(|token| token.header == sent)
                {
                    let mut delete = this.scripts.delete_if.key(name.as_bytes());
                    delete.arg(value.as_slice());
                    let _ = this.invoke(&delete).await;
                }
            }
        });
    }

    fn was_refused(&self, key: &CacheKey, header: &HeaderValue) -> bool {
        self.refused.get(key).is_some_and(|entry| {
            let (refused, at) = entry.value();
            refused == header && at.elapsed() < FORGET_INTERVAL
        })
    }

    /// One look: an entry (when `entries`), else the lease.
    async fn look(self: &Arc<Self>, key: &CacheKey, lease_id: &str, entries: bool) -> Found {
        let lease = self.sealer.lease_name(&self.prefix, key);
        let names = self.sealer.names(&self.prefix, key);
        let mut invocation = self.scripts.get_or_lease.key(lease.as_bytes());
        for name in &names {
            invocation.key(name.as_bytes());
        }
        let skip_entries: &[u8] = if entries { b"" } else { b"1" };
        invocation
            .arg(lease_id.as_bytes())
            .arg(millis(self.lease).as_bytes())
            .arg(skip_entries);
        let Some(Value::Array(answer)) = self.invoke(&invocation).await else {
            return Found::Unavailable;
        };
        match answer.as_slice() {
            [Value::Int(-1)] => Found::Leased,
            [Value::Int(0)] => Found::Held,
            [Value::Int(_), Value::BulkString(value), Value::Int(left_ms)] if entries => {
                match self.sealer.open(key, value) {
                    // Redis's own clock bounds the token's: a replica whose clock runs ahead cannot stretch
                    // it past its hard expiry.
                    Some(mut token) => {
                        let left = Duration::from_millis(u64::try_from(*left_ms).unwrap_or(0));
                        token.expires_at = token.expires_at.min(Instant::now() + left);
                        token.stale_at = token.stale_at.min(token.expires_at);
                        Found::Token(token)
                    }
                    None => Found::Unreadable(value.clone()),
                }
            }
            _ => {
                self.degrade("an answer this sidecar does not understand");
                Found::Unavailable
            }
        }
    }

    /// Writes `token` for the fleet (and gives back the lease), in the background.
    fn put(self: &Arc<Self>, key: CacheKey, token: &UpstreamToken, lease_id: Option<String>) {
        let Some((value, ttl)) = self.sealer.seal(&key, token) else {
            if let Some(lease_id) = lease_id {
                self.give_back(key, lease_id);
            }
            return;
        };
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let lease = this.sealer.lease_name(&this.prefix, &key);
            let names = this.sealer.names(&this.prefix, &key);
            let Some(name) = names.first() else {
                return;
            };
            let lease_id = lease_id.unwrap_or_default();
            let mut put = this.scripts.put.key(lease.as_bytes());
            put.key(name.as_bytes())
                .arg(value.as_slice())
                .arg(millis(ttl).as_bytes())
                .arg(lease_id.as_bytes());
            let _ = this.invoke(&put).await;
        });
    }

    /// Gives the lease back (the exchange failed), so a waiting replica takes it at once.
    fn give_back(self: &Arc<Self>, key: CacheKey, lease_id: String) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let lease = this.sealer.lease_name(&this.prefix, &key);
            let mut delete = this.scripts.delete_if.key(lease.as_bytes());
            delete.arg(lease_id.as_bytes());
            let _ = this.invoke(&delete).await;
        });
    }

    /// One script call, bounded by `timeout`; `None` when the cache is degraded or the call fails.
    async fn invoke(self: &Arc<Self>, invocation: &redis::ScriptInvocation<'_>) -> Option<Value> {
        if self.health.down.load(Ordering::Acquire) {
            return None;
        }
        let mut connection = (*self.connection.load_full()).clone();
        let call = invocation.invoke_async::<Value>(&mut connection);
        self.bounded(call).await
    }

    /// One command, bounded by `timeout`; `None` when the cache is degraded or the command fails.
    async fn call(self: &Arc<Self>, command: &redis::Cmd) -> Option<Value> {
        if self.health.down.load(Ordering::Acquire) {
            return None;
        }
        let mut connection = (*self.connection.load_full()).clone();
        let call = command.query_async::<Value>(&mut connection);
        self.bounded(call).await
    }

    async fn bounded(
        self: &Arc<Self>,
        call: impl Future<Output = redis::RedisResult<Value>>,
    ) -> Option<Value> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(error)) => {
                // The kind and the server's error code (NOPERM, OOM, READONLY, …) say what to fix; neither
                // holds a secret.
                let reason = match error.code() {
                    Some(code) => format!("{:?} ({code})", error.kind()),
                    None => format!("{:?}", error.kind()),
                };
                self.degrade(&reason);
                None
            }
            Err(_) => {
                self.degrade("no answer within the timeout");
                None
            }
        }
    }

    /// Marks the cache degraded and starts the probe that brings it back; logged at most once a minute.
    fn degrade(self: &Arc<Self>, why: &str) {
        if self.health.down.swap(true, Ordering::AcqRel) {
            return;
        }
        self.metrics.set_shared_cache_up(false);
        if self.may_log() {
            self.health.logged_down.store(true, Ordering::Relaxed);
            let not_logged = self.health.not_logged.swap(0, Ordering::Relaxed);
            tracing::warn!(redis = %self.display, reason = why, not_logged,
                "shared cache degraded: serving from this replica's cache and the IdP until Redis answers again");
        } else {
            self.health.not_logged.fetch_add(1, Ordering::Relaxed);
        }
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut interval = FIRST_PROBE_INTERVAL;
            let (mut good, mut bad) = (0, 0);
            loop {
                tokio::time::sleep(interval).await;
                let Some(this) = this.upgrade() else {
                    return;
                };
                // The first probe after a pause may have to connect; the others ask as a request would.
                let limit = if good == 0 {
                    Duration::from_secs(1)
                } else {
                    this.timeout
                };
                if this.probe_once(limit).await {
                    good += 1;
                    bad = 0;
                    if good >= PROBES_TO_RECOVER {
                        this.health.down.store(false, Ordering::Release);
                        this.metrics.set_shared_cache_up(true);
                        if this.health.logged_down.swap(false, Ordering::Relaxed) {
                            tracing::info!(redis = %this.display, "shared cache answers again");
                        }
                        return;
                    }
                    interval = Duration::from_millis(100);
                } else {
                    good = 0;
                    bad += 1;
                    if bad >= PROBES_TO_RECONNECT {
                        this.reconnect();
                        bad = 0;
                    }
                    interval = (interval * 2).clamp(FIRST_PROBE_INTERVAL, MAX_PROBE_INTERVAL);
                }
            }
        });
    }

    /// One probe: the lookup script on a probe key, as a request would run it (so an ACL that refuses the
    /// script, or a server that cannot run it, is found), within `limit`.
    async fn probe_once(&self, limit: Duration) -> bool {
        let probe = format!("{}probe", self.prefix);
        let mut invocation = self.scripts.get_or_lease.key(probe.as_bytes());
        invocation.key(probe.as_bytes()).arg("").arg("1").arg("");
        let mut connection = (*self.connection.load_full()).clone();
        let call = invocation.invoke_async::<Value>(&mut connection);
        matches!(
            tokio::time::timeout(limit, call).await,
            Ok(Ok(Value::Array(answer))) if matches!(answer.as_slice(), [Value::Int(0)])
        )
    }

    /// Replaces the connection with a new one (the old one may keep a failed connect, or a half-open socket).
    fn reconnect(&self) {
        if let Ok(connection) = ConnectionManager::new_lazy_with_config(
            self.client.clone(),
            self.manager_config.clone(),
        ) {
            self.connection.store(Arc::new(connection));
        }
    }

    /// True at most once per [`LOG_INTERVAL`].
    fn may_log(&self) -> bool {
        let Ok(mut last) = self.health.last_log.lock() else {
            return false;
        };
        let now = std::time::Instant::now();
        match *last {
            Some(at) if now.duration_since(at) < LOG_INTERVAL => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }
}

/// Whole milliseconds, as Redis reads them.
fn millis(duration: Duration) -> String {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
        .to_string()
}
