#![allow(
    unused_imports,
    clippy::wildcard_imports,
    reason = "the whole server, under test"
)]
use super::answers::*;
use super::client_auth::*;
use super::endpoints::*;
use super::faults::*;
use super::grants::*;
use super::keys::*;
use super::state::*;
use super::types::*;
use super::*;
use crate::oauth::{
    CLIENT_ASSERTION_TYPE as CLIENT_ASSERTION_TYPE_JWT_BEARER, GRANT_CLIENT_CREDENTIALS,
    GRANT_JWT_BEARER, GRANT_TOKEN_EXCHANGE, TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_JWT, is_guid,
};
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{self, KeyPair as _, RsaPublicKeyComponents};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;

const OBO_SCOPE: &str = "api://downstream/read api://downstream/write";

async fn idp_with(config: DevIdpConfig) -> DevIdp {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    DevIdp::start(listener, config).await.unwrap()
}

async fn idp() -> DevIdp {
    idp_with(DevIdpConfig::default()).await
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// Verifies `token` against the published JWKS with jsonwebtoken, as the sidecar would.
async fn verify(idp: &DevIdp, token: &str, audience: &str) -> Value {
    verify_as(idp, token, audience, &idp.issuer()).await
}

/// [`verify`], expecting `iss` = `issuer`.
async fn verify_as(idp: &DevIdp, token: &str, audience: &str, issuer: &str) -> Value {
    let jwks: Value = client()
        .get(idp.jwks_uri())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    let kid = header.kid.unwrap();
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|key| key["kid"] == kid.as_str())
        .unwrap();
    let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
    let e = URL_SAFE_NO_PAD.decode(jwk["e"].as_str().unwrap()).unwrap();
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[audience]);
    validation.set_issuer(&[issuer]);
    jsonwebtoken::decode::<Value>(
        token,
        &DecodingKey::from_rsa_raw_components(&n, &e),
        &validation,
    )
    .unwrap()
    .claims
}

async fn post_form(idp: &DevIdp, form: &[(&str, &str)]) -> (StatusCode, Value) {
    let response = client()
        .post(idp.token_endpoint())
        .form(form)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

fn obo_form<'a>(assertion: &'a str, scope: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grant_type", GRANT_JWT_BEARER),
        ("client_id", DEFAULT_CLIENT_ID),
        ("client_secret", DEFAULT_CLIENT_SECRET),
        ("assertion", assertion),
        ("scope", scope),
        ("requested_token_use", "on_behalf_of"),
    ]
}

/// A client certificate (self-signed, RSA 2048) and its key, generated at run time.
struct ClientKey {
    certificate_der: Vec<u8>,
    key_pair: KeyPair,
}

impl ClientKey {
    fn generate() -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
        let certificate = rcgen::CertificateParams::new(vec!["obo-sidecar client".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        Self {
            certificate_der: certificate.der().to_vec(),
            key_pair: KeyPair::from_pkcs8(&key.serialize_der()).unwrap(),
        }
    }

    /// `x5t#S256`: base64url(SHA-256(certificate DER)).
    fn thumbprint(&self) -> String {
        URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            &self.certificate_der,
        ))
    }

    /// Signs with PS256 when the header says so, else RS256.
    fn sign(&self, header: &Value, claims: &Value) -> String {
        let encoding: &'static dyn signature::RsaEncoding = if header["alg"] == "PS256" {
            &signature::RSA_PSS_SHA256
        } else {
            &signature::RSA_PKCS1_SHA256
        };
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0; self.key_pair.public_modulus_len()];
        self.key_pair
            .sign(
                encoding,
                &aws_lc_rs::rand::SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .unwrap();
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(&signature))
    }
}

/// RSA key generation is slow in a debug build: two keys serve every test.
static CLIENT_KEY: std::sync::LazyLock<ClientKey> = std::sync::LazyLock::new(ClientKey::generate);
static OTHER_KEY: std::sync::LazyLock<ClientKey> = std::sync::LazyLock::new(ClientKey::generate);

const CERT_CLIENT: &str = "cert-client";
const FEDERATED_CLIENT: &str = "wi-client";
const FEDERATED_SUBJECT: &str = "system:serviceaccount:apps:api";
const CAE_CLAIMS: &str = r#"{"access_token":{"xms_cc":{"values":["cp1"]}}}"#;

/// An IdP that also knows [`CERT_CLIENT`] (certificate [`CLIENT_KEY`]) and [`FEDERATED_CLIENT`].
async fn idp_with_assertion_clients() -> DevIdp {
    let idp = idp().await;
    let certificate_der = tokio::task::spawn_blocking(|| CLIENT_KEY.certificate_der.clone())
        .await
        .unwrap();
    idp.add_client(DevClient::with_certificate(CERT_CLIENT, certificate_der));
    idp.add_client(DevClient::with_federated_subject(
        FEDERATED_CLIENT,
        FEDERATED_SUBJECT,
    ));
    idp
}

fn unique_jti() -> String {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    format!("jti-{}", SERIAL.fetch_add(1, Ordering::Relaxed))
}

/// Good `private_key_jwt` claims for `client_id`, `exp` five minutes ahead.
fn assertion_claims(idp: &DevIdp, client_id: &str) -> Value {
    let now = now_secs();
    json!({
        "iss": client_id,
        "sub": client_id,
        "aud": idp.token_endpoint(),
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "jti": unique_jti(),
    })
}

fn pkj_header(alg: &str, key: &ClientKey) -> Value {
    json!({"alg": alg, "typ": "JWT", "x5t#S256": key.thumbprint()})
}

/// A `client_credentials` request authenticated by `client_assertion`.
async fn post_with_assertion(
    idp: &DevIdp,
    client_id: Option<&str>,
    assertion: &str,
    extra: &[(&str, &str)],
) -> (StatusCode, Value) {
    let mut form = vec![
        ("grant_type", GRANT_CLIENT_CREDENTIALS),
        ("client_assertion_type", CLIENT_ASSERTION_TYPE_JWT_BEARER),
        ("client_assertion", assertion),
        ("scope", "api://down/.default"),
    ];
    if let Some(client_id) = client_id {
        form.push(("client_id", client_id));
    }
    form.extend_from_slice(extra);
    post_form(idp, &form).await
}

/// A 401 `invalid_client` whose description contains `reason` and not the assertion.
fn assert_invalid_client(
    name: &str,
    reason: &str,
    status: StatusCode,
    body: &Value,
    assertion: &str,
) {
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{name}: {body}");
    assert_eq!(body["error"], "invalid_client", "{name}");
    let description = body["error_description"].as_str().unwrap();
    assert!(description.starts_with("AADSTS"), "{name}: {description}");
    assert!(!description.contains(assertion), "{name}");
    assert!(description.contains(reason), "{name}: {description}");
}

