//! The proxy listener served the way nginx serves it: one thread per worker, each with its own
//! single-threaded runtime and its own listening socket on the same address (`SO_REUSEPORT`, so the kernel
//! spreads new connections over the workers). A connection, its requests, its upstream connections
//! ([`worker_index`] picks a route's client per worker) and the tasks they spawn stay on one thread: no
//! work stealing, no cross-thread wake-up per request.
//!
//! The workers share the connection limit (one semaphore) and the shutdown signal; each drains its own
//! accept queue and connections. Everything else of the sidecar (admin, key refresh, reloads) runs on the
//! main runtime.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, oneshot, watch};

use super::accept::serve_with;
use super::connection::Handler;
use super::options::ServeOptions;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The worker this thread is (0 outside the workers): what a per-worker resource is picked by.
pub(crate) fn worker_index() -> usize {
    WORKER.with(Cell::get)
}

/// The most workers `TOKIO_WORKER_THREADS` may ask for: each is a thread with its own runtime and its own
/// upstream clients for every route.
pub(crate) const MAX_WORKERS: usize = 256;

/// How many workers serve the proxy listener: `TOKIO_WORKER_THREADS` when it is set (the benchmarks pin
/// it), else one per CPU. A value that is not a number from 1 to [`MAX_WORKERS`] is an error, not a guess.
pub(crate) fn worker_count() -> Result<usize, String> {
    match std::env::var("TOKIO_WORKER_THREADS") {
        Ok(text) => text
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_WORKERS).contains(n))
            .ok_or_else(|| {
                format!(
                    "TOKIO_WORKER_THREADS={text:?} is not a number of proxy workers from 1 to {MAX_WORKERS}"
                )
            }),
        Err(_) => Ok(std::thread::available_parallelism().map_or(1, usize::from)),
    }
}

/// Binds the proxy listener at `addr` for the workers: first as a plain socket, so that an address another
/// process holds is refused as any bind refuses it (with `SO_REUSEPORT` alone a second sidecar would quietly
/// take part of the traffic), then shared ([`bind_shared`]) on the address that gave.
pub(crate) fn bind_proxy(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let probe = std::net::TcpListener::bind(addr)?;
    let bound = probe.local_addr()?;
    drop(probe);
    bind_shared(bound)
}

/// Binds a socket on `addr` that other workers' sockets can bind beside (`SO_REUSEPORT`).
pub(crate) fn bind_shared(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    #[cfg(unix)]
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The accept queue of each worker's socket (what `TcpListener::bind` uses too).
const LISTEN_BACKLOG: u32 = 1024;

/// A listening socket for one more worker: a socket of its own on `listener`'s address when `listener`
/// allows it (bound by [`bind_shared`]), else the same socket shared.
fn sibling(listener: &std::net::TcpListener) -> std::io::Result<std::net::TcpListener> {
    let own = listener
        .local_addr()
        .and_then(bind_shared)
        .and_then(TcpListener::into_std);
    match own {
        Ok(own) => Ok(own),
        Err(_) => listener.try_clone(),
    }
}

/// Serves `listener` on `workers` threads until `shutdown` turns true (or its sender is dropped), then
/// drains as [`super::serve`] does. Resolves when every worker has finished.
pub(crate) fn serve_workers<H: Handler>(
    listener: TcpListener,
    workers: usize,
    handler: &H,
    shutdown: &watch::Receiver<bool>,
    options: &ServeOptions,
) -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let first = listener.into_std()?;
    let mut sockets = Vec::with_capacity(workers);
    for _ in 1..workers.max(1) {
        sockets.push(sibling(&first)?);
    }
    sockets.insert(0, first);
    let permits = Arc::new(Semaphore::new(options.max_connections));
    let mut finished = Vec::with_capacity(sockets.len());
    for (index, socket) in sockets.into_iter().enumerate() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (done, finish) = oneshot::channel::<()>();
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        let options = options.clone();
        let permits = Arc::clone(&permits);
        std::thread::Builder::new()
            .name(format!("proxy-worker-{index}"))
            .spawn(move || {
                WORKER.with(|w| w.set(index));
                runtime.block_on(async move {
                    match TcpListener::from_std(socket) {
                        Ok(listener) => {
                            serve_with(listener, handler, shutdown, options, permits).await;
                        }
                        Err(error) => {
                            tracing::error!(worker = index, %error, "worker cannot listen");
                        }
                    }
                });
                // What the worker's connections spawned ends with its runtime.
                drop(runtime);
                let _ = done.send(());
            })?;
        finished.push(finish);
    }
    Ok(async move {
        for finish in finished {
            let _ = finish.await;
        }
    })
}
