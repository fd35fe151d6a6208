//! `sidecar.toml` -> [`Config`]. The TOML is read into a `toml::Table` and walked key by key, so that one
//! pass reports **every** problem with its key path (`routes[1].upstream: relative URL without a base`)
//! instead of stopping at the first, as `serde` would. Unknown keys are problems too: a key that this
//! version does not implement is refused, never accepted and ignored.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::Algorithm;
use toml::{Table, Value};
use url::Url;

use crate::exchange::client_auth::{AuthMethod, CertificateKey, Credential};
use crate::secret::Secret;
use std::sync::Arc;

/// Loopback by default: a sidecar is reached by its own pod or host, never by the network unless told.
pub const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:15080";
/// Probes reach the admin listener; in Kubernetes bind it to `0.0.0.0`.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:15090";
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
    /// Accepted, but worth an operator's attention (`check` prints them).
    pub warnings: Vec<Problem>,
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
    fn is_set(&self) -> bool {
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
}

impl Flavor {
    pub fn as_str(self) -> &'static str {
        match self {
            Flavor::Entra => "entra",
            Flavor::Rfc8693 => "rfc8693",
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
}

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
    /// HTTP/2 to the upstream (prior knowledge for `http://`, ALPN for `https://`).
    pub http2: bool,
    pub connect_timeout: Duration,
    /// Extra roots for this upstream's TLS.
    pub ca_file: Option<PathBuf>,
}

#[cfg(test)]
impl Route {
    /// A route for unit tests: `prefix` to `upstream`, sending `token`, every other key at its default.
    pub(crate) fn for_tests(prefix: &str, upstream: &str, token: TokenKind) -> Route {
        Route {
            name: "r".into(),
            path_prefix: prefix.into(),
            match_prefix: prefix.trim_end_matches('/').into(),
            upstream: Url::parse(upstream).unwrap_or_else(|e| panic!("{upstream}: {e}")),
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
            http2: false,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            ca_file: None,
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

impl Config {
    /// Reads and validates a configuration file, with secrets from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![Problem {
                path: String::new(),
                message: format!("cannot read {}: {e}", path.display()),
            }],
        })?;
        let overrides: Vec<(String, String)> = std::env::vars()
            .filter(|(name, _)| name.starts_with(ENV_OVERRIDE_PREFIX))
            .collect();
        Config::parse_with_overrides(&text, &|name| std::env::var(name).ok(), &overrides)
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str, env: EnvLookup<'_>) -> Result<Config, ConfigError> {
        Config::parse_with_overrides(text, env, &[])
    }

    /// Parses configuration text, then applies environment overrides (`OBO_SIDECAR__LISTEN__PROXY=…`, routes
    /// and identities addressed by name: `OBO_SIDECAR__ROUTES__GRAPH__UPSTREAM=…`), then validates.
    pub fn parse_with_overrides(
        text: &str,
        env: EnvLookup<'_>,
        overrides: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut table: Table = text.parse().map_err(|e: toml::de::Error| ConfigError {
            problems: vec![Problem {
                path: String::new(),
                message: format!("TOML syntax: {}", e.message().trim()),
            }],
        })?;
        let mut problems = Problems::default();
        for (name, value) in overrides {
            apply_override(&mut table, name, value, &mut problems);
        }
        let config = read_config(&table, env, &mut problems);
        match config {
            Some(config) if problems.0.is_empty() => Ok(config),
            _ => Err(ConfigError {
                problems: problems.0,
            }),
        }
    }

    /// The route rules that depend on the proxy listener, checked against `self.listen`: a reload keeps the
    /// running `[listen]`, so the new routes must be checked against it, not against the file's.
    pub fn listener_problems(&self) -> Vec<Problem> {
        let loopback = is_loopback_addr(&self.listen.proxy);
        self.routes
            .iter()
            .enumerate()
            .filter(|(_, route)| route.caller_auth == CallerAuth::None && !loopback)
            .map(|(i, route)| Problem {
                path: format!("routes[{i}].caller_auth"),
                message: format!(
                    "route {:?}: {NONE_NEEDS_LOOPBACK} (the running proxy listener is {})",
                    route.name, self.listen.proxy
                ),
            })
            .collect()
    }

    /// The identity a route acquires its tokens with.
    pub fn identity_for(&self, route: &Route) -> Option<&Arc<Identity>> {
        self.identities.get(&route.identity)
    }
}

/// Why `caller_auth = "none"` needs a loopback proxy listener.
const NONE_NEEDS_LOOPBACK: &str = "\"none\" only when the proxy listener is loopback: anyone who can reach it could use this route";

/// Environment variables that override configuration keys start with this; `__` separates levels.
pub const ENV_OVERRIDE_PREFIX: &str = "OBO_SIDECAR__";

/// Sets the key an `OBO_SIDECAR__A__B` variable names. The value is read as TOML (`true`, `5`, `["a"]`,
/// `{ env = "X" }`), else taken as a string. `ROUTES__<NAME>` picks the route of that name (letters
/// compared case-insensitively, `-` written `_`).
fn apply_override(table: &mut Table, name: &str, value: &str, p: &mut Problems) {
    let Some(path) = name.strip_prefix(ENV_OVERRIDE_PREFIX) else {
        return;
    };
    let segments: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
    let value = format!("v = {value}")
        .parse::<Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(value.to_owned()));
    let mut current = table;
    let mut index = 0;
    while index + 1 < segments.len() {
        let segment = &segments[index];
        if segment == "routes" {
            let Some(route_name) = segments.get(index + 1) else {
                break;
            };
            let found = match current.get_mut("routes") {
                Some(Value::Array(routes)) => routes.iter_mut().find_map(|route| match route {
                    Value::Table(t)
                        if t.get("name").and_then(Value::as_str).is_some_and(|n| {
                            n.to_ascii_lowercase().replace('-', "_") == *route_name
                        }) =>
                    {
                        Some(t)
                    }
                    _ => None,
                }),
                _ => None,
            };
            let Some(route) = found else {
                p.add(name, format!("no route named {route_name:?} to override"));
                return;
            };
            current = route;
            index += 2;
            continue;
        }
        let entry = current
            .entry(segment.clone())
            .or_insert_with(|| Value::Table(Table::new()));
        let Value::Table(next) = entry else {
            p.add(name, format!("{segment} is not a table"));
            return;
        };
        current = next;
        index += 1;
    }
    match segments.get(index) {
        Some(key) if index + 1 == segments.len() && !key.is_empty() => {
            current.insert(key.clone(), value);
        }
        _ => p.add(name, "does not name a key"),
    }
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: &str, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.to_owned(),
            message: message.into(),
        });
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// A table being read: remembers which keys were taken so the rest can be reported as unknown.
struct Fields<'a> {
    table: &'a Table,
    path: String,
    known: &'static [&'static str],
}

