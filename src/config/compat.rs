//! Microsoft's auth sidecar, understood (SPEC §16): `[compat] microsoft_sidecar`, each route's
//! `compat_overrides`, `relative_path` and `http_method` (what `/DownstreamApi/{name}` calls), and the
//! `DownstreamApis__<Name>__*` variables read as routes.

use toml::{Table, Value};

use super::model::{Compat, CompatOverride, Problem, RouteCompat};
use super::walk::{Fields, Problems, is_name};

/// The prefix of the variables read as routes, lowercase (.NET configuration keys match in any case).
pub(super) const DOWNSTREAM_APIS_LOWER: &str = "downstreamapis__";

/// `[compat]`.
pub(super) fn read_compat(table: Option<&Table>, p: &mut Problems) -> Compat {
    let empty = Table::new();
    let f = Fields::new(table.unwrap_or(&empty), "compat", &["microsoft_sidecar"], p);
    Compat {
        microsoft_sidecar: f.boolean("microsoft_sidecar", false, p),
    }
}

/// A route's `compat_overrides`, `compat_scopes`, `relative_path` and `http_method`.
pub(super) fn read_route_compat(f: &Fields<'_>, p: &mut Problems) -> RouteCompat {
    let overrides: Vec<CompatOverride> = f
        .strings("compat_overrides", p)
        .unwrap_or_default()
        .iter()
        .filter_map(|name| {
            let known = CompatOverride::from_name(name);
            if known.is_none() {
                let names = CompatOverride::ALL.map(CompatOverride::name);
                let hint = super::walk::nearest(name, &names)
                    .map(|near| format!(" (did you mean `{near}`?)"))
                    .unwrap_or_default();
                p.add(
                    &f.at("compat_overrides"),
                    format!(
                        "{name:?} is not an override obo-sidecar honours{hint}; known: {}",
                        names.join(", ")
                    ),
                );
            }
            known
        })
        .collect();
    let relative_path = f.string("relative_path", p).unwrap_or_default().to_owned();
    if relative_path.contains(['?', '#']) || relative_path.contains("..") {
        p.add(
            &f.at("relative_path"),
            "a path below the upstream URL, without a query, a fragment or '..'",
        );
    }
    let http_method = match f.string("http_method", p) {
        None => http::Method::GET,
        Some(text) => match text.to_ascii_uppercase().as_str() {
            "GET" => http::Method::GET,
            "POST" => http::Method::POST,
            "PUT" => http::Method::PUT,
            "PATCH" => http::Method::PATCH,
            "DELETE" => http::Method::DELETE,
            "HEAD" => http::Method::HEAD,
            "OPTIONS" => http::Method::OPTIONS,
            _ => {
                p.add(
                    &f.at("http_method"),
                    format!(
                        "{text:?} is not an HTTP method /DownstreamApi calls with \
                         (GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS)"
                    ),
                );
                http::Method::GET
            }
        },
    };
    let scopes = f.strings("compat_scopes", p).unwrap_or_default();
    if !scopes.is_empty() && !overrides.contains(&CompatOverride::Scopes) {
        p.add(
            &f.at("compat_scopes"),
            "lists the scopes an optionsOverride.Scopes may ask for, but compat_overrides does not allow Scopes",
        );
    }
    RouteCompat {
        overrides,
        scopes,
        relative_path,
        http_method,
    }
}

