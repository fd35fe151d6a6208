//! Environment overrides of configuration keys: `OBO_SIDECAR__<PATH>`, `__` between levels, routes and
//! identities addressed by name (SPEC §3).

use toml::{Table, Value};

use super::walk::Problems;

/// Environment variables that override configuration keys start with this; `__` separates levels.
pub const ENV_OVERRIDE_PREFIX: &str = "OBO_SIDECAR__";

/// Sets the key an `OBO_SIDECAR__A__B` variable names. The value is read as TOML (`true`, `5`, `["a"]`,
/// `{ env = "X" }`), else taken as a string. `ROUTES__<NAME>` picks the route of that name (letters
/// compared case-insensitively, `-` written `_`).
pub(super) fn apply_override(table: &mut Table, name: &str, value: &str, p: &mut Problems) {
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