impl<'a> Fields<'a> {
    fn new(
        table: &'a Table,
        path: impl Into<String>,
        known: &'static [&'static str],
        p: &mut Problems,
    ) -> Self {
        let path = path.into();
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                p.add(&join(&path, key), "unknown key");
            }
        }
        Fields { table, path, known }
    }

    fn at(&self, key: &str) -> String {
        debug_assert!(self.known.contains(&key), "{key} read but not declared");
        join(&self.path, key)
    }

    fn value(&self, key: &str) -> Option<&'a Value> {
        self.table.get(key)
    }

    fn string(&self, key: &str, p: &mut Problems) -> Option<&'a str> {
        match self.value(key)? {
            Value::String(s) => Some(s),
            other => {
                p.add(
                    &self.at(key),
                    format!("expected a string, found {}", other.type_str()),
                );
                None
            }
        }
    }

    fn required_string(&self, key: &str, p: &mut Problems) -> Option<&'a str> {
        if self.value(key).is_none() {
            p.add(&self.at(key), "missing");
            return None;
        }
        let s = self.string(key, p)?;
        if s.trim().is_empty() {
            p.add(&self.at(key), "must not be empty");
            return None;
        }
        Some(s)
    }

    fn strings(&self, key: &str, p: &mut Problems) -> Option<Vec<String>> {
        match self.value(key)? {
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) if !s.trim().is_empty() => out.push(s.clone()),
                        Value::String(_) => {
                            p.add(&format!("{}[{i}]", self.at(key)), "must not be empty");
                        }
                        other => p.add(
                            &format!("{}[{i}]", self.at(key)),
                            format!("expected a string, found {}", other.type_str()),
                        ),
                    }
                }
                Some(out)
            }
            other => {
                p.add(
                    &self.at(key),
                    format!("expected an array of strings, found {}", other.type_str()),
                );
                None
            }
        }
    }

    fn table(&self, key: &str, p: &mut Problems) -> Option<&'a Table> {
        match self.value(key)? {
            Value::Table(t) => Some(t),
            other => {
                p.add(
                    &self.at(key),
                    format!("expected a table, found {}", other.type_str()),
                );
                None
            }
        }
    }

    fn duration(&self, key: &str, default: Duration, p: &mut Problems) -> Duration {
        let Some(text) = self.string(key, p) else {
            return default;
        };
        match humantime::parse_duration(text) {
            Ok(d) => d,
            Err(e) => {
                p.add(
                    &self.at(key),
                    format!("not a duration like \"30s\" or \"5m\": {e}"),
                );
                default
            }
        }
    }

    /// A duration between `min` and `max` (inclusive).
    fn bounded_duration(
        &self,
        key: &str,
        default: Duration,
        min: Duration,
        max: Duration,
        p: &mut Problems,
    ) -> Duration {
        let value = self.duration(key, default, p);
        if value < min || value > max {
            p.add(
                &self.at(key),
                format!(
                    "must be between {} and {}",
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
            );
            return default;
        }
        value
    }

    fn boolean(&self, key: &str, default: bool, p: &mut Problems) -> bool {
        match self.value(key) {
            None => default,
            Some(Value::Boolean(b)) => *b,
            Some(other) => {
                p.add(
                    &self.at(key),
                    format!("expected true or false, found {}", other.type_str()),
                );
                default
            }
        }
    }

    /// An integer from `min` to `max`.
    fn integer(
        &self,
        key: &str,
        default: usize,
        min: usize,
        max: usize,
        p: &mut Problems,
    ) -> usize {
        match self.value(key) {
            None => default,
            Some(Value::Integer(n))
                if usize::try_from(*n).is_ok_and(|n| (min..=max).contains(&n)) =>
            {
                usize::try_from(*n).unwrap_or(default)
            }
            Some(_) => {
                p.add(
                    &self.at(key),
                    format!("expected an integer from {min} to {max}"),
                );
                default
            }
        }
    }

    /// A PEM file of one or more CA certificates.
    fn pem_roots(&self, key: &str, p: &mut Problems) -> Option<PathBuf> {
        let text = self.string(key, p)?;
        let path = PathBuf::from(text);
        match crate::tls::read_pem_certificates(&path) {
            Ok(_) => {}
            Err(e) => p.add(&self.at(key), crate::auth::jwks::error_chain(&e)),
        }
        Some(path)
    }

    fn socket_addr(&self, key: &str, default: &str, p: &mut Problems) -> Option<SocketAddr> {
        let text = self.string(key, p).unwrap_or(default);
        if let Ok(addr) = text.parse() {
            Some(addr)
        } else {
            p.add(&self.at(key), format!("not an IP:port address: {text:?}"));
            None
        }
    }

    fn url(&self, key: &str, p: &mut Problems) -> Option<Url> {
        let text = self.string(key, p)?;
        parse_url(text, &self.at(key), p)
    }
}

fn parse_url(text: &str, at: &str, p: &mut Problems) -> Option<Url> {
    match Url::parse(text) {
        Ok(url) if url.scheme() == "http" || url.scheme() == "https" => {
            if url.host().is_none() {
                p.add(at, "URL has no host");
                return None;
            }
            Some(url)
        }
        Ok(url) => {
            p.add(
                at,
                format!("scheme {:?} is not http or https", url.scheme()),
            );
            None
        }
        Err(e) => {
            p.add(at, e.to_string());
            None
        }
    }
}

/// A URL that may contain `{tenantid}`: checked with a GUID in its place. No other placeholder.
fn template_url(template: &str, at: &str, p: &mut Problems) -> Option<Url> {
    let probe = template.replace(TENANT_PLACEHOLDER, "00000000-0000-0000-0000-000000000000");
    if probe.contains(['{', '}']) {
        p.add(at, "the only placeholder allowed is {tenantid}");
        return None;
    }
    parse_url(&probe, at, p)
}

/// True for `localhost` and loopback IP literals.
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// An IdP URL carries tokens and keys: https, unless the IdP is on this host.
fn require_https(url: &Url, at: &str, p: &mut Problems) {
    if url.scheme() != "https" && !is_loopback(url) {
        p.add(at, "an IdP URL must use https unless its host is loopback");
    }
}

fn read_config(root: &Table, env: EnvLookup<'_>, p: &mut Problems) -> Option<Config> {
    let top = Fields::new(
        root,
        "",
        &[
            "listen",
            "inbound",
            "identity",
            "identities",
            "cache",
            "routes",
        ],
        p,
    );

    let listen = read_listen(top.table("listen", p), p);
    let inbound = if let Some(t) = top.table("inbound", p) {
        Some(read_inbound(t, p))
    } else {
        p.add(
            "inbound",
            "missing: every route validates its callers' tokens",
        );
        None
    };
    let identities = read_identities(&top, env, p);
    let mut declared: HashSet<String> = HashSet::new();
    if top.value("identity").is_some() {
        declared.insert(DEFAULT_IDENTITY.to_owned());
    }
    if let Some(Value::Table(named)) = top.value("identities") {
        declared.extend(named.keys().cloned());
    }
    let cache = read_cache(top.table("cache", p), p);
    let default_policy = inbound
        .as_ref()
        .map(|i| i.policy.clone())
        .unwrap_or_default();
    let context = RouteContext {
        warnings: std::cell::RefCell::new(Vec::new()),
        proxy_listen: listen
            .as_ref()
            .map_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)), |l| l.proxy),
        default_policy: &default_policy,
        declared: &declared,
        identities: &identities,
    };
    let routes = read_routes(&top, &context, p);
    let warnings = context.warnings.into_inner();

    Some(Config {
        listen: listen?,
        inbound: inbound?,
        identities,
        cache,
        routes,
        warnings,
    })
}

