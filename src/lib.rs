//! obo-sidecar: a reverse proxy that swaps a caller's bearer token for an upstream token.
//!
//! For each request ([`proxy::Proxy::handle`]):
//! 1. the normalized path picks a route (longest `path_prefix` at a segment boundary) — [`forward`];
//! 2. the caller's JWT is validated against its issuer's keys — [`auth`];
//! 3. the route's policy (scopes or roles) is applied — [`auth::authorize`];
//! 4. the upstream token is taken from the cache or requested from the IdP (OBO or client credentials) —
//!    [`exchange`];
//! 5. the request is forwarded, streaming, with `Authorization` replaced — [`forward`].
//!
//! [`start`] takes the config and bound listeners, so tests run the real server in-process.

pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod demo;
pub mod dev_idp;
pub mod echo;
pub mod error;
pub mod exchange;
pub mod forward;
pub mod proxy;
pub mod route;
pub mod secret;
pub mod server;
pub mod telemetry;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::exchange::Exchanger;
use crate::exchange::cache::TokenCache;
use crate::proxy::Proxy;

/// The bound listeners the sidecar serves.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses of `[listen]`.
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        Ok(Listeners {
            proxy: TcpListener::bind(config.listen.proxy).await?,
            admin: TcpListener::bind(config.listen.admin).await?,
        })
    }
}

/// Why the sidecar could not start.
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
}

/// What outlives a reload: the current request path, swapped whole, and the state shared across them.
pub struct Shared {
    current: ArcSwap<Proxy>,
    /// Set on SIGTERM: `/readyz` answers 503 while the listener still accepts (`drain_delay`).
    draining: AtomicBool,
    /// Upstream tokens survive reloads: their keys name identity, endpoint, flavor and targets, so a
    /// changed identity simply misses.
    token_cache: Arc<TokenCache>,
    /// The IdPs' `Retry-After`s survive reloads too.
    idp_backoff: Arc<exchange::IdpBackoff>,
    config: ArcSwap<Config>,
    metrics: Arc<telemetry::Metrics>,
}

impl Shared {
    /// The request path of the current configuration.
    pub fn proxy(&self) -> Arc<Proxy> {
        self.current.load_full()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Counts a reload attempt.
    pub fn record_reload(&self, ok: bool) {
        self.metrics.record_reload(ok);
    }

    /// The Prometheus exposition of every metric (SPEC §6).
    pub async fn metrics_text(&self) -> String {
        // moka counts entries during its maintenance: run it so the gauge is exact at scrape time.
        self.metrics
            .set_cache_entries(self.token_cache.entry_count().await);
        self.metrics.encode()
    }
}

/// A running sidecar.
pub struct Sidecar {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    background: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Sidecar {
    /// The request path's current state (tests read the token cache through it).
    pub fn proxy(&self) -> Arc<Proxy> {
        self.shared.proxy()
    }

    /// Resolves when the sidecar is ready (every issuer's keys fetched), as `/readyz` would say.
    pub async fn ready(&self) {
        self.shared.proxy().authenticator().ready().await;
    }

