//! One connection: HTTP/1.1 or HTTP/2 served until it closes, goes idle or is asked to finish, then what it
//! upgraded (WebSocket tunnels), inside the same task, so a tunnel holds the connection's permit and is
//! drained with it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::{HeaderValue, Request, Response};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::options::{HttpBuilder, ServeOptions};

/// A connection's upgraded tunnels (WebSocket) run inside its task, so they hold its `max_connections`
/// permit and are drained with it (SPEC §8): the proxy hands them over through this request extension.
#[derive(Clone, Debug)]
pub(crate) struct Tunnels(tokio::sync::mpsc::UnboundedSender<BoxFuture<'static, ()>>);

impl Tunnels {
    /// Runs `tunnel` in the connection's task, once the connection has handed its bytes over.
    pub(crate) fn run(&self, tunnel: BoxFuture<'static, ()>) {
        // The receiver lives as long as the connection's task; if it is gone, so is the caller.
        let _ = self.0.send(tunnel);
    }
}

/// Where a request came from: one per connection, shared by its requests, so that nothing about the
/// connection is formatted or allocated again per request.
#[derive(Debug)]
pub(crate) struct Peer {
    /// The connection is TLS (`X-Forwarded-Proto: https`).
    pub(crate) tls: bool,
    /// `remote`'s address as the `X-Forwarded-For` value.
    pub(crate) forwarded_for: HeaderValue,
    /// Where the connection's upgraded tunnels run.
    pub(crate) tunnels: Tunnels,
    /// The digest of the bearer token the connection sent last.
    pub(crate) last_token: crate::digest::LastDigest,
}

impl Peer {
    pub(crate) fn new(remote: SocketAddr, tls: bool, tunnels: Tunnels) -> Peer {
        Peer {
            tls,
            forwarded_for: HeaderValue::from_str(&remote.ip().to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            tunnels,
            last_token: crate::digest::LastDigest::default(),
        }
    }
}

/// An error a handler or a response body may end with.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What answers a listener's requests: a function, cloned into every connection, from a request and its
/// connection's [`Peer`] to a response with a streaming body. Any such closure is one.
pub(crate) trait Handler: Clone + Send + Sync + 'static {
    type Body: Body<Data: Send, Error: Into<BoxError>> + Send + 'static;
    type Error: Into<BoxError>;
    type Answer: Future<Output = Result<Response<Self::Body>, Self::Error>> + Send + 'static;

    fn call(&self, request: Request<Incoming>, peer: Arc<Peer>) -> Self::Answer;
}

impl<H, A, B, E> Handler for H
where
    H: Fn(Request<Incoming>, Arc<Peer>) -> A + Clone + Send + Sync + 'static,
    A: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
    E: Into<BoxError>,
{
    type Body = B;
    type Error = E;
    type Answer = A;

    fn call(&self, request: Request<Incoming>, peer: Arc<Peer>) -> A {
        self(request, peer)
    }
}

/// Serves one connection until it closes, goes idle for `idle_timeout`, or shutdown asks it to finish; then
/// runs what it upgraded, until that ends too.
pub(super) async fn drive<I, H: Handler>(
    builder: &HttpBuilder,
    io: I,
    (remote, tls): (std::net::SocketAddr, bool),
    handler: H,
    mut stop: watch::Receiver<bool>,
    options: &ServeOptions,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = IdleIo::new(io);
    let activity = io.activity();
    let requests = Requests::default();
    let (tunnels, mut upgraded) = tokio::sync::mpsc::unbounded_channel();
    let service = {
        let requests = requests.clone();
        // The connection's own, shared by its requests; dropped with the connection (and with it the last
        // sender of `tunnels` not handed over).
        let peer = Arc::new(Peer::new(remote, tls, Tunnels(tunnels)));
        service_fn(move |request: Request<Incoming>| {
            let handler = handler.clone();
            let open = requests.open();
            let peer = Arc::clone(&peer);
            async move {
                let response = handler.call(request, peer).await;
                drop(open);
                response
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
        tracing::debug!(listener = options.name, %remote, %error, "connection ended with an error");
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

/// Whether a connection moved a byte since its watchdog last looked, shared with the watchdog. A flag, so
/// that a read or a write costs one relaxed store and no clock read; the watchdog reads the clock instead.
#[derive(Clone)]
pub(crate) struct Activity(Arc<AtomicBool>);

impl Activity {
    fn new() -> Activity {
        Activity(Arc::new(AtomicBool::new(false)))
    }

    fn touch(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Resolves once no byte has moved for `limit`. It looks every quarter of `limit`, so it resolves
    /// between `limit` and `limit` and a quarter after the last byte moved, never earlier. One watchdog at a
    /// time per `Activity` (looking clears the flag).
    pub(crate) async fn idle_for(&self, limit: Duration) {
        let tick = (limit / 4).max(Duration::from_millis(1));
        let mut quiet_since = tokio::time::Instant::now();
        self.0.store(false, Ordering::Relaxed);
        loop {
            tokio::time::sleep(tick).await;
            let now = tokio::time::Instant::now();
            if self.0.swap(false, Ordering::Relaxed) {
                quiet_since = now;
            } else if now.duration_since(quiet_since) >= limit {
                return;
            }
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