fn read_listen(table: Option<&Table>, p: &mut Problems) -> Option<Listen> {
    let empty = Table::new();
    let f = Fields::new(
        table.unwrap_or(&empty),
        "listen",
        &[
            "proxy",
            "admin",
            "api_prefix",
            "tls",
            "drain_delay",
            "drain_timeout",
            "max_connections",
            "header_read_timeout",
            "idle_timeout",
            "max_header_bytes",
        ],
        p,
    );
    let proxy = f.socket_addr("proxy", DEFAULT_PROXY_LISTEN, p);
    let admin = f.socket_addr("admin", DEFAULT_ADMIN_LISTEN, p);
    let api_prefix = match f.string("api_prefix", p).unwrap_or(DEFAULT_API_PREFIX) {
        "" => None,
        prefix => match normalize_prefix(prefix) {
            Ok(normalized) if !normalized.is_empty() => Some(normalized),
            Ok(_) => {
                p.add(&f.at("api_prefix"), "\"/\" would hide every route; use a path such as \"/.obo\", or \"\" to disable");
                None
            }
            Err(message) => {
                p.add(&f.at("api_prefix"), message);
                None
            }
        },
    };
    let tls = f.table("tls", p).and_then(|t| {
        let tf = Fields::new(
            t,
            f.at("tls"),
            &["cert_file", "key_file", "client_ca_file"],
            p,
        );
        let cert_file = tf.required_string("cert_file", p).map(PathBuf::from);
        let key_file = tf.required_string("key_file", p).map(PathBuf::from);
        let client_ca_file = tf.pem_roots("client_ca_file", p);
        if let (Some(cert), Some(key)) = (&cert_file, &key_file)
            && let Err(e) = crate::tls::server_config(cert, key, client_ca_file.as_deref())
        {
            p.add(&f.at("tls"), crate::auth::jwks::error_chain(&e));
        }
        Some(ListenTls {
            cert_file: cert_file?,
            key_file: key_file?,
            client_ca_file,
        })
    });
    let drain_delay = f.bounded_duration(
        "drain_delay",
        DEFAULT_DRAIN_DELAY,
        Duration::ZERO,
        Duration::from_secs(600),
        p,
    );
    let drain_timeout = f.bounded_duration(
        "drain_timeout",
        DEFAULT_DRAIN_TIMEOUT,
        Duration::ZERO,
        Duration::from_secs(3600),
        p,
    );
    let header_read_timeout = f.bounded_duration(
        "header_read_timeout",
        DEFAULT_HEADER_READ_TIMEOUT,
        Duration::from_millis(100),
        Duration::from_secs(600),
        p,
    );
    let idle_timeout = f.bounded_duration(
        "idle_timeout",
        DEFAULT_IDLE_TIMEOUT,
        Duration::from_secs(1),
        Duration::from_secs(86_400),
        p,
    );
    let max_connections = f.integer("max_connections", DEFAULT_MAX_CONNECTIONS, 1, 1_000_000, p);
    let max_header_bytes = f.integer(
        "max_header_bytes",
        DEFAULT_MAX_HEADER_BYTES,
        8192,
        1024 * 1024,
        p,
    );
    Some(Listen {
        proxy: proxy?,
        admin: admin?,
        api_prefix,
        tls,
        drain_delay,
        drain_timeout,
        max_connections,
        header_read_timeout,
        idle_timeout,
        max_header_bytes,
    })
}

fn read_policy(f: &Fields<'_>, p: &mut Problems) -> Policy {
    let mut names = |key: &str| {
        let names = f.strings(key, p)?;
        for (i, name) in names.iter().enumerate() {
            // Scopes are space-separated in tokens (RFC 6749 §3.3): a name with a space could never match.
            if name.contains(' ') {
                p.add(
                    &format!("{}[{i}]", f.at(key)),
                    "a scope or role name cannot contain a space",
                );
            }
        }
        Some(names)
    };
    Policy {
        required_scopes: names("required_scopes"),
        required_roles: names("required_roles"),
    }
}

fn read_inbound(table: &Table, p: &mut Problems) -> Inbound {
    let f = Fields::new(
        table,
        "inbound",
        &[
            "issuers",
            "discovery_url",
            "jwks_uri",
            "audiences",
            "algorithms",
            "clock_skew",
            "ca_file",
            "required_scopes",
            "required_roles",
            "allowed_tenants",
            "jwks_refresh",
            "jwks_min_refetch",
            "scope_claims",
            "roles_claim",
            "allow_acl_tokens",
        ],
        p,
    );
    let issuers = f.strings("issuers", p).unwrap_or_default();
    if issuers.is_empty() {
        p.add(&f.at("issuers"), "at least one issuer is required");
    }
    for (i, issuer) in issuers.iter().enumerate() {
        let at = format!("{}[{i}]", f.at("issuers"));
        if let Some(url) = template_url(issuer, &at, p) {
            require_https(&url, &at, p);
        }
    }
    let discovery_url = f.string("discovery_url", p).map(str::to_owned);
    let jwks_uri = f.string("jwks_uri", p).map(str::to_owned);
    for (key, template) in [("discovery_url", &discovery_url), ("jwks_uri", &jwks_uri)] {
        if let Some(template) = template {
            if let Some(url) = template_url(template, &f.at(key), p) {
                require_https(&url, &f.at(key), p);
            }
            if issuers.len() > 1 {
                p.add(&f.at(key), "can only be set with exactly one issuer");
            }
        }
    }
    // Tenant ids as Entra writes them in `tid` and in issuers: lowercase GUIDs.
    let allowed_tenants: Vec<String> = f
        .strings("allowed_tenants", p)
        .unwrap_or_default()
        .iter()
        .map(|t| t.to_ascii_lowercase())
        .collect();
    for (i, tenant) in allowed_tenants.iter().enumerate() {
        if !crate::exchange::is_guid(tenant) {
            p.add(
                &format!("{}[{i}]", f.at("allowed_tenants")),
                "a tenant id is a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx), as in the tokens' tid",
            );
        }
    }
    if !allowed_tenants.is_empty() && !issuers.iter().any(|i| i.contains(TENANT_PLACEHOLDER)) {
        p.add(
            &f.at("allowed_tenants"),
            "only meaningful with a {tenantid} issuer",
        );
    }
    let jwks_refresh = f.bounded_duration(
        "jwks_refresh",
        DEFAULT_JWKS_REFRESH,
        Duration::from_secs(60),
        Duration::from_secs(7 * 86_400),
        p,
    );
    let jwks_min_refetch = f.bounded_duration(
        "jwks_min_refetch",
        DEFAULT_JWKS_MIN_REFETCH,
        Duration::from_secs(1),
        Duration::from_secs(3600),
        p,
    );
    let scope_claims = f
        .strings("scope_claims", p)
        .unwrap_or_else(|| vec!["scp".to_owned(), "scope".to_owned()]);
    let roles_claim = f.string("roles_claim", p).unwrap_or("roles").to_owned();
    let audiences = f.strings("audiences", p).unwrap_or_default();
    if audiences.is_empty() {
        p.add(&f.at("audiences"), "at least one audience is required");
    }
    let algorithms = match f.strings("algorithms", p) {
        None => vec![Algorithm::RS256],
        Some(names) => {
            let mut algs = Vec::new();
            for (i, name) in names.iter().enumerate() {
                match parse_algorithm(name) {
                    Ok(alg) => algs.push(alg),
                    Err(msg) => p.add(&format!("{}[{i}]", f.at("algorithms")), msg),
                }
            }
            if names.is_empty() {
                p.add(&f.at("algorithms"), "at least one algorithm is required");
            }
            algs
        }
    };
    let clock_skew = f.bounded_duration(
        "clock_skew",
        DEFAULT_CLOCK_SKEW,
        Duration::ZERO,
        MAX_CLOCK_SKEW,
        p,
    );
    let ca_file = f.pem_roots("ca_file", p);
    let policy = read_policy(&f, p);
    Inbound {
        issuers,
        discovery_url,
        jwks_uri,
        audiences,
        algorithms,
        clock_skew,
        ca_file,
        policy,
        allowed_tenants,
        jwks_refresh,
        jwks_min_refetch,
        scope_claims,
        roles_claim,
        allow_acl_tokens: f.boolean("allow_acl_tokens", false, p),
    }
}

