//! The benchmark harness behind `bench/run.sh`. On loopback it starts a minimal hyper upstream and the
//! development IdP in this process, the release `obo-sidecar` binary as its own process (with
//! `TOKIO_WORKER_THREADS` pinned) and, in the full run, nginx as the reference proxy hop; it drives them with
//! `oha` (full run) and an in-repo load generator, and prints a table of figures, each against a baseline
//! measured in the same run. Every loop is bounded in time and count.
//!
//! ```text
//! bench [--quick | --soak DURATION] [--workers N]
//! ```
//! `--quick` is a smoke run of seconds that needs nothing beyond cargo (the fleet rows need `redis-server`,
//! and say so when it is missing); `--soak 30m` holds a steady load.

mod bare;
mod fleet;
mod load;
mod oha;
mod servers;
mod soak;
mod transfer;

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use obo_sidecar::dev::{DevIdp, DevIdpConfig, Failure, TokenClaims};
use tokio::net::TcpListener;

use crate::load::{Target, closed_loop, each_once, paced, percentile};
use crate::transfer::{mib_per_s, upload_download};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Quick,
    Full,
    Soak(Duration),
}

pub struct Settings {
    pub mode: Mode,
    /// Length of each throughput measurement.
    pub duration: Duration,
    /// Keep-alive connections of the load generators.
    pub connections: usize,
    /// Distinct callers cycling in the breadth scenario.
    pub callers: usize,
    /// Requests of the cold-path scenario, each from a new caller.
    pub cold_requests: usize,
    /// The fixed rate of the latency scenario.
    pub rate: u64,
    /// `TOKIO_WORKER_THREADS` of the sidecar, and nginx's `worker_processes`.
    pub workers: usize,
    /// Size of the upload and of the download through the sidecar.
    pub transfer_bytes: u64,
    /// Callers whose upstream tokens fill the cache in the memory scenario.
    pub cached_tokens: usize,
    /// Alternating rounds of the throughput comparisons (their medians are compared).
    pub rounds: usize,
}

const USAGE: &str = "usage: bench [--quick | --soak DURATION] [--workers N]";

impl Settings {
    fn from_args() -> Result<Settings, Error> {
        let mut mode = Mode::Full;
        let mut workers = 1;
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => mode = Mode::Quick,
                "--soak" => {
                    let value = args.next().ok_or(USAGE)?;
                    mode = Mode::Soak(
                        humantime::parse_duration(&value)
                            .map_err(|e| format!("--soak {value}: {e}"))?,
                    );
                }
                "--workers" => {
                    workers = args
                        .next()
                        .and_then(|n| n.parse().ok())
                        .filter(|&n| n > 0)
                        .ok_or("--workers needs a positive number")?;
                }
                _ => return Err(format!("unknown argument {arg:?}\n{USAGE}").into()),
            }
        }
        let quick = mode == Mode::Quick;
        Ok(Settings {
            mode,
            duration: Duration::from_secs(if quick { 2 } else { 10 }),
            connections: 32,
            callers: if quick { 1_000 } else { 10_000 },
            cold_requests: if quick { 200 } else { 2_000 },
            rate: 1_000,
            workers,
            transfer_bytes: if quick { 64 << 20 } else { 1 << 30 },
            cached_tokens: if quick { 2_000 } else { 100_000 },
            rounds: if quick { 1 } else { 3 },
        })
    }
}

/// A caller token for `sub` with the delegated scope the bench route requires, living `lifetime`.
pub fn caller_token(idp: &DevIdp, sub: String, lifetime: Duration) -> String {
    idp.mint(&TokenClaims {
        scp: Some("access_as_user".into()),
        lifetime,
        ..TokenClaims::user(sub)
    })
}

/// Caller tokens `{prefix}-0` … `{prefix}-{n-1}`, signed on every core.
async fn mint(idp: &Arc<DevIdp>, n: usize, prefix: &str) -> Result<Vec<String>, Error> {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let chunk = n.div_ceil(threads).max(1);
    let mut tasks = Vec::new();
    for start in (0..n).step_by(chunk) {
        let idp = Arc::clone(idp);
        let prefix = prefix.to_owned();
        tasks.push(tokio::task::spawn_blocking(move || {
            (start..(start + chunk).min(n))
                .map(|i| {
                    caller_token(
                        &idp,
                        format!("{prefix}-{i}"),
                        TokenClaims::default().lifetime,
                    )
                })
                .collect::<Vec<_>>()
        }));
    }
    let mut tokens = Vec::with_capacity(n);
    for task in tasks {
        tokens.extend(task.await?);
    }
    Ok(tokens)
}

