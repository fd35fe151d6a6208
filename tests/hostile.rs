//! Hostile caller tokens and `Authorization` headers (issue 5, first acceptance point): a table of forged,
//! malformed and confused tokens sent to an `obo` route. Every case must be refused with 401 (or, where a
//! request-level limit answers first, 400/431), carry a `Bearer` challenge, quote no part of the token, and
//! reach neither the upstream, nor the IdP's token endpoint, nor any URL the token itself names.
// Every integration test runs against the development IdP and echo upstream.
#![cfg(feature = "dev")]
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "helpers of tests: a failure is a test failure"
)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use aws_lc_rs::signature::KeyPair as _;
use base64::Engine as _;
use obo_sidecar::dev::{DEFAULT_CLIENT_ID, DEFAULT_TENANT_ID, DevIdp, DevIdpConfig};
use serde_json::{Value, json};
use support::Harness;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
const STD: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const AUDIENCE: &str = "api://obo-sidecar";

fn now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs(),
    )
    .expect("time")
}

// ---------------------------------------------------------------------------------------------------------
// The corpus: what is sent, what must come back.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Category {
    Alg,
    Claims,
    Keys,
    Structure,
    Tenant,
    Syntax,
}

enum Sent {
    /// `Authorization: Bearer <token>`, sent by reqwest.
    Token(String),
    /// One `Authorization` header line per value, written verbatim on the wire.
    Authorization(Vec<Vec<u8>>),
    /// A request for `target` with these header lines written verbatim (no `Authorization` added).
    Raw { target: String, lines: Vec<Vec<u8>> },
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    /// 401 with `Bearer error="invalid_token", …`.
    InvalidToken,
    /// 401 with a bare `Bearer` challenge: no bearer token was presented at all.
    NoToken,
    /// 401 with any `Bearer …` challenge: the header is malformed, and either answer is right.
    Refused,
    /// A request-level limit or framing error answers before authentication: exactly this status, and no
    /// challenge is required (it is not an authentication failure).
    Limit(u16),
}

struct Case {
    category: Category,
    name: String,
    sent: Sent,
    expect: Expect,
    /// What must never be echoed: its `.`/space/`,`-separated pieces longer than 8 characters.
    secret: String,
}

impl Case {
    fn token(category: Category, name: impl Into<String>, token: String) -> Case {
        Case {
            category,
            name: name.into(),
            secret: token.clone(),
            sent: Sent::Token(token),
            expect: Expect::InvalidToken,
        }
    }

    fn header(category: Category, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Case {
        Case::headers(category, name, vec![value.into()])
    }

    fn headers(category: Category, name: impl Into<String>, values: Vec<Vec<u8>>) -> Case {
        let secret = values
            .iter()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        Case {
            category,
            name: name.into(),
            secret,
            sent: Sent::Authorization(values),
            expect: Expect::Refused,
        }
    }

    fn raw(
        category: Category,
        name: impl Into<String>,
        target: &str,
        lines: Vec<Vec<u8>>,
        secret: &str,
    ) -> Case {
        Case {
            category,
            name: name.into(),
            secret: secret.to_owned(),
            sent: Sent::Raw {
                target: target.to_owned(),
                lines,
            },
            expect: Expect::Refused,
        }
    }

    fn expect(mut self, expect: Expect) -> Case {
        self.expect = expect;
        self
    }
}

/// What came back, from reqwest or from the raw socket.
struct Outcome {
    status: u16,
    challenge: Option<String>,
    content_type: Option<String>,
    /// Every response header value and the body.
    text: String,
}

async fn send(h: &Harness, sent: &Sent) -> Outcome {
    match sent {
        Sent::Token(token) => {
            let response = h.get("/obo/x", Some(token)).await;
            let status = response.status().as_u16();
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            };
            let challenge = header("www-authenticate");
            let content_type = header("content-type");
            let mut text: String = response
                .headers()
                .values()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned() + "\n")
                .collect();
            text.push_str(&response.text().await.expect("body"));
            Outcome {
                status,
                challenge,
                content_type,
                text,
            }
        }
        Sent::Authorization(values) => {
            let lines: Vec<Vec<u8>> = values
                .iter()
                .map(|v| [b"Authorization: ".as_slice(), v].concat())
                .collect();
            send_raw(h.sidecar.proxy_addr, "/obo/x", &lines).await
        }
        Sent::Raw { target, lines } => send_raw(h.sidecar.proxy_addr, target, lines).await,
    }
}

async fn send_raw(addr: SocketAddr, target: &str, lines: &[Vec<u8>]) -> Outcome {
    let mut request = format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n").into_bytes();
    for line in lines {
        request.extend_from_slice(line);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"Connection: close\r\n\r\n");
    let (status, text) = support::raw_request(addr, &request).await;
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    let header = |name: &str| {
        head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    };
    Outcome {
        status,
        challenge: header("www-authenticate"),
        content_type: header("content-type"),
        text,
    }
}

/// Everything wrong with `outcome` for `case`; empty when it is right.
fn judge(case: &Case, outcome: &Outcome) -> Vec<String> {
    let mut wrong = Vec::new();
    if let Expect::Limit(status) = case.expect {
        if outcome.status != status {
            wrong.push(format!("status {} (want {status})", outcome.status));
        }
    } else {
        if outcome.status != 401 {
            wrong.push(format!("status {} (want 401)", outcome.status));
        }
        match &outcome.challenge {
            None => wrong.push("no WWW-Authenticate".to_owned()),
            Some(challenge) => {
                let ok = match case.expect {
                    Expect::InvalidToken => challenge.starts_with("Bearer error=\"invalid_token\""),
                    Expect::NoToken => challenge == "Bearer",
                    Expect::Refused | Expect::Limit(_) => challenge.starts_with("Bearer"),
                };
                if !ok {
                    wrong.push(format!("challenge {challenge:?} (want {:?})", case.expect));
                }
            }
        }
        if outcome.status == 401
            && outcome.content_type.as_deref() != Some("application/problem+json")
        {
            wrong.push(format!("content-type {:?}", outcome.content_type));
        }
    }
    let echoed = case
        .secret
        .split(['.', ' ', ',', '\t', '\r', '\n'])
        .filter(|piece| piece.len() > 8)
        .any(|piece| outcome.text.contains(piece));
    if echoed {
        wrong.push("the answer quotes part of the token".to_owned());
    }
    wrong
}

