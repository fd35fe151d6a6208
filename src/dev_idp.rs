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

use crate::exchange::is_guid;
use std::collections::{HashMap, VecDeque};
use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{self, KeyPair as _, RsaPublicKeyComponents};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls_pki_types::CertificateDer;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// The client id of the one client in [`DevIdpConfig::default`]: the sidecar's own name, so a demo needs no
/// configuration.
pub const DEFAULT_CLIENT_ID: &str = "obo-sidecar";

/// The client secret of the one client in [`DevIdpConfig::default`]; it says what it is so nobody mistakes it
/// for a real credential.
pub const DEFAULT_CLIENT_SECRET: &str = "dev-secret-not-for-production";

/// The lifetime of issued and minted tokens unless configured: one hour, what Entra ID issues by default.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// The `tid` claim unless configured: a fixed, obviously fake GUID so tokens are stable across runs.
pub const DEFAULT_TENANT_ID: &str = "72f988bf-0000-4000-8000-000000000001";

/// The `Cache-Control: max-age` sent with `/jwks` unless [`DevIdp::set_jwks_max_age`] changes it: five
/// minutes, the lower bound the sidecar honours, so a sidecar under test refreshes no sooner than it must.
pub const DEFAULT_JWKS_MAX_AGE: u64 = 300;

/// Request bodies larger than this are refused with 413: every legitimate request is a few kilobytes.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The `claims` challenge sent with an injected `interaction_required` when `/dev/fail` names none: an Entra
/// conditional-access step-up request.
const DEFAULT_CLAIMS_CHALLENGE: &str =
    r#"{"access_token":{"acrs":{"essential":true,"value":"c1"}}}"#;

/// The `aud` a federated client assertion must carry: the audience Entra ID requires of a Kubernetes projected
/// service-account token (Azure workload identity).
pub const FEDERATED_AUDIENCE: &str = "api://AzureADTokenExchange";

/// How far in the future a `private_key_jwt` assertion's `exp` may be: ten minutes, Entra's limit. It also
/// bounds how long a seen `jti` must be remembered (RFC 7523 §3, item 7).
const MAX_CLIENT_ASSERTION_LIFETIME: Duration = Duration::from_secs(600);

const GRANT_CLIENT_CREDENTIALS: &str = "client_credentials";
const GRANT_JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const CLIENT_ASSERTION_TYPE_JWT_BEARER: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const REDACTED: &str = "[redacted]";

/// What the development IdP serves: its registered clients, the lifetime of the tokens it issues and the
/// tenant id it stamps into them.
#[derive(Clone, Debug)]
pub struct DevIdpConfig {
    /// Confidential clients allowed on the token endpoint; [`DevIdp::add_client`] registers more later.
    pub clients: Vec<DevClient>,
    /// Lifetime of tokens issued by `POST /token` (`expires_in`).
    pub token_lifetime: Duration,
    /// The `tid` claim of every token, unless a caller token names its own or a tenant endpoint
    /// (`/{tenant}/oauth2/v2.0/token`) issues it.
    pub tenant_id: String,
    /// Serve HTTPS with this configuration (the issuer is then `https://…`); plain HTTP when `None`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for DevIdpConfig {
    fn default() -> Self {
        Self {
            clients: vec![DevClient::new(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET)],
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
            tenant_id: DEFAULT_TENANT_ID.to_owned(),
            tls: None,
        }
    }
}

/// A confidential client registered with the development IdP. Its API audience is `api://{client_id}`: a
/// subject token whose `aud` is `client_id` or `api://{client_id}` is accepted as an On-Behalf-Of assertion
/// (or RFC 8693 `subject_token`) from this client.
///
/// A client holds any mix of credentials: a secret, a certificate, a federated subject. Combine the
/// constructors with struct update syntax, e.g. `DevClient { certificate_der: Some(der), ..DevClient::new(id,
/// secret) }`.
#[derive(Clone, PartialEq, Eq)]
pub struct DevClient {
    /// The OAuth 2.0 `client_id`.
    pub client_id: String,
    /// The client secret, for `client_secret_post` or `client_secret_basic` (RFC 6749 §2.3.1); `None`: the
    /// client cannot authenticate with a secret.
    pub client_secret: Option<String>,
    /// The client's registered X.509 certificate (DER), for `private_key_jwt` (RFC 7523 §2.2, OpenID Connect
    /// Core §9): a `client_assertion` signed with its key (PS256 or RS256) authenticates the client.
    pub certificate_der: Option<Vec<u8>>,
    /// The `sub` of a federated `client_assertion` this client accepts: a JWT signed by the IdP's own keys
    /// with `aud` [`FEDERATED_AUDIENCE`], as Azure workload identity presents a Kubernetes service-account
    /// token (e.g. `system:serviceaccount:apps:api`).
    pub federated_subject: Option<String>,
}

impl DevClient {
    /// A client with this id and secret.
    pub fn new(client_id: impl Into<String>, client_secret: impl Into<String>) -> Self {
        Self {
            client_id: client_id.into(),
            client_secret: Some(client_secret.into()),
            certificate_der: None,
            federated_subject: None,
        }
    }

    /// A client that authenticates with `private_key_jwt` only, with this certificate (DER).
    pub fn with_certificate(
        client_id: impl Into<String>,
        certificate_der: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            client_id: client_id.into(),
            client_secret: None,
            certificate_der: Some(certificate_der.into()),
            federated_subject: None,
        }
    }

    /// A client that authenticates with a federated client assertion only, whose `sub` is `subject`.
    pub fn with_federated_subject(
        client_id: impl Into<String>,
        subject: impl Into<String>,
    ) -> Self {
        Self {
            client_id: client_id.into(),
            client_secret: None,
            certificate_der: None,
            federated_subject: Some(subject.into()),
        }
    }

    /// The client's API audience, `api://{client_id}`: the default `aud` of caller tokens minted for it.
    pub fn audience(&self) -> String {
        format!("api://{}", self.client_id)
    }

    fn accepts_audience(&self, aud: &str) -> bool {
        aud == self.client_id || aud.strip_prefix("api://") == Some(self.client_id.as_str())
    }
}

impl fmt::Debug for DevClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevClient")
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| REDACTED),
            )
            .field(
                "certificate_der",
                &self
                    .certificate_der
                    .as_ref()
                    .map(|der| format!("{} bytes", der.len())),
            )
            .field("federated_subject", &self.federated_subject)
            .finish()
    }
}

/// The claims of a caller token minted by [`DevIdp::mint`] or `POST /dev/token`.
///
/// A caller token of tenant `t` (for a `{tenantid}` issuer) has `tid: Some(t)` and `extra` =
/// `{"iss": idp.tenant_issuer(t)}`; [`DevIdp::mint_for_tenant`] mints exactly that.
#[derive(Clone, Debug, PartialEq)]
pub struct CallerClaims {
    /// The `sub` claim: who the caller is.
    pub sub: String,
    /// The `aud` claim; `None` means `api://{first client id}`, the sidecar's API.
    pub aud: Option<String>,
    /// Delegated scopes, space-separated (`scp`); omitted when `None`.
    pub scp: Option<String>,
    /// Application roles (`roles`); omitted when empty.
    pub roles: Vec<String>,
    /// The `tid` claim; `None` means the IdP's tenant.
    pub tid: Option<String>,
    /// The `oid` claim; `None` means a stable UUID-shaped value derived from `sub`.
    pub oid: Option<String>,
    /// `exp` − `iat`.
    pub lifetime: Duration,
    /// More claims, written last: they may override any claim above (e.g. an `exp` in the past).
    pub extra: Map<String, Value>,
}

impl Default for CallerClaims {
    fn default() -> Self {
        Self {
            sub: "dev-user".to_owned(),
            aud: None,
            scp: None,
            roles: Vec::new(),
            tid: None,
            oid: None,
            lifetime: DEFAULT_TOKEN_LIFETIME,
            extra: Map::new(),
        }
    }
}

impl CallerClaims {
    /// A user caller with this `sub` and every other claim at its default.
    pub fn user(sub: impl Into<String>) -> Self {
        Self {
            sub: sub.into(),
            ..Self::default()
        }
    }
}

/// A failure the token endpoint answers instead of a normal response (see [`DevIdp::fail_next`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// 500 with a small JSON body.
    ServerError,
    /// 429 with `Retry-After: {retry_after_secs}`.
    TooManyRequests {
        /// The `Retry-After` value, in seconds.
        retry_after_secs: u64,
    },
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// 400 `invalid_grant`, AADSTS50013 (assertion failed signature validation).
    InvalidGrant,
    /// 400 `interaction_required`, AADSTS50076, with this conditional-access `claims` challenge.
    InteractionRequired {
        /// The `claims` challenge string returned to the client.
        claims: String,
    },
    /// 400 `invalid_grant` with `suberror: consent_required`, AADSTS65001.
    ConsentRequired,
    /// 401 `invalid_client`, AADSTS7000215, whatever credential was sent.
    InvalidClient,
    /// 200 with an HTML body, as a captive portal or a misrouted proxy answers.
    NonJson200,
    /// 200 with an empty body.
    EmptyBody200,
    /// The normal answer, but with `"token_type": "N_A"` (a token the client must not use as a bearer token).
    NotBearer,
    /// The normal answer without `expires_in` (and `ext_expires_in`): the client must fall back on the JWT's
    /// own `exp`.
    ExpiresInAbsent,
    /// The normal answer with this JSON text as `expires_in` (e.g. `1e19`, `"3599"`, `-5`): what an IdP with
    /// a bug might send.
    ExpiresIn(String),
    /// Close the connection without answering.
    ResetConnection,
}

/// How the client of a token request presented its credential (RFC 6749 §2.3, RFC 7523 §2.2), as read from
/// the request: recorded whether or not the credential turned out valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_secret` in the form (`client_secret_post`).
    SecretPost,
    /// `Authorization: Basic` (`client_secret_basic`).
    SecretBasic,
    /// A `client_assertion` signed with the key of the client's certificate (`private_key_jwt`): its header
    /// has `x5t#S256`, its `iss` is the form's `client_id`, there is no `client_id` in the form, or it does not
    /// decode.
    PrivateKeyJwt,
    /// Any other `client_assertion`: a federated token (Kubernetes workload identity) presented with the
    /// form's `client_id`.
    FederatedAssertion,
}

/// One `POST /token` (or `POST /{tenant}/oauth2/v2.0/token`) request as the IdP received it.
#[derive(Clone, PartialEq, Eq)]
pub struct RecordedTokenRequest {
    /// The `grant_type` form field, if any.
    pub grant_type: Option<String>,
    /// Every form field in order, with `client_secret` and `client_assertion` values replaced by `[redacted]`.
    pub form: Vec<(String, String)>,
    /// Whether the request carried `Authorization: Basic` (`client_secret_basic`).
    pub basic_auth: bool,
    /// How the client presented its credential; `None` when it presented none (or the body was unreadable).
    pub client_auth: Option<ClientAuth>,
    /// The `alg` of the `client_assertion` header (e.g. `PS256`), when an assertion was sent and its header
    /// decodes.
    pub assertion_alg: Option<String>,
    /// The `client-request-id` header, if any.
    pub client_request_id: Option<String>,
    /// The tenant segment of the path for `POST /{tenant}/oauth2/v2.0/token`; `None` for `POST /token`.
    pub tenant: Option<String>,
}

impl RecordedTokenRequest {
    /// The first value of form field `name`.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(field, _)| field == name)
            .map(|(_, value)| value.as_str())
    }

    /// Every value of form field `name`, in order (RFC 8693 `audience` and `resource` may repeat).
    pub fn fields<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.form
            .iter()
            .filter(move |(field, _)| field == name)
            .map(|(_, value)| value.as_str())
    }
}

impl fmt::Debug for RecordedTokenRequest {
    /// Subject tokens are recorded verbatim for tests to compare, but never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let form: Vec<(&str, &str)> = self
            .form
            .iter()
            .map(|(name, value)| match name.as_str() {
                "assertion" | "subject_token" | "actor_token" => (name.as_str(), REDACTED),
                _ => (name.as_str(), value.as_str()),
            })
            .collect();
        f.debug_struct("RecordedTokenRequest")
            .field("grant_type", &self.grant_type)
            .field("form", &form)
            .field("basic_auth", &self.basic_auth)
            .field("client_auth", &self.client_auth)
            .field("assertion_alg", &self.assertion_alg)
            .field("client_request_id", &self.client_request_id)
            .field("tenant", &self.tenant)
            .finish()
    }
}

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
        let task = tokio::spawn(serve(listener, Arc::clone(&state)));
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
    pub fn mint(&self, claims: &CallerClaims) -> String {
        self.state.mint(claims)
    }

    /// A caller token of tenant `tenant_id`: `claims` with `tid` = `tenant_id` and `iss` =
    /// [`tenant_issuer`](Self::tenant_issuer)`(tenant_id)` (set in `extra`; its other claims are kept).
    pub fn mint_for_tenant(&self, tenant_id: &str, claims: &CallerClaims) -> String {
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// A stable UUID-shaped `oid` for a `sub`: the first 16 bytes of SHA-256 over it.
fn derive_oid(sub: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, sub.as_bytes());
    let mut hex = String::with_capacity(32);
    for byte in &digest.as_ref()[..16] {
        // Writing into a String cannot fail.
        let _ = write!(hex, "{byte:02x}");
    }
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// An RS256 signing key and its public half as published in the JWKS.
struct SigningKey {
    kid: String,
    key_pair: KeyPair,
    n: Vec<u8>,
    e: Vec<u8>,
    /// The signatures this key made, newest last, bounded: tests search logs for them.
    signatures: Mutex<VecDeque<String>>,
}

/// Signatures remembered per key for [`DevIdp::signatures`].
const REMEMBERED_SIGNATURES: usize = 20_000;

impl SigningKey {
    fn generate() -> std::io::Result<Self> {
        let key_pair = KeyPair::generate(KeySize::Rsa2048)
            .map_err(|_| std::io::Error::other("RSA key generation failed"))?;
        let n = key_pair
            .public_key()
            .modulus()
            .big_endian_without_leading_zero()
            .to_vec();
        let e = key_pair
            .public_key()
            .exponent()
            .big_endian_without_leading_zero()
            .to_vec();
        let thumbprint = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &n);
        let mut kid = URL_SAFE_NO_PAD.encode(thumbprint.as_ref());
        kid.truncate(16);
        Ok(Self {
            kid,
            key_pair,
            n,
            e,
            signatures: Mutex::new(VecDeque::new()),
        })
    }

    fn jwk(&self) -> Value {
        json!({
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "n": URL_SAFE_NO_PAD.encode(&self.n),
            "e": URL_SAFE_NO_PAD.encode(&self.e),
        })
    }

    fn sign_jwt(&self, header: &Value, claims: &Value) -> String {
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0; self.key_pair.public_modulus_len()];
        #[allow(clippy::expect_used)]
        // Invariant: PKCS#1 v1.5 signing with a valid 2048-bit key into a buffer of exactly
        // `public_modulus_len()` bytes fails only if aws-lc cannot allocate, which aborts anyway.
        self.key_pair
            .sign(
                &signature::RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                signing_input.as_bytes(),
                &mut signature,
            )
            .expect("RSA signing with a generated key cannot fail");
        let signature = URL_SAFE_NO_PAD.encode(&signature);
        let mut remembered = self
            .signatures
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if remembered.len() == REMEMBERED_SIGNATURES {
            remembered.pop_front();
        }
        remembered.push_back(signature.clone());
        drop(remembered);
        format!("{signing_input}.{signature}")
    }

    fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        RsaPublicKeyComponents {
            n: &self.n,
            e: &self.e,
        }
        .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, signature)
        .is_ok()
    }
}

