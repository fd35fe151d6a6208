//! Failures the token endpoint answers on demand ([`super::Failure`]).

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};

use super::answers::{Body, OAuthError, error_response};
use super::types::Failure;

/// What an injected [`Failure`] does to one token request.
pub(super) enum Injection {
    /// Answer this instead.
    Answer(Response<Body>),
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// Answer normally, then rewrite a successful answer.
    Reshape(Reshape),
    /// Close the connection without answering.
    Reset,
}

/// A rewrite of a successful token answer.
#[derive(Clone, Debug)]
pub(super) enum Reshape {
    NotBearer,
    NoExpiresIn,
    /// `expires_in` set to this JSON text (a string when it does not parse as JSON).
    ExpiresIn(String),
}

impl Reshape {
    pub(super) fn apply(self, body: &mut Value) {
        let Some(object) = body.as_object_mut() else {
            return;
        };
        match self {
            Reshape::NotBearer => {
                object.insert("token_type".into(), json!("N_A"));
            }
            Reshape::NoExpiresIn => {
                object.remove("expires_in");
                object.remove("ext_expires_in");
            }
            Reshape::ExpiresIn(text) => {
                let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
                object.insert("expires_in".into(), value);
            }
        }
    }
}

pub(super) fn injection(failure: Failure) -> Injection {
    let answer = match failure {
        Failure::Delay(delay) => return Injection::Delay(delay),
        Failure::NotBearer => return Injection::Reshape(Reshape::NotBearer),
        Failure::ExpiresInAbsent => return Injection::Reshape(Reshape::NoExpiresIn),
        Failure::ExpiresIn(text) => return Injection::Reshape(Reshape::ExpiresIn(text)),
        Failure::ResetConnection => return Injection::Reset,
        Failure::ServerError => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "injected failure: the dev IdP is pretending to be down",
        ),
        Failure::TooManyRequests { retry_after_secs } => {
            let mut response = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "temporarily_unavailable",
                "injected failure: too many requests",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            response
        }
        Failure::InvalidGrant => OAuthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "AADSTS50013: Assertion failed signature validation.",
        )
        .with("error_codes", json!([50013]))
        .into_response(),
        Failure::InteractionRequired { claims } => OAuthError::new(
            StatusCode::BAD_REQUEST,
            "interaction_required",
            "AADSTS50076: Due to a configuration change made by your administrator, or because you \
             moved to a new location, you must use multi-factor authentication to access the resource.",
        )
        .with("error_codes", json!([50076]))
        .with("suberror", json!("basic_action"))
        .with("claims", json!(claims))
        .into_response(),
        Failure::ConsentRequired => OAuthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "AADSTS65001: The user or administrator has not consented to use the application.",
        )
        .with("error_codes", json!([65001]))
        .with("suberror", json!("consent_required"))
        .into_response(),
        Failure::InvalidClient => {
            OAuthError::invalid_client("AADSTS7000215: Invalid client secret provided.", false)
                .with("error_codes", json!([7_000_215]))
                .into_response()
        }
        Failure::NonJson200 => {
            let mut response = Response::new(Full::new(Bytes::from_static(
                b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head>\
                  <body><p>Injected failure: not a token response.</p></body></html>\n",
            )));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            response
        }
        Failure::EmptyBody200 => {
            let mut response = Response::new(Full::new(Bytes::new()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
    };
    Injection::Answer(answer)
}
