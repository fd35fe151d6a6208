//! The benchmark harness behind `bench/run.sh`. On loopback it starts a minimal hyper upstream and the
//! development IdP in this process, the release `obo-sidecar` binary as its own process (with
//! `TOKIO_WORKER_THREADS` pinned) and, in the full run, nginx as the reference proxy hop; it drives them with
//! `oha` (full run) and an in-repo load generator, prints a table of figures, each against a baseline
//! measured in the same run, and draws two charts (`throughput.svg`, `latency.svg`; [`charts`]). Every loop
//! is bounded in time and count.
//!
//! ```text
//! bench [--quick | --soak DURATION] [--workers N]
//! ```
//! The full run measures the oha throughput comparison (nginx's hop as the 1.00 reference, the bare hyper
//! hop, the sidecar on a cache hit) at 1 and then 2 workers, each worker count with its own sidecar
//! (`TOKIO_WORKER_THREADS`), nginx (`worker_processes`) and bare hop; every other scenario runs once, at 1
//! worker. `--workers N` restricts the run to that one worker count. The latency at a fixed rate is measured
//! direct, through nginx and through the sidecar, at p50, p90, p99 and p99.9. The charts go to
//! `bench/charts/`.
//!
//! `--quick` is a smoke run of seconds that needs nothing beyond cargo (the fleet rows need `redis-server`,
//! and say so when it is missing): one worker count, no oha, no nginx, and its charts (of the in-repo load
//! generator's figures) go to `target/bench-charts/`, so that it never overwrites the committed ones.
//! `--soak 30m` holds a steady load (no charts).

mod bare;
mod charts;
mod fleet;
mod load;
mod oha;
mod servers;
mod soak;
mod traces;
mod transfer;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use obo_sidecar::dev::{DevIdp, DevIdpConfig, Failure, TokenClaims};
use tokio::net::TcpListener;

use crate::charts::{LatencyLine, PERCENTILES, ThroughputGroup, workers_label};
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
    /// `TOKIO_WORKER_THREADS` of the sidecar, nginx's `worker_processes` and the bare hop's workers in every
    /// scenario but the oha throughput comparison: the first of `worker_counts`.
    pub workers: usize,
    /// The worker counts of the oha throughput comparison, each with its own sidecar, nginx and bare hop:
    /// 1 and 2 in the full run, the one of `--workers N` when given, 1 otherwise.
    pub worker_counts: Vec<usize>,
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
        let mut workers = None;
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
                    workers = Some(
                        args.next()
                            .and_then(|n| n.parse().ok())
                            .filter(|&n| n > 0)
                            .ok_or("--workers needs a positive number")?,
                    );
                }
                _ => return Err(format!("unknown argument {arg:?}\n{USAGE}").into()),
            }
        }
        let quick = mode == Mode::Quick;
        let worker_counts = match (workers, mode) {
            (Some(n), _) => vec![n],
            (None, Mode::Full) => vec![1, 2],
            (None, _) => vec![1],
        };
        Ok(Settings {
            mode,
            duration: Duration::from_secs(if quick { 2 } else { 10 }),
            connections: 32,
            callers: if quick { 1_000 } else { 10_000 },
            cold_requests: if quick { 200 } else { 2_000 },
            rate: 1_000,
            workers: worker_counts.first().copied().unwrap_or(1),
            worker_counts,
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
        let at = self.rows.len();
        self.row_at(at, scenario, measured, figure);
    }

    /// A row at `index` of the table (a figure that needs later measurements, placed before their rows).
    fn row_at(
        &mut self,
        index: usize,
        scenario: impl Into<String>,
        measured: impl Into<String>,
        figure: impl Into<String>,
    ) {
        let row = [scenario.into(), measured.into(), figure.into()];
        eprintln!("  {} | {} | {}", row[0], row[1], row[2]);
        self.rows.insert(index.min(self.rows.len()), row);
    }
}