/// Sends every case; returns one line per case answered wrongly (and per case that reached the upstream or
/// the IdP's token endpoint).
async fn run(h: &Harness, cases: &[Case]) -> Vec<String> {
    let mut failures = Vec::new();
    for case in cases {
        let before = (h.upstream.requests(), h.idp.token_requests());
        let outcome = send(h, &case.sent).await;
        let mut wrong = judge(case, &outcome);
        if h.upstream.requests() != before.0 {
            wrong.push("REACHED THE UPSTREAM".to_owned());
        }
        if h.idp.token_requests() != before.1 {
            wrong.push("reached the IdP token endpoint".to_owned());
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "[{:?}] {}: {}",
                case.category,
                case.name,
                wrong.join("; ")
            ));
        }
    }
    failures
}

fn summary(cases: &[Case]) -> String {
    let mut counts: BTreeMap<Category, usize> = BTreeMap::new();
    for case in cases {
        *counts.entry(case.category).or_default() += 1;
    }
    format!("{} cases: {counts:?}", cases.len())
}

// ---------------------------------------------------------------------------------------------------------
// Material for forging: the IdP's public key, an attacker's key and certificate, a listener that must never
// be contacted.

/// A loopback listener that counts every connection it accepts: URLs in hostile tokens point here.
struct Trap {
    url: String,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Trap {
    async fn start() -> Trap {
        let listener = support::bind().await;
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&hits);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Trap { url, hits, task }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Trap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An RSA key the attacker holds, with a self-signed certificate for it.
struct Attacker {
    key: aws_lc_rs::rsa::KeyPair,
    n: Vec<u8>,
    e: Vec<u8>,
    cert_der: Vec<u8>,
}

impl Attacker {
    fn new() -> Attacker {
        let generated = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA key");
        let cert = rcgen::CertificateParams::new(vec!["attacker.example".to_owned()])
            .expect("params")
            .self_signed(&generated)
            .expect("certificate");
        let key = aws_lc_rs::rsa::KeyPair::from_pkcs8(&generated.serialize_der()).expect("pkcs8");
        let public = key.public_key();
        let n = public.modulus().big_endian_without_leading_zero().to_vec();
        let e = public.exponent().big_endian_without_leading_zero().to_vec();
        Attacker {
            key,
            n,
            e,
            cert_der: cert.der().to_vec(),
        }
    }

    fn jwk(&self, kid: Option<&str>) -> Value {
        let mut jwk = json!({"kty": "RSA", "n": B64.encode(&self.n), "e": B64.encode(&self.e)});
        if let Some(kid) = kid {
            jwk["kid"] = json!(kid);
        }
        jwk
    }

    /// RS256 over `b64(header).b64(claims)` with the attacker's key.
    fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let mut signature = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(
                &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut signature,
            )
            .expect("sign");
        format!("{input}.{}", B64.encode(&signature))
    }
}

/// The DER of OID 1.2.840.113549.1.1.1, `rsaEncryption` (RFC 8017 Appendix A.1).
const RSA_ENCRYPTION: [u8; 9] = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

/// DER: tag, definite length, content.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match u8::try_from(content.len()) {
        Ok(short) if short < 0x80 => out.push(short),
        _ => {
            let len = content.len().to_be_bytes();
            let skip = len.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | u8::try_from(len.len() - skip).expect("length of length"));
            out.extend_from_slice(&len[skip..]);
        }
    }
    out.extend_from_slice(content);
    out
}

/// A DER INTEGER for an unsigned big-endian number.
fn der_uint(bytes: &[u8]) -> Vec<u8> {
    let mut content = Vec::new();
    if bytes.first().is_some_and(|b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(bytes);
    der(0x02, &content)
}

/// The IdP's public key in every form a confused verifier might use as an HMAC secret.
struct PublicForms {
    /// The JWKS document as served.
    jwks_text: String,
    kid: String,
    n: Vec<u8>,
    n_text: String,
    pkcs1: Vec<u8>,
    spki: Vec<u8>,
    pem: String,
}

impl PublicForms {
    async fn fetch(h: &Harness) -> PublicForms {
        let jwks_text = h
            .http
            .get(h.idp.jwks_uri())
            .send()
            .await
            .expect("jwks")
            .text()
            .await
            .expect("jwks body");
        let jwks: Value = serde_json::from_str(&jwks_text).expect("jwks json");
        let key = &jwks["keys"][0];
        let kid = key["kid"].as_str().expect("kid").to_owned();
        let n_text = key["n"].as_str().expect("n").to_owned();
        let n = B64.decode(&n_text).expect("n");
        let e = B64.decode(key["e"].as_str().expect("e")).expect("e");
        let pkcs1 = der(0x30, &[der_uint(&n), der_uint(&e)].concat());
        let algorithm = der(0x30, &[der(0x06, &RSA_ENCRYPTION), der(0x05, &[])].concat());
        let spki = der(
            0x30,
            &[algorithm, der(0x03, &[&[0u8][..], &pkcs1].concat())].concat(),
        );
        let body = STD.encode(&spki);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect();
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            lines.join("\n")
        );
        PublicForms {
            jwks_text,
            kid,
            n,
            n_text,
            pkcs1,
            spki,
            pem,
        }
    }
}

/// A valid token's parts, to be spoiled one at a time.
struct Kit {
    issuer: String,
    kid: String,
    /// A token the sidecar accepts (checked by `good_tokens_in_accepted_spellings_are_200`).
    good: String,
}

impl Kit {
    fn new(h: &Harness, kid: &str) -> Kit {
        let kit = Kit {
            issuer: h.idp.issuer(),
            kid: kid.to_owned(),
            good: String::new(),
        };
        let good = h.idp.sign(&kit.header(), &kit.claims());
        Kit { good, ..kit }
    }

    fn header(&self) -> Value {
        json!({"alg": "RS256", "typ": "JWT", "kid": self.kid})
    }