/// Everything the server tasks and the handle share.
struct State {
    /// The configuration, its `clients` moved to `clients`.
    config: DevIdpConfig,
    clients: RwLock<Vec<Arc<DevClient>>>,
    issuer: String,
    /// Every published key; the last one signs.
    keys: RwLock<Vec<Arc<SigningKey>>>,
    token_requests: AtomicU64,
    recorded: Mutex<Vec<RecordedTokenRequest>>,
    failures: Mutex<VecDeque<(Failure, u32)>>,
    jti_counter: AtomicU64,
    /// The `jti` of every accepted `private_key_jwt` assertion, keyed by `(client_id, jti)`, with its `exp`:
    /// an entry is dropped once its assertion has expired, since an expired assertion is refused anyway.
    seen_client_assertions: Mutex<HashMap<(String, String), f64>>,
    /// `GET` requests on any discovery path, root or tenant, whatever the answer.
    discovery_requests: AtomicU64,
    /// `GET /jwks` requests, whatever the answer.
    jwks_requests: AtomicU64,
    /// While set, `/jwks` and every discovery document answer 503.
    jwks_unavailable: AtomicBool,
    /// The `max-age` of `/jwks`; `None`: no `Cache-Control`.
    jwks_max_age: Mutex<Option<u64>>,
}

impl State {
    fn current_key(&self) -> Arc<SigningKey> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        // Invariant: `start` publishes one key and keys are only ever added, so `last` is always `Some`.
        #[allow(clippy::expect_used)]
        Arc::clone(keys.last().expect("the key set is never empty"))
    }

    fn published_keys(&self) -> Vec<Arc<SigningKey>> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn fail_next(&self, failure: Failure, count: u32) {
        if count > 0 {
            lock(&self.failures).push_back((failure, count));
        }
    }

    fn take_failure(&self) -> Option<Failure> {
        let mut failures = lock(&self.failures);
        let (failure, remaining) = failures.front_mut()?;
        let failure = failure.clone();
        *remaining -= 1;
        if *remaining == 0 {
            failures.pop_front();
        }
        Some(failure)
    }

    fn default_audience(&self) -> String {
        self.clients
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .first()
            .map_or_else(
                || format!("api://{DEFAULT_CLIENT_ID}"),
                |client| client.audience(),
            )
    }

    fn client(&self, client_id: &str) -> Option<Arc<DevClient>> {
        self.clients
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|client| client.client_id == client_id)
            .cloned()
    }

    fn token_endpoint(&self) -> String {
        format!("{}/token", self.issuer)
    }

    fn tenant_issuer(&self, tenant_id: &str) -> String {
        format!("{}/{tenant_id}/v2.0", self.issuer)
    }

    fn tenant_token_endpoint(&self, tenant_id: &str) -> String {
        format!("{}/{tenant_id}/oauth2/v2.0/token", self.issuer)
    }

    /// The root authority, `POST /token`.
    fn root(&self) -> Authority {
        Authority {
            issuer: self.issuer.clone(),
            token_endpoint: self.token_endpoint(),
            tenant: None,
        }
    }

    /// The authority of one tenant, `POST /{tenant_id}/oauth2/v2.0/token`.
    fn tenant(&self, tenant_id: &str) -> Authority {
        Authority {
            issuer: self.tenant_issuer(tenant_id),
            token_endpoint: self.tenant_token_endpoint(tenant_id),
            tenant: Some(tenant_id.to_owned()),
        }
    }

    /// Whether `iss` is the root issuer or the issuer of a tenant whose id is a GUID.
    fn is_own_issuer(&self, iss: &str) -> bool {
        iss == self.issuer
            || iss
                .strip_prefix(self.issuer.as_str())
                .and_then(|rest| rest.strip_prefix('/'))
                .and_then(|rest| rest.strip_suffix("/v2.0"))
                .is_some_and(is_guid)
    }

    fn jti(&self) -> String {
        let serial = self.jti_counter.fetch_add(1, Ordering::Relaxed);
        derive_oid(&format!("{}#{serial}#{}", self.issuer, now_secs()))
    }

    /// Signs `claims` with the current key after adding `iss` = `issuer`, `iat`, `nbf`, `exp`, `ver` and
    /// `jti`, then `extra` (which may override any of them).
    fn issue(
        &self,
        issuer: &str,
        mut claims: Map<String, Value>,
        lifetime: Duration,
        extra: &Map<String, Value>,
    ) -> String {
        let now = now_secs();
        claims.insert("iss".into(), json!(issuer));
        claims.insert("iat".into(), json!(now));
        claims.insert("nbf".into(), json!(now));
        claims.insert("exp".into(), json!(now.saturating_add(lifetime.as_secs())));
        claims.insert("ver".into(), json!("2.0"));
        claims.insert("jti".into(), json!(self.jti()));
        for (name, value) in extra {
            claims.insert(name.clone(), value.clone());
        }
        let key = self.current_key();
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": key.kid});
        key.sign_jwt(&header, &Value::Object(claims))
    }

    fn mint(&self, caller: &CallerClaims) -> String {
        let mut claims = Map::new();
        claims.insert(
            "aud".into(),
            json!(
                caller
                    .aud
                    .clone()
                    .unwrap_or_else(|| self.default_audience())
            ),
        );
        claims.insert("sub".into(), json!(caller.sub));
        claims.insert(
            "oid".into(),
            json!(
                caller
                    .oid
                    .clone()
                    .unwrap_or_else(|| derive_oid(&caller.sub))
            ),
        );
        claims.insert(
            "tid".into(),
            json!(caller.tid.as_deref().unwrap_or(&self.config.tenant_id)),
        );
        if let Some(scp) = &caller.scp {
            claims.insert("scp".into(), json!(scp));
        }
        if !caller.roles.is_empty() {
            claims.insert("roles".into(), json!(caller.roles));
        }
        self.issue(&self.issuer, claims, caller.lifetime, &caller.extra)
    }

    /// The discovery document of `authority`: its own `issuer` and `token_endpoint`, the shared `jwks_uri`.
    fn discovery(&self, authority: &Authority) -> Value {
        json!({
            "issuer": authority.issuer,
            "jwks_uri": format!("{}/jwks", self.issuer),
            "token_endpoint": authority.token_endpoint,
            "authorization_endpoint": format!("{}/authorize", self.issuer),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "grant_types_supported": [GRANT_CLIENT_CREDENTIALS, GRANT_JWT_BEARER, GRANT_TOKEN_EXCHANGE],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic", "private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["PS256", "RS256"],
        })
    }

    fn jwks(&self) -> Value {
        let keys: Vec<Value> = self.published_keys().iter().map(|key| key.jwk()).collect();
        json!({ "keys": keys })
    }
}

/// Which issuer a token request or discovery document speaks for: the root one, or one tenant's (Entra's
/// `/{tenant}/v2.0`), whose tokens carry its `iss` and `tid`.
struct Authority {
    issuer: String,
    token_endpoint: String,
    tenant: Option<String>,
}

type Body = Full<Bytes>;

async fn serve(listener: TcpListener, state: Arc<State>) {
    // Dropping the set (when the handle aborts this task) aborts every connection task.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let state = Arc::clone(&state);
                    connections.spawn(async move {
                        let tls = state.config.tls.clone();
                        let service = service_fn(move |request| {
                            let state = Arc::clone(&state);
                            async move { route(&state, request).await }
                        });
                        let mut builder = http1::Builder::new();
                        builder.timer(TokioTimer::new()).keep_alive(true);
                        let served = match tls {
                            None => builder.serve_connection(TokioIo::new(stream), service).await,
                            Some(tls) => match tokio_rustls::TlsAcceptor::from(tls).accept(stream).await {
                                Ok(stream) => builder.serve_connection(TokioIo::new(stream), service).await,
                                Err(error) => {
                                    tracing::debug!(%peer, %error, "dev IdP TLS handshake failed");
                                    return;
                                }
                            },
                        };
                        if let Err(error) = served {
                            tracing::debug!(%peer, %error, "dev IdP connection failed");
                        }
                    });
                }
                Err(error) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(%error, "dev IdP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Returned by the service to make hyper close the connection without answering
/// ([`Failure::ResetConnection`]).
#[derive(Debug)]
struct ConnectionReset;

impl fmt::Display for ConnectionReset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("injected failure: connection closed without an answer")
    }
}

impl std::error::Error for ConnectionReset {}

async fn route(
    state: &State,
    request: Request<Incoming>,
) -> Result<Response<Body>, ConnectionReset> {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    if let Some((tenant, endpoint)) = tenant_path(&path) {
        let authority = is_guid(tenant).then(|| state.tenant(tenant));
        return match (endpoint, method, authority) {
            (TenantPath::Discovery, Method::GET, authority) => {
                Ok(discovery_response(state, authority.as_ref()))
            }
            (TenantPath::Token, Method::POST, Some(authority)) => {
                token(state, request, &authority).await
            }
            (_, _, None) => Ok(unknown_tenant()),
            (_, _, Some(_)) => Ok(method_not_allowed()),
        };
    }
    let response = match (path.as_str(), method) {
        ("/.well-known/openid-configuration", Method::GET) => {
            discovery_response(state, Some(&state.root()))
        }
        ("/jwks", Method::GET) => jwks_response(state),
        ("/token", Method::POST) => return token(state, request, &state.root()).await,
        ("/dev/token", Method::POST) => dev_token(state, request).await,
        ("/dev/fail", Method::POST) => dev_fail(state, request).await,
        ("/dev/stats", Method::GET) => json_response(
            StatusCode::OK,
            &json!({
                "token_requests": state.token_requests.load(Ordering::SeqCst),
                "discovery_requests": state.discovery_requests.load(Ordering::SeqCst),
                "jwks_requests": state.jwks_requests.load(Ordering::SeqCst),
            }),
        ),
        (
            "/.well-known/openid-configuration"
            | "/jwks"
            | "/token"
            | "/dev/token"
            | "/dev/fail"
            | "/dev/stats",
            _,
        ) => method_not_allowed(),
        _ => error_response(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
    };
    Ok(response)
}

/// An endpoint Entra ID serves per tenant, under `/{tenant}/`.
#[derive(Clone, Copy, Debug)]
enum TenantPath {
    /// `/{tenant}/v2.0/.well-known/openid-configuration`
    Discovery,
    /// `/{tenant}/oauth2/v2.0/token`
    Token,
}

/// The tenant segment and endpoint of a per-tenant path; the tenant may still be no GUID.
fn tenant_path(path: &str) -> Option<(&str, TenantPath)> {
    let (tenant, rest) = path.strip_prefix('/')?.split_once('/')?;
    match rest {
        "v2.0/.well-known/openid-configuration" => Some((tenant, TenantPath::Discovery)),
        "oauth2/v2.0/token" => Some((tenant, TenantPath::Token)),
        _ => None,
    }
}

/// The discovery document of `authority` (OpenID Connect Discovery §4); `None`: a tenant that is not a
/// GUID, 404. Counted either way.
fn discovery_response(state: &State, authority: Option<&Authority>) -> Response<Body> {
    state.discovery_requests.fetch_add(1, Ordering::SeqCst);
    let Some(authority) = authority else {
        return unknown_tenant();
    };
    if state.jwks_unavailable.load(Ordering::SeqCst) {
        return key_set_outage();
    }
    json_response(StatusCode::OK, &state.discovery(authority))
}

/// The JWKS (RFC 7517 §5) with the configured `Cache-Control: max-age`.
fn jwks_response(state: &State) -> Response<Body> {
    state.jwks_requests.fetch_add(1, Ordering::SeqCst);
    if state.jwks_unavailable.load(Ordering::SeqCst) {
        return key_set_outage();
    }
    let mut response = json_response(StatusCode::OK, &state.jwks());
    let max_age = *lock(&state.jwks_max_age);
    if let Some(value) =
        max_age.and_then(|max_age| HeaderValue::try_from(format!("max-age={max_age}")).ok())
    {
        response.headers_mut().insert(header::CACHE_CONTROL, value);
    }
    response
}

fn key_set_outage() -> Response<Body> {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
        "injected outage: the key set and discovery documents are unavailable",
    )
}

fn unknown_tenant() -> Response<Body> {
    error_response(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such tenant: a tenant id is a GUID",
    )
}

fn method_not_allowed() -> Response<Body> {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this method is not allowed on this path",
    )
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn error_response(status: StatusCode, error: &str, description: &str) -> Response<Body> {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

/// Reads a whole request body of at most [`MAX_BODY_BYTES`].
async fn read_body(headers: &HeaderMap, body: Incoming) -> Result<Bytes, Response<Body>> {
    let too_large = || {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            "the request body is larger than 1 MiB",
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(_) => Err(error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the request body could not be read",
        )),
    }
}

/// An OAuth 2.0 error answer (RFC 6749 §5.2), with Entra's `error_codes` where one applies.
#[derive(Debug)]
struct OAuthError {
    status: StatusCode,
    body: Map<String, Value>,
    basic_challenge: bool,
}

impl OAuthError {
    fn new(status: StatusCode, error: &str, description: impl Into<String>) -> Self {
        let mut body = Map::new();
        body.insert("error".into(), json!(error));
        body.insert("error_description".into(), json!(description.into()));
        Self {
            status,
            body,
            basic_challenge: false,
        }
    }

    fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    fn invalid_scope(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_scope", description)
    }

    fn invalid_client(description: impl Into<String>, basic_challenge: bool) -> Self {
        Self {
            basic_challenge,
            ..Self::new(StatusCode::UNAUTHORIZED, "invalid_client", description)
        }
    }

    fn with(mut self, name: &str, value: Value) -> Self {
        self.body.insert(name.into(), value);
        self
    }

    fn into_response(self) -> Response<Body> {
        let mut response = json_response(self.status, &Value::Object(self.body));
        if self.basic_challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Basic realm="dev-idp""#),
            );
        }
        response
    }
}

/// What an injected [`Failure`] does to one token request.
enum Injection {
    /// Answer this instead.
    Answer(Response<Body>),
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// Answer normally, then rewrite a successful answer.
    Reshape(Reshape),
    /// Close the connection without answering.
    Reset,
}

/// A rewrite of a successful token answer.
#[derive(Clone, Debug)]
enum Reshape {
    NotBearer,
    NoExpiresIn,
    /// `expires_in` set to this JSON text (a string when it does not parse as JSON).
    ExpiresIn(String),
}

impl Reshape {
    fn apply(self, body: &mut Value) {
        let Some(object) = body.as_object_mut() else {
            return;
        };
        match self {
            Reshape::NotBearer => {
                object.insert("token_type".into(), json!("N_A"));
            }
            Reshape::NoExpiresIn => {
                object.remove("expires_in");
                object.remove("ext_expires_in");
            }
            Reshape::ExpiresIn(text) => {
                let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
                object.insert("expires_in".into(), value);
            }
        }
    }
}

