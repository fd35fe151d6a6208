//! How a token request's client is authenticated: a secret (post or Basic), a `private_key_jwt` assertion
//! signed with its registered certificate's key, or a federated assertion the IdP itself signed.

use crate::oauth::CLIENT_ASSERTION_TYPE as CLIENT_ASSERTION_TYPE_JWT_BEARER;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http::header::{self, HeaderMap};
use serde_json::{Map, Value, json};

use super::answers::{Form, OAuthError};
use super::state::{Authority, State};
use super::types::{ClientAuth, DevClient, now_secs};

/// The credential of an `Authorization: Basic` header, if one was sent.
pub(super) enum BasicCredential {
    Absent,
    Malformed,
    Present { client_id: String, secret: String },
}

/// Parses `Authorization: Basic base64(urlencode(id) ":" urlencode(secret))` (RFC 6749 §2.3.1).
pub(super) fn basic_credential(headers: &HeaderMap) -> BasicCredential {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return BasicCredential::Absent;
    };
    let Some((scheme, encoded)) = value.to_str().ok().and_then(|v| v.trim().split_once(' ')) else {
        return BasicCredential::Absent;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return BasicCredential::Absent;
    }
    let decoded = STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok());
    let Some((id, secret)) = decoded.as_deref().and_then(|text| text.split_once(':')) else {
        return BasicCredential::Malformed;
    };
    let form_decode = |part: &str| {
        percent_encoding::percent_decode_str(&part.replace('+', " "))
            .decode_utf8()
            .ok()
            .map(std::borrow::Cow::into_owned)
    };
    match (form_decode(id), form_decode(secret)) {
        (Some(client_id), Some(secret)) => BasicCredential::Present { client_id, secret },
        _ => BasicCredential::Malformed,
    }
}

/// How a request presents its client credential, and its `client_assertion`'s `alg`, read from its syntax
/// alone (for [`RecordedTokenRequest`]); [`authenticate_client`] decides whether the credential is valid.
pub(super) fn presented_client_auth(
    form: &Form,
    has_basic: bool,
) -> (Option<ClientAuth>, Option<String>) {
    if let Some(assertion) = form.all("client_assertion").next() {
        let form_client_id = form.all("client_id").next();
        return match Jws::parse(assertion) {
            Some(jws) => (
                Some(assertion_kind(&jws, form_client_id)),
                jws.header
                    .get("alg")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            ),
            None => (Some(ClientAuth::PrivateKeyJwt), None),
        };
    }
    if has_basic {
        (Some(ClientAuth::SecretBasic), None)
    } else if form.all("client_secret").next().is_some() {
        (Some(ClientAuth::SecretPost), None)
    } else {
        (None, None)
    }
}

/// Which kind of `client_assertion` this is: `private_key_jwt` when its header names a certificate
/// (`x5t#S256`) or its `iss` is the client (RFC 7523 §3: `iss` and `sub` are the `client_id`, which may then be
/// left out of the form); otherwise a federated token presented for the form's `client_id`.
pub(super) fn assertion_kind(jws: &Jws<'_>, form_client_id: Option<&str>) -> ClientAuth {
    let iss = jws.claims.get("iss").and_then(Value::as_str);
    let names_client = form_client_id.is_none_or(|client_id| iss == Some(client_id));
    if jws.header.contains_key("x5t#S256") || names_client {
        ClientAuth::PrivateKeyJwt
    } else {
        ClientAuth::FederatedAssertion
    }
}

