//! An upstream token as the cache holds it and the proxy sends it.

use http::HeaderValue;
use tokio::time::Instant;

/// An upstream token ready to send, with its timing.
#[derive(Debug)]
pub(crate) struct UpstreamToken {
    /// `Bearer <token>`, marked sensitive.
    pub(crate) header: HeaderValue,
    /// Unix seconds of the token's expiry; 0 when unknown.
    pub(crate) expires_on: u64,
    /// From here on a cache hit starts a background refresh.
    pub(crate) stale_at: Instant,
    /// From here on the token is never sent (`exp` minus 30 s, or the subject token's `exp`).
    pub(crate) expires_at: Instant,
}

/// `Authorization: Bearer <token>`, marked sensitive (never logged by hyper, never HPACK-indexed); `None`
/// when the token is not a valid header value.
pub(crate) fn bearer_header(token: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::try_from(format!("Bearer {token}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}