    fn header_with(&self, key: &str, value: Value) -> Value {
        let mut header = self.header();
        header[key] = value;
        header
    }

    fn claims(&self) -> Value {
        json!({
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "mallory",
            "scp": "access_as_user",
            "tid": DEFAULT_TENANT_ID,
            "iat": now(),
            "exp": now() + 600,
        })
    }

    fn claims_with(&self, key: &str, value: Value) -> Value {
        let mut claims = self.claims();
        claims[key] = value;
        claims
    }

    fn claims_without(&self, key: &str) -> Value {
        let mut claims = self.claims();
        claims.as_object_mut().expect("object").remove(key);
        claims
    }

    /// The good token's signature: valid, but not over whatever it is glued to.
    fn signature(&self) -> &str {
        self.good.rsplit('.').next().expect("signature")
    }

    /// `b64(header).b64(payload).signature` from raw text: for what `DevIdp::sign` cannot produce
    /// (duplicate members, non-JSON). The signature is the good token's, so it verifies over nothing here.
    fn raw(&self, header: &str, payload: &str) -> String {
        format!(
            "{}.{}.{}",
            B64.encode(header),
            B64.encode(payload),
            self.signature()
        )
    }

    fn header_text(&self) -> String {
        self.header().to_string()
    }

    /// The good claims as JSON text with `extra` members spliced in before the closing brace.
    fn claims_text_plus(&self, extra: &str) -> String {
        let text = self.claims().to_string();
        format!("{},{extra}}}", &text[..text.len() - 1])
    }
}

fn hmac_token(alg: &str, key: &[u8], kit: &Kit) -> String {
    let algorithm = match alg {
        "HS256" => aws_lc_rs::hmac::HMAC_SHA256,
        "HS384" => aws_lc_rs::hmac::HMAC_SHA384,
        _ => aws_lc_rs::hmac::HMAC_SHA512,
    };
    let header = json!({"alg": alg, "typ": "JWT", "kid": kit.kid});
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(kit.claims().to_string())
    );
    let tag = aws_lc_rs::hmac::sign(&aws_lc_rs::hmac::Key::new(algorithm, key), input.as_bytes());
    format!("{input}.{}", B64.encode(tag.as_ref()))
}

// ---------------------------------------------------------------------------------------------------------
// The categories.

fn alg_cases(h: &Harness, kit: &Kit, public: &PublicForms) -> Vec<Case> {
    use Category::Alg;
    let mut cases = Vec::new();
    for spelling in ["none", "None", "NONE", "nOnE"] {
        let unsigned = format!(
            "{}.{}.",
            B64.encode(json!({"alg": spelling, "typ": "JWT"}).to_string()),
            B64.encode(kit.claims().to_string())
        );
        cases.push(Case::token(
            Alg,
            format!("alg {spelling:?}, empty signature"),
            unsigned.clone(),
        ));
        cases.push(Case::token(
            Alg,
            format!("alg {spelling:?}, a real RS256 signature attached"),
            format!("{unsigned}{}", kit.signature()),
        ));
    }
    let keys: [(&str, &[u8]); 6] = [
        ("modulus bytes", &public.n),
        ("JWK n text", public.n_text.as_bytes()),
        ("PKCS#1 DER", &public.pkcs1),
        ("SPKI DER", &public.spki),
        ("PEM", public.pem.as_bytes()),
        ("JWKS document", public.jwks_text.as_bytes()),
    ];
    for alg in ["HS256", "HS384", "HS512"] {
        for (form, key) in keys {
            cases.push(Case::token(
                Alg,
                format!("{alg} keyed with the IdP's public key ({form})"),
                hmac_token(alg, key, kit),
            ));
        }
    }
    // Header lies: the IdP's RS256 signature under another `alg`.
    let lies: Vec<(&str, Value)> = vec![
        ("ES256 header over an RSA signature", json!("ES256")),
        ("ES384 header over an RSA signature", json!("ES384")),
        ("PS256 header over an RS256 signature", json!("PS256")),
        ("RS512 header over an RS256 signature", json!("RS512")),
        ("EdDSA header", json!("EdDSA")),
        ("RS1 header", json!("RS1")),
        ("lower-case rs256", json!("rs256")),
        ("RS256 with a trailing space", json!("RS256 ")),
        ("alg RSA-OAEP (a JWE algorithm)", json!("RSA-OAEP")),
        ("alg dir (a JWE algorithm)", json!("dir")),
        ("empty alg", json!("")),
        ("alg as a number", json!(256)),
        ("alg as an array", json!(["RS256"])),
        ("alg null", Value::Null),
        ("alg as an object", json!({"name": "RS256"})),
    ];
    for (name, alg) in lies {
        cases.push(Case::token(
            Alg,
            name,
            h.idp.sign(&kit.header_with("alg", alg), &kit.claims()),
        ));
    }
    let mut no_alg = kit.header();
    no_alg.as_object_mut().expect("object").remove("alg");
    cases.push(Case::token(
        Alg,
        "no alg at all",
        h.idp.sign(&no_alg, &kit.claims()),
    ));
    cases
}

