//! A running sidecar and its configuration generations: [`start`] builds the first generation (validation,
//! token acquisition, the routing table) and serves it; a reload builds the next one and swaps it in
//! atomically, keeping what outlives generations (the token cache, the IdPs' back-offs, metrics, and the
//! key sets that did not change); [`Sidecar::stop`] drains.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::Authenticator;
use crate::config::{self, Config};
use crate::exchange::cache::TokenCache;
use crate::exchange::{Exchanger, IdpBackoff, SharedCache, SharedCacheError};
use crate::proxy::Proxy;
use crate::server::{self, ServeOptions};
use crate::{admin, telemetry, tls};

/// The bound listeners the sidecar serves.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses of `[listen]`; the proxy's so that each worker binds a socket of its own beside
    /// it (`SO_REUSEPORT`).
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        Ok(Listeners {
            proxy: server::bind_proxy(config.listen.proxy)?,
            admin: TcpListener::bind(config.listen.admin).await?,
        })
    }
}

/// Why the sidecar could not start, or a configuration could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("TLS client setup")]
    Tls(#[from] tls::TlsError),
    #[error("issuer URL")]
    Issuer(#[from] url::ParseError),
    #[error("listener address")]
    Io(#[from] std::io::Error),
    #[error("inbound TLS")]
    ServerTls(#[from] tls::ServerTlsError),
    #[error("the configuration does not fit the running listener")]
    Listener(#[source] config::ConfigError),
    #[error("the reload was interrupted")]
    Interrupted,
    #[error("shared cache")]
    SharedCache(#[from] SharedCacheError),
    #[error("{0}")]
    Workers(String),
}

/// What outlives a reload: the current request path, swapped whole, and the state shared across them.
struct Shared {
    current: ArcSwap<Proxy>,
    /// Set on SIGTERM: `/readyz` answers 503 while the listener still accepts (`drain_delay`).
    draining: AtomicBool,
    /// Upstream tokens survive reloads: their keys name identity, endpoint, flavor and targets, so a
    /// changed identity simply misses.
    token_cache: Arc<TokenCache>,
    /// The fleet's cache (`[cache.shared]`), set up at start; its settings need a restart.
    fleet_cache: Option<Arc<SharedCache>>,
    /// The IdPs' `Retry-After`s survive reloads too.
    idp_backoff: Arc<IdpBackoff>,
    /// The proxy listener's workers (each generation builds an upstream client per worker).
    workers: usize,
    config: ArcSwap<Config>,
    metrics: Arc<telemetry::Metrics>,
    /// Key-set maintenance of every generation; a task ends when its key set is no longer used.
    background: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl admin::Readiness for Shared {
    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    fn issuers_without_keys(&self) -> Vec<String> {
        self.current.load().authenticator().issuers_without_keys()
    }

    fn metrics_text(&self) -> BoxFuture<'_, String> {
        Box::pin(async move {
            // moka counts entries during its maintenance: run it so the gauge is exact at scrape time.
            self.metrics
                .set_cache_entries(self.token_cache.entry_count().await);
            self.metrics.encode()
        })
    }
}

impl Shared {
    /// Builds the next generation from `config` and swaps it in. Listener settings and `cache.max_entries`
    /// stay as they started (a change is logged); the new routes are checked against the running
    /// listener. Blocking (it reads certificate stores): call it off the runtime's worker threads.
    fn reload(&self, mut config: Config) -> Result<(), StartError> {
        let old = self.config.load_full();
        if old.listen != config.listen
            || old.cache.max_entries != config.cache.max_entries
            || old.cache.shared != config.cache.shared
        {
            tracing::warn!(
                "[listen], cache.max_entries and [cache.shared] changes take effect at the next restart"
            );
        }
        // Kept as they started, all of them, so the running process matches the warning (and the next reload
        // warns again while the file still differs).
        config.listen = old.listen.clone();
        config.cache.max_entries = old.cache.max_entries;
        config.cache.shared.clone_from(&old.cache.shared);
        // The file was checked against its own [listen]; what serves is the running one (SPEC §8).
        let problems = config.listener_problems();
        if !problems.is_empty() {
            return Err(StartError::Listener(config::ConfigError { problems }));
        }
        let authenticator = Arc::new(self.current.load().authenticator().reload(
            &config.inbound,
            config.cache.max_entries,
            &idp_http(&config)?,
            Arc::clone(&self.metrics),
        )?);
        let proxy = build_proxy(
            &config,
            Arc::clone(&authenticator),
            Arc::clone(&self.token_cache),
            self.fleet_cache.clone(),
            &self.idp_backoff,
            &self.metrics,
            self.workers,
        )?;
        if let Ok(mut background) = self.background.lock() {
            // The old key sets' tasks end when their last request lets go of them.
            background.retain(|task| !task.is_finished());
            background.extend(authenticator.start());
        }
        self.current.store(Arc::new(proxy));
        self.config.store(Arc::new(config));
        tracing::info!("configuration reloaded");
        Ok(())
    }
}

/// A running sidecar.
pub struct Sidecar {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
}

impl Sidecar {
    /// Resolves when the sidecar is ready (every issuer's keys fetched), as `/readyz` would say.
    pub async fn ready(&self) {
        let authenticator = Arc::clone(self.shared.current.load().authenticator());
        authenticator.ready().await;
    }

    /// Swaps in a new configuration: routes, identities and validation change atomically; connections and
    /// in-flight requests keep the generation they started with. Listener settings (addresses, TLS files,
    /// limits) and `cache.max_entries` need a restart; a change to them is logged and ignored. The new
    /// routes are checked against the running listener, and a configuration that fails that is rejected.
    pub async fn reload(&self, config: Config) -> Result<(), StartError> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || shared.reload(config))
            .await
            .map_err(|_| StartError::Interrupted)?
    }

    /// Drains and stops: `/readyz` turns 503 and the listeners keep accepting for `drain_delay` (while
    /// Kubernetes withdraws the endpoint), then stop accepting and give in-flight requests up to
    /// `drain_timeout`; background work stops.
    pub async fn stop(self) {
        self.shared.draining.store(true, Ordering::Release);
        let delay = self.shared.config.load().listen.drain_delay;
        if !delay.is_zero() {
            tracing::info!(?delay, "draining: not ready, still accepting");
            tokio::time::sleep(delay).await;
        }
        let _ = self.shutdown.send(true);
        for server in self.servers {
            let _ = server.await;
        }
        if let Ok(background) = self.shared.background.lock() {
            for task in background.iter() {
                task.abort();
            }
        }
    }
}

/// The HTTP client for discovery and JWKS fetches.
fn idp_http(config: &Config) -> Result<reqwest::Client, StartError> {
    let roots: Vec<&Path> = config
        .inbound
        .ca_file
        .iter()
        .map(PathBuf::as_path)
        .collect();
    Ok(tls::idp_client(&roots, config::DEFAULT_IDP_TIMEOUT)?)
}

fn build_proxy(
    config: &Config,
    authenticator: Arc<Authenticator>,
    token_cache: Arc<TokenCache>,
    shared_cache: Option<Arc<SharedCache>>,
    idp_backoff: &Arc<IdpBackoff>,
    metrics: &Arc<telemetry::Metrics>,
    workers: usize,
) -> Result<Proxy, StartError> {
    let exchanger = Exchanger::new(
        &config.identities,
        &config.cache,
        token_cache,
        shared_cache,
        idp_backoff,
        metrics,
    )?;
    Ok(Proxy::new(
        config,
        authenticator,
        exchanger,
        metrics,
        workers,
    )?)
}

/// Starts serving `config` on `listeners`; signing keys are fetched in the background.
pub async fn start(config: Config, listeners: Listeners) -> Result<Sidecar, StartError> {
    let proxy_addr = listeners.proxy.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    for warning in &config.warnings {
        tracing::warn!(%warning, "configuration");
    }
    let workers = server::worker_count().map_err(StartError::Workers)?;
    // The first generation reads certificate stores and key files: off the runtime's worker threads.
    let built = tokio::task::spawn_blocking(move || {
        let metrics = Arc::new(telemetry::Metrics::new());
        let authenticator = Arc::new(Authenticator::new(
            &config.inbound,
            config.cache.max_entries,
            &idp_http(&config)?,
            Arc::clone(&metrics),
        )?);
        let token_cache = Arc::new(TokenCache::new(config.cache.max_entries));
        let shared_cache = config
            .cache
            .shared
            .as_ref()
            .map(|settings| SharedCache::new(settings, &metrics))
            .transpose()?;
        let idp_backoff = Arc::new(IdpBackoff::default());
        let proxy = build_proxy(
            &config,
            Arc::clone(&authenticator),
            Arc::clone(&token_cache),
            shared_cache.clone(),
            &idp_backoff,
            &metrics,
            workers,
        )?;
        let tls = config
            .listen
            .tls
            .as_ref()
            .map(|t| server::tls::ReloadingServerConfig::new(t).map(Arc::new))
            .transpose()?;
        Ok::<_, StartError>((
            authenticator,
            Shared {
                current: ArcSwap::from_pointee(proxy),
                draining: AtomicBool::new(false),
                token_cache,
                fleet_cache: shared_cache,
                idp_backoff,
                workers,
                metrics,
                background: std::sync::Mutex::new(Vec::new()),
                config: ArcSwap::from_pointee(config),
            },
            tls,
        ))
    })
    .await
    .map_err(|_| StartError::Interrupted)?;
    let (authenticator, shared, tls) = built?;
    let mut background = authenticator.start();
    let listen = shared.config.load().listen.clone();
    let proxy_options = ServeOptions::proxy(
        &listen,
        tls.as_ref().map(|tls| {
            background.push(tokio::spawn(server::tls::ReloadingServerConfig::watch(
                Arc::downgrade(tls),
            )));
            Arc::clone(tls) as Arc<dyn server::tls::TlsSource>
        }),
    );
    let admin_options = ServeOptions::admin(&listen);
    if let Ok(mut tasks) = shared.background.lock() {
        tasks.extend(background);
    }
    let shared = Arc::new(shared);

    let (shutdown, stop) = watch::channel(false);
    let proxy_handler = {
        let shared = Arc::clone(&shared);
        move |request, peer| {
            let proxy = shared.current.load_full();
            async move { Ok::<_, std::convert::Infallible>(proxy.handle(request, peer).await) }
        }
    };
    let admin_handler = {
        let shared = Arc::clone(&shared);
        move |request, _peer| {
            let shared = Arc::clone(&shared);
            async move {
                Ok::<_, std::convert::Infallible>(admin::handle(&request, shared.as_ref()).await)
            }
        }
    };
    let proxy_workers = server::serve_workers(
        listeners.proxy,
        workers,
        &proxy_handler,
        &stop,
        &proxy_options,
    )?;
    let servers = vec![
        tokio::spawn(proxy_workers),
        tokio::spawn(server::serve(
            listeners.admin,
            admin_handler,
            stop,
            admin_options,
        )),
    ];
    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, workers, "obo-sidecar serving");
    Ok(Sidecar {
        proxy_addr,
        admin_addr,
        shared,
        shutdown,
        servers,
    })
}

/// Serves until `shutdown` completes, then drains and returns.
/// With `config_path`, the file is watched and reloaded meanwhile ([`watch_config`]).
pub async fn run(
    config: Config,
    listeners: Listeners,
    config_path: Option<&Path>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let sidecar = start(config, listeners).await?;
    match config_path {
        Some(path) => tokio::select! {
            () = shutdown => {}
            () = watch_config(&sidecar, path) => {}
        },
        None => shutdown.await,
    }
    tracing::info!("shutting down: draining in-flight requests");
    sidecar.stop().await;
    Ok(())
}

/// How often the configuration file's modification time is checked for a reload.
pub const CONFIG_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Reloads `sidecar` from `path` on SIGHUP and whenever the file changes (its modification time, which a
/// Kubernetes `ConfigMap` update also changes through its `..data` symlink). A configuration with problems is
/// rejected whole: every problem is logged and the running one stays. Runs until dropped.
pub async fn watch_config(sidecar: &Sidecar, path: &Path) {
    let mut seen = tls::modified(path);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(CONFIG_POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let signalled = async {
            match hangup.as_mut() {
                Some(signal) => signal.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = signalled => tracing::info!("SIGHUP: reloading the configuration"),
            _ = tick.tick() => {
                let now = tls::modified(path);
                if now == seen {
                    continue;
                }
                seen = now;
                tracing::info!(path = %path.display(), "configuration file changed: reloading");
            }
        }
        let owned = path.to_owned();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&owned)).await;
        let outcome = match loaded {
            Ok(Ok(config)) => sidecar.reload(config).await.map_err(|e| match e {
                StartError::Listener(error) => {
                    error.problems.iter().map(ToString::to_string).collect()
                }
                other => vec![crate::error::chain(&other)],
            }),
            Ok(Err(error)) => Err(error.problems.iter().map(ToString::to_string).collect()),
            Err(_) => Err(vec!["the reload was interrupted".to_owned()]),
        };
        sidecar.shared.metrics.record_reload(outcome.is_ok());
        if let Err(problems) = outcome {
            for problem in &problems {
                tracing::error!(%problem, "configuration rejected");
            }
            tracing::error!(
                count = problems.len(),
                "reload rejected; the running configuration stays"
            );
        }
    }
}