/// The asymmetric algorithms a remote key set can verify. `none` and HS* never: an HMAC "key" taken from a
/// public JWKS is public.
fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    let alg = match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        other
            if other.eq_ignore_ascii_case("none")
                || other.to_ascii_uppercase().starts_with("HS") =>
        {
            return Err(format!(
                "{other:?} is never accepted: only RS*, PS* and ES* algorithms verify with a published key"
            ));
        }
        other => {
            return Err(format!(
                "unknown algorithm {other:?} (RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384)"
            ));
        }
    };
    Ok(alg)
}

fn read_secret(f: &Fields<'_>, key: &str, env: EnvLookup<'_>, p: &mut Problems) -> Option<Secret> {
    let at = f.at(key);
    match f.value(key)? {
        Value::String(_) => {
            p.add(
                &at,
                "secrets are never written inline: use { env = \"NAME\" } or { file = \"/path\" }",
            );
            None
        }
        Value::Table(t) => {
            let sf = Fields::new(t, at.clone(), &["env", "file"], p);
            match (sf.string("env", p), sf.string("file", p)) {
                (Some(name), None) => match env(name) {
                    Some(value) if !value.trim().is_empty() => Some(Secret::new(value.trim())),
                    Some(_) => {
                        p.add(
                            &sf.at("env"),
                            format!("environment variable {name} is empty"),
                        );
                        None
                    }
                    None => {
                        p.add(
                            &sf.at("env"),
                            format!("environment variable {name} is not set"),
                        );
                        None
                    }
                },
                (None, Some(path)) => match std::fs::read_to_string(path) {
                    Ok(value) if !value.trim().is_empty() => Some(Secret::new(value.trim())),
                    Ok(_) => {
                        p.add(&sf.at("file"), format!("{path} is empty"));
                        None
                    }
                    Err(e) => {
                        p.add(&sf.at("file"), format!("cannot read {path}: {e}"));
                        None
                    }
                },
                (Some(_), Some(_)) => {
                    p.add(&at, "set env or file, not both");
                    None
                }
                (None, None) => {
                    p.add(&at, "expected { env = \"NAME\" } or { file = \"/path\" }");
                    None
                }
            }
        }
        other => {
            p.add(
                &at,
                format!(
                    "expected {{ env = \"NAME\" }} or {{ file = \"/path\" }}, found {}",
                    other.type_str()
                ),
            );
            None
        }
    }
}

/// Entra's public cloud authority, used when `AZURE_AUTHORITY_HOST` is unset (workload-identity webhook).
pub const DEFAULT_AZURE_AUTHORITY_HOST: &str = "https://login.microsoftonline.com/";
/// Token requests in flight to one IdP; more wait (bounded by the request's deadline). Entra throttles per
/// app; 64 keeps a cold burst from looking like an attack while never being the bottleneck of a warm cache.
pub const DEFAULT_MAX_CONCURRENT: usize = 64;

fn read_identity(
    table: &Table,
    name: &str,
    at: &str,
    env: EnvLookup<'_>,
    p: &mut Problems,
) -> Option<Identity> {
    let f = Fields::new(
        table,
        at,
        &[
            "flavor",
            "token_endpoint",
            "client_id",
            "client_secret",
            "client_certificate",
            "client_assertion_file",
            "auth_method",
            "client_capabilities",
            "ca_file",
            "timeout",
            "max_concurrent",
        ],
        p,
    );
    let flavor = match f.string("flavor", p).unwrap_or("entra") {
        "entra" => Some(Flavor::Entra),
        "rfc8693" => Some(Flavor::Rfc8693),
        other => {
            p.add(
                &f.at("flavor"),
                format!("unknown flavor {other:?}: \"entra\" or \"rfc8693\""),
            );
            None
        }
    };
    let entra = flavor == Some(Flavor::Entra);
    // Entra: unset keys fall back to what the Azure workload-identity webhook injects.
    let token_endpoint = match f.string("token_endpoint", p) {
        Some(text) => Some(text.to_owned()),
        None if f.value("token_endpoint").is_some() => None,
        None => {
            if let (true, Some(tenant)) = (entra, env("AZURE_TENANT_ID")) {
                let host = env("AZURE_AUTHORITY_HOST")
                    .unwrap_or_else(|| DEFAULT_AZURE_AUTHORITY_HOST.to_owned());
                Some(format!(
                    "{}/{}/oauth2/v2.0/token",
                    host.trim_end_matches('/'),
                    tenant.trim()
                ))
            } else {
                p.add(&f.at("token_endpoint"), "missing");
                None
            }
        }
    };
    let token_endpoint = token_endpoint.and_then(|template| {
        let at = f.at("token_endpoint");
        let url = template_url(&template, &at, p)?;
        require_https(&url, &at, p);
        Some(template)
    });
    let client_id = match f.string("client_id", p) {
        Some(id) if !id.trim().is_empty() => Some(id.to_owned()),
        Some(_) => {
            p.add(&f.at("client_id"), "must not be empty");
            None
        }
        None if f.value("client_id").is_some() => None,
        None => {
            if let Some(id) = env("AZURE_CLIENT_ID").filter(|_| entra) {
                Some(id)
            } else {
                p.add(&f.at("client_id"), "missing");
                None
            }
        }
    };
    let credential = read_credential(&f, entra, env, p);
    let auth_method = match f.string("auth_method", p) {
        None => credential.as_ref().map(|c| match c {
            Credential::Secret(_) => AuthMethod::ClientSecretPost,
            Credential::Certificate(_) => AuthMethod::PrivateKeyJwt,
            Credential::AssertionFile(_) => AuthMethod::ClientAssertionFile,
        }),
        Some(text) => {
            if let Some(method) = AuthMethod::parse(text) {
                let fits = matches!(
                    (&credential, method),
                    (
                        Some(Credential::Secret(_)),
                        AuthMethod::ClientSecretPost | AuthMethod::ClientSecretBasic,
                    ) | (Some(Credential::Certificate(_)), AuthMethod::PrivateKeyJwt)
                        | (
                            Some(Credential::AssertionFile(_)),
                            AuthMethod::ClientAssertionFile
                        )
                        | (None, _)
                );
                if !fits {
                    p.add(
                    &f.at("auth_method"),
                    format!("{text:?} does not fit the credential given (client_secret: client_secret_post or client_secret_basic; client_certificate: private_key_jwt; client_assertion_file: client_assertion_file)"),
                );
                }
                Some(method)
            } else {
                p.add(
                &f.at("auth_method"),
                format!("unknown auth_method {text:?}: client_secret_post, client_secret_basic, private_key_jwt or client_assertion_file"),
            );
                None
            }
        }
    };
    let client_capabilities = f.strings("client_capabilities", p).unwrap_or_default();
    if !client_capabilities.is_empty() && !entra {
        p.add(
            &f.at("client_capabilities"),
            "client capabilities are an Entra feature (flavor = \"entra\")",
        );
    }
    let ca_file = f.pem_roots("ca_file", p);
    let timeout = f.bounded_duration(
        "timeout",
        DEFAULT_IDP_TIMEOUT,
        Duration::from_millis(100),
        MAX_IDP_TIMEOUT,
        p,
    );
    let max_concurrent = f.integer("max_concurrent", DEFAULT_MAX_CONCURRENT, 1, 10_000, p);
    Some(Identity {
        name: name.to_owned(),
        flavor: flavor?,
        token_endpoint: token_endpoint?,
        client_id: client_id?,
        credential: credential?,
        auth_method: auth_method?,
        client_capabilities,
        ca_file,
        timeout,
        max_concurrent,
    })
}

