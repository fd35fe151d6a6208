//! How the sidecar authenticates itself at the token endpoint (RFC 6749 §2.3, RFC 7523 §2.2): a client
//! secret in the form or in HTTP Basic, a `private_key_jwt` assertion signed with the key of a registered
//! certificate, or a client assertion read from a file (Kubernetes / Azure workload identity).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::rand::SecureRandom as _;
use aws_lc_rs::signature::RsaEncoding;
use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::secret::Secret;

/// `client_assertion_type` for JWT client assertions (RFC 7523 §2.2).
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// A signed assertion lives this long: RFC 7523 asks for a short life and Entra accepts up to 10 minutes.
/// Each token request signs a fresh one (new `jti`), as an IdP may refuse a replayed `jti`.
pub const ASSERTION_LIFETIME_SECS: u64 = 300;
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
    pub fn parse(name: &str) -> Option<AuthMethod> {
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
    key: aws_lc_rs::rsa::KeyPair,
    /// base64url(SHA-256(certificate DER)), the assertion header's `x5t#S256` (RFC 7515 §4.1.8).
    pub x5t_s256: String,
}

/// The JWS algorithm of a `private_key_jwt` assertion: Entra wants PS256, most others RS256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssertionAlg {
    PS256,
    RS256,
}

/// Why a credential could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read certificate {path}: {reason}")]
    Certificate { path: String, reason: String },
    #[error("cannot read private key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("the certificate's public key does not match the private key")]
    Mismatch,
    #[error("cannot read the client assertion file {path}: {reason}")]
    AssertionFile { path: String, reason: String },
    #[error("signing the client assertion failed")]
    Signing,
}

impl CertificateKey {
    /// Loads a PEM certificate (the first one in the file) and its PEM private key (PKCS#8 or PKCS#1 RSA),
    /// and checks that they belong together.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<CertificateKey, CredentialError> {
        let cert_error = |reason: String| CredentialError::Certificate {
            path: cert_file.display().to_string(),
            reason,
        };
        let key_error = |reason: String| CredentialError::Key {
            path: key_file.display().to_string(),
            reason,
        };
        let cert = CertificateDer::pem_file_iter(cert_file)
            .map_err(|e| cert_error(e.to_string()))?
            .next()
            .ok_or_else(|| cert_error("no CERTIFICATE block".to_owned()))?
            .map_err(|e| cert_error(e.to_string()))?;
        let key = match PrivateKeyDer::from_pem_file(key_file)
            .map_err(|e| key_error(e.to_string()))?
        {
            PrivateKeyDer::Pkcs8(der) => {
                aws_lc_rs::rsa::KeyPair::from_pkcs8(der.secret_pkcs8_der())
            }
            PrivateKeyDer::Pkcs1(der) => aws_lc_rs::rsa::KeyPair::from_der(der.secret_pkcs1_der()),
            _ => {
                return Err(key_error(
                    "not an RSA key (PKCS#8 or PKCS#1 PEM expected)".to_owned(),
                ));
            }
        }
        .map_err(|e| key_error(format!("not a usable RSA key: {e}")))?;
        check_pair(&cert, &key)?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.as_ref());
        Ok(CertificateKey {
            key,
            x5t_s256: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref()),
        })
    }

    /// A fresh `private_key_jwt` assertion (RFC 7523 §3): `iss` = `sub` = client id, `aud` = the token
    /// endpoint, a unique `jti`, `exp` five minutes out.
    pub fn sign_assertion(
        &self,
        client_id: &str,
        audience: &str,
        alg: AssertionAlg,
        now: u64,
    ) -> Result<Secret, CredentialError> {
        let (alg_name, encoding): (&str, &'static dyn RsaEncoding) = match alg {
            AssertionAlg::PS256 => ("PS256", &aws_lc_rs::signature::RSA_PSS_SHA256),
            AssertionAlg::RS256 => ("RS256", &aws_lc_rs::signature::RSA_PKCS1_SHA256),
        };
        let header = serde_json::json!({"alg": alg_name, "typ": "JWT", "x5t#S256": self.x5t_s256});
        let claims = serde_json::json!({
            "iss": client_id,
            "sub": client_id,
            "aud": audience,
            "jti": random_uuid(),
            "iat": now,
            "nbf": now,
            "exp": now + ASSERTION_LIFETIME_SECS,
        });
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let message = format!(
            "{}.{}",
            b64.encode(header.to_string()),
            b64.encode(claims.to_string())
        );
        let mut signature = vec![0u8; self.key.public_modulus_len()];
        self.key
            .sign(
                encoding,
                &aws_lc_rs::rand::SystemRandom::new(),
                message.as_bytes(),
                &mut signature,
            )
            .map_err(|_| CredentialError::Signing)?;
        Ok(Secret::new(format!("{message}.{}", b64.encode(signature))))
    }
}