/// Reads `DownstreamApis__<Name>__BaseUrl|Scopes[__N]|RequestAppToken|RelativePath|HttpMethod` (names in any
/// letter case) into `[[routes]]`: a route of that name already in the file takes the values it does not set;
/// otherwise a new route is added that is not proxied (reachable by name only), exchanging On-Behalf-Of (or an
/// app token with `RequestAppToken=true`), open to the token API and to every `optionsOverride.*`, as
/// Microsoft's sidecar serves a configured API by default. Keys it does not know are reported. Read only with
/// `[compat] microsoft_sidecar = true`; otherwise the returned warning says they were not.
pub(super) fn apply_downstream_apis(
    table: &mut Table,
    variables: &[(String, String)],
    p: &mut Problems,
) -> Option<Problem> {
    if variables.is_empty() {
        return None;
    }
    let enabled = table
        .get("compat")
        .and_then(|c| c.get("microsoft_sidecar"))
        .and_then(Value::as_bool)
        == Some(true);
    if !enabled {
        return Some(Problem {
            path: "DownstreamApis".to_owned(),
            message: "DownstreamApis__* variables are set but not read: [compat] microsoft_sidecar is off"
                .to_owned(),
        });
    }
    let mut apis: std::collections::BTreeMap<String, Vec<(String, String, String)>> =
        std::collections::BTreeMap::new();
    for (name, value) in variables {
        if !name.to_ascii_lowercase().starts_with(DOWNSTREAM_APIS_LOWER) {
            continue;
        }
        // Keep the API's own spelling: it is the route name callers use in `/DownstreamApi/{name}`.
        let original = &name[DOWNSTREAM_APIS_LOWER.len()..];
        let Some((api, key)) = original.split_once("__") else {
            p.add(name, "expected DownstreamApis__<Name>__<Key>");
            continue;
        };
        // One API however its name is spelled across variables (.NET keys match in any case); the first
        // spelling names the route.
        let spelled = apis
            .keys()
            .find(|known| known.eq_ignore_ascii_case(api))
            .cloned()
            .unwrap_or_else(|| api.to_owned());
        apis.entry(spelled).or_default().push((
            key.to_ascii_lowercase(),
            value.trim().to_owned(),
            name.clone(),
        ));
    }
    for (api, keys) in apis {
        if !is_name(&api) {
            p.add(
                &format!("DownstreamApis__{api}"),
                "an API name is letters, digits, '-' and '_' (it names the route)",
            );
            continue;
        }
        let routes = table
            .entry("routes")
            .or_insert_with(|| Value::Array(Vec::new()));
        let Value::Array(routes) = routes else {
            return None;
        };
        let existing = routes
            .iter()
            .position(|route| route.get("name").and_then(Value::as_str) == Some(api.as_str()));
        let index = existing.unwrap_or_else(|| {
            let mut route = Table::new();
            route.insert("name".into(), Value::from(api.clone()));
            route.insert("proxy".into(), Value::from(false));
            route.insert("token".into(), Value::from("obo"));
            route.insert("token_api".into(), Value::from(true));
            route.insert(
                "compat_overrides".into(),
                Value::Array(
                    CompatOverride::ALL
                        .iter()
                        .map(|o| Value::from(o.name()))
                        .collect(),
                ),
            );
            routes.push(Value::Table(route));
            routes.len() - 1
        });
        let Some(Value::Table(route)) = routes.get_mut(index) else {
            continue;
        };
        let mut scopes: Vec<(usize, String)> = Vec::new();
        for (key, value, variable) in keys {
            let set = |route: &mut Table, name: &str, value: Value| {
                if existing.is_none() || !route.contains_key(name) {
                    route.insert(name.to_owned(), value);
                }
            };
            match key.as_str() {
                "baseurl" => set(route, "upstream", Value::from(value)),
                "relativepath" => set(route, "relative_path", Value::from(value)),
                "httpmethod" => set(route, "http_method", Value::from(value)),
                "requestapptoken" => match value.to_ascii_lowercase().as_str() {
                    "true" => set(route, "token", Value::from("app")),
                    "false" => {}
                    _ => p.add(&variable, "expected true or false"),
                },
                // .NET binds `Scopes` as an array (`Scopes__0`, `Scopes__1`); a single space-separated value
                // is read too.
                "scopes" => scopes.extend(
                    value
                        .split_whitespace()
                        .map(|s| (usize::MAX, s.to_owned())),
                ),
                other => match other.strip_prefix("scopes__").map(str::parse::<usize>) {
                    Some(Ok(n)) if !value.is_empty() => scopes.push((n, value)),
                    Some(Ok(_)) => {}
                    _ => p.add(
                        &variable,
                        "not read: obo-sidecar reads BaseUrl, Scopes, RequestAppToken, RelativePath and HttpMethod",
                    ),
                },
            }
        }
        if !scopes.is_empty() && (existing.is_none() || !route.contains_key("scopes")) {
            scopes.sort_by_key(|(n, _)| *n);
            route.insert(
                "scopes".into(),
                Value::Array(scopes.into_iter().map(|(_, s)| Value::from(s)).collect()),
            );
        }
    }
    None
}

/// Routes whose path Microsoft's endpoints take first when `[compat] microsoft_sidecar` is on (`/Validate`,
/// `/AuthorizationHeader…`, `/DownstreamApi…`): a warning each, since their requests never reach them.
pub(super) fn shadowed_routes(routes: &[super::model::Route], compat: &Compat) -> Vec<Problem> {
    const TAKEN: [&str; 5] = [
        "validate",
        "authorizationheader",
        "authorizationheaderunauthenticated",
        "downstreamapi",
        "downstreamapiunauthenticated",
    ];
    if !compat.microsoft_sidecar {
        return Vec::new();
    }
    routes
        .iter()
        .enumerate()
        .filter(|(_, route)| {
            route.proxy
                && route
                    .match_prefix
                    .trim_start_matches('/')
                    .split('/')
                    .next()
                    .is_some_and(|first| TAKEN.iter().any(|t| t.eq_ignore_ascii_case(first)))
        })
        .map(|(i, route)| Problem {
            path: format!("routes[{i}].path_prefix"),
            message: format!(
                "{:?} is also a path of Microsoft's sidecar endpoints ([compat] microsoft_sidecar), which \
                 answer it first",
                route.path_prefix
            ),
        })
        .collect()
}
