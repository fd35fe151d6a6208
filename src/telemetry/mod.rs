//! The Prometheus metrics served on the admin listener's `/metrics` (SPEC §6).
//!
//! [`Metrics`] owns the registry and every metric family; the rest of the sidecar records through its methods
//! with plain arguments and never sees a label type. Label values are bounded: route and identity names from the
//! config, the configured issuer string (`{tenantid}` unfilled), and closed enums. Never a path, a tenant or
//! anything from a token.
//!
//! The per-request path goes through a [`RouteMetrics`] handle that the proxy resolves once per route: it holds
//! the route's own series, so recording a request is a few atomic operations with no label built, no
//! allocation and no map lookup. [`Metrics::record_request`] by `&str` remains for requests that matched no
//! route ([`NO_ROUTE`]).

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// The `Content-Type` of a `/metrics` response: [`Metrics::encode`] writes `OpenMetrics` 1.0 text.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `route` label of a request that matched no route (it gets a 404 before any route is known).
pub(crate) const NO_ROUTE: &str = "-";

/// Upper bounds, in seconds, of the request and IdP duration buckets: from 0.5 ms (a cache hit on loopback)
/// to 10 s (a slow upstream or an IdP retry), a 1-2.5-5 ladder so the bounds are round numbers that SLOs
/// are written in (`le="0.25"`), about ×2 apart. 14 buckets plus `+Inf` keep a series per route small.
pub(crate) const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Status codes with a pre-resolved counter in each [`RouteMetrics`]; others (hyper allows up to 999) take
/// the family's map.
const STATUS_TABLE: std::ops::RangeInclusive<u16> = 100..=599;
const STATUS_TABLE_LEN: usize = 500;

/// Writes a closed enum's `as_str` as its label value (the derive would print the variant name, `Ok`).
macro_rules! label_value_as_str {
    ($($t:ty),* $(,)?) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> fmt::Result {
                fmt::Write::write_str(encoder, self.as_str())
            }
        }
    )*};
}

/// Which token a cache lookup was for: the `kind` label of `obo_token_cache_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum CacheKind {
    /// A token exchanged On-Behalf-Of the caller.
    Obo,
    /// The sidecar's own token (client credentials).
    App,
    /// The caller's own token, validated and sent on unchanged.
    Passthrough,
}

impl CacheKind {
    const COUNT: usize = 3;

    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            CacheKind::Obo => "obo",
            CacheKind::App => "app",
            CacheKind::Passthrough => "passthrough",
        }
    }

    const fn index(self) -> usize {
        match self {
            CacheKind::Obo => 0,
            CacheKind::App => 1,
            CacheKind::Passthrough => 2,
        }
    }
}

/// What a cache lookup found: the `result` label of `obo_token_cache_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum CacheResult {
    /// A fresh entry was used.
    Hit,
    /// Nothing usable: the token was requested from the IdP while the caller waited.
    Miss,
    /// An entry past its refresh point was used while a background refresh runs.
    Stale,
}

impl CacheResult {
    const COUNT: usize = 3;

    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::Stale => "stale",
        }
    }

    const fn index(self) -> usize {
        match self {
            CacheResult::Hit => 0,
            CacheResult::Miss => 1,
            CacheResult::Stale => 2,
        }
    }
}

/// The grant of a token request: the `grant` label of the `obo_idp_*` metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Grant {
    /// Entra's On-Behalf-Of (`urn:ietf:params:oauth:grant-type:jwt-bearer`, `requested_token_use=on_behalf_of`).
    Obo,
    /// RFC 8693 token exchange (`urn:ietf:params:oauth:grant-type:token-exchange`).
    TokenExchange,
    /// RFC 6749 §4.4 client credentials: the sidecar's own token.
    ClientCredentials,
    /// An Azure managed identity's own token (`flavor = "managed_identity"`).
    ManagedIdentity,
}

impl Grant {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Grant::Obo => "obo",
            Grant::TokenExchange => "token_exchange",
            Grant::ClientCredentials => "client_credentials",
            Grant::ManagedIdentity => "managed_identity",
        }
    }
}

/// How a token request ended: the `outcome` label of `obo_idp_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum IdpOutcome {
    /// A token was issued.
    Ok,
    /// The IdP rejected the subject token or assertion (RFC 6749 §5.2 `invalid_grant`).
    InvalidGrant,
    /// The IdP asks the caller for more claims (Conditional Access, CAE).
    ClaimsChallenge,
    /// The user or admin has not consented to the upstream scopes.
    ConsentRequired,
    /// The IdP refused the sidecar itself (`invalid_client`, `unauthorized_client`, bad scope, …).
    Misconfigured,
    /// No usable answer: connect error, timeout, 5xx, unparsable body.
    Unavailable,
    /// The IdP answered 429, or an earlier `Retry-After` has not passed yet.
    Throttled,
}