/// Exactly one of `client_secret`, `client_certificate`, `client_assertion_file` (for Entra, the last falls
/// back to `AZURE_FEDERATED_TOKEN_FILE`). Loaded now, so `check` reports what cannot be read.
fn read_credential(
    f: &Fields<'_>,
    entra: bool,
    env: EnvLookup<'_>,
    p: &mut Problems,
) -> Option<Credential> {
    let given: Vec<&str> = [
        "client_secret",
        "client_certificate",
        "client_assertion_file",
    ]
    .into_iter()
    .filter(|k| f.value(k).is_some())
    .collect();
    match given.as_slice() {
        [] => {
            if let Some(path) = env("AZURE_FEDERATED_TOKEN_FILE").filter(|_| entra) {
                return Some(Credential::AssertionFile(PathBuf::from(path)));
            }
            p.add(
                &f.path,
                "no client credential: set client_secret, client_certificate or client_assertion_file",
            );
            None
        }
        ["client_secret"] => read_secret(f, "client_secret", env, p).map(Credential::Secret),
        ["client_certificate"] => {
            let t = f.table("client_certificate", p)?;
            let cf = Fields::new(t, f.at("client_certificate"), &["cert_file", "key_file"], p);
            let cert = cf.required_string("cert_file", p);
            let key = cf.required_string("key_file", p);
            match CertificateKey::load(Path::new(cert?), Path::new(key?)) {
                Ok(loaded) => Some(Credential::Certificate(std::sync::Arc::new(loaded))),
                Err(e) => {
                    p.add(&f.at("client_certificate"), e.to_string());
                    None
                }
            }
        }
        ["client_assertion_file"] => {
            let path = f.string("client_assertion_file", p)?;
            if let Err(e) = std::fs::metadata(path) {
                p.add(
                    &f.at("client_assertion_file"),
                    format!("cannot read {path}: {e}"),
                );
            }
            Some(Credential::AssertionFile(PathBuf::from(path)))
        }
        several => {
            p.add(
                &f.path,
                format!("set one client credential, not {}", several.join(" and ")),
            );
            None
        }
    }
}

fn read_identities(
    top: &Fields<'_>,
    env: EnvLookup<'_>,
    p: &mut Problems,
) -> BTreeMap<String, Arc<Identity>> {
    let mut identities = BTreeMap::new();
    if let Some(table) = top.table("identity", p)
        && let Some(identity) = read_identity(table, DEFAULT_IDENTITY, "identity", env, p)
    {
        identities.insert(DEFAULT_IDENTITY.to_owned(), Arc::new(identity));
    }
    if let Some(named) = top.table("identities", p) {
        for (name, value) in named {
            let at = format!("identities.{name}");
            if name == DEFAULT_IDENTITY {
                p.add(&at, "\"default\" is the name of [identity]; choose another");
                continue;
            }
            if !is_name(name) {
                p.add(
                    &at,
                    "use letters, digits, '-' and '_' (it names the identity in logs and metrics)",
                );
                continue;
            }
            let Value::Table(table) = value else {
                p.add(&at, format!("expected a table, found {}", value.type_str()));
                continue;
            };
            if let Some(identity) = read_identity(table, name, &at, env, p) {
                identities.insert(name.clone(), Arc::new(identity));
            }
        }
    }
    identities
}

fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn read_cache(table: Option<&Table>, p: &mut Problems) -> CacheSettings {
    let empty = Table::new();
    let f = Fields::new(
        table.unwrap_or(&empty),
        "cache",
        &["max_entries", "expiry_margin"],
        p,
    );
    let max_entries = match f.value("max_entries") {
        None => DEFAULT_CACHE_MAX_ENTRIES,
        Some(Value::Integer(n)) if *n > 0 => n.unsigned_abs(),
        Some(_) => {
            p.add(&f.at("max_entries"), "expected a positive integer");
            DEFAULT_CACHE_MAX_ENTRIES
        }
    };
    let expiry_margin = f.bounded_duration(
        "expiry_margin",
        DEFAULT_EXPIRY_MARGIN,
        Duration::ZERO,
        MAX_EXPIRY_MARGIN,
        p,
    );
    CacheSettings {
        max_entries,
        expiry_margin,
    }
}

/// What a route is checked against.
struct RouteContext<'a> {
    warnings: std::cell::RefCell<Vec<Problem>>,
    proxy_listen: SocketAddr,
    default_policy: &'a Policy,
    /// Identity names present in the file (even if they failed to parse).
    declared: &'a HashSet<String>,
    identities: &'a BTreeMap<String, Arc<Identity>>,
}

impl RouteContext<'_> {
    fn warn(&self, path: &str, message: &str) {
        self.warnings.borrow_mut().push(Problem {
            path: path.to_owned(),
            message: message.to_owned(),
        });
    }
}

fn read_routes(top: &Fields<'_>, context: &RouteContext<'_>, p: &mut Problems) -> Vec<Route> {
    let items = match top.value("routes") {
        None => {
            p.add(
                "routes",
                "missing: at least one [[routes]] entry is required",
            );
            return Vec::new();
        }
        Some(Value::Array(items)) => items,
        Some(other) => {
            p.add(
                "routes",
                format!(
                    "expected an array of tables ([[routes]]), found {}",
                    other.type_str()
                ),
            );
            return Vec::new();
        }
    };
    if items.is_empty() {
        p.add("routes", "at least one [[routes]] entry is required");
    }
    let mut routes = Vec::new();
    let mut names = HashSet::new();
    let mut prefixes: BTreeMap<String, String> = BTreeMap::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("routes[{i}]");
        let Value::Table(table) = item else {
            p.add(&at, format!("expected a table, found {}", item.type_str()));
            continue;
        };
        // Duplicates are checked on the raw keys, so they are reported even when the route has other problems.
        let name = table.get("name").and_then(Value::as_str);
        if let Some(name) = name
            && !names.insert(name.to_owned())
        {
            p.add(
                &format!("{at}.name"),
                format!("duplicate route name {name:?}"),
            );
        }
        if let Some(prefix) = table.get("path_prefix").and_then(Value::as_str)
            && let Ok(normalized) = normalize_prefix(prefix)
        {
            // Two routes may share a prefix when host or methods tell them apart.
            let host = table
                .get("host")
                .and_then(Value::as_str)
                .map(str::to_ascii_lowercase);
            let mut methods: Vec<String> = table
                .get("methods")
                .and_then(Value::as_array)
                .map(|m| {
                    m.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_ascii_uppercase)
                        .collect()
                })
                .unwrap_or_default();
            methods.sort();
            // Prefixes match case-insensitively: `/Admin` and `/admin` are one prefix.
            let selector = format!("{} {host:?} {methods:?}", crate::route::fold(&normalized));
            if let Some(other) = prefixes.insert(selector, name.unwrap_or("?").to_owned()) {
                p.add(
                    &format!("{at}.path_prefix"),
                    format!("{prefix:?} is also the prefix of route {other:?} (with the same host and methods)"),
                );
            }
        }
        let Some(route) = read_route(table, &at, context, p) else {
            continue;
        };
        routes.push(route);
    }
    routes
}

