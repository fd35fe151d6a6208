//! `sidecar.toml` -> [`Config`]. The TOML is read into a `toml::Table` and walked key by key (`walk`), so
//! that one pass reports **every** problem with its key path (`routes[1].upstream: relative URL without a
//! base`) instead of stopping at the first, as `serde` would. Unknown keys are problems too: a key that this
//! version does not implement is refused, never accepted and ignored. The model is in `model`; each
//! section has its reader; `credential` is the only place secrets and keys are read.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

use toml::Table;

mod compat;
mod credential;
mod entra;
mod env;
mod identity;
mod inbound;
mod listen;
mod model;
mod routes;
mod shared_cache;
#[cfg(test)]
mod tests;
mod walk;

pub use credential::{
    AssertionFile, AuthMethod, CertificateKey, Credential, CredentialError, ManagedIdentity,
    ManagedIdentityEndpoint, Refresh, Watched,
};
pub(crate) use entra::token_exchange_audience;
pub use env::ENV_OVERRIDE_PREFIX;
use env::apply_override;
use identity::read_identities;
use inbound::read_inbound;
use listen::read_listen;
pub use model::*;
use routes::{RouteContext, read_routes};
use std::sync::Arc;
use std::time::Duration;
use toml::Value;
use walk::{Fields, Problems};

impl Config {
    /// Reads and validates a configuration file, with secrets from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![Problem {
                path: String::new(),
                message: format!("cannot read {}: {e}", path.display()),
            }],
        })?;
        // Microsoft's `DownstreamApis__*` settings ride along with the overrides (they are read as routes).
        let overrides: Vec<(String, String)> = std::env::vars()
            .filter(|(name, _)| {
                name.starts_with(ENV_OVERRIDE_PREFIX)
                    || name
                        .to_ascii_lowercase()
                        .starts_with(compat::DOWNSTREAM_APIS_LOWER)
            })
            .collect();
        // Microsoft's `AzureAd__*` settings are .NET configuration keys, read in any letter case.
        let azure_ad: std::collections::HashMap<String, String> = std::env::vars()
            .map(|(name, value)| (name.to_ascii_lowercase(), value))
            .filter(|(name, _)| name.starts_with(entra::AZURE_AD_LOWER))
            .collect();
        let env = |name: &str| {
            let lower = name.to_ascii_lowercase();
            if lower.starts_with(entra::AZURE_AD_LOWER) {
                azure_ad.get(&lower).cloned()
            } else {
                std::env::var(name).ok()
            }
        };
        Config::parse_with_overrides(&text, &env, &overrides)
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str, env: EnvLookup<'_>) -> Result<Config, ConfigError> {
        Config::parse_with_overrides(text, env, &[])
    }

    /// Parses configuration text, then applies environment overrides (`OBO_SIDECAR__LISTEN__PROXY=…`, routes
    /// and identities addressed by name: `OBO_SIDECAR__ROUTES__GRAPH__UPSTREAM=…`) and Microsoft's
    /// `DownstreamApis__<Name>__*` (read as routes), then validates.
    pub fn parse_with_overrides(
        text: &str,
        env: EnvLookup<'_>,
        overrides: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut table: Table = text.parse().map_err(|e: toml::de::Error| ConfigError {
            problems: vec![Problem {
                path: String::new(),
                message: match e.span() {
                    Some(span) => {
                        let (line, column) = line_and_column(text, span.start);
                        format!(
                            "TOML syntax error at line {line}, column {column}: {}",
                            e.message().trim()
                        )
                    }
                    None => format!("TOML syntax error: {}", e.message().trim()),
                },
            }],
        })?;
        let mut problems = Problems::default();
        let (downstream_apis, overrides): (Vec<_>, Vec<_>) =
            overrides.iter().cloned().partition(|(name, _)| {
                name.to_ascii_lowercase()
                    .starts_with(compat::DOWNSTREAM_APIS_LOWER)
            });
        for (name, value) in &overrides {
            apply_override(&mut table, name, value, &mut problems);
        }
        let unread = compat::apply_downstream_apis(&mut table, &downstream_apis, &mut problems);
        let derivation = entra::apply(&mut table, env, &mut problems);
        let mut config = read_config(&table, env, &mut problems);
        if let Some(config) = config.as_mut() {
            let (errors, warnings) = entra::check(config, derivation.multi_tenant);
            problems.0.extend(errors);
            config.warnings.extend(derivation.warnings);
            config.warnings.extend(unread);
            config.warnings.extend(warnings);
            config.derived = derivation.derived;
        }
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
        let mut problems: Vec<Problem> = self
            .routes
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
            .collect();
        for (i, route) in self.routes.iter().enumerate() {
            if let Some(problem) = routes::forward_auth_problem(route, loopback) {
                problems.push(Problem {
                    path: format!("routes[{i}].forward_auth"),
                    message: format!(
                        "route {:?}: {problem} (the running proxy listener is {})",
                        route.name, self.listen.proxy
                    ),
                });
            }
        }
        problems
    }

    /// The identity a route acquires its tokens with.
    pub fn identity_for(&self, route: &Route) -> Option<&Arc<Identity>> {
        self.identities.get(&route.identity)
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
            "compat",
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
    let cache = read_cache(top.table("cache", p), env, p);
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
    let compat = compat::read_compat(top.table("compat", p), p);
    let mut warnings = context.warnings.into_inner();
    warnings.extend(compat::shadowed_routes(&routes, &compat));

    Some(Config {
        listen: listen?,
        inbound: inbound?,
        identities,
        cache,
        routes,
        compat,
        warnings,
        derived: Vec::new(),
    })
}

fn read_cache(table: Option<&Table>, env: EnvLookup<'_>, p: &mut Problems) -> CacheSettings {
    let empty = Table::new();
    let f = Fields::new(
        table.unwrap_or(&empty),
        "cache",
        &["max_entries", "expiry_margin", "shared"],
        p,
    );
    let shared = f
        .table("shared", p)
        .and_then(|t| shared_cache::read_shared_cache(t, env, p));
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
        shared,
    }
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |last| last.chars().count())
        + 1;
    (line, column)
}
