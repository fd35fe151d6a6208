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
pub mod secret;
pub mod server;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::exchange::Exchanger;
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
}

/// A running sidecar.
pub struct Sidecar {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    proxy: Arc<Proxy>,
    authenticator: Arc<Authenticator>,
    shutdown: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
}

impl Sidecar {
    /// The request path's shared state (tests read the token cache through it).
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Resolves when the sidecar is ready (every issuer's keys fetched), as `/readyz` would say.
    pub async fn ready(&self) {
        self.authenticator.ready().await;
    }

    /// Stops accepting, drains in-flight requests, stops background work.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for server in self.servers {
            let _ = server.await;
        }
        for task in self.background {
            task.abort();
        }
    }
}

/// Starts serving `config` on `listeners`; signing keys are fetched in the background.
#[allow(
    clippy::unused_async,
    reason = "start-up will await file and TLS loading; callers should not change then"
)]
pub async fn start(config: Config, listeners: Listeners) -> Result<Sidecar, StartError> {
    let proxy_addr = listeners.proxy.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    let inbound_roots: Vec<&Path> = config
        .inbound
        .ca_file
        .iter()
        .map(PathBuf::as_path)
        .collect();
    let jwks_http = tls::idp_client(&inbound_roots, config::DEFAULT_IDP_TIMEOUT)?;
    let authenticator = Arc::new(Authenticator::new(&config.inbound, &jwks_http)?);
    let background = authenticator.start();

    let exchanger = Exchanger::new(&config.identities, &config.cache)?;
    let client = forward::upstream_client(tls::client_config(&[])?);
    let proxy = Arc::new(Proxy::new(
        &config,
        Arc::clone(&authenticator),
        exchanger,
        client,
    ));

    let (shutdown, stop) = watch::channel(false);
    let proxy_handler = {
        let proxy = Arc::clone(&proxy);
        move |request, remote| {
            let proxy = Arc::clone(&proxy);
            async move { proxy.handle(request, remote).await }
        }
    };
    let admin_handler = {
        let authenticator = Arc::clone(&authenticator);
        move |request, _remote| {
            let authenticator = Arc::clone(&authenticator);
            async move { admin::handle(&request, &authenticator) }
        }
    };
    let servers = vec![
        tokio::spawn(server::serve(
            listeners.proxy,
            proxy_handler,
            stop.clone(),
            "proxy",
        )),
        tokio::spawn(server::serve(listeners.admin, admin_handler, stop, "admin")),
    ];
    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, routes = config.routes.len(), "obo-sidecar serving");
    Ok(Sidecar {
        proxy_addr,
        admin_addr,
        proxy,
        authenticator,
        shutdown,
        servers,
        background,
    })
}

/// Serves until `shutdown` completes, then drains and returns.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let sidecar = start(config, listeners).await?;
    shutdown.await;
    tracing::info!("shutting down: draining in-flight requests");
    sidecar.stop().await;
    Ok(())
}
