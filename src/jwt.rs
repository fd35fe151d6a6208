//! Reading a JWT's parts without verifying it (RFC 7519): base64url JSON objects whose member names must
//! be unique (RFC 7515 §5.2). The caller validation verifies what it reads here; the development IdP, the
//! echo upstream and the token cache's expiry read tokens they have no reason to verify.

use std::fmt;

use base64::Engine as _;
use serde::de::{Deserializer as _, MapAccess, Visitor};
use serde_json::{Map, Value};

/// base64url, with or without padding (RFC 7515 §2 says without; some issuers pad).
pub(crate) const B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// The three parts of a compact JWS: header, payload, signature (still encoded).
pub(crate) fn parts(token: &str) -> Option<(&str, &str, &str)> {
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(header), Some(payload), Some(signature), None) => Some((header, payload, signature)),
        _ => None,
    }
}

/// A base64url JSON object, refusing duplicate member names (RFC 7515 §5.2 / RFC 7519 §4).
pub(crate) fn decode_object(part: &str) -> Option<Map<String, Value>> {
    let bytes = B64.decode(part).ok()?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let object = de.deserialize_map(UniqueObject).ok()?;
    de.end().ok()?;
    Some(object)
}

/// The payload of a compact JWS, unverified.
pub(crate) fn unverified_claims(token: &str) -> Option<Map<String, Value>> {
    decode_object(parts(token)?.1)
}

struct UniqueObject;

impl<'de> Visitor<'de> for UniqueObject {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object with unique member names")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut map = Map::new();
        while let Some((key, value)) = access.next_entry::<String, Value>()? {
            if map.contains_key(&key) {
                return Err(serde::de::Error::custom("duplicate member"));
            }
            map.insert(key, value);
        }
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_members_and_non_objects_are_refused() {
        assert!(decode_object(&B64.encode(r#"{"a":1,"a":2}"#)).is_none());
        assert!(decode_object(&B64.encode("[1]")).is_none());
        assert!(decode_object(&B64.encode(r#"{"a":1} x"#)).is_none());
        assert_eq!(
            decode_object(&B64.encode(r#"{"a":1}"#)).map(|o| o["a"].clone()),
            Some(Value::from(1))
        );
        assert!(parts("a.b").is_none() && parts("a.b.c.d").is_none());
    }
}
