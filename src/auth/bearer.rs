//! The bearer token of a request (RFC 6750 §2.1): one `Authorization` header, scheme `Bearer` in any case,
//! one b64token.

use http::HeaderMap;

use crate::error::{ProxyError, TokenDefect};

/// RFC 6750 bearer tokens from Entra are 1–3 KiB; 16 KiB leaves room for big group claims and refuses
/// decompression-bomb-sized input before any decoding.
pub(crate) const MAX_BEARER_BYTES: usize = 16 * 1024;

/// The one bearer token of the request. The scheme is matched case-insensitively (RFC 9110 §11.1); a request
/// with no `Authorization`, or another scheme, has no token; two headers, or two tokens in one, are refused.
#[cfg(test)]
pub(crate) fn bearer_token(headers: &HeaderMap) -> Result<&str, ProxyError> {
    let (value, range) = bearer_range(headers)?;
    let token = value
        .to_str()
        .unwrap_or_default()
        .get(range)
        .unwrap_or_default();
    check_b64token(token)?;
    Ok(token)
}

/// RFC 6750 §2.1 b64token: one token, no spaces, no commas.
pub(super) fn check_b64token(token: &str) -> Result<(), ProxyError> {
    const fn table() -> [bool; 256] {
        let mut table = [false; 256];
        let mut c = 0;
        while c < 256 {
            #[allow(clippy::cast_possible_truncation, reason = "c < 256")]
            let b = c as u8;
            table[c] = b.is_ascii_alphanumeric()
                || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=');
            c += 1;
        }
        table
    }
    const B64TOKEN: [bool; 256] = table();
    if token.bytes().all(|b| B64TOKEN[usize::from(b)]) {
        Ok(())
    } else {
        Err(ProxyError::InvalidToken(TokenDefect::Malformed))
    }
}

/// The one `Authorization` header of the request (visible ASCII) and where its bearer token is in it,
/// before the token's characters are checked.
pub(super) fn bearer_range(
    headers: &HeaderMap,
) -> Result<(&http::HeaderValue, std::ops::Range<usize>), ProxyError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(ProxyError::MissingToken);
    };
    if values.next().is_some() {
        return Err(ProxyError::InvalidToken(
            TokenDefect::TwoAuthorizationHeaders,
        ));
    }
    if value.len() > MAX_BEARER_BYTES + 16 {
        return Err(ProxyError::InvalidToken(TokenDefect::TooLarge));
    }
    let header = value;
    let value = value
        .to_str()
        .map_err(|_| ProxyError::InvalidToken(TokenDefect::MalformedHeader))?;
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ProxyError::MissingToken);
    }
    let token = rest.trim_matches(' ');
    if token.is_empty() {
        return Err(ProxyError::InvalidToken(TokenDefect::Empty));
    }
    if token.len() > MAX_BEARER_BYTES {
        return Err(ProxyError::InvalidToken(TokenDefect::TooLarge));
    }
    // `token` is a slice of `value`: where it starts is how far its first byte is from `value`'s.
    let start = token.as_ptr() as usize - value.as_ptr() as usize;
    Ok((header, start..start + token.len()))
}
