//! CLI -> tracing -> config -> bind -> serve until SIGTERM/SIGINT. The only place `anyhow` is used.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use obo_sidecar::cli::{self, Cli, Command, EXIT_CONFIG, LogFormat};
use obo_sidecar::config::Config;
use tracing_subscriber::filter::Targets;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    obo_sidecar::install_crypto_provider();
    // The proxy listener's workers run their own runtimes (`server::workers`); this one serves the admin
    // listener and the background work (key refresh, file watches, reloads), which one thread carries.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let command = cli.command.unwrap_or(Command::Run);
    let config = cli.config;
    let result = runtime.block_on(async {
        match command {
            Command::Check => match cli::check(&config) {
                Ok(_) => Ok(ExitCode::SUCCESS),
                Err(error) => {
                    report_config_error(&config, &error);
                    Ok(ExitCode::from(EXIT_CONFIG))
                }
            },
            Command::Run => serve(&config).await,
            Command::Completions { shell } => cli::completions(shell)
                .map(|()| ExitCode::SUCCESS)
                .map_err(Into::into),
            #[cfg(feature = "dev")]
            Command::Demo => obo_sidecar::dev::demo::run(shutdown_signal())
                .await
                .map(|()| ExitCode::SUCCESS)
                .map_err(Into::into),
            #[cfg(feature = "dev")]
            Command::DevIdp { listen } => dev_idp(listen).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "obo-sidecar failed");
            ExitCode::FAILURE
        }
    }
}

fn report_config_error(path: &std::path::Path, error: &obo_sidecar::config::ConfigError) {
    let mut text = format!("{}: {error}", path.display());
    text.push('\n');
    // Problems go to stderr as plain lines so `check` output reads well in a terminal and in CI logs.
    let _ = std::io::Write::write_all(&mut std::io::stderr(), text.as_bytes());
}

async fn serve(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            report_config_error(path, &error);
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let listeners = obo_sidecar::Listeners::bind(&config)
        .await
        .context("binding the listeners")?;
    obo_sidecar::run(config, listeners, Some(path), shutdown_signal())
        .await
        .context("serving")?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "dev")]
async fn dev_idp(listen: std::net::SocketAddr) -> anyhow::Result<ExitCode> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let idp = obo_sidecar::dev::DevIdp::start(listener, obo_sidecar::dev::DevIdpConfig::default())
        .await
        .context("starting the development IdP")?;
    tracing::warn!(issuer = %idp.issuer(), client_id = obo_sidecar::dev::DEFAULT_CLIENT_ID,
        "development IdP serving: NOT FOR PRODUCTION (it signs tokens for anyone who asks)");
    shutdown_signal().await;
    Ok(ExitCode::SUCCESS)
}

/// Logs to stderr at the levels `RUST_LOG` names (`info` by default): a level, or `target=level` pairs
/// (`info,obo_sidecar=debug,hyper=warn`). Span and field filters are not supported: they would cost the
/// binary a regular-expression engine.
fn init_tracing(format: LogFormat) {
    let configured = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let parsed = configured.as_deref().map(str::parse::<Targets>);
    let filter = match &parsed {
        Some(Ok(targets)) => targets.clone(),
        Some(Err(_)) | None => Targets::new().with_default(tracing::Level::INFO),
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let subscriber: Box<dyn tracing::Subscriber + Send + Sync> = match format {
        // Flat: an event's fields sit beside `timestamp`, `level` and `target`, not under `fields`.
        LogFormat::Json => Box::new(tracing_subscriber::layer::SubscriberExt::with(
            builder.json().flatten_event(true).finish(),
            filter,
        )),
        LogFormat::Text => Box::new(tracing_subscriber::layer::SubscriberExt::with(
            builder.finish(),
            filter,
        )),
    };
    let _ = tracing::subscriber::set_global_default(subscriber);
    if let Some(Err(error)) = parsed {
        tracing::warn!(%error, "RUST_LOG is not a level or target=level list; logging at info");
    }
}

/// SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
