//! Cost of caller validation: a full RS256 verification (first sight of a token) against a validated-token
//! cache hit (the same token again). `cargo run --release --example validation_cost`. A measurement, not a
//! test: the figures go in BENCHMARKS.md and closing notes.

use std::io::Write as _;
use std::time::Instant;

use http::{HeaderMap, HeaderValue, header};
use obo_sidecar::auth::Authenticator;
use obo_sidecar::config::Config;
use obo_sidecar::dev_idp::{CallerClaims, DevIdp, DevIdpConfig};

const TOKENS: u32 = 5_000;
const ROUNDS: u32 = 20;

fn headers(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}")) {
        h.insert(header::AUTHORIZATION, value);
    }
    h
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    obo_sidecar::tls::install_crypto_provider();
    let idp = DevIdp::start(
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        DevIdpConfig::default(),
    )
    .await?;
    let text = format!(
        "[inbound]\nissuers = [\"{}\"]\naudiences = [\"api://obo-sidecar\"]\n[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"http://127.0.0.1:1/\"\ntoken = \"none\"\n",
        idp.issuer()
    );
    let config = Config::parse(&text, &|_| None)?;
    let http = obo_sidecar::tls::idp_client(&[], std::time::Duration::from_secs(5))?;
    let metrics = std::sync::Arc::new(obo_sidecar::telemetry::Metrics::new());
    let authenticator = Authenticator::new(&config.inbound, 100_000, &http, metrics)?;
    let _tasks = authenticator.start();
    authenticator.ready().await;

    let tokens: Vec<HeaderMap> = (0..TOKENS)
        .map(|i| {
            headers(&idp.mint(&CallerClaims {
                scp: Some("access_as_user".into()),
                ..CallerClaims::user(format!("user-{i}"))
            }))
        })
        .collect();
    let started = Instant::now();
    for h in &tokens {
        authenticator.authenticate(h).await?;
    }
    let full = started.elapsed().as_nanos() / u128::from(TOKENS);
    let started = Instant::now();
    for _ in 0..ROUNDS {
        for h in &tokens {
            authenticator.authenticate(h).await?;
        }
    }
    let hit = started.elapsed().as_nanos() / u128::from(TOKENS * ROUNDS);
    writeln!(
        std::io::stdout().lock(),
        "full RS256 validation: {full} ns/token; validated-cache hit: {hit} ns/token ({}x cheaper)",
        full / hit.max(1)
    )?;
    Ok(())
}
