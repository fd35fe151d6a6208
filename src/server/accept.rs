//! The accept loop of one listener (or of one worker's socket): a connection cap, TLS handshakes, and the
//! drain at shutdown (the accept queue served, then in-flight requests given `drain_timeout`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use super::connection::{Handler, drive};
use super::options::{HttpBuilder, ServeOptions, http_builder};

/// Serves `listener` with `handler` until `shutdown` turns true, then stops accepting and drains: open
/// connections finish their in-flight requests (up to `drain_timeout`) and are closed.
pub(crate) async fn serve<H: Handler>(
    listener: TcpListener,
    handler: H,
    shutdown: watch::Receiver<bool>,
    options: ServeOptions,
) {
    let permits = Arc::new(Semaphore::new(options.max_connections));
    serve_with(listener, handler, shutdown, options, permits).await;
}

/// [`serve`], its connections counted in `permits` (shared by the workers of one listener).
pub(super) async fn serve_with<H: Handler>(
    listener: TcpListener,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    options: ServeOptions,
    permits: Arc<Semaphore>,
) {
    let builder = http_builder(&options, true);
    let mut connections = JoinSet::new();
    // An accepted connection still waiting for a permit when the drain starts.
    let mut waiting = None;
    loop {
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
        // The permit is taken for a connection in hand, not before `accept`: the workers' sockets share one
        // count, and a worker waiting on an idle socket must not hold a permit that another worker's
        // connection needs. Beyond max_connections, one accepted connection per socket waits here for a
        // connection to close; the rest wait in the kernel's accept queue.
        let permit = loop {
            tokio::select! {
                permit = Arc::clone(&permits).acquire_owned() => break permit.ok(),
                _ = shutdown.wait_for(|stop| *stop) => break None,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        };
        let Some(permit) = permit else {
            waiting = Some((stream, remote));
            break;
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
    for (stream, remote) in waiting.into_iter().chain(queued(listener)) {
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

/// Serves one accepted connection: the TLS handshake if the listener has TLS, then HTTP.
async fn serve_one<H: Handler>(
    builder: &HttpBuilder,
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    handler: H,
    stop: watch::Receiver<bool>,
    options: &ServeOptions,
) {
    match &options.tls {
        None => {
            drive(builder, stream, (remote, false), handler, stop, options).await;
        }
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            match tokio::time::timeout(options.header_read_timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    drive(builder, stream, (remote, true), handler, stop, options).await;
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
