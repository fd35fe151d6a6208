//! The servers of a benchmark run: a minimal hyper upstream in this process, and as their own processes the
//! release `obo-sidecar` binary and, as the reference hop, nginx.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream;
use http::{Method, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use obo_sidecar::dev::DevIdp;
use tokio::net::{TcpListener, TcpStream};

use crate::Error;

/// The chunk that large bodies are made of, sent again and again.
pub(crate) const CHUNK: usize = 64 * 1024;

/// A body of `len` bytes streamed in [`CHUNK`]s of one shared buffer (no copy per chunk).
pub(crate) fn streamed_body(len: u64) -> BoxBody<Bytes, std::io::Error> {
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let chunks = len.div_ceil(CHUNK as u64);
    let frames = stream::iter((0..chunks).map(move |i| {
        let remaining = len - i * CHUNK as u64;
        let size = usize::try_from(remaining).map_or(CHUNK, |r| r.min(CHUNK));
        Ok(Frame::data(chunk.slice(..size)))
    }));
    StreamBody::new(frames).boxed()
}

/// The upstream: `GET /x` answers a small JSON body; `POST /sink` reads the whole request body and answers its
/// length; `GET /source?bytes=N` streams N bytes.
pub(crate) async fn start_upstream() -> Result<SocketAddr, Error> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .serve_connection(TokioIo::new(stream), service_fn(upstream))
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn upstream(
    request: Request<Incoming>,
) -> Result<Response<BoxBody<Bytes, std::io::Error>>, std::convert::Infallible> {
    let small = |body: String| {
        Response::new(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        )
    };
    match (request.method(), request.uri().path()) {
        (&Method::POST, "/sink") => {
            let mut body = request.into_body();
            let mut received = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        received += frame.data_ref().map_or(0, |d| d.len() as u64);
                    }
                    Err(_) => break,
                }
            }
            Ok(small(format!("{{\"received\":{received}}}")))
        }
        (&Method::GET, "/source") => {
            let len = request
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("bytes="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            Ok(Response::new(streamed_body(len)))
        }
        _ => Ok(small("{\"ok\":true}".to_owned())),
    }
}

/// A program named by the environment variable `env`, else `name` on `PATH`, else the first of `fallbacks`
/// that exists.
pub(crate) fn find_program(env: &str, name: &str, fallbacks: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::var_os(env)
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::split_paths(&path).map(|dir| dir.join(name)))
        .chain(fallbacks.iter().cloned())
        .find(|p| p.is_file())
}

/// A free loopback port (bound and released: the server that takes it runs as another process).
pub(crate) fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A child process killed when dropped.
pub(crate) struct Process {
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        // SIGTERM first: nginx's master stops its workers on SIGTERM, but on SIGKILL it leaves them running.
        let stopped = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if stopped {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process, in KiB: `VmRSS` (now) or `VmHWM` (the peak since it started).
pub(crate) fn memory_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub(crate) struct Sidecar {
    process: Process,
    pub proxy: SocketAddr,
    pub started_to_ready: Duration,
}

impl Sidecar {
    pub(crate) fn pid(&self) -> u32 {
        self.process.child.id()
    }

    pub(crate) fn rss_kib(&self) -> u64 {
        memory_kib(self.process.child.id(), "VmRSS:")
    }

    pub(crate) fn peak_kib(&self) -> u64 {
        memory_kib(self.process.child.id(), "VmHWM:")
    }
}

/// Starts the release binary with one OBO route `/obo/` → `upstream`, with `workers` tokio worker threads,
/// and waits for `/readyz`.
pub(crate) async fn start_sidecar(
    binary: &Path,
    idp: &DevIdp,
    upstream: SocketAddr,
    workers: usize,
    dir: &Path,
) -> Result<Sidecar, Error> {
    start_sidecar_with(binary, idp, upstream, workers, dir, "bench", "", &[]).await
}

/// As [`start_sidecar`], its configuration file named `name` and ending with `extra` (more TOML), with the
/// variables `env` added to its environment.
#[allow(
    clippy::too_many_arguments,
    reason = "each a part of the process, used once"
)]
pub(crate) async fn start_sidecar_with(
    binary: &Path,
    idp: &DevIdp,
    upstream: SocketAddr,
    workers: usize,
    dir: &Path,
    name: &str,
    extra: &str,
    env: &[(&str, &str)],
) -> Result<Sidecar, Error> {
    let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let secret = dir.join("client-secret");
    std::fs::write(&secret, obo_sidecar::dev::DEFAULT_CLIENT_SECRET)?;
    let config = dir.join(format!("{name}.toml"));
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
{extra}"#,
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
        .env("TOKIO_WORKER_THREADS", workers.to_string())
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let process = Process { child };
    let http = reqwest::Client::new();
    let readyz = format!("http://{admin}/readyz");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if http
            .get(&readyz)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return Ok(Sidecar {
                process,
                proxy,
                started_to_ready: started.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Err("the sidecar did not become ready in 10 s".into())
}

/// The bare hyper hop ([`crate::bare`]): this same program started again with `--bare-hop`.
pub(crate) async fn start_bare_hop(
    upstream: SocketAddr,
    workers: usize,
) -> Result<(Process, SocketAddr), Error> {
    let port = free_port()?;
    let child = Command::new(std::env::current_exe()?)
        .args([
            "--bare-hop".to_owned(),
            port.to_string(),
            upstream.to_string(),
            workers.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let process = Process { child };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, "the bare hop").await?;
    Ok((process, addr))
}

/// Waits until something accepts connections on `addr`.
async fn wait_listening(addr: SocketAddr, what: &str) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Err(format!("{what} did not listen on {addr} in 10 s").into())
}

/// nginx as a plain reverse-proxy hop to `upstream` (keep-alive to the upstream, no access log), with
/// `workers` worker processes; its address.
pub(crate) async fn start_nginx(
    nginx: &PathBuf,
    upstream: SocketAddr,
    workers: usize,
    dir: &Path,
) -> Result<(Process, SocketAddr), Error> {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(&prefix)?;
    let conf = prefix.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            r#"daemon off;
master_process on;
worker_processes {workers};
pid {pid};
error_log {log} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream bench_upstream {{
        server {upstream};
        keepalive 64;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
        }}
    }}
}}
"#,
            pid = prefix.join("nginx.pid").display(),
            log = prefix.join("error.log").display(),
            tmp = prefix.display(),
        ),
    )?;
    let child = Command::new(nginx)
        .arg("-p")
        .arg(&prefix)
        .arg("-e")
        .arg(prefix.join("error.log"))
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let process = Process { child };
    let what = format!("nginx (see {})", prefix.join("error.log").display());
    wait_listening(listen, &what).await?;
    Ok((process, listen))
}
