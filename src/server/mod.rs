//! Accept loops: HTTP/1.1 and HTTP/2 (h2c prior knowledge, or ALPN `h2` over TLS) on one listener, with
//! upgrades, optional TLS (mTLS), a cap on concurrent connections, header-size and header-read limits, an
//! idle timeout, and a graceful drain on shutdown ([`accept`]); the proxy listener served by workers
//! ([`workers`]).

mod accept;
mod connection;
mod options;
pub(crate) mod tls;
mod workers;

pub(crate) use accept::serve;
pub(crate) use connection::{IdleIo, Peer};
pub(crate) use options::ServeOptions;
pub(crate) use workers::{bind_proxy, serve_workers, worker_count, worker_index};
