//! The token endpoint's grants: client credentials, Entra-style jwt-bearer On-Behalf-Of and RFC 8693 token
//! exchange, each checking the subject token this IdP signed.

use crate::oauth::{
    GRANT_CLIENT_CREDENTIALS, GRANT_JWT_BEARER, GRANT_TOKEN_EXCHANGE, TOKEN_TYPE_ACCESS_TOKEN,
    TOKEN_TYPE_JWT,
};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use rustls_pki_types::CertificateDer;
use serde_json::{Map, Value, json};

use super::answers::{Body, ConnectionReset, Form, OAuthError, json_response, read_body};
use super::client_auth::{
    AssertionRejection, BasicCredential, Jws, assertion_kind, authenticate_client,
    basic_credential, now_f64, presented_client_auth,
};
use super::faults::{Injection, injection};
use super::state::{Authority, State};
use super::types::{
    ClientAuth, DevClient, FEDERATED_AUDIENCE, MAX_CLIENT_ASSERTION_LIFETIME, REDACTED,
    RecordedTokenRequest, derive_oid, lock,
};

/// `POST /token` and `POST /{tenant}/oauth2/v2.0/token`: the same checks, the tokens issued for `authority`.
pub(super) async fn token(
    state: &State,
    request: Request<Incoming>,
    authority: &Authority,
) -> Result<Response<Body>, ConnectionReset> {
    state.token_requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = request.into_parts();
    let client_request_id = parts
        .headers
        .get("client-request-id")
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    let basic = basic_credential(&parts.headers);
    let has_basic = !matches!(basic, BasicCredential::Absent);
    let bytes = match read_body(&parts.headers, body).await {
        Ok(bytes) => bytes,
        Err(response) => {
            lock(&state.recorded).push(RecordedTokenRequest {
                grant_type: None,
                form: Vec::new(),
                basic_auth: has_basic,
                client_auth: has_basic.then_some(ClientAuth::SecretBasic),
                assertion_alg: None,
                client_request_id,
                tenant: authority.tenant.clone(),
            });
            return Ok(response);
        }
    };
    let form = Form(url::form_urlencoded::parse(&bytes).into_owned().collect());
    let (client_auth, assertion_alg) = presented_client_auth(&form, has_basic);
    lock(&state.recorded).push(RecordedTokenRequest {
        grant_type: form.all("grant_type").next().map(str::to_owned),
        form: form
            .0
            .iter()
            .map(|(name, value)| {
                let value = match name.as_str() {
                    "client_secret" | "client_assertion" => REDACTED.to_owned(),
                    _ => value.clone(),
                };
                (name.clone(), value)
            })
            .collect(),
        basic_auth: has_basic,
        client_auth,
        assertion_alg,
        client_request_id,
        tenant: authority.tenant.clone(),
    });

    let mut reshape = None;
    if let Some(failure) = state.take_failure() {
        tracing::debug!(?failure, "dev IdP token endpoint injecting a failure");
        match injection(failure) {
            Injection::Answer(response) => return Ok(response),
            Injection::Delay(delay) => tokio::time::sleep(delay).await,
            Injection::Reshape(how) => reshape = Some(how),
            Injection::Reset => return Err(ConnectionReset),
        }
    }

    let is_form = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value.split(';').next().is_some_and(|mime| {
                mime.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    let outcome = if is_form {
        grant(state, authority, &form, basic)
    } else {
        Err(OAuthError::invalid_request(
            "the token request must be application/x-www-form-urlencoded",
        ))
    };
    let response = match outcome {
        Ok(mut body) => {
            if let Some(how) = reshape {
                how.apply(&mut body);
            }
            let mut response = json_response(StatusCode::OK, &body);
            let headers = response.headers_mut();
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
            response
        }
        Err(error) => {
            tracing::debug!(status = %error.status, error = ?error.body.get("error"), "dev IdP refused a token request");
            error.into_response()
        }
    };
    Ok(response)
}

pub(super) fn grant(
    state: &State,
    authority: &Authority,
    form: &Form,
    basic: BasicCredential,
) -> Result<Value, OAuthError> {
    let grant_type = form.required("grant_type")?;
    let client = authenticate_client(state, authority, form, basic)?;
    match grant_type {
        GRANT_CLIENT_CREDENTIALS => client_credentials(state, authority, form, &client),
        GRANT_JWT_BEARER => on_behalf_of(state, authority, form, &client),
        GRANT_TOKEN_EXCHANGE => token_exchange(state, authority, form, &client),
        _ => Err(OAuthError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "AADSTS70003: The app requested an unsupported grant type.",
        )
        .with("error_codes", json!([70003]))),
    }
}

impl State {
    pub(super) fn authenticate_assertion(
        &self,
        authority: &Authority,
        assertion: &str,
        form_client_id: Option<&str>,
    ) -> Result<Arc<DevClient>, AssertionRejection> {
        let jws = Jws::parse(assertion).ok_or(AssertionRejection::Malformed)?;
        if jws.header.contains_key("crit") {
            return Err(AssertionRejection::CriticalHeader);
        }
        match assertion_kind(&jws, form_client_id) {
            ClientAuth::PrivateKeyJwt => {
                self.verify_private_key_jwt(authority, &jws, form_client_id)
            }
            ClientAuth::FederatedAssertion | ClientAuth::SecretPost | ClientAuth::SecretBasic => {
                self.verify_federated_assertion(&jws, form_client_id)
            }
        }
    }

    /// RFC 7523 §3 with OpenID Connect Core §9: signed (PS256 or RS256) by the key of the client's registered
    /// certificate, `iss` = `sub` = `client_id`, `aud` the token endpoint or the issuer of `authority` (a
    /// tenant's own, on a tenant's endpoint), an `exp` at most [`MAX_CLIENT_ASSERTION_LIFETIME`] ahead, and a
    /// `jti` never seen before for this client.
    pub(super) fn verify_private_key_jwt(
        &self,
        authority: &Authority,
        jws: &Jws<'_>,
        form_client_id: Option<&str>,
    ) -> Result<Arc<DevClient>, AssertionRejection> {
        let algorithm = match jws.alg() {
            Some("PS256") => webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
            Some("RS256") => webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA256,
            _ => return Err(AssertionRejection::Algorithm),
        };
        let iss = jws.claim("iss").ok_or(AssertionRejection::NotTheClient)?;
        if form_client_id.is_some_and(|client_id| client_id != iss) {
            return Err(AssertionRejection::NotTheClient);
        }
        let client = self.client(iss).ok_or(AssertionRejection::UnknownClient)?;
        let registered: Vec<&[u8]> = [&client.certificate_der, &client.retiring_certificate_der]
            .into_iter()
            .flatten()
            .map(Vec::as_slice)
            .collect();
        if registered.is_empty() {
            return Err(AssertionRejection::NoCertificate);
        }
        let certificate = match jws.header.get("x5t#S256") {
            Some(thumbprint) => *registered
                .iter()
                .find(|der| {
                    let expected = URL_SAFE_NO_PAD
                        .encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der));
                    thumbprint.as_str() == Some(expected.as_str())
                })
                .ok_or(AssertionRejection::Thumbprint)?,
            None => registered[0],
        };
        let certificate = CertificateDer::from(certificate);
        let end_entity = webpki::EndEntityCert::try_from(&certificate)
            .map_err(|_| AssertionRejection::NoCertificate)?;
        end_entity
            .verify_signature(algorithm, jws.signing_input.as_bytes(), &jws.signature)
            .map_err(|_| AssertionRejection::Signature)?;
        if jws.claim("sub") != Some(iss) {
            return Err(AssertionRejection::NotTheClient);
        }
        if !jws.audience_is_one_of(&[&authority.token_endpoint, &authority.issuer]) {
            return Err(AssertionRejection::Audience);
        }
        let now = now_f64();
        let exp = jws
            .claims
            .get("exp")
            .and_then(Value::as_f64)
            .ok_or(AssertionRejection::Expired)?;
        if exp <= now {
            return Err(AssertionRejection::Expired);
        }
        #[allow(clippy::cast_precision_loss)]
        // A constant of ten minutes.
        if exp > now + MAX_CLIENT_ASSERTION_LIFETIME.as_secs() as f64 {
            return Err(AssertionRejection::TooLong);
        }
        if jws
            .claims
            .get("nbf")
            .is_some_and(|nbf| nbf.as_f64().is_none_or(|nbf| nbf > now))
        {
            return Err(AssertionRejection::NotYetValid);
        }
        let jti = jws
            .claim("jti")
            .filter(|jti| !jti.is_empty())
            .ok_or(AssertionRejection::MissingJti)?;
        let mut seen = lock(&self.seen_client_assertions);
        seen.retain(|_, seen_exp| *seen_exp > now);
        if seen
            .insert((client.client_id.clone(), jti.to_owned()), exp)
            .is_some()
        {
            return Err(AssertionRejection::Replayed);
        }
        Ok(client)
    }

    /// A federated credential (Azure workload identity): a JWT signed (RS256) by one of the IdP's own
    /// published keys, with `aud` [`FEDERATED_AUDIENCE`], `sub` the client's `federated_subject`, and an `exp`
    /// in the future. Its `iss` is not checked: the signature is what makes the IdP trust it. Such a token is
    /// presented many times until it is rotated, so its `jti` is not remembered.
    pub(super) fn verify_federated_assertion(
        &self,
        jws: &Jws<'_>,
        form_client_id: Option<&str>,
    ) -> Result<Arc<DevClient>, AssertionRejection> {
        let client = form_client_id
            .and_then(|client_id| self.client(client_id))
            .ok_or(AssertionRejection::UnknownClient)?;
        let subject = client
            .federated_subject
            .as_deref()
            .ok_or(AssertionRejection::NoFederatedCredential)?;
        if jws.alg() != Some("RS256") {
            return Err(AssertionRejection::Algorithm);
        }
        if !self.verify_own_signature(jws) {
            return Err(AssertionRejection::Signature);
        }
        let now = now_f64();
        if jws
            .claims
            .get("exp")
            .and_then(Value::as_f64)
            .is_none_or(|exp| exp <= now)
        {
            return Err(AssertionRejection::Expired);
        }
        if jws
            .claims
            .get("nbf")
            .is_some_and(|nbf| nbf.as_f64().is_none_or(|nbf| nbf > now))
        {
            return Err(AssertionRejection::NotYetValid);
        }
        if !jws.audience_is_one_of(&[FEDERATED_AUDIENCE]) {
            return Err(AssertionRejection::FederatedAudience);
        }
        if jws.claim("sub") != Some(subject) {
            return Err(AssertionRejection::FederatedSubject);
        }
        Ok(client)
    }

    /// Whether one of the published keys (the one named by `kid`, if any) signed `jws` with RS256.
    pub(super) fn verify_own_signature(&self, jws: &Jws<'_>) -> bool {
        let kid = jws.header.get("kid").and_then(Value::as_str);
        self.published_keys()
            .iter()
            .filter(|key| kid.is_none_or(|kid| kid == key.kid))
            .any(|key| key.verify(jws.signing_input.as_bytes(), &jws.signature))
    }
}

