//! The fleet's token cache on Redis (SPEC §14): the second level behind each replica's in-process cache.
//! On an in-process miss one script call reads the entry or, when there is none, takes a short lease
//! (`SET NX PX`); the replica holding the lease exchanges and writes the entry while the others poll for it
//! (bounded by the lease, then they exchange themselves). Values are sealed ([`super::seal`]).
//!
//! Redis never fails a request: every call is bounded by `timeout`; a failure marks the cache degraded
//! (logged once, `obo_shared_cache_up` 0) and from then on requests skip it while a background probe
//! reconnects. Writes run in the background.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use redis::Value;
use redis::aio::ConnectionManager;
use tokio::time::Instant;

use super::answer::{ExchangeError, Unavailable};
use super::cache::{CacheKey, Purpose};
use super::seal::Sealer;
use super::token::UpstreamToken;
use crate::config::SharedCacheSettings;
use crate::telemetry::{Metrics, SharedResult};

/// Reads the first entry found among `KEYS[2..]` (`{index, value}`); else, unless `ARGV[1]` is empty, takes
/// the lease `KEYS[1]` for `ARGV[2]` ms (`{-1}`); else `{0}` (the lease is someone else's). With `ARGV[3]`
/// set, entries are not read (a refresh, or an entry that did not open, needs the lease).
const GET_OR_LEASE: &str = r"
if ARGV[3] == '' then
  for i = 2, #KEYS do
    local v = redis.call('GET', KEYS[i])
    if v then return {i - 1, v} end
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

/// While the lease is someone else's, polls start this often and back off to [`MAX_POLL`].
const FIRST_POLL: Duration = Duration::from_millis(2);
const MAX_POLL: Duration = Duration::from_millis(25);
/// How often a degraded cache is probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

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
    /// An entry that did not open (another key, or garbage): a miss, to be overwritten.
    Unreadable,
    /// The lease is ours: exchange and write.
    Leased,
    /// Another replica holds the lease.
    Held,
    /// Redis did not answer (in time), or the cache is degraded.
    Unavailable,
}

/// The shared cache of one sidecar process; it outlives configuration reloads.
pub(crate) struct SharedCache {
    connection: ConnectionManager,
    sealer: Sealer,
    prefix: String,
    timeout: Duration,
    lease: Duration,
    display: String,
    up: AtomicBool,
    metrics: Arc<Metrics>,
}