/// Signs a probe with the key and verifies it with the certificate's public key.
fn check_pair(
    cert: &CertificateDer<'_>,
    key: &aws_lc_rs::rsa::KeyPair,
) -> Result<(), CredentialError> {
    let end_entity =
        webpki::EndEntityCert::try_from(cert).map_err(|e| CredentialError::Certificate {
            path: "certificate".to_owned(),
            reason: format!("not a parsable X.509 certificate: {e:?}"),
        })?;
    let probe = b"obo-sidecar certificate/key probe";
    let mut signature = vec![0u8; key.public_modulus_len()];
    key.sign(
        &aws_lc_rs::signature::RSA_PKCS1_SHA256,
        &aws_lc_rs::rand::SystemRandom::new(),
        probe,
        &mut signature,
    )
    .map_err(|_| CredentialError::Signing)?;
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
pub async fn read_assertion_file(path: &Path) -> Result<Secret, CredentialError> {
    let error = |reason: String| CredentialError::AssertionFile {
        path: path.display().to_string(),
        reason,
    };
    let metadata = tokio::fs::metadata(path)
        .await
        .map_err(|e| error(e.to_string()))?;
    if metadata.len() > MAX_ASSERTION_FILE_BYTES {
        return Err(error("larger than 64 KiB".to_owned()));
    }
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| error(e.to_string()))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(error("empty".to_owned()));
    }
    Ok(Secret::new(text))
}

/// A random (version 4) UUID, for `jti` and `client-request-id`.
pub fn random_uuid() -> String {
    let mut bytes = [0u8; 16];
    // The system RNG failing is not recoverable in any useful way; an all-zero id is still well-formed.
    let _ = aws_lc_rs::rand::SystemRandom::new().fill(&mut bytes);
    uuid_text(bytes)
}

/// A unique UUID-shaped id for a request (`X-Request-Id`), cheap enough for every request: no random draw
/// and no formatting machinery. Random keys are drawn once per process; each id is then a counter passed
/// through a keyed bijection of 64 bits (`splitmix64`'s finalizer), so ids never repeat within a process and
/// do not show a plain count of requests. Not a secret, and not a cryptographic permutation: only unique.
pub fn request_uuid() -> String {
    static KEYS: std::sync::LazyLock<([u8; 8], u64, u64)> = std::sync::LazyLock::new(|| {
        let mut random = [0u8; 24];
        let _ = aws_lc_rs::rand::SystemRandom::new().fill(&mut random);
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&random[i..i + 8]);
            w
        };
        (
            word(0),
            u64::from_le_bytes(word(8)),
            u64::from_le_bytes(word(16)),
        )
    });
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let (prefix, add, xor) = *KEYS;
    let mut z = COUNTER
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .wrapping_add(add);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let mixed = ((z ^ (z >> 31)) ^ xor).to_be_bytes();
    // The 64 mixed bits go where a version 4 UUID has no fixed bits: byte 7 and bytes 9–15.
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&prefix);
    bytes[8] = prefix[7];
    bytes[7] = mixed[0];
    bytes[9..].copy_from_slice(&mixed[1..]);
    uuid_text(bytes)
}

/// `bytes` as a version 4 UUID: `xxxxxxxx-xxxx-4xxx-Yxxx-xxxxxxxxxxxx`.
fn uuid_text(mut bytes: [u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut text = String::with_capacity(36);
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            text.push('-');
        }
        text.push(char::from(HEX[usize::from(b >> 4)]));
        text.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    text
}

/// `Authorization: Basic` per RFC 6749 §2.3.1: id and secret are form-urlencoded before joining.
pub fn basic_authorization(client_id: &str, secret: &Secret) -> Secret {
    let encode = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let pair = format!("{}:{}", encode(client_id), encode(secret.expose()));
    Secret::new(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_is_version_4_shaped() {
        let id = random_uuid();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(random_uuid(), id);
        assert!(id.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit() && !b.is_ascii_uppercase(),
        }));
    }

    #[test]
    fn request_ids_are_uuid_shaped_and_distinct() {
        let ids: Vec<String> = (0..1000).map(|_| request_uuid()).collect();
        assert!(ids.iter().all(|id| id.len() == 36 && &id[14..15] == "4"));
        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
    }

    #[test]
    fn basic_credentials_are_form_urlencoded_first() {
        let header = basic_authorization("my client", &Secret::new("p@ss:word+"));
        let encoded = header.expose().strip_prefix("Basic ").expect("basic");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("b64");
        assert_eq!(
            String::from_utf8(decoded).expect("utf-8"),
            "my+client:p%40ss%3Aword%2B"
        );
    }

    #[test]
    fn certificate_and_key_load_sign_and_mismatch_is_refused() {
        let dir = std::env::temp_dir().join(format!("obo-client-auth-{}", std::process::id()));
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
        let assertion = loaded
            .sign_assertion("client", "https://idp/token", AssertionAlg::PS256, 1_000)
            .expect("sign");
        let header = assertion.expose().split('.').next().expect("header");
        let header: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(header)
                .expect("b64"),
        )
        .expect("json");
        assert_eq!(header["alg"], "PS256");
        assert_eq!(header["x5t#S256"], loaded.x5t_s256.as_str());
        assert!(matches!(
            CertificateKey::load(&cert_a, &key_b),
            Err(CredentialError::Mismatch)
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
