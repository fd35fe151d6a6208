//! Inbound TLS as the listener uses it: the configuration for each handshake, re-read in the background when
//! its files change ([`crate::tls::server_config`] builds it).

use std::sync::Arc;
use std::time::Duration;

use crate::config::ListenTls;
use crate::tls::{ServerTlsError, modified, server_config};

/// How often the inbound TLS files' modification times are compared.
const TLS_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// A fixed or reloading source of the listener's TLS configuration, read at each handshake.
pub(crate) trait TlsSource: Send + Sync {
    fn current(&self) -> Arc<rustls::ServerConfig>;
}

impl TlsSource for Arc<rustls::ServerConfig> {
    fn current(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(self)
    }
}

/// The inbound TLS configuration, re-read when its files change, so a renewed certificate is served without
/// a restart; a broken renewal keeps the last good one. The files are watched by a background task
/// ([`ReloadingServerConfig::watch`]): a handshake only loads the current configuration.
pub(crate) struct ReloadingServerConfig {
    tls: ListenTls,
    current: arc_swap::ArcSwap<rustls::ServerConfig>,
}

impl TlsSource for ReloadingServerConfig {
    fn current(&self) -> Arc<rustls::ServerConfig> {
        self.current.load_full()
    }
}

impl ReloadingServerConfig {
    pub(crate) fn new(tls: &ListenTls) -> Result<Self, ServerTlsError> {
        let config = server_config(&tls.cert_file, &tls.key_file, tls.client_ca_file.as_deref())?;
        Ok(ReloadingServerConfig {
            tls: tls.clone(),
            current: arc_swap::ArcSwap::from_pointee(config),
        })
    }

    fn stamps(&self) -> [Option<std::time::SystemTime>; 3] {
        [
            modified(&self.tls.cert_file),
            modified(&self.tls.key_file),
            self.tls.client_ca_file.as_deref().and_then(modified),
        ]
    }

    /// Compares the files' modification times every second and reloads them when they changed, off the
    /// runtime's worker threads. Runs until the configuration is dropped.
    pub(crate) async fn watch(this: std::sync::Weak<Self>) {
        let mut seen = match this.upgrade() {
            Some(this) => this.stamps(),
            None => return,
        };
        loop {
            tokio::time::sleep(TLS_POLL_INTERVAL).await;
            let Some(this) = this.upgrade() else { return };
            let checked = tokio::task::spawn_blocking(move || {
                let stamps = this.stamps();
                if stamps != seen {
                    let tls = &this.tls;
                    match server_config(&tls.cert_file, &tls.key_file, tls.client_ca_file.as_deref()) {
                        Ok(config) => {
                            tracing::info!("inbound TLS certificate reloaded");
                            this.current.store(Arc::new(config));
                        }
                        Err(error) => tracing::error!(error = %crate::error::chain(&error),
                            "inbound TLS files changed but do not load; keeping the previous certificate"),
                    }
                }
                stamps
            })
            .await;
            match checked {
                Ok(stamps) => seen = stamps,
                Err(_) => return,
            }
        }
    }
}
