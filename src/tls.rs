//! rustls configurations, all on aws-lc-rs: the client one shared by the IdP client and the upstream clients
//! (the system's roots, `SSL_CERT_FILE`/`SSL_CERT_DIR` honoured, read once per process, plus any extra PEM
//! roots a config names), and the listener's (certificate, key, optional client CAs).

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
pub(crate) fn read_pem_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
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

/// The system's root certificates, read once per process: every route and identity builds a client, and
/// reading the store each time cost tens of milliseconds per reload.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: std::sync::OnceLock<Vec<CertificateDer<'static>>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::debug!(%error, "skipping an unreadable system root");
        }
        native.certs
    })
}

/// A rustls client config trusting the system roots plus every certificate in `extra` PEM files.
pub(crate) fn client_config(extra: &[&Path]) -> Result<rustls::ClientConfig, TlsError> {
    // Without extra roots every client shares one configuration (its root store behind an `Arc`): the
    // parsed system roots are then held once, not once per route and identity.
    static SYSTEM_ONLY: std::sync::OnceLock<rustls::ClientConfig> = std::sync::OnceLock::new();
    if extra.is_empty() {
        if let Some(config) = SYSTEM_ONLY.get() {
            return Ok(config.clone());
        }
        let config = build_client_config(&[])?;
        return Ok(SYSTEM_ONLY.get_or_init(|| config).clone());
    }
    build_client_config(extra)
}

fn build_client_config(extra: &[&Path]) -> Result<rustls::ClientConfig, TlsError> {
    install_crypto_provider();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(system_roots().iter().cloned());
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
pub(crate) fn idp_client(
    extra_roots: &[&Path],
    timeout: Duration,
) -> Result<reqwest::Client, TlsError> {
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

/// A file's modification time (`None` when it cannot be read): what the certificate, credential and
/// configuration watchers compare.
pub(crate) fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
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
pub(crate) fn server_config(
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
