//! Memory of the upstream-token cache: RSS with 100 000 cached tokens, and the bound under 200 000 callers.
//! `cargo run --release --example cache_memory`. A measurement, not a test: the figures go in BENCHMARKS.md
//! and closing notes.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use obo_sidecar::exchange::UpstreamToken;
use obo_sidecar::exchange::cache::{CacheKey, Fetch, KeyParts, TokenCache};

/// A typical Entra access token is 1.2–2 KB.
const TOKEN_BYTES: usize = 1500;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn key(i: u32) -> CacheKey {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("subject-token-{i}").as_bytes(),
    );
    let mut subject = [0u8; 32];
    subject.copy_from_slice(digest.as_ref());
    let scopes = vec!["https://graph.microsoft.com/.default".to_owned()];
    CacheKey::new(&KeyParts {
        subject: Some(&subject),
        identity: "default",
        client_id: "11111111-1111-1111-1111-111111111111",
        token_endpoint: "https://login.microsoftonline.com/t/oauth2/v2.0/token",
        flavor: "entra",
        auth_method: "client_secret_post",
        scopes: &scopes,
        audience: &[],
        resource: &[],
        requested_token_type: None,
        claims: None,
    })
}

fn fetch(i: u32) -> Fetch {
    Arc::new(move || {
        Box::pin(async move {
            let mut token = format!("Bearer {i:010}.");
            token.extend(std::iter::repeat_n('x', TOKEN_BYTES - token.len()));
            let now = tokio::time::Instant::now();
            Ok(UpstreamToken {
                header: HeaderValue::from_str(&token).map_err(|_| {
                    obo_sidecar::exchange::ExchangeError::Unavailable {
                        reason: "header".into(),
                        retry_after: None,
                    }
                })?,
                expires_on: 0,
                stale_at: now + Duration::from_secs(3000),
                expires_at: now + Duration::from_secs(3500),
            })
        })
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut out = std::io::stdout().lock();
    let cache = TokenCache::new(100_000);
    let before = rss_kib();
    for i in 0..100_000 {
        let _ = cache.get_or_fetch(key(i), &fetch(i)).await;
    }
    let entries = cache.entry_count().await;
    let filled = rss_kib();
    let per_entry = (filled.saturating_sub(before) * 1024) / entries.max(1);
    let _ = writeln!(
        out,
        "100000 callers: {entries} entries, RSS {before} KiB -> {filled} KiB, {per_entry} B per entry \
         ({TOKEN_BYTES} B of token, {} B overhead)",
        per_entry.saturating_sub(TOKEN_BYTES as u64)
    );
    for i in 100_000..200_000 {
        let _ = cache.get_or_fetch(key(i), &fetch(i)).await;
    }
    let bounded = cache.entry_count().await;
    let _ = writeln!(
        out,
        "200000 callers: {bounded} entries (max_entries 100000), RSS {} KiB",
        rss_kib()
    );
}
