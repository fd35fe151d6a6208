//! A WebSocket tunnel: once both sides agreed to the upgrade, the caller's and the upstream's connections
//! are spliced, byte for byte, until either closes or neither moves a byte for `idle_timeout`.

use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::server::IdleIo;

/// The splice of `caller` and `upstream` once both have upgraded.
pub(super) async fn splice(
    caller: OnUpgrade,
    upstream: OnUpgrade,
    route: String,
    idle_timeout: Duration,
) {
    match tokio::try_join!(caller, upstream) {
        Ok((caller, upstream)) => {
            // The tunnel left hyper's connection: it gets its own idle timeout.
            let mut caller = IdleIo::new(TokioIo::new(caller));
            let activity = caller.activity();
            let mut upstream = TokioIo::new(upstream);
            tokio::select! {
                copied = tokio::io::copy_bidirectional(&mut caller, &mut upstream) => {
                    if let Err(error) = copied {
                        tracing::debug!(%route, %error, "upgraded connection ended");
                    }
                }
                () = activity.idle_for(idle_timeout) => {
                    tracing::debug!(%route, "upgraded connection idle: closed");
                }
            }
        }
        Err(error) => tracing::debug!(%route, %error, "upgrade failed"),
    }
}
