//! The development IdP: a real HTTP/1.1 OAuth 2.0 server for `obo-sidecar dev-idp`, `obo-sidecar demo` and
//! the test suite. **NOT FOR PRODUCTION**: it holds its signing keys in memory, trusts every registered client
//! secret sent in clear text, and mints a caller token for anyone who asks on `POST /dev/token`.
//!
//! It owns OpenID discovery (`/.well-known/openid-configuration`), the JWKS (`/jwks`, RS256, with key
//! rotation), the token endpoint (`/token`: `client_credentials`, Entra-style jwt-bearer On-Behalf-Of and
//! RFC 8693 token exchange, each checking the client's credential and the subject token's signature, `iss`,
//! `aud` and `exp`), and the development hooks tests use: minting caller tokens, signing arbitrary (hostile)
//! tokens, recording every token request, counting them, and failing the token endpoint on demand.
//!
//! **Multi-tenant mode** imitates Entra ID's per-tenant endpoints, so `{tenantid}` issuer and token-endpoint
//! templates can be tested: for any tenant id that is a GUID, `/{tenant}/v2.0/.well-known/openid-configuration`
//! serves a discovery document whose `issuer` is [`DevIdp::tenant_issuer`] and whose `token_endpoint`,
//! `/{tenant}/oauth2/v2.0/token`, issues tokens with that `iss` and `tid` = the tenant. All tenants share the
//! one JWKS, as Entra's tenants share signing keys. Tests can also take the JWKS and discovery offline
//! ([`DevIdp::jwks_unavailable`]), change the JWKS `Cache-Control` ([`DevIdp::set_jwks_max_age`]) and count
//! discovery and JWKS fetches.
//!
//! Clients authenticate with a secret (`client_secret_post`, `client_secret_basic`), with a `client_assertion`
//! signed by the key of their registered certificate (`private_key_jwt`, RFC 7523 §2.2), or with a federated
//! `client_assertion` that the IdP itself signed (standing in for a Kubernetes service-account token issuer,
//! as Azure workload identity uses).
//!
//! Tokens, client secrets and assertions are never logged.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

mod answers;
mod client_auth;
mod endpoints;
mod faults;
mod grants;
mod keys;
mod state;
#[cfg(test)]
mod tests;
mod types;

use keys::SigningKey;
use state::State;
use types::lock;
pub use types::{
    ClientAuth, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_JWKS_MAX_AGE, DEFAULT_TENANT_ID,
    DEFAULT_TOKEN_LIFETIME, DevClient, DevIdpConfig, FEDERATED_AUDIENCE, Failure,
    RecordedTokenRequest, TokenClaims,
};

/// A running development IdP. Dropping the handle stops the server and every connection it serves.
pub struct DevIdp {
    state: Arc<State>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl fmt::Debug for DevIdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevIdp")
            .field("issuer", &self.state.issuer)
            .finish_non_exhaustive()
    }
}

