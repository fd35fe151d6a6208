//! UUID-shaped identifiers: random ones for `jti` and Entra's `client-request-id`, and cheap unique ones for
//! `X-Request-Id`.

use aws_lc_rs::rand::SecureRandom as _;

/// A random (version 4) UUID, for `jti` and `client-request-id`.
pub(crate) fn random_uuid() -> String {
    let mut bytes = [0u8; 16];
    // The system RNG failing is not recoverable in any useful way; an all-zero id is still well-formed.
    let _ = aws_lc_rs::rand::SystemRandom::new().fill(&mut bytes);
    uuid_text(bytes).iter().map(|&b| char::from(b)).collect()
}

/// A unique UUID-shaped id for a request (`X-Request-Id`), cheap enough for every request: no random draw
/// and no formatting machinery. Random keys are drawn once per process; each id is then a counter passed
/// through a keyed bijection of 64 bits (`splitmix64`'s finalizer), so ids never repeat within a process and
/// do not show a plain count of requests. Not a secret, and not a cryptographic permutation: only unique.
pub(crate) fn request_uuid() -> [u8; 36] {
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

/// `bytes` as a version 4 UUID: `xxxxxxxx-xxxx-4xxx-Yxxx-xxxxxxxxxxxx` (lowercase ASCII).
fn uuid_text(mut bytes: [u8; 16]) -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut text = [b'-'; 36];
    let mut at = 0;
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            at += 1;
        }
        text[at] = HEX[usize::from(b >> 4)];
        text[at + 1] = HEX[usize::from(b & 0x0f)];
        at += 2;
    }
    text
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
        let ids: Vec<[u8; 36]> = (0..1000).map(|_| request_uuid()).collect();
        assert!(
            ids.iter()
                .all(|id| id[14] == b'4' && id[8] == b'-' && id[23] == b'-')
        );
        let distinct: std::collections::HashSet<&[u8; 36]> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
    }
}
