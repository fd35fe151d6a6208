//! The validated configuration: what `sidecar.toml` means once read, with the defaults and bounds of every
//! key. Reading it is the other files' work.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use url::Url;

use super::credential::{AuthMethod, Credential};
use crate::secret::Secret;

/// Loopback by default: a sidecar is reached by its own pod or host, never by the network unless told.
pub const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:7080";
/// Probes reach the admin listener; in Kubernetes bind it to `0.0.0.0`.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7090";
/// Entra's and most IdPs' clocks agree within seconds; a minute absorbs VM clock drift without
/// stretching a token's life noticeably.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(60);
/// One token request; Entra answers in well under a second, ten absorbs a slow region.
pub const DEFAULT_IDP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounded so a flood of distinct callers cannot grow memory without limit (about 100 MB at most).
pub const DEFAULT_CACHE_MAX_ENTRIES: u64 = 100_000;
/// MSAL refreshes five minutes before expiry; the same margin keeps an upstream from seeing a token
/// that expires in flight.
pub const DEFAULT_EXPIRY_MARGIN: Duration = Duration::from_secs(300);
/// Whole request, including token acquisition; matches Envoy's default route timeout scale.
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds that keep time arithmetic far from overflow and catch typos (`"60m"` for `"60s"`).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(3600);
pub const MAX_IDP_TIMEOUT: Duration = Duration::from_secs(600);
pub const MAX_EXPIRY_MARGIN: Duration = Duration::from_secs(86_400);
pub const MAX_ROUTE_TIMEOUT: Duration = Duration::from_secs(86_400);

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    pub inbound: Inbound,
    /// `[identity]` as `"default"`, and every `[identities.NAME]`.
    pub identities: BTreeMap<String, Arc<Identity>>,
    pub cache: CacheSettings,
    pub routes: Vec<Route>,
    /// `[compat]`: Microsoft's auth sidecar API (SPEC §16).
    pub compat: Compat,
    /// Accepted, but worth an operator's attention (`check` prints them).
    pub warnings: Vec<Problem>,
    /// Keys `[entra]` or the `AzureAd__*` variables filled, with their values (`check` prints them).
    pub derived: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listen {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// Token API prefix (SPEC §5); `None` when disabled with `""`.
    pub api_prefix: Option<String>,
    pub tls: Option<ListenTls>,
    pub drain_delay: Duration,
    pub drain_timeout: Duration,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
}

/// Inbound TLS: the server certificate and key, and optionally the CAs whose client certificates are
/// required (mTLS). Files are re-read when they change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
}

/// The token API lives here unless configured otherwise (SPEC §5).
pub const DEFAULT_API_PREFIX: &str = "/.obo";
/// Kubernetes withdraws endpoints asynchronously; set to e.g. 5 s there. Zero elsewhere: stop at once.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::ZERO;
/// In-flight requests get this long after the listener closes; below the kubelet's default 30 s grace
/// period plus the drain delay it is cut short, so raise `terminationGracePeriodSeconds` with it.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections beyond this wait in the accept queue; a sidecar rarely has more than a few hundred.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// A request head not received within this time closes the connection (slowloris).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive connections idle this long are closed; above common client pools' 60 s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// RFC 9110 sets no limit; 64 KiB holds any real token-bearing request. Beyond it: 431.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Connecting to an upstream; a local or in-cluster upstream answers in milliseconds.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Validation of callers' tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Inbound {
    /// Exact `iss` values; a `{tenantid}` template is filled from the token's `tid`.
    pub issuers: Vec<String>,
    /// Overrides of `<issuer>/.well-known/openid-configuration` and of discovery's `jwks_uri` (one issuer
    /// only); may contain `{tenantid}`.
    pub discovery_url: Option<String>,
    pub jwks_uri: Option<String>,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub clock_skew: Duration,
    pub ca_file: Option<PathBuf>,
    pub policy: Policy,
    /// Tenants a `{tenantid}` issuer accepts; empty: any GUID.
    pub allowed_tenants: Vec<String>,
    pub jwks_refresh: Duration,
    pub jwks_min_refetch: Duration,
    /// Claims read for scopes: a space-separated string or an array.
    pub scope_claims: Vec<String>,
    pub roles_claim: String,
    /// Accept tokens with neither scopes nor roles (ID tokens, app tokens authorized by an ACL).
    pub allow_acl_tokens: bool,
}