fn injection(failure: Failure) -> Injection {
    let answer = match failure {
        Failure::Delay(delay) => return Injection::Delay(delay),
        Failure::NotBearer => return Injection::Reshape(Reshape::NotBearer),
        Failure::ExpiresInAbsent => return Injection::Reshape(Reshape::NoExpiresIn),
        Failure::ExpiresIn(text) => return Injection::Reshape(Reshape::ExpiresIn(text)),
        Failure::ResetConnection => return Injection::Reset,
        Failure::ServerError => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "injected failure: the dev IdP is pretending to be down",
        ),
        Failure::TooManyRequests { retry_after_secs } => {
            let mut response = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "temporarily_unavailable",
                "injected failure: too many requests",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            response
        }
        Failure::InvalidGrant => OAuthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "AADSTS50013: Assertion failed signature validation.",
        )
        .with("error_codes", json!([50013]))
        .into_response(),
        Failure::InteractionRequired { claims } => OAuthError::new(
            StatusCode::BAD_REQUEST,
            "interaction_required",
            "AADSTS50076: Due to a configuration change made by your administrator, or because you \
             moved to a new location, you must use multi-factor authentication to access the resource.",
        )
        .with("error_codes", json!([50076]))
        .with("suberror", json!("basic_action"))
        .with("claims", json!(claims))
        .into_response(),
        Failure::ConsentRequired => OAuthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "AADSTS65001: The user or administrator has not consented to use the application.",
        )
        .with("error_codes", json!([65001]))
        .with("suberror", json!("consent_required"))
        .into_response(),
        Failure::InvalidClient => {
            OAuthError::invalid_client("AADSTS7000215: Invalid client secret provided.", false)
                .with("error_codes", json!([7_000_215]))
                .into_response()
        }
        Failure::NonJson200 => {
            let mut response = Response::new(Full::new(Bytes::from_static(
                b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head>\
                  <body><p>Injected failure: not a token response.</p></body></html>\n",
            )));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            response
        }
        Failure::EmptyBody200 => {
            let mut response = Response::new(Full::new(Bytes::new()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
    };
    Injection::Answer(answer)
}

/// The credential of an `Authorization: Basic` header, if one was sent.
enum BasicCredential {
    Absent,
    Malformed,
    Present { client_id: String, secret: String },
}

/// Parses `Authorization: Basic base64(urlencode(id) ":" urlencode(secret))` (RFC 6749 §2.3.1).
fn basic_credential(headers: &HeaderMap) -> BasicCredential {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return BasicCredential::Absent;
    };
    let Some((scheme, encoded)) = value.to_str().ok().and_then(|v| v.trim().split_once(' ')) else {
        return BasicCredential::Absent;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return BasicCredential::Absent;
    }
    let decoded = STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok());
    let Some((id, secret)) = decoded.as_deref().and_then(|text| text.split_once(':')) else {
        return BasicCredential::Malformed;
    };
    let form_decode = |part: &str| {
        percent_encoding::percent_decode_str(&part.replace('+', " "))
            .decode_utf8()
            .ok()
            .map(std::borrow::Cow::into_owned)
    };
    match (form_decode(id), form_decode(secret)) {
        (Some(client_id), Some(secret)) => BasicCredential::Present { client_id, secret },
        _ => BasicCredential::Malformed,
    }
}

/// A parsed `application/x-www-form-urlencoded` token request.
struct Form(Vec<(String, String)>);

impl Form {
    /// A parameter that may appear at most once (RFC 6749 §3.2); an empty value counts as absent (§3.1).
    fn single<'a>(&'a self, name: &str) -> Result<Option<&'a str>, OAuthError> {
        let mut values = self
            .0
            .iter()
            .filter(|(field, value)| field == name && !value.is_empty())
            .map(|(_, value)| value.as_str());
        let first = values.next();
        if values.next().is_some() {
            return Err(OAuthError::invalid_request(format!(
                "parameter '{name}' is repeated"
            )));
        }
        Ok(first)
    }

    fn required<'a>(&'a self, name: &str) -> Result<&'a str, OAuthError> {
        self.single(name)?.ok_or_else(|| {
            OAuthError::invalid_request(format!("missing required parameter '{name}'"))
        })
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(field, value)| field == name && !value.is_empty())
            .map(|(_, value)| value.as_str())
    }
}

/// `POST /token` and `POST /{tenant}/oauth2/v2.0/token`: the same checks, the tokens issued for `authority`.
async fn token(
    state: &State,
    request: Request<Incoming>,
    authority: &Authority,
) -> Result<Response<Body>, ConnectionReset> {
    state.token_requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = request.into_parts();
    let client_request_id = parts
        .headers
        .get("client-request-id")
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    let basic = basic_credential(&parts.headers);
    let has_basic = !matches!(basic, BasicCredential::Absent);
    let bytes = match read_body(&parts.headers, body).await {
        Ok(bytes) => bytes,
        Err(response) => {
            lock(&state.recorded).push(RecordedTokenRequest {
                grant_type: None,
                form: Vec::new(),
                basic_auth: has_basic,
                client_auth: has_basic.then_some(ClientAuth::SecretBasic),
                assertion_alg: None,
                client_request_id,
                tenant: authority.tenant.clone(),
            });
            return Ok(response);
        }
    };
    let form = Form(url::form_urlencoded::parse(&bytes).into_owned().collect());
    let (client_auth, assertion_alg) = presented_client_auth(&form, has_basic);
    lock(&state.recorded).push(RecordedTokenRequest {
        grant_type: form.all("grant_type").next().map(str::to_owned),
        form: form
            .0
            .iter()
            .map(|(name, value)| {
                let value = match name.as_str() {
                    "client_secret" | "client_assertion" => REDACTED.to_owned(),
                    _ => value.clone(),
                };
                (name.clone(), value)
            })
            .collect(),
        basic_auth: has_basic,
        client_auth,
        assertion_alg,
        client_request_id,
        tenant: authority.tenant.clone(),
    });

    let mut reshape = None;
    if let Some(failure) = state.take_failure() {
        tracing::debug!(?failure, "dev IdP token endpoint injecting a failure");
        match injection(failure) {
            Injection::Answer(response) => return Ok(response),
            Injection::Delay(delay) => tokio::time::sleep(delay).await,
            Injection::Reshape(how) => reshape = Some(how),
            Injection::Reset => return Err(ConnectionReset),
        }
    }

    let is_form = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value.split(';').next().is_some_and(|mime| {
                mime.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    let outcome = if is_form {
        grant(state, authority, &form, basic)
    } else {
        Err(OAuthError::invalid_request(
            "the token request must be application/x-www-form-urlencoded",
        ))
    };
    let response = match outcome {
        Ok(mut body) => {
            if let Some(how) = reshape {
                how.apply(&mut body);
            }
            let mut response = json_response(StatusCode::OK, &body);
            let headers = response.headers_mut();
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
            response
        }
        Err(error) => {
            tracing::debug!(status = %error.status, error = ?error.body.get("error"), "dev IdP refused a token request");
            error.into_response()
        }
    };
    Ok(response)
}

fn grant(
    state: &State,
    authority: &Authority,
    form: &Form,
    basic: BasicCredential,
) -> Result<Value, OAuthError> {
    let grant_type = form.required("grant_type")?;
    let client = authenticate_client(state, authority, form, basic)?;
    match grant_type {
        GRANT_CLIENT_CREDENTIALS => client_credentials(state, authority, form, &client),
        GRANT_JWT_BEARER => on_behalf_of(state, authority, form, &client),
        GRANT_TOKEN_EXCHANGE => token_exchange(state, authority, form, &client),
        _ => Err(OAuthError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "AADSTS70003: The app requested an unsupported grant type.",
        )
        .with("error_codes", json!([70003]))),
    }
}

/// How a request presents its client credential, and its `client_assertion`'s `alg`, read from its syntax
/// alone (for [`RecordedTokenRequest`]); [`authenticate_client`] decides whether the credential is valid.
fn presented_client_auth(form: &Form, has_basic: bool) -> (Option<ClientAuth>, Option<String>) {
    if let Some(assertion) = form.all("client_assertion").next() {
        let form_client_id = form.all("client_id").next();
        return match Jws::parse(assertion) {
            Some(jws) => (
                Some(assertion_kind(&jws, form_client_id)),
                jws.header
                    .get("alg")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            ),
            None => (Some(ClientAuth::PrivateKeyJwt), None),
        };
    }
    if has_basic {
        (Some(ClientAuth::SecretBasic), None)
    } else if form.all("client_secret").next().is_some() {
        (Some(ClientAuth::SecretPost), None)
    } else {
        (None, None)
    }
}

/// Which kind of `client_assertion` this is: `private_key_jwt` when its header names a certificate
/// (`x5t#S256`) or its `iss` is the client (RFC 7523 §3: `iss` and `sub` are the `client_id`, which may then be
/// left out of the form); otherwise a federated token presented for the form's `client_id`.
fn assertion_kind(jws: &Jws<'_>, form_client_id: Option<&str>) -> ClientAuth {
    let iss = jws.claims.get("iss").and_then(Value::as_str);
    let names_client = form_client_id.is_none_or(|client_id| iss == Some(client_id));
    if jws.header.contains_key("x5t#S256") || names_client {
        ClientAuth::PrivateKeyJwt
    } else {
        ClientAuth::FederatedAssertion
    }
}

/// One client authentication method per request (RFC 6749 §2.3): `client_secret_post`,
/// `client_secret_basic`, or a `client_assertion` (RFC 7521 §4.2).
fn authenticate_client(
    state: &State,
    authority: &Authority,
    form: &Form,
    basic: BasicCredential,
) -> Result<Arc<DevClient>, OAuthError> {
    let form_id = form.single("client_id")?;
    let form_secret = form.single("client_secret")?;
    if let Some(assertion) = form.single("client_assertion")? {
        if form_secret.is_some() || !matches!(basic, BasicCredential::Absent) {
            return Err(OAuthError::invalid_request(
                "more than one client authentication method was used",
            ));
        }
        if form.single("client_assertion_type")? != Some(CLIENT_ASSERTION_TYPE_JWT_BEARER) {
            return Err(OAuthError::invalid_request(format!(
                "AADSTS50027: client_assertion_type must be '{CLIENT_ASSERTION_TYPE_JWT_BEARER}'."
            )));
        }
        return state
            .authenticate_assertion(authority, assertion, form_id)
            .map_err(AssertionRejection::into_error);
    }
    let (client_id, secret, used_basic) = match basic {
        BasicCredential::Malformed => {
            return Err(OAuthError::invalid_client(
                "malformed Authorization: Basic header",
                true,
            ));
        }
        BasicCredential::Present { client_id, secret } => {
            if form_secret.is_some() {
                return Err(OAuthError::invalid_request(
                    "more than one client authentication method was used",
                ));
            }
            if form_id.is_some_and(|id| id != client_id) {
                return Err(OAuthError::invalid_client(
                    "client_id in the form differs from the Authorization header",
                    true,
                ));
            }
            (client_id, secret, true)
        }
        BasicCredential::Absent => match (form_id, form_secret) {
            (Some(id), Some(secret)) => (id.to_owned(), secret.to_owned(), false),
            _ => {
                return Err(OAuthError::invalid_client(
                    "AADSTS7000216: 'client_assertion', 'client_secret' or 'request' is required \
                     for the grant type.",
                    false,
                )
                .with("error_codes", json!([7_000_216])));
            }
        },
    };
    state
        .client(&client_id)
        .filter(|client| {
            client.client_secret.as_ref().is_some_and(|registered| {
                aws_lc_rs::constant_time::verify_slices_are_equal(
                    registered.as_bytes(),
                    secret.as_bytes(),
                )
                .is_ok()
            })
        })
        .ok_or_else(|| {
            OAuthError::invalid_client("AADSTS7000215: Invalid client secret provided.", used_basic)
                .with("error_codes", json!([7_000_215]))
        })
}

/// Why a `client_assertion` was refused: always 401 `invalid_client` (RFC 7521 §4.2.1). The assertion itself
/// is never quoted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AssertionRejection {
    Malformed,
    CriticalHeader,
    Algorithm,
    UnknownClient,
    NoCertificate,
    Thumbprint,
    Signature,
    NotTheClient,
    Audience,
    Expired,
    TooLong,
    NotYetValid,
    MissingJti,
    Replayed,
    NoFederatedCredential,
    FederatedAudience,
    FederatedSubject,
}

impl AssertionRejection {
    fn code_and_description(self) -> (u32, &'static str) {
        match self {
            AssertionRejection::Malformed => (
                50027,
                "AADSTS50027: The client assertion is not a well-formed JWT.",
            ),
            AssertionRejection::CriticalHeader => (
                700_027,
                "AADSTS700027: Client assertion failed signature validation. [Reason - the header has \
                 a 'crit' parameter.]",
            ),
            AssertionRejection::Algorithm => (
                700_027,
                "AADSTS700027: Client assertion failed signature validation. [Reason - alg must be \
                 PS256 or RS256 with a certificate, RS256 for a federated assertion.]",
            ),
            AssertionRejection::UnknownClient => (
                700_016,
                "AADSTS700016: The application named by the client assertion was not found.",
            ),
            AssertionRejection::NoCertificate => (
                700_027,
                "AADSTS700027: Client assertion contains an invalid signature. [Reason - no \
                 certificate is registered for the client.]",
            ),
            AssertionRejection::Thumbprint => (
                700_027,
                "AADSTS700027: Client assertion contains an invalid signature. [Reason - x5t#S256 does \
                 not match the registered certificate.]",
            ),
            AssertionRejection::Signature => (
                700_027,
                "AADSTS700027: Client assertion contains an invalid signature.",
            ),
            AssertionRejection::NotTheClient => (
                700_021,
                "AADSTS700021: Client assertion application identifier doesn't match 'client_id' \
                 parameter. [Reason - iss and sub must both be the client_id.]",
            ),
            AssertionRejection::Audience => (
                700_027,
                "AADSTS700027: Client assertion failed validation. [Reason - aud must be the token \
                 endpoint or the issuer.]",
            ),
            AssertionRejection::Expired => (
                700_024,
                "AADSTS700024: Client assertion is not within its valid time range. [Reason - the \
                 assertion is expired or has no numeric exp.]",
            ),
            AssertionRejection::TooLong => (
                700_024,
                "AADSTS700024: Client assertion is not within its valid time range. [Reason - exp is \
                 more than 10 minutes ahead.]",
            ),
            AssertionRejection::NotYetValid => (
                700_024,
                "AADSTS700024: Client assertion is not within its valid time range. [Reason - the \
                 assertion is not yet valid.]",
            ),
            AssertionRejection::MissingJti => (
                700_027,
                "AADSTS700027: Client assertion failed validation. [Reason - jti is missing.]",
            ),
            AssertionRejection::Replayed => (
                700_027,
                "AADSTS700027: Client assertion failed validation: jti replayed.",
            ),
            AssertionRejection::NoFederatedCredential => (
                70_021,
                "AADSTS70021: No matching federated identity record found for presented assertion.",
            ),
            AssertionRejection::FederatedAudience => (
                700_212,
                "AADSTS700212: No matching federated identity record found for presented assertion \
                 audience.",
            ),
            AssertionRejection::FederatedSubject => (
                700_213,
                "AADSTS700213: No matching federated identity record found for presented assertion \
                 subject.",
            ),
        }
    }

    fn into_error(self) -> OAuthError {
        let (code, description) = self.code_and_description();
        OAuthError::invalid_client(description, false).with("error_codes", json!([code]))
    }
}

/// A compact JWS (RFC 7515 §7.1) split and decoded; its signature is not yet checked.
struct Jws<'a> {
    header: Map<String, Value>,
    claims: Map<String, Value>,
    /// `header.payload`, the signing input (RFC 7515 §5.2).
    signing_input: &'a str,
    signature: Vec<u8>,
}

impl<'a> Jws<'a> {
    /// `None` unless `token` is exactly three base64url segments, the first two JSON objects.
    fn parse(token: &'a str) -> Option<Self> {
        let mut segments = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return None;
        };
        Some(Self {
            header: decode_json_segment(header)?,
            claims: decode_json_segment(payload)?,
            signing_input: &token[..header.len() + 1 + payload.len()],
            signature: URL_SAFE_NO_PAD.decode(signature).ok()?,
        })
    }

    fn alg(&self) -> Option<&str> {
        self.header.get("alg").and_then(Value::as_str)
    }

    fn claim(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(Value::as_str)
    }

    /// Whether `aud` is `audience` or an array holding one of `audiences`.
    fn audience_is_one_of(&self, audiences: &[&str]) -> bool {
        match self.claims.get("aud") {
            Some(Value::String(aud)) => audiences.contains(&aud.as_str()),
            Some(Value::Array(auds)) => auds
                .iter()
                .filter_map(Value::as_str)
                .any(|aud| audiences.contains(&aud)),
            _ => false,
        }
    }
}

