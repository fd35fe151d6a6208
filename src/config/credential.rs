//! Client credentials as loaded from their files and variables: a secret, a certificate and its key, the
//! path of an assertion file, or a managed identity. Loading is here, and only here; using them is
//! `exchange`'s. Secret files and certificate/key pairs are watched: each token request looks at their
//! modification times, and a changed file that loads replaces the credential (a rotated Kubernetes Secret
//! is used at once), while one that does not keeps the last good credential.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use url::Url;

use crate::secret::Secret;

/// A credential file changed less than this long ago is read only after it has stood still this long.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(50);
/// Assertion and token files are small; a larger one is not a token.
const MAX_ASSERTION_FILE_BYTES: u64 = 64 * 1024;

/// How the client authenticates (`auth_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ClientSecretPost,
    ClientSecretBasic,
    PrivateKeyJwt,
    ClientAssertionFile,
    /// A managed identity's token for the token-exchange audience, as a client assertion (Entra's federated
    /// identity credential), or, for `flavor = "managed_identity"`, the managed identity's own token.
    ManagedIdentity,
}

impl AuthMethod {
    pub(crate) fn parse(name: &str) -> Option<AuthMethod> {
        Some(match name {
            "client_secret_post" => AuthMethod::ClientSecretPost,
            "client_secret_basic" => AuthMethod::ClientSecretBasic,
            "private_key_jwt" => AuthMethod::PrivateKeyJwt,
            "client_assertion_file" => AuthMethod::ClientAssertionFile,
            "managed_identity" => AuthMethod::ManagedIdentity,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ClientSecretPost => "client_secret_post",
            AuthMethod::ClientSecretBasic => "client_secret_basic",
            AuthMethod::PrivateKeyJwt => "private_key_jwt",
            AuthMethod::ClientAssertionFile => "client_assertion_file",
            AuthMethod::ManagedIdentity => "managed_identity",
        }
    }
}

/// The credential an identity authenticates with.
#[derive(Clone)]
pub enum Credential {
    /// A client secret, from a variable (fixed) or a file (watched).
    Secret(Arc<Watched<Secret>>),
    /// A certificate and its key (watched).
    Certificate(Arc<Watched<CertificateKey>>),
    /// A file holding a client assertion (a projected service-account token), read on every token request.
    AssertionFile(Arc<AssertionFile>),
    /// A managed identity whose tokens are the client assertions, or (`flavor = "managed_identity"`) the
    /// upstream tokens.
    ManagedIdentity(ManagedIdentity),
}

impl Credential {
    /// What the credential is, for `check` and logs.
    pub fn kind(&self) -> String {
        match self {
            Credential::Secret(watched) => match watched.files.first() {
                Some(file) => format!("client secret from {}", file.display()),
                None => "client secret from the environment".to_owned(),
            },
            Credential::Certificate(watched) => format!(
                "certificate {} (x5t#S256 {})",
                watched
                    .files
                    .first()
                    .map_or_else(String::new, |f| f.display().to_string()),
                watched.get().x5t_s256
            ),
            Credential::AssertionFile(file) => {
                format!("client assertion file {}", file.path.display())
            }
            Credential::ManagedIdentity(identity) => identity.describe(),
        }
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Secret(_) => f.write_str("Secret([redacted])"),
            Credential::Certificate(c) => write!(f, "Certificate(x5t#S256={})", c.get().x5t_s256),
            Credential::AssertionFile(a) => write!(f, "AssertionFile({})", a.path.display()),
            Credential::ManagedIdentity(m) => write!(f, "ManagedIdentity({})", m.describe()),
        }
    }
}

/// A managed identity, and where its tokens come from.
#[derive(Clone)]
pub struct ManagedIdentity {
    /// A user-assigned identity's client id; `None`: the system-assigned identity.
    pub client_id: Option<String>,
    pub endpoint: ManagedIdentityEndpoint,
}

/// The local endpoint that hands out a managed identity's tokens.
#[derive(Clone)]
pub enum ManagedIdentityEndpoint {
    /// The instance metadata service of VMs, scale sets and AKS nodes: `GET …?api-version=2018-02-01` with
    /// `Metadata: true`.
    Imds { url: Url },
    /// App Service, Container Apps and Functions (`IDENTITY_ENDPOINT`, `IDENTITY_HEADER`):
    /// `GET …?api-version=2019-08-01` with `X-IDENTITY-HEADER`.
    AppService { url: Url, header: Secret },
}