/// Keys rotate on the scale of weeks and are announced ahead; hourly picks a new key up even before any
/// token uses it. A `Cache-Control: max-age` from the IdP is honoured between 5 minutes and 24 hours.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(3600);
/// An unknown `kid` may be a freshly rotated key; refetch at most this often per issuer, so a flood of
/// random `kid`s costs the IdP at most one request per interval.
pub const DEFAULT_JWKS_MIN_REFETCH: Duration = Duration::from_secs(5);

/// Who may use a route: one of `scopes` (from `scp`) or one of `roles` (from `roles`).
/// A list not set grants nothing; neither set lets any valid token through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub required_scopes: Option<Vec<String>>,
    pub required_roles: Option<Vec<String>>,
}

impl Policy {
    pub(crate) fn is_set(&self) -> bool {
        self.required_scopes.is_some() || self.required_roles.is_some()
    }
}

/// The exchange grammar spoken to the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Entra's jwt-bearer On-Behalf-Of grant.
    Entra,
    /// RFC 8693 token exchange.
    Rfc8693,
    /// An Azure managed identity itself: `app` routes get its token for their resource, no app registration.
    ManagedIdentity,
}

impl Flavor {
    pub fn as_str(self) -> &'static str {
        match self {
            Flavor::Entra => "entra",
            Flavor::Rfc8693 => "rfc8693",
            Flavor::ManagedIdentity => "managed_identity",
        }
    }
}

/// The placeholder of multi-tenant URLs, filled from the caller's validated `tid`.
pub const TENANT_PLACEHOLDER: &str = "{tenantid}";
/// The name of `[identity]`; `[identities.NAME]` add more.
pub const DEFAULT_IDENTITY: &str = "default";

/// One client registration of this sidecar at an IdP.
#[derive(Debug)]
pub struct Identity {
    pub name: String,
    pub flavor: Flavor,
    /// May contain `{tenantid}`.
    pub token_endpoint: String,
    pub client_id: String,
    pub credential: Credential,
    pub auth_method: AuthMethod,
    /// Entra client capabilities (e.g. `cp1` for CAE), sent in the `claims` parameter.
    pub client_capabilities: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
    pub max_concurrent: usize,
}

#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub max_entries: u64,
    pub expiry_margin: Duration,
    /// `[cache.shared]`: the fleet's token cache on Redis (SPEC §14).
    pub shared: Option<SharedCacheSettings>,
}

/// `[cache.shared]`: where the shared cache is, and the keys that seal its values.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedCacheSettings {
    /// The whole URL (it may carry a password).
    pub url: Secret,
    /// The URL without its credentials, for logs and `check`.
    pub display: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// The first key seals; the others only open (rotation).
    pub keys: EncryptionKeys,
    pub key_prefix: String,
    /// The longest any Redis operation may add to a request.
    pub timeout: Duration,
    /// How long one replica may hold the right to exchange for a key while the others wait.
    pub lease: Duration,
    /// Extra PEM roots for `rediss://`.
    pub ca_file: Option<PathBuf>,
}

/// 32-byte keys of the shared cache: the first seals, all open.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptionKeys(pub Vec<[u8; 32]>);

impl fmt::Debug for EncryptionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncryptionKeys({} keys, [redacted])", self.0.len())
    }
}

/// Defaults of `[cache.shared]` (SPEC §14).
pub const DEFAULT_SHARED_KEY_PREFIX: &str = "obo:";
pub const DEFAULT_SHARED_TIMEOUT: Duration = Duration::from_millis(50);
pub const DEFAULT_SHARED_LEASE: Duration = Duration::from_secs(5);

/// Which token a route sends upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Exchanged On-Behalf-Of the caller.
    Obo,
    /// The sidecar's own token (client credentials).
    App,
    /// The caller's own token, unchanged.
    Passthrough,
    /// No `Authorization` header.
    None,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Obo => "obo",
            TokenKind::App => "app",
            TokenKind::Passthrough => "passthrough",
            TokenKind::None => "none",
        }
    }
}

