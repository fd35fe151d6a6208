//! A validated caller: its token, the token's digest, and the claims every request needs.

use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::secret::Secret;

use super::jwks;

/// A validated caller.
pub(crate) struct Caller {
    /// The caller's own token: the subject token of an OBO exchange, or what `passthrough` forwards.
    pub(crate) token: Secret,
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