impl IdpOutcome {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            IdpOutcome::Ok => "ok",
            IdpOutcome::InvalidGrant => "invalid_grant",
            IdpOutcome::ClaimsChallenge => "claims_challenge",
            IdpOutcome::ConsentRequired => "consent_required",
            IdpOutcome::Misconfigured => "misconfigured",
            IdpOutcome::Unavailable => "unavailable",
            IdpOutcome::Throttled => "throttled",
        }
    }
}

/// Why a request to the upstream failed before a response: the `kind` label of `obo_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum UpstreamErrorKind {
    /// The TCP connection could not be opened.
    Connect,
    /// The route's deadline passed.
    Timeout,
    /// The connection was closed or reset mid-exchange.
    Reset,
    /// The TLS handshake failed (certificate, name, protocol).
    Tls,
}

impl UpstreamErrorKind {
    const COUNT: usize = 4;

    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Tls => "tls",
        }
    }

    const fn index(self) -> usize {
        match self {
            UpstreamErrorKind::Connect => 0,
            UpstreamErrorKind::Timeout => 1,
            UpstreamErrorKind::Reset => 2,
            UpstreamErrorKind::Tls => 3,
        }
    }
}

/// `ok|error`, the outcome of a JWKS refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum JwksOutcome {
    Ok,
    Error,
}

impl JwksOutcome {
    const fn as_str(self) -> &'static str {
        match self {
            JwksOutcome::Ok => "ok",
            JwksOutcome::Error => "error",
        }
    }
}

/// `ok|rejected`, the outcome of a config reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ReloadOutcome {
    Ok,
    Rejected,
}

impl ReloadOutcome {
    const fn as_str(self) -> &'static str {
        match self {
            ReloadOutcome::Ok => "ok",
            ReloadOutcome::Rejected => "rejected",
        }
    }
}