#[allow(clippy::cast_precision_loss)]
// Seconds since 1970 stay far below 2^52, where f64 is exact.
fn now_f64() -> f64 {
    now_secs() as f64
}

impl State {
    fn authenticate_assertion(
        &self,
        authority: &Authority,
        assertion: &str,
        form_client_id: Option<&str>,
    ) -> Result<Arc<DevClient>, AssertionRejection> {
        let jws = Jws::parse(assertion).ok_or(AssertionRejection::Malformed)?;
        if jws.header.contains_key("crit") {
            return Err(AssertionRejection::CriticalHeader);
        }
        match assertion_kind(&jws, form_client_id) {
            ClientAuth::PrivateKeyJwt => {
                self.verify_private_key_jwt(authority, &jws, form_client_id)
            }
            ClientAuth::FederatedAssertion | ClientAuth::SecretPost | ClientAuth::SecretBasic => {
                self.verify_federated_assertion(&jws, form_client_id)
            }
        }
    }

    /// RFC 7523 §3 with OpenID Connect Core §9: signed (PS256 or RS256) by the key of the client's registered
    /// certificate, `iss` = `sub` = `client_id`, `aud` the token endpoint or the issuer of `authority` (a
    /// tenant's own, on a tenant's endpoint), an `exp` at most [`MAX_CLIENT_ASSERTION_LIFETIME`] ahead, and a
    /// `jti` never seen before for this client.
    fn verify_private_key_jwt(
        &self,
        authority: &Authority,
        jws: &Jws<'_>,
        form_client_id: Option<&str>,
    ) -> Result<Arc<DevClient>, AssertionRejection> {
        let algorithm = match jws.alg() {
            Some("PS256") => webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
            Some("RS256") => webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA256,
            _ => return Err(AssertionRejection::Algorithm),
        };
        let iss = jws.claim("iss").ok_or(AssertionRejection::NotTheClient)?;
        if form_client_id.is_some_and(|client_id| client_id != iss) {
            return Err(AssertionRejection::NotTheClient);
        }
        let client = self.client(iss).ok_or(AssertionRejection::UnknownClient)?;
        let certificate = client
            .certificate_der
            .as_deref()
            .ok_or(AssertionRejection::NoCertificate)?;
        if let Some(thumbprint) = jws.header.get("x5t#S256") {
            let expected = URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA256,
                certificate,
            ));
            if thumbprint.as_str() != Some(expected.as_str()) {
                return Err(AssertionRejection::Thumbprint);
            }
        }
        let certificate = CertificateDer::from(certificate);
        let end_entity = webpki::EndEntityCert::try_from(&certificate)
            .map_err(|_| AssertionRejection::NoCertificate)?;
        end_entity
            .verify_signature(algorithm, jws.signing_input.as_bytes(), &jws.signature)
            .map_err(|_| AssertionRejection::Signature)?;
        if jws.claim("sub") != Some(iss) {
            return Err(AssertionRejection::NotTheClient);
        }
        if !jws.audience_is_one_of(&[&authority.token_endpoint, &authority.issuer]) {
            return Err(AssertionRejection::Audience);
        }
        let now = now_f64();
        let exp = jws
            .claims
            .get("exp")
            .and_then(Value::as_f64)
            .ok_or(AssertionRejection::Expired)?;
        if exp <= now {
            return Err(AssertionRejection::Expired);
        }
        #[allow(clippy::cast_precision_loss)]
        // A constant of ten minutes.
        if exp > now + MAX_CLIENT_ASSERTION_LIFETIME.as_secs() as f64 {
            return Err(AssertionRejection::TooLong);
        }
        if jws
            .claims
            .get("nbf")
            .is_some_and(|nbf| nbf.as_f64().is_none_or(|nbf| nbf > now))
        {
            return Err(AssertionRejection::NotYetValid);
        }
        let jti = jws
            .claim("jti")
            .filter(|jti| !jti.is_empty())
            .ok_or(AssertionRejection::MissingJti)?;
        let mut seen = lock(&self.seen_client_assertions);
        seen.retain(|_, seen_exp| *seen_exp > now);
        if seen
            .insert((client.client_id.clone(), jti.to_owned()), exp)
            .is_some()
        {
            return Err(AssertionRejection::Replayed);
        }
        Ok(client)
    }

    /// A federated credential (Azure workload identity): a JWT signed (RS256) by one of the IdP's own
    /// published keys, with `aud` [`FEDERATED_AUDIENCE`], `sub` the client's `federated_subject`, and an `exp`
    /// in the future. Its `iss` is not checked: the signature is what makes the IdP trust it. Such a token is
    /// presented many times until it is rotated, so its `jti` is not remembered.
    fn verify_federated_assertion(
        &self,
        jws: &Jws<'_>,
        form_client_id: Option<&str>,
    ) -> Result<Arc<DevClient>, AssertionRejection> {
        let client = form_client_id
            .and_then(|client_id| self.client(client_id))
            .ok_or(AssertionRejection::UnknownClient)?;
        let subject = client
            .federated_subject
            .as_deref()
            .ok_or(AssertionRejection::NoFederatedCredential)?;
        if jws.alg() != Some("RS256") {
            return Err(AssertionRejection::Algorithm);
        }
        if !self.verify_own_signature(jws) {
            return Err(AssertionRejection::Signature);
        }
        let now = now_f64();
        if jws
            .claims
            .get("exp")
            .and_then(Value::as_f64)
            .is_none_or(|exp| exp <= now)
        {
            return Err(AssertionRejection::Expired);
        }
        if jws
            .claims
            .get("nbf")
            .is_some_and(|nbf| nbf.as_f64().is_none_or(|nbf| nbf > now))
        {
            return Err(AssertionRejection::NotYetValid);
        }
        if !jws.audience_is_one_of(&[FEDERATED_AUDIENCE]) {
            return Err(AssertionRejection::FederatedAudience);
        }
        if jws.claim("sub") != Some(subject) {
            return Err(AssertionRejection::FederatedSubject);
        }
        Ok(client)
    }

    /// Whether one of the published keys (the one named by `kid`, if any) signed `jws` with RS256.
    fn verify_own_signature(&self, jws: &Jws<'_>) -> bool {
        let kid = jws.header.get("kid").and_then(Value::as_str);
        self.published_keys()
            .iter()
            .filter(|key| kid.is_none_or(|kid| kid == key.kid))
            .any(|key| key.verify(jws.signing_input.as_bytes(), &jws.signature))
    }
}

/// The claims the `claims` request parameter (OpenID Connect Core §5.5) adds to the issued token: as Entra
/// does for Continuous Access Evaluation, the client capabilities in `access_token.xms_cc.values` become the
/// `xms_cc` claim.
fn requested_claims(form: &Form) -> Result<Map<String, Value>, OAuthError> {
    let mut extra = Map::new();
    let Some(claims) = form.single("claims")? else {
        return Ok(extra);
    };
    let Ok(Value::Object(claims)) = serde_json::from_str::<Value>(claims) else {
        return Err(OAuthError::invalid_request(
            "AADSTS90014: The claims parameter must be a JSON object.",
        ));
    };
    if let Some(xms_cc) = claims
        .get("access_token")
        .and_then(|access_token| access_token.get("xms_cc"))
    {
        let values = xms_cc
            .get("values")
            .and_then(Value::as_array)
            .filter(|values| values.iter().all(Value::is_string))
            .ok_or_else(|| {
                OAuthError::invalid_request(
                    "AADSTS90014: claims access_token.xms_cc.values must be an array of strings.",
                )
            })?;
        extra.insert("xms_cc".into(), Value::Array(values.clone()));
    }
    Ok(extra)
}

fn token_response(state: &State, access_token: &str, scope: Option<String>) -> Value {
    let lifetime = state.config.token_lifetime.as_secs();
    let mut body = json!({
        "token_type": "Bearer",
        "access_token": access_token,
        "expires_in": lifetime,
        "ext_expires_in": lifetime,
    });
    if let (Some(scope), Some(object)) = (scope, body.as_object_mut()) {
        object.insert("scope".into(), json!(scope));
    }
    body
}

fn client_credentials(
    state: &State,
    authority: &Authority,
    form: &Form,
    client: &DevClient,
) -> Result<Value, OAuthError> {
    let scope = form.required("scope")?;
    let scopes: Vec<&str> = scope.split_whitespace().collect();
    let resource = match scopes.as_slice() {
        [only] => only
            .strip_suffix("/.default")
            .filter(|resource| !resource.is_empty()),
        _ => None,
    };
    let extra = requested_claims(form)?;
    let Some(resource) = resource else {
        return Err(OAuthError::invalid_scope(
            "AADSTS1002012: The provided value for scope is not valid. Client credential flows \
             must have a scope value with /.default suffixed to the resource identifier.",
        )
        .with("error_codes", json!([1_002_012])));
    };
    let mut claims = Map::new();
    claims.insert("aud".into(), json!(resource));
    claims.insert("sub".into(), json!(client.client_id));
    claims.insert("oid".into(), json!(client.client_id));
    claims.insert(
        "tid".into(),
        json!(
            authority
                .tenant
                .as_deref()
                .unwrap_or(&state.config.tenant_id)
        ),
    );
    claims.insert("azp".into(), json!(client.client_id));
    claims.insert("idtyp".into(), json!("app"));
    let access_token = state.issue(
        &authority.issuer,
        claims,
        state.config.token_lifetime,
        &extra,
    );
    tracing::debug!(client_id = %client.client_id, %resource, "dev IdP issued a client_credentials token");
    Ok(token_response(state, &access_token, None))
}

/// Scopes of one resource: `<resource>/<name>` each, split at the last `/`.
struct ResourceScopes {
    resource: String,
    /// The `scp` claim: the scope names, `.default` standing for `user_impersonation`.
    scp: String,
    /// The granted scopes, fully qualified, for the response's `scope`.
    granted: String,
}

fn resource_scopes(scope: &str) -> Result<ResourceScopes, OAuthError> {
    let invalid = || {
        OAuthError::invalid_scope(
            "AADSTS70011: The provided value for the input parameter 'scope' is not valid: every \
             scope must be '<resource>/<name>' for one resource.",
        )
        .with("error_codes", json!([70011]))
    };
    let mut resource: Option<&str> = None;
    let mut names = Vec::new();
    for item in scope.split_whitespace() {
        let (item_resource, name) = item.rsplit_once('/').ok_or_else(invalid)?;
        if item_resource.is_empty() || name.is_empty() || item_resource.ends_with('/') {
            return Err(invalid());
        }
        match resource {
            Some(seen) if seen != item_resource => return Err(invalid()),
            _ => resource = Some(item_resource),
        }
        names.push(if name == ".default" {
            "user_impersonation"
        } else {
            name
        });
    }
    let resource = resource.ok_or_else(invalid)?;
    if names.len() > 1
        && scope
            .split_whitespace()
            .any(|item| item.ends_with("/.default"))
    {
        return Err(invalid());
    }
    let granted = names
        .iter()
        .map(|name| format!("{resource}/{name}"))
        .collect::<Vec<_>>()
        .join(" ");
    Ok(ResourceScopes {
        resource: resource.to_owned(),
        scp: names.join(" "),
        granted,
    })
}

/// Why a subject token (OBO `assertion` or RFC 8693 `subject_token`) was refused. The token itself is never
/// quoted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rejection {
    Malformed,
    Algorithm,
    Signature,
    Issuer,
    Expired,
    NotYetValid,
    Audience,
}

impl Rejection {
    fn code_and_description(self) -> (u32, &'static str) {
        match self {
            Rejection::Malformed => (50027, "AADSTS50027: JWT token is invalid or malformed."),
            Rejection::Algorithm => (
                50013,
                "AADSTS50013: Assertion failed signature validation. [Reason - only RS256 is accepted.]",
            ),
            Rejection::Signature => (50013, "AADSTS50013: Assertion failed signature validation."),
            Rejection::Issuer => (
                50013,
                "AADSTS50013: Assertion failed signature validation. [Reason - the issuer is not trusted.]",
            ),
            Rejection::Expired => (
                500_133,
                "AADSTS500133: Assertion is not within its valid time range. [Reason - the assertion is expired.]",
            ),
            Rejection::NotYetValid => (
                500_133,
                "AADSTS500133: Assertion is not within its valid time range. [Reason - the assertion is not yet valid.]",
            ),
            Rejection::Audience => (
                50013,
                "AADSTS50013: Assertion audience does not match the Client app presenting the assertion.",
            ),
        }
    }

    fn into_error(self, error: &str) -> OAuthError {
        let (code, description) = self.code_and_description();
        OAuthError::new(StatusCode::BAD_REQUEST, error, description)
            .with("error_codes", json!([code]))
    }
}

fn decode_json_segment(segment: &str) -> Option<Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(segment).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

fn numeric_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, Rejection> {
    match claims.get(name) {
        None => Ok(None),
        Some(value) => value.as_f64().map(Some).ok_or(Rejection::Malformed),
    }
}

impl State {
    /// Verifies a subject token this IdP signed: RS256 with a published key, `iss` the root issuer or any
    /// tenant's (whichever endpoint it is presented at), `exp`, `nbf`, and an `aud` naming `client`. Returns
    /// its claims.
    fn verify_subject_token(
        &self,
        token: &str,
        client: &DevClient,
    ) -> Result<Map<String, Value>, Rejection> {
        let jws = Jws::parse(token).ok_or(Rejection::Malformed)?;
        if jws.alg() != Some("RS256") {
            return Err(Rejection::Algorithm);
        }
        if !self.verify_own_signature(&jws) {
            return Err(Rejection::Signature);
        }
        let claims = jws.claims;
        if !claims
            .get("iss")
            .and_then(Value::as_str)
            .is_some_and(|iss| self.is_own_issuer(iss))
        {
            return Err(Rejection::Issuer);
        }
        let now = now_f64();
        let exp = numeric_claim(&claims, "exp")?.ok_or(Rejection::Malformed)?;
        if exp <= now {
            return Err(Rejection::Expired);
        }
        if numeric_claim(&claims, "nbf")?.is_some_and(|nbf| nbf > now) {
            return Err(Rejection::NotYetValid);
        }
        let audience_matches = match claims.get("aud") {
            Some(Value::String(aud)) => client.accepts_audience(aud),
            Some(Value::Array(auds)) => auds
                .iter()
                .filter_map(Value::as_str)
                .any(|aud| client.accepts_audience(aud)),
            _ => false,
        };
        if !audience_matches {
            return Err(Rejection::Audience);
        }
        if !claims.get("sub").is_some_and(Value::is_string) {
            return Err(Rejection::Malformed);
        }
        Ok(claims)
    }

    /// A delegated token from `authority` for `audience` (a string, or an array of several) carrying the
    /// subject's `sub`/`oid`/`tid` (and display claims; a tenant's endpoint stamps its own `tid`), then
    /// `extra`.
    fn issue_delegated(
        &self,
        authority: &Authority,
        subject: &Map<String, Value>,
        audience: Value,
        scp: Option<&str>,
        client: &DevClient,
        extra: &Map<String, Value>,
    ) -> String {
        let mut claims = Map::new();
        claims.insert("aud".into(), audience);
        let sub = subject
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or_default();
        claims.insert("sub".into(), json!(sub));
        claims.insert(
            "oid".into(),
            subject
                .get("oid")
                .cloned()
                .unwrap_or_else(|| json!(derive_oid(sub))),
        );
        let tid = match &authority.tenant {
            Some(tenant) => json!(tenant),
            None => subject
                .get("tid")
                .cloned()
                .unwrap_or_else(|| json!(self.config.tenant_id)),
        };
        claims.insert("tid".into(), tid);
        for name in ["name", "preferred_username"] {
            if let Some(value) = subject.get(name) {
                claims.insert(name.into(), value.clone());
            }
        }
        if let Some(scp) = scp {
            claims.insert("scp".into(), json!(scp));
        }
        claims.insert("azp".into(), json!(client.client_id));
        self.issue(&authority.issuer, claims, self.config.token_lifetime, extra)
    }
}

