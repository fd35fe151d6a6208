//! The accept loop of the development servers: the sidecar's own.

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::server::{self, Peer, ServeOptions};

/// Serves a development server on `listener` with the sidecar's own accept loop, over TLS with `tls` when
/// given, until the returned task is aborted (which closes every connection).
pub(crate) fn spawn_server<H, Fut, B, E>(
    listener: TcpListener,
    name: &'static str,
    tls: Option<Arc<rustls::ServerConfig>>,
    handler: H,
) -> JoinHandle<()>
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tls = tls.map(|tls| Arc::new(tls) as Arc<dyn server::tls::TlsSource>);
    let options = ServeOptions::development(name, tls);
    tokio::spawn(async move {
        // Never signalled: the server stops when its task is aborted.
        let (_keep, stop) = tokio::sync::watch::channel(false);
        server::serve(
            listener,
            move |request, _peer: std::sync::Arc<Peer>| handler(request),
            stop,
            options,
        )
        .await;
    })
}
