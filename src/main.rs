//! CLI -> tracing -> config -> bind -> serve until SIGTERM/SIGINT. The only place `anyhow` is used.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use obo_sidecar::cli::{self, Cli, Command, EXIT_CONFIG, LogFormat};
use obo_sidecar::config::Config;
use tracing_subscriber::filter::Targets;

fn main() -> ExitCode {
    let cli = Cli::parse();
    obo_sidecar::install_crypto_provider();
    // The proxy listener's workers run their own runtimes (`server::workers`); this one serves the admin
    // listener and the background work (key refresh, file watches, reloads, trace exports), which one
    // thread carries.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let text = format!("obo-sidecar: cannot start the runtime: {error}\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr(), text.as_bytes());
            return ExitCode::FAILURE;
        }
    };
    let traces = init_tracing(cli.log_format, runtime.handle());
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
    if let Some(traces) = traces {
        // The export runs on the runtime, which is still up; this thread only waits for it.
        traces.shutdown();
    }
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
/// binary a regular-expression engine. When the `OTEL_*` variables ask for traces, the OpenTelemetry layer
/// exports the request's spans, whose exports run on `runtime`; the returned handle flushes them at exit.
fn init_tracing(
    format: LogFormat,
    runtime: &tokio::runtime::Handle,
) -> Option<obo_sidecar::traces::Traces> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::{Layer as _, fmt};

    let configured = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let parsed = configured.as_deref().map(str::parse::<Targets>);
    let filter = match &parsed {
        Some(Ok(targets)) => targets.clone(),
        Some(Err(_)) | None => Targets::new().with_default(tracing::Level::INFO),
    }
    // The request's spans are for the trace exporter only: log lines read the same with traces on or off.
    .with_target(
        obo_sidecar::traces::SPAN_TARGET,
        tracing_subscriber::filter::LevelFilter::OFF,
    );
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let log = match format {
        // Flat: an event's fields sit beside `timestamp`, `level` and `target`, not under `fields`.
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_filter(filter)
            .boxed(),
    };
    let registry = tracing_subscriber::registry().with(log);
    let (traces, problem) = match obo_sidecar::traces::from_env(runtime) {
        Ok(Some((layer, traces))) => {
            let _ = tracing::subscriber::set_global_default(registry.with(layer));
            (Some(traces), None)
        }
        Ok(None) => {
            let _ = tracing::subscriber::set_global_default(registry);
            (None, None)
        }
        Err(error) => {
            let _ = tracing::subscriber::set_global_default(registry);
            (None, Some(error))
        }
    };
    if let Some(Err(error)) = parsed {
        tracing::warn!(%error, "RUST_LOG is not a level or target=level list; logging at info");
    }
    if let Some(error) = problem {
        tracing::warn!(
            error = format!("{:#}", anyhow::Error::new(error)),
            "traces are off"
        );
    }
    traces
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
