//! What the shared cache stores, and under which names (SPEC §14): a value is an upstream token and its
//! timing sealed with AES-256-GCM, the whole cache key as associated data (a value copied under another key
//! does not open); a name is the prefix and an HMAC-SHA256 of the cache key, so neither the subject token's
//! digest nor any token appears in Redis. Each configured key derives its own sealing and naming keys; the
//! first key seals, every key opens (rotation).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hmac;
use http::HeaderValue;
use tokio::time::Instant;

use super::cache::CacheKey;
use super::token::UpstreamToken;
use crate::config::EncryptionKeys;

/// The first byte of every value: its format.
const VERSION: u8 = 1;
/// Bound into every value: no other use of the same key opens it.
const AAD_LABEL: &[u8] = b"obo-sidecar shared token cache v1";

/// One configured key's derived keys.
struct Derived {
    seal: LessSafeKey,
    name: hmac::Key,
}

/// Seals and opens values, and names them.
pub(crate) struct Sealer {
    /// The first seals and names new entries; all open and are looked up.
    keys: Vec<Derived>,
}

impl Sealer {
    pub(crate) fn new(keys: &EncryptionKeys) -> Sealer {
        let keys = keys
            .0
            .iter()
            .filter_map(|master| {
                let master = hmac::Key::new(hmac::HMAC_SHA256, master);
                let derive = |label: &[u8]| hmac::sign(&master, label);
                let seal = derive(b"obo-sidecar shared cache: seal");
                let name = derive(b"obo-sidecar shared cache: name");
                // An HMAC-SHA256 tag is 32 bytes: always an AES-256 key.
                let seal = UnboundKey::new(&AES_256_GCM, seal.as_ref()).ok()?;
                Some(Derived {
                    seal: LessSafeKey::new(seal),
                    name: hmac::Key::new(hmac::HMAC_SHA256, name.as_ref()),
                })
            })
            .collect();
        Sealer { keys }
    }

    /// The names of `key`'s entry under each configured key, the sealing key's first.
    pub(crate) fn names(&self, prefix: &str, key: &CacheKey) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| {
                format!(
                    "{prefix}t:{}",
                    hex(hmac::sign(&k.name, key.as_bytes()).as_ref())
                )
            })
            .collect()
    }

    /// The name of the lease on `key`'s entry (under the sealing key).
    pub(crate) fn lease_name(&self, prefix: &str, key: &CacheKey) -> String {
        let name = self.keys.first().map_or_else(String::new, |k| {
            hex(hmac::sign(&k.name, key.as_bytes()).as_ref())
        });
        format!("{prefix}l:{name}")
    }

    /// `token` sealed for `key`, and how long Redis should keep it (until the token's hard expiry); `None`
    /// when it expires within a millisecond or cannot be sealed.
    pub(crate) fn seal(
        &self,
        key: &CacheKey,
        token: &UpstreamToken,
    ) -> Option<(Vec<u8>, Duration)> {
        let sealer = self.keys.first()?;
        let now = Instant::now();
        let ttl = token.expires_at.saturating_duration_since(now);
        if ttl < Duration::from_millis(1) {
            return None;
        }
        let wall = unix_ms(SystemTime::now());
        let at = |instant: Instant| {
            let ahead = instant.saturating_duration_since(now);
            wall.saturating_add(u64::try_from(ahead.as_millis()).unwrap_or(u64::MAX))
        };
        let mut plain = Vec::with_capacity(25 + token.header.len() + 16);
        plain.push(VERSION);
        plain.extend_from_slice(&token.expires_on.to_be_bytes());
        plain.extend_from_slice(&at(token.stale_at).to_be_bytes());
        plain.extend_from_slice(&at(token.expires_at).to_be_bytes());
        plain.extend_from_slice(token.header.as_bytes());
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        sealer
            .seal
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(key)),
                &mut plain,
            )
            .ok()?;
        let mut value = Vec::with_capacity(1 + NONCE_LEN + plain.len());
        value.push(VERSION);
        value.extend_from_slice(&nonce);
        value.extend_from_slice(&plain);
        Some((value, ttl))
    }

    /// The token sealed in `value` for `key`, if one of the keys opens it and it has not expired.
    pub(crate) fn open(&self, key: &CacheKey, value: &[u8]) -> Option<UpstreamToken> {
        let (&version, rest) = value.split_first()?;
        if version != VERSION || rest.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        let plain = self.keys.iter().find_map(|k| {
            let mut buffer = sealed.to_vec();
            let opened = k
                .seal
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad(key)),
                    &mut buffer,
                )
                .ok()?
                .len();
            buffer.truncate(opened);
            Some(buffer)
        })?;
        decode(&plain)
    }
}

