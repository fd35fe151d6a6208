//! `obo-sidecar demo`: the development IdP, an echo upstream and the sidecar on loopback with a built-in
//! configuration, and ready-to-paste `curl` commands that show a token being validated and swapped.

use std::io::Write as _;

use tokio::net::TcpListener;

use super::echo::EchoUpstream;
use super::idp::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DevIdp, DevIdpConfig};
use crate::config::{Config, ConfigError};

/// The environment variable name the built-in config reads its secret from; `demo` answers it itself.
const DEMO_SECRET_VARIABLE: &str = "OBO_DEMO_CLIENT_SECRET";

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("binding a loopback port")]
    Bind(#[from] std::io::Error),
    #[error("built-in configuration")]
    Config(#[from] ConfigError),
    #[error("starting the sidecar")]
    Start(#[from] crate::sidecar::StartError),
}

/// The demo's configuration for an IdP at `issuer` and an upstream at `upstream`.
pub fn demo_config(
    issuer: &str,
    token_endpoint: &str,
    upstream: &str,
) -> Result<Config, ConfigError> {
    let text = format!(
        r#"
[listen]
proxy = "127.0.0.1:0"
admin = "127.0.0.1:0"

[inbound]
issuers = ["{issuer}"]
audiences = ["api://{DEFAULT_CLIENT_ID}"]
required_scopes = ["access_as_user"]

[identity]
flavor = "entra"
token_endpoint = "{token_endpoint}"
client_id = "{DEFAULT_CLIENT_ID}"
client_secret = {{ env = "{DEMO_SECRET_VARIABLE}" }}

[[routes]]
name = "api"
path_prefix = "/api/"
upstream = "{upstream}/"
token = "obo"
scopes = ["api://downstream/.default"]

[[routes]]
name = "app"
path_prefix = "/app/"
upstream = "{upstream}/"
token = "app"
scopes = ["api://downstream/.default"]

[[routes]]
name = "passthrough"
path_prefix = "/passthrough/"
upstream = "{upstream}/"
token = "passthrough"
"#
    );
    Config::parse(&text, &|name| {
        (name == DEMO_SECRET_VARIABLE).then(|| DEFAULT_CLIENT_SECRET.to_owned())
    })
}

/// Runs the demo until `shutdown` completes.
pub async fn run(shutdown: impl Future<Output = ()>) -> Result<(), DemoError> {
    let idp = DevIdp::start(
        TcpListener::bind("127.0.0.1:0").await?,
        DevIdpConfig::default(),
    )
    .await?;
    let upstream = EchoUpstream::start(TcpListener::bind("127.0.0.1:0").await?).await?;
    let config = demo_config(&idp.issuer(), &idp.token_endpoint(), &upstream.url())?;
    let listeners = crate::sidecar::Listeners::bind(&config).await?;
    let sidecar = crate::sidecar::start(config, listeners).await?;
    let proxy = format!("http://{}", sidecar.proxy_addr);
    let mint = |scp: &str| {
        format!(
            "$(curl -s -H 'Accept: text/plain' -H 'Content-Type: application/json' -d '{{\"sub\":\"alice\",\"scp\":\"{scp}\"}}' {}/dev/token)",
            idp.issuer()
        )
    };
    let lines = [
        String::new(),
        format!(
            "obo-sidecar demo: development IdP {} (NOT FOR PRODUCTION), echo upstream {}, sidecar {proxy}",
            idp.issuer(),
            upstream.url()
        ),
        String::new(),
        "(a) no token: 401 with WWW-Authenticate: Bearer".to_owned(),
        format!("    curl -si {proxy}/api/hello"),
        String::new(),
        "(b) alice's token is validated and exchanged On-Behalf-Of: the upstream echoes the different token it got".to_owned(),
        "    (\"authorization\".\"claims\" show aud api://downstream and sub alice):".to_owned(),
        format!("    curl -s {proxy}/api/hello -H \"Authorization: Bearer {}\"", mint("access_as_user")),
        String::new(),
        "(c) a token without the access_as_user scope: 403 insufficient_scope".to_owned(),
        format!("    curl -si {proxy}/api/hello -H \"Authorization: Bearer {}\"", mint("other")),
        String::new(),
        format!(
            "Also: {proxy}/app/ (the sidecar's own app token), {proxy}/passthrough/ (the caller's token), admin http://{}/readyz",
            sidecar.admin_addr
        ),
        "Ctrl-C stops everything.".to_owned(),
        String::new(),
    ];
    let text = lines.join("\n");
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    let _ = std::io::stdout().lock().flush();
    shutdown.await;
    sidecar.stop().await;
    drop(upstream);
    drop(idp);
    Ok(())
}