/// The claims the `claims` request parameter (OpenID Connect Core §5.5) adds to the issued token: as Entra
/// does for Continuous Access Evaluation, the client capabilities in `access_token.xms_cc.values` become the
/// `xms_cc` claim.
pub(super) fn requested_claims(form: &Form) -> Result<Map<String, Value>, OAuthError> {
    let mut extra = Map::new();
    let Some(claims) = form.single("claims")? else {
        return Ok(extra);
    };
    let Ok(Value::Object(claims)) = serde_json::from_str::<Value>(claims) else {
        return Err(OAuthError::invalid_request(
            "AADSTS90014: The claims parameter must be a JSON object.",
        ));
    };
    if let Some(xms_cc) = claims
        .get("access_token")
        .and_then(|access_token| access_token.get("xms_cc"))
    {
        let values = xms_cc
            .get("values")
            .and_then(Value::as_array)
            .filter(|values| values.iter().all(Value::is_string))
            .ok_or_else(|| {
                OAuthError::invalid_request(
                    "AADSTS90014: claims access_token.xms_cc.values must be an array of strings.",
                )
            })?;
        extra.insert("xms_cc".into(), Value::Array(values.clone()));
    }
    Ok(extra)
}

pub(super) fn token_response(state: &State, access_token: &str, scope: Option<String>) -> Value {
    let lifetime = state.config.token_lifetime.as_secs();
    let mut body = json!({
        "token_type": "Bearer",
        "access_token": access_token,
        "expires_in": lifetime,
        "ext_expires_in": lifetime,
    });
    if let (Some(scope), Some(object)) = (scope, body.as_object_mut()) {
        object.insert("scope".into(), json!(scope));
    }
    body
}

