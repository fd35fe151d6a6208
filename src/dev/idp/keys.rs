//! The development IdP's RS256 signing keys: generation, the JWK, signing, and verification of the tokens it
//! signed.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{self, KeyPair as _, RsaPublicKeyComponents};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

/// An RS256 signing key and its public half as published in the JWKS.
pub(super) struct SigningKey {
    pub(super) kid: String,
    pub(super) key_pair: KeyPair,
    pub(super) n: Vec<u8>,
    pub(super) e: Vec<u8>,
    /// The signatures this key made, newest last, bounded: tests search logs for them.
    pub(super) signatures: Mutex<VecDeque<String>>,
}

/// Signatures remembered per key for [`DevIdp::signatures`].
pub(super) const REMEMBERED_SIGNATURES: usize = 20_000;

impl SigningKey {
    pub(super) fn generate() -> std::io::Result<Self> {
        let key_pair = KeyPair::generate(KeySize::Rsa2048)
            .map_err(|_| std::io::Error::other("RSA key generation failed"))?;
        let n = key_pair
            .public_key()
            .modulus()
            .big_endian_without_leading_zero()
            .to_vec();
        let e = key_pair
            .public_key()
            .exponent()
            .big_endian_without_leading_zero()
            .to_vec();
        let thumbprint = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &n);
        let mut kid = URL_SAFE_NO_PAD.encode(thumbprint.as_ref());
        kid.truncate(16);
        Ok(Self {
            kid,
            key_pair,
            n,
            e,
            signatures: Mutex::new(VecDeque::new()),
        })
    }

    pub(super) fn jwk(&self) -> Value {
        json!({
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "n": URL_SAFE_NO_PAD.encode(&self.n),
            "e": URL_SAFE_NO_PAD.encode(&self.e),
        })
    }

    pub(super) fn sign_jwt(&self, header: &Value, claims: &Value) -> String {
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0; self.key_pair.public_modulus_len()];
        #[allow(clippy::expect_used)]
        // Invariant: PKCS#1 v1.5 signing with a valid 2048-bit key into a buffer of exactly
        // `public_modulus_len()` bytes fails only if aws-lc cannot allocate, which aborts anyway.
        self.key_pair
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .expect("RSA signing with a generated key cannot fail");
        let signature = URL_SAFE_NO_PAD.encode(&signature);
        let mut remembered = self
            .signatures
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if remembered.len() == REMEMBERED_SIGNATURES {
            remembered.pop_front();
        }
        remembered.push_back(signature.clone());
        drop(remembered);
        format!("{signing_input}.{signature}")
    }

    pub(super) fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        RsaPublicKeyComponents {
            n: &self.n,
            e: &self.e,
        }
        .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, signature)
        .is_ok()
    }
}
