//! SHA-256 digests as map keys: callers' tokens and upstream-token cache keys are looked up by digest.

/// SHA-256 of `bytes`.
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// The digest of the bearer token a connection sent last. A keep-alive connection sends the same token
/// request after request, and comparing its bytes costs a fraction of hashing them; only a token that
/// differs from the last one is hashed (and kept). Equal bytes have the equal digest, so nothing else is
/// assumed.
#[derive(Default)]
pub(crate) struct LastDigest(std::sync::Mutex<Option<Seen>>);

/// The bytes kept are a caller's bearer token: never printed.
impl std::fmt::Debug for LastDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LastDigest([redacted])")
    }
}

/// A token's bytes and their digest.
type Seen = (Box<[u8]>, [u8; 32]);

impl LastDigest {
    /// SHA-256 of `bytes`.
    pub(crate) fn sha256(&self, bytes: &[u8]) -> [u8; 32] {
        if let Ok(last) = self.0.lock()
            && let Some((seen, digest)) = last.as_ref()
            && **seen == *bytes
        {
            return *digest;
        }
        let digest = sha256(bytes);
        if let Ok(mut last) = self.0.lock() {
            *last = Some((bytes.into(), digest));
        }
        digest
    }
}

/// Hashes a key that is already a SHA-256 digest by taking its first eight bytes: the digest is uniformly
/// spread, so `SipHash` over it again would only cost time on every lookup. Flooding one hash bucket would
/// take many entries whose digests share a prefix, and an entry only gets in after a verified signature or
/// an IdP exchange, so no caller can plant them cheaply.
#[derive(Clone, Copy, Default)]
pub(crate) struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as its length then its bytes; the constant length mixes in harmlessly.
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(word);
    }
}

/// Builds [`DigestHasher`]s.
pub(crate) type DigestHash = std::hash::BuildHasherDefault<DigestHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_kept_is_never_printed() {
        let last = LastDigest::default();
        let _ = last.sha256(b"eyJhbGciOiJSUzI1NiJ9.secret-token-bytes");
        let printed = format!("{last:?}");
        assert!(
            !printed.contains("secret") && printed.contains("[redacted]"),
            "{printed}"
        );
    }
}
