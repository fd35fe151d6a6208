//! `[inbound]`: how callers' tokens are validated, and the default route policy.

use std::time::Duration;

use jsonwebtoken::Algorithm;
use toml::Table;

use super::model::{
    DEFAULT_CLOCK_SKEW, DEFAULT_JWKS_MIN_REFETCH, DEFAULT_JWKS_REFRESH, Inbound, MAX_CLOCK_SKEW,
    Policy, TENANT_PLACEHOLDER,
};
use super::walk::{Fields, Problems, require_https, template_url};

pub(super) fn read_policy(f: &Fields<'_>, p: &mut Problems) -> Policy {
    let mut names = |key: &str| {
        let names = f.strings(key, p)?;
        for (i, name) in names.iter().enumerate() {
            // Scopes are space-separated in tokens (RFC 6749 §3.3): a name with a space could never match.
            if name.contains(' ') {
                p.add(
                    &format!("{}[{i}]", f.at(key)),
                    "a scope or role name cannot contain a space",
                );
            }
        }
        Some(names)
    };
    Policy {
        required_scopes: names("required_scopes"),
        required_roles: names("required_roles"),
    }
}

pub(super) fn read_inbound(table: &Table, p: &mut Problems) -> Inbound {
    let f = Fields::new(
        table,
        "inbound",
        &[
            "issuers",
            "discovery_url",
            "jwks_uri",
            "audiences",
            "algorithms",
            "clock_skew",
            "ca_file",
            "required_scopes",
            "required_roles",
            "allowed_tenants",
            "jwks_refresh",
            "jwks_min_refetch",
            "scope_claims",
            "roles_claim",
            "allow_acl_tokens",
        ],
        p,
    );
    let issuers = f.strings("issuers", p).unwrap_or_default();
    if issuers.is_empty() {
        p.add(&f.at("issuers"), "at least one issuer is required");
    }
    for (i, issuer) in issuers.iter().enumerate() {
        let at = format!("{}[{i}]", f.at("issuers"));
        if let Some(url) = template_url(issuer, &at, p) {
            require_https(&url, &at, p);
        }
    }
    let discovery_url = f.string("discovery_url", p).map(str::to_owned);
    let jwks_uri = f.string("jwks_uri", p).map(str::to_owned);
    for (key, template) in [("discovery_url", &discovery_url), ("jwks_uri", &jwks_uri)] {
        if let Some(template) = template {
            if let Some(url) = template_url(template, &f.at(key), p) {
                require_https(&url, &f.at(key), p);
            }
            if issuers.len() > 1 {
                p.add(&f.at(key), "can only be set with exactly one issuer");
            }
        }
    }
    // Tenant ids as Entra writes them in `tid` and in issuers: lowercase GUIDs.
    let allowed_tenants: Vec<String> = f
        .strings("allowed_tenants", p)
        .unwrap_or_default()
        .iter()
        .map(|t| t.to_ascii_lowercase())
        .collect();
    for (i, tenant) in allowed_tenants.iter().enumerate() {
        if !crate::oauth::is_guid(tenant) {
            p.add(
                &format!("{}[{i}]", f.at("allowed_tenants")),
                "a tenant id is a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx), as in the tokens' tid",
            );
        }
    }
    if !allowed_tenants.is_empty() && !issuers.iter().any(|i| i.contains(TENANT_PLACEHOLDER)) {
        p.add(
            &f.at("allowed_tenants"),
            "only meaningful with a {tenantid} issuer",
        );
    }
    let jwks_refresh = f.bounded_duration(
        "jwks_refresh",
        DEFAULT_JWKS_REFRESH,
        Duration::from_secs(60),
        Duration::from_secs(7 * 86_400),
        p,
    );
    let jwks_min_refetch = f.bounded_duration(
        "jwks_min_refetch",
        DEFAULT_JWKS_MIN_REFETCH,
        Duration::from_secs(1),
        Duration::from_secs(3600),
        p,
    );
    let scope_claims = f
        .strings("scope_claims", p)
        .unwrap_or_else(|| vec!["scp".to_owned(), "scope".to_owned()]);
    let roles_claim = f.string("roles_claim", p).unwrap_or("roles").to_owned();
    let audiences = f.strings("audiences", p).unwrap_or_default();
    if audiences.is_empty() {
        p.add(&f.at("audiences"), "at least one audience is required");
    }
    let algorithms = match f.strings("algorithms", p) {
        None => vec![Algorithm::RS256],
        Some(names) => {
            let mut algs = Vec::new();
            for (i, name) in names.iter().enumerate() {
                match parse_algorithm(name) {
                    Ok(alg) => algs.push(alg),
                    Err(msg) => p.add(&format!("{}[{i}]", f.at("algorithms")), msg),
                }
            }
            if names.is_empty() {
                p.add(&f.at("algorithms"), "at least one algorithm is required");
            }
            algs
        }
    };
    let clock_skew = f.bounded_duration(
        "clock_skew",
        DEFAULT_CLOCK_SKEW,
        Duration::ZERO,
        MAX_CLOCK_SKEW,
        p,
    );
    let ca_file = f.pem_roots("ca_file", p);
    let policy = read_policy(&f, p);
    Inbound {
        issuers,
        discovery_url,
        jwks_uri,
        audiences,
        algorithms,
        clock_skew,
        ca_file,
        policy,
        allowed_tenants,
        jwks_refresh,
        jwks_min_refetch,
        scope_claims,
        roles_claim,
        allow_acl_tokens: f.boolean("allow_acl_tokens", false, p),
    }
}

/// The asymmetric algorithms a remote key set can verify. `none` and HS* never: an HMAC "key" taken from a
/// public JWKS is public.
fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    let alg = match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        other
            if other.eq_ignore_ascii_case("none")
                || other.to_ascii_uppercase().starts_with("HS") =>
        {
            return Err(format!(
                "{other:?} is never accepted: only RS*, PS* and ES* algorithms verify with a published key"
            ));
        }
        other => {
            return Err(format!(
                "unknown algorithm {other:?} (RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384)"
            ));
        }
    };
    Ok(alg)
}
