//! The one request-path error type. Each variant is classified by fault (caller, IdP, upstream, internal),
//! which decides the status, the log level and the RFC 6750 `WWW-Authenticate` challenge. Bodies are RFC 9457
//! problem details. Nothing here ever holds or quotes a token: variants carry fixed descriptions.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// What is wrong with a caller's token: the `error_description` of its 401 (RFC 6750 §3). Never quotes any
/// part of the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenDefect {
    MalformedHeader,
    TwoAuthorizationHeaders,
    Empty,
    TooLarge,
    Malformed,
    NotThreeParts,
    MalformedJoseHeader,
    MalformedPayload,
    AlgorithmNotAllowed,
    CriticalExtensions,
    MalformedKeyId,
    NoKeyId,
    KeyUnknown,
    KeyWithdrawn,
    AlgorithmMismatch,
    ExpNotNumeric,
    ExpInvalid,
    TimeClaimNotNumeric,
    RequiredClaimMissing,
    Expired,
    NotYetValid,
    IssuedInTheFuture,
    AudienceNotAccepted,
    IssuerNotAccepted,
    TenantNotAccepted,
    TenantMismatch,
    NoTenant,
    SignatureInvalid,
    Unverifiable,
    NoScopesOrRoles,
}

impl TokenDefect {
    /// The `error_description`.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            TokenDefect::MalformedHeader => "malformed Authorization header",
            TokenDefect::TwoAuthorizationHeaders => "more than one Authorization header",
            TokenDefect::Empty => "empty bearer token",
            TokenDefect::TooLarge => "token too large",
            TokenDefect::Malformed => "malformed bearer token",
            TokenDefect::NotThreeParts => "not a signed JWT (three parts)",
            TokenDefect::MalformedJoseHeader => "malformed token header",
            TokenDefect::MalformedPayload => "malformed token payload",
            TokenDefect::AlgorithmNotAllowed => "signing algorithm not allowed",
            TokenDefect::CriticalExtensions => "critical header extensions are not supported",
            TokenDefect::MalformedKeyId => "malformed key id",
            TokenDefect::NoKeyId => "token names no key id",
            TokenDefect::KeyUnknown => "signing key unknown",
            TokenDefect::KeyWithdrawn => "signing key withdrawn by the issuer",
            TokenDefect::AlgorithmMismatch => "algorithm does not match the signing key",
            TokenDefect::ExpNotNumeric => "exp is not numeric",
            TokenDefect::ExpInvalid => "exp is not a valid time",
            TokenDefect::TimeClaimNotNumeric => "time claim is not numeric",
            TokenDefect::RequiredClaimMissing => "required claim missing",
            TokenDefect::Expired => "token expired",
            TokenDefect::NotYetValid => "token not yet valid",
            TokenDefect::IssuedInTheFuture => "token issued in the future",
            TokenDefect::AudienceNotAccepted => "audience not accepted",
            TokenDefect::IssuerNotAccepted => "issuer not accepted",
            TokenDefect::TenantNotAccepted => "tenant not accepted",
            TokenDefect::TenantMismatch => "tenant does not match the issuer",
            TokenDefect::NoTenant => "token has no valid tenant id (tid)",
            TokenDefect::SignatureInvalid => "signature invalid",
            TokenDefect::Unverifiable => "token could not be verified",
            TokenDefect::NoScopesOrRoles => "the token carries neither scopes nor roles",
        }
    }
}

impl std::fmt::Display for TokenDefect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is wrong with a request before any route or token is looked at: the `detail` of its 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestDefect {
    NotAbsolutePath,
    MalformedEscape,
    EncodedSlash,
    Backslash,
    Nul,
    ControlCharacter,
    NotUtf8,
    AboveRoot,
    TwoHosts,
    MalformedHost,
    HostMismatch,
    Unforwardable,
    /// A forward-auth request without `X-Original-URI` or `X-Forwarded-Uri` (SPEC §16).
    NoOriginalUri,
    /// `X-Original-Method`/`X-Forwarded-Method` that is not a method token.
    MalformedOriginalMethod,
    /// Two headers (or one, twice) name different original requests.
    OriginalsDisagree,
}

