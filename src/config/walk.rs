//! Walking the TOML table key by key, so that one pass reports **every** problem with its key path
//! (`routes[1].upstream: relative URL without a base`) instead of stopping at the first, as `serde` would.
//! Unknown keys are problems too.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use toml::{Table, Value};
use url::Url;

use super::model::{Problem, TENANT_PLACEHOLDER, is_loopback};

#[derive(Default)]
pub(super) struct Problems(pub(super) Vec<Problem>);

impl Problems {
    pub(super) fn add(&mut self, path: &str, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.to_owned(),
            message: message.into(),
        });
    }
}

pub(super) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// The known key nearest to an unknown `key`, when one is close enough to be what was meant: within a
/// third of its length in edits (at least one), letter case aside.
pub(super) fn nearest(key: &str, known: &[&'static str]) -> Option<&'static str> {
    let key = key.to_ascii_lowercase();
    let limit = (key.chars().count() / 3).max(1);
    known
        .iter()
        .map(|k| {
            (
                strsim::damerau_levenshtein(&key, &k.to_ascii_lowercase()),
                *k,
            )
        })
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, k)| k)
}

/// A table being read: remembers which keys were taken so the rest can be reported as unknown.
pub(super) struct Fields<'a> {
    pub(super) table: &'a Table,
    pub(super) path: String,
    pub(super) known: &'static [&'static str],
}

impl<'a> Fields<'a> {
    pub(super) fn new(
        table: &'a Table,
        path: impl Into<String>,
        known: &'static [&'static str],
        p: &mut Problems,
    ) -> Self {
        let path = path.into();
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                let message = match nearest(key, known) {
                    Some(near) => format!("unknown key (did you mean `{near}`?)"),
                    None => "unknown key".to_owned(),
                };
                p.add(&join(&path, key), message);
            }
        }
        Fields { table, path, known }
    }

    pub(super) fn at(&self, key: &str) -> String {
        debug_assert!(self.known.contains(&key), "{key} read but not declared");
        join(&self.path, key)
    }

    pub(super) fn value(&self, key: &str) -> Option<&'a Value> {
        self.table.get(key)
    }

    pub(super) fn string(&self, key: &str, p: &mut Problems) -> Option<&'a str> {
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

    pub(super) fn required_string(&self, key: &str, p: &mut Problems) -> Option<&'a str> {
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

    pub(super) fn strings(&self, key: &str, p: &mut Problems) -> Option<Vec<String>> {
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

    pub(super) fn table(&self, key: &str, p: &mut Problems) -> Option<&'a Table> {
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

    pub(super) fn duration(&self, key: &str, default: Duration, p: &mut Problems) -> Duration {
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
    pub(super) fn bounded_duration(
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

    pub(super) fn boolean(&self, key: &str, default: bool, p: &mut Problems) -> bool {
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
    pub(super) fn integer(
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
    pub(super) fn pem_roots(&self, key: &str, p: &mut Problems) -> Option<PathBuf> {
        let text = self.string(key, p)?;
        let path = PathBuf::from(text);
        match crate::tls::read_pem_certificates(&path) {
            Ok(_) => {}
            Err(e) => p.add(&self.at(key), crate::error::chain(&e)),
        }
        Some(path)
    }

    pub(super) fn socket_addr(
        &self,
        key: &str,
        default: &str,
        p: &mut Problems,
    ) -> Option<SocketAddr> {
        let text = self.string(key, p).unwrap_or(default);
        if let Ok(addr) = text.parse() {
            Some(addr)
        } else {
            p.add(&self.at(key), format!("not an IP:port address: {text:?}"));
            None
        }
    }

    pub(super) fn url(&self, key: &str, p: &mut Problems) -> Option<Url> {
        let text = self.string(key, p)?;
        parse_url(text, &self.at(key), p)
    }
}

pub(super) fn parse_url(text: &str, at: &str, p: &mut Problems) -> Option<Url> {
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
pub(super) fn template_url(template: &str, at: &str, p: &mut Problems) -> Option<Url> {
    let probe = template.replace(TENANT_PLACEHOLDER, "00000000-0000-0000-0000-000000000000");
    if probe.contains(['{', '}']) {
        p.add(at, "the only placeholder allowed is {tenantid}");
        return None;
    }
    parse_url(&probe, at, p)
}

/// An IdP URL carries tokens and keys: https, unless the IdP is on this host.
pub(super) fn require_https(url: &Url, at: &str, p: &mut Problems) {
    if url.scheme() != "https" && !is_loopback(url) {
        p.add(at, "an IdP URL must use https unless its host is loopback");
    }
}

pub(super) fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}