impl SharedCache {
    /// Sets up the client; the connection is made on first use, so Redis being down never stops a start.
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
        info = info.set_redis_settings(redis_settings);
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
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(settings.timeout.max(Duration::from_millis(500))))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(SharedCacheError::Url)?;
        metrics.set_shared_cache_up(true);
        Ok(Arc::new(SharedCache {
            connection,
            sealer: Sealer::new(&settings.keys),
            prefix: settings.key_prefix.clone(),
            timeout: settings.timeout,
            lease: settings.lease,
            display: settings.display.clone(),
            up: AtomicBool::new(true),
            metrics: Arc::clone(metrics),
        }))
    }

    /// The token for `key`: from Redis, or from `exchange` (run here when this replica holds the lease,
    /// Redis is unavailable, or the lease ran out while waiting), written back for the fleet.
    pub(crate) async fn fetch(
        self: &Arc<Self>,
        key: CacheKey,
        purpose: Purpose,
        exchange: impl Fn() -> BoxFuture<'static, Result<UpstreamToken, ExchangeError>>,
    ) -> Result<UpstreamToken, ExchangeError> {
        let lease_id = crate::ids::random_uuid();
        let waited_until = Instant::now() + self.lease;
        let mut poll = FIRST_POLL;
        let mut first = true;
        let mut entries = true;
        loop {
            let found = self.look(&key, &lease_id, entries).await;
            if first {
                self.metrics.record_shared_cache(match found {
                    Found::Token(_) => SharedResult::Hit,
                    Found::Unavailable => SharedResult::Error,
                    Found::Unreadable | Found::Leased | Found::Held => SharedResult::Miss,
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
                Found::Unreadable => entries = false,
                Found::Leased => {
                    let outcome = exchange().await;
                    match &outcome {
                        Ok(token) => self.put(key, token, Some(lease_id)),
                        Err(_) => self.give_back(key, lease_id),
                    }
                    return outcome;
                }
                Found::Held if purpose == Purpose::Refresh => {
                    // Another replica refreshes; the current token keeps serving here meanwhile.
                    return Err(Unavailable::RefreshedElsewhere.into());
                }
                Found::Held if Instant::now() + poll < waited_until => {
                    tokio::time::sleep(poll).await;
                    poll = (poll * 2).min(MAX_POLL);
                }
                Found::Held | Found::Unavailable => {
                    let outcome = exchange().await;
                    if let Ok(token) = &outcome {
                        self.put(key, token, None);
                    }
                    return outcome;
                }
            }
        }
    }

    /// The upstream refused `sent`: deletes the shared entry if it is still that token (a newer one stays).
    pub(crate) fn forget(self: &Arc<Self>, key: CacheKey, sent: http::HeaderValue) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            for name in this.sealer.names(&this.prefix, &key) {
                let mut get = redis::cmd("GET");
                get.arg(&name);
                let Some(Value::BulkString(value)) = this.call(get).await else {
                    continue;
                };
                if this
                    .sealer
                    .open(&key, &value)
                    .is_some_and(|token| token.header == sent)
                {
                    let _ = this
                        .call(script(DELETE_IF, &[name.as_bytes()], &[&value]))
                        .await;
                }
            }
        });
    }

    /// One look: an entry (when `entries`), else the lease.
    async fn look(self: &Arc<Self>, key: &CacheKey, lease_id: &str, entries: bool) -> Found {
        let mut keys = vec![self.sealer.lease_name(&self.prefix, key)];
        keys.extend(self.sealer.names(&self.prefix, key));
        let keys: Vec<&[u8]> = keys.iter().map(String::as_bytes).collect();
        let lease_ms = u64::try_from(self.lease.as_millis())
            .unwrap_or(u64::MAX)
            .to_string();
        let skip_entries: &[u8] = if entries { b"" } else { b"1" };
        let answer = self
            .call(script(
                GET_OR_LEASE,
                &keys,
                &[lease_id.as_bytes(), lease_ms.as_bytes(), skip_entries],
            ))
            .await;
        let Some(Value::Array(answer)) = answer else {
            return Found::Unavailable;
        };
        match answer.as_slice() {
            [Value::Int(-1)] => Found::Leased,
            [Value::Int(0)] => Found::Held,
            [Value::Int(_), Value::BulkString(value)] => match self.sealer.open(key, value) {
                Some(token) => Found::Token(token),
                None => Found::Unreadable,
            },
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
            let ttl_ms = u64::try_from(ttl.as_millis())
                .unwrap_or(u64::MAX)
                .to_string();
            let lease_id = lease_id.unwrap_or_default();
            let _ = this
                .call(script(
                    PUT,
                    &[lease.as_bytes(), name.as_bytes()],
                    &[&value, ttl_ms.as_bytes(), lease_id.as_bytes()],
                ))
                .await;
        });
    }

    /// Gives the lease back (the exchange failed), so a waiting replica takes it at once.
    fn give_back(self: &Arc<Self>, key: CacheKey, lease_id: String) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let lease = this.sealer.lease_name(&this.prefix, &key);
            let _ = this
                .call(script(
                    DELETE_IF,
                    &[lease.as_bytes()],
                    &[lease_id.as_bytes()],
                ))
                .await;
        });
    }

    /// One command, bounded by `timeout`; `None` when the cache is degraded or the command fails.
    async fn call(self: &Arc<Self>, command: redis::Cmd) -> Option<Value> {
        if !self.up.load(Ordering::Acquire) {
            return None;
        }
        let mut connection = self.connection.clone();
        match tokio::time::timeout(self.timeout, command.query_async::<Value>(&mut connection))
            .await
        {
            Ok(Ok(value)) => Some(value),
            Ok(Err(error)) => {
                self.degrade(&format!("{:?}", error.kind()));
                None
            }
            Err(_) => {
                self.degrade("no answer within the timeout");
                None
            }
        }
    }

    /// Marks the cache degraded (once per burst of failures) and starts the probe that brings it back.
    fn degrade(self: &Arc<Self>, why: &str) {
        if !self.up.swap(false, Ordering::AcqRel) {
            return;
        }
        tracing::warn!(redis = %self.display, reason = why,
            "shared cache degraded: serving from this replica's cache and the IdP until Redis answers again");
        self.metrics.set_shared_cache_up(false);
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_INTERVAL).await;
                let Some(this) = this.upgrade() else {
                    return;
                };
                let mut connection = this.connection.clone();
                let ping = redis::cmd("PING");
                let answered = tokio::time::timeout(
                    this.timeout.max(Duration::from_millis(500)),
                    ping.query_async::<Value>(&mut connection),
                )
                .await;
                if matches!(answered, Ok(Ok(_))) {
                    this.up.store(true, Ordering::Release);
                    this.metrics.set_shared_cache_up(true);
                    tracing::info!(redis = %this.display, "shared cache answers again");
                    return;
                }
            }
        });
    }
}

/// `EVAL script numkeys keys… args…`.
fn script(source: &str, keys: &[&[u8]], args: &[&[u8]]) -> redis::Cmd {
    let mut command = redis::cmd("EVAL");
    command.arg(source).arg(keys.len());
    for key in keys {
        command.arg(*key);
    }
    for arg in args {
        command.arg(*arg);
    }
    command
}