fn read_route(
    table: &Table,
    at: &str,
    context: &RouteContext<'_>,
    p: &mut Problems,
) -> Option<Route> {
    let f = Fields::new(
        table,
        at,
        &[
            "name",
            "path_prefix",
            "upstream",
            "token",
            "identity",
            "scopes",
            "audience",
            "resource",
            "requested_token_type",
            "required_scopes",
            "required_roles",
            "timeout",
            "host",
            "methods",
            "caller_auth",
            "forward_claims",
            "remove_request_headers",
            "preserve_host",
            "token_api",
            "allow_plain_http",
            "http2",
            "connect_timeout",
            "ca_file",
        ],
        p,
    );
    let name = f.required_string("name", p);
    if let Some(name) = name
        && !is_name(name)
    {
        p.add(
            &f.at("name"),
            "use letters, digits, '-' and '_' (it names the route in logs and metrics)",
        );
    }
    let path_prefix = f.required_string("path_prefix", p);
    let match_prefix = path_prefix.and_then(|prefix| match normalize_prefix(prefix) {
        Ok(m) => Some(m),
        Err(msg) => {
            p.add(&f.at("path_prefix"), msg);
            None
        }
    });
    let upstream = if f.value("upstream").is_none() {
        p.add(&f.at("upstream"), "missing");
        None
    } else {
        f.url("upstream", p)
    };
    if let Some(url) = &upstream {
        if url.query().is_some() || url.fragment().is_some() {
            p.add(&f.at("upstream"), "must not carry a query or fragment");
        }
        if !url.username().is_empty() || url.password().is_some() {
            p.add(&f.at("upstream"), "must not carry credentials");
        }
    }
    let token = match f.string("token", p) {
        None if f.value("token").is_none() => {
            p.add(
                &f.at("token"),
                "missing: one of \"obo\", \"app\", \"passthrough\", \"none\"",
            );
            None
        }
        None => None,
        Some("obo") => Some(TokenKind::Obo),
        Some("app") => Some(TokenKind::App),
        Some("passthrough") => Some(TokenKind::Passthrough),
        Some("none") => Some(TokenKind::None),
        Some(other) => {
            p.add(&f.at("token"), format!("unknown token kind {other:?}: one of \"obo\", \"app\", \"passthrough\", \"none\""));
            None
        }
    };
    let acquires = matches!(token, Some(TokenKind::Obo | TokenKind::App));
    let identity_name = f
        .string("identity", p)
        .unwrap_or(DEFAULT_IDENTITY)
        .to_owned();
    if f.value("identity").is_some() && !acquires && token.is_some() {
        p.add(&f.at("identity"), "only obo and app routes use an identity");
    }
    if acquires && !context.declared.contains(&identity_name) {
        if f.value("identity").is_some() {
            p.add(
                &f.at("identity"),
                format!("unknown identity {identity_name:?}"),
            );
        } else {
            p.add(
                &f.at("identity"),
                "no [identity]: a route with token = \"obo\" or \"app\" needs the sidecar's client registration",
            );
        }
    }
    let flavor = context.identities.get(&identity_name).map(|i| i.flavor);
    let scopes = f.strings("scopes", p).unwrap_or_default();
    let audience = f.strings("audience", p).unwrap_or_default();
    let resource = f.strings("resource", p).unwrap_or_default();
    let requested_token_type = f.string("requested_token_type", p).map(str::to_owned);
    let exchange_targets =
        !audience.is_empty() || !resource.is_empty() || requested_token_type.is_some();
    if exchange_targets && !(token == Some(TokenKind::Obo) && flavor == Some(Flavor::Rfc8693)) {
        for key in ["audience", "resource", "requested_token_type"] {
            if f.value(key).is_some() {
                p.add(
                    &f.at(key),
                    "only for obo routes whose identity has flavor = \"rfc8693\"",
                );
            }
        }
    }
    match token {
        // RFC 8693 §2.1: scope, audience and resource are each optional; one of them names the target.
        Some(TokenKind::Obo) if flavor == Some(Flavor::Rfc8693) => {
            let untargeted = scopes.is_empty() && audience.is_empty() && resource.is_empty();
            if untargeted {
                p.add(
                    &f.at("scopes"),
                    "an RFC 8693 exchange needs scopes, audience or resource",
                );
            }
        }
        Some(TokenKind::Obo | TokenKind::App) if scopes.is_empty() => {
            p.add(
                &f.at("scopes"),
                "required: the scopes to request for the upstream",
            );
        }
        Some(TokenKind::Passthrough | TokenKind::None) if !scopes.is_empty() => {
            p.add(&f.at("scopes"), "only obo and app routes request scopes");
        }
        _ => {}
    }
    let allow_plain_http = f.boolean("allow_plain_http", false, p);
    if let (Some(url), Some(kind)) = (&upstream, token)
        && kind != TokenKind::None
        && url.scheme() == "http"
        && !is_loopback(url)
    {
        if allow_plain_http {
            context.warn(
                &f.at("allow_plain_http"),
                "tokens go to this upstream over plain http: make sure the network (a mesh) encrypts the hop",
            );
        } else {
            p.add(
                &f.at("upstream"),
                "a route that sends a token needs an https upstream (plain http only to loopback, or set allow_plain_http = true behind a mesh that encrypts the hop)",
            );
        }
    }
    let own_policy = read_policy(&f, p);
    let policy = if own_policy.is_set() {
        own_policy
    } else {
        context.default_policy.clone()
    };
    let timeout = f.bounded_duration(
        "timeout",
        DEFAULT_ROUTE_TIMEOUT,
        Duration::from_millis(1),
        MAX_ROUTE_TIMEOUT,
        p,
    );
    let host = read_host(&f, p);
    let methods = read_methods(&f, p);
    let caller_auth = match f.string("caller_auth", p) {
        None | Some("required") => CallerAuth::Required,
        Some("none") => {
            if matches!(token, Some(TokenKind::Obo | TokenKind::Passthrough)) {
                p.add(&f.at("caller_auth"), "\"none\" only with token = \"app\" or \"none\": obo and passthrough need the caller's token");
            }
            if !is_loopback_addr(&context.proxy_listen) {
                p.add(&f.at("caller_auth"), NONE_NEEDS_LOOPBACK);
            }
            CallerAuth::None
        }
        Some(other) => {
            p.add(
                &f.at("caller_auth"),
                format!("unknown caller_auth {other:?}: \"required\" or \"none\""),
            );
            CallerAuth::Required
        }
    };
    let forward_claims = read_forward_claims(&f, p);
    if caller_auth == CallerAuth::None && !forward_claims.is_empty() {
        p.add(
            &f.at("forward_claims"),
            "a route without caller authentication has no claims to forward",
        );
    }
    let remove_request_headers: Vec<String> = f
        .strings("remove_request_headers", p)
        .unwrap_or_default()
        .iter()
        .map(|h| h.to_ascii_lowercase().replace('_', "-"))
        .collect();
    let preserve_host = f.boolean("preserve_host", false, p);
    let token_api = f.boolean(
        "token_api",
        matches!(token, Some(TokenKind::Obo | TokenKind::Passthrough))
            && caller_auth == CallerAuth::Required,
        p,
    );
    if token_api && caller_auth == CallerAuth::None {
        p.add(&f.at("token_api"), "the token API needs a validated caller");
    } else if token_api && token == Some(TokenKind::None) {
        p.add(
            &f.at("token_api"),
            "a route with token = \"none\" has no Authorization header to hand out",
        );
    }
    let http2 = f.boolean("http2", false, p);
    let connect_timeout = f.bounded_duration(
        "connect_timeout",
        DEFAULT_CONNECT_TIMEOUT,
        Duration::from_millis(1),
        Duration::from_secs(600),
        p,
    );
    let ca_file = f.pem_roots("ca_file", p);
    Some(Route {
        name: name?.to_owned(),
        path_prefix: path_prefix?.to_owned(),
        match_prefix: match_prefix?,
        upstream: upstream?,
        token: token?,
        identity: identity_name,
        scopes,
        audience,
        resource,
        requested_token_type,
        policy,
        timeout,
        host,
        methods,
        caller_auth,
        forward_claims,
        remove_request_headers,
        preserve_host,
        token_api,
        http2,
        connect_timeout,
        ca_file,
    })
}

