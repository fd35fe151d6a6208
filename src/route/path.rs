//! The request path as routing reads it (SPEC §4). The request path is percent-decoded once and normalized, then
//! matched against each route's `path_prefix` **segment by segment**, the way the frameworks behind the
//! sidecar read a path, so that no spelling of a path reaches a route with a weaker policy than the one the
//! upstream will serve it as:
//!
//! - a segment is matched on its part before the first `;` (Servlet containers, Spring and IIS read the rest
//!   as path parameters), a decoded `%3B` included;
//! - a segment whose part before `;` is `.` or `..` is a dot segment (`/a/..;/b` is `/b`), and one whose part
//!   before `;` is empty is an empty segment (`/;x/b` is `/b`);
//! - names are compared case-insensitively (ASP.NET Core routes that way), with Unicode case folding, not only
//!   ASCII: .NET's ordinal-ignore-case comparison upper-cases `ı` to `I` and `ſ` to `S`, so `/admın` reaches an
//!   ASP.NET Core `/admin` controller and must reach the sidecar's `/admin/` route too.
//!
//! Refused with 400: an encoded `/` or `\`, a raw `\`, a control character (NUL, TAB, CR, LF…, DEL), a
//! malformed escape, bytes that are not UTF-8 after decoding (overlong forms such as `%C0%AE` are how `.` was
//! smuggled past older decoders), and a `..` that climbs above the root.
//!
//! What is forwarded is the normalized path, `;` parameters kept on ordinary segments, re-encoded by
//! [`crate::forward::upstream_uri`].

use crate::config::fold;
use crate::error::{ProxyError, RequestDefect};

/// A request path, decoded once and normalized: `/` followed by its segments joined with `/`, each with its
/// `;` parameters; no empty, `.` or `..` segment; a trailing `/` kept when the request had one (or the path
/// is the root). Valid UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestPath(Vec<u8>);

/// One segment of a [`RequestPath`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Segment<'a> {
    /// The part before the first `;`: what routes match on.
    pub(crate) name: &'a [u8],
    /// Where the segment's leading `/` is in the path.
    start: usize,
}

impl RequestPath {
    /// Decodes and normalizes the path of a request target (origin form: it must start with `/`).
    pub(crate) fn parse(raw: &str) -> Result<RequestPath, ProxyError> {
        if !raw.starts_with('/') {
            return Err(ProxyError::BadRequest(RequestDefect::NotAbsolutePath));
        }
        let decoded = decode(raw.as_bytes())?;
        if std::str::from_utf8(&decoded).is_err() {
            return Err(ProxyError::BadRequest(RequestDefect::NotUtf8));
        }
        let mut segments: Vec<&[u8]> = Vec::new();
        let mut trailing = false;
        for segment in decoded[1..].split(|b| *b == b'/') {
            let name = segment_name(segment);
            trailing = matches!(name, b"" | b"." | b"..");
            match name {
                b"" | b"." => {}
                b".." => {
                    if segments.pop().is_none() {
                        return Err(ProxyError::BadRequest(RequestDefect::AboveRoot));
                    }
                }
                _ => segments.push(segment),
            }
        }
        let mut path = Vec::with_capacity(decoded.len());
        for segment in &segments {
            path.push(b'/');
            path.extend_from_slice(segment);
        }
        if path.is_empty() || trailing {
            path.push(b'/');
        }
        Ok(RequestPath(path))
    }

    #[cfg(test)]
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The segments, in order (a trailing `/` is not a segment).
    pub(crate) fn segments(&self) -> impl Iterator<Item = Segment<'_>> {
        let bytes = &self.0;
        let mut start = 0;
        std::iter::from_fn(move || {
            loop {
                if start >= bytes.len() {
                    return None;
                }
                let from = start + 1;
                let end = bytes[from..]
                    .iter()
                    .position(|b| *b == b'/')
                    .map_or(bytes.len(), |i| from + i);
                let segment = Segment {
                    name: segment_name(&bytes[from..end]),
                    start,
                };
                start = end;
                if from < end {
                    return Some(segment);
                }
            }
        })
    }

    /// What follows the first `count` segments: `""`, `"/"` or `"/rest…"`. The prefix's own `;` parameters
    /// go with it: the route's prefix is replaced by its upstream's path.
    pub(crate) fn after(&self, count: usize) -> &[u8] {
        if count == 0 {
            return &self.0;
        }
        match self.segments().nth(count) {
            Some(segment) => &self.0[segment.start..],
            None => {
                // The last segment ends the path, or only a trailing `/` follows it.
                if self.0.ends_with(b"/") && self.segments().count() >= count {
                    b"/"
                } else {
                    b""
                }
            }
        }
    }
}

