//! TLS client configuration, shared by the IdP client and the upstream client: rustls on aws-lc-rs,
//! the system's roots (`SSL_CERT_FILE`/`SSL_CERT_DIR` honoured) plus any extra PEM roots a config names.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Why a TLS client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read PEM certificates from {path}")]
    Pem {
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    Empty { path: String },
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("TLS configuration")]
    Rustls(#[source] rustls::Error),
}

/// Installs aws-lc-rs as the process's one rustls crypto provider. Idempotent.
pub fn install_crypto_provider() {
    // Fails only when a provider is already installed, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Every certificate of a PEM file; at least one.
pub fn read_pem_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|source| TlsError::Pem {
            path: path.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

/// A rustls client config trusting the system roots plus every certificate in `extra` PEM files.
pub fn client_config(extra: &[&Path]) -> Result<rustls::ClientConfig, TlsError> {
    install_crypto_provider();
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "skipping an unreadable system root");
    }
    roots.add_parsable_certificates(native.certs);
    for path in extra {
        roots.add_parsable_certificates(read_pem_certificates(path)?);
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// The HTTP client for IdP endpoints (discovery, JWKS, token): follows no redirects, no proxies from the
/// environment, bounded by `timeout`.
pub fn idp_client(extra_roots: &[&Path], timeout: Duration) -> Result<reqwest::Client, TlsError> {
    let tls = client_config(extra_roots)?;
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .user_agent(concat!("obo-sidecar/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(TlsError::Client)
}

/// Why the inbound TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    #[error("cannot read the certificate chain")]
    Certificates(#[source] TlsError),
    #[error("cannot read the private key {path}")]
    Key {
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("cannot read the client CA file")]
    ClientCa(#[source] TlsError),
    #[error("client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("certificate and key")]
    Rustls(#[source] rustls::Error),
}

/// The inbound TLS configuration: the certificate chain and key (PEM), ALPN `h2` then `http/1.1`, and —
/// with `client_ca` — a required client certificate issued by one of those CAs (mTLS).
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca: Option<&Path>,
) -> Result<rustls::ServerConfig, ServerTlsError> {
    install_crypto_provider();
    let chain = read_pem_certificates(cert_file).map_err(ServerTlsError::Certificates)?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key_file).map_err(|source| {
        ServerTlsError::Key {
            path: key_file.display().to_string(),
            source,
        }
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(ServerTlsError::Rustls)?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(
                read_pem_certificates(path).map_err(ServerTlsError::ClientCa)?,
            );
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(ServerTlsError::Verifier)?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(ServerTlsError::Rustls)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The inbound TLS configuration, re-read when its files change (checked at most once a second, on accept),
/// so a renewed certificate is served without a restart. A broken renewal keeps the last good one.
pub struct ReloadingServerConfig {
    files: (
        std::path::PathBuf,
        std::path::PathBuf,
        Option<std::path::PathBuf>,
    ),
    current: arc_swap::ArcSwap<rustls::ServerConfig>,
    seen: std::sync::Mutex<(std::time::Instant, Vec<Option<std::time::SystemTime>>)>,
}

impl ReloadingServerConfig {
    pub fn new(tls: &crate::config::ListenTls) -> Result<Self, ServerTlsError> {
        let config = server_config(&tls.cert_file, &tls.key_file, tls.client_ca_file.as_deref())?;
        let files = (
            tls.cert_file.clone(),
            tls.key_file.clone(),
            tls.client_ca_file.clone(),
        );
        let stamps = Self::stamps(&files);
        Ok(ReloadingServerConfig {
            files,
            current: arc_swap::ArcSwap::from_pointee(config),
            seen: std::sync::Mutex::new((std::time::Instant::now(), stamps)),
        })
    }

    fn stamps(
        files: &(
            std::path::PathBuf,
            std::path::PathBuf,
            Option<std::path::PathBuf>,
        ),
    ) -> Vec<Option<std::time::SystemTime>> {
        [Some(&files.0), Some(&files.1), files.2.as_ref()]
            .into_iter()
            .map(|path| path.and_then(|p| modified(p)))
            .collect()
    }

    /// The configuration to use for the next handshake. At most once a second (and never while another
    /// handshake is checking) it compares the files' modification times, and reloads them when they changed.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        if let Ok(mut seen) = self.seen.try_lock()
            && seen.0.elapsed() >= Duration::from_secs(1)
        {
            seen.0 = std::time::Instant::now();
            let stamps = Self::stamps(&self.files);
            if stamps != seen.1 {
                seen.1 = stamps;
                match server_config(&self.files.0, &self.files.1, self.files.2.as_deref()) {
                    Ok(config) => {
                        tracing::info!("inbound TLS certificate reloaded");
                        self.current.store(Arc::new(config));
                    }
                    Err(error) => tracing::error!(error = %crate::auth::jwks::error_chain(&error),
                        "inbound TLS files changed but do not load; keeping the previous certificate"),
                }
            }
        }
        self.current.load_full()
    }
}

/// A file's modification time (`None` when it cannot be read): what the certificate and configuration
/// watchers compare.
pub(crate) fn modified(path: &std::path::Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}
