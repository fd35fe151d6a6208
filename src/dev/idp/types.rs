//! What the development IdP is configured with and reports: its clients, the claims of the caller tokens it
//! mints, the failures it can inject, the token requests it records.

use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

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

/// The `Cache-Control: max-age` sent with `/jwks` unless [`super::DevIdp::set_jwks_max_age`] changes it: five
/// minutes, the lower bound the sidecar honours, so a sidecar under test refreshes no sooner than it must.
pub const DEFAULT_JWKS_MAX_AGE: u64 = 300;

/// Request bodies larger than this are refused with 413: every legitimate request is a few kilobytes.
pub(super) const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The `claims` challenge sent with an injected `interaction_required` when `/dev/fail` names none: an Entra
/// conditional-access step-up request.
pub(super) const DEFAULT_CLAIMS_CHALLENGE: &str =
    r#"{"access_token":{"acrs":{"essential":true,"value":"c1"}}}"#;

/// The `aud` a federated client assertion must carry: the audience Entra ID requires of a Kubernetes projected
/// service-account token (Azure workload identity).
pub const FEDERATED_AUDIENCE: &str = crate::oauth::TOKEN_EXCHANGE_AUDIENCE;

/// How far in the future a `private_key_jwt` assertion's `exp` may be: ten minutes, Entra's limit. It also
/// bounds how long a seen `jti` must be remembered (RFC 7523 §3, item 7).
pub(super) const MAX_CLIENT_ASSERTION_LIFETIME: Duration = Duration::from_secs(600);

pub(super) const REDACTED: &str = "[redacted]";

/// What the development IdP serves: its registered clients, the lifetime of the tokens it issues and the
/// tenant id it stamps into them.
#[derive(Clone, Debug)]
pub struct DevIdpConfig {
    /// Confidential clients allowed on the token endpoint; [`super::DevIdp::add_client`] registers more later.
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
    /// A secret and a certificate still accepted while a rotation is under way, as Entra keeps a client's
    /// old credential valid until it is deleted.
    pub retiring_secret: Option<String>,
    pub retiring_certificate_der: Option<Vec<u8>>,
}

impl DevClient {
    /// A client with this id and secret.
    pub fn new(client_id: impl Into<String>, client_secret: impl Into<String>) -> Self {
        Self {
            client_id: client_id.into(),
            client_secret: Some(client_secret.into()),
            certificate_der: None,
            federated_subject: None,
            retiring_secret: None,
            retiring_certificate_der: None,
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
            retiring_secret: None,
            retiring_certificate_der: None,
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
            retiring_secret: None,
            retiring_certificate_der: None,
        }
    }

    /// The client's API audience, `api://{client_id}`: the default `aud` of caller tokens minted for it.
    pub fn audience(&self) -> String {
        format!("api://{}", self.client_id)
    }

    pub(super) fn accepts_audience(&self, aud: &str) -> bool {
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
            .field(
                "retiring_secret",
                &self.retiring_secret.as_ref().map(|_| REDACTED),
            )
            .field(
                "retiring_certificate_der",
                &self
                    .retiring_certificate_der
                    .as_ref()
                    .map(|der| format!("{} bytes", der.len())),
            )
            .finish()
    }
}

/// The claims of a caller token minted by [`super::DevIdp::mint`] or `POST /dev/token`.
///
/// A caller token of tenant `t` (for a `{tenantid}` issuer) has `tid: Some(t)` and `extra` =
/// `{"iss": idp.tenant_issuer(t)}`; [`super::DevIdp::mint_for_tenant`] mints exactly that.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenClaims {
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

impl Default for TokenClaims {
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

impl TokenClaims {
    /// A user caller with this `sub` and every other claim at its default.
    pub fn user(sub: impl Into<String>) -> Self {
        Self {
            sub: sub.into(),
            ..Self::default()
        }
    }
}

/// A failure the token endpoint answers instead of a normal response (see [`super::DevIdp::fail_next`]).
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

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// A stable UUID-shaped `oid` for a `sub`: the first 16 bytes of SHA-256 over it.
pub(super) fn derive_oid(sub: &str) -> String {
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