/// One client authentication method per request (RFC 6749 §2.3): `client_secret_post`,
/// `client_secret_basic`, or a `client_assertion` (RFC 7521 §4.2).
pub(super) fn authenticate_client(
    state: &State,
    authority: &Authority,
    form: &Form,
    basic: BasicCredential,
) -> Result<Arc<DevClient>, OAuthError> {
    let form_id = form.single("client_id")?;
    let form_secret = form.single("client_secret")?;
    if let Some(assertion) = form.single("client_assertion")? {
        if form_secret.is_some() || !matches!(basic, BasicCredential::Absent) {
            return Err(OAuthError::invalid_request(
                "more than one client authentication method was used",
            ));
        }
        if form.single("client_assertion_type")? != Some(CLIENT_ASSERTION_TYPE_JWT_BEARER) {
            return Err(OAuthError::invalid_request(format!(
                "AADSTS50027: client_assertion_type must be '{CLIENT_ASSERTION_TYPE_JWT_BEARER}'."
            )));
        }
        return state
            .authenticate_assertion(authority, assertion, form_id)
            .map_err(AssertionRejection::into_error);
    }
    let (client_id, secret, used_basic) = match basic {
        BasicCredential::Malformed => {
            return Err(OAuthError::invalid_client(
                "malformed Authorization: Basic header",
                true,
            ));
        }
        BasicCredential::Present { client_id, secret } => {
            if form_secret.is_some() {
                return Err(OAuthError::invalid_request(
                    "more than one client authentication method was used",
                ));
            }
            if form_id.is_some_and(|id| id != client_id) {
                return Err(OAuthError::invalid_client(
                    "client_id in the form differs from the Authorization header",
                    true,
                ));
            }
            (client_id, secret, true)
        }
        BasicCredential::Absent => match (form_id, form_secret) {
            (Some(id), Some(secret)) => (id.to_owned(), secret.to_owned(), false),
            _ => {
                return Err(OAuthError::invalid_client(
                    "AADSTS7000216: 'client_assertion', 'client_secret' or 'request' is required \
                     for the grant type.",
                    false,
                )
                .with("error_codes", json!([7_000_216])));
            }
        },
    };
    state
        .client(&client_id)
        .filter(|client| {
            [&client.client_secret, &client.retiring_secret]
                .into_iter()
                .flatten()
                .any(|registered| {
                    aws_lc_rs::constant_time::verify_slices_are_equal(
                        registered.as_bytes(),
                        secret.as_bytes(),
                    )
                    .is_ok()
                })
        })
        .ok_or_else(|| {
            OAuthError::invalid_client("AADSTS7000215: Invalid client secret provided.", used_basic)
                .with("error_codes", json!([7_000_215]))
        })
}

/// Why a `client_assertion` was refused: always 401 `invalid_client` (RFC 7521 §4.2.1). The assertion itself
/// is never quoted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AssertionRejection {
    Malformed,
    CriticalHeader,
    Algorithm,
    UnknownClient,
    NoCertificate,
    Thumbprint,
    Signature,
    NotTheClient,
    Audience,
    Expired,
    TooLong,
    NotYetValid,
    MissingJti,
    Replayed,
    NoFederatedCredential,
    FederatedAudience,
    FederatedSubject,
}

