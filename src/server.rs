//! Accept loops: HTTP/1.1 and HTTP/2 (h2c prior knowledge, or ALPN `h2` over TLS) on one listener, with
//! upgrades, optional TLS (mTLS), a cap on concurrent connections, header-size and header-read limits, an
//! idle timeout, and a graceful drain on shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::config::Listen;
use crate::tls::ReloadingServerConfig;

/// Where a request came from.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub remote: SocketAddr,
    /// The connection is TLS (`X-Forwarded-Proto: https`).
    pub tls: bool,
}

/// How a listener serves its connections.
#[derive(Clone)]
pub struct ServeOptions {
    pub name: &'static str,
    pub tls: Option<Arc<ReloadingServerConfig>>,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub drain_timeout: Duration,
}

impl ServeOptions {
    /// The options `[listen]` gives the proxy listener.
    pub fn proxy(listen: &Listen, tls: Option<Arc<ReloadingServerConfig>>) -> ServeOptions {
        ServeOptions {
            name: "proxy",
            tls,
            max_connections: listen.max_connections,
            header_read_timeout: listen.header_read_timeout,
            idle_timeout: listen.idle_timeout,
            max_header_bytes: listen.max_header_bytes,
            drain_timeout: listen.drain_timeout,
        }
    }

    /// The admin listener: plain HTTP, few connections.
    pub fn admin(listen: &Listen) -> ServeOptions {
        ServeOptions {
            name: "admin",
            tls: None,
            max_connections: 256,
            ..ServeOptions::proxy(listen, None)
        }
    }
}

/// Serves `listener` with `handler` until `shutdown` turns true, then stops accepting and drains: open
/// connections finish their in-flight requests (up to `drain_timeout`) and are closed.
pub async fn serve<H, Fut, B>(
    listener: TcpListener,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    options: ServeOptions,
) where
    H: Fn(Request<Incoming>, Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = http_builder(&options, true);
    let permits = Arc::new(Semaphore::new(options.max_connections));
    let mut connections = JoinSet::new();
    loop {
        // Beyond max_connections, new connections wait in the kernel's accept queue.
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => permit,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let Ok(permit) = permit else { break };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, remote) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(listener = options.name, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let builder = Arc::clone(&builder);
        let options = options.clone();
        let stop = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            serve_one(&builder, stream, remote, handler, stop, &options).await;
        });
    }
    // Connections the kernel already completed sit in the accept queue: closing the listener would reset
    // them. Serve them instead, one request each (`Connection: close`), within the drain.
    let last = http_builder(&options, false);
    for (stream, remote) in queued(listener) {
        let handler = handler.clone();
        let last = last.clone();
        let options = options.clone();
        connections.spawn(async move {
            // Never signalled, and kept alive: these connections serve their one request.
            let (_never, no_stop) = watch::channel(false);
            let _ = stream.set_nodelay(true);
            serve_one(&last, stream, remote, handler, no_stop, &options).await;
        });
    }
    let drained = tokio::time::timeout(options.drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            listener = options.name,
            open = connections.len(),
            "drain timeout; closing the remaining connections"
        );
        connections.abort_all();
    } else {
        tracing::debug!(listener = options.name, "drained");
    }
}

/// The connections waiting in `listener`'s accept queue, taken without waiting; the listener is closed.
fn queued(listener: TcpListener) -> Vec<(tokio::net::TcpStream, SocketAddr)> {
    let Ok(listener) = listener.into_std() else {
        return Vec::new();
    };
    let mut queued = Vec::new();
    // The std listener is still non-blocking: `accept` answers at once.
    while let Ok((stream, remote)) = listener.accept() {
        // An accepted socket does not inherit the listener's non-blocking mode; tokio needs it.
        if stream.set_nonblocking(true).is_ok()
            && let Ok(stream) = tokio::net::TcpStream::from_std(stream)
        {
            queued.push((stream, remote));
        }
    }
    queued
}

/// The hyper connection builder for a listener's options; without `keep_alive`, an HTTP/1.1 connection
/// serves one request and closes.
type HttpBuilder = Arc<hyper_util::server::conn::auto::Builder<TokioExecutor>>;

fn http_builder(options: &ServeOptions, keep_alive: bool) -> HttpBuilder {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(options.max_header_bytes.max(8192))
        .keep_alive(keep_alive);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(options.max_header_bytes).unwrap_or(u32::MAX))
        // No keep-alive PINGs: idle connections are reclaimed by idle_timeout instead.
        .keep_alive_interval(None);
    Arc::new(builder)
}

/// Serves one accepted connection: the TLS handshake if the listener has TLS, then HTTP.
async fn serve_one<H, Fut, B>(
    builder: &HttpBuilder,
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    handler: H,
    stop: watch::Receiver<bool>,
    options: &ServeOptions,
) where
    H: Fn(Request<Incoming>, Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match &options.tls {
        None => {
            let peer = Peer { remote, tls: false };
            drive(builder, stream, peer, handler, stop, options).await;
        }
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            match tokio::time::timeout(options.header_read_timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let peer = Peer { remote, tls: true };
                    drive(builder, stream, peer, handler, stop, options).await;
                }
                Ok(Err(error)) => {
                    tracing::debug!(listener = options.name, %remote, %error, "TLS handshake failed");
                }
                Err(_) => {
                    tracing::debug!(listener = options.name, %remote, "TLS handshake timed out");
                }
            }
        }
    }
}