pub(super) fn client_credentials(
    state: &State,
    authority: &Authority,
    form: &Form,
    client: &DevClient,
) -> Result<Value, OAuthError> {
    let scope = form.required("scope")?;
    let scopes: Vec<&str> = scope.split_whitespace().collect();
    let resource = match scopes.as_slice() {
        [only] => only
            .strip_suffix("/.default")
            .filter(|resource| !resource.is_empty()),
        _ => None,
    };
    let extra = requested_claims(form)?;
    let Some(resource) = resource else {
        return Err(OAuthError::invalid_scope(
            "AADSTS1002012: The provided value for scope is not valid. Client credential flows \
             must have a scope value with /.default suffixed to the resource identifier.",
        )
        .with("error_codes", json!([1_002_012])));
    };
    let mut claims = Map::new();
    claims.insert("aud".into(), json!(resource));
    claims.insert("sub".into(), json!(client.client_id));
    claims.insert("oid".into(), json!(client.client_id));
    claims.insert(
        "tid".into(),
        json!(
            authority
                .tenant
                .as_deref()
                .unwrap_or(&state.config.tenant_id)
        ),
    );
    claims.insert("azp".into(), json!(client.client_id));
    claims.insert("idtyp".into(), json!("app"));
    let access_token = state.issue(
        &authority.issuer,
        claims,
        state.config.token_lifetime,
        &extra,
    );
    tracing::debug!(client_id = %client.client_id, %resource, "dev IdP issued a client_credentials token");
    Ok(token_response(state, &access_token, None))
}

