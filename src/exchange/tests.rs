use super::answer::*;
use serde_json::Value;
use std::time::Duration;

#[test]
fn cache_lifetime_honours_margin_half_life_and_subject_expiry() {
    let m = Duration::from_secs(300);
    let secs = |(a, b): (Duration, Duration)| (a.as_secs(), b.as_secs());
    assert_eq!(
        secs(cache_lifetime(1000, 1000 + 3600, None, m)),
        (3300, 3570)
    );
    // margin capped at half of a short lifetime
    assert_eq!(secs(cache_lifetime(1000, 1000 + 240, None, m)), (120, 210));
    // never within 30 s of exp
    assert_eq!(
        secs(cache_lifetime(1000, 1000 + 40, None, Duration::ZERO)),
        (10, 10)
    );
    // dies with the subject token
    assert_eq!(
        secs(cache_lifetime(1000, 1000 + 3600, Some(1600), m)),
        (600, 600)
    );
    // unknown or past expiry: not cached
    assert_eq!(secs(cache_lifetime(1000, 0, None, m)), (0, 0));
}

#[test]
fn idp_errors_map_per_spec_table() {
    let map = |body: &str| {
        map_error_answer(
            http::StatusCode::BAD_REQUEST,
            body.as_bytes(),
            "https://idp/t/oauth2/v2.0/token",
        )
    };
    assert!(matches!(
        map(r#"{"error":"invalid_grant","error_codes":[50013]}"#),
        ExchangeError::SubjectRejected { .. }
    ));
    match map(r#"{"error":"interaction_required","claims":"{\"access_token\":{}}"}"#) {
        ExchangeError::ClaimsChallenge {
            authorization_uri, ..
        } => {
            assert_eq!(authorization_uri, "https://idp/t/oauth2/v2.0/authorize");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        map(r#"{"error":"invalid_grant","error_codes":[65001],"suberror":"consent_required"}"#),
        ExchangeError::ConsentRequired { .. }
    ));
    for error in [
        "invalid_client",
        "unauthorized_client",
        "invalid_scope",
        "invalid_request",
    ] {
        assert!(matches!(
            map(&format!(r#"{{"error":"{error}"}}"#)),
            ExchangeError::Misconfigured { .. }
        ));
    }
    assert!(matches!(map("<html>"), ExchangeError::Misconfigured { .. }));
}

#[test]
fn expires_in_may_be_a_string() {
    assert_eq!(expires_in_seconds(Some(&Value::from("3599"))), Some(3599));
    assert_eq!(expires_in_seconds(Some(&Value::from(60))), Some(60));
    assert_eq!(expires_in_seconds(Some(&Value::from(-1))), None);
    assert_eq!(expires_in_seconds(Some(&Value::from(59.9))), Some(59));
    assert_eq!(expires_in_seconds(Some(&Value::from("nan"))), None);
}

#[test]
fn absurd_lifetimes_are_clamped_to_a_day() {
    let day = MAX_TOKEN_LIFETIME.as_secs();
    for absurd in [
        serde_json::json!(10_000_000_000_000_000_000_u64),
        serde_json::json!(1e19),
        serde_json::json!(1e300),
        serde_json::json!("18446744073709551615"),
    ] {
        assert_eq!(expires_in_seconds(Some(&absurd)), Some(day), "{absurd}");
    }
    let (stale, expired) = cache_lifetime(1000, 1000 + day, None, Duration::from_secs(300));
    assert!(stale < expired && expired <= MAX_TOKEN_LIFETIME);
}

#[test]
fn jwt_shaped_words_are_redacted_from_logged_answers() {
    assert!(looks_like_jwt(
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXBhcnQ"
    ));
    assert!(!looks_like_jwt("AADSTS50013:"));
}

#[test]
fn a_jwt_at_the_length_limit_is_redacted_whole() {
    let config = crate::config::Config::parse(
        r#"
[inbound]
issuers = ["https://idp.example/"]
audiences = ["api://a"]
[identity]
token_endpoint = "https://idp.example/token"
client_id = "a"
client_secret = { env = "S" }
[[routes]]
name = "r"
path_prefix = "/r/"
upstream = "https://up.example/"
token = "app"
scopes = ["api://b/.default"]
"#,
        &|name| (name == "S").then(|| "s3cret".to_owned()),
    )
    .expect("valid");
    let identity = &config.identities["default"];
    let jwt = format!(
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.{}",
        "c2ln".repeat(200)
    );
    // The token straddles the cut: shortening first would leave a prefix that no longer looks like a JWT.
    let padding = "x".repeat(MAX_LOGGED_DESCRIPTION - 20);
    let body = serde_json::json!({
        "error": "invalid_grant",
        "error_description": format!("{padding} {jwt}"),
    });
    let logged = redacted_answer(body.to_string().as_bytes(), identity);
    assert!(logged.contains("[redacted]"), "{logged}");
    assert!(!logged.contains("eyJhbGci"), "{logged}");
}