/// A connection's upgraded tunnels (WebSocket) run inside its task, so they hold its `max_connections`
/// permit and are drained with it (SPEC §8): the proxy hands them over through this request extension.
#[derive(Clone)]
pub struct Tunnels(tokio::sync::mpsc::UnboundedSender<BoxFuture<'static, ()>>);

impl Tunnels {
    /// Runs `tunnel` in the connection's task, once the connection has handed its bytes over.
    pub fn run(&self, tunnel: BoxFuture<'static, ()>) {
        // The receiver lives as long as the connection's task; if it is gone, so is the caller.
        let _ = self.0.send(tunnel);
    }
}

/// Serves one connection until it closes, goes idle for `idle_timeout`, or shutdown asks it to finish; then
/// runs what it upgraded, until that ends too.
async fn drive<I, H, Fut, B>(
    builder: &HttpBuilder,
    io: I,
    peer: Peer,
    handler: H,
    mut stop: watch::Receiver<bool>,
    options: &ServeOptions,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let io = IdleIo::new(io);
    let activity = io.activity();
    let requests = Requests::default();
    let (tunnels, mut upgraded) = tokio::sync::mpsc::unbounded_channel();
    let service = {
        let requests = requests.clone();
        let tunnels = Tunnels(tunnels);
        service_fn(move |mut request: Request<Incoming>| {
            let handler = handler.clone();
            let open = requests.open();
            request.extensions_mut().insert(tunnels.clone());
            async move {
                let response = handler(request, peer).await;
                drop(open);
                Ok::<_, Infallible>(response)
            }
        })
    };
    let mut connection =
        Box::pin(builder.serve_connection_with_upgrades(TokioIo::new(io), service));
    let finished = tokio::select! {
        result = connection.as_mut() => Some(result),
        _ = stop.wait_for(|stop| *stop) => None,
        () = activity.idle_for(options.idle_timeout) => None,
        () = requests.idle_for(options.idle_timeout) => None,
    };
    let result = if let Some(result) = finished {
        result
    } else {
        connection.as_mut().graceful_shutdown();
        // What is in flight may finish; a connection that stays silent meanwhile is closed.
        tokio::select! {
            result = connection.as_mut() => result,
            () = activity.idle_for(options.idle_timeout) => Ok(()),
        }
    };
    if let Err(error) = result {
        tracing::debug!(listener = options.name, remote = %peer.remote, %error, "connection ended with an error");
    }
    // Dropping the connection drops every sender but those of tunnels already handed over.
    drop(connection);
    let mut tunnels = JoinSet::new();
    while let Some(tunnel) = upgraded.recv().await {
        tunnels.spawn(tunnel);
    }
    while tunnels.join_next().await.is_some() {}
}

/// A connection's requests: how many wait for their answer, and when one last started or was answered. An
/// HTTP/2 connection that only exchanges PINGs moves bytes but no request, and is idle all the same.
#[derive(Clone)]
struct Requests {
    open: Arc<std::sync::atomic::AtomicUsize>,
    activity: Activity,
}

impl Default for Requests {
    fn default() -> Self {
        Requests {
            open: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            activity: Activity::new(),
        }
    }
}

/// One request waiting for its answer.
struct OpenRequest(Requests);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.activity.touch();
    }
}

impl Requests {
    fn open(&self) -> OpenRequest {
        self.open.fetch_add(1, Ordering::AcqRel);
        self.activity.touch();
        OpenRequest(self.clone())
    }

    /// Resolves once no request has waited, started or been answered for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            self.activity.idle_for(limit).await;
            if self.open.load(Ordering::Acquire) == 0 {
                return;
            }
            // A request is waiting for its answer (bounded by its route's timeout): look again later.
            tokio::time::sleep(limit).await;
        }
    }
}

/// When a connection last moved a byte, shared with its watchdog.
#[derive(Clone)]
pub(crate) struct Activity {
    epoch: tokio::time::Instant,
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: tokio::time::Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// Resolves once no byte has moved for `limit`.
    pub(crate) async fn idle_for(&self, limit: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let idle = self.epoch.elapsed().saturating_sub(last);
            if idle >= limit {
                return;
            }
            tokio::time::sleep(limit.saturating_sub(idle)).await;
        }
    }
}

/// An I/O stream that records when it last read or wrote a byte.
pub(crate) struct IdleIo<I> {
    inner: I,
    activity: Activity,
}

impl<I> IdleIo<I> {
    pub(crate) fn new(inner: I) -> Self {
        IdleIo {
            inner,
            activity: Activity::new(),
        }
    }

    pub(crate) fn activity(&self) -> Activity {
        self.activity.clone()
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for IdleIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        poll
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for IdleIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
