//! A bare hyper reverse proxy on the sidecar's own stack (tokio, hyper's HTTP/1 server, hyper-util's pooled
//! client with `TCP_NODELAY`) and nothing else: no validation, no token cache, no header hygiene, no metrics.
//! Like the sidecar, it runs one thread per worker, each with its own current-thread runtime, socket
//! (`SO_REUSEPORT`) and upstream pool. It runs as its own process (`bench --bare-hop PORT UPSTREAM
//! WORKERS`, started by the harness) so that it gets the same worker count as the sidecar and nginx; the gap
//! between it and nginx is the stack's, and the gap between it and the sidecar is what the sidecar's own
//! work costs.

use std::net::SocketAddr;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::Error;

/// Serves the bare hop on `127.0.0.1:port` until killed: the sidecar's runtime layout, `workers` threads
/// each with a current-thread runtime and its own `SO_REUSEPORT` socket on the port.
pub(crate) fn serve(port: u16, upstream: SocketAddr, workers: usize) -> Result<(), Error> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let threads = (0..workers.max(1))
        .map(|_| {
            std::thread::spawn(move || -> Result<(), Error> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(worker(addr, upstream))
            })
        })
        .collect::<Vec<_>>();
    for thread in threads {
        thread.join().map_err(|_| "a bare-hop worker panicked")??;
    }
    Ok(())
}

/// One worker: its own listening socket and upstream pool, until killed.
async fn worker(addr: SocketAddr, upstream: SocketAddr) -> Result<(), Error> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    let listener: TcpListener = socket.listen(1024)?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let client = client.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let client = client.clone();
                async move { forward(&client, upstream, request).await }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward(
    client: &Client<HttpConnector, Incoming>,
    upstream: SocketAddr,
    mut request: Request<Incoming>,
) -> Result<Response<Incoming>, std::io::Error> {
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    *request.uri_mut() =
        Uri::try_from(format!("http://{upstream}{path}")).map_err(std::io::Error::other)?;
    client.request(request).await.map_err(std::io::Error::other)
}
