//! `[cache.shared]` (SPEC §14): the Redis URL (a secret reference: it may carry a password), the ACL user and
//! password, the encryption keys, and the key prefix, timeout and lease. `rediss://` is required off
//! loopback.

use std::time::Duration;

use base64::Engine as _;
use toml::{Table, Value};
use url::Url;

use super::identity::{read_secret, read_secret_value};
use super::model::{
    DEFAULT_SHARED_KEY_PREFIX, DEFAULT_SHARED_LEASE, DEFAULT_SHARED_TIMEOUT, EncryptionKeys,
    EnvLookup, SharedCacheSettings,
};
use super::walk::{Fields, Problems};
use crate::secret::Secret;

/// More keys than this is a mistake, not a rotation.
const MAX_KEYS: usize = 8;

pub(super) fn read_shared_cache(
    table: &Table,
    env: EnvLookup<'_>,
    p: &mut Problems,
) -> Option<SharedCacheSettings> {
    let f = Fields::new(
        table,
        "cache.shared",
        &[
            "url",
            "encryption_key",
            "username",
            "password",
            "key_prefix",
            "timeout",
            "lease",
            "ca_file",
        ],
        p,
    );
    let url = read_url(&f, env, p);
    let keys = read_keys(&f, env, p);
    let username = f.string("username", p).map(str::to_owned);
    let password = match f.value("password") {
        Some(_) => Some(read_secret(&f, "password", env, p)?.get().as_ref().clone()),
        None => None,
    };
    let key_prefix = f
        .string("key_prefix", p)
        .unwrap_or(DEFAULT_SHARED_KEY_PREFIX)
        .to_owned();
    if key_prefix.len() > 64 || key_prefix.chars().any(|c| c.is_control() || c == ' ') {
        p.add(
            &f.at("key_prefix"),
            "at most 64 characters, no spaces or control characters",
        );
    }
    let timeout = f.bounded_duration(
        "timeout",
        DEFAULT_SHARED_TIMEOUT,
        Duration::from_millis(1),
        Duration::from_secs(5),
        p,
    );
    let lease = f.bounded_duration(
        "lease",
        DEFAULT_SHARED_LEASE,
        Duration::from_millis(100),
        Duration::from_secs(60),
        p,
    );
    let ca_file = f.pem_roots("ca_file", p);
    let (url, display) = url?;
    if ca_file.is_some() && !display.starts_with("rediss://") {
        p.add(&f.at("ca_file"), "only for a rediss:// URL");
    }
    Some(SharedCacheSettings {
        url,
        display,
        username,
        password,
        keys: keys?,
        key_prefix,
        timeout,
        lease,
        ca_file,
    })
}

/// The URL, and the same without credentials. A plain string may not carry a password (secrets are never
/// written inline); `{ env }` or `{ file }` may.
fn read_url(f: &Fields<'_>, env: EnvLookup<'_>, p: &mut Problems) -> Option<(Secret, String)> {
    let at = f.at("url");
    let text = match f.value("url") {
        None => {
            p.add(&at, "required: { env = \"NAME\" } or { file = \"/path\" } holding redis:// or rediss://…");
            return None;
        }
        Some(Value::String(text)) => {
            let carries_secret = Url::parse(text).is_ok_and(|u| {
                u.password().is_some()
                    || u.query_pairs().any(|(k, _)| k == "pass" || k == "password")
            });
            if carries_secret {
                p.add(
                    &at,
                    "a URL with a password is a secret: use { env = \"NAME\" } or { file = \"/path\" }, or the password key",
                );
                return None;
            }
            Secret::new(text.trim())
        }
        Some(value) => read_secret_value(value, &at, env, p)?
            .get()
            .as_ref()
            .clone(),
    };
    // Problems name the URL without its credentials, never the text itself.
    let Ok(url) = Url::parse(text.expose()) else {
        p.add(&at, "not a URL (redis://host:port/db or rediss://…)");
        return None;
    };
    // Scheme, host, port and database: never the user, password, query or fragment.
    let display = match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{}://{host}:{port}{}", url.scheme(), url.path()),
        (Some(host), None) => format!("{}://{host}{}", url.scheme(), url.path()),
        (None, _) => format!("{}://{}", url.scheme(), url.path()),
    };
    if url.fragment().is_some() {
        p.add(
            &at,
            format!(
                "{display}: no #fragment (certificate checks cannot be turned off; use ca_file)"
            ),
        );
        return None;
    }
    match url.scheme() {
        "rediss" | "redis+unix" | "unix" => {}
        "redis" if host_is_loopback(&url) => {}
        "redis" => {
            p.add(
                &at,
                format!("{display}: redis:// off loopback sends tokens' ciphertexts and the password in clear text: use rediss://"),
            );
            return None;
        }
        other => {
            p.add(
                &at,
                format!("scheme {other:?}: redis://, rediss://, redis+unix:// or unix://"),
            );
            return None;
        }
    }
    if url.scheme().starts_with("redis")
        && url.host_str().is_none_or(str::is_empty)
        && url.scheme() != "redis+unix"
    {
        p.add(&at, format!("{display}: no host"));
        return None;
    }
    // What the client library will refuse at start (a database that is not a number, say), refused now.
    if let Err(error) = redis::IntoConnectionInfo::into_connection_info(text.expose()) {
        p.add(
            &at,
            format!(
                "{display}: {:?} (redis://host:port/db or rediss://…)",
                error.kind()
            ),
        );
        return None;
    }
    Some((text, display))
}

/// `encryption_key`: one secret reference, or a list of them; each holds one or more base64 keys of 32
/// bytes (whitespace between them). The first key seals, every key opens.
fn read_keys(f: &Fields<'_>, env: EnvLookup<'_>, p: &mut Problems) -> Option<EncryptionKeys> {
    let at = f.at("encryption_key");
    let references: Vec<(String, &Value)> = match f.value("encryption_key") {
        None => {
            p.add(&at, "required: { file = \"/path\" } or { env = \"NAME\" } holding 32 random bytes in base64 (openssl rand -base64 32)");
            return None;
        }
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("{at}[{i}]"), v))
            .collect(),
        Some(value) => vec![(at.clone(), value)],
    };
    let mut keys = Vec::new();
    for (at, value) in references {
        let Some(secret) = read_secret_value(value, &at, env, p) else {
            continue;
        };
        for (i, word) in secret.get().expose().split_whitespace().enumerate() {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(word)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(word));
            match decoded
                .ok()
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            {
                Some(key) => keys.push(key),
                None => p.add(
                    &at,
                    format!(
                        "key {} is not 32 bytes in base64 (openssl rand -base64 32)",
                        i + 1
                    ),
                ),
            }
        }
    }
    if keys.is_empty() {
        p.add(
            &at,
            "no key: one per line, 32 random bytes in base64 (openssl rand -base64 32)",
        );
        return None;
    }
    if keys.len() > MAX_KEYS {
        p.add(&at, format!("at most {MAX_KEYS} keys"));
    }
    let mut seen = keys.clone();
    seen.sort_unstable();
    seen.dedup();
    if seen.len() != keys.len() {
        p.add(&at, "the same key twice");
    }
    Some(EncryptionKeys(keys))
}

/// Whether the URL's host is loopback. `redis://` is not a special scheme to the URL parser, so an IP
/// address is an opaque host there: parsed here.
fn host_is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
