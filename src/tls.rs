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