#[tokio::test]
async fn private_key_jwt_with_ps256_or_rs256_authenticates_the_client() {
    let idp = idp_with_assertion_clients().await;
    let key = &*CLIENT_KEY;
    for alg in ["PS256", "RS256"] {
        let assertion = key.sign(&pkj_header(alg, key), &assertion_claims(&idp, CERT_CLIENT));
        let (status, body) = post_with_assertion(&idp, Some(CERT_CLIENT), &assertion, &[]).await;
        assert_eq!(status, StatusCode::OK, "{alg}: {body}");
        let claims = verify(&idp, body["access_token"].as_str().unwrap(), "api://down").await;
        assert_eq!(claims["sub"], CERT_CLIENT);
        let recorded = idp.recorded_requests().pop().unwrap();
        assert_eq!(recorded.client_auth, Some(ClientAuth::PrivateKeyJwt));
        assert_eq!(recorded.assertion_alg.as_deref(), Some(alg));
        assert_eq!(recorded.field("client_assertion"), Some(REDACTED));
        assert!(!format!("{recorded:?}").contains(&assertion));
    }
    // RFC 7523 lets the client leave out client_id, x5t#S256, and name the issuer as aud.
    let mut claims = assertion_claims(&idp, CERT_CLIENT);
    claims["aud"] = json!(idp.issuer());
    let assertion = key.sign(&json!({"alg": "RS256"}), &claims);
    let (status, body) = post_with_assertion(&idp, None, &assertion, &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // On-Behalf-Of works with private_key_jwt too.
    let subject = idp.mint(&TokenClaims {
        aud: Some(format!("api://{CERT_CLIENT}")),
        ..TokenClaims::user("alice")
    });
    let assertion = key.sign(
        &pkj_header("PS256", key),
        &assertion_claims(&idp, CERT_CLIENT),
    );
    let (status, body) = post_form(
        &idp,
        &[
            ("grant_type", GRANT_JWT_BEARER),
            ("client_id", CERT_CLIENT),
            ("client_assertion_type", CLIENT_ASSERTION_TYPE_JWT_BEARER),
            ("client_assertion", &assertion),
            ("assertion", &subject),
            ("scope", OBO_SCOPE),
            ("requested_token_use", "on_behalf_of"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A certificate-only client has no secret to match.
    let (status, body) = post_form(
        &idp,
        &[
            ("grant_type", GRANT_CLIENT_CREDENTIALS),
            ("client_id", CERT_CLIENT),
            ("client_secret", ""),
            ("client_secret", "guess"),
            ("scope", "api://down/.default"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let recorded = idp.recorded_requests().pop().unwrap();
    assert_eq!(recorded.client_auth, Some(ClientAuth::SecretPost));
    assert_eq!(recorded.assertion_alg, None);
}

#[tokio::test]
async fn private_key_jwt_bad_assertions_are_401_invalid_client() {
    let idp = idp_with_assertion_clients().await;
    let (key, other) = (&*CLIENT_KEY, &*OTHER_KEY);
    let now = now_secs();
    let good = || assertion_claims(&idp, CERT_CLIENT);
    let with = |name: &str, value: Value| {
        let mut claims = good();
        claims[name] = value;
        claims
    };
    let without = |name: &str| {
        let mut claims = good();
        claims.as_object_mut().unwrap().remove(name);
        claims
    };
    let ps256 = pkj_header("PS256", key);
    let cases = [
        (
            "other key's signature",
            "AADSTS700027: Client assertion contains an invalid signature.",
            other.sign(&ps256, &good()),
        ),
        (
            "other certificate's x5t#S256",
            "x5t#S256 does not match",
            key.sign(&pkj_header("PS256", other), &good()),
        ),
        (
            "wrong aud",
            "aud must be the token endpoint",
            key.sign(&ps256, &with("aud", json!("https://evil.example"))),
        ),
        (
            "expired",
            "expired",
            key.sign(&ps256, &with("exp", json!(now - 10))),
        ),
        (
            "exp an hour ahead",
            "more than 10 minutes ahead",
            key.sign(&ps256, &with("exp", json!(now + 3600))),
        ),
        (
            "string exp",
            "no numeric exp",
            key.sign(&ps256, &with("exp", json!("soon"))),
        ),
        (
            "future nbf",
            "not yet valid",
            key.sign(&ps256, &with("nbf", json!(now + 120))),
        ),
        (
            "sub not the client",
            "AADSTS700021",
            key.sign(&ps256, &with("sub", json!("someone"))),
        ),
        (
            "no jti",
            "jti is missing",
            key.sign(&ps256, &without("jti")),
        ),
        (
            "alg HS256",
            "alg must be PS256 or RS256",
            key.sign(&pkj_header("HS256", key), &good()),
        ),
        (
            "crit header",
            "'crit'",
            key.sign(
                &json!({"alg": "PS256", "x5t#S256": key.thumbprint(), "crit": ["x"], "x": 1}),
                &good(),
            ),
        ),
        ("garbage", "AADSTS50027", "not.a.jwt".to_owned()),
    ];
    for (name, reason, assertion) in &cases {
        let (status, body) = post_with_assertion(&idp, Some(CERT_CLIENT), assertion, &[]).await;
        assert_invalid_client(name, reason, status, &body, assertion);
    }
    // client_id must be the assertion's iss; a client without a certificate cannot use one.
    let assertion = key.sign(&ps256, &good());
    let (status, body) = post_with_assertion(&idp, Some(DEFAULT_CLIENT_ID), &assertion, &[]).await;
    assert_invalid_client(
        "client_id mismatch",
        "AADSTS700021",
        status,
        &body,
        &assertion,
    );
    let assertion = key.sign(&ps256, &assertion_claims(&idp, DEFAULT_CLIENT_ID));
    let (status, body) = post_with_assertion(&idp, None, &assertion, &[]).await;
    assert_invalid_client(
        "no certificate",
        "no certificate is registered",
        status,
        &body,
        &assertion,
    );
    let assertion = key.sign(&ps256, &assertion_claims(&idp, "nobody"));
    let (status, body) = post_with_assertion(&idp, None, &assertion, &[]).await;
    assert_invalid_client("unknown client", "AADSTS700016", status, &body, &assertion);

    // A replayed jti is refused; the same claims with a fresh jti pass.
    let claims = good();
    let assertion = key.sign(&ps256, &claims);
    let (status, body) = post_with_assertion(&idp, Some(CERT_CLIENT), &assertion, &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = post_with_assertion(&idp, Some(CERT_CLIENT), &assertion, &[]).await;
    assert_invalid_client("replay", "jti replayed", status, &body, &assertion);
    let mut fresh = claims.clone();
    fresh["jti"] = json!(unique_jti());
    let (status, _) =
        post_with_assertion(&idp, Some(CERT_CLIENT), &key.sign(&ps256, &fresh), &[]).await;
    assert_eq!(status, StatusCode::OK);

    // Malformed requests: a second method, or no client_assertion_type.
    let assertion = key.sign(&ps256, &good());
    let (status, body) = post_with_assertion(
        &idp,
        Some(CERT_CLIENT),
        &assertion,
        &[("client_secret", "x")],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_request");
    let (status, body) = post_form(
        &idp,
        &[
            ("grant_type", GRANT_CLIENT_CREDENTIALS),
            ("client_assertion", &assertion),
            ("scope", "api://down/.default"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_request");
}

#[tokio::test]
async fn federated_assertion_signed_by_the_idp_authenticates_the_client() {
    let idp = idp_with_assertion_clients().await;
    let now = now_secs();
    let good = json!({
        "iss": "https://kubernetes.default.svc.cluster.local",
        "aud": [FEDERATED_AUDIENCE],
        "sub": FEDERATED_SUBJECT,
        "iat": now,
        "exp": now + 3600,
    });
    let rs256 = json!({"alg": "RS256", "typ": "JWT"});
    let token = idp.sign(&rs256, &good);
    // A projected service-account token is presented again and again until rotated.
    for _ in 0..2 {
        let (status, body) = post_with_assertion(&idp, Some(FEDERATED_CLIENT), &token, &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let claims = verify(&idp, body["access_token"].as_str().unwrap(), "api://down").await;
        assert_eq!(claims["sub"], FEDERATED_CLIENT);
    }
    let recorded = idp.recorded_requests().pop().unwrap();
    assert_eq!(recorded.client_auth, Some(ClientAuth::FederatedAssertion));
    assert_eq!(recorded.assertion_alg.as_deref(), Some("RS256"));
    // Signed by the previous key: still trusted after a rotation.
    idp.rotate_key();
    let (status, body) = post_with_assertion(&idp, Some(FEDERATED_CLIENT), &token, &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = post_with_assertion(
        &idp,
        Some(FEDERATED_CLIENT),
        &idp.sign(&json!({"alg": "RS256"}), &{
            let mut claims = good.clone();
            claims["aud"] = json!(FEDERATED_AUDIENCE);
            claims
        }),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let with = |name: &str, value: Value| {
        let mut claims = good.clone();
        claims[name] = value;
        claims
    };
    let stranger = super::tests::idp().await;
    let cases = [
        (
            "wrong sub",
            "AADSTS700213",
            Some(FEDERATED_CLIENT),
            idp.sign(
                &rs256,
                &with("sub", json!("system:serviceaccount:apps:other")),
            ),
        ),
        (
            "wrong aud",
            "AADSTS700212",
            Some(FEDERATED_CLIENT),
            idp.sign(&rs256, &with("aud", json!(["api://someone-else"]))),
        ),
        (
            "expired",
            "AADSTS700024",
            Some(FEDERATED_CLIENT),
            idp.sign(&rs256, &with("exp", json!(now - 10))),
        ),
        (
            "foreign key",
            "invalid signature",
            Some(FEDERATED_CLIENT),
            stranger.sign(&rs256, &good),
        ),
        (
            "alg PS256",
            "alg must be",
            Some(FEDERATED_CLIENT),
            idp.sign(&json!({"alg": "PS256"}), &good),
        ),
        (
            "client without a federated subject",
            "AADSTS70021:",
            Some(DEFAULT_CLIENT_ID),
            token.clone(),
        ),
        ("no client_id", "AADSTS700016", None, token.clone()),
    ];
    for (name, reason, client_id, assertion) in &cases {
        let (status, body) = post_with_assertion(&idp, *client_id, assertion, &[]).await;
        assert_invalid_client(name, reason, status, &body, assertion);
    }
}

#[tokio::test]
async fn claims_parameter_client_capabilities_become_xms_cc() {
    let idp = idp().await;
    let assertion = idp.mint(&TokenClaims::user("alice"));
    let mut form = obo_form(&assertion, OBO_SCOPE);
    form.push(("claims", CAE_CLAIMS));
    let (status, body) = post_form(&idp, &form).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let claims = verify(
        &idp,
        body["access_token"].as_str().unwrap(),
        "api://downstream",
    )
    .await;
    assert_eq!(claims["xms_cc"], json!(["cp1"]));
    assert_eq!(idp.recorded_requests()[0].field("claims"), Some(CAE_CLAIMS));

    let app_form = |claims: &'static str| {
        [
            ("grant_type", GRANT_CLIENT_CREDENTIALS),
            ("client_id", DEFAULT_CLIENT_ID),
            ("client_secret", DEFAULT_CLIENT_SECRET),
            ("scope", "api://down/.default"),
            ("claims", claims),
        ]
    };
    let (status, body) = post_form(&idp, &app_form(CAE_CLAIMS)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let claims = verify(&idp, body["access_token"].as_str().unwrap(), "api://down").await;
    assert_eq!(claims["xms_cc"], json!(["cp1"]));
    // A claims request without capabilities adds nothing.
    let (status, body) = post_form(&idp, &app_form(DEFAULT_CLAIMS_CHALLENGE)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let claims = verify(&idp, body["access_token"].as_str().unwrap(), "api://down").await;
    assert!(claims.get("xms_cc").is_none());
    for bad in [
        "not json",
        "[1]",
        "\"cp1\"",
        r#"{"access_token":{"xms_cc":{"values":"cp1"}}}"#,
    ] {
        let (status, body) = post_form(&idp, &app_form(bad)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(body["error"], "invalid_request", "{bad}");
    }
}

#[tokio::test]
async fn token_exchange_echoes_requested_token_type() {
    let idp = idp().await;
    let subject = idp.mint(&TokenClaims::user("carol"));
    let exchange = |requested: Option<&'static str>| {
        let mut form = vec![
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("client_id", DEFAULT_CLIENT_ID),
            ("client_secret", DEFAULT_CLIENT_SECRET),
            ("subject_token", subject.as_str()),
            ("subject_token_type", TOKEN_TYPE_ACCESS_TOKEN),
            ("audience", "https://one.example"),
        ];
        form.extend(requested.map(|requested| ("requested_token_type", requested)));
        form
    };
    for (requested, issued) in [
        (None, TOKEN_TYPE_ACCESS_TOKEN),
        (Some(TOKEN_TYPE_ACCESS_TOKEN), TOKEN_TYPE_ACCESS_TOKEN),
        (Some(TOKEN_TYPE_JWT), TOKEN_TYPE_JWT),
    ] {
        let (status, body) = post_form(&idp, &exchange(requested)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["issued_token_type"], issued);
        let claims = verify(
            &idp,
            body["access_token"].as_str().unwrap(),
            "https://one.example",
        )
        .await;
        // A single audience stays a string.
        assert_eq!(claims["aud"], "https://one.example");
    }
    let (status, body) = post_form(
        &idp,
        &exchange(Some("urn:ietf:params:oauth:token-type:id_token")),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_request");
}

/// Makes one token request for each of `InvalidClient`, `NonJson200`, `EmptyBody200`, `NotBearer`,
/// `ExpiresInAbsent` and `ResetConnection`, queued in that order, then a normal one.
async fn assert_new_failures_in_order(idp: &DevIdp) {
    let form = [
        ("grant_type", GRANT_CLIENT_CREDENTIALS),
        ("client_id", DEFAULT_CLIENT_ID),
        ("client_secret", DEFAULT_CLIENT_SECRET),
        ("scope", "api://down/.default"),
    ];
    let send = || client().post(idp.token_endpoint()).form(&form).send();

    let response = send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client");

    let response = send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let text = response.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");

    let response = send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.bytes().await.unwrap().is_empty());

    let (status, body) = post_form(idp, &form).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["token_type"], "N_A");
    assert_eq!(body["expires_in"], 3600);
    verify(idp, body["access_token"].as_str().unwrap(), "api://down").await;

    let (status, body) = post_form(idp, &form).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["token_type"], "Bearer");
    assert!(body.get("expires_in").is_none(), "{body}");
    assert!(body.get("ext_expires_in").is_none(), "{body}");
    let claims = verify(idp, body["access_token"].as_str().unwrap(), "api://down").await;
    assert!(claims["exp"].as_u64().unwrap() > now_secs());

    let outcome = send().await;
    assert!(outcome.is_err(), "{outcome:?}");

    let (status, body) = post_form(idp, &form).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(idp.token_requests(), 7);
}

#[tokio::test]
async fn broken_answer_failures_are_served_in_order() {
    let idp = idp().await;
    for failure in [
        Failure::InvalidClient,
        Failure::NonJson200,
        Failure::EmptyBody200,
        Failure::NotBearer,
        Failure::ExpiresInAbsent,
        Failure::ResetConnection,
    ] {
        idp.fail_next(failure, 1);
    }
    assert_new_failures_in_order(&idp).await;
    // The reset request was recorded before the connection closed.
    assert_eq!(idp.recorded_requests().len(), 7);
}

#[tokio::test]
async fn broken_answer_failures_can_be_injected_over_http() {
    let idp = idp().await;
    for mode in [
        "invalid_client",
        "non_json_200",
        "empty_body_200",
        "not_bearer",
        "expires_in_absent",
        "reset_connection",
    ] {
        let response = client()
            .post(format!("{}/dev/fail", idp.issuer()))
            .json(&json!({"mode": mode}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT, "{mode}");
    }
    assert_new_failures_in_order(&idp).await;
}

#[tokio::test]
async fn discovery_document_names_endpoints_and_grants() {
    let idp = idp().await;
    assert!(idp.issuer().starts_with("http://127.0.0.1:"));
    let body: Value = client()
        .get(format!("{}/.well-known/openid-configuration", idp.issuer()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["issuer"], idp.issuer());
    assert_eq!(body["jwks_uri"], idp.jwks_uri());
    assert_eq!(body["token_endpoint"], idp.token_endpoint());
    assert_eq!(
        body["authorization_endpoint"],
        format!("{}/authorize", idp.issuer())
    );
    assert_eq!(
        body["id_token_signing_alg_values_supported"],
        json!(["RS256"])
    );
    assert_eq!(
        body["grant_types_supported"],
        json!([
            GRANT_CLIENT_CREDENTIALS,
            GRANT_JWT_BEARER,
            GRANT_TOKEN_EXCHANGE
        ])
    );
    assert_eq!(
        body["token_endpoint_auth_methods_supported"],
        json!([
            "client_secret_post",
            "client_secret_basic",
            "private_key_jwt"
        ])
    );
}

#[tokio::test]
async fn minted_caller_token_verifies_against_jwks() {
    let idp = idp().await;
    let response = client().get(idp.jwks_uri()).send().await.unwrap();
    assert_eq!(response.headers()[header::CACHE_CONTROL], "max-age=300");
    let mut caller = TokenClaims::user("alice");
    caller.scp = Some("access_as_user read".into());
    caller.roles = vec!["Admin".into()];
    let token = idp.mint(&caller);
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    assert_eq!(header.kid.as_ref().map(String::len), Some(16));
    let claims = verify(&idp, &token, "api://obo-sidecar").await;
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["oid"], derive_oid("alice"));
    assert_eq!(claims["tid"], DEFAULT_TENANT_ID);
    assert_eq!(claims["scp"], "access_as_user read");
    assert_eq!(claims["roles"], json!(["Admin"]));
    assert_eq!(claims["ver"], "2.0");
    assert!(claims["jti"].is_string());
    let exp = claims["exp"].as_u64().unwrap();
    let iat = claims["iat"].as_u64().unwrap();
    assert_eq!(exp - iat, 3600);
    assert_eq!(claims["nbf"], claims["iat"]);
}

#[tokio::test]
async fn client_credentials_with_basic_auth_issues_app_token() {
    let config = DevIdpConfig {
        clients: vec![DevClient::new("odd id:1", "s3cr+t/=")],
        ..DevIdpConfig::default()
    };
    let idp = idp_with(config).await;
    let encode =
        |value: &str| url::form_urlencoded::byte_serialize(value.as_bytes()).collect::<String>();
    let credential = STANDARD.encode(format!("{}:{}", encode("odd id:1"), encode("s3cr+t/=")));
    let response = client()
        .post(idp.token_endpoint())
        .header(header::AUTHORIZATION, format!("Basic {credential}"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", "api://down/.default"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["ext_expires_in"], 3600);
    let claims = verify(&idp, body["access_token"].as_str().unwrap(), "api://down").await;
    assert_eq!(claims["sub"], "odd id:1");
    assert_eq!(claims["oid"], "odd id:1");
    assert_eq!(claims["azp"], "odd id:1");
    assert_eq!(claims["idtyp"], "app");
    assert!(claims.get("scp").is_none());
    let recorded = idp.recorded_requests();
    assert_eq!(recorded.len(), 1);
    assert!(recorded[0].basic_auth);
    assert_eq!(
        recorded[0].grant_type.as_deref(),
        Some("client_credentials")
    );
}

#[tokio::test]
async fn client_credentials_without_default_suffix_is_invalid_scope() {
    let idp = idp().await;
    for scope in [
        "api://down/read",
        "api://down/.default api://other/.default",
        "/.default",
    ] {
        let (status, body) = post_form(
            &idp,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", DEFAULT_CLIENT_ID),
                ("client_secret", DEFAULT_CLIENT_SECRET),
                ("scope", scope),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{scope}");
        assert_eq!(body["error"], "invalid_scope", "{scope}");
    }
}

#[tokio::test]
async fn wrong_or_missing_client_secret_is_401_invalid_client() {
    let idp = idp().await;
    let (status, body) = post_form(
        &idp,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", DEFAULT_CLIENT_ID),
            ("client_secret", "wrong"),
            ("scope", "api://down/.default"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "invalid_client");
    let (status, body) = post_form(
        &idp,
        &[
            ("grant_type", "client_credentials"),
            ("scope", "api://down/.default"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "invalid_client");
    let response = client()
        .post(idp.token_endpoint())
        .basic_auth(DEFAULT_CLIENT_ID, Some("wrong"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", "api://down/.default"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
    // Recorded requests never hold the secret.
    for recorded in idp.recorded_requests() {
        assert!(recorded.form.iter().all(|(_, value)| value != "wrong"));
    }
    assert_eq!(idp.token_requests(), 3);
}

#[tokio::test]
async fn obo_copies_subject_and_sets_scp() {
    let idp = idp().await;
    let mut caller = TokenClaims::user("alice");
    caller.tid = Some("tenant-x".into());
    let assertion = idp.mint(&caller);
    let response = client()
        .post(idp.token_endpoint())
        .header("client-request-id", "req-1")
        .form(&obo_form(&assertion, OBO_SCOPE))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["scope"], OBO_SCOPE);
    assert_eq!(body["expires_in"], 3600);
    let claims = verify(
        &idp,
        body["access_token"].as_str().unwrap(),
        "api://downstream",
    )
    .await;
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["oid"], derive_oid("alice"));
    assert_eq!(claims["tid"], "tenant-x");
    assert_eq!(claims["scp"], "read write");
    assert_eq!(claims["azp"], DEFAULT_CLIENT_ID);

    let recorded = idp.recorded_requests();
    assert_eq!(recorded[0].client_request_id.as_deref(), Some("req-1"));
    assert_eq!(recorded[0].field("client_secret"), Some(REDACTED));
    assert_eq!(recorded[0].field("assertion"), Some(assertion.as_str()));
    assert!(!format!("{:?}", recorded[0]).contains(&assertion));
    assert!(!recorded[0].basic_auth);
}

#[tokio::test]
async fn obo_default_scope_issues_user_impersonation() {
    let idp = idp().await;
    let assertion = idp.mint(&TokenClaims {
        aud: Some(DEFAULT_CLIENT_ID.into()),
        ..TokenClaims::user("bob")
    });
    let (status, body) = post_form(&idp, &obo_form(&assertion, "api://down/.default")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let claims = verify(&idp, body["access_token"].as_str().unwrap(), "api://down").await;
    assert_eq!(claims["scp"], "user_impersonation");
}

#[tokio::test]
async fn obo_refuses_hostile_assertions_with_invalid_grant() {
    let idp = idp().await;
    let now = now_secs();
    let good =
        json!({"iss": idp.issuer(), "aud": "api://obo-sidecar", "sub": "alice", "exp": now + 600});
    let rs256 = json!({"alg": "RS256", "typ": "JWT"});
    let with = |name: &str, value: Value| {
        let mut claims = good.clone();
        claims[name] = value;
        claims
    };
    let mut no_exp = good.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    let other_idp = super::tests::idp().await;
    let cases = [
        (
            "wrong aud",
            idp.sign(&rs256, &with("aud", json!("api://someone-else"))),
        ),
        ("expired", idp.sign(&rs256, &with("exp", json!(now - 10)))),
        (
            "future nbf",
            idp.sign(&rs256, &with("nbf", json!(now + 600))),
        ),
        (
            "foreign iss",
            idp.sign(&rs256, &with("iss", json!("https://evil.example"))),
        ),
        ("no exp", idp.sign(&rs256, &no_exp)),
        ("alg lie", idp.sign(&json!({"alg": "HS256"}), &good)),
        ("alg none", idp.sign(&json!({"alg": "none"}), &good)),
        ("other key", other_idp.sign(&rs256, &good)),
        ("garbage", "not.a.jwt".to_owned()),
        ("four segments", format!("{}.x", idp.sign(&rs256, &good))),
    ];
    for (name, assertion) in &cases {
        let (status, body) = post_form(&idp, &obo_form(assertion, OBO_SCOPE)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {body}");
        assert_eq!(body["error"], "invalid_grant", "{name}");
        let description = body["error_description"].as_str().unwrap();
        assert!(description.starts_with("AADSTS"), "{name}: {description}");
        assert!(!description.contains(assertion.as_str()), "{name}");
    }
    // The well-formed control case succeeds.
    let (status, _) = post_form(&idp, &obo_form(&idp.sign(&rs256, &good), OBO_SCOPE)).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn obo_with_mixed_resources_or_missing_fields_is_refused() {
    let idp = idp().await;
    let assertion = idp.mint(&TokenClaims::user("alice"));
    for scope in [
        "api://a/read api://b/read",
        "read",
        "api://a/.default api://a/read",
    ] {
        let (status, body) = post_form(&idp, &obo_form(&assertion, scope)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{scope}");
        assert_eq!(body["error"], "invalid_scope", "{scope}");
    }
    let mut form = obo_form(&assertion, OBO_SCOPE);
    form.retain(|(name, _)| *name != "requested_token_use");
    let (status, body) = post_form(&idp, &form).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_request");
    let (status, body) = post_form(
        &idp,
        &[
            ("grant_type", "password"),
            ("client_id", DEFAULT_CLIENT_ID),
            ("client_secret", DEFAULT_CLIENT_SECRET),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "unsupported_grant_type");
    let response = client()
        .post(idp.token_endpoint())
        .header(header::CONTENT_TYPE, "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
}

#[tokio::test]
async fn token_exchange_issues_for_every_audience() {
    let idp = idp().await;
    let subject = idp.mint(&TokenClaims::user("carol"));
    let (status, body) = post_form(
        &idp,
        &[
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("client_id", DEFAULT_CLIENT_ID),
            ("client_secret", DEFAULT_CLIENT_SECRET),
            ("subject_token", &subject),
            ("subject_token_type", TOKEN_TYPE_ACCESS_TOKEN),
            ("audience", "https://first.example"),
            ("audience", "https://second.example"),
            ("resource", "https://resource.example"),
            ("scope", "read"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["issued_token_type"], TOKEN_TYPE_ACCESS_TOKEN);
    let claims = verify(
        &idp,
        body["access_token"].as_str().unwrap(),
        "https://first.example",
    )
    .await;
    assert_eq!(claims["sub"], "carol");
    assert_eq!(claims["scp"], "read");
    assert_eq!(
        claims["aud"],
        json!(["https://first.example", "https://second.example"])
    );

    let (status, body) = post_form(
        &idp,
        &[
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("client_id", DEFAULT_CLIENT_ID),
            ("client_secret", DEFAULT_CLIENT_SECRET),
            ("subject_token", &subject),
            ("subject_token_type", TOKEN_TYPE_ACCESS_TOKEN),
            ("scope", "api://down/read"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    verify(&idp, body["access_token"].as_str().unwrap(), "api://down").await;

    let (status, body) = post_form(
        &idp,
        &[
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("client_id", DEFAULT_CLIENT_ID),
            ("client_secret", DEFAULT_CLIENT_SECRET),
            ("subject_token", &subject),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:id_token",
            ),
            ("audience", "x"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_request");
}

#[tokio::test]
async fn injected_failures_are_served_in_order_then_normal_answers_resume() {
    let idp = idp().await;
    let assertion = idp.mint(&TokenClaims::user("alice"));
    let form = obo_form(&assertion, OBO_SCOPE);
    idp.fail_next(Failure::ServerError, 2);
    idp.fail_next(
        Failure::TooManyRequests {
            retry_after_secs: 7,
        },
        1,
    );
    idp.fail_next(Failure::InvalidGrant, 1);
    idp.fail_next(
        Failure::InteractionRequired {
            claims: "{\"x\":1}".into(),
        },
        1,
    );
    idp.fail_next(Failure::ConsentRequired, 1);
    idp.fail_next(Failure::Delay(Duration::from_millis(20)), 1);

    for _ in 0..2 {
        let (status, body) = post_form(&idp, &form).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body["error"].is_string());
    }
    let response = client()
        .post(idp.token_endpoint())
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()[header::RETRY_AFTER], "7");
    let (status, body) = post_form(&idp, &form).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(body["error_codes"], json!([50013]));
    let (status, body) = post_form(&idp, &form).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "interaction_required");
    assert_eq!(body["suberror"], "basic_action");
    assert_eq!(body["claims"], "{\"x\":1}");
    let (status, body) = post_form(&idp, &form).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["suberror"], "consent_required");
    assert_eq!(body["error_codes"], json!([65001]));
    let started = std::time::Instant::now();
    let (status, _) = post_form(&idp, &form).await;
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(20));
    let (status, _) = post_form(&idp, &form).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(idp.token_requests(), 8);
    assert_eq!(idp.recorded_requests().len(), 8);
}

#[tokio::test]
async fn rotated_key_is_published_alongside_the_old_one() {
    let idp = idp().await;
    let old = idp.mint(&TokenClaims::user("alice"));
    idp.rotate_key();
    let new = idp.mint(&TokenClaims::user("alice"));
    let old_kid = jsonwebtoken::decode_header(&old).unwrap().kid.unwrap();
    let new_kid = jsonwebtoken::decode_header(&new).unwrap().kid.unwrap();
    assert_ne!(old_kid, new_kid);
    let jwks: Value = client()
        .get(idp.jwks_uri())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|key| key["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, [old_kid.as_str(), new_kid.as_str()]);
    for token in [&old, &new] {
        verify(&idp, token, "api://obo-sidecar").await;
        let (status, _) = post_form(&idp, &obo_form(token, OBO_SCOPE)).await;
        assert_eq!(status, StatusCode::OK);
    }
}

#[tokio::test]
async fn dev_endpoints_mint_fail_and_count() {
    let idp = idp().await;
    let response = client()
        .post(format!("{}/dev/token", idp.issuer()))
        .json(&json!({"sub": "dave", "scp": "read", "roles": ["R"], "lifetime_secs": 60}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["expires_in"], 60);
    let claims = verify(
        &idp,
        body["access_token"].as_str().unwrap(),
        "api://obo-sidecar",
    )
    .await;
    assert_eq!(claims["sub"], "dave");
    assert_eq!(claims["roles"], json!(["R"]));

    let response = client()
        .post(format!("{}/dev/token", idp.issuer()))
        .header(header::ACCEPT, "text/plain")
        .json(&json!({"sub": "dave", "aud": "api://x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let token = response.text().await.unwrap();
    verify(&idp, &token, "api://x").await;

    for bad in ["{", "{}", "[1]", "{\"sub\": 3}"] {
        let response = client()
            .post(format!("{}/dev/token", idp.issuer()))
            .body(bad)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "invalid_request");
    }

    let response = client()
        .post(format!("{}/dev/fail", idp.issuer()))
        .json(&json!({"mode": "429", "count": 2, "retry_after": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let response = client()
        .post(format!("{}/dev/fail", idp.issuer()))
        .json(&json!({"mode": "explode"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    for _ in 0..2 {
        let response = client()
            .post(idp.token_endpoint())
            .form(&[("a", "b")])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
    }
    let stats: Value = client()
        .get(format!("{}/dev/stats", idp.issuer()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        stats,
        json!({"token_requests": 2, "discovery_requests": 0, "jwks_requests": 2})
    );
}

#[tokio::test]
async fn unknown_paths_and_huge_bodies_get_json_errors() {
    let idp = idp().await;
    let response = client()
        .get(format!("{}/nope", idp.issuer()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "not_found");
    let response = client().get(idp.token_endpoint()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let response = client()
        .post(idp.token_endpoint())
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(vec![b'a'; MAX_BODY_BYTES + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");
    assert_eq!(idp.token_requests(), 1);
}

const TENANT_A: &str = "11111111-2222-4333-8444-555555555555";
const TENANT_B: &str = "AAAAAAAA-bbbb-4ccc-8ddd-eeeeeeeeeeee";

async fn get(url: &str) -> (StatusCode, HeaderMap, Value) {
    let response = client().get(url).send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    (status, headers, response.json().await.unwrap())
}

fn tenant_discovery_url(idp: &DevIdp, tenant: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        idp.tenant_issuer(tenant)
    )
}

async fn post_form_to(url: &str, form: &[(&str, &str)]) -> (StatusCode, Value) {
    let response = client().post(url).form(form).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

fn app_form(scope: &str) -> [(&str, &str); 4] {
    [
        ("grant_type", GRANT_CLIENT_CREDENTIALS),
        ("client_id", DEFAULT_CLIENT_ID),
        ("client_secret", DEFAULT_CLIENT_SECRET),
        ("scope", scope),
    ]
}

#[tokio::test]
async fn tenant_discovery_names_the_tenant_issuer_and_shares_the_jwks() {
    let idp = idp().await;
    let issuer = idp.issuer();
    assert_eq!(
        idp.tenant_issuer(TENANT_A),
        format!("{issuer}/{TENANT_A}/v2.0")
    );
    assert_eq!(
        idp.tenant_token_endpoint(TENANT_A),
        format!("{issuer}/{TENANT_A}/oauth2/v2.0/token")
    );
    let (status, _, root) = get(&format!("{issuer}/.well-known/openid-configuration")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(root["issuer"], issuer);
    assert_eq!(root["token_endpoint"], idp.token_endpoint());
    for tenant in [TENANT_A, TENANT_B] {
        let (status, _, document) = get(&tenant_discovery_url(&idp, tenant)).await;
        assert_eq!(status, StatusCode::OK, "{tenant}");
        assert_eq!(document["issuer"], idp.tenant_issuer(tenant));
        assert_eq!(
            document["token_endpoint"],
            idp.tenant_token_endpoint(tenant)
        );
        assert_eq!(document["jwks_uri"], idp.jwks_uri());
        assert_eq!(
            document["grant_types_supported"],
            root["grant_types_supported"]
        );
    }
    assert_eq!(idp.discovery_requests(), 3);

    // A tenant that is not a GUID has no documents and no token endpoint; the fetch still counts.
    let not_guids = [
        "common",
        "organizations",
        "11111111-2222-4333-8444-55555555555",
        "11111111-2222-4333-8444-55555555555g",
        "111111112222433384445555555555550000",
        "11111111-2222-4333-8444-555555555555-1",
    ];
    for tenant in not_guids {
        let (status, _, body) = get(&tenant_discovery_url(&idp, tenant)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{tenant}");
        assert_eq!(body["error"], "not_found", "{tenant}");
        let (status, body) = post_form_to(
            &idp.tenant_token_endpoint(tenant),
            &app_form("api://down/.default"),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{tenant}");
        assert_eq!(body["error"], "not_found", "{tenant}");
    }
    assert_eq!(idp.discovery_requests(), 3 + not_guids.len() as u64);
    assert_eq!(idp.token_requests(), 0);
    assert!(idp.recorded_requests().is_empty());

    // Wrong methods on a tenant's endpoints are 405 (and not counted).
    let response = client()
        .post(tenant_discovery_url(&idp, TENANT_A))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let response = client()
        .get(idp.tenant_token_endpoint(TENANT_A))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(idp.discovery_requests(), 3 + not_guids.len() as u64);
    assert_eq!(idp.token_requests(), 0);

    assert_eq!(idp.jwks_requests(), 0);
    get(&idp.jwks_uri()).await;
    assert_eq!(idp.jwks_requests(), 1);
    let (_, _, dev_stats) = get(&format!("{issuer}/dev/stats")).await;
    assert_eq!(dev_stats["discovery_requests"], 3 + not_guids.len() as u64);
    assert_eq!(dev_stats["jwks_requests"], 1);
}

#[tokio::test]
async fn tenant_token_endpoint_issues_tokens_with_the_tenant_iss_and_tid() {
    let idp = idp().await;
    let endpoint = idp.tenant_token_endpoint(TENANT_A);
    let tenant_issuer = idp.tenant_issuer(TENANT_A);

    let (status, body) = post_form_to(&endpoint, &app_form("api://down/.default")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let claims = verify_as(
        &idp,
        body["access_token"].as_str().unwrap(),
        "api://down",
        &tenant_issuer,
    )
    .await;
    assert_eq!(claims["tid"], TENANT_A);
    assert_eq!(claims["sub"], DEFAULT_CLIENT_ID);

    // On-Behalf-Of with a caller token of this tenant, of the root issuer, of another tenant.
    let callers = [
        idp.mint_for_tenant(TENANT_A, &TokenClaims::user("alice")),
        idp.mint(&TokenClaims::user("alice")),
        idp.mint_for_tenant(TENANT_B, &TokenClaims::user("alice")),
    ];
    for caller in &callers {
        let (status, body) = post_form_to(&endpoint, &obo_form(caller, OBO_SCOPE)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let claims = verify_as(
            &idp,
            body["access_token"].as_str().unwrap(),
            "api://downstream",
            &tenant_issuer,
        )
        .await;
        assert_eq!(claims["tid"], TENANT_A);
        assert_eq!(claims["sub"], "alice");
    }
    // RFC 8693 too.
    let (status, body) = post_form_to(
        &endpoint,
        &[
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("client_id", DEFAULT_CLIENT_ID),
            ("client_secret", DEFAULT_CLIENT_SECRET),
            ("subject_token", &callers[0]),
            ("subject_token_type", TOKEN_TYPE_ACCESS_TOKEN),
            ("audience", "https://one.example"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let claims = verify_as(
        &idp,
        body["access_token"].as_str().unwrap(),
        "https://one.example",
        &tenant_issuer,
    )
    .await;
    assert_eq!(claims["tid"], TENANT_A);

    // The root endpoint accepts a tenant's caller token and keeps its tid.
    let (status, body) = post_form(&idp, &obo_form(&callers[2], OBO_SCOPE)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let claims = verify(
        &idp,
        body["access_token"].as_str().unwrap(),
        "api://downstream",
    )
    .await;
    assert_eq!(claims["tid"], TENANT_B);

    let recorded = idp.recorded_requests();
    let tenants: Vec<Option<&str>> = recorded
        .iter()
        .map(|request| request.tenant.as_deref())
        .collect();
    assert_eq!(
        tenants,
        [Some(TENANT_A); 5]
            .into_iter()
            .chain([None])
            .collect::<Vec<_>>()
    );
    assert!(format!("{:?}", recorded[0]).contains(TENANT_A));
    assert_eq!(idp.token_requests(), 6);
}

#[tokio::test]
async fn tenant_token_endpoint_refuses_what_the_root_one_refuses() {
    let idp = idp().await;
    let endpoint = idp.tenant_token_endpoint(TENANT_A);
    let now = now_secs();
    let rs256 = json!({"alg": "RS256", "typ": "JWT"});
    let subject = |iss: String| {
        idp.sign(
            &rs256,
            &json!({"iss": iss, "aud": "api://obo-sidecar", "sub": "alice", "exp": now + 600}),
        )
    };
    let issuer = idp.issuer();
    for iss in [
        format!("{issuer}/common/v2.0"),
        format!("{issuer}/{TENANT_A}/v2.0/extra"),
        format!("{issuer}/{TENANT_A}"),
        format!("{issuer}/{TENANT_A}/v2.0/"),
        format!("https://evil.example/{TENANT_A}/v2.0"),
        format!("{issuer}x/{TENANT_A}/v2.0"),
    ] {
        for url in [endpoint.as_str(), &idp.token_endpoint()] {
            let (status, body) =
                post_form_to(url, &obo_form(&subject(iss.clone()), OBO_SCOPE)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{iss} at {url}");
            assert_eq!(body["error"], "invalid_grant", "{iss} at {url}");
        }
    }
    // The same checks pass the control case.
    let (status, body) = post_form_to(
        &endpoint,
        &obo_form(&subject(idp.tenant_issuer(TENANT_B)), OBO_SCOPE),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Client authentication and injected failures apply as on /token.
    let (status, body) = post_form_to(
        &endpoint,
        &[
            ("grant_type", GRANT_CLIENT_CREDENTIALS),
            ("client_id", DEFAULT_CLIENT_ID),
            ("client_secret", "wrong"),
            ("scope", "api://down/.default"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "invalid_client");
    idp.fail_next(Failure::InvalidGrant, 1);
    let (status, body) = post_form_to(&endpoint, &app_form("api://down/.default")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error_codes"], json!([50013]));
    assert_eq!(idp.token_requests(), 15);
    assert_eq!(idp.recorded_requests().len(), 15);
}

#[tokio::test]
async fn private_key_jwt_at_a_tenant_endpoint_names_that_endpoint_as_aud() {
    let idp = idp_with_assertion_clients().await;
    let key = &*CLIENT_KEY;
    let endpoint = idp.tenant_token_endpoint(TENANT_A);
    let assertion_for = |aud: String| {
        let mut claims = assertion_claims(&idp, CERT_CLIENT);
        claims["aud"] = json!(aud);
        key.sign(&pkj_header("PS256", key), &claims)
    };
    let form = |assertion: &str| {
        vec![
            ("grant_type".to_owned(), GRANT_CLIENT_CREDENTIALS.to_owned()),
            ("client_id".to_owned(), CERT_CLIENT.to_owned()),
            (
                "client_assertion_type".to_owned(),
                CLIENT_ASSERTION_TYPE_JWT_BEARER.to_owned(),
            ),
            ("client_assertion".to_owned(), assertion.to_owned()),
            ("scope".to_owned(), "api://down/.default".to_owned()),
        ]
    };
    let post = |assertion: String| {
        let form = form(&assertion);
        let endpoint = endpoint.clone();
        async move {
            let response = client().post(endpoint).form(&form).send().await.unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            (status, body, assertion)
        }
    };
    for aud in [
        idp.tenant_token_endpoint(TENANT_A),
        idp.tenant_issuer(TENANT_A),
    ] {
        let (status, body, _) = post(assertion_for(aud.clone())).await;
        assert_eq!(status, StatusCode::OK, "{aud}: {body}");
        let claims = verify_as(
            &idp,
            body["access_token"].as_str().unwrap(),
            "api://down",
            &idp.tenant_issuer(TENANT_A),
        )
        .await;
        assert_eq!(claims["tid"], TENANT_A);
    }
    let recorded = idp.recorded_requests().pop().unwrap();
    assert_eq!(recorded.client_auth, Some(ClientAuth::PrivateKeyJwt));
    assert_eq!(recorded.tenant.as_deref(), Some(TENANT_A));
    for aud in [
        idp.token_endpoint(),
        idp.issuer(),
        idp.tenant_token_endpoint(TENANT_B),
    ] {
        let (status, body, assertion) = post(assertion_for(aud.clone())).await;
        assert_invalid_client(
            &aud,
            "aud must be the token endpoint",
            status,
            &body,
            &assertion,
        );
    }
}

#[tokio::test]
async fn mint_for_tenant_sets_iss_and_tid_and_keeps_the_rest() {
    let idp = idp().await;
    let mut extra = Map::new();
    extra.insert("name".into(), json!("Alice"));
    extra.insert("iss".into(), json!("https://overridden.example"));
    let token = idp.mint_for_tenant(
        TENANT_B,
        &TokenClaims {
            scp: Some("access_as_user".into()),
            tid: Some("ignored".into()),
            extra,
            ..TokenClaims::user("alice")
        },
    );
    let claims = verify_as(
        &idp,
        &token,
        "api://obo-sidecar",
        &idp.tenant_issuer(TENANT_B),
    )
    .await;
    assert_eq!(claims["tid"], TENANT_B);
    assert_eq!(claims["scp"], "access_as_user");
    assert_eq!(claims["name"], "Alice");
    assert_eq!(claims["sub"], "alice");
}

#[tokio::test]
async fn jwks_outage_makes_jwks_and_discovery_503_until_lifted() {
    let idp = idp().await;
    let discovery = [
        format!("{}/.well-known/openid-configuration", idp.issuer()),
        tenant_discovery_url(&idp, TENANT_A),
    ];
    idp.jwks_unavailable(true);
    for url in discovery.iter().chain([&idp.jwks_uri()]) {
        let (status, _, body) = get(url).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{url}");
        assert_eq!(body["error"], "temporarily_unavailable", "{url}");
    }
    // A tenant that is no GUID is still unknown; the token endpoints still answer.
    let (status, _, _) = get(&tenant_discovery_url(&idp, "common")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = post_form(&idp, &app_form("api://down/.default")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = post_form_to(
        &idp.tenant_token_endpoint(TENANT_A),
        &app_form("api://down/.default"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    idp.jwks_unavailable(false);
    for url in discovery.iter().chain([&idp.jwks_uri()]) {
        let (status, _, _) = get(url).await;
        assert_eq!(status, StatusCode::OK, "{url}");
    }
    verify_as(
        &idp,
        body["access_token"].as_str().unwrap(),
        "api://down",
        &idp.tenant_issuer(TENANT_A),
    )
    .await;
    assert_eq!(idp.discovery_requests(), 5);
    // Two here, one inside `verify_as`.
    assert_eq!(idp.jwks_requests(), 3);
}

#[tokio::test]
async fn jwks_cache_control_follows_set_jwks_max_age() {
    let idp = idp().await;
    let cache_control = |headers: &HeaderMap| {
        headers
            .get(header::CACHE_CONTROL)
            .map(|value| value.to_str().unwrap().to_owned())
    };
    let (_, headers, _) = get(&idp.jwks_uri()).await;
    assert_eq!(cache_control(&headers).as_deref(), Some("max-age=300"));
    for (max_age, expected) in [
        (Some(7), Some("max-age=7")),
        (Some(0), Some("max-age=0")),
        (None, None),
        (Some(DEFAULT_JWKS_MAX_AGE), Some("max-age=300")),
    ] {
        idp.set_jwks_max_age(max_age);
        let (status, headers, body) = get(&idp.jwks_uri()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(cache_control(&headers).as_deref(), expected, "{max_age:?}");
        assert!(body["keys"].is_array());
    }
    assert_eq!(idp.jwks_requests(), 5);
}

#[tokio::test]
async fn dropping_the_handle_stops_the_server() {
    let idp = idp().await;
    let url = idp.jwks_uri();
    let http = client();
    assert!(http.get(&url).send().await.is_ok());
    drop(idp);
    // The accept loop and its keep-alive connections are aborted: no answer comes back.
    let outcome = tokio::time::timeout(Duration::from_secs(5), http.get(&url).send()).await;
    assert!(matches!(outcome, Ok(Err(_))));
}
