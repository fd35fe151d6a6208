//! The in-repo load generator: keep-alive HTTP/1.1 connections on loopback, closed loop (as fast as answers
//! come) or paced (a fixed rate), and the latency percentiles of what they measured.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::Error;

/// Where the requests of a load go: an address, a path, and the caller tokens sent round robin (none: no
/// `Authorization` header).
#[derive(Clone)]
pub(crate) struct Target {
    pub addr: SocketAddr,
    pub path: String,
    pub tokens: Arc<Vec<String>>,
}

impl Target {
    pub(crate) fn new(addr: SocketAddr, path: &str, tokens: &Arc<Vec<String>>) -> Target {
        Target {
            addr,
            path: path.to_owned(),
            tokens: Arc::clone(tokens),
        }
    }

    fn request(&self, i: usize) -> Result<Request<Empty<Bytes>>, Error> {
        get(&self.path, &self.tokens, i)
    }
}

/// `GET path` with the `i`-th of `tokens` (round robin) as the bearer token; none when `tokens` is empty.
fn get(path: &str, tokens: &[String], i: usize) -> Result<Request<Empty<Bytes>>, Error> {
    let mut request = Request::get(path).header(header::HOST, "bench");
    if !tokens.is_empty() {
        request = request.header(
            header::AUTHORIZATION,
            format!("Bearer {}", tokens[i % tokens.len()]),
        );
    }
    Ok(request.body(Empty::<Bytes>::new())?)
}

/// A keep-alive HTTP/1.1 connection to `addr`.
pub(crate) async fn connect(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, Error> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Sends one request and reads the whole answer; its status.
async fn exchange(
    sender: &mut SendRequest<Empty<Bytes>>,
    request: Request<Empty<Bytes>>,
) -> Result<http::StatusCode, Error> {
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    response.into_body().collect().await?;
    Ok(status)
}

/// Requests per second and latencies (µs) of `connections` connections sending requests back to back for
/// `duration`. Any answer other than 200 ends the run with an error: a benchmark of failures measures nothing.
pub(crate) async fn closed_loop(
    target: &Target,
    connections: usize,
    duration: Duration,
) -> Result<(f64, Vec<u32>), Error> {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(target.addr).await?;
            let mut latencies = Vec::new();
            let mut i = c;
            while Instant::now() < deadline {
                let request = target.request(i)?;
                i += connections;
                let started = Instant::now();
                let status = exchange(&mut sender, request).await?;
                if status != 200 {
                    return Err::<Vec<u32>, Error>(format!("status {status}").into());
                }
                latencies.push(micros(started.elapsed()));
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

/// Sends each token once, over `connections` connections; the number of answers other than 200.
pub(crate) async fn each_once(target: &Target, connections: usize) -> Result<usize, Error> {
    let mut tasks = Vec::new();
    for c in 0..connections {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(target.addr).await?;
            let mut failed = 0;
            for i in (c..target.tokens.len()).step_by(connections) {
                if exchange(&mut sender, target.request(i)?).await? != 200 {
                    failed += 1;
                }
            }
            Ok::<usize, Error>(failed)
        }));
    }
    let mut failed = 0;
    for task in tasks {
        failed += task.await??;
    }
    Ok(failed)
}

/// Counters of a paced load, read while it runs.
#[derive(Default)]
pub(crate) struct Tally {
    pub ok: AtomicU64,
    pub refused: AtomicU64,
    pub transport: AtomicU64,
}

impl Tally {
    pub(crate) fn errors(&self) -> u64 {
        self.refused.load(Ordering::Relaxed) + self.transport.load(Ordering::Relaxed)
    }
}

/// A load at a fixed `rate` (requests per second, shared by `connections` connections) for `duration`, with
/// the token list re-read on every request from `tokens` (so a rotator can replace it). Failures are counted,
/// not fatal: a connection that breaks is opened again. Latencies (µs) of the successful requests.
pub(crate) async fn paced(
    addr: SocketAddr,
    path: &str,
    tokens: Arc<arc_swap::ArcSwap<Vec<String>>>,
    rate: f64,
    connections: usize,
    duration: Duration,
    tally: Arc<Tally>,
) -> Result<Vec<u32>, Error> {
    let deadline = Instant::now() + duration;
    #[allow(clippy::cast_precision_loss, reason = "a small connection count")]
    let period = Duration::from_secs_f64(connections as f64 / rate.max(1.0));
    let mut tasks = Vec::new();
    for c in 0..connections {
        let tokens = Arc::clone(&tokens);
        let tally = Arc::clone(&tally);
        let path = path.to_owned();
        tasks.push(tokio::spawn(async move {
            // Spread the connections' first ticks over one period.
            #[allow(clippy::cast_possible_truncation, reason = "a small connection count")]
            let offset = period / connections as u32 * c as u32;
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sender = None;
            let mut latencies = Vec::new();
            let mut i = c;
            while Instant::now() < deadline {
                ticks.tick().await;
                i += connections;
                let request = get(&path, &tokens.load(), i)?;
                let started = Instant::now();
                let outcome = match sender.as_mut() {
                    Some(s) => exchange(s, request).await,
                    None => match connect(addr).await {
                        Ok(s) => exchange(sender.insert(s), request).await,
                        Err(e) => Err(e),
                    },
                };
                match outcome {
                    Ok(status) if status == 200 => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                        latencies.push(micros(started.elapsed()));
                    }
                    Ok(_) => {
                        tally.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        tally.transport.fetch_add(1, Ordering::Relaxed);
                        sender = None;
                    }
                }
            }
            Ok::<_, Error>(latencies)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(all)
}

pub(crate) fn micros(elapsed: Duration) -> u32 {
    u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX)
}

/// The `p` quantile (0..=1) of latencies in µs, in milliseconds.
pub(crate) fn percentile(latencies: &mut [u32], p: f64) -> f64 {
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
