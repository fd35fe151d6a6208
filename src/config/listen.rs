//! `[listen]`: the proxy and admin listeners, inbound TLS, drain and connection limits.

use std::path::PathBuf;
use std::time::Duration;

use toml::Table;

use super::model::{
    DEFAULT_ADMIN_LISTEN, DEFAULT_API_PREFIX, DEFAULT_DRAIN_DELAY, DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEADER_BYTES, DEFAULT_PROXY_LISTEN, Listen, ListenTls,
};
use super::routes::normalize_prefix;
use super::walk::{Fields, Problems};

pub(super) fn read_listen(table: Option<&Table>, p: &mut Problems) -> Option<Listen> {
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
            p.add(&f.at("tls"), crate::error::chain(&e));
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
