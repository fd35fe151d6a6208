//! The benchmark harness behind `bench/run.sh`: a minimal upstream, the development IdP and an in-process
//! load generator drive the release `obo-sidecar` binary (a separate process) on loopback, and print a table
//! of ratios measured in the same run. `--quick` is a smoke run (seconds); the full run takes minutes.
//! Loopback only; every loop is bounded in time and count.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use obo_sidecar::dev_idp::{CallerClaims, DevIdp, DevIdpConfig, Failure};
use tokio::net::{TcpListener, TcpStream};

type Error = Box<dyn std::error::Error + Send + Sync>;

struct Settings {
    quick: bool,
    duration: Duration,
    connections: usize,
    callers: usize,
    cold_requests: usize,
    rate: u64,
}

impl Settings {
    fn from_args() -> Settings {
        let quick = std::env::args().any(|a| a == "--quick");
        Settings {
            quick,
            duration: if quick {
                Duration::from_secs(2)
            } else {
                Duration::from_secs(10)
            },
            connections: 32,
            callers: if quick { 1_000 } else { 10_000 },
            cold_requests: if quick { 200 } else { 2_000 },
            rate: 1_000,
        }
    }
}

/// The fastest upstream we can write: a fixed small answer.
async fn start_upstream() -> Result<SocketAddr, Error> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"{\"ok\":true}",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// A free loopback port (bound and released: the sidecar runs as another process).
fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Sidecar {
    child: Child,
    proxy: SocketAddr,
    started_to_ready: Duration,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sidecar {
    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }
}

async fn start_sidecar(
    binary: &PathBuf,
    idp: &DevIdp,
    upstream: SocketAddr,
    dir: &std::path::Path,
) -> Result<Sidecar, Error> {
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let secret = dir.join("client-secret");
    std::fs::write(&secret, obo_sidecar::dev_idp::DEFAULT_CLIENT_SECRET)?;
    let config = dir.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            r#"[listen]
proxy = "{proxy}"
admin = "{admin}"
[inbound]
issuers = ["{issuer}"]
audiences = ["api://obo-sidecar"]
[identity]
token_endpoint = "{token_endpoint}"
client_id = "obo-sidecar"
client_secret = {{ file = "{secret}" }}
[cache]
max_entries = 200000
[[routes]]
name = "obo"
path_prefix = "/obo/"
upstream = "http://{upstream}/"
token = "obo"
scopes = ["api://downstream/.default"]
"#,
            issuer = idp.issuer(),
            token_endpoint = idp.token_endpoint(),
            secret = secret.display(),
        ),
    )?;
    let started = Instant::now();
    let child = Command::new(binary)
        .args(["run", "-c"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let http = reqwest::Client::new();
    let readyz = format!("http://{admin}/readyz");
    for _ in 0..500 {
        if http
            .get(&readyz)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return Ok(Sidecar {
                child,
                proxy,
                started_to_ready: started.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err("the sidecar did not become ready in 5 s".into())
}

/// Requests per second and latencies (µs) of `connections` keep-alive connections sending GETs for `duration`,
/// each request with the next of `tokens` (round robin; none: no Authorization).
async fn load(
    target: SocketAddr,
    path: &str,
    tokens: Arc<Vec<String>>,
    connections: usize,
    duration: Duration,
) -> Result<(f64, Vec<u32>), Error> {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let tokens = Arc::clone(&tokens);
        let path = path.to_owned();
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(target).await?;
            stream.set_nodelay(true)?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            let mut latencies = Vec::new();
            let mut i = c;
            while Instant::now() < deadline {
                let mut request = Request::get(&path).header(header::HOST, "bench");
                if !tokens.is_empty() {
                    request = request.header(
                        header::AUTHORIZATION,
                        format!("Bearer {}", tokens[i % tokens.len()]),
                    );
                }
                i += connections;
                let started = Instant::now();
                let response = sender
                    .send_request(request.body(Empty::<Bytes>::new())?)
                    .await?;
                let status = response.status();
                response.into_body().collect().await?;
                if status != 200 {
                    return Err::<Vec<u32>, Error>(format!("status {status}").into());
                }
                latencies.push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX));
            }
            Ok(latencies)
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    let elapsed = started.elapsed().as_secs_f64().max(duration.as_secs_f64());
    #[allow(clippy::cast_precision_loss, reason = "request counts fit f64")]
    Ok((all.len() as f64 / elapsed, all))
}

/// Latencies (µs) of requests sent at a fixed `rate` for `duration`, each on its own task.
async fn fixed_rate(
    target: SocketAddr,
    path: &str,
    token: Option<&str>,
    rate: u64,
    duration: Duration,
) -> Result<Vec<u32>, Error> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let url = format!("http://{target}{path}");
    let mut interval = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    while Instant::now() < deadline {
        interval.tick().await;
        let mut request = client.get(&url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let ok = request.send().await.is_ok_and(|r| r.status() == 200);
            ok.then(|| u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX))
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        if let Some(l) = task.await? {
            latencies.push(l);
        }
    }
    Ok(latencies)
}

fn percentile(latencies: &mut [u32], p: f64) -> f64 {
    if latencies.is_empty() {
        return f64::NAN;
    }
    latencies.sort_unstable();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into the slice"
    )]
    let index = ((latencies.len() - 1) as f64 * p).round() as usize;
    f64::from(latencies[index]) / 1000.0
}