label_value_as_str!(
    CacheKind,
    CacheResult,
    Grant,
    IdpOutcome,
    UpstreamErrorKind,
    JwksOutcome,
    ReloadOutcome,
);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: Arc<str>,
    status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    route: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CacheLabels {
    route: Arc<str>,
    kind: CacheKind,
    result: CacheResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct IdpLabels {
    identity: Arc<str>,
    grant: Grant,
    outcome: IdpOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct IdpDurationLabels {
    identity: Arc<str>,
    grant: Grant,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct JwksLabels {
    issuer: Arc<str>,
    outcome: JwksOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UpstreamErrorLabels {
    route: Arc<str>,
    kind: UpstreamErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReloadLabels {
    outcome: ReloadOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CredentialReloadLabels {
    identity: Arc<str>,
    outcome: ReloadOutcome,
}

/// Registers a family so it is listed (`# HELP`, `# TYPE`) even before its first series: prometheus-client
/// 0.26 leaves out empty families, and a dashboard or alert on a listed family with no samples reads better
/// than on one that is missing (a missing family also looks like a scrape of the wrong target).
#[derive(Debug)]
struct Listed<M>(M);

impl<M: EncodeMetric> EncodeMetric for Listed<M> {
    fn encode(&self, encoder: MetricEncoder) -> fmt::Result {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }

    fn is_empty(&self) -> bool {
        false
    }
}

type DurationFamily<S> = Family<S, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// The families keyed by route: handles to the series the registry encodes (a `Family` clone shares them).
#[derive(Debug, Clone)]
struct RouteFamilies {
    requests: Family<RequestLabels, Counter>,
    request_duration: DurationFamily<RouteLabels>,
    cache_requests: Family<CacheLabels, Counter>,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
}

/// The metrics of SPEC §6, in one registry. `Send + Sync`; share it in an `Arc`.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    route_families: RouteFamilies,
    /// One handle per route name ever recorded, so recording by `&str` allocates only the first time.
    routes: DashMap<Arc<str>, RouteMetrics>,
    cache_entries: Gauge<u64, std::sync::atomic::AtomicU64>,
    idp_requests: Family<IdpLabels, Counter>,
    idp_request_duration: DurationFamily<IdpDurationLabels>,
    jwks_refresh: Family<JwksLabels, Counter>,
    reload_ok: Counter,
    reload_rejected: Counter,
    credential_reload: Family<CredentialReloadLabels, Counter>,
    /// `obo_shared_cache_requests_total{result}`: hit, miss, error, each created at 0.
    shared_cache: [Counter; 3],
    shared_cache_up: Gauge,
    /// `obo_requests_in_flight`: proxy-listener requests started and not yet answered.
    in_flight: Gauge,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    commit: &'static str,
}

/// One request in flight: counted while it lives, however it ends (answered, failed, or dropped when its
/// caller went away).
pub(crate) struct InFlight<'a>(&'a Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The result of one shared-cache lookup (`obo_shared_cache_requests_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum SharedResult {
    Hit,
    Miss,
    Error,
}

impl SharedResult {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            SharedResult::Hit => "hit",
            SharedResult::Miss => "miss",
            SharedResult::Error => "error",
        }
    }
}

label_value_as_str!(SharedResult);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SharedLabels {
    result: SharedResult,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family; each is listed by [`Metrics::encode`] from the start, before any sample.
    pub(crate) fn new() -> Self {
        let mut registry = Registry::default();
        let route_families = RouteFamilies {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            cache_requests: Family::default(),
            upstream_errors: Family::default(),
        };
        let cache_entries = Gauge::<u64, std::sync::atomic::AtomicU64>::default();
        let idp_requests = Family::<IdpLabels, Counter>::default();
        let idp_request_duration: DurationFamily<IdpDurationLabels> =
            Family::new_with_constructor(duration_histogram);
        let jwks_refresh = Family::<JwksLabels, Counter>::default();
        let config_reload = Family::<ReloadLabels, Counter>::default();
        let credential_reload = Family::<CredentialReloadLabels, Counter>::default();

        // Counters are registered without `_total`: the encoder appends it (and 0.26 panics in debug builds
        // on a registered name that already ends in `_total`).
        registry.register(
            "obo_requests",
            "Requests answered, by route and HTTP status code",
            Listed(route_families.requests.clone()),
        );
        registry.register_with_unit(
            "obo_request_duration",
            "Time from request head received to response head sent, by route",
            Unit::Seconds,
            Listed(route_families.request_duration.clone()),
        );
        registry.register(
            "obo_token_cache_requests",
            "Upstream token cache lookups, by route, token kind and result",
            Listed(route_families.cache_requests.clone()),
        );
        registry.register(
            "obo_token_cache_entries",
            "Upstream tokens held in the cache",
            cache_entries.clone(),
        );
        registry.register(
            "obo_idp_requests",
            "Token requests to the IdP, by identity, grant and outcome",
            Listed(idp_requests.clone()),
        );
        registry.register_with_unit(
            "obo_idp_request_duration",
            "Duration of token requests to the IdP, retries included, by identity and grant",
            Unit::Seconds,
            Listed(idp_request_duration.clone()),
        );
        registry.register(
            "obo_jwks_refresh",
            "Fetches of an issuer's signing keys, by configured issuer and outcome",
            Listed(jwks_refresh.clone()),
        );
        registry.register(
            "obo_upstream_errors",
            "Upstream requests that failed without a response, by route and kind",
            Listed(route_families.upstream_errors.clone()),
        );
        registry.register(
            "obo_credential_reload",
            "Client credential files re-read after they changed, by identity and outcome",
            Listed(credential_reload.clone()),
        );
        registry.register(
            "obo_config_reload",
            "Config reloads, by outcome",
            Listed(config_reload.clone()),
        );

        let shared_cache_requests = Family::<SharedLabels, Counter>::default();
        registry.register(
            "obo_shared_cache_requests",
            "Shared (Redis) token cache lookups after an in-process miss, by result",
            shared_cache_requests.clone(),
        );
        let shared_cache_up = Gauge::default();
        registry.register(
            "obo_shared_cache_up",
            "1 while the shared token cache answers; 0 while it is degraded, or without [cache.shared]",
            shared_cache_up.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        registry.register(
            "obo_build_info",
            "1, labelled with the version and the git commit of this binary",
            build_info.clone(),
        );
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                commit: env!("OBO_SIDECAR_COMMIT"),
            })
            .set(1);
        #[cfg(target_os = "linux")]
        registry.register_collector(Box::new(process::ProcessCollector));
        let in_flight = Gauge::default();
        registry.register(
            "obo_requests_in_flight",
            "Requests on the proxy listener started and not yet answered",
            in_flight.clone(),
        );
        let shared_cache = [SharedResult::Hit, SharedResult::Miss, SharedResult::Error]
            .map(|result| shared_cache_requests.get_or_create_owned(&SharedLabels { result }));

        // Both reload outcomes exist at 0 from the start, so `increase()` sees the first reload.
        let reload_ok = config_reload.get_or_create_owned(&ReloadLabels {
            outcome: ReloadOutcome::Ok,
        });
        let reload_rejected = config_reload.get_or_create_owned(&ReloadLabels {
            outcome: ReloadOutcome::Rejected,
        });

        Self {
            registry,
            route_families,
            routes: DashMap::new(),
            cache_entries,
            idp_requests,
            idp_request_duration,
            jwks_refresh,
            reload_ok,
            reload_rejected,
            credential_reload,
            shared_cache,
            shared_cache_up,
            in_flight,
        }
    }

    /// Counts one request in flight until the returned guard drops.
    pub(crate) fn request_started(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(&self.in_flight)
    }

    /// The handle for `route`, created on first use and the same for every later call with that name (a
    /// reloaded config keeps its routes' series). `route` must be a configured route name or [`NO_ROUTE`]:
    /// each distinct name is kept for the life of the process.
    pub(crate) fn route(&self, route: &str) -> RouteMetrics {
        if let Some(handle) = self.routes.get(route) {
            return handle.clone();
        }
        let name: Arc<str> = Arc::from(route);
        self.routes
            .entry(Arc::clone(&name))
            .or_insert_with(|| RouteMetrics::new(name, &self.route_families))
            .clone()
    }

    /// Runs `f` on the handle for `route` without cloning it (one map lookup; allocates only the first time).
    fn with_route(&self, route: &str, f: impl FnOnce(&RouteMetrics)) {
        if let Some(handle) = self.routes.get(route) {
            f(&handle);
            return;
        }
        f(&self.route(route));
    }

    /// Counts a request answered with `status` after `elapsed`. On the per-request path prefer
    /// [`RouteMetrics::record_request`]; this is for [`NO_ROUTE`] and other callers without a handle.
    pub(crate) fn record_request(&self, route: &str, status: u16, elapsed: Duration) {
        self.with_route(route, |handle| handle.record_request(status, elapsed));
    }

    #[cfg(test)]
    /// Counts one token cache lookup on `route`.
    pub(crate) fn record_cache(&self, route: &str, kind: CacheKind, result: CacheResult) {
        self.with_route(route, |handle| handle.record_cache(kind, result));
    }

    #[cfg(test)]
    /// Counts an upstream request on `route` that failed without a response.
    pub(crate) fn record_upstream_error(&self, route: &str, kind: UpstreamErrorKind) {
        self.with_route(route, |handle| handle.record_upstream_error(kind));
    }

    /// Counts one token request to the IdP and observes its duration. `identity` is the configured identity
    /// name. Off the hot path (a network round trip per call), so its label is built per call.
    pub(crate) fn record_idp(
        &self,
        identity: &str,
        grant: Grant,
        outcome: IdpOutcome,
        elapsed: Duration,
    ) {
        let identity: Arc<str> = Arc::from(identity);
        self.idp_requests
            .get_or_create(&IdpLabels {
                identity: Arc::clone(&identity),
                grant,
                outcome,
            })
            .inc();
        self.idp_request_duration
            .get_or_create(&IdpDurationLabels { identity, grant })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one fetch of `issuer`'s keys. `issuer` is the configured string, `{tenantid}` unfilled, so
    /// tenants never become label values.
    pub(crate) fn record_jwks(&self, issuer: &str, ok: bool) {
        let outcome = if ok {
            JwksOutcome::Ok
        } else {
            JwksOutcome::Error
        };
        self.jwks_refresh
            .get_or_create(&JwksLabels {
                issuer: Arc::from(issuer),
                outcome,
            })
            .inc();
    }

    /// Counts one config reload: applied (`ok`) or refused, the old config kept (`rejected`).
    pub(crate) fn record_reload(&self, ok: bool) {
        if ok {
            self.reload_ok.inc();
        } else {
            self.reload_rejected.inc();
        }
    }

    /// Counts one re-read of an identity's credential files: applied (`ok`) or not loadable, the last good
    /// credential kept (`rejected`).
    pub(crate) fn record_credential_reload(&self, identity: &str, ok: bool) {
        self.credential_reload
            .get_or_create(&CredentialReloadLabels {
                identity: Arc::from(identity),
                outcome: if ok {
                    ReloadOutcome::Ok
                } else {
                    ReloadOutcome::Rejected
                },
            })
            .inc();
    }

    /// Counts one shared-cache lookup.
    pub(crate) fn record_shared_cache(&self, result: SharedResult) {
        self.shared_cache[result as usize].inc();
    }

    /// Sets `obo_shared_cache_up`.
    pub(crate) fn set_shared_cache_up(&self, up: bool) {
        self.shared_cache_up.set(i64::from(up));
    }

    /// Sets `obo_token_cache_entries`; the cache owner calls it when its size changes or before an encode.
    pub(crate) fn set_cache_entries(&self, n: u64) {
        self.cache_entries.set(n);
    }

    /// Every family in `OpenMetrics` text, ending in `# EOF`; serve it with [`CONTENT_TYPE`].
    pub(crate) fn encode(&self) -> String {
        let mut text = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail, and every label value here encodes infallibly; an `Err` could only
        // come from a native-only histogram, which this module never creates.
        #[expect(clippy::expect_used, reason = "infallible, see the comment above")]
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("encoding metrics into a String");
        text
    }
}

/// One route's series, resolved once: the proxy keeps this beside its `Route` (from [`Metrics::route`]) and
/// records through it with no label built, no allocation and no map lookup: a request is an atomic load of a
/// pre-resolved counter, its increment, and a histogram observation (prometheus-client's histogram takes a
/// short per-series lock). Cheap to clone (an `Arc`).
///
/// Series appear lazily, on first use, except the duration histogram, which exists (empty) from creation so
/// every configured route is listed.
#[derive(Clone)]
pub(crate) struct RouteMetrics {
    inner: Arc<RouteInner>,
}

struct RouteInner {
    name: Arc<str>,
    families: RouteFamilies,
    duration: Histogram,
    /// Indexed by `status - 100`, for [`STATUS_TABLE`].
    statuses: Box<[OnceLock<Counter>]>,
    /// Indexed by `kind * CacheResult::COUNT + result`.
    cache: [OnceLock<Counter>; CacheKind::COUNT * CacheResult::COUNT],
    upstream_errors: [OnceLock<Counter>; UpstreamErrorKind::COUNT],
}

impl fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("route", &self.inner.name)
            .finish_non_exhaustive()
    }
}

impl RouteMetrics {
    fn new(name: Arc<str>, families: &RouteFamilies) -> Self {
        let duration = families.request_duration.get_or_create_owned(&RouteLabels {
            route: Arc::clone(&name),
        });
        Self {
            inner: Arc::new(RouteInner {
                name,
                families: families.clone(),
                duration,
                statuses: (0..STATUS_TABLE_LEN).map(|_| OnceLock::new()).collect(),
                cache: [const { OnceLock::new() }; CacheKind::COUNT * CacheResult::COUNT],
                upstream_errors: [const { OnceLock::new() }; UpstreamErrorKind::COUNT],
            }),
        }
    }

    #[cfg(test)]
    /// The route name, as in the `route` label.
    pub(crate) fn name(&self) -> &str {
        &self.inner.name
    }

    /// Counts a request answered with `status` after `elapsed`.
    pub(crate) fn record_request(&self, status: u16, elapsed: Duration) {
        let inner = &*self.inner;
        let labels = || RequestLabels {
            route: Arc::clone(&inner.name),
            status,
        };
        if STATUS_TABLE.contains(&status) {
            let slot = &inner.statuses[usize::from(status - STATUS_TABLE.start())];
            slot.get_or_init(|| inner.families.requests.get_or_create_owned(&labels()))
                .inc();
        } else {
            inner.families.requests.get_or_create(&labels()).inc();
        }
        inner.duration.observe(elapsed.as_secs_f64());
    }

    /// Counts one token cache lookup.
    pub(crate) fn record_cache(&self, kind: CacheKind, result: CacheResult) {
        let inner = &*self.inner;
        inner.cache[kind.index() * CacheResult::COUNT + result.index()]
            .get_or_init(|| {
                inner
                    .families
                    .cache_requests
                    .get_or_create_owned(&CacheLabels {
                        route: Arc::clone(&inner.name),
                        kind,
                        result,
                    })
            })
            .inc();
    }

    /// Counts an upstream request that failed without a response.
    pub(crate) fn record_upstream_error(&self, kind: UpstreamErrorKind) {
        let inner = &*self.inner;
        inner.upstream_errors[kind.index()]
            .get_or_init(|| {
                inner
                    .families
                    .upstream_errors
                    .get_or_create_owned(&UpstreamErrorLabels {
                        route: Arc::clone(&inner.name),
                        kind,
                    })
            })
            .inc();
    }
}

#[cfg(target_os = "linux")]
mod process;
pub mod trace;

/// The `OpenMetrics` parser of the unit tests below, which the integration tests' support uses too.
#[cfg(test)]
mod exposition;

#[cfg(test)]
mod tests;
