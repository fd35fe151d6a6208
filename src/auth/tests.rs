use super::bearer::{MAX_BEARER_BYTES, bearer_token};
use super::token::{caller_claims, parse_unverified};
use super::*;
use crate::config::{Policy, Route, TokenKind};
use crate::jwt::B64;
use base64::Engine as _;
use http::HeaderValue;
use jsonwebtoken::Algorithm;
use serde_json::Map;

fn headers(values: &[&str]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for v in values {
        h.append(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(v).expect("header"),
        );
    }
    h
}

fn jwt(header: &Value, payload: &str) -> String {
    format!(
        "{}.{}.c2ln",
        B64.encode(header.to_string()),
        B64.encode(payload)
    )
}

#[test]
fn bearer_scheme_is_case_insensitive() {
    assert_eq!(
        bearer_token(&headers(&["bEaReR abc.def.ghi"])).ok(),
        Some("abc.def.ghi")
    );
}

#[test]
fn missing_or_other_scheme_is_missing_token() {
    assert!(matches!(
        bearer_token(&headers(&[])),
        Err(ProxyError::MissingToken)
    ));
    assert!(matches!(
        bearer_token(&headers(&["Basic dXNlcjpwYXNz"])),
        Err(ProxyError::MissingToken)
    ));
}

#[test]
fn two_headers_or_two_tokens_are_invalid() {
    assert!(matches!(
        bearer_token(&headers(&["Bearer a.b.c", "Bearer d.e.f"])),
        Err(ProxyError::InvalidToken(_))
    ));
    assert!(matches!(
        bearer_token(&headers(&["Bearer a.b.c d.e.f"])),
        Err(ProxyError::InvalidToken(_))
    ));
    assert!(matches!(
        bearer_token(&headers(&["Bearer a.b.c,d.e.f"])),
        Err(ProxyError::InvalidToken(_))
    ));
}

#[test]
fn oversized_bearer_is_invalid() {
    let big = format!("Bearer {}", "a".repeat(MAX_BEARER_BYTES + 1));
    assert!(matches!(
        bearer_token(&headers(&[&big])),
        Err(ProxyError::InvalidToken(TokenDefect::TooLarge))
    ));
}