#[derive(Debug, Clone)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "each flag is one independent configuration key, not a state"
)]
pub struct Route {
    pub name: String,
    /// As configured, for display.
    pub path_prefix: String,
    /// Normalized for matching: no trailing `/`; the root prefix is `""`.
    pub match_prefix: String,
    pub upstream: Url,
    pub token: TokenKind,
    /// The identity (`[identity]` is `"default"`) that acquires this route's tokens.
    pub identity: String,
    pub scopes: Vec<String>,
    /// RFC 8693 `audience` values.
    pub audience: Vec<String>,
    /// RFC 8693 / RFC 8707 `resource` values.
    pub resource: Vec<String>,
    /// RFC 8693 `requested_token_type`.
    pub requested_token_type: Option<String>,
    /// The route's own policy when it sets one, else `[inbound]`'s.
    pub policy: Policy,
    pub timeout: Duration,
    /// Only requests for this host (the `Host` header without its port, lowercase).
    pub host: Option<String>,
    /// Only these methods.
    pub methods: Option<Vec<http::Method>>,
    pub caller_auth: CallerAuth,
    /// Headers set from validated claims, replacing anything the caller sent under any spelling.
    pub forward_claims: Vec<(http::HeaderName, String)>,
    /// More headers not forwarded (lowercase, `_` read as `-`).
    pub remove_request_headers: Vec<String>,
    /// Forward the caller's `Host` instead of the upstream's authority.
    pub preserve_host: bool,
    /// Served on the token API (SPEC §5).
    pub token_api: bool,
    /// Answers `{api_prefix}/forward-auth/{name}` for an ingress (SPEC §16).
    pub forward_auth: bool,
    /// In the routing table (`proxy = false`: reachable by name only, from the token API, forward-auth or
    /// Microsoft's sidecar endpoints).
    pub proxy: bool,
    /// What Microsoft's sidecar endpoints may change and call (SPEC §16).
    pub compat: RouteCompat,
    /// HTTP/2 to the upstream (prior knowledge for `http://`, ALPN for `https://`).
    pub http2: bool,
    pub connect_timeout: Duration,
    /// Extra roots for this upstream's TLS.
    pub ca_file: Option<PathBuf>,
}

impl Route {
    /// A route with every key at its default, sending `token`: the token API's `/validate` pseudo-route, and
    /// unit tests, start from it.
    pub(crate) fn placeholder(token: TokenKind) -> Route {
        Route {
            name: String::new(),
            path_prefix: "/".into(),
            match_prefix: String::new(),
            upstream: Url::parse("http://127.0.0.1/")
                .unwrap_or_else(|_| unreachable!("a fixed valid URL")),
            token,
            identity: DEFAULT_IDENTITY.into(),
            scopes: vec![],
            audience: vec![],
            resource: vec![],
            requested_token_type: None,
            policy: Policy::default(),
            timeout: DEFAULT_ROUTE_TIMEOUT,
            host: None,
            methods: None,
            caller_auth: CallerAuth::Required,
            forward_claims: vec![],
            remove_request_headers: vec![],
            preserve_host: false,
            token_api: false,
            forward_auth: false,
            proxy: true,
            compat: RouteCompat::default(),
            http2: false,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            ca_file: None,
        }
    }

    /// A route for unit tests: `prefix` to `upstream`, sending `token`, every other key at its default.
    #[cfg(test)]
    pub(crate) fn for_tests(prefix: &str, upstream: &str, token: TokenKind) -> Route {
        Route {
            name: "r".into(),
            path_prefix: prefix.into(),
            match_prefix: prefix.trim_end_matches('/').into(),
            upstream: Url::parse(upstream).unwrap_or_else(|e| panic!("{upstream}: {e}")),
            ..Route::placeholder(token)
        }
    }
}

/// Whether a route validates its callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerAuth {
    Required,
    /// No caller token needed (only for `app`/`none` routes on a loopback listener).
    None,
}