fn mint(idp: &DevIdp, n: usize, prefix: &str) -> Vec<String> {
    (0..n)
        .map(|i| {
            idp.mint(&CallerClaims {
                scp: Some("access_as_user".into()),
                ..CallerClaims::user(format!("{prefix}-{i}"))
            })
        })
        .collect()
}

#[tokio::main]
#[allow(clippy::cast_precision_loss, reason = "sizes in MB for display")]
async fn main() -> Result<(), Error> {
    let settings = Settings::from_args();
    obo_sidecar::tls::install_crypto_provider();
    let binary = PathBuf::from(
        std::env::var("OBO_SIDECAR_BIN")
            .unwrap_or_else(|_| "target/release/obo-sidecar".to_owned()),
    );
    let dir = std::env::temp_dir().join(format!("obo-sidecar-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let idp = DevIdp::start(
        TcpListener::bind("127.0.0.1:0").await?,
        DevIdpConfig::default(),
    )
    .await?;
    let upstream = start_upstream().await?;
    let sidecar = start_sidecar(&binary, &idp, upstream, &dir).await?;
    let idle_rss = sidecar.rss_kib();
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let c = settings.connections;

    let (direct, mut direct_lat) =
        load(upstream, "/x", Arc::new(Vec::new()), c, settings.duration).await?;
    rows.push((
        "direct upstream (no proxy)".into(),
        format!("{direct:.0} rps"),
        "1.00 (baseline)".into(),
    ));

    let one = Arc::new(mint(&idp, 1, "hit"));
    load(
        sidecar.proxy,
        "/obo/x",
        Arc::clone(&one),
        1,
        Duration::from_millis(200),
    )
    .await?;
    let (hit, mut hit_lat) = load(
        sidecar.proxy,
        "/obo/x",
        Arc::clone(&one),
        c,
        settings.duration,
    )
    .await?;
    rows.push((
        "sidecar, cache hit, one caller (obo)".into(),
        format!(
            "{hit:.0} rps, p50 {:.2} ms, p99 {:.2} ms",
            percentile(&mut hit_lat, 0.5),
            percentile(&mut hit_lat, 0.99)
        ),
        format!("{:.2} of direct", hit / direct),
    ));

    let many = Arc::new(mint(&idp, settings.callers, "breadth"));
    // Warm every caller's exchange once (bounded: one request per caller), then measure the cache under breadth.
    let client = reqwest::Client::new();
    for token in many.iter() {
        let _ = client
            .get(format!("http://{}/obo/x", sidecar.proxy))
            .bearer_auth(token)
            .send()
            .await;
    }
    let (breadth, _) = load(
        sidecar.proxy,
        "/obo/x",
        Arc::clone(&many),
        c,
        settings.duration,
    )
    .await?;
    rows.push((
        format!("sidecar, {} callers cycling", settings.callers),
        format!("{breadth:.0} rps"),
        format!("{:.2} of one caller", breadth / hit),
    ));
    let breadth_rss = sidecar.rss_kib();

    // Cold path: every request a new caller, so every request is an IdP exchange.
    let cold = mint(&idp, settings.cold_requests, "cold");
    let http = reqwest::Client::new();
    let mut cold_ms = Vec::new();
    for token in &cold {
        let started = Instant::now();
        let response = http
            .get(format!("http://{}/obo/x", sidecar.proxy))
            .bearer_auth(token)
            .send()
            .await?;
        if response.status() == 200 {
            cold_ms.push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX));
        }
    }
    let idp_only = mint(&idp, settings.cold_requests, "idp");
    let mut idp_ms = Vec::new();
    for token in &idp_only {
        let started = Instant::now();
        let form = [
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("requested_token_use", "on_behalf_of"),
            ("assertion", token.as_str()),
            ("scope", "api://downstream/.default"),
            ("client_id", "obo-sidecar"),
            ("client_secret", obo_sidecar::dev_idp::DEFAULT_CLIENT_SECRET),
        ];
        if http
            .post(idp.token_endpoint())
            .form(&form)
            .send()
            .await?
            .status()
            == 200
        {
            idp_ms.push(u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX));
        }
    }
    let (cold_p50, idp_p50, direct_p50) = (
        percentile(&mut cold_ms, 0.5),
        percentile(&mut idp_ms, 0.5),
        percentile(&mut direct_lat, 0.5),
    );
    rows.push((
        "sidecar, cold path (every request a new caller)".into(),
        format!("p50 {cold_p50:.2} ms; IdP alone p50 {idp_p50:.2} ms"),
        format!(
            "{:.2} ms added to the IdP's time",
            cold_p50 - idp_p50 - direct_p50
        ),
    ));

    // Fixed-rate latency, direct and through the sidecar.
    let rate_duration = if settings.quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(10)
    };
    let mut direct_rate = fixed_rate(upstream, "/x", None, settings.rate, rate_duration).await?;
    let mut sidecar_rate = fixed_rate(
        sidecar.proxy,
        "/obo/x",
        Some(&one[0]),
        settings.rate,
        rate_duration,
    )
    .await?;
    let (d50, d99) = (
        percentile(&mut direct_rate, 0.5),
        percentile(&mut direct_rate, 0.99),
    );
    let (s50, s99) = (
        percentile(&mut sidecar_rate, 0.5),
        percentile(&mut sidecar_rate, 0.99),
    );
    rows.push((
        format!(
            "fixed rate {} rps, latency added over direct",
            settings.rate
        ),
        format!("direct p50 {d50:.2} / p99 {d99:.2} ms; sidecar p50 {s50:.2} / p99 {s99:.2} ms"),
        format!("+{:.2} ms p50, +{:.2} ms p99", s50 - d50, s99 - d99),
    ));

    // Single flight: 256 concurrent first requests of one caller against a slow IdP.
    let caller = mint(&idp, 1, "flight").remove(0);
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
    rows.push((
        "single flight: 256 concurrent cold requests of one caller".into(),
        format!("{ok}/256 ok"),
        format!("{} IdP call(s)", idp.token_requests() - before),
    ));

    let binary_size = std::fs::metadata(&binary).map_or(0, |m| m.len());
    rows.push((
        "memory and size".into(),
        format!(
            "idle RSS {:.1} MB; after {} callers {:.1} MB",
            idle_rss as f64 / 1024.0,
            settings.callers,
            breadth_rss as f64 / 1024.0
        ),
        format!(
            "binary {:.1} MB; start to ready {} ms",
            binary_size as f64 / 1_048_576.0,
            sidecar.started_to_ready.as_millis()
        ),
    ));

    let mut out = std::io::stdout().lock();
    writeln!(out, "| scenario | measured | ratio / figure |")?;
    writeln!(out, "|---|---|---|")?;
    for (scenario, measured, ratio) in rows {
        writeln!(out, "| {scenario} | {measured} | {ratio} |")?;
    }
    drop(sidecar);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