fn read_host(f: &Fields<'_>, p: &mut Problems) -> Option<String> {
    let host = f.string("host", p)?;
    let valid = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !valid {
        p.add(
            &f.at("host"),
            format!("{host:?} is not a host name (no scheme, port or path)"),
        );
    }
    Some(host.to_ascii_lowercase())
}

fn read_methods(f: &Fields<'_>, p: &mut Problems) -> Option<Vec<http::Method>> {
    let names = f.strings("methods", p)?;
    if names.is_empty() {
        p.add(
            &f.at("methods"),
            "an empty list matches nothing; leave it out to match every method",
        );
    }
    let mut methods = Vec::new();
    for (i, name) in names.iter().enumerate() {
        match http::Method::from_bytes(name.to_ascii_uppercase().as_bytes()) {
            Ok(method) => methods.push(method),
            Err(_) => p.add(
                &format!("{}[{i}]", f.at("methods")),
                format!("{name:?} is not an HTTP method"),
            ),
        }
    }
    methods.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    methods.dedup();
    Some(methods)
}

fn read_forward_claims(f: &Fields<'_>, p: &mut Problems) -> Vec<(http::HeaderName, String)> {
    let Some(table) = f.table("forward_claims", p) else {
        return Vec::new();
    };
    let mut headers = Vec::new();
    for (header, claim) in table {
        let at = format!("{}.{header}", f.at("forward_claims"));
        let Value::String(claim) = claim else {
            p.add(&at, "expected the name of a claim (a string)");
            continue;
        };
        let Ok(name) = http::HeaderName::from_bytes(header.to_ascii_lowercase().as_bytes()) else {
            p.add(&at, "not a valid header name");
            continue;
        };
        if crate::forward::sidecar_owns(name.as_str()) {
            p.add(&at, "this header is set by the sidecar itself");
            continue;
        }
        if claim.is_empty() {
            p.add(&at, "the claim name must not be empty");
            continue;
        }
        headers.push((name, claim.clone()));
    }
    headers
}

/// `/graph/` and `/graph` both become `/graph`; `/` becomes `""` (matches every path).
fn normalize_prefix(prefix: &str) -> Result<String, String> {
    if !prefix.starts_with('/') {
        return Err(format!("{prefix:?} must start with '/'"));
    }
    if prefix.contains(['%', '?', '#', '\\', ';'])
        || prefix.chars().any(char::is_control)
        || prefix.split('/').any(|seg| seg == "." || seg == "..")
    {
        return Err(format!(
            "{prefix:?} must be a plain, normalized path (no '%', '?', '#', '\\', ';', '.' or '..')"
        ));
    }
    if prefix.contains("//") {
        return Err(format!("{prefix:?} must not contain '//'"));
    }
    Ok(prefix.trim_end_matches('/').to_owned())
}

/// Whether the proxy listener is reachable only from this host.
pub fn is_loopback_addr(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => ip.is_loopback(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "OBO_CLIENT_SECRET").then(|| "s3cret".to_owned())
    }

    const GOOD: &str = r#"
[inbound]
issuers = ["https://login.example.com/tenant/v2.0"]
audiences = ["api://my-api"]

[identity]
token_endpoint = "https://login.example.com/tenant/oauth2/v2.0/token"
client_id = "my-api"
client_secret = { env = "OBO_CLIENT_SECRET" }