/// Entra's On-Behalf-Of flow: `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer`,
/// `requested_token_use=on_behalf_of`, the caller's token as `assertion`, and the upstream `scope`.
fn on_behalf_of(
    state: &State,
    authority: &Authority,
    form: &Form,
    client: &DevClient,
) -> Result<Value, OAuthError> {
    let requested_token_use = form.required("requested_token_use")?;
    if requested_token_use != "on_behalf_of" {
        return Err(OAuthError::invalid_request(
            "AADSTS70003: requested_token_use must be 'on_behalf_of'.",
        ));
    }
    let assertion = form.required("assertion")?;
    let scopes = resource_scopes(form.required("scope")?)?;
    let extra = requested_claims(form)?;
    let subject = state
        .verify_subject_token(assertion, client)
        .map_err(|rejection| rejection.into_error("invalid_grant"))?;
    let access_token = state.issue_delegated(
        authority,
        &subject,
        json!(scopes.resource),
        Some(&scopes.scp),
        client,
        &extra,
    );
    tracing::debug!(client_id = %client.client_id, resource = %scopes.resource, "dev IdP issued an on-behalf-of token");
    Ok(token_response(state, &access_token, Some(scopes.granted)))
}

/// RFC 8693 token exchange. An invalid `subject_token` is `invalid_request` (RFC 8693 §2.2.2). The token's
/// `aud` is every `audience` (or, without one, every `resource`): a string for one, an array for several.
fn token_exchange(
    state: &State,
    authority: &Authority,
    form: &Form,
    client: &DevClient,
) -> Result<Value, OAuthError> {
    let subject_token = form.required("subject_token")?;
    let subject_token_type = form.required("subject_token_type")?;
    if subject_token_type != TOKEN_TYPE_ACCESS_TOKEN {
        return Err(OAuthError::invalid_request(format!(
            "subject_token_type must be '{TOKEN_TYPE_ACCESS_TOKEN}'"
        )));
    }
    if form.single("actor_token")?.is_some() {
        return Err(OAuthError::invalid_request(
            "actor_token (delegation) is not supported by the dev IdP",
        ));
    }
    let issued_token_type = match form.single("requested_token_type")? {
        None => TOKEN_TYPE_ACCESS_TOKEN,
        Some(requested @ (TOKEN_TYPE_ACCESS_TOKEN | TOKEN_TYPE_JWT)) => requested,
        Some(_) => {
            return Err(OAuthError::invalid_request(format!(
                "requested_token_type must be '{TOKEN_TYPE_ACCESS_TOKEN}' or '{TOKEN_TYPE_JWT}'"
            )));
        }
    };
    let extra = requested_claims(form)?;
    let scope = form.single("scope")?;
    let mut audiences: Vec<&str> = form.all("audience").collect();
    if audiences.is_empty() {
        audiences = form.all("resource").collect();
    }
    let audience = match audiences.as_slice() {
        [] => None,
        [only] => Some(json!(only)),
        several => Some(json!(several)),
    };
    let (audience, scp) = match (audience, scope) {
        (Some(audience), scope) => {
            let scp = scope.map(|scope| {
                scope
                    .split_whitespace()
                    .map(|item| match item.rsplit_once('/') {
                        Some((_, ".default")) => "user_impersonation",
                        Some((_, name)) if !name.is_empty() => name,
                        _ => item,
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            });
            (audience, scp)
        }
        (None, Some(scope)) => {
            let scopes = resource_scopes(scope)?;
            (json!(scopes.resource), Some(scopes.scp))
        }
        (None, None) => {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_target",
                "one of audience, resource or scope is required",
            ));
        }
    };
    let subject = state
        .verify_subject_token(subject_token, client)
        .map_err(|rejection| rejection.into_error("invalid_request"))?;
    tracing::debug!(client_id = %client.client_id, %audience, "dev IdP issuing a token-exchange token");
    let access_token = state.issue_delegated(
        authority,
        &subject,
        audience,
        scp.as_deref(),
        client,
        &extra,
    );
    let mut body = token_response(state, &access_token, scope.map(str::to_owned));
    if let Some(object) = body.as_object_mut() {
        object.insert("issued_token_type".into(), json!(issued_token_type));
    }
    Ok(body)
}

/// The body of `POST /dev/token`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenRequest {
    sub: String,
    #[serde(default)]
    aud: Option<String>,
    #[serde(default)]
    scp: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    tid: Option<String>,
    #[serde(default)]
    oid: Option<String>,
    #[serde(default)]
    lifetime_secs: Option<u64>,
}

async fn dev_token(state: &State, request: Request<Incoming>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let bytes = match read_body(&parts.headers, body).await {
        Ok(bytes) => bytes,
        Err(response) => return response,
    };
    let body: DevTokenRequest = match serde_json::from_slice(&bytes) {
        Ok(body) => body,
        Err(error) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("expected a JSON object with at least 'sub': {error}"),
            );
        }
    };
    let lifetime = body
        .lifetime_secs
        .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
    let claims = CallerClaims {
        sub: body.sub,
        aud: body.aud,
        scp: body.scp,
        roles: body.roles,
        tid: body.tid,
        oid: body.oid,
        lifetime,
        extra: Map::new(),
    };
    let access_token = state.mint(&claims);
    let wants_text = parts
        .headers
        .get_all(header::ACCEPT)
        .iter()
        .any(|value| String::from_utf8_lossy(value.as_bytes()).contains("text/plain"));
    if wants_text {
        let mut response = Response::new(Full::new(Bytes::from(access_token)));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        return response;
    }
    json_response(
        StatusCode::OK,
        &json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": lifetime.as_secs(),
        }),
    )
}

/// The body of `POST /dev/fail`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevFailRequest {
    mode: String,
    #[serde(default = "one")]
    count: u32,
    #[serde(default)]
    delay_ms: Option<u64>,
    #[serde(default)]
    retry_after: Option<u64>,
    #[serde(default)]
    claims: Option<String>,
}

fn one() -> u32 {
    1
}

