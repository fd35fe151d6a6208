//! Route policy: which validated callers a route admits (one of its required scopes, or one of its required
//! roles), and the sets of names those are checked in.

use crate::config::{Policy, Route, TokenKind};
use crate::error::ProxyError;

use super::claims::CallerClaims;

/// Applies a route's policy to a validated caller: one of the required scopes, or one of the required roles.
/// An `obo` route also needs a delegated (user) token: an app-only token has no user to act for.
pub(crate) fn authorize(claims: &CallerClaims, route: &Route) -> Result<(), ProxyError> {
    if route.token == TokenKind::Obo && claims.scopes.is_empty() {
        return Err(ProxyError::InsufficientScope {
            scope: route
                .policy
                .required_scopes
                .as_deref()
                .unwrap_or_default()
                .join(" "),
            detail: "an app-only token (no scopes) cannot be exchanged on behalf of a user",
        });
    }
    let Policy {
        required_scopes,
        required_roles,
    } = &route.policy;
    if required_scopes.is_none() && required_roles.is_none() {
        return Ok(());
    }
    let scope_ok = required_scopes
        .as_ref()
        .is_some_and(|need| need.iter().any(|s| claims.scopes.contains(s)));
    let role_ok = required_roles
        .as_ref()
        .is_some_and(|need| need.iter().any(|r| claims.roles.contains(r)));
    if scope_ok || role_ok {
        return Ok(());
    }
    // RFC 6750 §3: `scope` lists scopes; a roles-only policy has none to name.
    Err(ProxyError::InsufficientScope {
        scope: required_scopes.as_deref().unwrap_or_default().join(" "),
        detail: "the token lacks a scope or role this route requires",
    })
}