impl ManagedIdentity {
    fn describe(&self) -> String {
        let who = self.client_id.as_deref().map_or_else(
            || "system-assigned managed identity".to_owned(),
            |id| format!("user-assigned managed identity {id}"),
        );
        match &self.endpoint {
            ManagedIdentityEndpoint::Imds { url } => format!("{who} via IMDS ({url})"),
            ManagedIdentityEndpoint::AppService { url, .. } => {
                format!("{who} via IDENTITY_ENDPOINT ({url})")
            }
        }
    }
}

/// A credential read from files and re-read when they change; or a fixed one (no files).
pub struct Watched<T> {
    current: ArcSwap<T>,
    files: Vec<PathBuf>,
    /// The modification times and sizes the current value was read at.
    seen: Mutex<Stamps>,
    /// Those of the last files that failed to load: logged once, not once per request.
    failed: Mutex<Option<Stamps>>,
    load: fn(&[PathBuf]) -> Result<T, CredentialError>,
}

/// What a look at a watched credential's files found.
pub enum Refresh {
    Unchanged,
    Reloaded,
    /// The files changed but do not load; the last good credential stays. Reported once per change.
    Rejected(CredentialError),
}

impl<T: Send + Sync + 'static> Watched<T> {
    /// A credential that never changes.
    pub fn fixed(value: T) -> Watched<T> {
        Watched {
            current: ArcSwap::from_pointee(value),
            files: Vec::new(),
            seen: Mutex::new(Vec::new()),
            failed: Mutex::new(None),
            // Never called: `refresh` looks only at credentials with files.
            load: |_| Err(CredentialError::NoFiles),
        }
    }

    /// A credential loaded from `files` by `load`, and re-loaded when they change.
    pub fn from_files(
        files: Vec<PathBuf>,
        load: fn(&[PathBuf]) -> Result<T, CredentialError>,
    ) -> Result<Watched<T>, CredentialError> {
        let stamps = stamps(&files);
        let value = load(&files)?;
        Ok(Watched {
            current: ArcSwap::from_pointee(value),
            files,
            seen: Mutex::new(stamps),
            failed: Mutex::new(None),
            load,
        })
    }

    /// The current credential.
    pub fn get(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// Looks at the files (off the runtime's worker threads) and reloads them if they changed.
    pub(crate) async fn refresh(self: &Arc<Self>) -> Refresh {
        if self.files.is_empty() {
            return Refresh::Unchanged;
        }
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || this.refresh_blocking())
            .await
            .unwrap_or(Refresh::Unchanged)
    }

    fn refresh_blocking(&self) -> Refresh {
        let now = stamps(&self.files);
        let Ok(mut seen) = self.seen.lock() else {
            return Refresh::Unchanged;
        };
        if *seen == now {
            return Refresh::Unchanged;
        }
        // The same broken files as last time: not loaded again (a certificate's load signs a probe).
        if self
            .failed
            .lock()
            .is_ok_and(|failed| failed.as_ref() == Some(&now))
        {
            return Refresh::Unchanged;
        }
        // A file written moments ago may still be being written (`echo new > secret` is not atomic): it is
        // read once it has stood still for a moment. This runs on a blocking thread.
        let fresh = now.iter().flatten().any(|stamp| {
            stamp
                .modified
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age < SETTLE)
        });
        if fresh {
            std::thread::sleep(SETTLE);
            if stamps(&self.files) != now {
                return Refresh::Unchanged;
            }
        }
        match (self.load)(&self.files) {
            Ok(value) => {
                self.current.store(Arc::new(value));
                *seen = now;
                if let Ok(mut failed) = self.failed.lock() {
                    *failed = None;
                }
                Refresh::Reloaded
            }
            Err(error) => match self.failed.lock() {
                Ok(mut failed) if failed.as_ref() != Some(&now) => {
                    *failed = Some(now);
                    Refresh::Rejected(error)
                }
                _ => Refresh::Unchanged,
            },
        }
    }
}

/// What identifies one version of a file: its inode, size, modification and change times (a copy that keeps
/// the modification time still changes the inode or the change time). `None`: unreadable.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    size: u64,
    modified: Option<SystemTime>,
    changed: (i64, i64),
}

type Stamps = Vec<Option<Stamp>>;

fn stamps(files: &[PathBuf]) -> Stamps {
    use std::os::unix::fs::MetadataExt as _;
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f).ok().map(|m| Stamp {
                inode: m.ino(),
                size: m.len(),
                modified: m.modified().ok(),
                changed: (m.ctime(), m.ctime_nsec()),
            })
        })
        .collect()
}

