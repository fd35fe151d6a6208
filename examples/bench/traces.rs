//! The cost of traces (SPEC §15): cache-hit throughput of three sidecars side by side, one with traces off,
//! one exporting every request's spans over OTLP (100 % sampling) and one exporting a tenth
//! (`traceidratio` 0.1), to a collector stand-in that counts the spans it receives.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use obo_sidecar::dev::DevIdp;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;

use crate::load::{Target, each_once};
use crate::oha::{self, Oha};
use crate::servers::start_sidecar_with;
use crate::{Error, Report, Settings};

/// An OTLP/HTTP collector stand-in on its own thread (so a blocking `oha` run never starves it): it decodes
/// each export and counts the spans.
struct Collector {
    url: String,
    spans: Arc<AtomicU64>,
}

impl Collector {
    fn start() -> Result<Collector, Error> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let url = format!("http://{}", listener.local_addr()?);
        let spans = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&spans);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                while let Ok((stream, _)) = listener.accept().await {
                    let counted = Arc::clone(&counted);
                    let service =
                        service_fn(move |request: http::Request<hyper::body::Incoming>| {
                            let counted = Arc::clone(&counted);
                            async move {
                                let body = request.into_body().collect().await?.to_bytes();
                                if let Ok(export) = ExportTraceServiceRequest::decode(body) {
                                    let n: usize = export
                                        .resource_spans
                                        .iter()
                                        .flat_map(|r| &r.scope_spans)
                                        .map(|s| s.spans.len())
                                        .sum();
                                    counted.fetch_add(n as u64, Ordering::Relaxed);
                                }
                                Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::new())))
                            }
                        });
                    tokio::spawn(async move {
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        Ok(Collector { url, spans })
    }
}

/// Adds the three rows: traces off (the 1.00 reference), OTLP at 100 % and at 10 % sampling, each the median
/// of `settings.rounds` oha runs taken in alternation.
#[allow(
    clippy::too_many_arguments,
    reason = "each a part of the run, used once"
)]
pub(crate) async fn run(
    settings: &Settings,
    oha: &Oha,
    binary: &Path,
    idp: &DevIdp,
    upstream: SocketAddr,
    dir: &Path,
    token: &str,
    report: &mut Report,
) -> Result<(), Error> {
    let collector = Collector::start()?;
    let endpoint = collector.url.as_str();
    let configurations: [(&str, Vec<(&str, &str)>); 3] = [
        ("traces off", Vec::new()),
        (
            "traces on, OTLP, 100 % sampled",
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)],
        ),
        (
            "traces on, OTLP, 10 % sampled (traceidratio 0.1)",
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
            ],
        ),
    ];
    let mut sidecars = Vec::new();
    for (index, (_, env)) in configurations.iter().enumerate() {
        let name = format!("traces-{index}");
        let sidecar =
            start_sidecar_with(binary, idp, upstream, settings.workers, dir, &name, "", env)
                .await?;
        let tokens = Arc::new(vec![token.to_owned()]);
        each_once(&Target::new(sidecar.proxy, "/obo/x", &tokens), 1).await?;
        sidecars.push(sidecar);
    }
    let (c, d) = (settings.connections, settings.duration);
    let mut runs: Vec<Vec<oha::Summary>> = configurations.iter().map(|_| Vec::new()).collect();
    let mut requests = [0.0_f64; 3];
    let mut spans = [0_u64; 3];
    for round in 0..settings.rounds {
        for (index, sidecar) in sidecars.iter().enumerate() {
            if round == 0 {
                oha.run(
                    sidecar.proxy,
                    "/obo/x",
                    Some(token),
                    c,
                    Duration::from_secs(1),
                    None,
                )?;
            }
            let before = collector.spans.load(Ordering::Relaxed);
            let summary = oha.run(sidecar.proxy, "/obo/x", Some(token), c, d, None)?;
            if index > 0 {
                // The batch exporter sends every 5 s at most: give the last batch time to land.
                tokio::time::sleep(Duration::from_secs(6)).await;
            }
            spans[index] += collector.spans.load(Ordering::Relaxed) - before;
            #[allow(clippy::cast_precision_loss, reason = "a run's request count fits f64")]
            {
                requests[index] += summary.rps * d.as_secs_f64();
            }
            runs[index].push(summary);
        }
    }
    let mut reference = None;
    for (index, ((label, _), runs)) in configurations.iter().zip(runs).enumerate() {
        let median = oha::median(runs).ok_or("no oha run")?;
        let base = *reference.get_or_insert(median.rps);
        #[allow(clippy::cast_precision_loss, reason = "span counts fit f64")]
        let per_request = spans[index] as f64 / requests[index].max(1.0);
        report.row(
            format!(
                "oha: sidecar, cache hit, {label}, {} (median of {})",
                crate::charts::workers_label(settings.workers),
                settings.rounds
            ),
            median.line(),
            if index == 0 {
                "1.00 (reference)".to_owned()
            } else {
                format!(
                    "{:.2} of traces off; {per_request:.2} spans exported per request",
                    median.rps / base
                )
            },
        );
    }
    Ok(())
}