/// Scopes of one resource: `<resource>/<name>` each, split at the last `/`.
pub(super) struct ResourceScopes {
    pub(super) resource: String,
    /// The `scp` claim: the scope names, `.default` standing for `user_impersonation`.
    pub(super) scp: String,
    /// The granted scopes, fully qualified, for the response's `scope`.
    pub(super) granted: String,
}

pub(super) fn resource_scopes(scope: &str) -> Result<ResourceScopes, OAuthError> {
    let invalid = || {
        OAuthError::invalid_scope(
            "AADSTS70011: The provided value for the input parameter 'scope' is not valid: every \
             scope must be '<resource>/<name>' for one resource.",
        )
        .with("error_codes", json!([70011]))
    };
    let mut resource: Option<&str> = None;
    let mut names = Vec::new();
    for item in scope.split_whitespace() {
        let (item_resource, name) = item.rsplit_once('/').ok_or_else(invalid)?;
        if item_resource.is_empty() || name.is_empty() || item_resource.ends_with('/') {
            return Err(invalid());
        }
        match resource {
            Some(seen) if seen != item_resource => return Err(invalid()),
            _ => resource = Some(item_resource),
        }
        names.push(if name == ".default" {
            "user_impersonation"
        } else {
            name
        });
    }
    let resource = resource.ok_or_else(invalid)?;
    if names.len() > 1
        && scope
            .split_whitespace()
            .any(|item| item.ends_with("/.default"))
    {
        return Err(invalid());
    }
    let granted = names
        .iter()
        .map(|name| format!("{resource}/{name}"))
        .collect::<Vec<_>>()
        .join(" ");
    Ok(ResourceScopes {
        resource: resource.to_owned(),
        scp: names.join(" "),
        granted,
    })
}

/// Why a subject token (OBO `assertion` or RFC 8693 `subject_token`) was refused. The token itself is never
/// quoted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Rejection {
    Malformed,
    Algorithm,
    Signature,
    Issuer,
    Expired,
    NotYetValid,
    Audience,
}