/// The associated data: the label and the whole cache key.
fn aad(key: &CacheKey) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_LABEL.len() + 32);
    aad.extend_from_slice(AAD_LABEL);
    aad.extend_from_slice(key.as_bytes());
    aad
}

fn decode(plain: &[u8]) -> Option<UpstreamToken> {
    let (&version, rest) = plain.split_first()?;
    if version != VERSION || rest.len() < 24 {
        return None;
    }
    let number = |at: usize| -> Option<u64> {
        Some(u64::from_be_bytes(rest.get(at..at + 8)?.try_into().ok()?))
    };
    let (expires_on, stale_ms, expires_ms) = (number(0)?, number(8)?, number(16)?);
    let mut header = HeaderValue::from_bytes(rest.get(24..)?).ok()?;
    header.set_sensitive(true);
    let wall = unix_ms(SystemTime::now());
    let now = Instant::now();
    let at = |ms: u64| now + Duration::from_millis(ms.saturating_sub(wall));
    let expires_at = at(expires_ms);
    if expires_at <= now {
        return None;
    }
    Some(UpstreamToken {
        header,
        expires_on,
        stale_at: at(stale_ms).min(expires_at),
        expires_at,
    })
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> CacheKey {
        CacheKey::test(n)
    }

    fn token() -> UpstreamToken {
        let now = Instant::now();
        UpstreamToken {
            header: HeaderValue::from_static(
                "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln",
            ),
            expires_on: 1_900_000_000,
            stale_at: now + Duration::from_secs(3000),
            expires_at: now + Duration::from_secs(3570),
        }
    }

    #[test]
    fn a_value_opens_for_its_key_only_and_rotated_keys_still_open() {
        let old = Sealer::new(&EncryptionKeys(vec![[1; 32]]));
        let (value, ttl) = old.seal(&key(1), &token()).expect("sealed");
        assert!(ttl > Duration::from_secs(3500));
        let opened = old.open(&key(1), &value).expect("opens");
        assert_eq!(opened.header, token().header);
        assert_eq!(opened.expires_on, 1_900_000_000);
        assert!(opened.header.is_sensitive());
        assert!(old.open(&key(2), &value).is_none(), "another cache key");
        let mut tampered = value.clone();
        *tampered.last_mut().expect("bytes") ^= 1;
        assert!(old.open(&key(1), &tampered).is_none());
        // A new key seals; the old one still opens what it sealed.
        let rotated = Sealer::new(&EncryptionKeys(vec![[2; 32], [1; 32]]));
        assert!(rotated.open(&key(1), &value).is_some());
        assert!(
            Sealer::new(&EncryptionKeys(vec![[2; 32]]))
                .open(&key(1), &value)
                .is_none()
        );
        assert_eq!(
            rotated.names("obo:", &key(1))[1],
            old.names("obo:", &key(1))[0]
        );
    }

    #[test]
    fn nothing_readable_is_stored() {
        let sealer = Sealer::new(&EncryptionKeys(vec![[7; 32]]));
        let (value, _) = sealer.seal(&key(3), &token()).expect("sealed");
        let text = String::from_utf8_lossy(&value);
        assert!(!text.contains("Bearer") && !text.contains("eyJ"));
        let name = &sealer.names("obo:", &key(3))[0];
        assert!(name.starts_with("obo:t:") && name.len() == 6 + 64);
        assert!(
            !name.contains(&hex(key(3).as_bytes())),
            "not the cache key itself"
        );
    }
}