impl Drop for DevIdp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DevIdp {
    /// Serves the IdP on `listener` until the handle is dropped. The issuer is `http://{listener address}`,
    /// with an unspecified address (`0.0.0.0`, `::`) replaced by loopback.
    pub async fn start(listener: TcpListener, mut config: DevIdpConfig) -> std::io::Result<DevIdp> {
        let mut addr = listener.local_addr()?;
        if addr.ip().is_unspecified() {
            let loopback = match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            };
            addr.set_ip(loopback);
        }
        let key = tokio::task::spawn_blocking(SigningKey::generate)
            .await
            .map_err(std::io::Error::other)??;
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let issuer = format!("{scheme}://{addr}");
        tracing::warn!(
            %issuer,
            "development IdP started: NOT FOR PRODUCTION; it mints tokens for anyone who asks"
        );
        // The clients live behind a lock so `add_client` can register more; `config.clients` stays empty.
        let clients = std::mem::take(&mut config.clients)
            .into_iter()
            .map(Arc::new)
            .collect();
        let state = Arc::new(State {
            config,
            clients: RwLock::new(clients),
            issuer,
            keys: RwLock::new(vec![Arc::new(key)]),
            token_requests: AtomicU64::new(0),
            recorded: Mutex::new(Vec::new()),
            failures: Mutex::new(VecDeque::new()),
            jti_counter: AtomicU64::new(0),
            seen_client_assertions: Mutex::new(HashMap::new()),
            discovery_requests: AtomicU64::new(0),
            jwks_requests: AtomicU64::new(0),
            jwks_unavailable: AtomicBool::new(false),
            jwks_max_age: Mutex::new(Some(DEFAULT_JWKS_MAX_AGE)),
        });
        let task = {
            let state = Arc::clone(&state);
            crate::dev::serve::spawn_server(
                listener,
                "dev-idp",
                state.config.tls.clone(),
                move |request| {
                    let state = Arc::clone(&state);
                    async move { endpoints::route(&state, request).await }
                },
            )
        };
        Ok(DevIdp { state, addr, task })
    }

    /// The address the IdP listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, no trailing slash: the `iss` of every token the IdP signs.
    pub fn issuer(&self) -> String {
        self.state.issuer.clone()
    }

    /// The `token_endpoint`: issuer + `/token`.
    pub fn token_endpoint(&self) -> String {
        format!("{}/token", self.state.issuer)
    }

    /// The `jwks_uri`: issuer + `/jwks`.
    pub fn jwks_uri(&self) -> String {
        format!("{}/jwks", self.state.issuer)
    }

    /// The issuer of tenant `tenant_id`, as Entra ID names it: `{issuer}/{tenant_id}/v2.0`. Its discovery
    /// document is served when `tenant_id` is a GUID.
    pub fn tenant_issuer(&self, tenant_id: &str) -> String {
        self.state.tenant_issuer(tenant_id)
    }

    /// The token endpoint of tenant `tenant_id`: `{issuer}/{tenant_id}/oauth2/v2.0/token`, served when
    /// `tenant_id` is a GUID.
    pub fn tenant_token_endpoint(&self, tenant_id: &str) -> String {
        self.state.tenant_token_endpoint(tenant_id)
    }

    /// A caller token with these claims, signed with the current key.
    pub fn mint(&self, claims: &TokenClaims) -> String {
        self.state.mint(claims)
    }

    /// A caller token of tenant `tenant_id`: `claims` with `tid` = `tenant_id` and `iss` =
    /// [`tenant_issuer`](Self::tenant_issuer)`(tenant_id)` (set in `extra`; its other claims are kept).
    pub fn mint_for_tenant(&self, tenant_id: &str, claims: &TokenClaims) -> String {
        let mut claims = claims.clone();
        claims.tid = Some(tenant_id.to_owned());
        claims
            .extra
            .insert("iss".into(), json!(self.tenant_issuer(tenant_id)));
        self.state.mint(&claims)
    }

    /// The signature segments of the most recent tokens this IdP signed (caller tokens, issued tokens,
    /// anything from [`DevIdp::sign`]): tests search captured logs for them.
    pub fn signatures(&self) -> Vec<String> {
        let keys = self
            .state
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        keys.iter()
            .flat_map(|key| {
                key.signatures
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone()
            })
            .collect()
    }

    /// Signs `header` and `claims` exactly as given (an RS256 signature with the current key, whatever the
    /// header says): tests use it for hostile tokens (wrong `aud`, `alg` lies, no `exp`, ...).
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        self.state.current_key().sign_jwt(header, claims)
    }

    /// How many token requests (`POST /token` and `POST /{tenant}/oauth2/v2.0/token`) the IdP has served,
    /// whatever their outcome (injected failures too).
    pub fn token_requests(&self) -> u64 {
        self.state.token_requests.load(Ordering::SeqCst)
    }

    /// How many discovery documents were requested, root and tenants together, whatever the answer: a
    /// 503 while [`jwks_unavailable`](Self::jwks_unavailable), and a 404 for a tenant that is not a GUID,
    /// count too (a sidecar should not have asked). Tests use it to prove fetches stay bounded.
    pub fn discovery_requests(&self) -> u64 {
        self.state.discovery_requests.load(Ordering::SeqCst)
    }

    /// How many `GET /jwks` requests the IdP has answered, whatever the answer (a 503 counts too).
    pub fn jwks_requests(&self) -> u64 {
        self.state.jwks_requests.load(Ordering::SeqCst)
    }

    /// While `on`, `GET /jwks` and every discovery document (root and tenants) answer 503: a key-set
    /// outage, at start or later. The token endpoints are not affected.
    pub fn jwks_unavailable(&self, on: bool) {
        self.state.jwks_unavailable.store(on, Ordering::SeqCst);
    }

    /// The `Cache-Control: max-age=N` sent with `/jwks` from now on; `None` sends no `Cache-Control`.
    /// The default is [`DEFAULT_JWKS_MAX_AGE`].
    pub fn set_jwks_max_age(&self, seconds: Option<u64>) {
        *lock(&self.state.jwks_max_age) = seconds;
    }

    /// Every token request so far (root and tenant endpoints), oldest first.
    pub fn recorded_requests(&self) -> Vec<RecordedTokenRequest> {
        lock(&self.state.recorded).clone()
    }

    /// The next `count` `POST /token` requests get `failure` instead of a normal answer (after any failures
    /// already queued).
    pub fn fail_next(&self, failure: Failure, count: u32) {
        self.state.fail_next(failure, count);
    }

    /// Registers `client`, replacing any client with the same `client_id`: tests use it for a client whose
    /// certificate they generate after the IdP started.
    pub fn add_client(&self, client: DevClient) {
        let mut clients = self
            .state
            .clients
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        match clients
            .iter_mut()
            .find(|registered| registered.client_id == client.client_id)
        {
            Some(registered) => *registered = Arc::new(client),
            None => clients.push(Arc::new(client)),
        }
    }

    /// Stops publishing the oldest signing key (as after a key compromise), if there is more than one: tokens
    /// it signed no longer verify against the JWKS.
    pub fn retire_oldest_key(&self) {
        let mut keys = self
            .state
            .keys
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if keys.len() > 1 {
            keys.remove(0);
        }
    }

    /// Generates a new signing key, publishes it in the JWKS next to the old ones (tokens signed earlier
    /// stay valid), and signs with it from now on.
    pub fn rotate_key(&self) {
        match SigningKey::generate() {
            Ok(key) => {
                let mut keys = self
                    .state
                    .keys
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                keys.push(Arc::new(key));
            }
            Err(error) => {
                tracing::error!(%error, "dev IdP key rotation failed; keeping the current key");
            }
        }
    }
}
