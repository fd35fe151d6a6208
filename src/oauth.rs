//! The OAuth 2.0 vocabulary both sides of the token endpoint speak: grant and token-type URNs, and the
//! small checks on identifiers that come from tokens.

/// RFC 7523 / Entra On-Behalf-Of grant type.
pub(crate) const GRANT_JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// RFC 8693 grant type.
pub(crate) const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 6749 §4.4 grant type.
pub(crate) const GRANT_CLIENT_CREDENTIALS: &str = "client_credentials";
/// RFC 8693 §3 token type of an OAuth access token.
pub(crate) const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
/// RFC 8693 §3 token type of a JWT.
#[cfg_attr(
    not(feature = "dev"),
    allow(dead_code, reason = "the development IdP issues it")
)]
pub(crate) const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
/// `client_assertion_type` for JWT client assertions (RFC 7523 §2.2).
pub(crate) const CLIENT_ASSERTION_TYPE: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The audience Entra requires of a federated client assertion (a Kubernetes projected service-account
/// token, or a managed identity's token).
#[cfg_attr(
    not(feature = "dev"),
    allow(dead_code, reason = "the development IdP checks it")
)]
pub(crate) const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, hex: an Entra tenant id (`tid`). Nothing else from a token may
/// reach a URL.
pub(crate) fn is_guid(text: &str) -> bool {
    text.len() == 36
        && text.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Seconds since the Unix epoch: the clock of `exp`, `nbf` and `iat`.
pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids_are_recognized() {
        assert!(is_guid("72f988bf-86f1-41af-91ab-2d7cd011db47"));
        assert!(!is_guid("72f988bf-86f1-41af-91ab-2d7cd011db4"));
        assert!(!is_guid("../../evil/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"));
    }
}
