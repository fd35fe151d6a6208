//! The fleet simulation (SPEC §14): N replicas of the sidecar on loopback, each caller calling every replica,
//! with and without `[cache.shared]` on a real `redis-server`: the IdP calls the fleet makes, the latency the
//! shared cache adds to a cold request, and the cache-hit throughput with it on against off (which must not
//! move: an in-process hit never touches Redis).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use obo_sidecar::dev::DevIdp;

use crate::load::{Target, closed_loop, each_once, percentile};
use crate::servers::{Sidecar, find_program, free_port, start_sidecar_with};
use crate::{Error, Mode, Report, Settings, median, mint};

/// A `redis-server` without persistence, stopped on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_redis(program: &Path) -> Result<Redis, Error> {
    let port = free_port()?;
    let child = Command::new(program)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--logfile", ""])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let redis = Redis { child, port };
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(mut connection) = client.get_multiplexed_async_connection().await
            && redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
                .is_ok()
        {
            return Ok(redis);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err("redis-server did not answer in 10 s".into())
}

/// `[cache.shared]` for a Redis on `port`, its key in `dir`.
fn shared_config(port: u16, dir: &Path) -> Result<String, Error> {
    let key = dir.join("cache-key");
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| "no randomness")?;
    std::fs::write(
        &key,
        base64::engine::general_purpose::STANDARD.encode(bytes),
    )?;
    Ok(format!(
        "[cache.shared]\nurl = \"redis://127.0.0.1:{port}/\"\nencryption_key = {{ file = \"{}\" }}\n",
        key.display()
    ))
}

pub(crate) async fn run(
    settings: &Settings,
    binary: &Path,
    idp: &Arc<DevIdp>,
    upstream: SocketAddr,
    dir: &Path,
    report: &mut Report,
) -> Result<(), Error> {
    let Some(program) = find_program(
        "OBO_BENCH_REDIS",
        "redis-server",
        &[PathBuf::from("/usr/bin/redis-server")],
    ) else {
        report.row("fleet scenarios", "not run: redis-server not found", "-");
        return Ok(());
    };
    let redis = start_redis(&program).await?;
    let shared = shared_config(redis.port, dir)?;
    let full = settings.mode == Mode::Full;
    let callers = if full { 300 } else { 30 };
    let sizes: &[usize] = if full { &[1, 3, 10] } else { &[1, 3] };

    // IdP calls: each caller calls every replica (one after the other); callers run 32 at a time.
    for &replicas in sizes {
        let mut calls = [0u64; 2];
        for (with_shared, count) in calls.iter_mut().enumerate() {
            let extra = if with_shared == 1 {
                shared.as_str()
            } else {
                ""
            };
            let fleet = start_fleet(binary, idp, upstream, dir, replicas, extra).await?;
            let tokens = mint(idp, callers, &format!("fleet-{replicas}-{with_shared}")).await?;
            let before = idp.token_requests();
            let failed = every_caller_on_every_replica(&fleet, &tokens).await?;
            if failed > 0 {
                return Err(format!("{failed} requests failed in the fleet scenario").into());
            }
            *count = idp.token_requests() - before;
        }
        report.row(
            format!(
                "fleet: {replicas} replica(s) × {callers} callers, each caller on every replica"
            ),
            format!(
                "IdP calls: {} without [cache.shared], {} with it",
                calls[0], calls[1]
            ),
            format!(
                "{:.2} exchanges per caller with it (1.00 is the goal; {replicas}.00 without)",
                ratio(calls[1], callers as u64)
            ),
        );
    }

    // One replica with the shared cache and one without, side by side.
    let off = start_sidecar_with(
        binary,
        idp,
        upstream,
        settings.workers,
        dir,
        "fleet-off",
        "",
        &[],
    )
    .await?;
    let on = start_sidecar_with(
        binary,
        idp,
        upstream,
        settings.workers,
        dir,
        "fleet-on",
        &shared,
        &[],
    )
    .await?;

    // Cold path: every request a new caller, alternating between the two.
    let cold = mint(idp, settings.cold_requests * 2, "fleet-cold").await?;
    let http = reqwest::Client::new();
    let (mut off_lat, mut on_lat) = (Vec::new(), Vec::new());
    for (i, token) in cold.iter().enumerate() {
        let (sidecar, latencies) = if i % 2 == 0 {
            (&off, &mut off_lat)
        } else {
            (&on, &mut on_lat)
        };
        let started = Instant::now();
        let response = http
            .get(format!("http://{}/obo/x", sidecar.proxy))
            .bearer_auth(token)
            .send()
            .await?;
        if response.status() == 200 {
            latencies.push(crate::load::micros(started.elapsed()));
        }
    }
    let (p50_off, p50_on) = (percentile(&mut off_lat, 0.5), percentile(&mut on_lat, 0.5));
    report.row(
        "fleet: cold path, one replica, every request a new caller",
        format!(
            "p50 {p50_off:.2} ms without [cache.shared], {p50_on:.2} ms with it ({} + {} ok)",
            off_lat.len(),
            on_lat.len()
        ),
        format!("{:+.2} ms p50 added by the shared cache", p50_on - p50_off),
    );

    // Cache hits: one caller, with and without, alternating (and in alternating order); an in-process hit
    // never touches Redis. With oha in the full run, as the main figures; else the in-repo generator.
    let one = Arc::new(mint(idp, 1, "fleet-hit").await?);
    let (off_target, on_target) = (
        Target::new(off.proxy, "/obo/x", &one),
        Target::new(on.proxy, "/obo/x", &one),
    );
    each_once(&off_target, 1).await?;
    each_once(&on_target, 1).await?;
    let oha = if full { crate::oha::Oha::find() } else { None };
    let c = settings.connections;
    let (mut off_rps, mut on_rps) = (Vec::new(), Vec::new());
    for round in 0..settings.rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for with_shared in order {
            let (target, proxy, runs) = if with_shared {
                (&on_target, on.proxy, &mut on_rps)
            } else {
                (&off_target, off.proxy, &mut off_rps)
            };
            let rps = match &oha {
                Some(oha) => {
                    oha.run(proxy, "/obo/x", Some(&one[0]), c, settings.duration, None)?
                        .rps
                }
                None => closed_loop(target, c, settings.duration).await?.0,
            };
            runs.push(rps);
        }
    }
    let (off_rps, on_rps) = (median(&mut off_rps), median(&mut on_rps));
    report.row(
        format!(
            "fleet: cache hit, one caller, {} (median of {}, alternating)",
            if oha.is_some() { "oha" } else { "in-repo load" },
            settings.rounds
        ),
        format!("{off_rps:.0} rps without [cache.shared], {on_rps:.0} rps with it"),
        format!("{:.2} with / without", on_rps / off_rps),
    );
    drop(redis);
    Ok(())
}