/// A secret file's value: its trimmed text, which must not be empty.
pub(crate) fn load_secret_file(files: &[PathBuf]) -> Result<Secret, CredentialError> {
    let path = files.first().map_or_else(PathBuf::new, Clone::clone);
    let text = std::fs::read_to_string(&path).map_err(|source| CredentialError::SecretFile {
        path: path.clone(),
        source,
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Err(CredentialError::SecretEmpty { path });
    }
    Ok(Secret::new(text))
}

/// A certificate file and a key file (the same file when it holds both).
pub(crate) fn load_certificate(files: &[PathBuf]) -> Result<CertificateKey, CredentialError> {
    match files {
        [cert, key] => CertificateKey::load(cert, key),
        [both] => CertificateKey::load(both, both),
        _ => Err(CredentialError::NoFiles),
    }
}

/// A client certificate and its RSA private key, loaded once.
pub struct CertificateKey {
    pub(crate) key: aws_lc_rs::rsa::KeyPair,
    /// base64url(SHA-256(certificate DER)), the assertion header's `x5t#S256` (RFC 7515 §4.1.8).
    pub x5t_s256: String,
}

/// Why a credential could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read the secret file {}", path.display())]
    SecretFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the secret file {} is empty", path.display())]
    SecretEmpty { path: PathBuf },
    #[error("cannot read certificate {}", path.display())]
    Certificate {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{} holds no CERTIFICATE block", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} is not a parsable X.509 certificate", path.display())]
    X509 {
        path: PathBuf,
        #[source]
        source: webpki::Error,
    },
    #[error("cannot read private key {}", path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{} is not an RSA key (PKCS#8 or PKCS#1 PEM expected)", path.display())]
    NotRsa { path: PathBuf },
    #[error("{} is not a usable RSA key", path.display())]
    KeyRejected {
        path: PathBuf,
        #[source]
        source: aws_lc_rs::error::KeyRejected,
    },
    #[error("the certificate's public key does not match the private key")]
    Mismatch,
    #[error("the credential has no files to load")]
    NoFiles,
    #[error("cannot read the client assertion file {}", path.display())]
    AssertionFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the client assertion file {} is larger than 64 KiB", path.display())]
    AssertionTooLarge { path: PathBuf },
    #[error("the client assertion file {} is empty", path.display())]
    AssertionEmpty { path: PathBuf },
    #[error("the client assertion file {} does not hold a JWT with an exp", path.display())]
    AssertionNotJwt { path: PathBuf },
}

impl CertificateKey {
    /// Loads a PEM certificate (the first one in the file) and its PEM private key (PKCS#8 or PKCS#1 RSA),
    /// and checks that they belong together.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<CertificateKey, CredentialError> {
        let cert_error = |source| CredentialError::Certificate {
            path: cert_file.to_owned(),
            source,
        };
        let cert = CertificateDer::pem_file_iter(cert_file)
            .map_err(cert_error)?
            .next()
            .ok_or_else(|| CredentialError::NoCertificate {
                path: cert_file.to_owned(),
            })?
            .map_err(cert_error)?;
        let key_error = |source| CredentialError::KeyRejected {
            path: key_file.to_owned(),
            source,
        };
        let key = match PrivateKeyDer::from_pem_file(key_file).map_err(|source| {
            CredentialError::Key {
                path: key_file.to_owned(),
                source,
            }
        })? {
            PrivateKeyDer::Pkcs8(der) => {
                aws_lc_rs::rsa::KeyPair::from_pkcs8(der.secret_pkcs8_der()).map_err(key_error)?
            }
            PrivateKeyDer::Pkcs1(der) => {
                aws_lc_rs::rsa::KeyPair::from_der(der.secret_pkcs1_der()).map_err(key_error)?
            }
            _ => {
                return Err(CredentialError::NotRsa {
                    path: key_file.to_owned(),
                });
            }
        };
        check_pair(cert_file, &cert, &key)?;
        let digest = crate::digest::sha256(cert.as_ref());
        Ok(CertificateKey {
            key,
            x5t_s256: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest),
        })
    }
}

/// Signs a probe with the key and verifies it with the certificate's public key.
fn check_pair(
    cert_file: &Path,
    cert: &CertificateDer<'_>,
    key: &aws_lc_rs::rsa::KeyPair,
) -> Result<(), CredentialError> {
    let end_entity =
        webpki::EndEntityCert::try_from(cert).map_err(|source| CredentialError::X509 {
            path: cert_file.to_owned(),
            source,
        })?;
    let probe = b"obo-sidecar certificate/key probe";
    let mut signature = vec![0u8; key.public_modulus_len()];
    key.sign(
        &aws_lc_rs::signature::RSA_PKCS1_SHA256,
        &aws_lc_rs::rand::SystemRandom::new(),
        probe,
        &mut signature,
    )
    .map_err(|_| CredentialError::Mismatch)?;
    end_entity
        .verify_signature(
            webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA256,
            probe,
            &signature,
        )
        .map_err(|_| CredentialError::Mismatch)?;
    Ok(())
}