impl AssertionRejection {
    pub(super) fn code_and_description(self) -> (u32, &'static str) {
        match self {
            AssertionRejection::Malformed => (
                50027,
                "AADSTS50027: The client assertion is not a well-formed JWT.",
            ),
            AssertionRejection::CriticalHeader => (
                700_027,
                "AADSTS700027: Client assertion failed signature validation. [Reason - the header has \
                 a 'crit' parameter.]",
            ),
            AssertionRejection::Algorithm => (
                700_027,
                "AADSTS700027: Client assertion failed signature validation. [Reason - alg must be \
                 PS256 or RS256 with a certificate, RS256 for a federated assertion.]",
            ),
            AssertionRejection::UnknownClient => (
                700_016,
                "AADSTS700016: The application named by the client assertion was not found.",
            ),
            AssertionRejection::NoCertificate => (
                700_027,
                "AADSTS700027: Client assertion contains an invalid signature. [Reason - no \
                 certificate is registered for the client.]",
            ),
            AssertionRejection::Thumbprint => (
                700_027,
                "AADSTS700027: Client assertion contains an invalid signature. [Reason - x5t#S256 does \
                 not match the registered certificate.]",
            ),
            AssertionRejection::Signature => (
                700_027,
                "AADSTS700027: Client assertion contains an invalid signature.",
            ),
            AssertionRejection::NotTheClient => (
                700_021,
                "AADSTS700021: Client assertion application identifier doesn't match 'client_id' \
                 parameter. [Reason - iss and sub must both be the client_id.]",
            ),
            AssertionRejection::Audience => (
                700_027,
                "AADSTS700027: Client assertion failed validation. [Reason - aud must be the token \
                 endpoint or the issuer.]",
            ),
            AssertionRejection::Expired => (
                700_024,
                "AADSTS700024: Client assertion is not within its valid time range. [Reason - the \
                 assertion is expired or has no numeric exp.]",
            ),
            AssertionRejection::TooLong => (
                700_024,
                "AADSTS700024: Client assertion is not within its valid time range. [Reason - exp is \
                 more than 10 minutes ahead.]",
            ),
            AssertionRejection::NotYetValid => (
                700_024,
                "AADSTS700024: Client assertion is not within its valid time range. [Reason - the \
                 assertion is not yet valid.]",
            ),
            AssertionRejection::MissingJti => (
                700_027,
                "AADSTS700027: Client assertion failed validation. [Reason - jti is missing.]",
            ),
            AssertionRejection::Replayed => (
                700_027,
                "AADSTS700027: Client assertion failed validation: jti replayed.",
            ),
            AssertionRejection::NoFederatedCredential => (
                70_021,
                "AADSTS70021: No matching federated identity record found for presented assertion.",
            ),
            AssertionRejection::FederatedAudience => (
                700_212,
                "AADSTS700212: No matching federated identity record found for presented assertion \
                 audience.",
            ),
            AssertionRejection::FederatedSubject => (
                700_213,
                "AADSTS700213: No matching federated identity record found for presented assertion \
                 subject.",
            ),
        }
    }

    pub(super) fn into_error(self) -> OAuthError {
        let (code, description) = self.code_and_description();
        OAuthError::invalid_client(description, false).with("error_codes", json!([code]))
    }
}

/// A compact JWS (RFC 7515 §7.1) split and decoded; its signature is not yet checked.
pub(super) struct Jws<'a> {
    pub(super) header: Map<String, Value>,
    pub(super) claims: Map<String, Value>,
    /// `header.payload`, the signing input (RFC 7515 §5.2).
    pub(super) signing_input: &'a str,
    pub(super) signature: Vec<u8>,
}

impl<'a> Jws<'a> {
    /// `None` unless `token` is exactly three base64url segments, the first two JSON objects.
    pub(super) fn parse(token: &'a str) -> Option<Self> {
        let mut segments = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return None;
        };
        Some(Self {
            header: crate::jwt::decode_object(header)?,
            claims: crate::jwt::decode_object(payload)?,
            signing_input: &token[..header.len() + 1 + payload.len()],
            signature: URL_SAFE_NO_PAD.decode(signature).ok()?,
        })
    }

    pub(super) fn alg(&self) -> Option<&str> {
        self.header.get("alg").and_then(Value::as_str)
    }

    pub(super) fn claim(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    /// Whether `aud` is `audience` or an array holding one of `audiences`.
    pub(super) fn audience_is_one_of(&self, audiences: &[&str]) -> bool {
        match self.claims.get("aud") {
            Some(Value::String(aud)) => audiences.contains(&aud.as_str()),
            Some(Value::Array(auds)) => auds
                .iter()
                .filter_map(Value::as_str)
                .any(|aud| audiences.contains(&aud)),
            _ => false,
        }
    }
}

#[allow(clippy::cast_precision_loss)]
// Seconds since 1970 stay far below 2^52, where f64 is exact.
pub(super) fn now_f64() -> f64 {
    now_secs() as f64
}