impl Rejection {
    pub(super) fn code_and_description(self) -> (u32, &'static str) {
        match self {
            Rejection::Malformed => (50027, "AADSTS50027: JWT token is invalid or malformed."),
            Rejection::Algorithm => (
                50013,
                "AADSTS50013: Assertion failed signature validation. [Reason - only RS256 is accepted.]",
            ),
            Rejection::Signature => (50013, "AADSTS50013: Assertion failed signature validation."),
            Rejection::Issuer => (
                50013,
                "AADSTS50013: Assertion failed signature validation. [Reason - the issuer is not trusted.]",
            ),
            Rejection::Expired => (
                500_133,
                "AADSTS500133: Assertion is not within its valid time range. [Reason - the assertion is expired.]",
            ),
            Rejection::NotYetValid => (
                500_133,
                "AADSTS500133: Assertion is not within its valid time range. [Reason - the assertion is not yet valid.]",
            ),
            Rejection::Audience => (
                50013,
                "AADSTS50013: Assertion audience does not match the Client app presenting the assertion.",
            ),
        }
    }

    pub(super) fn into_error(self, error: &str) -> OAuthError {
        let (code, description) = self.code_and_description();
        OAuthError::new(StatusCode::BAD_REQUEST, error, description)
            .with("error_codes", json!([code]))
    }
}

pub(super) fn numeric_claim(
    claims: &Map<String, Value>,
    name: &str,
) -> Result<Option<f64>, Rejection> {
    match claims.get(name) {
        None => Ok(None),
        Some(value) => value.as_f64().map(Some).ok_or(Rejection::Malformed),
    }
}

impl State {
    /// Verifies a subject token this IdP signed: RS256 with a published key, `iss` the root issuer or any
    /// tenant's (whichever endpoint it is presented at), `exp`, `nbf`, and an `aud` naming `client`. Returns
    /// its claims.
    pub(super) fn verify_subject_token(
        &self,
        token: &str,
        client: &DevClient,
    ) -> Result<Map<String, Value>, Rejection> {
        let jws = Jws::parse(token).ok_or(Rejection::Malformed)?;
        if jws.alg() != Some("RS256") {
            return Err(Rejection::Algorithm);
        }
        if !self.verify_own_signature(&jws) {
            return Err(Rejection::Signature);
        }
        let claims = jws.claims;
        if !claims
            .get("iss")
            .and_then(Value::as_str)
            .is_some_and(|iss| self.is_own_issuer(iss))
        {
            return Err(Rejection::Issuer);
        }
        let now = now_f64();
        let exp = numeric_claim(&claims, "exp")?.ok_or(Rejection::Malformed)?;
        if exp <= now {
            return Err(Rejection::Expired);
        }
        if numeric_claim(&claims, "nbf")?.is_some_and(|nbf| nbf > now) {
            return Err(Rejection::NotYetValid);
        }
        let audience_matches = match claims.get("aud") {
            Some(Value::String(aud)) => client.accepts_audience(aud),
            Some(Value::Array(auds)) => auds
                .iter()
                .filter_map(Value::as_str)
                .any(|aud| client.accepts_audience(aud)),
            _ => false,
        };
        if !audience_matches {
            return Err(Rejection::Audience);
        }
        if !claims.get("sub").is_some_and(Value::is_string) {
            return Err(Rejection::Malformed);
        }
        Ok(claims)
    }

    /// A delegated token from `authority` for `audience` (a string, or an array of several) carrying the
    /// subject's `sub`/`oid`/`tid` (and display claims; a tenant's endpoint stamps its own `tid`), then
    /// `extra`.
    pub(super) fn issue_delegated(
        &self,
        authority: &Authority,
        subject: &Map<String, Value>,
        audience: Value,
        scp: Option<&str>,
        client: &DevClient,
        extra: &Map<String, Value>,
    ) -> String {
        let mut claims = Map::new();
        claims.insert("aud".into(), audience);
        let sub = subject
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or_default();
        claims.insert("sub".into(), json!(sub));
        claims.insert(
            "oid".into(),
            subject
                .get("oid")
                .cloned()
                .unwrap_or_else(|| json!(derive_oid(sub))),
        );
        let tid = match &authority.tenant {
            Some(tenant) => json!(tenant),
            None => subject
                .get("tid")
                .cloned()
                .unwrap_or_else(|| json!(self.config.tenant_id)),
        };
        claims.insert("tid".into(), tid);
        for name in ["name", "preferred_username"] {
            if let Some(value) = subject.get(name) {
                claims.insert(name.into(), value.clone());
            }
        }
        if let Some(scp) = scp {
            claims.insert("scp".into(), json!(scp));
        }
        claims.insert("azp".into(), json!(client.client_id));
        self.issue(&authority.issuer, claims, self.config.token_lifetime, extra)
    }
}

