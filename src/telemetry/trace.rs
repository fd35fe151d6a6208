//! OpenTelemetry traces over OTLP/HTTP protobuf (SPEC §15), configured by the standard `OTEL_*` variables
//! and off when none is set.
//!
//! The request's spans are ordinary `tracing` spans with the target [`SPAN_TARGET`]: the proxy opens them with
//! `tracing::info_span!(target: SPAN_TARGET, …)`, and only the OpenTelemetry layer built by [`from_env`]
//! enables that target (the log output never does). With traces off no layer wants them, so each span macro
//! costs one cached interest check and yields a disabled span; `continue_trace`, `inject` and
//! `trace_id` then do nothing.
//!
//! Spans carry HTTP semantic-convention attributes, route names and outcome codes, never a token, a secret,
//! a subject, a tenant or a query string: the places that open spans pass only those fields, and
//! `tests/tracing.rs` decodes every exported attribute to check it.
//!
//! The exporter sends with our own reqwest client on the sidecar's background runtime (`Exporter`): the
//! SDK's batch processor runs on its own thread and cannot drive an async client itself.

use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;

/// The `tracing` target of the request's spans. Only the OpenTelemetry layer enables it; the log output
/// leaves it off so a request's log lines read the same with traces on or off.
pub const SPAN_TARGET: &str = "obo_sidecar::span";

/// Variables that turn traces on when any is set (the OpenTelemetry SDKs read them all; any one of them
/// says the operator wants traces).
const ENABLING: [&str; 5] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SERVICE_NAME",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_EXPORTER",
];

/// The most of a collector's answer that is read: OTLP answers are an empty or small
/// `ExportTraceServiceResponse`.
const MAX_COLLECTOR_ANSWER_BYTES: usize = 64 * 1024;

/// Why traces could not be turned on: the sidecar logs it and serves without traces, as the OpenTelemetry
/// SDKs do with a bad variable.
#[derive(Debug, thiserror::Error)]
pub enum TraceSetupError {
    #[error(
        "{variable}={value} is not supported: obo-sidecar exports traces over OTLP/HTTP protobuf only \
         (`otlp`, `http/protobuf`)"
    )]
    Unsupported {
        variable: &'static str,
        value: String,
    },
    #[error("cannot build the OTLP client")]
    Client(#[source] crate::tls::TlsError),
    /// The exporter's own error is not kept: it may quote the endpoint, and an endpoint may carry
    /// credentials.
    #[error(
        "cannot build the OTLP exporter: check OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, \
         OTEL_EXPORTER_OTLP_HEADERS and OTEL_EXPORTER_OTLP_TIMEOUT"
    )]
    Exporter,
}

/// What the process holds while traces are on: [`Traces::shutdown`] exports the spans still queued.
#[derive(Debug)]
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// Exports what is queued and stops the exporter. It blocks until the export is done (at most the
    /// exporter's timeout), and the export runs on the runtime given to [`from_env`], so call it from
    /// outside that runtime's workers.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "traces still queued at exit were not exported");
        }
    }
}

/// Whether the `OTEL_*` variables `var` reads ask for traces: `Ok(false)` when none of `ENABLING` is set, or
/// `OTEL_SDK_DISABLED=true`, or `OTEL_TRACES_EXPORTER=none`; an exporter or protocol other than OTLP over
/// HTTP protobuf is an error.
pub fn wanted(var: impl Fn(&str) -> Option<String>) -> Result<bool, TraceSetupError> {
    let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(false);
    }
    if let Some(exporter) = set("OTEL_TRACES_EXPORTER") {
        match exporter.trim() {
            "none" => return Ok(false),
            "otlp" => {}
            _ => {
                return Err(TraceSetupError::Unsupported {
                    variable: "OTEL_TRACES_EXPORTER",
                    value: exporter,
                });
            }
        }
    }
    for variable in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(protocol) = set(variable)
            && protocol.trim() != "http/protobuf"
        {
            return Err(TraceSetupError::Unsupported {
                variable,
                value: protocol,
            });
        }
    }
    Ok(ENABLING.iter().any(|name| set(name).is_some()))
}

/// The OpenTelemetry layer and its exporter when the environment asks for traces ([`wanted`]); `None`
/// otherwise. Exports run on `runtime`.
///
/// # Errors
///
/// A variable names an exporter or protocol other than OTLP/HTTP protobuf, or the exporter cannot be built.
pub fn from_env<S>(
    runtime: &tokio::runtime::Handle,
) -> Result<Option<(impl Layer<S> + Send + Sync + use<S>, Traces)>, TraceSetupError>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let var = |name: &str| std::env::var(name).ok();
    if !wanted(var)? {
        return Ok(None);
    }
    let ca_files: Vec<std::path::PathBuf> = [
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
    ]
    .into_iter()
    .find_map(|name| var(name).filter(|v| !v.is_empty()))
    .map(std::path::PathBuf::from)
    .into_iter()
    .collect();
    let roots: Vec<&std::path::Path> = ca_files.iter().map(std::path::PathBuf::as_path).collect();
    let client =
        crate::tls::idp_client(&roots, Duration::from_secs(10)).map_err(TraceSetupError::Client)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_http_client(Exporter {
            client,
            runtime: runtime.clone(),
        })
        .build()
        .map_err(|_| TraceSetupError::Exporter)?;
    let named = var("OTEL_SERVICE_NAME").is_some_and(|v| !v.is_empty())
        || var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|v| v.contains("service.name="));
    let mut resource = opentelemetry_sdk::Resource::builder().with_attribute(
        opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
    );
    if !named {
        resource = resource.with_service_name("obo-sidecar");
    }
    // The SDK reads the sampler (`OTEL_TRACES_SAMPLER[_ARG]`, parent-based always-on by default), the batch
    // (`OTEL_BSP_*`) and the exporter's endpoint, headers and timeout from the environment itself.
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("obo-sidecar"))
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_filter(Targets::new().with_target(SPAN_TARGET, tracing::Level::TRACE));
    Ok(Some((layer, Traces { provider })))
}