async fn start_fleet(
    binary: &Path,
    idp: &DevIdp,
    upstream: SocketAddr,
    dir: &Path,
    replicas: usize,
    extra: &str,
) -> Result<Vec<Sidecar>, Error> {
    let mut fleet = Vec::new();
    for i in 0..replicas {
        // One worker each: ten replicas share two cores.
        let name = format!("fleet-{replicas}-{i}-{}", extra.len());
        fleet.push(start_sidecar_with(binary, idp, upstream, 1, dir, &name, extra, &[]).await?);
    }
    Ok(fleet)
}

/// Each caller's requests to replica 0, 1, … in turn; 32 callers at a time. Returns the failed requests.
async fn every_caller_on_every_replica(
    fleet: &[Sidecar],
    tokens: &[String],
) -> Result<usize, Error> {
    let http = reqwest::Client::new();
    let proxies: Vec<SocketAddr> = fleet.iter().map(|s| s.proxy).collect();
    let mut failed = 0;
    for chunk in tokens.chunks(32) {
        let callers = chunk.iter().map(|token| {
            let http = http.clone();
            let proxies = proxies.clone();
            async move {
                let mut failed = 0;
                for proxy in proxies {
                    let ok = http
                        .get(format!("http://{proxy}/obo/x"))
                        .bearer_auth(token)
                        .send()
                        .await
                        .is_ok_and(|r| r.status() == 200);
                    failed += usize::from(!ok);
                }
                failed
            }
        });
        failed += futures_util::future::join_all(callers)
            .await
            .into_iter()
            .sum::<usize>();
    }
    Ok(failed)
}

#[allow(clippy::cast_precision_loss, reason = "counts for display")]
fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b as f64
}
