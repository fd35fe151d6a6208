//! obo-sidecar: a reverse proxy that swaps a caller's bearer token for an upstream token.
//!
//! For each request (`proxy`):
//! 1. the normalized path picks a route (longest `path_prefix` at a segment boundary) — `route`;
//! 2. the caller's JWT is validated against its issuer's keys, and the route's policy applied — `auth`;
//! 3. the upstream token is taken from the cache or requested from the IdP (OBO, token exchange or client
//!    credentials) — `exchange`;
//! 4. the request is forwarded, streaming, with `Authorization` replaced — `forward`.
//!
//! [`start`] takes the config and bound listeners, so tests run the real server in-process; `sidecar`
//! holds the configuration generations and their reloads.

pub mod cli;
pub mod config;
#[cfg(feature = "dev")]
pub mod dev;

mod admin;
mod auth;
mod digest;
mod error;
mod exchange;
mod forward;
mod headers;
mod ids;
mod jwt;
mod oauth;
mod proxy;
mod route;
mod secret;
mod server;
mod sidecar;
mod telemetry;
mod tls;

pub use exchange::SharedCacheError;
pub use secret::Secret;
pub use sidecar::{CONFIG_POLL_INTERVAL, Listeners, Sidecar, StartError, run, start, watch_config};
/// OpenTelemetry traces: the layer `main` installs when the `OTEL_*` variables ask for it.
pub use telemetry::trace as traces;
pub use tls::{ServerTlsError, TlsError, install_crypto_provider};