#[test]
fn alg_none_and_hs256_are_refused_before_verification() {
    let allowed = [Algorithm::RS256];
    for alg in ["none", "None", "NONE", "HS256", "nOnE", ""] {
        let token = jwt(&serde_json::json!({"alg": alg}), r#"{"exp": 1}"#);
        assert!(
            matches!(
                parse_unverified(&token, &allowed),
                Err(ProxyError::InvalidToken(TokenDefect::AlgorithmNotAllowed))
            ),
            "{alg}"
        );
    }
}

#[test]
fn crit_duplicate_claims_and_string_exp_are_refused() {
    let allowed = [Algorithm::RS256];
    let rs = serde_json::json!({"alg": "RS256", "kid": "k"});
    let crit = jwt(
        &serde_json::json!({"alg": "RS256", "crit": ["b64"]}),
        r#"{"exp": 1}"#,
    );
    assert!(parse_unverified(&crit, &allowed).is_err());
    let dup = jwt(&rs, r#"{"exp": 1, "aud": "a", "aud": "b"}"#);
    assert!(parse_unverified(&dup, &allowed).is_err());
    let string_exp = jwt(&rs, r#"{"exp": "99999999999"}"#);
    assert!(matches!(
        parse_unverified(&string_exp, &allowed),
        Err(ProxyError::InvalidToken(TokenDefect::ExpNotNumeric))
    ));
    let no_exp = jwt(&rs, r#"{"sub": "x"}"#);
    assert!(parse_unverified(&no_exp, &allowed).is_err());
    let array = jwt(&rs, "[1, 2]");
    assert!(parse_unverified(&array, &allowed).is_err());
    let ok = jwt(&rs, r#"{"exp": 1.5e9, "scp": "a b"}"#);
    assert!(parse_unverified(&ok, &allowed).is_ok());
}

fn route(token: TokenKind, policy: Policy) -> Route {
    Route {
        policy,
        ..Route::for_tests("/r", "http://127.0.0.1/", token)
    }
}

fn claims(scp: &str, roles: &[&str]) -> CallerClaims {
    let mut all = Map::new();
    all.insert("scp".into(), Value::from(scp));
    all.insert("roles".into(), Value::from(roles.to_vec()));
    caller_claims(
        &all,
        0,
        &["scp".to_owned()],
        "roles",
        jwks::Key::for_tests(),
    )
}

#[test]
fn a_name_with_a_space_is_never_two_names() {
    let mut all = Map::new();
    all.insert("roles".into(), Value::from(vec!["Reader Admin", "User"]));
    all.insert("scp".into(), Value::from("b  a b"));
    let claims = caller_claims(
        &all,
        0,
        &["scp".to_owned()],
        "roles",
        jwks::Key::for_tests(),
    );
    assert!(claims.roles.contains("User"));
    assert!(!claims.roles.contains("Admin") && !claims.roles.contains("Reader"));
    assert!(claims.scopes.contains("a") && claims.scopes.contains("b"));
    assert!(!claims.scopes.contains(""));
}

#[test]
fn policy_needs_one_scope_or_one_role() {
    let policy = Policy {
        required_scopes: Some(vec!["read".into()]),
        required_roles: Some(vec!["Admin".into()]),
    };
    let r = route(TokenKind::Passthrough, policy);
    assert!(authorize(&claims("read write", &[]), &r).is_ok());
    assert!(authorize(&claims("", &["Admin"]), &r).is_ok());
    assert!(matches!(
        authorize(&claims("write", &["User"]), &r),
        Err(ProxyError::InsufficientScope { .. })
    ));
    let open = route(TokenKind::Passthrough, Policy::default());
    assert!(authorize(&claims("", &[]), &open).is_ok());
}

#[test]
fn app_only_token_on_obo_route_is_refused() {
    let r = route(TokenKind::Obo, Policy::default());
    assert!(matches!(
        authorize(&claims("", &["Reader"]), &r),
        Err(ProxyError::InsufficientScope { .. })
    ));
}

mod no_panic {
    use super::*;
    use proptest::prelude::*;

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            "[A-Za-z0-9_=+/ -]{0,40}",
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| B64.encode(b)),
            (any::<u8>(), "[a-z]{1,8}", any::<i64>()).prop_map(|(n, k, v)| B64.encode(format!(
                "{{\"alg\":\"RS256\",\"kid\":\"{k}\",\"exp\":{v},\"n\":{n},\"{k}\":[{v}]}}"
            ))),
        ]
    }

    proptest! {
        /// Any header value: the Authorization parser answers, never panics.
        #[test]
        fn authorization_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut h = HeaderMap::new();
            if let Ok(value) = http::HeaderValue::from_bytes(&bytes) {
                h.insert(http::header::AUTHORIZATION, value);
            }
            let _ = bearer_token(&h);
        }

        /// Any dotted token shape: the pre-verification parser answers, never panics.
        #[test]
        fn token_parser_never_panics(parts in proptest::collection::vec(segment(), 0..6), raw in ".{0,200}") {
            let allowed = [Algorithm::RS256, Algorithm::ES256, Algorithm::PS256];
            let _ = parse_unverified(&parts.join("."), &allowed);
            let _ = parse_unverified(&raw, &allowed);
        }
    }
}

/// Cost of caller validation: a full RS256 verification (first sight of a token) against a validated-token
/// cache hit (the same token again). A measurement, not a test:
/// `cargo test --release --lib -- --ignored --nocapture measure`; the figures go in BENCHMARKS.md.
#[cfg(feature = "dev")]
#[tokio::test(flavor = "current_thread")]
#[ignore = "a measurement, for BENCHMARKS.md"]
#[allow(clippy::print_stdout, reason = "the measurement's report")]
async fn measure_validation_cost() {
    use crate::dev::{DevIdp, DevIdpConfig, TokenClaims};
    const TOKENS: u32 = 5_000;
    const ROUNDS: u32 = 20;
    crate::tls::install_crypto_provider();
    let idp = DevIdp::start(
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind"),
        DevIdpConfig::default(),
    )
    .await
    .expect("idp");
    let text = format!(
        "[inbound]\nissuers = [\"{}\"]\naudiences = [\"api://obo-sidecar\"]\n[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1/\"\ntoken = \"none\"\n",
        idp.issuer()
    );
    let config = crate::config::Config::parse(&text, &|_| None).expect("config");
    let http = crate::tls::idp_client(&[], Duration::from_secs(5)).expect("client");
    let metrics = Arc::new(crate::telemetry::Metrics::new());
    let authenticator =
        Authenticator::new(&config.inbound, 100_000, &http, metrics).expect("authenticator");
    let _tasks = authenticator.start();
    authenticator.ready().await;
    let tokens: Vec<HeaderMap> = (0..TOKENS)
        .map(|i| {
            headers(&[&format!(
                "Bearer {}",
                idp.mint(&TokenClaims {
                    scp: Some("access_as_user".into()),
                    ..TokenClaims::user(format!("user-{i}"))
                })
            )])
        })
        .collect();
    let started = std::time::Instant::now();
    for h in &tokens {
        authenticator
            .authenticate(h, &LastDigest::default())
            .await
            .expect("valid");
    }
    let full = started.elapsed().as_nanos() / u128::from(TOKENS);
    let started = std::time::Instant::now();
    for _ in 0..ROUNDS {
        for h in &tokens {
            authenticator
                .authenticate(h, &LastDigest::default())
                .await
                .expect("valid");
        }
    }
    let hit = started.elapsed().as_nanos() / u128::from(TOKENS * ROUNDS);
    println!(
        "full RS256 validation: {full} ns/token; validated-cache hit: {hit} ns/token ({}x cheaper)",
        full / hit.max(1)
    );
}
