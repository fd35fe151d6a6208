//! The command line (SPEC §2): `run` (default), `check`, `demo`, `dev-idp`.

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{Config, ConfigError};

/// Exit status of `check` (and `run`) for an invalid configuration: EX_USAGE-like, as sysexits' `EX_CONFIG`
/// is 78 but SPEC fixes 64.
pub const EXIT_CONFIG: u8 = 64;

/// `--version`: the package version and the git commit it was built from (`unknown` without git).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("OBO_SIDECAR_COMMIT"),
    ")"
);

#[derive(Debug, Parser)]
#[command(
    name = "obo-sidecar",
    version = VERSION,
    about = "A reverse proxy that validates a caller's bearer token and swaps it On-Behalf-Of for an upstream token"
)]
pub struct Cli {
    /// Log line format on stderr (level from `RUST_LOG`, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Configuration file (for `run`, the default command, and `check`).
    #[arg(
        short = 'c',
        long = "config",
        env = "OBO_SIDECAR_CONFIG",
        default_value = "sidecar.toml",
        global = true
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve (the default).
    Run,
    /// Load and validate the configuration without binding ports; print the resolved routes.
    Check,
    /// Print the shell completion script for SHELL (bash, elvish, fish, powershell, zsh) to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Start a development IdP, an echo upstream and the sidecar on loopback, and print curl commands.
    #[cfg(feature = "dev")]
    Demo,
    /// The embedded development IdP alone. NOT FOR PRODUCTION: it signs tokens for anyone who asks.
    #[cfg(feature = "dev")]
    DevIdp {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:15443")]
        listen: std::net::SocketAddr,
    },
}

/// `completions`: the completion script for `shell`, on stdout. Written whole from a buffer, so a closed pipe
/// (`… completions bash | head`) is an error, not a panic.
pub fn completions(shell: clap_complete::Shell) -> std::io::Result<()> {
    use clap::CommandFactory as _;
    let mut command = Cli::command();
    let name = command.get_name().to_owned();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, name, &mut script);
    std::io::Write::write_all(&mut std::io::stdout().lock(), &script)
}

/// `check`: the resolved route table on stdout, or every problem on stderr.
pub fn check(path: &std::path::Path) -> Result<Config, ConfigError> {
    let config = Config::load(path)?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}: configuration OK", path.display());
    let _ = writeln!(
        out,
        "proxy {}  admin {}",
        config.listen.proxy, config.listen.admin
    );
    let _ = write!(out, "{}", route_table(&config));
    for (key, value) in &config.derived {
        let _ = writeln!(out, "derived: {key} = {value}");
    }
    for identity in config.identities.values() {
        // A managed identity as the credential: the audience its token is asked for must be the one the app
        // registration's federated credential names.
        let audience = match identity.credential {
            crate::config::Credential::ManagedIdentity(_)
                if !identity.token_endpoint.is_empty() =>
            {
                format!(
                    ", assertion audience {}",
                    crate::config::token_exchange_audience(&identity.token_endpoint)
                )
            }
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "identity {}: {} at {}, credential: {}{audience}",
            identity.name,
            identity.flavor.as_str(),
            if identity.token_endpoint.is_empty() {
                "its managed identity endpoint"
            } else {
                identity.token_endpoint.as_str()
            },
            identity.credential.kind()
        );
    }
    if let Some(shared) = &config.cache.shared {
        let _ = writeln!(
            out,
            "shared cache: {} (key prefix {:?}, timeout {:?}, lease {:?}, {} encryption key{})",
            shared.display,
            shared.key_prefix,
            shared.timeout,
            shared.lease,
            shared.keys.0.len(),
            if shared.keys.0.len() == 1 { "" } else { "s" }
        );
    }
    for warning in &config.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    Ok(config)
}

/// The route table as aligned text: name, prefix, upstream, token kind, scopes, identity.
pub fn route_table(config: &Config) -> String {
    let mut rows = vec![[
        "ROUTE".to_owned(),
        "PREFIX".to_owned(),
        "UPSTREAM".to_owned(),
        "TOKEN".to_owned(),
        "SCOPES".to_owned(),
        "IDENTITY".to_owned(),
    ]];
    for route in &config.routes {
        rows.push([
            route.name.clone(),
            if route.proxy {
                route.path_prefix.clone()
            } else {
                "(by name)".to_owned()
            },
            route.upstream.to_string(),
            route.token.as_str().to_owned(),
            if route.scopes.is_empty() {
                "-".to_owned()
            } else {
                route.scopes.join(" ")
            },
            match route.token {
                crate::config::TokenKind::Obo | crate::config::TokenKind::App => {
                    config.identity_for(route).map_or_else(
                        || "-".to_owned(),
                        |i| {
                            format!(
                                "{} ({}, {})",
                                i.name,
                                i.flavor.as_str(),
                                i.auth_method.as_str()
                            )
                        },
                    )
                }
                _ => "-".to_owned(),
            },
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut text = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:w$}"))
            .collect();
        text.push_str(line.join("  ").trim_end());
        text.push('\n');
    }
    text
}