impl RequestDefect {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            RequestDefect::NotAbsolutePath => "request target is not an absolute path",
            RequestDefect::MalformedEscape => "malformed percent-encoding in path",
            RequestDefect::EncodedSlash => "encoded '/' or '\\' in path",
            RequestDefect::Backslash => "'\\' in path",
            RequestDefect::Nul => "NUL in path",
            RequestDefect::ControlCharacter => "control character in path",
            RequestDefect::NotUtf8 => "path is not UTF-8 after decoding",
            RequestDefect::AboveRoot => "path climbs above the root",
            RequestDefect::TwoHosts => "more than one Host header",
            RequestDefect::MalformedHost => "Host is not a host[:port]",
            RequestDefect::HostMismatch => "Host does not match the request target's authority",
            RequestDefect::Unforwardable => "request path cannot be forwarded",
            RequestDefect::NoOriginalUri => {
                "forward-auth request names no original URI (X-Original-URI or X-Forwarded-Uri)"
            }
            RequestDefect::MalformedOriginalMethod => "the original method is not an HTTP method",
            RequestDefect::OriginalsDisagree => {
                "the headers naming the original request disagree (X-Original-* and X-Forwarded-*)"
            }
        }
    }
}

impl std::fmt::Display for RequestDefect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whose fault a failure is; decides the log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    Caller,
    Idp,
    Upstream,
    Internal,
}

/// Why a request did not reach its upstream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("no route matches the request path")]
    NoRoute,
    #[error("malformed request: {0}")]
    BadRequest(RequestDefect),
    #[error("request header block too large")]
    HeadersTooLarge,
    #[error("bearer token missing")]
    MissingToken,
    #[error("invalid caller token: {0}")]
    InvalidToken(TokenDefect),
    #[error("caller token lacks a required scope or role")]
    InsufficientScope {
        /// The scopes that would have been accepted, space-separated (empty: none to name).
        scope: String,
        detail: &'static str,
    },
    #[error("the issuer's signing keys are not available yet")]
    KeysUnavailable { retry_after: Duration },
    #[error("the IdP rejected the subject token")]
    IdpRejectedSubject,
    #[error("the IdP asks for more claims (MFA, conditional access)")]
    IdpClaimsChallenge {
        authorization_uri: String,
        /// Base64 of the IdP's claims JSON.
        claims: String,
    },
    #[error("the IdP reports that consent for the route's scopes is missing")]
    IdpConsentRequired { scope: String },
    #[error("the IdP refused the sidecar's token request; check the identity configuration")]
    IdpMisconfigured,
    #[error("the IdP is unavailable")]
    IdpUnavailable { retry_after: Option<Duration> },
    #[error("the request's deadline ran out while acquiring its upstream token")]
    TokenDeadline,
    #[error("upstream unreachable")]
    UpstreamConnect(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the upstream switched protocols unasked")]
    UpstreamSwitched,
    #[error("upstream did not answer in time")]
    UpstreamTimeout,
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// Microsoft's sidecar endpoints (SPEC §16): an API name that is no route served there. Their 400 and
    /// their words, so a client that matches on them keeps working.
    #[error(
        "No scopes found for the API '{0}' or in optionsOverride. 'scopes' needs to be either a single value or a list of values."
    )]
    UnknownApi(String),
    /// Too many `/DownstreamApi` answers are being read at once (each is buffered).
    #[error("too many downstream answers are being read; retry shortly")]
    Busy,
    /// An `…Unauthenticated/{api}` call for a route that validates its callers.
    #[error("The API '{0}' requires an authenticated caller: call it without 'Unauthenticated'.")]
    ApiNeedsCaller(String),
}

impl ProxyError {
    /// A short code for why a caller was refused (401, 403), for the access log: what was wrong, never the
    /// token. `None` for other answers.
    pub(crate) fn reason(&self) -> Option<std::borrow::Cow<'static, str>> {
        use std::borrow::Cow;
        Some(match self {
            ProxyError::MissingToken => Cow::Borrowed("missing_token"),
            ProxyError::InvalidToken(defect) => Cow::Owned(format!("invalid_token:{defect:?}")),
            ProxyError::InsufficientScope { .. } => Cow::Borrowed("insufficient_scope"),
            ProxyError::IdpRejectedSubject => Cow::Borrowed("idp_rejected_subject"),
            ProxyError::IdpClaimsChallenge { .. } => Cow::Borrowed("claims_challenge"),
            ProxyError::IdpConsentRequired { .. } => Cow::Borrowed("consent_required"),
            _ => return None,
        })
    }
}

