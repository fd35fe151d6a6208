//! A caller's JWT before its signature is checked: its header and payload decoded and checked by the
//! sidecar itself (`jsonwebtoken` cannot refuse `crit` headers or duplicate claims), and, once verified, the
//! claims every request needs.

use std::sync::Arc;

use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

use crate::error::{ProxyError, TokenDefect};
use crate::jwt::decode_object;

use super::claims::{CallerClaims, Words};
use super::jwks;

/// A JWT whose header and payload have been decoded and checked, but whose signature has not.
pub(super) struct Unverified {
    pub(super) alg: Algorithm,
    pub(super) kid: Option<String>,
    pub(super) exp: u64,
    pub(super) claims: Map<String, Value>,
}

pub(super) fn parse_unverified(
    token: &str,
    allowed: &[Algorithm],
) -> Result<Unverified, ProxyError> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ProxyError::InvalidToken(TokenDefect::NotThreeParts));
    };
    let header =
        decode_object(header).ok_or(ProxyError::InvalidToken(TokenDefect::MalformedJoseHeader))?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .and_then(|name| allowed.iter().copied().find(|a| alg_name(*a) == name))
        .ok_or(ProxyError::InvalidToken(TokenDefect::AlgorithmNotAllowed))?;
    if header.contains_key("crit") {
        return Err(ProxyError::InvalidToken(TokenDefect::CriticalExtensions));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(ProxyError::InvalidToken(TokenDefect::MalformedKeyId)),
    };
    let claims =
        decode_object(payload).ok_or(ProxyError::InvalidToken(TokenDefect::MalformedPayload))?;
    let exp = match claims.get("exp") {
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(seconds_from_f64))
            .ok_or(ProxyError::InvalidToken(TokenDefect::ExpInvalid))?,
        Some(_) => return Err(ProxyError::InvalidToken(TokenDefect::ExpNotNumeric)),
        None => return Err(ProxyError::InvalidToken(TokenDefect::RequiredClaimMissing)),
    };
    for claim in ["nbf", "iat"] {
        if claims.get(claim).is_some_and(|v| !v.is_number()) {
            return Err(ProxyError::InvalidToken(TokenDefect::TimeClaimNotNumeric));
        }
    }
    Ok(Unverified {
        alg,
        kid,
        exp,
        claims,
    })
}

#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "checked non-negative; saturating cast"
)]
fn seconds_from_f64(f: f64) -> u64 {
    f as u64
}

fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::EdDSA => "EdDSA",
    }
}

pub(super) fn caller_claims(
    all: &Map<String, Value>,
    exp: u64,
    scope_claims: &[String],
    roles_claim: &str,
    key: Arc<jwks::Key>,
) -> CallerClaims {
    // A space-separated string (`scp`), or an array of names.
    fn strings(v: Option<&Value>) -> Vec<&str> {
        match v {
            Some(Value::String(s)) => s.split(' ').collect(),
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }
    CallerClaims {
        exp,
        tid: all.get("tid").and_then(Value::as_str).map(Box::from),
        scopes: Words::new(
            scope_claims
                .iter()
                .flat_map(|c| strings(all.get(c)))
                .collect(),
        ),
        roles: Words::new(strings(all.get(roles_claim))),
        key,
    }
}