/// Entra's On-Behalf-Of flow: `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`,
/// `requested_token_use=on_behalf_of`, the caller's token as `assertion`, and the upstream `scope`.
pub(super) fn on_behalf_of(
    state: &State,
    authority: &Authority,
    form: &Form,
    client: &DevClient,
) -> Result<Value, OAuthError> {
    let requested_token_use = form.required("requested_token_use")?;
    if requested_token_use != "on_behalf_of" {
        return Err(OAuthError::invalid_request(
            "AADSTS70003: requested_token_use must be 'on_behalf_of'.",
        ));
    }
    let assertion = form.required("assertion")?;
    let scopes = resource_scopes(form.required("scope")?)?;
    let extra = requested_claims(form)?;
    let subject = state
        .verify_subject_token(assertion, client)
        .map_err(|rejection| rejection.into_error("invalid_grant"))?;
    let access_token = state.issue_delegated(
        authority,
        &subject,
        json!(scopes.resource),
        Some(&scopes.scp),
        client,
        &extra,
    );
    tracing::debug!(client_id = %client.client_id, resource = %scopes.resource, "dev IdP issued an on-behalf-of token");
    Ok(token_response(state, &access_token, Some(scopes.granted)))
}

/// RFC 8693 token exchange. An invalid `subject_token` is `invalid_request` (RFC 8693 §2.2.2). The token's
/// `aud` is every `audience` (or, without one, every `resource`): a string for one, an array for several.
pub(super) fn token_exchange(
    state: &State,
    authority: &Authority,
    form: &Form,
    client: &DevClient,
) -> Result<Value, OAuthError> {
    let subject_token = form.required("subject_token")?;
    let subject_token_type = form.required("subject_token_type")?;
    if subject_token_type != TOKEN_TYPE_ACCESS_TOKEN {
        return Err(OAuthError::invalid_request(format!(
            "subject_token_type must be '{TOKEN_TYPE_ACCESS_TOKEN}'"
        )));
    }
    if form.single("actor_token")?.is_some() {
        return Err(OAuthError::invalid_request(
            "actor_token (delegation) is not supported by the dev IdP",
        ));
    }
    let issued_token_type = match form.single("requested_token_type")? {
        None => TOKEN_TYPE_ACCESS_TOKEN,
        Some(requested @ (TOKEN_TYPE_ACCESS_TOKEN | TOKEN_TYPE_JWT)) => requested,
        Some(_) => {
            return Err(OAuthError::invalid_request(format!(
                "requested_token_type must be '{TOKEN_TYPE_ACCESS_TOKEN}' or '{TOKEN_TYPE_JWT}'"
            )));
        }
    };
    let extra = requested_claims(form)?;
    let scope = form.single("scope")?;
    let mut audiences: Vec<&str> = form.all("audience").collect();
    if audiences.is_empty() {
        audiences = form.all("resource").collect();
    }
    let audience = match audiences.as_slice() {
        [] => None,
        [only] => Some(json!(only)),
        several => Some(json!(several)),
    };
    let (audience, scp) = match (audience, scope) {
        (Some(audience), scope) => {
            let scp = scope.map(|scope| {
                scope
                    .split_whitespace()
                    .map(|item| match item.rsplit_once('/') {
                        Some((_, ".default")) => "user_impersonation",
                        Some((_, name)) if !name.is_empty() => name,
                        _ => item,
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            });
            (audience, scp)
        }
        (None, Some(scope)) => {
            let scopes = resource_scopes(scope)?;
            (json!(scopes.resource), Some(scopes.scp))
        }
        (None, None) => {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_target",
                "one of audience, resource or scope is required",
            ));
        }
    };
    let subject = state
        .verify_subject_token(subject_token, client)
        .map_err(|rejection| rejection.into_error("invalid_request"))?;
    tracing::debug!(client_id = %client.client_id, %audience, "dev IdP issuing a token-exchange token");
    let access_token = state.issue_delegated(
        authority,
        &subject,
        audience,
        scp.as_deref(),
        client,
        &extra,
    );
    let mut body = token_response(state, &access_token, scope.map(str::to_owned));
    if let Some(object) = body.as_object_mut() {
        object.insert("issued_token_type".into(), json!(issued_token_type));
    }
    Ok(body)
}
