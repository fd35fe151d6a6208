//! `--soak DURATION`: steady load at about half of the sidecar's measured capacity, for DURATION, while caller
//! tokens expire and are replaced and upstream tokens are refreshed ahead of expiry. Reports errors (the target
//! is none) and the sidecar's resident memory over time (the target is a drift under 5 %).

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use obo_sidecar::dev::DevIdp;

use crate::load::{self, Tally, Target};
use crate::servers::Sidecar;
use crate::{Error, Settings};

/// Callers in the soak's pool: each has a token at any time, replaced before it expires.
const CALLERS: usize = 1_000;

/// The caller-token lifetime for a soak of `duration`: several rotations per soak, never under 90 s.
pub(crate) fn caller_token_lifetime(duration: Duration) -> Duration {
    (duration / 5).clamp(Duration::from_secs(90), Duration::from_secs(360))
}

/// The lifetime of the upstream tokens the IdP issues during a soak: short, so that refresh-ahead runs.
pub(crate) const UPSTREAM_TOKEN_LIFETIME: Duration = Duration::from_secs(120);

fn mint(idp: &DevIdp, caller: usize, generation: u64, lifetime: Duration) -> String {
    crate::caller_token(idp, format!("soak-{caller}-{generation}"), lifetime)
}

#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "rates, counts and sizes for display"
)]
pub(crate) async fn run(
    settings: &Settings,
    duration: Duration,
    idp: Arc<DevIdp>,
    sidecar: &Sidecar,
) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    let lifetime = caller_token_lifetime(duration);
    // Each token is replaced at least a minute before it expires: the pool turns over one caller at a time, the
    // whole pool once every `rotate_after`.
    let rotate_after = lifetime.saturating_sub(Duration::from_secs(60));
    let pool: Vec<String> = (0..CALLERS).map(|c| mint(&idp, c, 0, lifetime)).collect();
    let pool = Arc::new(ArcSwap::from_pointee(pool));

    // Capacity: a closed loop over the pool (every caller's first request is its exchange; warm first).
    let target = Target::new(sidecar.proxy, "/obo/x", &pool.load_full());
    load::each_once(&target, settings.connections).await?;
    let (capacity, _) =
        load::closed_loop(&target, settings.connections, Duration::from_secs(5)).await?;
    let rate = capacity / 2.0;
    writeln!(
        out,
        "soak: capacity {capacity:.0} rps, steady load {rate:.0} rps for {}; {CALLERS} callers, caller tokens live {} s (replaced after {} s), upstream tokens {} s",
        humantime::format_duration(duration),
        lifetime.as_secs(),
        rotate_after.as_secs(),
        UPSTREAM_TOKEN_LIFETIME.as_secs(),
    )?;

    let started = Instant::now();
    let rotator = {
        let pool = Arc::clone(&pool);
        let idp = Arc::clone(&idp);
        tokio::spawn(async move {
            let step = rotate_after / CALLERS as u32;
            let mut ticks = tokio::time::interval(step);
            let mut generation = vec![0u64; CALLERS];
            let mut next = 0;
            loop {
                ticks.tick().await;
                generation[next] += 1;
                let token = mint(&idp, next, generation[next], lifetime);
                let mut tokens = Vec::clone(&pool.load());
                tokens[next] = token;
                pool.store(Arc::new(tokens));
                next = (next + 1) % CALLERS;
            }
        })
    };

    let tally = Arc::new(Tally::default());
    let load = tokio::spawn(load::paced(
        sidecar.proxy,
        "/obo/x",
        Arc::clone(&pool),
        rate,
        settings.connections,
        duration,
        Arc::clone(&tally),
    ));

    // Samples: ten over the soak, the first after one caller-token lifetime when the run is long enough for the
    // caches to reach their steady size (old and new tokens of every caller).
    let interval = (duration / 10).max(Duration::from_secs(5));
    let steady_from = if duration >= lifetime * 2 {
        lifetime
    } else {
        Duration::ZERO
    };
    let idp_before = idp.token_requests();
    let mut samples: Vec<(Duration, u64)> = vec![(Duration::ZERO, sidecar.rss_kib())];
    writeln!(
        out,
        "| elapsed | requests ok | errors | IdP token requests | sidecar RSS |"
    )?;
    writeln!(out, "|---|---|---|---|---|")?;
    while started.elapsed() + Duration::from_millis(500) < duration {
        let wait = interval.min(duration.saturating_sub(started.elapsed()));
        tokio::time::sleep(wait).await;
        let rss = sidecar.rss_kib();
        samples.push((started.elapsed(), rss));
        writeln!(
            out,
            "| {} s | {} | {} | {} | {:.1} MB |",
            started.elapsed().as_secs(),
            tally.ok.load(Ordering::Relaxed),
            tally.errors(),
            idp.token_requests() - idp_before,
            rss as f64 * 1024.0 / 1e6
        )?;
        out.flush()?;
    }
    let mut latencies = load.await??;
    rotator.abort();
    let elapsed = started.elapsed();
    let end = sidecar.rss_kib();
    let start = samples
        .iter()
        .find(|(at, _)| *at >= steady_from)
        .map_or(end, |(_, rss)| *rss);
    let ok = tally.ok.load(Ordering::Relaxed);
    writeln!(out)?;
    writeln!(out, "| soak figure | measured |")?;
    writeln!(out, "|---|---|")?;
    writeln!(
        out,
        "| load | {:.0} rps achieved ({rate:.0} asked, half of {capacity:.0}) for {} s |",
        ok as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs()
    )?;
    writeln!(
        out,
        "| requests | {ok} ok; errors {} (refused {}, transport {}) |",
        tally.errors(),
        tally.refused.load(Ordering::Relaxed),
        tally.transport.load(Ordering::Relaxed)
    )?;
    writeln!(
        out,
        "| latency | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms |",
        load::percentile(&mut latencies, 0.5),
        load::percentile(&mut latencies, 0.99),
        load::percentile(&mut latencies, 1.0)
    )?;
    writeln!(
        out,
        "| IdP token requests | {} |",
        idp.token_requests() - idp_before
    )?;
    writeln!(
        out,
        "| sidecar RSS | {:.1} MB as the load started; {:.1} MB at {} s, {:.1} MB at the end, peak {:.1} MB: drift {:+.1} % from {} s |",
        samples[0].1 as f64 * 1024.0 / 1e6,
        start as f64 * 1024.0 / 1e6,
        steady_from.as_secs(),
        end as f64 * 1024.0 / 1e6,
        sidecar.peak_kib() as f64 * 1024.0 / 1e6,
        (end as f64 - start as f64) / start.max(1) as f64 * 100.0,
        steady_from.as_secs()
    )?;
    Ok(())
}