async fn dev_fail(state: &State, request: Request<Incoming>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let bytes = match read_body(&parts.headers, body).await {
        Ok(bytes) => bytes,
        Err(response) => return response,
    };
    let body: DevFailRequest = match serde_json::from_slice(&bytes) {
        Ok(body) => body,
        Err(error) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("expected a JSON object with 'mode': {error}"),
            );
        }
    };
    let failure = match body.mode.as_str() {
        "500" => Failure::ServerError,
        "429" => Failure::TooManyRequests {
            retry_after_secs: body.retry_after.unwrap_or(1),
        },
        "delay" => match body.delay_ms {
            Some(delay_ms) => Failure::Delay(Duration::from_millis(delay_ms)),
            None => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "mode 'delay' needs 'delay_ms'",
                );
            }
        },
        "invalid_grant" => Failure::InvalidGrant,
        "interaction_required" => Failure::InteractionRequired {
            claims: body
                .claims
                .unwrap_or_else(|| DEFAULT_CLAIMS_CHALLENGE.to_owned()),
        },
        "consent_required" => Failure::ConsentRequired,
        "invalid_client" => Failure::InvalidClient,
        "non_json_200" => Failure::NonJson200,
        "empty_body_200" => Failure::EmptyBody200,
        "not_bearer" => Failure::NotBearer,
        "expires_in_absent" => Failure::ExpiresInAbsent,
        "reset_connection" => Failure::ResetConnection,
        _ => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "mode must be one of 500, 429, delay, invalid_grant, interaction_required, \
                 consent_required, invalid_client, non_json_200, empty_body_200, not_bearer, \
                 expires_in_absent, reset_connection",
            );
        }
    };
    state.fail_next(failure, body.count);
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};

    const OBO_SCOPE: &str = "api://downstream/read api://downstream/write";

    async fn idp_with(config: DevIdpConfig) -> DevIdp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        DevIdp::start(listener, config).await.unwrap()
    }

    async fn idp() -> DevIdp {
        idp_with(DevIdpConfig::default()).await
    }

    fn client() -> reqwest::Client {
        reqwest::Client::new()
    }

    /// Verifies `token` against the published JWKS with jsonwebtoken, as the sidecar would.
    async fn verify(idp: &DevIdp, token: &str, audience: &str) -> Value {
        verify_as(idp, token, audience, &idp.issuer()).await
    }

    /// [`verify`], expecting `iss` = `issuer`.
    async fn verify_as(idp: &DevIdp, token: &str, audience: &str, issuer: &str) -> Value {
        let jwks: Value = client()
            .get(idp.jwks_uri())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let header = jsonwebtoken::decode_header(token).unwrap();
        let kid = header.kid.unwrap();
        let jwk = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|key| key["kid"] == kid.as_str())
            .unwrap();
        let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
        let e = URL_SAFE_NO_PAD.decode(jwk["e"].as_str().unwrap()).unwrap();
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_audience(&[audience]);
        validation.set_issuer(&[issuer]);
        jsonwebtoken::decode::<Value>(
            token,
            &DecodingKey::from_rsa_raw_components(&n, &e),
            &validation,
        )
        .unwrap()
        .claims
    }

    async fn post_form(idp: &DevIdp, form: &[(&str, &str)]) -> (StatusCode, Value) {
        let response = client()
            .post(idp.token_endpoint())
            .form(form)
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    fn obo_form<'a>(assertion: &'a str, scope: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![
            ("grant_type", GRANT_JWT_BEARER),
            ("client_id", DEFAULT_CLIENT_ID),
            ("client_secret", DEFAULT_CLIENT_SECRET),
            ("assertion", assertion),
            ("scope", scope),
            ("requested_token_use", "on_behalf_of"),
        ]
    }

    /// A client certificate (self-signed, RSA 2048) and its key, generated at run time.
    struct ClientKey {
        certificate_der: Vec<u8>,
        key_pair: KeyPair,
    }

    impl ClientKey {
        fn generate() -> Self {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
            let certificate = rcgen::CertificateParams::new(vec!["obo-sidecar client".into()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            Self {
                certificate_der: certificate.der().to_vec(),
                key_pair: KeyPair::from_pkcs8(&key.serialize_der()).unwrap(),
            }
        }

        /// `x5t#S256`: base64url(SHA-256(certificate DER)).
        fn thumbprint(&self) -> String {
            URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA256,
                &self.certificate_der,
            ))
        }

        /// Signs with PS256 when the header says so, else RS256.
        fn sign(&self, header: &Value, claims: &Value) -> String {
            let encoding: &'static dyn signature::RsaEncoding = if header["alg"] == "PS256" {
                &signature::RSA_PSS_SHA256
            } else {
                &signature::RSA_PKCS1_SHA256
            };
            let signing_input = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            );
            let mut signature = vec![0; self.key_pair.public_modulus_len()];
            self.key_pair
                .sign(
                    encoding,
                    &aws_lc_rs::rand::SystemRandom::new(),
                    signing_input.as_bytes(),
                    &mut signature,
                )
                .unwrap();
            format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(&signature))
        }
    }

    /// RSA key generation is slow in a debug build: two keys serve every test.
    static CLIENT_KEY: std::sync::LazyLock<ClientKey> =
        std::sync::LazyLock::new(ClientKey::generate);
    static OTHER_KEY: std::sync::LazyLock<ClientKey> =
        std::sync::LazyLock::new(ClientKey::generate);

    const CERT_CLIENT: &str = "cert-client";
    const FEDERATED_CLIENT: &str = "wi-client";
    const FEDERATED_SUBJECT: &str = "system:serviceaccount:apps:api";
    const CAE_CLAIMS: &str = r#"{"access_token":{"xms_cc":{"values":["cp1"]}}}"#;

    /// An IdP that also knows [`CERT_CLIENT`] (certificate [`CLIENT_KEY`]) and [`FEDERATED_CLIENT`].
    async fn idp_with_assertion_clients() -> DevIdp {
        let idp = idp().await;
        let certificate_der = tokio::task::spawn_blocking(|| CLIENT_KEY.certificate_der.clone())
            .await
            .unwrap();
        idp.add_client(DevClient::with_certificate(CERT_CLIENT, certificate_der));
        idp.add_client(DevClient::with_federated_subject(
            FEDERATED_CLIENT,
            FEDERATED_SUBJECT,
        ));
        idp
    }

    fn unique_jti() -> String {
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        format!("jti-{}", SERIAL.fetch_add(1, Ordering::Relaxed))
    }

    /// Good `private_key_jwt` claims for `client_id`, `exp` five minutes ahead.
    fn assertion_claims(idp: &DevIdp, client_id: &str) -> Value {
        let now = now_secs();
        json!({
            "iss": client_id,
            "sub": client_id,
            "aud": idp.token_endpoint(),
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "jti": unique_jti(),
        })
    }

    fn pkj_header(alg: &str, key: &ClientKey) -> Value {
        json!({"alg": alg, "typ": "JWT", "x5t#S256": key.thumbprint()})
    }

    /// A `client_credentials` request authenticated by `client_assertion`.
    async fn post_with_assertion(
        idp: &DevIdp,
        client_id: Option<&str>,
        assertion: &str,
        extra: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut form = vec![
            ("grant_type", GRANT_CLIENT_CREDENTIALS),
            ("client_assertion_type", CLIENT_ASSERTION_TYPE_JWT_BEARER),
            ("client_assertion", assertion),
            ("scope", "api://down/.default"),
        ];
        if let Some(client_id) = client_id {
            form.push(("client_id", client_id));
        }
        form.extend_from_slice(extra);
        post_form(idp, &form).await
    }

    /// A 401 `invalid_client` whose description contains `reason` and not the assertion.
    fn assert_invalid_client(
        name: &str,
        reason: &str,
        status: StatusCode,
        body: &Value,
        assertion: &str,
    ) {
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{name}: {body}");
        assert_eq!(body["error"], "invalid_client", "{name}");
        let description = body["error_description"].as_str().unwrap();
        assert!(description.starts_with("AADSTS"), "{name}: {description}");
        assert!(!description.contains(assertion), "{name}");
        assert!(description.contains(reason), "{name}: {description}");
    }

    #[tokio::test]
    async fn private_key_jwt_with_ps256_or_rs256_authenticates_the_client() {
        let idp = idp_with_assertion_clients().await;
        let key = &*CLIENT_KEY;
        for alg in ["PS256", "RS256"] {
            let assertion = key.sign(&pkj_header(alg, key), &assertion_claims(&idp, CERT_CLIENT));
            let (status, body) =
                post_with_assertion(&idp, Some(CERT_CLIENT), &assertion, &[]).await;
            assert_eq!(status, StatusCode::OK, "{alg}: {body}");
            let claims = verify(&idp, body["access_token"].as_str().unwrap(), "api://down").await;
            assert_eq!(claims["sub"], CERT_CLIENT);
            let recorded = idp.recorded_requests().pop().unwrap();
            assert_eq!(recorded.client_auth, Some(ClientAuth::PrivateKeyJwt));
            assert_eq!(recorded.assertion_alg.as_deref(), Some(alg));
            assert_eq!(recorded.field("client_assertion"), Some(REDACTED));
            assert!(!format!("{recorded:?}").contains(&assertion));
        }
        // RFC 7523 lets the client leave out client_id, x5t#S256, and name the issuer as aud.
        let mut claims = assertion_claims(&idp, CERT_CLIENT);
        claims["aud"] = json!(idp.issuer());
        let assertion = key.sign(&json!({"alg": "RS256"}), &claims);
        let (status, body) = post_with_assertion(&idp, None, &assertion, &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        // On-Behalf-Of works with private_key_jwt too.
        let subject = idp.mint(&CallerClaims {
            aud: Some(format!("api://{CERT_CLIENT}")),
            ..CallerClaims::user("alice")
        });
        let assertion = key.sign(
            &pkj_header("PS256", key),
            &assertion_claims(&idp, CERT_CLIENT),
        );
        let (status, body) = post_form(
            &idp,
            &[
                ("grant_type", GRANT_JWT_BEARER),
                ("client_id", CERT_CLIENT),
                ("client_assertion_type", CLIENT_ASSERTION_TYPE_JWT_BEARER),
                ("client_assertion", &assertion),
                ("assertion", &subject),
                ("scope", OBO_SCOPE),
                ("requested_token_use", "on_behalf_of"),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        // A certificate-only client has no secret to match.
        let (status, body) = post_form(
            &idp,
            &[
                ("grant_type", GRANT_CLIENT_CREDENTIALS),
                ("client_id", CERT_CLIENT),
                ("client_secret", ""),
                ("client_secret", "guess"),
                ("scope", "api://down/.default"),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        let recorded = idp.recorded_requests().pop().unwrap();
        assert_eq!(recorded.client_auth, Some(ClientAuth::SecretPost));
        assert_eq!(recorded.assertion_alg, None);
    }

    #[tokio::test]
    async fn private_key_jwt_bad_assertions_are_401_invalid_client() {
        let idp = idp_with_assertion_clients().await;
        let (key, other) = (&*CLIENT_KEY, &*OTHER_KEY);
        let now = now_secs();
        let good = || assertion_claims(&idp, CERT_CLIENT);
        let with = |name: &str, value: Value| {
            let mut claims = good();
            claims[name] = value;
            claims
        };
        let without = |name: &str| {
            let mut claims = good();
            claims.as_object_mut().unwrap().remove(name);
            claims
        };
        let ps256 = pkj_header("PS256", key);
        let cases = [
            (
                "other key's signature",
                "AADSTS700027: Client assertion contains an invalid signature.",
                other.sign(&ps256, &good()),
            ),
            (
                "other certificate's x5t#S256",
                "x5t#S256 does not match",
                key.sign(&pkj_header("PS256", other), &good()),
            ),
            (
                "wrong aud",
                "aud must be the token endpoint",
                key.sign(&ps256, &with("aud", json!("https://evil.example"))),
            ),
            (
                "expired",
                "expired",
                key.sign(&ps256, &with("exp", json!(now - 10))),
            ),
            (
                "exp an hour ahead",
                "more than 10 minutes ahead",
                key.sign(&ps256, &with("exp", json!(now + 3600))),
            ),
            (
                "string exp",
                "no numeric exp",
                key.sign(&ps256, &with("exp", json!("soon"))),
            ),
            (
                "future nbf",
                "not yet valid",
                key.sign(&ps256, &with("nbf", json!(now + 120))),
            ),
            (
                "sub not the client",
                "AADSTS700021",
                key.sign(&ps256, &with("sub", json!("someone"))),
            ),
            (
                "no jti",
                "jti is missing",
                key.sign(&ps256, &without("jti")),
            ),
            (
                "alg HS256",
                "alg must be PS256 or RS256",
                key.sign(&pkj_header("HS256", key), &good()),
            ),
            (
                "crit header",
                "'crit'",
                key.sign(
                    &json!({"alg": "PS256", "x5t#S256": key.thumbprint(), "crit": ["x"], "x": 1}),
                    &good(),
                ),
            ),
            ("garbage", "AADSTS50027", "not.a.jwt".to_owned()),
        ];
        for (name, reason, assertion) in &cases {
            let (status, body) = post_with_assertion(&idp, Some(CERT_CLIENT), assertion, &[]).await;
            assert_invalid_client(name, reason, status, &body, assertion);
        }
        // client_id must be the assertion's iss; a client without a certificate cannot use one.
        let assertion = key.sign(&ps256, &good());
        let (status, body) =
            post_with_assertion(&idp, Some(DEFAULT_CLIENT_ID), &assertion, &[]).await;
        assert_invalid_client(
            "client_id mismatch",
            "AADSTS700021",
            status,
            &body,
            &assertion,
        );
        let assertion = key.sign(&ps256, &assertion_claims(&idp, DEFAULT_CLIENT_ID));
        let (status, body) = post_with_assertion(&idp, None, &assertion, &[]).await;
        assert_invalid_client(
            "no certificate",
            "no certificate is registered",
            status,
            &body,
            &assertion,
        );
        let assertion = key.sign(&ps256, &assertion_claims(&idp, "nobody"));
        let (status, body) = post_with_assertion(&idp, None, &assertion, &[]).await;
        assert_invalid_client("unknown client", "AADSTS700016", status, &body, &assertion);

        // A replayed jti is refused; the same claims with a fresh jti pass.
        let claims = good();
        let assertion = key.sign(&ps256, &claims);
        let (status, body) = post_with_assertion(&idp, Some(CERT_CLIENT), &assertion, &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, body) = post_with_assertion(&idp, Some(CERT_CLIENT), &assertion, &[]).await;
        assert_invalid_client("replay", "jti replayed", status, &body, &assertion);
        let mut fresh = claims.clone();
        fresh["jti"] = json!(unique_jti());
        let (status, _) =
            post_with_assertion(&idp, Some(CERT_CLIENT), &key.sign(&ps256, &fresh), &[]).await;
        assert_eq!(status, StatusCode::OK);

        // Malformed requests: a second method, or no client_assertion_type.
        let assertion = key.sign(&ps256, &good());
        let (status, body) = post_with_assertion(
            &idp,
            Some(CERT_CLIENT),
            &assertion,
            &[("client_secret", "x")],
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"], "invalid_request");
        let (status, body) = post_form(
            &idp,
            &[
                ("grant_type", GRANT_CLIENT_CREDENTIALS),
                ("client_assertion", &assertion),
                ("scope", "api://down/.default"),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"], "invalid_request");
    }

    #[tokio::test]
    async fn federated_assertion_signed_by_the_idp_authenticates_the_client() {
        let idp = idp_with_assertion_clients().await;
        let now = now_secs();
        let good = json!({
            "iss": "https://kubernetes.default.svc.cluster.local",
            "aud": [FEDERATED_AUDIENCE],
            "sub": FEDERATED_SUBJECT,
            "iat": now,
            "exp": now + 3600,
        });
        let rs256 = json!({"alg": "RS256", "typ": "JWT"});
        let token = idp.sign(&rs256, &good);
        // A projected service-account token is presented again and again until rotated.
        for _ in 0..2 {
            let (status, body) =
                post_with_assertion(&idp, Some(FEDERATED_CLIENT), &token, &[]).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let claims = verify(&idp, body["access_token"].as_str().unwrap(), "api://down").await;
            assert_eq!(claims["sub"], FEDERATED_CLIENT);
        }
        let recorded = idp.recorded_requests().pop().unwrap();
        assert_eq!(recorded.client_auth, Some(ClientAuth::FederatedAssertion));
        assert_eq!(recorded.assertion_alg.as_deref(), Some("RS256"));
        // Signed by the previous key: still trusted after a rotation.
        idp.rotate_key();
        let (status, body) = post_with_assertion(&idp, Some(FEDERATED_CLIENT), &token, &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, _) = post_with_assertion(
            &idp,
            Some(FEDERATED_CLIENT),
            &idp.sign(&json!({"alg": "RS256"}), &{
                let mut claims = good.clone();
                claims["aud"] = json!(FEDERATED_AUDIENCE);
                claims
            }),
            &[],
        )
        .await;
        assert_eq!(status, StatusCode::OK);

        let with = |name: &str, value: Value| {
            let mut claims = good.clone();
            claims[name] = value;
            claims
        };
        let stranger = super::tests::idp().await;
        let cases = [
            (
                "wrong sub",
                "AADSTS700213",
                Some(FEDERATED_CLIENT),
                idp.sign(
                    &rs256,
                    &with("sub", json!("system:serviceaccount:apps:other")),
                ),
            ),
            (
                "wrong aud",
                "AADSTS700212",
                Some(FEDERATED_CLIENT),
                idp.sign(&rs256, &with("aud", json!(["api://someone-else"]))),
            ),
            (
                "expired",
                "AADSTS700024",
                Some(FEDERATED_CLIENT),
                idp.sign(&rs256, &with("exp", json!(now - 10))),
            ),
            (
                "foreign key",
                "invalid signature",
                Some(FEDERATED_CLIENT),
                stranger.sign(&rs256, &good),
            ),
            (
                "alg PS256",
                "alg must be",
                Some(FEDERATED_CLIENT),
                idp.sign(&json!({"alg": "PS256"}), &good),
            ),
            (
                "client without a federated subject",
                "AADSTS70021:",
                Some(DEFAULT_CLIENT_ID),
                token.clone(),
            ),
            ("no client_id", "AADSTS700016", None, token.clone()),
        ];
        for (name, reason, client_id, assertion) in &cases {
            let (status, body) = post_with_assertion(&idp, *client_id, assertion, &[]).await;
            assert_invalid_client(name, reason, status, &body, assertion);
        }
    }

    #[tokio::test]
    async fn claims_parameter_client_capabilities_become_xms_cc() {
        let idp = idp().await;
        let assertion = idp.mint(&CallerClaims::user("alice"));
        let mut form = obo_form(&assertion, OBO_SCOPE);
        form.push(("claims", CAE_CLAIMS));
        let (status, body) = post_form(&idp, &form).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let claims = verify(
            &idp,
            body["access_token"].as_str().unwrap(),
            "api://downstream",
        )
        .await;
        assert_eq!(claims["xms_cc"], json!(["cp1"]));
        assert_eq!(idp.recorded_requests()[0].field("claims"), Some(CAE_CLAIMS));

        let app_form = |claims: &'static str| {
            [
                ("grant_type", GRANT_CLIENT_CREDENTIALS),
                ("client_id", DEFAULT_CLIENT_ID),
                ("client_secret", DEFAULT_CLIENT_SECRET),
                ("scope", "api://down/.default"),
                ("claims", claims),
            ]
        };
        let (status, body) = post_form(&idp, &app_form(CAE_CLAIMS)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let claims = verify(&idp, body["access_token"].as_str().unwrap(), "api://down").await;
        assert_eq!(claims["xms_cc"], json!(["cp1"]));
        // A claims request without capabilities adds nothing.
        let (status, body) = post_form(&idp, &app_form(DEFAULT_CLAIMS_CHALLENGE)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let claims = verify(&idp, body["access_token"].as_str().unwrap(), "api://down").await;
        assert!(claims.get("xms_cc").is_none());
        for bad in [
            "not json",
            "[1]",
            "\"cp1\"",
            r#"{"access_token":{"xms_cc":{"values":"cp1"}}}"#,
        ] {
            let (status, body) = post_form(&idp, &app_form(bad)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(body["error"], "invalid_request", "{bad}");
        }
    }

    #[tokio::test]
    async fn token_exchange_echoes_requested_token_type() {
        let idp = idp().await;
        let subject = idp.mint(&CallerClaims::user("carol"));
        let exchange = |requested: Option<&'static str>| {
            let mut form = vec![
                ("grant_type", GRANT_TOKEN_EXCHANGE),
                ("client_id", DEFAULT_CLIENT_ID),
                ("client_secret", DEFAULT_CLIENT_SECRET),
                ("subject_token", subject.as_str()),
                ("subject_token_type", TOKEN_TYPE_ACCESS_TOKEN),
                ("audience", "https://one.example"),
            ];
            form.extend(requested.map(|requested| ("requested_token_type", requested)));
            form
        };
        for (requested, issued) in [
            (None, TOKEN_TYPE_ACCESS_TOKEN),
            (Some(TOKEN_TYPE_ACCESS_TOKEN), TOKEN_TYPE_ACCESS_TOKEN),
            (Some(TOKEN_TYPE_JWT), TOKEN_TYPE_JWT),
        ] {
            let (status, body) = post_form(&idp, &exchange(requested)).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body["issued_token_type"], issued);
            let claims = verify(
                &idp,
                body["access_token"].as_str().unwrap(),
                "https://one.example",
            )
            .await;
            // A single audience stays a string.
            assert_eq!(claims["aud"], "https://one.example");
        }
        let (status, body) = post_form(
            &idp,
            &exchange(Some("urn:ietf:params:oauth:token-type:id_token")),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "invalid_request");
    }

    /// Makes one token request for each of `InvalidClient`, `NonJson200`, `EmptyBody200`, `NotBearer`,
    /// `ExpiresInAbsent` and `ResetConnection`, queued in that order, then a normal one.
    async fn assert_new_failures_in_order(idp: &DevIdp) {
        let form = [
            ("grant_type", GRANT_CLIENT_CREDENTIALS),
            ("client_id", DEFAULT_CLIENT_ID),
            ("client_secret", DEFAULT_CLIENT_SECRET),
            ("scope", "api://down/.default"),
        ];
        let send = || client().post(idp.token_endpoint()).form(&form).send();

        let response = send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "invalid_client");

        let response = send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        let text = response.text().await.unwrap();
        assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");

        let response = send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.bytes().await.unwrap().is_empty());

        let (status, body) = post_form(idp, &form).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["token_type"], "N_A");
        assert_eq!(body["expires_in"], 3600);
        verify(idp, body["access_token"].as_str().unwrap(), "api://down").await;

        let (status, body) = post_form(idp, &form).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["token_type"], "Bearer");
        assert!(body.get("expires_in").is_none(), "{body}");
        assert!(body.get("ext_expires_in").is_none(), "{body}");
        let claims = verify(idp, body["access_token"].as_str().unwrap(), "api://down").await;
        assert!(claims["exp"].as_u64().unwrap() > now_secs());

        let outcome = send().await;
        assert!(outcome.is_err(), "{outcome:?}");

        let (status, body) = post_form(idp, &form).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(idp.token_requests(), 7);
    }

    #[tokio::test]
    async fn broken_answer_failures_are_served_in_order() {
        let idp = idp().await;
        for failure in [
            Failure::InvalidClient,
            Failure::NonJson200,
            Failure::EmptyBody200,
            Failure::NotBearer,
            Failure::ExpiresInAbsent,
            Failure::ResetConnection,
        ] {
            idp.fail_next(failure, 1);
        }
        assert_new_failures_in_order(&idp).await;
        // The reset request was recorded before the connection closed.
        assert_eq!(idp.recorded_requests().len(), 7);
    }

    #[tokio::test]
    async fn broken_answer_failures_can_be_injected_over_http() {
        let idp = idp().await;
        for mode in [
            "invalid_client",
            "non_json_200",
            "empty_body_200",
            "not_bearer",
            "expires_in_absent",
            "reset_connection",
        ] {
            let response = client()
                .post(format!("{}/dev/fail", idp.issuer()))
                .json(&json!({"mode": mode}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::NO_CONTENT, "{mode}");
        }
        assert_new_failures_in_order(&idp).await;
    }

    #[tokio::test]
    async fn discovery_document_names_endpoints_and_grants() {
        let idp = idp().await;
        assert!(idp.issuer().starts_with("http://127.0.0.1:"));
        let body: Value = client()
            .get(format!("{}/.well-known/openid-configuration", idp.issuer()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["issuer"], idp.issuer());
        assert_eq!(body["jwks_uri"], idp.jwks_uri());
        assert_eq!(body["token_endpoint"], idp.token_endpoint());
        assert_eq!(
            body["authorization_endpoint"],
            format!("{}/authorize", idp.issuer())
        );
        assert_eq!(
            body["id_token_signing_alg_values_supported"],
            json!(["RS256"])
        );
        assert_eq!(
            body["grant_types_supported"],
            json!([
                GRANT_CLIENT_CREDENTIALS,
                GRANT_JWT_BEARER,
                GRANT_TOKEN_EXCHANGE
            ])
        );
        assert_eq!(
            body["token_endpoint_auth_methods_supported"],
            json!([
                "client_secret_post",
                "client_secret_basic",
                "private_key_jwt"
            ])
        );
    }

    #[tokio::test]
    async fn minted_caller_token_verifies_against_jwks() {
        let idp = idp().await;
        let response = client().get(idp.jwks_uri()).send().await.unwrap();
        assert_eq!(response.headers()[header::CACHE_CONTROL], "max-age=300");
        let mut caller = CallerClaims::user("alice");
        caller.scp = Some("access_as_user read".into());
        caller.roles = vec!["Admin".into()];
        let token = idp.mint(&caller);
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        assert_eq!(header.kid.as_ref().map(String::len), Some(16));
        let claims = verify(&idp, &token, "api://obo-sidecar").await;
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["oid"], derive_oid("alice"));
        assert_eq!(claims["tid"], DEFAULT_TENANT_ID);
        assert_eq!(claims["scp"], "access_as_user read");
        assert_eq!(claims["roles"], json!(["Admin"]));
        assert_eq!(claims["ver"], "2.0");
        assert!(claims["jti"].is_string());
        let exp = claims["exp"].as_u64().unwrap();
        let iat = claims["iat"].as_u64().unwrap();
        assert_eq!(exp - iat, 3600);
        assert_eq!(claims["nbf"], claims["iat"]);
    }

    #[tokio::test]
    async fn client_credentials_with_basic_auth_issues_app_token() {
        let config = DevIdpConfig {
            clients: vec![DevClient::new("odd id:1", "s3cr+t/=")],
            ..DevIdpConfig::default()
        };
        let idp = idp_with(config).await;
        let encode = |value: &str| {
            url::form_urlencoded::byte_serialize(value.as_bytes()).collect::<String>()
        };
        let credential = STANDARD.encode(format!("{}:{}", encode("odd id:1"), encode("s3cr+t/=")));
        let response = client()
            .post(idp.token_endpoint())
            .header(header::AUTHORIZATION, format!("Basic {credential}"))
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", "api://down/.default"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 3600);
        assert_eq!(body["ext_expires_in"], 3600);
        let claims = verify(&idp, body["access_token"].as_str().unwrap(), "api://down").await;
        assert_eq!(claims["sub"], "odd id:1");
        assert_eq!(claims["oid"], "odd id:1");
        assert_eq!(claims["azp"], "odd id:1");
        assert_eq!(claims["idtyp"], "app");
        assert!(claims.get("scp").is_none());
        let recorded = idp.recorded_requests();
        assert_eq!(recorded.len(), 1);
        assert!(recorded[0].basic_auth);
        assert_eq!(
            recorded[0].grant_type.as_deref(),
            Some("client_credentials")
        );
    }

    #[tokio::test]
    async fn client_credentials_without_default_suffix_is_invalid_scope() {
        let idp = idp().await;
        for scope in [
            "api://down/read",
            "api://down/.default api://other/.default",
            "/.default",
        ] {
            let (status, body) = post_form(
                &idp,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", DEFAULT_CLIENT_ID),
                    ("client_secret", DEFAULT_CLIENT_SECRET),
                    ("scope", scope),
                ],
            )
            .await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{scope}");
            assert_eq!(body["error"], "invalid_scope", "{scope}");
        }
    }

    #[tokio::test]
    async fn wrong_or_missing_client_secret_is_401_invalid_client() {
        let idp = idp().await;
        let (status, body) = post_form(
            &idp,
            &[
                ("grant_type", "client_credentials"),
                ("client_id", DEFAULT_CLIENT_ID),
                ("client_secret", "wrong"),
                ("scope", "api://down/.default"),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"], "invalid_client");
        let (status, body) = post_form(
            &idp,
            &[
                ("grant_type", "client_credentials"),
                ("scope", "api://down/.default"),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"], "invalid_client");
        let response = client()
            .post(idp.token_endpoint())
            .basic_auth(DEFAULT_CLIENT_ID, Some("wrong"))
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", "api://down/.default"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
        // Recorded requests never hold the secret.
        for recorded in idp.recorded_requests() {
            assert!(recorded.form.iter().all(|(_, value)| value != "wrong"));
        }
        assert_eq!(idp.token_requests(), 3);
    }

    #[tokio::test]
    async fn obo_copies_subject_and_sets_scp() {
        let idp = idp().await;
        let mut caller = CallerClaims::user("alice");
        caller.tid = Some("tenant-x".into());
        let assertion = idp.mint(&caller);
        let response = client()
            .post(idp.token_endpoint())
            .header("client-request-id", "req-1")
            .form(&obo_form(&assertion, OBO_SCOPE))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["scope"], OBO_SCOPE);
        assert_eq!(body["expires_in"], 3600);
        let claims = verify(
            &idp,
            body["access_token"].as_str().unwrap(),
            "api://downstream",
        )
        .await;
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["oid"], derive_oid("alice"));
        assert_eq!(claims["tid"], "tenant-x");
        assert_eq!(claims["scp"], "read write");
        assert_eq!(claims["azp"], DEFAULT_CLIENT_ID);

        let recorded = idp.recorded_requests();
        assert_eq!(recorded[0].client_request_id.as_deref(), Some("req-1"));
        assert_eq!(recorded[0].field("client_secret"), Some(REDACTED));
        assert_eq!(recorded[0].field("assertion"), Some(assertion.as_str()));
        assert!(!format!("{:?}", recorded[0]).contains(&assertion));
        assert!(!recorded[0].basic_auth);
    }

    #[tokio::test]
    async fn obo_default_scope_issues_user_impersonation() {
        let idp = idp().await;
        let assertion = idp.mint(&CallerClaims {
            aud: Some(DEFAULT_CLIENT_ID.into()),
            ..CallerClaims::user("bob")
        });
        let (status, body) = post_form(&idp, &obo_form(&assertion, "api://down/.default")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let claims = verify(&idp, body["access_token"].as_str().unwrap(), "api://down").await;
        assert_eq!(claims["scp"], "user_impersonation");
    }

    #[tokio::test]
    async fn obo_refuses_hostile_assertions_with_invalid_grant() {
        let idp = idp().await;
        let now = now_secs();
        let good = json!({"iss": idp.issuer(), "aud": "api://obo-sidecar", "sub": "alice", "exp": now + 600});
        let rs256 = json!({"alg": "RS256", "typ": "JWT"});
        let with = |name: &str, value: Value| {
            let mut claims = good.clone();
            claims[name] = value;
            claims
        };
        let mut no_exp = good.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        let other_idp = super::tests::idp().await;
        let cases = [
            (
                "wrong aud",
                idp.sign(&rs256, &with("aud", json!("api://someone-else"))),
            ),
            ("expired", idp.sign(&rs256, &with("exp", json!(now - 10)))),
            (
                "future nbf",
                idp.sign(&rs256, &with("nbf", json!(now + 600))),
            ),
            (
                "foreign iss",
                idp.sign(&rs256, &with("iss", json!("https://evil.example"))),
            ),
            ("no exp", idp.sign(&rs256, &no_exp)),
            ("alg lie", idp.sign(&json!({"alg": "HS256"}), &good)),
            ("alg none", idp.sign(&json!({"alg": "none"}), &good)),
            ("other key", other_idp.sign(&rs256, &good)),
            ("garbage", "not.a.jwt".to_owned()),
            ("four segments", format!("{}.x", idp.sign(&rs256, &good))),
        ];
        for (name, assertion) in &cases {
            let (status, body) = post_form(&idp, &obo_form(assertion, OBO_SCOPE)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {body}");
            assert_eq!(body["error"], "invalid_grant", "{name}");
            let description = body["error_description"].as_str().unwrap();
            assert!(description.starts_with("AADSTS"), "{name}: {description}");
            assert!(!description.contains(assertion.as_str()), "{name}");
        }
        // The well-formed control case succeeds.
        let (status, _) = post_form(&idp, &obo_form(&idp.sign(&rs256, &good), OBO_SCOPE)).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn obo_with_mixed_resources_or_missing_fields_is_refused() {
        let idp = idp().await;
        let assertion = idp.mint(&CallerClaims::user("alice"));
        for scope in [
            "api://a/read api://b/read",
            "read",
            "api://a/.default api://a/read",
        ] {
            let (status, body) = post_form(&idp, &obo_form(&assertion, scope)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{scope}");
            assert_eq!(body["error"], "invalid_scope", "{scope}");
        }
        let mut form = obo_form(&assertion, OBO_SCOPE);
        form.retain(|(name, _)| *name != "requested_token_use");
        let (status, body) = post_form(&idp, &form).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "invalid_request");
        let (status, body) = post_form(
            &idp,
            &[
                ("grant_type", "password"),
                ("client_id", DEFAULT_CLIENT_ID),
                ("client_secret", DEFAULT_CLIENT_SECRET),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "unsupported_grant_type");
        let response = client()
            .post(idp.token_endpoint())
            .header(header::CONTENT_TYPE, "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "invalid_request");
    }

    #[tokio::test]
    async fn token_exchange_issues_for_every_audience() {
        let idp = idp().await;
        let subject = idp.mint(&CallerClaims::user("carol"));
        let (status, body) = post_form(
            &idp,
            &[
                ("grant_type", GRANT_TOKEN_EXCHANGE),
                ("client_id", DEFAULT_CLIENT_ID),
                ("client_secret", DEFAULT_CLIENT_SECRET),
                ("subject_token", &subject),
                ("subject_token_type", TOKEN_TYPE_ACCESS_TOKEN),
                ("audience", "https://first.example"),
                ("audience", "https://second.example"),
                ("resource", "https://resource.example"),
                ("scope", "read"),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["issued_token_type"], TOKEN_TYPE_ACCESS_TOKEN);
        let claims = verify(
            &idp,
            body["access_token"].as_str().unwrap(),
            "https://first.example",
        )
        .await;
        assert_eq!(claims["sub"], "carol");
        assert_eq!(claims["scp"], "read");
        assert_eq!(
            claims["aud"],
            json!(["https://first.example", "https://second.example"])
        );

        let (status, body) = post_form(
            &idp,
            &[
                ("grant_type", GRANT_TOKEN_EXCHANGE),
                ("client_id", DEFAULT_CLIENT_ID),
                ("client_secret", DEFAULT_CLIENT_SECRET),
                ("subject_token", &subject),
                ("subject_token_type", TOKEN_TYPE_ACCESS_TOKEN),
                ("scope", "api://down/read"),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        verify(&idp, body["access_token"].as_str().unwrap(), "api://down").await;

        let (status, body) = post_form(
            &idp,
            &[
                ("grant_type", GRANT_TOKEN_EXCHANGE),
                ("client_id", DEFAULT_CLIENT_ID),
                ("client_secret", DEFAULT_CLIENT_SECRET),
                ("subject_token", &subject),
                (
                    "subject_token_type",
                    "urn:ietf:params:oauth:token-type:id_token",
                ),
                ("audience", "x"),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "invalid_request");
    }

    #[tokio::test]
    async fn injected_failures_are_served_in_order_then_normal_answers_resume() {
        let idp = idp().await;
        let assertion = idp.mint(&CallerClaims::user("alice"));
        let form = obo_form(&assertion, OBO_SCOPE);
        idp.fail_next(Failure::ServerError, 2);
        idp.fail_next(
            Failure::TooManyRequests {
                retry_after_secs: 7,
            },
            1,
        );
        idp.fail_next(Failure::InvalidGrant, 1);
        idp.fail_next(
            Failure::InteractionRequired {
                claims: "{\"x\":1}".into(),
            },
            1,
        );
        idp.fail_next(Failure::ConsentRequired, 1);
        idp.fail_next(Failure::Delay(Duration::from_millis(20)), 1);

        for _ in 0..2 {
            let (status, body) = post_form(&idp, &form).await;
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
            assert!(body["error"].is_string());
        }
        let response = client()
            .post(idp.token_endpoint())
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
        let (status, body) = post_form(&idp, &form).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "invalid_grant");
        assert_eq!(body["error_codes"], json!([50013]));
        let (status, body) = post_form(&idp, &form).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "interaction_required");
        assert_eq!(body["suberror"], "basic_action");
        assert_eq!(body["claims"], "{\"x\":1}");
        let (status, body) = post_form(&idp, &form).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["suberror"], "consent_required");
        assert_eq!(body["error_codes"], json!([65001]));
        let started = std::time::Instant::now();
        let (status, _) = post_form(&idp, &form).await;
        assert_eq!(status, StatusCode::OK);
        assert!(started.elapsed() >= Duration::from_millis(20));
        let (status, _) = post_form(&idp, &form).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(idp.token_requests(), 8);
        assert_eq!(idp.recorded_requests().len(), 8);
    }

    #[tokio::test]
    async fn rotated_key_is_published_alongside_the_old_one() {
        let idp = idp().await;
        let old = idp.mint(&CallerClaims::user("alice"));
        idp.rotate_key();
        let new = idp.mint(&CallerClaims::user("alice"));
        let old_kid = jsonwebtoken::decode_header(&old).unwrap().kid.unwrap();
        let new_kid = jsonwebtoken::decode_header(&new).unwrap().kid.unwrap();
        assert_ne!(old_kid, new_kid);
        let jwks: Value = client()
            .get(idp.jwks_uri())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let kids: Vec<&str> = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|key| key["kid"].as_str().unwrap())
            .collect();
        assert_eq!(kids, [old_kid.as_str(), new_kid.as_str()]);
        for token in [&old, &new] {
            verify(&idp, token, "api://obo-sidecar").await;
            let (status, _) = post_form(&idp, &obo_form(token, OBO_SCOPE)).await;
            assert_eq!(status, StatusCode::OK);
        }
    }

    #[tokio::test]
    async fn dev_endpoints_mint_fail_and_count() {
        let idp = idp().await;
        let response = client()
            .post(format!("{}/dev/token", idp.issuer()))
            .json(&json!({"sub": "dave", "scp": "read", "roles": ["R"], "lifetime_secs": 60}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["expires_in"], 60);
        let claims = verify(
            &idp,
            body["access_token"].as_str().unwrap(),
            "api://obo-sidecar",
        )
        .await;
        assert_eq!(claims["sub"], "dave");
        assert_eq!(claims["roles"], json!(["R"]));

        let response = client()
            .post(format!("{}/dev/token", idp.issuer()))
            .header(header::ACCEPT, "text/plain")
            .json(&json!({"sub": "dave", "aud": "api://x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let token = response.text().await.unwrap();
        verify(&idp, &token, "api://x").await;

        for bad in ["{", "{}", "[1]", "{\"sub\": 3}"] {
            let response = client()
                .post(format!("{}/dev/token", idp.issuer()))
                .body(bad)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"], "invalid_request");
        }

        let response = client()
            .post(format!("{}/dev/fail", idp.issuer()))
            .json(&json!({"mode": "429", "count": 2, "retry_after": 3}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        let response = client()
            .post(format!("{}/dev/fail", idp.issuer()))
            .json(&json!({"mode": "explode"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        for _ in 0..2 {
            let response = client()
                .post(idp.token_endpoint())
                .form(&[("a", "b")])
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(response.headers()[header::RETRY_AFTER], "3");
        }
        let stats: Value = client()
            .get(format!("{}/dev/stats", idp.issuer()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            stats,
            json!({"token_requests": 2, "discovery_requests": 0, "jwks_requests": 2})
        );
    }

    #[tokio::test]
    async fn unknown_paths_and_huge_bodies_get_json_errors() {
        let idp = idp().await;
        let response = client()
            .get(format!("{}/nope", idp.issuer()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "not_found");
        let response = client().get(idp.token_endpoint()).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        let response = client()
            .post(idp.token_endpoint())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(vec![b'a'; MAX_BODY_BYTES + 1])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "invalid_request");
        assert_eq!(idp.token_requests(), 1);
    }

    const TENANT_A: &str = "11111111-2222-4333-8444-555555555555";
    const TENANT_B: &str = "AAAAAAAA-bbbb-4ccc-8ddd-eeeeeeeeeeee";

    async fn get(url: &str) -> (StatusCode, HeaderMap, Value) {
        let response = client().get(url).send().await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        (status, headers, response.json().await.unwrap())
    }

    fn tenant_discovery_url(idp: &DevIdp, tenant: &str) -> String {
        format!(
            "{}/.well-known/openid-configuration",
            idp.tenant_issuer(tenant)
        )
    }

    async fn post_form_to(url: &str, form: &[(&str, &str)]) -> (StatusCode, Value) {
        let response = client().post(url).form(form).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    fn app_form(scope: &str) -> [(&str, &str); 4] {
        [
            ("grant_type", GRANT_CLIENT_CREDENTIALS),
            ("client_id", DEFAULT_CLIENT_ID),
            ("client_secret", DEFAULT_CLIENT_SECRET),
            ("scope", scope),
        ]
    }

    #[tokio::test]
    async fn tenant_discovery_names_the_tenant_issuer_and_shares_the_jwks() {
        let idp = idp().await;
        let issuer = idp.issuer();
        assert_eq!(
            idp.tenant_issuer(TENANT_A),
            format!("{issuer}/{TENANT_A}/v2.0")
        );
        assert_eq!(
            idp.tenant_token_endpoint(TENANT_A),
            format!("{issuer}/{TENANT_A}/oauth2/v2.0/token")
        );
        let (status, _, root) = get(&format!("{issuer}/.well-known/openid-configuration")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(root["issuer"], issuer);
        assert_eq!(root["token_endpoint"], idp.token_endpoint());
        for tenant in [TENANT_A, TENANT_B] {
            let (status, _, document) = get(&tenant_discovery_url(&idp, tenant)).await;
            assert_eq!(status, StatusCode::OK, "{tenant}");
            assert_eq!(document["issuer"], idp.tenant_issuer(tenant));
            assert_eq!(
                document["token_endpoint"],
                idp.tenant_token_endpoint(tenant)
            );
            assert_eq!(document["jwks_uri"], idp.jwks_uri());
            assert_eq!(
                document["grant_types_supported"],
                root["grant_types_supported"]
            );
        }
        assert_eq!(idp.discovery_requests(), 3);

        // A tenant that is not a GUID has no documents and no token endpoint; the fetch still counts.
        let not_guids = [
            "common",
            "organizations",
            "11111111-2222-4333-8444-55555555555",
            "11111111-2222-4333-8444-55555555555g",
            "111111112222433384445555555555550000",
            "11111111-2222-4333-8444-555555555555-1",
        ];
        for tenant in not_guids {
            let (status, _, body) = get(&tenant_discovery_url(&idp, tenant)).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{tenant}");
            assert_eq!(body["error"], "not_found", "{tenant}");
            let (status, body) = post_form_to(
                &idp.tenant_token_endpoint(tenant),
                &app_form("api://down/.default"),
            )
            .await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{tenant}");
            assert_eq!(body["error"], "not_found", "{tenant}");
        }
        assert_eq!(idp.discovery_requests(), 3 + not_guids.len() as u64);
        assert_eq!(idp.token_requests(), 0);
        assert!(idp.recorded_requests().is_empty());

        // Wrong methods on a tenant's endpoints are 405 (and not counted).
        let response = client()
            .post(tenant_discovery_url(&idp, TENANT_A))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        let response = client()
            .get(idp.tenant_token_endpoint(TENANT_A))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(idp.discovery_requests(), 3 + not_guids.len() as u64);
        assert_eq!(idp.token_requests(), 0);

        assert_eq!(idp.jwks_requests(), 0);
        get(&idp.jwks_uri()).await;
        assert_eq!(idp.jwks_requests(), 1);
        let (_, _, dev_stats) = get(&format!("{issuer}/dev/stats")).await;
        assert_eq!(dev_stats["discovery_requests"], 3 + not_guids.len() as u64);
        assert_eq!(dev_stats["jwks_requests"], 1);
    }

    #[tokio::test]
    async fn tenant_token_endpoint_issues_tokens_with_the_tenant_iss_and_tid() {
        let idp = idp().await;
        let endpoint = idp.tenant_token_endpoint(TENANT_A);
        let tenant_issuer = idp.tenant_issuer(TENANT_A);

        let (status, body) = post_form_to(&endpoint, &app_form("api://down/.default")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let claims = verify_as(
            &idp,
            body["access_token"].as_str().unwrap(),
            "api://down",
            &tenant_issuer,
        )
        .await;
        assert_eq!(claims["tid"], TENANT_A);
        assert_eq!(claims["sub"], DEFAULT_CLIENT_ID);

        // On-Behalf-Of with a caller token of this tenant, of the root issuer, of another tenant.
        let callers = [
            idp.mint_for_tenant(TENANT_A, &CallerClaims::user("alice")),
            idp.mint(&CallerClaims::user("alice")),
            idp.mint_for_tenant(TENANT_B, &CallerClaims::user("alice")),
        ];
        for caller in &callers {
            let (status, body) = post_form_to(&endpoint, &obo_form(caller, OBO_SCOPE)).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let claims = verify_as(
                &idp,
                body["access_token"].as_str().unwrap(),
                "api://downstream",
                &tenant_issuer,
            )
            .await;
            assert_eq!(claims["tid"], TENANT_A);
            assert_eq!(claims["sub"], "alice");
        }
        // RFC 8693 too.
        let (status, body) = post_form_to(
            &endpoint,
            &[
                ("grant_type", GRANT_TOKEN_EXCHANGE),
                ("client_id", DEFAULT_CLIENT_ID),
                ("client_secret", DEFAULT_CLIENT_SECRET),
                ("subject_token", &callers[0]),
                ("subject_token_type", TOKEN_TYPE_ACCESS_TOKEN),
                ("audience", "https://one.example"),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let claims = verify_as(
            &idp,
            body["access_token"].as_str().unwrap(),
            "https://one.example",
            &tenant_issuer,
        )
        .await;
        assert_eq!(claims["tid"], TENANT_A);

        // The root endpoint accepts a tenant's caller token and keeps its tid.
        let (status, body) = post_form(&idp, &obo_form(&callers[2], OBO_SCOPE)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let claims = verify(
            &idp,
            body["access_token"].as_str().unwrap(),
            "api://downstream",
        )
        .await;
        assert_eq!(claims["tid"], TENANT_B);

        let recorded = idp.recorded_requests();
        let tenants: Vec<Option<&str>> = recorded
            .iter()
            .map(|request| request.tenant.as_deref())
            .collect();
        assert_eq!(
            tenants,
            [Some(TENANT_A); 5]
                .into_iter()
                .chain([None])
                .collect::<Vec<_>>()
        );
        assert!(format!("{:?}", recorded[0]).contains(TENANT_A));
        assert_eq!(idp.token_requests(), 6);
    }

    #[tokio::test]
    async fn tenant_token_endpoint_refuses_what_the_root_one_refuses() {
        let idp = idp().await;
        let endpoint = idp.tenant_token_endpoint(TENANT_A);
        let now = now_secs();
        let rs256 = json!({"alg": "RS256", "typ": "JWT"});
        let subject = |iss: String| {
            idp.sign(
                &rs256,
                &json!({"iss": iss, "aud": "api://obo-sidecar", "sub": "alice", "exp": now + 600}),
            )
        };
        let issuer = idp.issuer();
        for iss in [
            format!("{issuer}/common/v2.0"),
            format!("{issuer}/{TENANT_A}/v2.0/extra"),
            format!("{issuer}/{TENANT_A}"),
            format!("{issuer}/{TENANT_A}/v2.0/"),
            format!("https://evil.example/{TENANT_A}/v2.0"),
            format!("{issuer}x/{TENANT_A}/v2.0"),
        ] {
            for url in [endpoint.as_str(), &idp.token_endpoint()] {
                let (status, body) =
                    post_form_to(url, &obo_form(&subject(iss.clone()), OBO_SCOPE)).await;
                assert_eq!(status, StatusCode::BAD_REQUEST, "{iss} at {url}");
                assert_eq!(body["error"], "invalid_grant", "{iss} at {url}");
            }
        }
        // The same checks pass the control case.
        let (status, body) = post_form_to(
            &endpoint,
            &obo_form(&subject(idp.tenant_issuer(TENANT_B)), OBO_SCOPE),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");

        // Client authentication and injected failures apply as on /token.
        let (status, body) = post_form_to(
            &endpoint,
            &[
                ("grant_type", GRANT_CLIENT_CREDENTIALS),
                ("client_id", DEFAULT_CLIENT_ID),
                ("client_secret", "wrong"),
                ("scope", "api://down/.default"),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["error"], "invalid_client");
        idp.fail_next(Failure::InvalidGrant, 1);
        let (status, body) = post_form_to(&endpoint, &app_form("api://down/.default")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error_codes"], json!([50013]));
        assert_eq!(idp.token_requests(), 15);
        assert_eq!(idp.recorded_requests().len(), 15);
    }

    #[tokio::test]
    async fn private_key_jwt_at_a_tenant_endpoint_names_that_endpoint_as_aud() {
        let idp = idp_with_assertion_clients().await;
        let key = &*CLIENT_KEY;
        let endpoint = idp.tenant_token_endpoint(TENANT_A);
        let assertion_for = |aud: String| {
            let mut claims = assertion_claims(&idp, CERT_CLIENT);
            claims["aud"] = json!(aud);
            key.sign(&pkj_header("PS256", key), &claims)
        };
        let form = |assertion: &str| {
            vec![
                ("grant_type".to_owned(), GRANT_CLIENT_CREDENTIALS.to_owned()),
                ("client_id".to_owned(), CERT_CLIENT.to_owned()),
                (
                    "client_assertion_type".to_owned(),
                    CLIENT_ASSERTION_TYPE_JWT_BEARER.to_owned(),
                ),
                ("client_assertion".to_owned(), assertion.to_owned()),
                ("scope".to_owned(), "api://down/.default".to_owned()),
            ]
        };
        let post = |assertion: String| {
            let form = form(&assertion);
            let endpoint = endpoint.clone();
            async move {
                let response = client().post(endpoint).form(&form).send().await.unwrap();
                let status = response.status();
                let body: Value = response.json().await.unwrap();
                (status, body, assertion)
            }
        };
        for aud in [
            idp.tenant_token_endpoint(TENANT_A),
            idp.tenant_issuer(TENANT_A),
        ] {
            let (status, body, _) = post(assertion_for(aud.clone())).await;
            assert_eq!(status, StatusCode::OK, "{aud}: {body}");
            let claims = verify_as(
                &idp,
                body["access_token"].as_str().unwrap(),
                "api://down",
                &idp.tenant_issuer(TENANT_A),
            )
            .await;
            assert_eq!(claims["tid"], TENANT_A);
        }
        let recorded = idp.recorded_requests().pop().unwrap();
        assert_eq!(recorded.client_auth, Some(ClientAuth::PrivateKeyJwt));
        assert_eq!(recorded.tenant.as_deref(), Some(TENANT_A));
        for aud in [
            idp.token_endpoint(),
            idp.issuer(),
            idp.tenant_token_endpoint(TENANT_B),
        ] {
            let (status, body, assertion) = post(assertion_for(aud.clone())).await;
            assert_invalid_client(
                &aud,
                "aud must be the token endpoint",
                status,
                &body,
                &assertion,
            );
        }
    }

    #[tokio::test]
    async fn mint_for_tenant_sets_iss_and_tid_and_keeps_the_rest() {
        let idp = idp().await;
        let mut extra = Map::new();
        extra.insert("name".into(), json!("Alice"));
        extra.insert("iss".into(), json!("https://overridden.example"));
        let token = idp.mint_for_tenant(
            TENANT_B,
            &CallerClaims {
                scp: Some("access_as_user".into()),
                tid: Some("ignored".into()),
                extra,
                ..CallerClaims::user("alice")
            },
        );
        let claims = verify_as(
            &idp,
            &token,
            "api://obo-sidecar",
            &idp.tenant_issuer(TENANT_B),
        )
        .await;
        assert_eq!(claims["tid"], TENANT_B);
        assert_eq!(claims["scp"], "access_as_user");
        assert_eq!(claims["name"], "Alice");
        assert_eq!(claims["sub"], "alice");
    }

    #[tokio::test]
    async fn jwks_outage_makes_jwks_and_discovery_503_until_lifted() {
        let idp = idp().await;
        let discovery = [
            format!("{}/.well-known/openid-configuration", idp.issuer()),
            tenant_discovery_url(&idp, TENANT_A),
        ];
        idp.jwks_unavailable(true);
        for url in discovery.iter().chain([&idp.jwks_uri()]) {
            let (status, _, body) = get(url).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{url}");
            assert_eq!(body["error"], "temporarily_unavailable", "{url}");
        }
        // A tenant that is no GUID is still unknown; the token endpoints still answer.
        let (status, _, _) = get(&tenant_discovery_url(&idp, "common")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, body) = post_form(&idp, &app_form("api://down/.default")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, body) = post_form_to(
            &idp.tenant_token_endpoint(TENANT_A),
            &app_form("api://down/.default"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");

        idp.jwks_unavailable(false);
        for url in discovery.iter().chain([&idp.jwks_uri()]) {
            let (status, _, _) = get(url).await;
            assert_eq!(status, StatusCode::OK, "{url}");
        }
        verify_as(
            &idp,
            body["access_token"].as_str().unwrap(),
            "api://down",
            &idp.tenant_issuer(TENANT_A),
        )
        .await;
        assert_eq!(idp.discovery_requests(), 5);
        // Two here, one inside `verify_as`.
        assert_eq!(idp.jwks_requests(), 3);
    }

    #[tokio::test]
    async fn jwks_cache_control_follows_set_jwks_max_age() {
        let idp = idp().await;
        let cache_control = |headers: &HeaderMap| {
            headers
                .get(header::CACHE_CONTROL)
                .map(|value| value.to_str().unwrap().to_owned())
        };
        let (_, headers, _) = get(&idp.jwks_uri()).await;
        assert_eq!(cache_control(&headers).as_deref(), Some("max-age=300"));
        for (max_age, expected) in [
            (Some(7), Some("max-age=7")),
            (Some(0), Some("max-age=0")),
            (None, None),
            (Some(DEFAULT_JWKS_MAX_AGE), Some("max-age=300")),
        ] {
            idp.set_jwks_max_age(max_age);
            let (status, headers, body) = get(&idp.jwks_uri()).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(cache_control(&headers).as_deref(), expected, "{max_age:?}");
            assert!(body["keys"].is_array());
        }
        assert_eq!(idp.jwks_requests(), 5);
    }

    #[tokio::test]
    async fn dropping_the_handle_stops_the_server() {
        let idp = idp().await;
        let url = idp.jwks_uri();
        let http = client();
        assert!(http.get(&url).send().await.is_ok());
        drop(idp);
        // The accept loop and its keep-alive connections are aborted: no answer comes back.
        let outcome = tokio::time::timeout(Duration::from_secs(5), http.get(&url).send()).await;
        assert!(matches!(outcome, Ok(Err(_))));
    }
}