    /// Swaps in a new configuration: routes, identities and validation change atomically; connections and
    /// in-flight requests keep the generation they started with. Listener settings (addresses, TLS files,
    /// limits) and `cache.max_entries` need a restart; a change to them is logged and ignored.
    pub fn reload(&self, mut config: Config) -> Result<(), StartError> {
        let old = self.shared.config.load_full();
        if old.listen != config.listen || old.cache.max_entries != config.cache.max_entries {
            tracing::warn!(
                "[listen] and cache.max_entries changes take effect at the next restart"
            );
        }
        // Kept as they started, all of them, so the running process matches the warning (and the next reload
        // warns again while the file still differs).
        config.listen = old.listen.clone();
        config.cache.max_entries = old.cache.max_entries;
        // The file was checked against its own [listen]; what serves is the running one (SPEC §8).
        let problems = config.listener_problems();
        if !problems.is_empty() {
            return Err(StartError::Listener(config::ConfigError { problems }));
        }
        let authenticator = {
            let current = self.shared.proxy();
            let http = idp_http(&config)?;
            let authenticator = Arc::new(current.authenticator().reload(
                &config.inbound,
                config.cache.max_entries,
                &http,
                Arc::clone(&self.shared.metrics),
            )?);
            if let Ok(mut background) = self.background.lock() {
                // The old key sets' tasks end when their last request lets go of them.
                background.retain(|task| !task.is_finished());
                background.extend(authenticator.start());
            }
            authenticator
        };
        let proxy = build_proxy(
            &config,
            authenticator,
            Arc::clone(&self.shared.token_cache),
            &self.shared.idp_backoff,
            &self.shared.metrics,
        )?;
        self.shared.current.store(Arc::new(proxy));
        self.shared.config.store(Arc::new(config));
        tracing::info!("configuration reloaded");
        Ok(())
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
        if let Ok(background) = self.background.lock() {
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

fn build_authenticator(
    config: &Config,
    metrics: &Arc<telemetry::Metrics>,
) -> Result<Arc<Authenticator>, StartError> {
    Ok(Arc::new(Authenticator::new(
        &config.inbound,
        config.cache.max_entries,
        &idp_http(config)?,
        Arc::clone(metrics),
    )?))
}

fn build_proxy(
    config: &Config,
    authenticator: Arc<Authenticator>,
    token_cache: Arc<TokenCache>,
    idp_backoff: &Arc<exchange::IdpBackoff>,
    metrics: &Arc<telemetry::Metrics>,
) -> Result<Proxy, StartError> {
    let exchanger = Exchanger::new(
        &config.identities,
        &config.cache,
        token_cache,
        idp_backoff,
        metrics,
    )?;
    let clients = forward::UpstreamClients::new(&config.routes)?;
    Ok(Proxy::new(
        config,
        authenticator,
        exchanger,
        clients,
        metrics,
    ))
}

/// Starts serving `config` on `listeners`; signing keys are fetched in the background.
#[allow(
    clippy::unused_async,
    reason = "start-up will await file and TLS loading; callers should not change then"
)]
pub async fn start(config: Config, listeners: Listeners) -> Result<Sidecar, StartError> {
    let proxy_addr = listeners.proxy.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    for warning in &config.warnings {
        tracing::warn!(%warning, "configuration");
    }
    let metrics = Arc::new(telemetry::Metrics::new());
    let authenticator = build_authenticator(&config, &metrics)?;
    let background = authenticator.start();
    let token_cache = Arc::new(TokenCache::new(config.cache.max_entries));
    let idp_backoff = Arc::new(exchange::IdpBackoff::default());
    let proxy = build_proxy(
        &config,
        authenticator,
        Arc::clone(&token_cache),
        &idp_backoff,
        &metrics,
    )?;
    let tls = config
        .listen
        .tls
        .as_ref()
        .map(|t| tls::ReloadingServerConfig::new(t).map(Arc::new))
        .transpose()?;
    let proxy_options = server::ServeOptions::proxy(&config.listen, tls);
    let admin_options = server::ServeOptions::admin(&config.listen);
    let shared = Arc::new(Shared {
        current: ArcSwap::from_pointee(proxy),
        draining: AtomicBool::new(false),
        token_cache,
        idp_backoff,
        config: ArcSwap::from_pointee(config),
        metrics,
    });

    let (shutdown, stop) = watch::channel(false);
    let proxy_handler = {
        let shared = Arc::clone(&shared);
        move |request, peer| {
            let proxy = shared.proxy();
            async move { proxy.handle(request, peer).await }
        }
    };
    let admin_handler = {
        let shared = Arc::clone(&shared);
        move |request, _peer| {
            let shared = Arc::clone(&shared);
            async move { admin::handle(&request, &shared).await }
        }
    };
    let servers = vec![
        tokio::spawn(server::serve(
            listeners.proxy,
            proxy_handler,
            stop.clone(),
            proxy_options,
        )),
        tokio::spawn(server::serve(
            listeners.admin,
            admin_handler,
            stop,
            admin_options,
        )),
    ];
    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, "obo-sidecar serving");
    Ok(Sidecar {
        proxy_addr,
        admin_addr,
        shared,
        shutdown,
        servers,
        background: std::sync::Mutex::new(background),
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
    let modified = tls::modified;
    let mut seen = modified(path);
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
                let now = modified(path);
                if now == seen {
                    continue;
                }
                seen = now;
                tracing::info!(path = %path.display(), "configuration file changed: reloading");
            }
        }
        let outcome = match Config::load(path) {
            Ok(config) => sidecar.reload(config).map_err(|e| match e {
                StartError::Listener(error) => {
                    error.problems.iter().map(ToString::to_string).collect()
                }
                other => vec![crate::auth::jwks::error_chain(&other)],
            }),
            Err(error) => Err(error.problems.iter().map(ToString::to_string).collect()),
        };
        sidecar.shared.record_reload(outcome.is_ok());
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