struct Report {
    rows: Vec<[String; 3]>,
}

impl Report {
    fn row(
        &mut self,
        scenario: impl Into<String>,
        measured: impl Into<String>,
        figure: impl Into<String>,
    ) {
        let row = [scenario.into(), measured.into(), figure.into()];
        eprintln!("  {} | {} | {}", row[0], row[1], row[2]);
        self.rows.push(row);
    }
}

/// The median of some measurements.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn mb(kib: u64) -> String {
    #[allow(clippy::cast_precision_loss, reason = "sizes for display")]
    let mb = kib as f64 * 1024.0 / 1_000_000.0;
    format!("{mb:.1} MB")
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, port, upstream, workers] = args.as_slice()
        && flag == "--bare-hop"
    {
        return bare::serve(port.parse()?, upstream.parse()?, workers.parse()?);
    }
    tokio::runtime::Runtime::new()?.block_on(harness())
}

async fn harness() -> Result<(), Error> {
    let settings = Settings::from_args()?;
    obo_sidecar::install_crypto_provider();
    let binary = PathBuf::from(
        std::env::var("OBO_SIDECAR_BIN")
            .unwrap_or_else(|_| "target/release/obo-sidecar".to_owned()),
    );
    let dir = std::env::temp_dir().join(format!("obo-sidecar-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let outcome = run(&settings, &binary, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_wrap,
    reason = "counts and sizes for display"
)]
async fn run(settings: &Settings, binary: &PathBuf, dir: &std::path::Path) -> Result<(), Error> {
    let full = settings.mode == Mode::Full;
    let idp = Arc::new(
        DevIdp::start(
            TcpListener::bind("127.0.0.1:0").await?,
            DevIdpConfig {
                token_lifetime: match settings.mode {
                    Mode::Soak(_) => soak::UPSTREAM_TOKEN_LIFETIME,
                    _ => DevIdpConfig::default().token_lifetime,
                },
                ..DevIdpConfig::default()
            },
        )
        .await?,
    );
    let upstream = servers::start_upstream().await?;
    // OBO_BENCH_ONLY=fleet: only the fleet rows (they start their own sidecars).
    if std::env::var("OBO_BENCH_ONLY").is_ok_and(|only| only == "fleet") {
        let mut report = Report { rows: Vec::new() };
        fleet::run(settings, binary, &idp, upstream, dir, &mut report).await?;
        return print(settings, report);
    }
    let sidecar = servers::start_sidecar(binary, &idp, upstream, settings.workers, dir).await?;
    let idle_rss = sidecar.rss_kib();
    if let Mode::Soak(duration) = settings.mode {
        return soak::run(settings, duration, idp, &sidecar).await;
    }
    let c = settings.connections;
    let mut report = Report { rows: Vec::new() };
    let none = Arc::new(Vec::new());
    let one = Arc::new(mint(&idp, 1, "hit").await?);
    let direct_target = Target::new(upstream, "/x", &none);
    let hit_target = Target::new(sidecar.proxy, "/obo/x", &one);
    each_once(&hit_target, 1).await?;

    // Large bodies first, while the sidecar's memory is still near idle: streamed, so it stays flat.
    let len = settings.transfer_bytes;
    let before_transfer = sidecar.rss_kib();
    let (direct_up, direct_down) = upload_download(upstream, "", None, len).await?;
    let (up, down) = upload_download(sidecar.proxy, "/obo", Some(&one[0]), len).await?;
    let after_transfer = sidecar.rss_kib();
    let transfer_row = (
        format!(
            "{} MiB upload, then download, through the sidecar",
            len >> 20
        ),
        format!(
            "up {:.0} MiB/s, down {:.0} MiB/s (direct {:.0} / {:.0})",
            mib_per_s(len, up),
            mib_per_s(len, down),
            mib_per_s(len, direct_up),
            mib_per_s(len, direct_down)
        ),
        format!(
            "RSS {} before, {} after, peak {}",
            mb(before_transfer),
            mb(after_transfer),
            mb(sidecar.peak_kib())
        ),
    );

    // Throughput with oha: the upstream alone, then nginx's hop (the 1.00 reference) and the sidecar on a
    // cache hit in alternation, `rounds` times each; the medians are compared.
    let oha = if full { oha::Oha::find() } else { None };
    let nginx_binary = if full {
        servers::find_program(
            "OBO_BENCH_NGINX",
            "nginx",
            &[PathBuf::from("/usr/sbin/nginx")],
        )
    } else {
        None
    };
    if let Some(oha) = &oha {
        let d = settings.duration;
        let warm = Duration::from_secs(1);
        oha.run(upstream, "/x", None, c, warm, None)?;
        let direct = oha.run(upstream, "/x", None, c, d, None)?;
        let nginx = match &nginx_binary {
            Some(nginx) => {
                Some(servers::start_nginx(nginx, upstream, settings.workers, dir).await?)
            }
            None => None,
        };
        let (_bare_process, bare) = servers::start_bare_hop(upstream, settings.workers).await?;
        let (mut nginx_runs, mut bare_runs, mut hit_runs) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..settings.rounds {
            if let Some((_, addr)) = &nginx {
                if round == 0 {
                    oha.run(*addr, "/x", None, c, warm, None)?;
                }
                nginx_runs.push(oha.run(*addr, "/x", None, c, d, None)?);
            }
            if round == 0 {
                oha.run(bare, "/x", None, c, warm, None)?;
            }
            bare_runs.push(oha.run(bare, "/x", None, c, d, None)?);
            if round == 0 {
                oha.run(sidecar.proxy, "/obo/x", Some(&one[0]), c, warm, None)?;
            }
            hit_runs.push(oha.run(sidecar.proxy, "/obo/x", Some(&one[0]), c, d, None)?);
        }
        drop(nginx);
        let nginx = oha::median(nginx_runs);
        let bare = oha::median(bare_runs).ok_or("no oha run")?;
        let hit = oha::median(hit_runs).ok_or("no oha run")?;
        let (reference, reference_name) = match &nginx {
            Some(n) => (n.rps, "nginx"),
            None => (direct.rps, "direct"),
        };
        report.row(
            "oha: direct upstream (no proxy)",
            direct.line(),
            format!("{:.2} of {reference_name}", direct.rps / reference),
        );
        match &nginx {
            Some(n) => report.row(
                format!(
                    "oha: nginx proxy hop, {} worker(s), keep-alive upstream (median of {})",
                    settings.workers, settings.rounds
                ),
                n.line(),
                "1.00 (reference)",
            ),
            None => report.row("oha: nginx proxy hop", "not run: nginx not found", "-"),
        }
        report.row(
            format!(
                "oha: bare hyper proxy hop on the sidecar's stack, {} worker(s) (median of {})",
                settings.workers, settings.rounds
            ),
            bare.line(),
            format!("{:.2} of {reference_name}", bare.rps / reference),
        );
        report.row(
            format!(
                "oha: sidecar, cache hit, one caller (obo), {} worker(s) (median of {})",
                settings.workers, settings.rounds
            ),
            hit.line(),
            format!(
                "{:.2} of {reference_name}; {:.2} of the bare hop",
                hit.rps / reference,
                hit.rps / bare.rps
            ),
        );
    } else if full {
        report.row("oha scenarios", "not run: oha not found", "-");
    }

    // The in-repo load generator: one caller against many (the caches under breadth), in alternation.
    let (direct, _) = closed_loop(&direct_target, c, settings.duration).await?;
    report.row(
        "in-repo load: direct upstream (no proxy)",
        format!("{direct:.0} rps"),
        "1.00 (baseline)",
    );
    let many = Arc::new(mint(&idp, settings.callers, "breadth").await?);
    let breadth_target = Target::new(sidecar.proxy, "/obo/x", &many);
    let failed = each_once(&breadth_target, c).await?;
    let (mut hits, mut breadths) = (Vec::new(), Vec::new());
    let mut hit_lat = Vec::new();
    for round in 0..settings.rounds {
        // OBO_BENCH_PERF=DIR: a `perf record` of the sidecar during the first round of each, for the profile
        // behind the breadth ratio (the sidecar built with `--profile profiling` as OBO_SIDECAR_BIN).
        let perf = |name: &str| {
            let dir = std::env::var_os("OBO_BENCH_PERF").filter(|_| round == 0)?;
            std::process::Command::new("perf")
                .args([
                    "record",
                    "-F",
                    "2000",
                    "-p",
                    &sidecar.pid().to_string(),
                    "-o",
                ])
                .arg(PathBuf::from(dir).join(format!("perf-{name}.data")))
                .args(["--", "sleep", &settings.duration.as_secs().to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .ok()
        };
        let recording = perf("hit");
        let (hit, latencies) = closed_loop(&hit_target, c, settings.duration).await?;
        recording.map(|mut p| p.wait());
        hits.push(hit);
        hit_lat = latencies;
        let recording = perf("breadth");
        breadths.push(closed_loop(&breadth_target, c, settings.duration).await?.0);
        recording.map(|mut p| p.wait());
    }
    let (hit, breadth) = (median(&mut hits), median(&mut breadths));
    report.row(
        format!(
            "in-repo load: sidecar, cache hit, one caller (obo) (median of {})",
            settings.rounds
        ),
        format!(
            "{hit:.0} rps; last round p50 {:.2} ms, p99 {:.2} ms",
            percentile(&mut hit_lat, 0.5),
            percentile(&mut hit_lat, 0.99)
        ),
        format!("{:.2} of direct", hit / direct),
    );
    report.row(
        format!(
            "in-repo load: sidecar, {} callers cycling (median of {})",
            settings.callers, settings.rounds
        ),
        format!("{breadth:.0} rps ({failed} failed warm-ups)"),
        format!("{:.2} of one caller", breadth / hit),
    );
    report.row(transfer_row.0, transfer_row.1, transfer_row.2);

    // Cold path: every request a new caller, so every request is an exchange; against the IdP's own time.
    let cold = mint(&idp, settings.cold_requests, "cold").await?;
    let http = reqwest::Client::new();
    let mut cold_lat = Vec::new();
    for token in &cold {
        let started = Instant::now();
        let response = http
            .get(format!("http://{}/obo/x", sidecar.proxy))
            .bearer_auth(token)
            .send()
            .await?;
        if response.status() == 200 {
            cold_lat.push(load::micros(started.elapsed()));
        }
    }
    let idp_only = mint(&idp, settings.cold_requests, "idp").await?;
    let mut idp_lat = Vec::new();
    let mut upstream_token_bytes = 0;
    for token in &idp_only {
        let started = Instant::now();
        let form = [
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("requested_token_use", "on_behalf_of"),
            ("assertion", token.as_str()),
            ("scope", "api://downstream/.default"),
            ("client_id", "obo-sidecar"),
            ("client_secret", obo_sidecar::dev::DEFAULT_CLIENT_SECRET),
        ];
        let response = http.post(idp.token_endpoint()).form(&form).send().await?;
        if response.status() == 200 {
            idp_lat.push(load::micros(started.elapsed()));
            let answer: serde_json::Value = response.json().await?;
            upstream_token_bytes = answer["access_token"].as_str().map_or(0, str::len);
        }
    }
    // The upstream's own time for one request at a time, as the cold requests are sent.
    let mut direct_lat = Vec::new();
    for _ in 0..settings.cold_requests {
        let started = Instant::now();
        if http
            .get(format!("http://{upstream}/x"))
            .send()
            .await?
            .status()
            == 200
        {
            direct_lat.push(load::micros(started.elapsed()));
        }
    }
    let (cold_p50, idp_p50, direct_p50) = (
        percentile(&mut cold_lat, 0.5),
        percentile(&mut idp_lat, 0.5),
        percentile(&mut direct_lat, 0.5),
    );
    report.row(
        "sidecar, cold path (every request a new caller)",
        format!(
            "p50 {cold_p50:.2} ms ({} of {} ok); IdP alone p50 {idp_p50:.2} ms; upstream alone p50 {direct_p50:.2} ms",
            cold_lat.len(),
            cold.len()
        ),
        format!(
            "{:.2} ms added to the IdP's time",
            cold_p50 - idp_p50 - direct_p50
        ),
    );

    // Fixed-rate latency, direct and through the sidecar (oha -q in the full run).
    let rate_duration = settings.duration;
    let (d50, d99, s50, s99) = if let Some(oha) = &oha {
        let direct = oha.run(upstream, "/x", None, 16, rate_duration, Some(settings.rate))?;
        let sidecar = oha.run(
            sidecar.proxy,
            "/obo/x",
            Some(&one[0]),
            16,
            rate_duration,
            Some(settings.rate),
        )?;
        (direct.p50_ms, direct.p99_ms, sidecar.p50_ms, sidecar.p99_ms)
    } else {
        let tally = Arc::new(load::Tally::default());
        let fixed = |addr, path: &'static str, tokens: &Arc<Vec<String>>| {
            paced(
                addr,
                path,
                Arc::new(arc_swap::ArcSwap::new(Arc::clone(tokens))),
                settings.rate as f64,
                16,
                rate_duration,
                Arc::clone(&tally),
            )
        };
        let mut direct = fixed(upstream, "/x", &none).await?;
        let mut through = fixed(sidecar.proxy, "/obo/x", &one).await?;
        (
            percentile(&mut direct, 0.5),
            percentile(&mut direct, 0.99),
            percentile(&mut through, 0.5),
            percentile(&mut through, 0.99),
        )
    };
    report.row(
        format!(
            "{}fixed rate {} rps, latency added over direct",
            if oha.is_some() {
                "oha: "
            } else {
                "in-repo load: "
            },
            settings.rate
        ),
        format!("direct p50 {d50:.2} / p99 {d99:.2} ms; sidecar p50 {s50:.2} / p99 {s99:.2} ms"),
        format!("+{:.2} ms p50, +{:.2} ms p99", s50 - d50, s99 - d99),
    );

    // Single flight: 256 concurrent first requests of one caller against a slow IdP.
    let caller = mint(&idp, 1, "flight").await?.remove(0);
    idp.fail_next(Failure::Delay(Duration::from_millis(300)), 1);
    let before = idp.token_requests();
    let requests = (0..256).map(|_| {
        http.get(format!("http://{}/obo/x", sidecar.proxy))
            .bearer_auth(&caller)
            .send()
    });
    let answers = futures_util::future::join_all(requests).await;
    let ok = answers
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.status() == 200))
        .count();
    report.row(
        "single flight: 256 concurrent cold requests of one caller",
        format!("{ok}/256 ok"),
        format!("{} IdP call(s)", idp.token_requests() - before),
    );

    // Memory: the upstream-token cache filled with `cached_tokens` more callers.
    let cached = Arc::new(mint(&idp, settings.cached_tokens, "fill").await?);
    let before_fill = sidecar.rss_kib();
    let failed = each_once(&Target::new(sidecar.proxy, "/obo/x", &cached), c).await?;
    let after_fill = sidecar.rss_kib();
    let per_token = (after_fill.saturating_sub(before_fill) * 1024) as f64 / cached.len() as f64;
    report.row(
        format!("memory: {} more callers cached", cached.len()),
        format!(
            "RSS {} before, {} after ({failed} failed)",
            mb(before_fill),
            mb(after_fill)
        ),
        format!(
            "{per_token:.0} B per cached caller, {:.0} B beyond its {upstream_token_bytes} B upstream token",
            per_token - upstream_token_bytes as f64
        ),
    );

    // The fleet: replicas sharing a token cache on Redis, against replicas that do not.
    fleet::run(settings, binary, &idp, upstream, dir, &mut report).await?;

    let binary_size = std::fs::metadata(binary).map_or(0, |m| m.len());
    report.row(
        "idle, size, start",
        format!(
            "idle RSS {}; after the breadth scenario ({} callers) {}",
            mb(idle_rss),
            settings.callers,
            mb(before_fill)
        ),
        format!(
            "binary {:.1} MB ({}); start to ready {} ms",
            binary_size as f64 / 1_000_000.0,
            binary.display(),
            sidecar.started_to_ready.as_millis()
        ),
    );

    print(settings, report)
}

/// The table, as BENCHMARKS.md shows it.
fn print(settings: &Settings, report: Report) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    if settings.mode == Mode::Quick {
        writeln!(
            out,
            "Smoke run (--quick): short, small, and usually of the debug build; it checks the harness, not the figures."
        )?;
    }
    writeln!(out, "| scenario | measured | ratio / figure |")?;
    writeln!(out, "|---|---|---|")?;
    for [scenario, measured, figure] in report.rows {
        writeln!(out, "| {scenario} | {measured} | {figure} |")?;
    }
    Ok(())
}
