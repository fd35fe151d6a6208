//! `[[routes]]`: each route's selector, upstream, token and policy, checked against the listeners and
//! identities around it.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use toml::{Table, Value};

use super::inbound::read_policy;
use super::model::{
    CallerAuth, CompatOverride, DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDENTITY, DEFAULT_ROUTE_TIMEOUT,
    Flavor, Identity, MAX_ROUTE_TIMEOUT, NONE_NEEDS_LOOPBACK, Policy, Problem, Route, TokenKind,
    is_loopback, is_loopback_addr,
};
use super::walk::{Fields, Problems, is_name};

/// What a route is checked against.
pub(super) struct RouteContext<'a> {
    pub(super) warnings: std::cell::RefCell<Vec<Problem>>,
    pub(super) proxy_listen: SocketAddr,
    pub(super) default_policy: &'a Policy,
    /// Identity names present in the file (even if they failed to parse).
    pub(super) declared: &'a HashSet<String>,
    pub(super) identities: &'a BTreeMap<String, Arc<Identity>>,
}

impl RouteContext<'_> {
    fn warn(&self, path: &str, message: &str) {
        self.warnings.borrow_mut().push(Problem {
            path: path.to_owned(),
            message: message.to_owned(),
        });
    }
}

pub(super) fn read_routes(
    top: &Fields<'_>,
    context: &RouteContext<'_>,
    p: &mut Problems,
) -> Vec<Route> {
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
            let selector = format!("{} {host:?} {methods:?}", super::model::fold(&normalized));
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
        if let Some(problem) = forward_auth_problem(&route, is_loopback_addr(&context.proxy_listen))
        {
            p.add(&format!("{at}.forward_auth"), problem);
        }
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
            "forward_auth",
            "proxy",
            "compat_overrides",
            "compat_scopes",
            "relative_path",
            "http_method",
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
    let proxy = f.boolean("proxy", true, p);
    let path_prefix = if proxy {
        f.required_string("path_prefix", p)
    } else if f.value("path_prefix").is_some() {
        p.add(
            &f.at("path_prefix"),
            "a route with proxy = false is reached by name only",
        );
        None
    } else {
        Some("/")
    };
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
        if http::uri::Authority::try_from(&url[url::Position::BeforeHost..url::Position::AfterPort])
            .is_err()
        {
            p.add(
                &f.at("upstream"),
                "its host is not one an HTTP request can name",
            );
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
    let compat = super::compat::read_route_compat(&f, p);
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
        // A route its callers name scopes for (Microsoft's `optionsOverride.Scopes`) may have none of its
        // own: a call without them is answered 400, as Microsoft's sidecar does.
        Some(TokenKind::Obo | TokenKind::App)
            if scopes.is_empty() && !compat.overrides.contains(&CompatOverride::Scopes) =>
        {
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
    let forward_auth = f.boolean("forward_auth", false, p);
    if forward_auth && !proxy {
        p.add(
            &f.at("forward_auth"),
            "forward-auth needs a proxied route: the ingress's request must fall under its path_prefix",
        );
    }
    if token_api && token == Some(TokenKind::App) {
        context.warn(
            &f.at("token_api"),
            "hands the route's app token to any caller with a valid token (as Microsoft's sidecar does \
             for RequestAppToken); narrow it with required_roles or required_scopes",
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
        forward_auth,
        proxy,
        compat,
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
        if crate::headers::sidecar_owns(name.as_str()) {
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
pub(super) fn normalize_prefix(prefix: &str) -> Result<String, String> {
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

/// Why `route` may not answer forward-auth on a proxy listener that is (`loopback`) or is not loopback: the
/// 200 answer carries the route's upstream token to whoever asks. Off loopback, where more than the ingress
/// beside the sidecar can ask, only a route whose callers may hold their own token (`token_api`, obo or
/// passthrough) may; an app token never. `None` when it may.
pub(super) fn forward_auth_problem(route: &Route, loopback: bool) -> Option<&'static str> {
    if !route.forward_auth || loopback {
        return None;
    }
    match route.token {
        TokenKind::App => Some(
            "forward-auth would hand the route's app token to any caller: only on a loopback proxy listener",
        ),
        TokenKind::Obo | TokenKind::Passthrough if !route.token_api => Some(
            "forward-auth hands callers their upstream token: off a loopback proxy listener, only with \
             token_api = true",
        ),
        TokenKind::None | TokenKind::Obo | TokenKind::Passthrough => None,
    }
}