/// The part of a segment before its first `;`.
fn segment_name(segment: &[u8]) -> &[u8] {
    segment
        .iter()
        .position(|b| *b == b';')
        .map_or(segment, |i| &segment[..i])
}

/// Percent-decodes once, refusing what no route may be chosen by (see the module documentation).
fn decode(raw: &[u8]) -> Result<Vec<u8>, ProxyError> {
    let hex = |c: u8| (c as char).to_digit(16);
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = if raw[i] == b'%' {
            let (Some(hi), Some(lo)) = (
                raw.get(i + 1).copied().and_then(hex),
                raw.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(ProxyError::BadRequest(RequestDefect::MalformedEscape));
            };
            i += 3;
            // Two hex digits fit a byte.
            let b = u8::try_from(hi * 16 + lo).unwrap_or(0);
            if b == b'/' || b == b'\\' {
                return Err(ProxyError::BadRequest(RequestDefect::EncodedSlash));
            }
            b
        } else {
            i += 1;
            raw[i - 1]
        };
        match b {
            b'\\' => return Err(ProxyError::BadRequest(RequestDefect::Backslash)),
            0 => return Err(ProxyError::BadRequest(RequestDefect::Nul)),
            c if c < 0x20 || c == 0x7f => {
                return Err(ProxyError::BadRequest(RequestDefect::ControlCharacter));
            }
            _ => decoded.push(b),
        }
    }
    Ok(decoded)
}

/// A route's `path_prefix`, ready for matching: its segments, folded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Prefix {
    segments: Vec<Box<str>>,
}

impl Prefix {
    /// From a normalized prefix (`/graph`, `/a/b`, or `""` for the root).
    pub(crate) fn new(normalized: &str) -> Prefix {
        Prefix {
            segments: normalized
                .split('/')
                .filter(|s| !s.is_empty())
                .map(|s| fold(s).into_boxed_str())
                .collect(),
        }
    }

    /// How many segments the prefix has (more is longer, and wins).
    pub(crate) fn len(&self) -> usize {
        self.segments.len()
    }

    /// Whether `path` starts with this prefix, segment by segment.
    pub(crate) fn matches(&self, path: &RequestPath) -> bool {
        let mut segments = path.segments();
        self.segments.iter().all(|want| {
            segments
                .next()
                .is_some_and(|segment| name_matches(segment.name, want))
        })
    }

    /// Whether the raw (undecoded, unnormalized) request path `raw` starts with this prefix's segments as
    /// written: a request that does, but whose normalized path does not match, climbed out of the prefix with
    /// dot segments.
    pub(crate) fn opens(&self, raw: &str) -> bool {
        let mut segments = raw.strip_prefix('/').unwrap_or(raw).split('/');
        !self.segments.is_empty()
            && self.segments.iter().all(|want| {
                segments
                    .next()
                    .is_some_and(|segment| name_matches(segment.as_bytes(), want))
            })
    }

    /// The segments of `path` after this prefix (`path` must match it).
    pub(crate) fn rest<'a>(&self, path: &'a RequestPath) -> impl Iterator<Item = Segment<'a>> {
        path.segments().skip(self.segments.len())
    }
}

/// Whether a path segment's name equals a folded prefix segment.
fn name_matches(name: &[u8], folded: &str) -> bool {
    if name.is_ascii() && folded.is_ascii() {
        return name.eq_ignore_ascii_case(folded.as_bytes());
    }
    // Paths are UTF-8 (checked in `parse`).
    std::str::from_utf8(name).is_ok_and(|name| fold(name) == folded)
}

#[cfg(test)]
mod tests;
