//! How a listener serves its connections, and where a request came from.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Listen;

use super::tls::TlsSource;

/// How a listener serves its connections.
#[derive(Clone)]
pub(crate) struct ServeOptions {
    pub(crate) name: &'static str,
    pub(crate) tls: Option<Arc<dyn TlsSource>>,
    pub(crate) max_connections: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_header_bytes: usize,
    pub(crate) drain_timeout: Duration,
}

impl ServeOptions {
    /// The options `[listen]` gives the proxy listener.
    pub(crate) fn proxy(listen: &Listen, tls: Option<Arc<dyn TlsSource>>) -> ServeOptions {
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
    pub(crate) fn admin(listen: &Listen) -> ServeOptions {
        ServeOptions {
            name: "admin",
            tls: None,
            max_connections: 256,
            ..ServeOptions::proxy(listen, None)
        }
    }

    /// A development server (the development IdP, the echo upstream): the proxy's defaults.
    #[cfg(feature = "dev")]
    pub(crate) fn development(name: &'static str, tls: Option<Arc<dyn TlsSource>>) -> ServeOptions {
        use crate::config::{
            DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
            DEFAULT_MAX_HEADER_BYTES,
        };
        ServeOptions {
            name,
            tls,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            drain_timeout: Duration::ZERO,
        }
    }
}

/// The hyper connection builder for a listener's options; without `keep_alive`, an HTTP/1.1 connection
/// serves one request and closes.
pub(crate) type HttpBuilder = Arc<hyper_util::server::conn::auto::Builder<TokioExecutor>>;

pub(crate) fn http_builder(options: &ServeOptions, keep_alive: bool) -> HttpBuilder {
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