fn claims_cases(h: &Harness, kit: &Kit) -> Vec<Case> {
    use Category::Claims;
    let signed = |claims: Value| h.idp.sign(&kit.header(), &claims);
    let with = |key: &str, value: Value| signed(kit.claims_with(key, value));
    let without = |key: &str| signed(kit.claims_without(key));
    let iss = kit.issuer.clone();
    let mut cases = vec![
        ("wrong aud", with("aud", json!("api://someone-else"))),
        (
            "aud array without ours",
            with("aud", json!(["api://a", "api://b"])),
        ),
        ("empty aud array", with("aud", json!([]))),
        ("empty aud string", with("aud", json!(""))),
        ("aud as a number", with("aud", json!(42))),
        ("aud as an object", with("aud", json!({AUDIENCE: true}))),
        ("aud nested in an array", with("aud", json!([[AUDIENCE]]))),
        ("aud null", with("aud", Value::Null)),
        ("aud missing", without("aud")),
        ("aud case-changed", with("aud", json!("API://OBO-SIDECAR"))),
        (
            "aud with a trailing slash",
            with("aud", json!(format!("{AUDIENCE}/"))),
        ),
        ("wrong iss", with("iss", json!("https://evil.example.com"))),
        (
            "iss with a trailing slash",
            with("iss", json!(format!("{iss}/"))),
        ),
        ("iss case-changed", with("iss", json!(iss.to_uppercase()))),
        ("iss missing", without("iss")),
        ("iss null", with("iss", Value::Null)),
        ("iss as an array holding ours", with("iss", json!([iss]))),
        (
            "expired beyond the 5 s skew",
            signed(json!({
                "iss": iss, "aud": AUDIENCE, "sub": "mallory", "scp": "access_as_user",
                "iat": now() - 1200, "exp": now() - 60,
            })),
        ),
        ("exp 0", with("exp", json!(0))),
        ("exp negative", with("exp", json!(-1))),
        ("exp huge negative", with("exp", json!(i64::MIN))),
        (
            "exp as a string",
            with("exp", json!((now() + 600).to_string())),
        ),
        (
            "exp as a float string",
            with("exp", json!(format!("{}.5", now() + 600))),
        ),
        ("exp null", with("exp", Value::Null)),
        ("exp as an object", with("exp", json!({"$gt": 0}))),
        ("exp as an array", with("exp", json!([now() + 600]))),
        ("exp as a boolean", with("exp", json!(true))),
        ("exp missing", without("exp")),
        ("nbf in the future", with("nbf", json!(now() + 600))),
        ("nbf as a string", with("nbf", json!(now().to_string()))),
        ("nbf null", with("nbf", Value::Null)),
        (
            "iat in the future beyond skew",
            with("iat", json!(now() + 600)),
        ),
        ("iat as a string", with("iat", json!(now().to_string()))),
        (
            "payload a JSON array (signed)",
            signed(json!([kit.claims()])),
        ),
        ("payload a JSON string (signed)", signed(json!("claims"))),
        ("payload a JSON number (signed)", signed(json!(1))),
        ("payload JSON null (signed)", signed(Value::Null)),
        ("payload an empty object (signed)", signed(json!({}))),
    ]
    .into_iter()
    .map(|(name, token)| Case::token(Claims, name, token))
    .collect::<Vec<_>>();
    // Duplicate members cannot be signed through `DevIdp::sign` (it takes a `Value`); the sidecar must refuse
    // them before verifying, so the (non-matching) signature does not matter. Ours comes last, where a
    // last-wins parser would read it.
    let header = kit.header_text();
    let unsigned = kit.claims_without("aud").to_string();
    let unsigned_aud = |extra: &str| format!("{},{extra}}}", &unsigned[..unsigned.len() - 1]);
    let raw: Vec<(&str, String)> = vec![
        (
            "duplicate aud (foreign first, ours last)",
            kit.raw(
                &header,
                &unsigned_aud(&format!(r#""aud":"api://evil","aud":"{AUDIENCE}""#)),
            ),
        ),
        (
            "duplicate aud spelled with a \\u escape",
            kit.raw(
                &header,
                &unsigned_aud(&format!(r#""aud":"api://evil","a\u0075d":"{AUDIENCE}""#)),
            ),
        ),
        (
            "duplicate exp (past first, future last)",
            kit.raw(
                &header,
                &kit.claims_text_plus(&format!(r#""exp":{}"#, now() - 3600)),
            ),
        ),
        (
            "duplicate iss (evil, then ours)",
            kit.raw(
                &header,
                &format!(
                    r#"{{"iss":"https://evil.example.com",{}"#,
                    &kit.claims().to_string()[1..]
                ),
            ),
        ),
        (
            "payload not JSON",
            kit.raw(&header, "iss=evil&aud=api://obo-sidecar"),
        ),
        (
            "payload with a UTF-8 BOM",
            kit.raw(&header, &format!("\u{feff}{}", kit.claims())),
        ),
        (
            "payload with trailing garbage",
            kit.raw(&header, &format!("{}garbage", kit.claims())),
        ),
        (
            "payload with a comment",
            kit.raw(&header, &format!("/* hi */{}", kit.claims())),
        ),
        (
            "payload nested 4000 deep",
            kit.raw(
                &header,
                &kit.claims_text_plus(&format!(r#""x":{}{}"#, "[".repeat(4000), "]".repeat(4000))),
            ),
        ),
        (
            "payload with a lone surrogate escape",
            kit.raw(&header, &kit.claims_text_plus(r#""sub2":"\ud800""#)),
        ),
    ];
    cases.extend(
        raw.into_iter()
            .map(|(name, token)| Case::token(Claims, name, token)),
    );
    cases
}

fn keys_cases(
    h: &Harness,
    kit: &Kit,
    attacker: &Attacker,
    stranger: &DevIdp,
    trap: &Trap,
) -> Vec<Case> {
    use Category::Keys;
    let with_kid = |kid: Value| h.idp.sign(&kit.header_with("kid", kid), &kit.claims());
    let mut no_kid = kit.header();
    no_kid.as_object_mut().expect("object").remove("kid");
    let attacker_header = |extra: Value, kid: Option<&str>| {
        let mut header = json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = kid {
            header["kid"] = json!(kid);
        }
        for (k, v) in extra.as_object().expect("object") {
            header[k] = v.clone();
        }
        header
    };
    let forged = |extra: Value, kid: Option<&str>| {
        attacker.sign(&attacker_header(extra, kid), &kit.claims())
    };
    let jku = format!("{}/jwks.json", trap.url);
    let x5u = format!("{}/cert.pem", trap.url);
    let x5c = json!([STD.encode(&attacker.cert_der)]);
    // The stranger's kid, as its own JWKS publishes it: read from a token it minted.
    let stranger_kid = {
        let minted = stranger.mint(&obo_sidecar::dev::TokenClaims::user("x"));
        let header = minted.split('.').next().expect("header");
        let header: Value =
            serde_json::from_slice(&B64.decode(header).expect("b64")).expect("json");
        header["kid"].as_str().expect("kid").to_owned()
    };
    let cases = vec![
        ("unknown kid (random)", with_kid(json!("f3b1c2d4e5a69788"))),
        ("kid ../../etc/passwd", with_kid(json!("../../etc/passwd"))),
        ("kid /dev/null", with_kid(json!("/dev/null"))),
        (
            "kid file:///etc/passwd",
            with_kid(json!("file:///etc/passwd")),
        ),
        (
            "kid naming the trap URL",
            with_kid(json!(format!("{}/key", trap.url))),
        ),
        ("kid with a NUL", with_kid(json!("a\u{0}b"))),
        (
            "our kid followed by a NUL",
            with_kid(json!(format!("{}\u{0}", kit.kid))),
        ),
        (
            "our kid upper-cased",
            with_kid(json!(kit.kid.to_uppercase())),
        ),
        (
            "our kid with a trailing space",
            with_kid(json!(format!("{} ", kit.kid))),
        ),
        ("kid 8 KiB long", with_kid(json!("k".repeat(8 * 1024)))),
        ("kid SQL", with_kid(json!("' OR '1'='1"))),
        ("kid as a number", with_kid(json!(1))),
        ("kid as an array", with_kid(json!([kit.kid]))),
        ("kid null", with_kid(Value::Null)),
        ("kid empty", with_kid(json!(""))),
        (
            "no kid (the key set has no anonymous key)",
            h.idp.sign(&no_kid, &kit.claims()),
        ),
        (
            "jku to the trap, attacker-signed, attacker kid",
            forged(json!({"jku": jku}), Some("attacker-1")),
        ),
        (
            "jku to the trap, attacker-signed, our kid",
            forged(json!({"jku": jku}), Some(&kit.kid)),
        ),
        (
            "x5u to the trap, attacker-signed, attacker kid",
            forged(json!({"x5u": x5u}), Some("attacker-2")),
        ),
        (
            "x5u to the trap, attacker-signed, our kid",
            forged(json!({"x5u": x5u}), Some(&kit.kid)),
        ),
        (
            "embedded jwk, attacker-signed, no kid",
            forged(json!({"jwk": attacker.jwk(None)}), None),
        ),
        (
            "embedded jwk, attacker-signed, our kid in header and jwk",
            forged(json!({"jwk": attacker.jwk(Some(&kit.kid))}), Some(&kit.kid)),
        ),
        (
            "embedded jwk, attacker-signed, attacker kid",
            forged(
                json!({"jwk": attacker.jwk(Some("attacker-3"))}),
                Some("attacker-3"),
            ),
        ),
        (
            "x5c attacker certificate, attacker-signed, no kid",
            forged(json!({"x5c": x5c}), None),
        ),
        (
            "x5c attacker certificate, attacker-signed, our kid",
            forged(json!({"x5c": x5c}), Some(&kit.kid)),
        ),
        (
            "jku + x5u + jwk + x5c together, attacker-signed",
            forged(
                json!({"jku": jku, "x5u": x5u, "jwk": attacker.jwk(None), "x5c": x5c}),
                Some("attacker-4"),
            ),
        ),
        (
            "attacker-signed, iss naming the trap (no discovery fetch)",
            attacker.sign(
                &attacker_header(json!({}), Some("attacker-5")),
                &kit.claims_with("iss", json!(trap.url)),
            ),
        ),
        (
            "attacker-signed, our kid, no header tricks",
            forged(json!({}), Some(&kit.kid)),
        ),
        (
            "another DevIdp's key, our issuer, its kid",
            stranger.sign(&kit.header_with("kid", json!(stranger_kid)), &kit.claims()),
        ),
        (
            "another DevIdp's key, our issuer, our kid",
            stranger.sign(&kit.header(), &kit.claims()),
        ),
        (
            "crit [\"exp\"]",
            h.idp
                .sign(&kit.header_with("crit", json!(["exp"])), &kit.claims()),
        ),
        (
            "crit empty array",
            h.idp
                .sign(&kit.header_with("crit", json!([])), &kit.claims()),
        ),
        ("crit [\"b64\"] with b64 false", {
            let mut header = kit.header_with("crit", json!(["b64"]));
            header["b64"] = json!(false);
            h.idp.sign(&header, &kit.claims())
        }),
        ("a real signature of another token", {
            let other = h
                .idp
                .sign(&kit.header(), &kit.claims_with("sub", json!("victim")));
            let mut parts: Vec<&str> = kit.good.split('.').collect();
            parts[2] = other.rsplit('.').next().expect("signature");
            parts.join(".")
        }),
    ];
    cases
        .into_iter()
        .map(|(name, token)| Case::token(Keys, name, token))
        .collect()
}

fn structure_cases(h: &Harness, kit: &Kit) -> Vec<Case> {
    use Category::Structure;
    let good = &kit.good;
    let parts: Vec<&str> = good.split('.').collect();
    let (header, payload, signature) = (parts[0], parts[1], parts[2]);
    let standard_signature = signature.replace('-', "+").replace('_', "/");
    assert_ne!(standard_signature, signature, "signature has a - or _");
    let padded = |segment: &str| {
        let pad = (4 - segment.len() % 4) % 4;
        format!("{segment}{}", "=".repeat(pad.max(1)))
    };
    // 256 bytes are 342 characters; the last carries 2 bits, so its 4 low bits must be zero.
    let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let last = signature.chars().last().expect("last");
    let index = alphabet.find(last).expect("b64url");
    let non_canonical = format!(
        "{}{}",
        &signature[..signature.len() - 1],
        &alphabet[(index | 1)..=(index | 1)]
    );
    let jwe_header =
        B64.encode(json!({"alg": "RSA-OAEP", "enc": "A256GCM", "kid": kit.kid}).to_string());
    let nested = format!("{}{}", "[".repeat(4000), "]".repeat(4000));
    let mut cases: Vec<Case> = [
        ("one segment", header.to_owned()),
        ("two segments", format!("{header}.{payload}")),
        ("four segments", format!("{good}.e30")),
        (
            "trailing dot (four segments, last empty)",
            format!("{good}."),
        ),
        ("leading dot", format!(".{good}")),
        (
            "five segments (JWE-shaped)",
            format!("{jwe_header}.{signature}.AAAAAAAAAAAAAAAA.{payload}.AAAAAAAAAAAAAAAAAAAAAA"),
        ),
        ("only dots ..", "..".to_owned()),
        ("only dots ...", "...".to_owned()),
        ("empty header segment", format!(".{payload}.{signature}")),
        ("empty payload segment", format!("{header}..{signature}")),
        (
            "empty signature, RS256 header",
            format!("{header}.{payload}."),
        ),
        (
            "standard base64 (+ /) in the signature",
            format!("{header}.{payload}.{standard_signature}"),
        ),
        (
            "padded signature",
            format!("{header}.{payload}.{}", padded(signature)),
        ),
        (
            "padded header",
            format!("{}.{payload}.{signature}", padded(header)),
        ),
        (
            "padded payload",
            format!("{header}.{}.{signature}", padded(payload)),
        ),
        (
            "= inside the signature",
            format!(
                "{header}.{payload}.{}={}",
                &signature[..100],
                &signature[100..]
            ),
        ),
        (
            "non-canonical last character of the signature",
            format!("{header}.{payload}.{non_canonical}"),
        ),
        (
            "signature one character short",
            format!("{header}.{payload}.{}", &signature[..signature.len() - 1]),
        ),
        (
            "space inside the token",
            format!("{header}. {payload}.{signature}"),
        ),
        (
            "header segment not base64",
            format!("!!!!.{payload}.{signature}"),
        ),
        (
            "percent-encoded dots",
            format!("{header}%2E{payload}%2E{signature}"),
        ),
        (
            "header a JSON array (signed)",
            h.idp.sign(&json!([kit.header()]), &kit.claims()),
        ),
        (
            "header JSON null (signed)",
            h.idp.sign(&Value::Null, &kit.claims()),
        ),
        (
            "header a JSON string (signed)",
            h.idp.sign(&json!("RS256"), &kit.claims()),
        ),
        (
            "header with duplicate alg (none, then RS256)",
            kit.raw(
                &format!(r#"{{"alg":"none","alg":"RS256","kid":"{}"}}"#, kit.kid),
                &kit.claims().to_string(),
            ),
        ),
        (
            "header with duplicate kid",
            kit.raw(
                &format!(r#"{{"alg":"RS256","kid":"other","kid":"{}"}}"#, kit.kid),
                &kit.claims().to_string(),
            ),
        ),
        (
            "header with trailing garbage",
            kit.raw(
                &format!("{}x", kit.header_text()),
                &kit.claims().to_string(),
            ),
        ),
        (
            "header nested 4000 deep",
            kit.raw(
                &format!(r#"{{"alg":"RS256","kid":"{}","x":{nested}}}"#, kit.kid),
                &kit.claims().to_string(),
            ),
        ),
        (
            "17 KiB token (over the 16 KiB bearer limit)",
            format!("{header}.{payload}.{}", "A".repeat(17 * 1024)),
        ),
        ("17 KiB of one character", "a".repeat(17 * 1024)),
    ]
    .into_iter()
    .map(|(name, token)| Case::token(Structure, name, token))
    .collect();
    let bearer = |token: &str| format!("Bearer {token}").into_bytes();
    cases.extend([
        Case::header(
            Structure,
            "tab inside the token",
            bearer(&format!("{header}.\t{payload}.{signature}")),
        ),
        Case::header(
            Structure,
            "tab between scheme and token (RFC 9110 §11.4 wants 1*SP)",
            format!("Bearer\t{good}"),
        ),
        Case::header(
            Structure,
            "non-ASCII one-dot leader instead of dots",
            bearer(&format!("{header}\u{2024}{payload}\u{2024}{signature}")),
        ),
        // RFC 9110 §5.5: NUL is never allowed in a field value; the HTTP parser refuses the request.
        Case::header(
            Structure,
            "NUL inside the token (400: malformed request)",
            bearer(&format!("{header}.\0{payload}.{signature}")),
        )
        .expect(Expect::Limit(400)),
        // A CR LF ends the field: what follows is a line without a colon, a malformed request.
        Case::header(
            Structure,
            "CR LF inside the token (400: malformed request)",
            bearer(&format!("{header}\r\n.{payload}.{signature}")),
        )
        .expect(Expect::Limit(400)),
        // SPEC §4: headers > 64 KiB are 431, before any token handling.
        Case::header(
            Structure,
            "66 KiB token (431: header block over 64 KiB)",
            bearer(&"A".repeat(66 * 1024)),
        )
        .expect(Expect::Limit(431)),
    ]);
    cases
}

fn tenant_cases_base(h: &Harness, kit: &Kit, trap: &Trap) -> Vec<Case> {
    use Category::Tenant;
    let iss = &kit.issuer;
    let signed_iss = |value: String| {
        h.idp
            .sign(&kit.header(), &kit.claims_with("iss", json!(value)))
    };
    vec![
        Case::token(
            Tenant,
            "iss naming another tenant path",
            signed_iss(format!("{iss}/other-tenant")),
        ),
        Case::token(
            Tenant,
            "iss with our tenant id appended",
            signed_iss(format!("{iss}/{DEFAULT_TENANT_ID}")),
        ),
        Case::token(
            Tenant,
            "iss with a tenant query",
            signed_iss(format!("{iss}?tid=other")),
        ),
        Case::token(
            Tenant,
            "iss climbing out of a tenant path",
            signed_iss(format!("{iss}/other/..")),
        ),
        Case::token(
            Tenant,
            "iss with userinfo pointing at the trap",
            signed_iss(iss.replace("http://", &format!("http://{}@", &trap.url[7..]))),
        ),
    ]
}

fn syntax_cases(kit: &Kit) -> Vec<Case> {
    use Category::Syntax;
    let good = &kit.good;
    let bearer = format!("Bearer {good}");
    let mut non_ascii = bearer.clone().into_bytes();
    non_ascii.push(0xff);
    let mut latin1_scheme = b"B\xe9arer ".to_vec();
    latin1_scheme.extend_from_slice(good.as_bytes());
    vec![
        Case::header(Syntax, "Bearer with no token", "Bearer"),
        Case::header(Syntax, "Bearer and spaces only", "Bearer    "),
        Case::header(Syntax, "empty Authorization", ""),
        Case::header(
            Syntax,
            "Basic credentials (bare Bearer challenge)",
            "Basic dXNlcjpwYXNzd29yZA==",
        )
        .expect(Expect::NoToken),
        Case::header(Syntax, "a good token under Basic", format!("Basic {good}"))
            .expect(Expect::NoToken),
        Case::header(
            Syntax,
            "a good token under scheme Token",
            format!("Token {good}"),
        ),
        Case::header(Syntax, "Bearertoken (no space)", format!("Bearer{good}")),
        Case::headers(
            Syntax,
            "two Authorization headers, both good",
            vec![bearer.clone().into_bytes(), bearer.clone().into_bytes()],
        ),
        Case::headers(
            Syntax,
            "two Authorization headers, garbage then good",
            vec![b"Bearer a.b.c".to_vec(), bearer.clone().into_bytes()],
        ),
        Case::headers(
            Syntax,
            "two Authorization headers, good then Basic",
            vec![bearer.clone().into_bytes(), b"Basic dXNlcjpwYXNz".to_vec()],
        ),
        Case::headers(
            Syntax,
            "two Authorization headers, good then empty",
            vec![bearer.clone().into_bytes(), Vec::new()],
        ),
        Case::header(
            Syntax,
            "two credentials in one header",
            format!("{bearer}, {bearer}"),
        ),
        Case::header(
            Syntax,
            "Bearer a.b.c, Bearer <good>",
            format!("Bearer a.b.c, {bearer}"),
        ),
        Case::header(Syntax, "token followed by a comma", format!("{bearer},")),
        Case::header(
            Syntax,
            "token followed by a semicolon",
            format!("{bearer};"),
        ),
        Case::header(
            Syntax,
            "two tokens after one scheme",
            format!("{bearer} {good}"),
        ),
        Case::header(Syntax, "quoted token", format!("Bearer \"{good}\"")),
        Case::header(
            Syntax,
            "token as an auth-param",
            format!("Bearer token={good}"),
        ),
        Case::header(Syntax, "a non-ASCII byte after the token", non_ascii),
        Case::header(Syntax, "a non-ASCII byte in the scheme", latin1_scheme),
        Case::header(
            Syntax,
            "percent-encoded space after the scheme",
            format!("Bearer%20{good}"),
        ),
        Case::raw(
            Syntax,
            "authorization and AUTHORIZATION, both good (one header, two fields)",
            "/obo/x",
            vec![
                format!("authorization: {bearer}").into_bytes(),
                format!("AUTHORIZATION: {bearer}").into_bytes(),
            ],
            good,
        ),
        Case::raw(
            Syntax,
            "a good token only in Proxy-Authorization",
            "/obo/x",
            vec![format!("Proxy-Authorization: {bearer}").into_bytes()],
            good,
        )
        .expect(Expect::NoToken),
        Case::raw(
            Syntax,
            "a good token only in the access_token query parameter",
            &format!("/obo/x?access_token={good}"),
            vec![],
            good,
        )
        .expect(Expect::NoToken),
        Case::raw(
            Syntax,
            "a good token in X-Authorization",
            "/obo/x",
            vec![format!("X-Authorization: {bearer}").into_bytes()],
            good,
        )
        .expect(Expect::NoToken),
        // RFC 9112 §5.2: obs-fold in a request is refused (or replaced by SP); hyper refuses: 400.
        Case::raw(
            Syntax,
            "obs-fold between scheme and token (400: malformed request)",
            "/obo/x",
            vec![
                b"Authorization: Bearer".to_vec(),
                format!(" {good}").into_bytes(),
            ],
            good,
        )
        .expect(Expect::Limit(400)),
        // RFC 9112 §5.1: whitespace between field name and colon must be refused with 400.
        Case::raw(
            Syntax,
            "space before the colon (400: malformed request)",
            "/obo/x",
            vec![format!("Authorization : {bearer}").into_bytes()],
            good,
        )
        .expect(Expect::Limit(400)),
    ]
}

/// The `[inbound]` for the dev IdP with an allow-list wide enough that `alg` lies get past it and must be
/// caught by the key's own `kty`/`alg`, plus an identity and one `obo` route.
fn wide_algorithms_config(idp: &DevIdp, upstream: &str) -> String {
    format!(
        r#"
[listen]
proxy = "127.0.0.1:0"
admin = "127.0.0.1:0"

[inbound]
issuers = ["{issuer}"]
audiences = ["api://{DEFAULT_CLIENT_ID}"]
algorithms = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384"]
clock_skew = "5s"
{rest}"#,
        issuer = idp.issuer(),
        rest = identity_and_route(&idp.token_endpoint(), upstream),
    )
}

fn identity_and_route(token_endpoint: &str, upstream: &str) -> String {
    format!(
        r#"
[identity]
flavor = "entra"
token_endpoint = "{token_endpoint}"
client_id = "{DEFAULT_CLIENT_ID}"
client_secret = {{ env = "{secret}" }}
timeout = "2s"

[[routes]]
name = "obo"
path_prefix = "/obo/"
upstream = "{upstream}/base/"
token = "obo"
scopes = ["api://downstream/.default"]
required_scopes = ["access_as_user"]
"#,
        secret = support::SECRET_VARIABLE,
    )
}

async fn kid_of_idp(h: &Harness) -> String {
    PublicForms::fetch(h).await.kid
}

fn fail_with(failures: &[String], cases: &[Case]) -> String {
    format!(
        "{} of {}:\n{}",
        failures.len(),
        summary(cases),
        failures.join("\n")
    )
}

// ---------------------------------------------------------------------------------------------------------
// The tests.

/// Every hostile case is 401 (or 400/431), quotes nothing, and reaches no upstream, IdP or token-named URL.
#[tokio::test]
async fn hostile_tokens_are_401_and_reach_nobody() {
    let h = Harness::start().await;
    let trap = Trap::start().await;
    let public = PublicForms::fetch(&h).await;
    let kit = Kit::new(&h, &public.kid);
    let attacker = Attacker::new();
    let stranger = DevIdp::start(support::bind().await, DevIdpConfig::default())
        .await
        .expect("second IdP");

    let mut cases = alg_cases(&h, &kit, &public);
    cases.extend(claims_cases(&h, &kit));
    cases.extend(keys_cases(&h, &kit, &attacker, &stranger, &trap));
    cases.extend(structure_cases(&h, &kit));
    cases.extend(tenant_cases_base(&h, &kit, &trap));
    cases.extend(syntax_cases(&kit));
    eprintln!("hostile corpus: {}", summary(&cases));

    let failures = run(&h, &cases).await;
    assert!(failures.is_empty(), "{}", fail_with(&failures, &cases));
    assert_eq!(h.upstream.requests(), 0, "the upstream received a request");
    assert_eq!(
        h.idp.token_requests(),
        0,
        "the IdP received a token request"
    );
    assert_eq!(trap.hits(), 0, "a URL named in a token was fetched");
    assert_eq!(stranger.token_requests(), 0);
}

/// With RS, PS and ES all allowed, an `alg` lying about an RS256 signature is 401: the JWK pins the alg.
#[tokio::test]
async fn alg_lies_are_401_even_when_the_allow_list_is_wide() {
    let h = Harness::start_custom(wide_algorithms_config).await;
    let kid = kid_of_idp(&h).await;
    let kit = Kit::new(&h, &kid);
    let mut cases: Vec<Case> = [
        "ES256", "ES384", "PS256", "PS384", "PS512", "RS384", "RS512",
    ]
    .into_iter()
    .map(|alg| {
        Case::token(
            Category::Alg,
            format!("{alg} header over the IdP's RS256 signature"),
            h.idp
                .sign(&kit.header_with("alg", json!(alg)), &kit.claims()),
        )
    })
    .collect();
    cases.push(Case::token(
        Category::Alg,
        "ES256 header, no kid",
        h.idp
            .sign(&json!({"alg": "ES256", "typ": "JWT"}), &kit.claims()),
    ));
    let failures = run(&h, &cases).await;
    assert!(failures.is_empty(), "{}", fail_with(&failures, &cases));
    assert_eq!(h.upstream.requests(), 0);
    assert_eq!(h.idp.token_requests(), 0);
    // The same harness accepts the honest RS256 token: the refusals above are about the lie.
    assert_eq!(h.get("/obo/x", Some(&kit.good)).await.status(), 200);
}

/// A non-GUID `tid` (array, path or query tricks, `common`) is 401 before any token request to `{tenantid}`.
#[tokio::test]
async fn tenant_confusion_is_401_before_any_idp_call() {
    let h = Harness::start_custom(|idp, upstream| {
        format!(
            "{}{}",
            support::inbound_config(idp),
            identity_and_route(
                &format!("{}/token?tenant={{tenantid}}", idp.issuer()),
                upstream
            )
        )
    })
    .await;
    let kid = kid_of_idp(&h).await;
    let kit = Kit::new(&h, &kid);
    let guid = DEFAULT_TENANT_ID;
    let tids: Vec<(&str, Value)> = vec![
        ("tid as an array", json!([guid])),
        ("tid as a number", json!(72)),
        ("tid null", Value::Null),
        ("tid empty", json!("")),
        ("tid ../other", json!("../other")),
        ("tid with a /", json!(format!("{guid}/x"))),
        ("tid GUID/../evil", json!(format!("{guid}/../evil"))),
        ("tid with a query", json!(format!("{guid}?x=y"))),
        ("tid with a fragment", json!(format!("{guid}#x"))),
        ("tid with %2F", json!(format!("{guid}%2Fx"))),
        ("tid with a NUL", json!(format!("{guid}\u{0}"))),
        ("tid common (Entra multi-tenant alias)", json!("common")),
        ("tid organizations", json!("organizations")),
        (
            "tid GUID-shaped but not hex",
            json!("zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz"),
        ),
        ("tid GUID with braces", json!(format!("{{{guid}}}"))),
    ];
    let mut cases: Vec<Case> = tids
        .into_iter()
        .map(|(name, tid)| {
            Case::token(
                Category::Tenant,
                name,
                h.idp.sign(&kit.header(), &kit.claims_with("tid", tid)),
            )
        })
        .collect();
    cases.push(Case::token(
        Category::Tenant,
        "tid missing",
        h.idp.sign(&kit.header(), &kit.claims_without("tid")),
    ));
    let failures = run(&h, &cases).await;
    assert!(failures.is_empty(), "{}", fail_with(&failures, &cases));
    assert_eq!(h.upstream.requests(), 0);
    assert_eq!(h.idp.token_requests(), 0);
    // The control: the same claims with a GUID `tid` are exchanged at the tenant's endpoint.
    assert_eq!(h.get("/obo/x", Some(&kit.good)).await.status(), 200);
    assert_eq!(h.idp.token_requests(), 1);
}

/// Any-case scheme, 1*SP after it and OWS around the field value (RFC 9110 §5.5, §11.1) are 200.
#[tokio::test]
async fn good_tokens_in_accepted_spellings_are_200() {
    let h = Harness::start().await;
    let kid = kid_of_idp(&h).await;
    let kit = Kit::new(&h, &kid);
    let good = &kit.good;
    assert_eq!(
        h.get("/obo/x", Some(good)).await.status(),
        200,
        "the corpus's base token is accepted"
    );
    let spellings: Vec<(&str, String)> = vec![
        ("bearer", format!("bearer {good}")),
        ("BEARER", format!("BEARER {good}")),
        ("bEaReR", format!("bEaReR {good}")),
        ("trailing space", format!("Bearer {good} ")),
        ("trailing tab", format!("Bearer {good}\t")),
        ("leading space", format!(" Bearer {good}")),
        ("leading tab", format!("\tBearer {good}")),
        ("two spaces after the scheme", format!("Bearer  {good}")),
    ];
    let mut wrong = Vec::new();
    for (name, value) in &spellings {
        let outcome = send_raw(
            h.sidecar.proxy_addr,
            "/obo/x",
            &[[b"Authorization: ".as_slice(), value.as_bytes()].concat()],
        )
        .await;
        if outcome.status != 200 {
            wrong.push(format!(
                "{name}: {} {:?}",
                outcome.status, outcome.challenge
            ));
        }
    }
    assert!(wrong.is_empty(), "refused: {wrong:#?}");
    assert!(h.upstream.requests() >= 1);
}
