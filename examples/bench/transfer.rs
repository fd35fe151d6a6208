//! Large bodies through a proxy: an upload of N bytes to `POST /sink` and a download of N bytes from
//! `GET /source`, each on one connection, with its throughput.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{Request, header};
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::Error;
use crate::servers::streamed_body;

/// Seconds taken to upload `len` bytes then to download `len` bytes through `addr` under `prefix` (`""` for
/// the upstream itself, `/obo` through the sidecar), with `token` as the caller's.
pub(crate) async fn upload_download(
    addr: SocketAddr,
    prefix: &str,
    token: Option<&str>,
    len: u64,
) -> Result<(Duration, Duration), Error> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let authorize = |request: http::request::Builder| match token {
        Some(token) => request.header(header::AUTHORIZATION, format!("Bearer {token}")),
        None => request,
    };

    let started = Instant::now();
    let upload = authorize(
        Request::post(format!("{prefix}/sink"))
            .header(header::HOST, "bench")
            .header(header::CONTENT_LENGTH, len),
    )
    .body(streamed_body(len))?;
    let response = sender.send_request(upload).await?;
    let status = response.status();
    let answer = response.into_body().collect().await?.to_bytes();
    if status != 200 || answer != format!("{{\"received\":{len}}}").as_bytes() {
        return Err(format!(
            "upload of {len} bytes: status {status}, answer {}",
            String::from_utf8_lossy(&answer)
        )
        .into());
    }
    let uploaded = started.elapsed();

    sender.ready().await?;
    let started = Instant::now();
    let download = authorize(
        Request::get(format!("{prefix}/source?bytes={len}")).header(header::HOST, "bench"),
    )
    .body(streamed_body(0))?;
    let response = sender.send_request(download).await?;
    let status = response.status();
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        received += frame?.data_ref().map_or(0, |d| d.len() as u64);
    }
    if status != 200 || received != len {
        return Err(
            format!("download of {len} bytes: status {status}, {received} received").into(),
        );
    }
    Ok((uploaded, started.elapsed()))
}

/// Throughput in MiB/s.
#[allow(clippy::cast_precision_loss, reason = "sizes for display")]
pub(crate) fn mib_per_s(len: u64, elapsed: Duration) -> f64 {
    len as f64 / 1_048_576.0 / elapsed.as_secs_f64().max(1e-9)
}