impl ProxyError {
    pub(crate) fn fault(&self) -> Fault {
        match self {
            ProxyError::NoRoute
            | ProxyError::BadRequest(_)
            | ProxyError::HeadersTooLarge
            | ProxyError::MissingToken
            | ProxyError::InvalidToken(_)
            | ProxyError::InsufficientScope { .. }
            | ProxyError::IdpRejectedSubject
            | ProxyError::IdpClaimsChallenge { .. }
            | ProxyError::IdpConsentRequired { .. }
            | ProxyError::UnknownApi(_)
            | ProxyError::ApiNeedsCaller(_) => Fault::Caller,
            ProxyError::KeysUnavailable { .. }
            | ProxyError::IdpUnavailable { .. }
            | ProxyError::TokenDeadline => Fault::Idp,
            ProxyError::UpstreamConnect(_)
            | ProxyError::UpstreamSwitched
            | ProxyError::UpstreamTimeout
            | ProxyError::Busy => Fault::Upstream,
            ProxyError::IdpMisconfigured | ProxyError::Internal(_) => Fault::Internal,
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::BadRequest(_)
            | ProxyError::UnknownApi(_)
            | ProxyError::ApiNeedsCaller(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::MissingToken
            | ProxyError::InvalidToken(_)
            | ProxyError::IdpRejectedSubject
            | ProxyError::IdpClaimsChallenge { .. } => StatusCode::UNAUTHORIZED,
            ProxyError::InsufficientScope { .. } | ProxyError::IdpConsentRequired { .. } => {
                StatusCode::FORBIDDEN
            }
            ProxyError::KeysUnavailable { .. }
            | ProxyError::IdpUnavailable { .. }
            | ProxyError::TokenDeadline
            | ProxyError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::IdpMisconfigured | ProxyError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ProxyError::UpstreamConnect(_) | ProxyError::UpstreamSwitched => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The RFC 6750 §3 challenge, for 401 and 403.
    fn challenge(&self) -> Option<String> {
        match self {
            ProxyError::MissingToken => Some("Bearer".to_owned()),
            ProxyError::InvalidToken(description) => Some(format!(
                "Bearer error=\"invalid_token\", error_description=\"{description}\""
            )),
            ProxyError::IdpRejectedSubject => Some(
                "Bearer error=\"invalid_token\", error_description=\"the IdP rejected the token for this exchange\""
                    .to_owned(),
            ),
            ProxyError::InsufficientScope { scope, .. } | ProxyError::IdpConsentRequired { scope } => {
                Some(if scope.is_empty() {
                    "Bearer error=\"insufficient_scope\"".to_owned()
                } else {
                    format!("Bearer error=\"insufficient_scope\", scope=\"{}\"", quoted_safe(scope))
                })
            }
            ProxyError::IdpClaimsChallenge {
                authorization_uri,
                claims,
            } => Some(format!(
                "Bearer realm=\"\", authorization_uri=\"{}\", error=\"insufficient_claims\", claims=\"{claims}\"",
                quoted_safe(authorization_uri)
            )),
            ProxyError::NoRoute
            | ProxyError::BadRequest(_)
            | ProxyError::HeadersTooLarge
            | ProxyError::KeysUnavailable { .. }
            | ProxyError::IdpMisconfigured
            | ProxyError::IdpUnavailable { .. }
            | ProxyError::TokenDeadline
            | ProxyError::UpstreamConnect(_)
            | ProxyError::UpstreamSwitched
            | ProxyError::UpstreamTimeout
            | ProxyError::Internal(_)
            | ProxyError::UnknownApi(_)
            | ProxyError::ApiNeedsCaller(_)
            | ProxyError::Busy => None,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ProxyError::KeysUnavailable { retry_after } => Some(*retry_after),
            ProxyError::IdpUnavailable { retry_after } => *retry_after,
            ProxyError::Busy => Some(Duration::from_secs(1)),
            ProxyError::NoRoute
            | ProxyError::BadRequest(_)
            | ProxyError::HeadersTooLarge
            | ProxyError::MissingToken
            | ProxyError::InvalidToken(_)
            | ProxyError::InsufficientScope { .. }
            | ProxyError::IdpRejectedSubject
            | ProxyError::IdpClaimsChallenge { .. }
            | ProxyError::IdpConsentRequired { .. }
            | ProxyError::IdpMisconfigured
            | ProxyError::TokenDeadline
            | ProxyError::UpstreamConnect(_)
            | ProxyError::UpstreamSwitched
            | ProxyError::UpstreamTimeout
            | ProxyError::Internal(_)
            | ProxyError::UnknownApi(_)
            | ProxyError::ApiNeedsCaller(_) => None,
        }
    }

    /// The problem `type` and `title` (RFC 9457 §3.1).
    fn kind(&self) -> (&'static str, &'static str) {
        match self {
            ProxyError::NoRoute => ("no-route", "No route"),
            ProxyError::BadRequest(_) => ("bad-request", "Bad request"),
            ProxyError::HeadersTooLarge => ("headers-too-large", "Request header fields too large"),
            ProxyError::MissingToken => ("missing-token", "Bearer token required"),
            ProxyError::InvalidToken(_) => ("invalid-token", "Invalid token"),
            ProxyError::InsufficientScope { .. } => ("insufficient-scope", "Insufficient scope"),
            ProxyError::KeysUnavailable { .. } => ("keys-unavailable", "Signing keys unavailable"),
            ProxyError::IdpRejectedSubject => ("idp-invalid-grant", "Token rejected by the IdP"),
            ProxyError::IdpClaimsChallenge { .. } => {
                ("idp-claims-challenge", "Additional claims required")
            }
            ProxyError::IdpConsentRequired { .. } => ("idp-consent-required", "Consent required"),
            ProxyError::IdpMisconfigured => ("idp-misconfigured", "Token request refused"),
            ProxyError::IdpUnavailable { .. } => ("idp-unavailable", "IdP unavailable"),
            ProxyError::TokenDeadline => ("token-deadline", "Token acquisition timed out"),
            ProxyError::UpstreamConnect(_) => ("upstream-unreachable", "Upstream unreachable"),
            ProxyError::UpstreamSwitched => ("upstream-switched", "Upstream switched protocols"),
            ProxyError::UpstreamTimeout => ("upstream-timeout", "Upstream timeout"),
            ProxyError::Internal(_) => ("internal", "Internal error"),
            ProxyError::UnknownApi(_) => ("unknown-api", "Bad Request"),
            ProxyError::ApiNeedsCaller(_) => ("api-needs-caller", "Bad Request"),
            ProxyError::Busy => ("busy", "Busy"),
        }
    }

    /// What the caller is told. Internal details (IdP error codes, upstream addresses) stay in the log.
    fn detail(&self) -> String {
        match self {
            ProxyError::InsufficientScope { detail, .. } => (*detail).to_owned(),
            ProxyError::IdpMisconfigured => {
                "the sidecar's token request was refused by the IdP".to_owned()
            }
            ProxyError::UpstreamConnect(_) => "upstream unreachable".to_owned(),
            ProxyError::NoRoute
            | ProxyError::BadRequest(_)
            | ProxyError::HeadersTooLarge
            | ProxyError::MissingToken
            | ProxyError::InvalidToken(_)
            | ProxyError::KeysUnavailable { .. }
            | ProxyError::IdpRejectedSubject
            | ProxyError::IdpClaimsChallenge { .. }
            | ProxyError::IdpConsentRequired { .. }
            | ProxyError::IdpUnavailable { .. }
            | ProxyError::TokenDeadline
            | ProxyError::UpstreamSwitched
            | ProxyError::UpstreamTimeout
            | ProxyError::Internal(_)
            | ProxyError::UnknownApi(_)
            | ProxyError::ApiNeedsCaller(_)
            | ProxyError::Busy => self.to_string(),
        }
    }

    /// The response the caller gets.
    pub(crate) fn to_response<B: From<Bytes>>(&self) -> Response<B> {
        let status = self.status();
        let (kind, title) = self.kind();
        let body = serde_json::json!({
            "type": format!("urn:obo-sidecar:problem:{kind}"),
            "title": title,
            "status": status.as_u16(),
            "detail": self.detail(),
        });
        let mut response = Response::new(B::from(Bytes::from(body.to_string())));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(challenge) = self.challenge()
            && let Ok(value) = HeaderValue::from_str(&challenge)
        {
            headers.insert(header::WWW_AUTHENTICATE, value);
        }
        if let Some(after) = self.retry_after() {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(after.as_secs().max(1)),
            );
        }
        response
    }
}

/// Keeps a value inside an RFC 7235 quoted-string: no quotes, backslashes or control characters.
fn quoted_safe(value: &str) -> String {
    value
        .chars()
        .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
        .collect()
}

/// An error and its sources on one line, for logs.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    type FullBody = http_body_util::Full<Bytes>;

    fn response(error: &ProxyError) -> Response<FullBody> {
        error.to_response()
    }

    fn challenge(r: &Response<FullBody>) -> Option<&str> {
        r.headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
    }

    #[test]
    fn no_route_is_404() {
        let r = response(&ProxyError::NoRoute);
        assert_eq!(r.status(), 404);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert!(challenge(&r).is_none());
    }

    #[test]
    fn bad_request_is_400() {
        assert_eq!(
            response(&ProxyError::BadRequest(RequestDefect::EncodedSlash)).status(),
            400
        );
    }

    /// Microsoft's sidecar endpoints: their 400 (with their text) for an unknown API, a distinct 400 for an
    /// `…Unauthenticated` call to a route that validates callers, and 503 with `Retry-After` when too many
    /// downstream answers are being read.
    #[test]
    fn microsoft_endpoint_refusals_have_their_statuses() {
        let unknown = response(&ProxyError::UnknownApi("graph".to_owned()));
        assert_eq!(unknown.status(), 400);
        assert!(challenge(&unknown).is_none());
        assert!(
            ProxyError::UnknownApi("graph".to_owned())
                .to_string()
                .starts_with("No scopes found for the API 'graph'")
        );
        assert_eq!(
            response(&ProxyError::ApiNeedsCaller("graph".to_owned())).status(),
            400
        );
        let busy = response(&ProxyError::Busy);
        assert_eq!(busy.status(), 503);
        assert_eq!(busy.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn headers_too_large_is_431() {
        assert_eq!(response(&ProxyError::HeadersTooLarge).status(), 431);
    }

    #[test]
    fn missing_token_is_401_with_bare_bearer() {
        let r = response(&ProxyError::MissingToken);
        assert_eq!(r.status(), 401);
        assert_eq!(challenge(&r), Some("Bearer"));
    }

    #[test]
    fn invalid_token_is_401_invalid_token() {
        let r = response(&ProxyError::InvalidToken(TokenDefect::Expired));
        assert_eq!(r.status(), 401);
        assert_eq!(
            challenge(&r),
            Some("Bearer error=\"invalid_token\", error_description=\"token expired\"")
        );
    }

    #[test]
    fn insufficient_scope_is_403_with_scope() {
        let r = response(&ProxyError::InsufficientScope {
            scope: "access_as_user".to_owned(),
            detail: "missing scope",
        });
        assert_eq!(r.status(), 403);
        assert_eq!(
            challenge(&r),
            Some("Bearer error=\"insufficient_scope\", scope=\"access_as_user\"")
        );
    }

    #[test]
    fn keys_unavailable_is_503_with_retry_after() {
        let r = response(&ProxyError::KeysUnavailable {
            retry_after: Duration::from_secs(5),
        });
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[header::RETRY_AFTER], "5");
    }

    #[test]
    fn idp_rejected_subject_is_401_invalid_token() {
        let r = response(&ProxyError::IdpRejectedSubject);
        assert_eq!(r.status(), 401);
        assert!(challenge(&r).is_some_and(|c| c.starts_with("Bearer error=\"invalid_token\"")));
    }

    #[test]
    fn idp_claims_challenge_is_401_insufficient_claims() {
        let r = response(&ProxyError::IdpClaimsChallenge {
            authorization_uri: "https://login.example.com/t/oauth2/v2.0/authorize".to_owned(),
            claims: "eyJhY2Nlc3NfdG9rZW4iOnt9fQ==".to_owned(),
        });
        assert_eq!(r.status(), 401);
        assert_eq!(
            challenge(&r),
            Some(
                "Bearer realm=\"\", authorization_uri=\"https://login.example.com/t/oauth2/v2.0/authorize\", \
                 error=\"insufficient_claims\", claims=\"eyJhY2Nlc3NfdG9rZW4iOnt9fQ==\""
            )
        );
    }

    #[test]
    fn idp_consent_required_is_403_insufficient_scope() {
        let r = response(&ProxyError::IdpConsentRequired {
            scope: "https://graph.example.com/.default".to_owned(),
        });
        assert_eq!(r.status(), 403);
        assert!(challenge(&r).is_some_and(|c| c.contains("insufficient_scope")));
    }

    #[test]
    fn idp_misconfigured_is_500_without_details() {
        let r = response(&ProxyError::IdpMisconfigured);
        assert_eq!(r.status(), 500);
        assert!(challenge(&r).is_none());
    }

    #[test]
    fn idp_unavailable_is_503_with_retry_after_when_known() {
        let r = response(&ProxyError::IdpUnavailable {
            retry_after: Some(Duration::from_secs(7)),
        });
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
        let r = response(&ProxyError::IdpUnavailable { retry_after: None });
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn token_deadline_is_503() {
        assert_eq!(response(&ProxyError::TokenDeadline).status(), 503);
    }

    #[test]
    fn upstream_connect_is_502() {
        let r = response(&ProxyError::UpstreamConnect("refused".into()));
        assert_eq!(r.status(), 502);
    }

    #[test]
    fn upstream_switched_is_502() {
        assert_eq!(response(&ProxyError::UpstreamSwitched).status(), 502);
    }

    #[test]
    fn upstream_timeout_is_504() {
        assert_eq!(response(&ProxyError::UpstreamTimeout).status(), 504);
    }

    #[test]
    fn internal_is_500() {
        assert_eq!(response(&ProxyError::Internal("bug")).status(), 500);
    }
}