/// One configuration problem and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration ({} problem", self.problems.len())?;
        if self.problems.len() != 1 {
            f.write_str("s")?;
        }
        f.write_str(")")?;
        for problem in &self.problems {
            write!(f, "\n  {problem}")?;
        }
        Ok(())
    }
}

/// Where `{ env = "NAME" }` secrets are looked up; tests and `demo` pass their own.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Why `caller_auth = "none"` needs a loopback proxy listener.
pub(crate) const NONE_NEEDS_LOOPBACK: &str = "\"none\" only when the proxy listener is loopback: anyone who can reach it could use this route";

/// Entra's public cloud authority, used when `AZURE_AUTHORITY_HOST` is unset (workload-identity webhook).
pub const DEFAULT_AZURE_AUTHORITY_HOST: &str = "https://login.microsoftonline.com/";
/// Token requests in flight to one IdP; more wait (bounded by the request's deadline). Entra throttles per
/// app; 64 keeps a cold burst from looking like an attack while never being the bottleneck of a warm cache.
pub const DEFAULT_MAX_CONCURRENT: usize = 64;

/// True for `localhost` and loopback IP literals.
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Whether the proxy listener is reachable only from this host.
pub fn is_loopback_addr(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => ip.is_loopback(),
    }
}

/// Case folding for matching path prefixes: Unicode upper case, then lower case, so `ı`, `ſ`, `K` (Kelvin)
/// and `ß` meet their ASCII look-alikes the way .NET's and Java's case-insensitive comparisons let them.
/// Two prefixes that fold alike are one prefix.
pub(crate) fn fold(text: &str) -> String {
    if text.is_ascii() {
        return text.to_ascii_lowercase();
    }
    text.chars()
        .flat_map(char::to_uppercase)
        .flat_map(char::to_lowercase)
        .collect()
}

/// `[compat]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compat {
    /// Serve `/Validate`, `/AuthorizationHeader[Unauthenticated]/{api}` and
    /// `/DownstreamApi[Unauthenticated]/{api}` on the proxy listener.
    pub microsoft_sidecar: bool,
}

/// A route as Microsoft's sidecar endpoints see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteCompat {
    /// The `optionsOverride.*` query parameters a caller may use on this route; others are ignored.
    pub overrides: Vec<CompatOverride>,
    /// The scopes an `optionsOverride.Scopes` may ask for (`compat_scopes`; empty: any).
    pub scopes: Vec<String>,
    /// What `/DownstreamApi/{name}` calls below the upstream URL (`RelativePath`).
    pub relative_path: String,
    /// And with which method (`HttpMethod`, default GET).
    pub http_method: http::Method,
}

impl Default for RouteCompat {
    fn default() -> Self {
        RouteCompat {
            overrides: Vec::new(),
            scopes: Vec::new(),
            relative_path: String::new(),
            http_method: http::Method::GET,
        }
    }
}

/// An `optionsOverride.<Name>` query parameter obo-sidecar honours when the route allows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompatOverride {
    Scopes,
    RequestAppToken,
    RelativePath,
    HttpMethod,
    AcceptHeader,
    ContentType,
}

impl CompatOverride {
    pub const ALL: [CompatOverride; 6] = [
        CompatOverride::Scopes,
        CompatOverride::RequestAppToken,
        CompatOverride::RelativePath,
        CompatOverride::HttpMethod,
        CompatOverride::AcceptHeader,
        CompatOverride::ContentType,
    ];

    /// The name after `optionsOverride.`, as Microsoft spells it.
    pub const fn name(self) -> &'static str {
        match self {
            CompatOverride::Scopes => "Scopes",
            CompatOverride::RequestAppToken => "RequestAppToken",
            CompatOverride::RelativePath => "RelativePath",
            CompatOverride::HttpMethod => "HttpMethod",
            CompatOverride::AcceptHeader => "AcceptHeader",
            CompatOverride::ContentType => "ContentType",
        }
    }

    /// The override named `name`, in any letter case (.NET binds query keys so).
    pub fn from_name(name: &str) -> Option<CompatOverride> {
        CompatOverride::ALL
            .into_iter()
            .find(|o| o.name().eq_ignore_ascii_case(name))
    }
}
