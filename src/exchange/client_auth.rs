//! How the sidecar authenticates itself at the token endpoint (RFC 6749 §2.3, RFC 7523 §2.2): a client
//! secret in the form or in HTTP Basic, a `private_key_jwt` assertion signed with the key of a registered
//! certificate, or a client assertion read from a file (Kubernetes / Azure workload identity). The
//! credentials themselves are loaded by `config`.

use aws_lc_rs::signature::RsaEncoding;
use base64::Engine as _;

use crate::config::CertificateKey;
use crate::secret::Secret;

/// A signed assertion lives this long: RFC 7523 asks for a short life and Entra accepts up to 10 minutes.
/// Each token request signs a fresh one (new `jti`), as an IdP may refuse a replayed `jti`.
const ASSERTION_LIFETIME_SECS: u64 = 300;

/// The JWS algorithm of a `private_key_jwt` assertion: Entra wants PS256, most others RS256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AssertionAlg {
    PS256,
    RS256,
}

/// Signing the client assertion failed (the RSA key refused to sign).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("signing the client assertion failed")]
pub(crate) struct SigningError;

/// A fresh `private_key_jwt` assertion (RFC 7523 §3): `iss` = `sub` = client id, `aud` = the token endpoint,
/// a unique `jti`, `exp` five minutes out.
pub(crate) fn sign_assertion(
    certificate: &CertificateKey,
    client_id: &str,
    audience: &str,
    alg: AssertionAlg,
    now: u64,
) -> Result<Secret, SigningError> {
    let (alg_name, encoding): (&str, &'static dyn RsaEncoding) = match alg {
        AssertionAlg::PS256 => ("PS256", &aws_lc_rs::signature::RSA_PSS_SHA256),
        AssertionAlg::RS256 => ("RS256", &aws_lc_rs::signature::RSA_PKCS1_SHA256),
    };
    let header =
        serde_json::json!({"alg": alg_name, "typ": "JWT", "x5t#S256": certificate.x5t_s256});
    let claims = serde_json::json!({
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": crate::ids::random_uuid(),
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
    let mut signature = vec![0u8; certificate.key.public_modulus_len()];
    certificate
        .key
        .sign(
            encoding,
            &aws_lc_rs::rand::SystemRandom::new(),
            message.as_bytes(),
            &mut signature,
        )
        .map_err(|_| SigningError)?;
    Ok(Secret::new(format!("{message}.{}", b64.encode(signature))))
}

/// `Authorization: Basic` per RFC 6749 §2.3.1: id and secret are form-urlencoded before joining.
pub(crate) fn basic_authorization(client_id: &str, secret: &Secret) -> Secret {
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
    fn an_assertion_names_its_certificate_and_algorithm() {
        let dir = std::env::temp_dir().join(format!("obo-client-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("key");
        let cert = rcgen::CertificateParams::new(vec!["client".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        std::fs::write(dir.join("c.crt"), cert.pem()).expect("write");
        std::fs::write(dir.join("c.key"), key.serialize_pem()).expect("write");
        let loaded = CertificateKey::load(&dir.join("c.crt"), &dir.join("c.key")).expect("load");
        let assertion = sign_assertion(
            &loaded,
            "client",
            "https://idp/token",
            AssertionAlg::PS256,
            1_000,
        )
        .expect("sign");
        let header =
            crate::jwt::decode_object(assertion.expose().split('.').next().expect("header"))
                .expect("json");
        assert_eq!(header["alg"], "PS256");
        assert_eq!(header["x5t#S256"], loaded.x5t_s256.as_str());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