/// `p50 … / p90 … / p99 … / p99.9 … ms` of latencies in ms at [`PERCENTILES`].
fn percentiles_line(ms: &[f64; 4]) -> String {
    let parts: Vec<String> = PERCENTILES
        .iter()
        .zip(ms)
        .map(|((name, _), v)| format!("{name} {v:.2}"))
        .collect();
    format!("{} ms", parts.join(" / "))
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
    // OBO_BENCH_ONLY=traces: only the rows of the cost of traces.
    if std::env::var("OBO_BENCH_ONLY").is_ok_and(|only| only == "traces") {
        let oha = oha::Oha::find().ok_or("oha not found")?;
        traces::run(
            settings,
            &oha,
            binary,
            &idp,
            upstream,
            dir,
            &one[0],
            &mut report,
        )
        .await?;
        return print(settings, report);
    }
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

    // Throughput with oha: the upstream alone, then at each worker count nginx's hop (the 1.00 reference),
    // the bare hop and the sidecar on a cache hit in alternation, `rounds` times each; the medians are
    // compared. Each worker count has its own three processes; the first count's sidecar is the run's own.
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
    let mut throughput = Vec::new();
    if let Some(oha) = &oha {
        let d = settings.duration;
        let warm = Duration::from_secs(1);
        oha.run(upstream, "/x", None, c, warm, None)?;
        let direct = oha.run(upstream, "/x", None, c, d, None)?;
        // The direct row comes first, but its ratios need nginx's figures.
        let direct_row = report.rows.len();
        for (index, &workers) in settings.worker_counts.iter().enumerate() {
            let label = workers_label(workers);
            let other = if index == 0 {
                None
            } else {
                let name = format!("bench-{workers}-workers");
                let other = servers::start_sidecar_with(
                    binary,
                    &idp,
                    upstream,
                    workers,
                    dir,
                    &name,
                    "",
                    &[],
                )
                .await?;
                each_once(&Target::new(other.proxy, "/obo/x", &one), 1).await?;
                Some(other)
            };
            let proxy = other.as_ref().map_or(sidecar.proxy, |s| s.proxy);
            let nginx = match &nginx_binary {
                Some(nginx) => Some(servers::start_nginx(nginx, upstream, workers, dir).await?),
                None => None,
            };
            let (bare_process, bare) = servers::start_bare_hop(upstream, workers).await?;
            let (mut nginx_runs, mut bare_runs, mut hit_runs) =
                (Vec::new(), Vec::new(), Vec::new());
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
                    oha.run(proxy, "/obo/x", Some(&one[0]), c, warm, None)?;
                }
                hit_runs.push(oha.run(proxy, "/obo/x", Some(&one[0]), c, d, None)?);
            }
            // This count's processes stop before the next count's start.
            drop(nginx);
            drop(bare_process);
            drop(other);
            let nginx = oha::median(nginx_runs);
            let bare = oha::median(bare_runs).ok_or("no oha run")?;
            let hit = oha::median(hit_runs).ok_or("no oha run")?;
            let (reference, reference_name) = match &nginx {
                Some(n) => (n.rps, "nginx"),
                None => (direct.rps, "direct"),
            };
            match &nginx {
                Some(n) => report.row(
                    format!(
                        "oha: nginx proxy hop, {label}, keep-alive upstream (median of {})",
                        settings.rounds
                    ),
                    n.line(),
                    "1.00 (reference)",
                ),
                None => report.row(
                    format!("oha: nginx proxy hop, {label}"),
                    "not run: nginx not found",
                    "-",
                ),
            }
            report.row(
                format!(
                    "oha: bare hyper proxy hop on the sidecar's stack, {label} (median of {})",
                    settings.rounds
                ),
                bare.line(),
                format!("{:.2} of {reference_name}", bare.rps / reference),
            );
            report.row(
                format!(
                    "oha: sidecar, cache hit, one caller (obo), {label} (median of {})",
                    settings.rounds
                ),
                hit.line(),
                format!(
                    "{:.2} of {reference_name}; {:.2} of the bare hop",
                    hit.rps / reference,
                    hit.rps / bare.rps
                ),
            );
            throughput.push(ThroughputGroup {
                workers,
                direct: Some(direct.rps),
                nginx: nginx.map(|n| n.rps),
                bare: Some(bare.rps),
                hit: Some(hit.rps),
            });
        }
        let ratios: Vec<String> = throughput
            .iter()
            .filter_map(|g| {
                let ratio = format!("{:.2} of nginx", direct.rps / g.nginx?);
                Some(if throughput.len() > 1 {
                    format!("{ratio} at {}", workers_label(g.workers))
                } else {
                    ratio
                })
            })
            .collect();
        report.row_at(
            direct_row,
            "oha: direct upstream (no proxy)",
            direct.line(),
            if ratios.is_empty() {
                "1.00 (reference)".to_owned()
            } else {
                ratios.join("; ")
            },
        );
        traces::run(
            settings,
            oha,
            binary,
            &idp,
            upstream,
            dir,
            &one[0],
            &mut report,
        )
        .await?;
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
    // Without oha (the quick run), the throughput chart shows the in-repo generator's figures.
    let throughput_source = if throughput.is_empty() {
        throughput.push(ThroughputGroup {
            workers: settings.workers,
            direct: Some(direct),
            nginx: None,
            bare: None,
            hit: Some(hit),
        });
        format!(
            "in-repo load generator, {c} connections, median of {}",
            settings.rounds
        )
    } else {
        format!("oha, {c} connections, median of {}", settings.rounds)
    };
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

    // Fixed-rate latency, direct, through nginx's hop and through the sidecar (oha -q in the full run).
    let rate_duration = settings.duration;
    let (direct_ms, nginx_ms, sidecar_ms) = if let Some(oha) = &oha {
        let fixed = |addr: std::net::SocketAddr, path: &str, token: Option<&str>| {
            oha.run(addr, path, token, 16, rate_duration, Some(settings.rate))
        };
        let direct = fixed(upstream, "/x", None)?;
        let nginx = match &nginx_binary {
            Some(nginx) => {
                let (_nginx, addr) =
                    servers::start_nginx(nginx, upstream, settings.workers, dir).await?;
                // Its keep-alive connections to the upstream opened before the measurement.
                oha.run(
                    addr,
                    "/x",
                    None,
                    16,
                    Duration::from_secs(1),
                    Some(settings.rate),
                )?;
                Some(fixed(addr, "/x", None)?)
            }
            None => None,
        };
        let sidecar = fixed(sidecar.proxy, "/obo/x", Some(&one[0]))?;
        (
            direct.percentiles(),
            nginx.map(|n| n.percentiles()),
            sidecar.percentiles(),
        )
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
            PERCENTILES.map(|(_, p)| percentile(&mut direct, p)),
            None,
            PERCENTILES.map(|(_, p)| percentile(&mut through, p)),
        )
    };
    let added = |ms: &[f64; 4]| {
        format!(
            "{:+.2} ms p50, {:+.2} ms p99",
            ms[0] - direct_ms[0],
            ms[2] - direct_ms[2]
        )
    };
    report.row(
        format!(
            "{}fixed rate {} rps (16 connections), {}, latency added over direct",
            if oha.is_some() {
                "oha: "
            } else {
                "in-repo load: "
            },
            settings.rate,
            workers_label(settings.workers)
        ),
        format!(
            "direct {}; {}sidecar {}",
            percentiles_line(&direct_ms),
            nginx_ms.as_ref().map_or(String::new(), |n| format!(
                "nginx {}; ",
                percentiles_line(n)
            )),
            percentiles_line(&sidecar_ms)
        ),
        format!(
            "sidecar {}{}",
            added(&sidecar_ms),
            nginx_ms
                .as_ref()
                .map_or(String::new(), |n| format!("; nginx {}", added(n)))
        ),
    );
    let latency_source = format!(
        "{} requests/s ({}, 16 connections, {})",
        settings.rate,
        if oha.is_some() {
            "oha -q"
        } else {
            "in-repo load generator"
        },
        workers_label(settings.workers)
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

    // The charts: the committed ones from the full run, the quick run's beside the build.
    let charts_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(if full {
        "bench/charts"
    } else {
        "target/bench-charts"
    });
    let latency = [
        LatencyLine {
            name: "direct upstream (no proxy)",
            ms: Some(direct_ms),
        },
        LatencyLine {
            name: "nginx proxy hop",
            ms: nginx_ms,
        },
        LatencyLine {
            name: "sidecar, cache hit",
            ms: Some(sidecar_ms),
        },
    ];
    let written = charts::write(
        &charts_dir,
        &charts::Charts {
            throughput_source,
            throughput: &throughput,
            latency_source,
            latency: &latency,
        },
    );

    print(settings, report)?;
    for path in written {
        eprintln!("chart: {}", path.display());
    }
    Ok(())
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