/// A client assertion file (a projected service-account token). Read on every token request: the kubelet
/// rotates it by swapping a `..data` symlink, which a watch on the file itself would miss. A read that fails
/// (a half-written, missing or non-JWT file) falls back to the last good assertion while that has not
/// expired, and is reported once.
pub struct AssertionFile {
    pub path: PathBuf,
    /// The last assertion read, and its `exp`.
    last_good: Mutex<Option<(Secret, u64)>>,
    /// Set while reads fail, so the failure is reported once.
    failing: std::sync::atomic::AtomicBool,
}

impl AssertionFile {
    pub(crate) fn new(path: PathBuf) -> AssertionFile {
        AssertionFile {
            path,
            last_good: Mutex::new(None),
            failing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The current assertion, with the failure to report when this read fell back to the last good one
    /// (`Refresh::Rejected`, once per run of failures) or found a new assertion after failures
    /// (`Refresh::Reloaded`).
    pub(crate) async fn read(&self) -> Result<(Secret, Refresh), CredentialError> {
        use std::sync::atomic::Ordering;
        match self.read_file().await {
            Ok((assertion, exp)) => {
                if let Ok(mut last) = self.last_good.lock() {
                    *last = Some((assertion.clone(), exp));
                }
                let recovered = self.failing.swap(false, Ordering::Relaxed);
                Ok((
                    assertion,
                    if recovered {
                        Refresh::Reloaded
                    } else {
                        Refresh::Unchanged
                    },
                ))
            }
            Err(error) => {
                // An assertion about to expire would be refused: it is kept while a minute is left.
                let now = crate::oauth::now_unix();
                let kept = self
                    .last_good
                    .lock()
                    .ok()
                    .and_then(|last| last.clone())
                    .filter(|(_, exp)| *exp > now.saturating_add(60));
                let first = !self.failing.swap(true, Ordering::Relaxed);
                match kept {
                    Some((assertion, _)) if first => Ok((assertion, Refresh::Rejected(error))),
                    Some((assertion, _)) => Ok((assertion, Refresh::Unchanged)),
                    None => Err(error),
                }
            }
        }
    }

    async fn read_file(&self) -> Result<(Secret, u64), CredentialError> {
        let path = &self.path;
        let error = |source| CredentialError::AssertionFile {
            path: path.clone(),
            source,
        };
        let metadata = tokio::fs::metadata(path).await.map_err(error)?;
        if metadata.len() > MAX_ASSERTION_FILE_BYTES {
            return Err(CredentialError::AssertionTooLarge { path: path.clone() });
        }
        let text = tokio::fs::read_to_string(path).await.map_err(error)?;
        let text = text.trim();
        if text.is_empty() {
            return Err(CredentialError::AssertionEmpty { path: path.clone() });
        }
        let exp = crate::jwt::unverified_claims(text)
            .and_then(|claims| claims.get("exp").and_then(serde_json::Value::as_u64))
            .ok_or_else(|| CredentialError::AssertionNotJwt { path: path.clone() })?;
        Ok((Secret::new(text), exp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_and_key_load_and_a_mismatch_is_refused() {
        let dir = std::env::temp_dir().join(format!("obo-credential-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let make = |name: &str| {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("key");
            let cert = rcgen::CertificateParams::new(vec!["client".to_owned()])
                .expect("params")
                .self_signed(&key)
                .expect("cert");
            let cert_path = dir.join(format!("{name}.crt"));
            let key_path = dir.join(format!("{name}.key"));
            std::fs::write(&cert_path, cert.pem()).expect("write");
            std::fs::write(&key_path, key.serialize_pem()).expect("write");
            (cert_path, key_path)
        };
        let (cert_a, key_a) = make("a");
        let (_, key_b) = make("b");
        let loaded = CertificateKey::load(&cert_a, &key_a).expect("load");
        assert_eq!(loaded.x5t_s256.len(), 43);
        assert!(matches!(
            CertificateKey::load(&cert_a, &key_b),
            Err(CredentialError::Mismatch)
        ));
        assert!(matches!(
            CertificateKey::load(&dir.join("missing.crt"), &key_a),
            Err(CredentialError::Certificate { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
