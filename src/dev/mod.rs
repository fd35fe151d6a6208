//! Development tooling, behind the default-on cargo feature `dev` (SPEC §9): the development IdP, the echo
//! upstream and `obo-sidecar demo`. **Not for production**: the production build (`--no-default-features`)
//! carries none of it, and no token-minting code.

pub mod demo;
pub mod echo;
pub mod idp;
mod serve;

pub use echo::EchoUpstream;
pub use idp::{
    ClientAuth, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_JWKS_MAX_AGE, DEFAULT_TENANT_ID,
    DEFAULT_TOKEN_LIFETIME, DevClient, DevIdp, DevIdpConfig, FEDERATED_AUDIENCE, Failure,
    RecordedTokenRequest, TokenClaims,
};
