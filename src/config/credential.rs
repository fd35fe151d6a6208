//! Client credentials as loaded from their files and variables: a secret, a certificate and its key, or the
//! path of an assertion file. Loading is here, and only here; using them is `exchange::client_auth`'s.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::secret::Secret;

/// Assertion and token files are small; a larger one is not a token.
const MAX_ASSERTION_FILE_BYTES: u64 = 64 * 1024;

/// How the client authenticates (`auth_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ClientSecretPost,
    ClientSecretBasic,
    PrivateKeyJwt,
    ClientAssertionFile,
}

impl AuthMethod {
    pub(crate) fn parse(name: &str) -> Option<AuthMethod> {
        Some(match name {
            "client_secret_post" => AuthMethod::ClientSecretPost,
            "client_secret_basic" => AuthMethod::ClientSecretBasic,
            "private_key_jwt" => AuthMethod::PrivateKeyJwt,
            "client_assertion_file" => AuthMethod::ClientAssertionFile,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::ClientSecretPost => "client_secret_post",
            AuthMethod::ClientSecretBasic => "client_secret_basic",
            AuthMethod::PrivateKeyJwt => "private_key_jwt",
            AuthMethod::ClientAssertionFile => "client_assertion_file",
        }
    }
}

/// The credential an identity authenticates with.
#[derive(Clone)]
pub enum Credential {
    Secret(Secret),
    Certificate(Arc<CertificateKey>),
    AssertionFile(PathBuf),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Secret(_) => f.write_str("Secret([redacted])"),
            Credential::Certificate(c) => write!(f, "Certificate(x5t#S256={})", c.x5t_s256),
            Credential::AssertionFile(p) => write!(f, "AssertionFile({})", p.display()),
        }
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

/// Reads the client assertion file (a projected service-account token). Read on every token request: the
/// kubelet rotates it by swapping a `..data` symlink, which a watch on the file itself would miss.
pub(crate) async fn read_assertion_file(path: &Path) -> Result<Secret, CredentialError> {
    let error = |source| CredentialError::AssertionFile {
        path: path.to_owned(),
        source,
    };
    let metadata = tokio::fs::metadata(path).await.map_err(error)?;
    if metadata.len() > MAX_ASSERTION_FILE_BYTES {
        return Err(CredentialError::AssertionTooLarge {
            path: path.to_owned(),
        });
    }
    let text = tokio::fs::read_to_string(path).await.map_err(error)?;
    let text = text.trim();
    if text.is_empty() {
        return Err(CredentialError::AssertionEmpty {
            path: path.to_owned(),
        });
    }
    Ok(Secret::new(text))
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