/// Makes `span` continue the caller's trace when `headers` carry a valid W3C `traceparent` (and its
/// `tracestate`); otherwise it starts a new trace. Call it before any child span exists.
pub(crate) fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    if span.is_disabled() || !headers.contains_key("traceparent") {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    // Fails only for a span that already started, which the caller of this function rules out.
    let _ = span.set_parent(parent);
}

/// Sets `traceparent` (and `tracestate`) in `headers` to name `span` as the parent: what an upstream receives
/// so its spans hang under the sidecar's upstream call. With traces off the caller's own headers are left
/// as they are.
pub(crate) fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    if span.is_disabled() {
        return;
    }
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
}

/// Whether `span` is exported: traces are on and the sampler (or the caller's `traceparent`) kept its trace.
/// The request's child spans are opened only then, so an unsampled request costs one span, not five.
pub(crate) fn sampled(span: &tracing::Span) -> bool {
    !span.is_disabled() && span.context().span().span_context().is_sampled()
}

/// Names `span` `name` (the server span, once its route is known: `GET /orders/`). The span has started by
/// then (`sampled` starts it), so the name goes to the OpenTelemetry span itself.
pub(crate) fn rename(span: &tracing::Span, name: String) {
    if !span.is_disabled() {
        span.context().span().update_name(name);
    }
}

/// The trace id of `span` (32 lowercase hex digits), for the access log; `None` with traces off.
pub(crate) fn trace_id(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// Records `url`'s host and port as `server.address` and `server.port` of the client span `span`: never its
/// path or query, which may name a tenant.
pub(crate) fn record_server(span: &tracing::Span, url: &str) {
    if span.is_disabled() {
        return;
    }
    if let Ok(url) = url::Url::parse(url) {
        if let Some(host) = url.host_str() {
            span.record("server.address", host);
        }
        if let Some(port) = url.port_or_known_default() {
            span.record("server.port", port);
        }
    }
}

/// The OTLP exporter's HTTP client: our reqwest client, driven on the sidecar's runtime (the SDK's batch
/// thread only waits for the answer).
#[derive(Debug)]
struct Exporter {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for Exporter {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let request = reqwest::Request::try_from(request)?;
        self.runtime
            .spawn(async move {
                let mut response = client.execute(request).await?;
                let mut answer = http::Response::new(Bytes::new());
                *answer.status_mut() = response.status();
                *answer.headers_mut() = std::mem::take(response.headers_mut());
                let mut body = Vec::new();
                while let Some(chunk) = response.chunk().await? {
                    let room = MAX_COLLECTOR_ANSWER_BYTES.saturating_sub(body.len());
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if room <= chunk.len() {
                        break;
                    }
                }
                *answer.body_mut() = Bytes::from(body);
                Ok::<_, HttpError>(answer)
            })
            .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn traces_are_off_unless_an_otel_variable_asks_for_them() {
        assert!(!wanted(env(&[])).unwrap());
        assert!(!wanted(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])).unwrap());
        assert!(!wanted(env(&[("OTEL_BSP_SCHEDULE_DELAY", "100")])).unwrap());
        for name in ENABLING {
            assert!(wanted(env(&[(name, "otlp")])).unwrap(), "{name}");
        }
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
        assert!(!wanted(env(&[endpoint, ("OTEL_SDK_DISABLED", "true")])).unwrap());
        assert!(!wanted(env(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")])).unwrap());
        assert!(
            wanted(env(&[
                endpoint,
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
            ]))
            .unwrap()
        );
    }

    #[test]
    fn other_exporters_and_protocols_are_named_in_the_error() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317");
        for (variable, value) in [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
            ("OTEL_TRACES_EXPORTER", "zipkin"),
        ] {
            let error = wanted(env(&[endpoint, (variable, value)])).unwrap_err();
            let text = error.to_string();
            assert!(text.contains(variable) && text.contains(value), "{text}");
        }
    }

    #[test]
    fn with_traces_off_nothing_is_injected_or_reported() {
        let span = tracing::info_span!(target: SPAN_TARGET, "request");
        assert!(span.is_disabled());
        let mut headers = HeaderMap::new();
        let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert("traceparent", HeaderValue::from_static(caller));
        continue_trace(&span, &headers);
        inject(&span, &mut headers);
        assert_eq!(headers["traceparent"], caller);
        assert_eq!(trace_id(&span), None);
    }
}
