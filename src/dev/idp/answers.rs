//! How the development IdP answers: JSON bodies, OAuth 2.0 error answers (RFC 6749 §5.2), and request bodies
//! read within a bound.

use std::fmt;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde_json::{Map, Value, json};

use super::types::MAX_BODY_BYTES;

pub(super) type Body = Full<Bytes>;

pub(super) fn method_not_allowed() -> Response<Body> {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this method is not allowed on this path",
    )
}

pub(super) fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub(super) fn error_response(status: StatusCode, error: &str, description: &str) -> Response<Body> {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

/// Reads a whole request body of at most [`MAX_BODY_BYTES`].
pub(super) async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
) -> Result<Bytes, Response<Body>> {
    let too_large = || {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            "the request body is larger than 1 MiB",
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(_) => Err(error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the request body could not be read",
        )),
    }
}

/// An OAuth 2.0 error answer (RFC 6749 §5.2), with Entra's `error_codes` where one applies.
#[derive(Debug)]
pub(super) struct OAuthError {
    pub(super) status: StatusCode,
    pub(super) body: Map<String, Value>,
    pub(super) basic_challenge: bool,
}

impl OAuthError {
    pub(super) fn new(status: StatusCode, error: &str, description: impl Into<String>) -> Self {
        let mut body = Map::new();
        body.insert("error".into(), json!(error));
        body.insert("error_description".into(), json!(description.into()));
        Self {
            status,
            body,
            basic_challenge: false,
        }
    }

    pub(super) fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    pub(super) fn invalid_scope(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_scope", description)
    }

    pub(super) fn invalid_client(description: impl Into<String>, basic_challenge: bool) -> Self {
        Self {
            basic_challenge,
            ..Self::new(StatusCode::UNAUTHORIZED, "invalid_client", description)
        }
    }

    pub(super) fn with(mut self, name: &str, value: Value) -> Self {
        self.body.insert(name.into(), value);
        self
    }

    pub(super) fn into_response(self) -> Response<Body> {
        let mut response = json_response(self.status, &Value::Object(self.body));
        if self.basic_challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Basic realm="dev-idp""#),
            );
        }
        response
    }
}

/// Returned by the service to make hyper close the connection without answering
/// ([`Failure::ResetConnection`]).
#[derive(Debug)]
pub(super) struct ConnectionReset;

impl fmt::Display for ConnectionReset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("injected failure: connection closed without an answer")
    }
}

impl std::error::Error for ConnectionReset {}

/// A parsed `application/x-www-form-urlencoded` token request.
pub(super) struct Form(pub(super) Vec<(String, String)>);

impl Form {
    /// A parameter that may appear at most once (RFC 6749 §3.2); an empty value counts as absent (§3.1).
    pub(super) fn single<'a>(&'a self, name: &str) -> Result<Option<&'a str>, OAuthError> {
        let mut values = self
            .0
            .iter()
            .filter(|(field, value)| field == name && !value.is_empty())
            .map(|(_, value)| value.as_str());
        let first = values.next();
        if values.next().is_some() {
            return Err(OAuthError::invalid_request(format!(
                "parameter '{name}' is repeated"
            )));
        }
        Ok(first)
    }

    pub(super) fn required<'a>(&'a self, name: &str) -> Result<&'a str, OAuthError> {
        self.single(name)?.ok_or_else(|| {
            OAuthError::invalid_request(format!("missing required parameter '{name}'"))
        })
    }

    pub(super) fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(field, value)| field == name && !value.is_empty())
            .map(|(_, value)| value.as_str())
    }
}