[[routes]]
name = "graph"
path_prefix = "/graph/"
upstream = "https://graph.example.com/v1.0/"
token = "obo"
scopes = ["https://graph.example.com/.default"]
"#;

    fn problems(text: &str) -> Vec<String> {
        match Config::parse(text, &env) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let config = Config::parse(GOOD, &env).expect("valid");
        assert_eq!(config.listen.proxy.to_string(), DEFAULT_PROXY_LISTEN);
        assert_eq!(config.routes[0].match_prefix, "/graph");
        assert_eq!(config.cache.expiry_margin, DEFAULT_EXPIRY_MARGIN);
        assert_eq!(config.inbound.algorithms, vec![Algorithm::RS256]);
        let identity = &config.identities["default"];
        assert!(matches!(&identity.credential, Credential::Secret(s) if s.expose() == "s3cret"));
        assert_eq!(identity.auth_method, AuthMethod::ClientSecretPost);
        assert_eq!(
            config
                .identity_for(&config.routes[0])
                .map(|i| i.name.as_str()),
            Some("default")
        );
    }

    #[test]
    fn claims_cannot_set_sidecar_headers_and_none_routes_have_no_token_api() {
        let claims = GOOD.replace(
            "token = \"obo\"",
            "token = \"obo\"\nforward_claims = { \"X_Request-Id\" = \"sub\", \"keep-alive\" = \"oid\" }",
        );
        let refused = problems(&claims);
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(
            refused
                .iter()
                .all(|p| p.ends_with("this header is set by the sidecar itself"))
        );
        let none = GOOD
            .replace("token = \"obo\"", "token = \"none\"\ntoken_api = true")
            .replace("scopes = [\"https://graph.example.com/.default\"]", "");
        assert_eq!(
            problems(&none),
            vec![
                "routes[0].token_api: a route with token = \"none\" has no Authorization header to hand out"
                    .to_owned()
            ]
        );
    }

    #[test]
    fn a_scope_or_role_name_with_a_space_is_refused() {
        let text = GOOD.replace(
            "scopes = [\"https://graph.example.com/.default\"]",
            "scopes = [\"https://graph.example.com/.default\"]\nrequired_roles = [\"Realm Admin\"]",
        );
        assert_eq!(
            problems(&text),
            vec![
                "routes[0].required_roles[0]: a scope or role name cannot contain a space"
                    .to_owned()
            ]
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_key_path() {
        let text = GOOD
            .replace("https://graph.example.com/v1.0/", "graph/v1.0")
            .replace(
                "client_id = \"my-api\"",
                "client_id = \"my-api\"\nfavourite = 1",
            )
            .replace("OBO_CLIENT_SECRET", "UNSET_VARIABLE")
            + "\n[[routes]]\nname = \"graph\"\npath_prefix = \"/graph\"\nupstream = \"http://10.0.0.1/\"\ntoken = \"bogus\"\ntimeout = \"soon\"\n";
        let found = problems(&text);
        for expected in [
            "routes[0].upstream: relative URL without a base",
            "identity.favourite: unknown key",
            "identity.client_secret.env: environment variable UNSET_VARIABLE is not set",
            "routes[1].token: unknown token kind \"bogus\"",
            "routes[1].timeout: not a duration",
            "routes[1].name: duplicate route name \"graph\"",
            "routes[1].path_prefix: \"/graph\" is also the prefix of route \"graph\"",
        ] {
            assert!(
                found.iter().any(|p| p.starts_with(expected)),
                "missing {expected:?} in {found:#?}"
            );
        }
    }

    #[test]
    fn inline_secret_none_algorithm_and_plain_idp_are_refused() {
        let text = GOOD
            .replace("{ env = \"OBO_CLIENT_SECRET\" }", "\"inline\"")
            .replace(
                "audiences = [\"api://my-api\"]",
                "audiences = [\"api://my-api\"]\nalgorithms = [\"none\", \"HS256\"]",
            )
            .replace(
                "https://login.example.com/tenant/oauth2",
                "http://login.example.com/tenant/oauth2",
            );
        let found = problems(&text);
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("identity.client_secret: secrets are never written inline"))
        );
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("inbound.algorithms[0]: \"none\" is never accepted"))
        );
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("inbound.algorithms[1]: \"HS256\" is never accepted"))
        );
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("identity.token_endpoint: an IdP URL must use https"))
        );
    }

    #[test]
    fn token_over_plain_http_to_a_remote_upstream_is_refused() {
        let text = GOOD.replace(
            "https://graph.example.com/v1.0/",
            "http://graph.example.com/",
        );
        assert!(problems(&text).iter().any(|p| p.starts_with(
            "routes[0].upstream: a route that sends a token needs an https upstream"
        )));
        let loopback = GOOD.replace("https://graph.example.com/v1.0/", "http://127.0.0.1:8080/");
        assert!(problems(&loopback).is_empty());
    }

    #[test]
    fn environment_overrides_set_keys_and_address_routes_by_name() {
        let overrides = vec![
            (
                "OBO_SIDECAR__LISTEN__PROXY".to_owned(),
                "127.0.0.1:9999".to_owned(),
            ),
            (
                "OBO_SIDECAR__IDENTITY__CLIENT_ID".to_owned(),
                "from-env".to_owned(),
            ),
            (
                "OBO_SIDECAR__ROUTES__GRAPH__UPSTREAM".to_owned(),
                "https://graph.example.org/beta/".to_owned(),
            ),
            (
                "OBO_SIDECAR__ROUTES__GRAPH__TIMEOUT".to_owned(),
                "\"5s\"".to_owned(),
            ),
            (
                "OBO_SIDECAR__CACHE__MAX_ENTRIES".to_owned(),
                "10".to_owned(),
            ),
        ];
        let config = Config::parse_with_overrides(GOOD, &env, &overrides).expect("valid");
        assert_eq!(config.listen.proxy.port(), 9999);
        assert_eq!(config.identities["default"].client_id, "from-env");
        assert_eq!(
            config.routes[0].upstream.as_str(),
            "https://graph.example.org/beta/"
        );
        assert_eq!(config.routes[0].timeout, Duration::from_secs(5));
        assert_eq!(config.cache.max_entries, 10);
        let bad = vec![(
            "OBO_SIDECAR__ROUTES__NOPE__UPSTREAM".to_owned(),
            "x".to_owned(),
        )];
        let problems = Config::parse_with_overrides(GOOD, &env, &bad)
            .expect_err("refused")
            .problems;
        assert!(problems[0].to_string().contains("no route named \"nope\""));
    }

    #[test]
    fn syntax_error_is_one_problem() {
        let found = problems("[inbound\n");
        assert_eq!(found.len(), 1);
        assert!(found[0].starts_with("TOML syntax"));
    }

    #[test]
    fn route_policy_overrides_inbound_policy() {
        let text = GOOD.replace(
            "audiences = [\"api://my-api\"]",
            "audiences = [\"api://my-api\"]\nrequired_scopes = [\"access_as_user\"]",
        ) + "\n[[routes]]\nname = \"admin\"\npath_prefix = \"/admin\"\nupstream = \"http://127.0.0.1:9/\"\ntoken = \"none\"\nrequired_roles = [\"Admin\"]\n";
        let config = Config::parse(&text, &env).expect("valid");
        assert_eq!(
            config.routes[0].policy.required_scopes,
            Some(vec!["access_as_user".to_owned()])
        );
        assert_eq!(config.routes[1].policy.required_scopes, None);
        assert_eq!(
            config.routes[1].policy.required_roles,
            Some(vec!["Admin".to_owned()])
        );
    }

    #[test]
    fn prefixes_normalize_to_segment_form() {
        assert_eq!(normalize_prefix("/graph/").as_deref(), Ok("/graph"));
        assert_eq!(normalize_prefix("/").as_deref(), Ok(""));
        assert!(normalize_prefix("graph").is_err());
        assert!(normalize_prefix("/a/../b").is_err());
    }

    mod no_panic {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any text is parsed into a config or a list of problems, never a panic.
            #[test]
            fn config_parser_never_panics(text in ".{0,300}") {
                let _ = Config::parse(&text, &env);
            }

            /// Mutations of a valid config (a line dropped, a value replaced) never panic either.
            #[test]
            fn mutated_config_never_panics(
                drop in 0..20usize,
                line in 0..20usize,
                value in prop_oneof![
                    Just("\"\"".to_owned()), Just("[]".to_owned()), Just("{}".to_owned()), Just("-1".to_owned()),
                    Just("\"{tenantid}\"".to_owned()), Just("\"http://[::1\"".to_owned()), Just("\"9999999999999h\"".to_owned()),
                    "\"[ -~]{0,20}\"",
                ],
            ) {
                let mut lines: Vec<String> = GOOD.lines().map(str::to_owned).collect();
                if drop < lines.len() {
                    lines.remove(drop);
                }
                if let Some(l) = lines.get_mut(line)
                    && let Some((key, _)) = l.split_once(" = ")
                {
                    *l = format!("{key} = {value}");
                }
                let _ = Config::parse(&lines.join("\n"), &env);
            }
        }
    }
}
