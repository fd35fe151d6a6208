//! A validated caller: its token, the token's digest, and the claims every request needs.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use http::HeaderValue;

use serde_json::{Map, Value};

use crate::secret::Secret;

use super::jwks;

/// The caller's token: the bytes of its request's `Authorization` header, shared with the request rather
/// than copied, and the token's place in them. `Debug` prints `[redacted]`.
#[derive(Clone)]
pub(crate) struct CallerToken {
    /// Visible ASCII (the header was read with `to_str`), so every range of it is text.
    header: HeaderValue,
    range: Range<usize>,
}

impl CallerToken {
    pub(crate) fn new(header: HeaderValue, range: Range<usize>) -> CallerToken {
        CallerToken { header, range }
    }

    /// The token itself, for the places that send it on (an exchange, `passthrough`) or read its claims.
    pub(crate) fn expose(&self) -> &str {
        self.header
            .to_str()
            .ok()
            .and_then(|text| text.get(self.range.clone()))
            .unwrap_or_default()
    }

    /// A copy of the token, for a token request that outlives the caller's request.
    pub(crate) fn to_secret(&self) -> Secret {
        Secret::new(self.expose())
    }
}

impl fmt::Debug for CallerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A validated caller.
pub(crate) struct Caller {
    /// The caller's own token: the subject token of an OBO exchange, or what `passthrough` forwards.
    pub(crate) token: CallerToken,
    /// SHA-256 of `token`, computed once: the validated-token cache and the upstream-token cache key on it.
    pub(crate) digest: [u8; 32],
    pub(crate) claims: Arc<CallerClaims>,
}

impl Caller {
    /// Every claim of the caller's token (for the token API and `forward_claims`). Only what every request
    /// needs is kept in [`CallerClaims`], so that a validated-token cache entry stays small; the rest is read
    /// again from the token, whose signature was verified when these same bytes were first seen.
    pub(crate) fn all_claims(&self) -> Map<String, Value> {
        self.token
            .expose()
            .split('.')
            .nth(1)
            .and_then(crate::jwt::decode_object)
            .unwrap_or_default()
    }
}

/// The claims of a validated caller token that every request needs; the validated-token cache holds these.
#[derive(Clone)]
pub(crate) struct CallerClaims {
    pub(crate) exp: u64,
    /// The `tid` claim, when it is a string (a `{tenantid}` token endpoint is filled from it).
    pub(crate) tid: Option<Box<str>>,
    /// The delegated scopes, from every `scope_claims` claim; sorted, without duplicates.
    pub(crate) scopes: Words,
    /// The application roles (`roles_claim`).
    pub(crate) roles: Words,
    /// The key that verified the token: when its issuer withdraws it, the cached token stops validating.
    pub(crate) key: Arc<jwks::Key>,
}

impl fmt::Debug for CallerClaims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallerClaims")
            .field("exp", &self.exp)
            .field("tid", &self.tid)
            .field("scopes", &self.scopes)
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

/// A set of names (scopes, roles) in one allocation: joined by spaces. A name that itself contains a space
/// is left out rather than split, so no name can stand for two.
#[derive(Debug, Clone, Default)]
pub(crate) struct Words(Box<str>);

impl Words {
    pub(crate) fn new(mut names: Vec<&str>) -> Words {
        names.retain(|n| !n.is_empty() && !n.contains(' '));
        names.sort_unstable();
        names.dedup();
        Words(names.join(" ").into_boxed_str())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        !name.is_empty() && self.0.split(' ').any(|n| n == name)
    }
}
