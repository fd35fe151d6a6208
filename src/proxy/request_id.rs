//! `X-Request-Id`: the caller's, when it is short visible ASCII, else a new UUID-shaped one; sent upstream,
//! back to the caller and into the access log.

use http::{HeaderValue, Request};

/// A caller-supplied `X-Request-Id` longer than this, or with other than visible ASCII, is replaced.
const MAX_REQUEST_ID_BYTES: usize = 128;

/// The request id of `request`.
pub(super) fn of<B>(request: &Request<B>) -> HeaderValue {
    request
        .headers()
        .get("x-request-id")
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_REQUEST_ID_BYTES
                && v.as_bytes().iter().all(u8::is_ascii_graphic)
        })
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_bytes(&crate::ids::request_uuid())
                .unwrap_or_else(|_| HeaderValue::from_static("-"))
        })
}
