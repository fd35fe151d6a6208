//! OpenTelemetry traces (SPEC §15), end to end: the real binary exports OTLP/HTTP protobuf to a receiver in
//! this test, which decodes every span with `opentelemetry-proto`.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a failed expectation is a failed test"
)]
#![cfg(feature = "dev")]

mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use obo_sidecar::dev::{DEFAULT_CLIENT_SECRET, DevIdp, EchoUpstream, TokenClaims};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use support::process::SidecarProcess;
use support::{SECRET_VARIABLE, seen_authorization, seen_header};

/// How long spans may take to arrive (the test sets the batch delay to 50 ms).
const PATIENCE: Duration = Duration::from_secs(15);

/// The caller's trace and the span it calls the sidecar from.
const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
/// A trace its caller does not sample.
const UNSAMPLED: &str = "0af7651916cd43dd8448eb211c80319c";

/// One exported span, flattened for assertions.
#[derive(Debug, Clone)]
struct Exported {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    kind: SpanKind,
    attributes: BTreeMap<String, String>,
}

impl Exported {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with a protobuf `ExportTraceServiceRequest`.
struct Receiver {
    url: String,
    spans: Arc<Mutex<Vec<Exported>>>,
    /// The `service.name` of every export.
    services: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = support::bind().await;
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let spans = Arc::new(Mutex::new(Vec::new()));
        let services = Arc::new(Mutex::new(Vec::new()));
        let (into_spans, into_services) = (Arc::clone(&spans), Arc::clone(&services));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (spans, services) = (Arc::clone(&into_spans), Arc::clone(&into_services));
                let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let (spans, services) = (Arc::clone(&spans), Arc::clone(&services));
                    async move {
                        assert_eq!(request.uri().path(), "/v1/traces");
                        assert_eq!(request.headers()["content-type"], "application/x-protobuf");
                        let body = request.into_body().collect().await?.to_bytes();
                        let export =
                            ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                        record(&export, &spans, &services);
                        Ok::<_, hyper::Error>(
                            http::Response::builder()
                                .header("content-type", "application/x-protobuf")
                                .body(Full::new(Bytes::new()))
                                .expect("response"),
                        )
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver {
            url,
            spans,
            services,
        }
    }

    fn spans(&self) -> Vec<Exported> {
        self.spans.lock().expect("spans").clone()
    }

    /// Waits until the spans of `trace_id` include one named `last` (the server span ends last), then returns
    /// them all.
    async fn trace(&self, trace_id: &str, last: &str, log: impl Fn() -> String) -> Vec<Exported> {
        let started = Instant::now();
        loop {
            let spans: Vec<Exported> = self
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            if spans.iter().any(|s| s.name == last) {
                return spans;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "no span {last:?} in trace {trace_id}; got {spans:#?}\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn record(
    export: &ExportTraceServiceRequest,
    spans: &Mutex<Vec<Exported>>,
    services: &Mutex<Vec<String>>,
) {
    let text = |value: Option<&AnyValue>| match value {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    };
    for resource in &export.resource_spans {
        if let Some(resource) = &resource.resource {
            for attribute in &resource.attributes {
                if attribute.key == "service.name" {
                    let value = attribute.value.as_ref().and_then(|v| v.value.as_ref());
                    services.lock().expect("services").push(text(value));
                }
            }
        }
        for scope in &resource.scope_spans {
            for span in &scope.spans {
                let attributes = span
                    .attributes
                    .iter()
                    .map(|kv| {
                        let value = kv.value.as_ref().and_then(|v| v.value.as_ref());
                        (kv.key.clone(), text(value))
                    })
                    .collect();
                spans.lock().expect("spans").push(Exported {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name.clone(),
                    kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
                    attributes,
                });
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// The one span named `name` among `spans`.
fn only<'a>(spans: &'a [Exported], name: &str) -> &'a Exported {
    let found: Vec<&Exported> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name:?} span expected: {spans:#?}");
    found[0]
}

/// The spans of one trace as the text tree a trace viewer shows (the README's example).
fn tree(spans: &[Exported]) -> String {
    fn walk(spans: &[Exported], parent: &str, depth: usize, out: &mut String) {
        for span in spans.iter().filter(|s| s.parent_span_id == parent) {
            let kind = match span.kind {
                SpanKind::Server => " [server]",
                SpanKind::Client => " [client]",
                _ => "",
            };
            let attributes: Vec<String> = span
                .attributes
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect();
            let _ = writeln!(
                out,
                "{}{}{kind}  {}",
                "  ".repeat(depth),
                span.name,
                attributes.join(" ")
            );
            walk(spans, &span.span_id, depth + 1, out);
        }
    }
    let ids: Vec<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let mut out = String::new();
    for root in spans
        .iter()
        .filter(|s| !ids.contains(&s.parent_span_id.as_str()))
    {
        let attributes: Vec<String> = root
            .attributes
            .iter()
            .filter(|(key, _)| key.as_str() != "obo.request_id")
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        let _ = writeln!(
            out,
            "{} [server, parent {}]  {}",
            root.name,
            root.parent_span_id,
            attributes.join(" ")
        );
        walk(spans, &root.span_id, 1, &mut out);
    }
    out
}

/// The claims of a JWT, unverified.
fn claims(jwt: &str) -> serde_json::Value {
    let payload = jwt.split('.').nth(1).expect("payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("claims JSON")
}

/// A request with the caller's `traceparent` becomes one trace under the caller's span: the server span, the
/// caller's validation, the acquisition with the IdP call (a client span with its `client-request-id`) and
/// the upstream call (a client span, which the upstream's `traceparent` names as its parent). No attribute
/// holds a token, the client secret, the subject, the tenant or the query. A request without a
/// `traceparent` starts a new trace, whose id the access log carries; a refused one says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_continue_the_callers_trace_and_hold_nothing_secret() {
    let receiver = Receiver::start().await;
    let (idp, _upstream, sidecar) = binary_with(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.url),
        ("OTEL_SERVICE_NAME", "orders-sidecar"),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ])
    .await;
    let ready = Instant::now();
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let caller = idp.mint(&TokenClaims {
        scp: Some("access_as_user".to_owned()),
        ..TokenClaims::user("alice")
    });

    let traced = http
        .get(sidecar.url("/obo/orders/42?customer=private-query"))
        .bearer_auth(&caller)
        .header("traceparent", format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))
        .header("tracestate", "vendor=opaque")
        .send()
        .await
        .expect("traced request");
    let echo = support::echoed(traced).await;
    let exchanged = seen_authorization(&echo).expect("upstream Authorization");

    let spans = receiver
        .trace(CALLER_TRACE, "GET /obo/", || sidecar.log())
        .await;
    // The README's example ("Traces") is this output.
    eprintln!("{}", tree(&spans));
    let server = only(&spans, "GET /obo/");
    assert_eq!(server.kind, SpanKind::Server);
    assert_eq!(server.parent_span_id, CALLER_SPAN);
    assert_eq!(server.attribute("http.request.method"), Some("GET"));
    assert_eq!(server.attribute("url.path"), Some("/obo/orders/42"));
    assert_eq!(server.attribute("http.route"), Some("/obo/"));
    assert_eq!(server.attribute("obo.route"), Some("obo"));
    assert_eq!(server.attribute("http.response.status_code"), Some("200"));
    let validation = only(&spans, "validate caller");
    assert_eq!(validation.kind, SpanKind::Internal);
    assert_eq!(validation.parent_span_id, server.span_id);
    assert_eq!(validation.attribute("obo.validated_cache"), Some("miss"));
    let acquisition = only(&spans, "acquire token");
    assert_eq!(acquisition.parent_span_id, server.span_id);
    assert_eq!(acquisition.attribute("obo.cache"), Some("miss"));
    let idp_call = only(&spans, "POST");
    assert_eq!(idp_call.kind, SpanKind::Client);
    assert_eq!(idp_call.parent_span_id, acquisition.span_id);
    assert_eq!(idp_call.attribute("http.response.status_code"), Some("200"));
    assert_eq!(idp_call.attribute("server.address"), Some("127.0.0.1"));
    assert!(
        idp_call
            .attribute("client_request_id")
            .is_some_and(|id| id.len() == 36),
        "{idp_call:?}"
    );
    let upstream_call = only(&spans, "GET");
    assert_eq!(upstream_call.kind, SpanKind::Client);
    assert_eq!(upstream_call.parent_span_id, server.span_id);
    assert_eq!(upstream_call.attribute("url.path"), Some("/base/orders/42"));
    assert_eq!(
        upstream_call.attribute("http.response.status_code"),
        Some("200")
    );
    // The upstream continues the trace under the upstream call, with the caller's tracestate.
    assert_eq!(
        seen_header(&echo, "traceparent"),
        [format!("00-{CALLER_TRACE}-{}-01", upstream_call.span_id)]
    );
    assert_eq!(seen_header(&echo, "tracestate"), ["vendor=opaque"]);

    // A caller that does not sample its trace: the sidecar (parent-based sampling) exports nothing for it,
    // and tells the upstream the same trace, not sampled, under its own span.
    let unsampled = http
        .get(sidecar.url("/obo/orders/41"))
        .bearer_auth(&caller)
        .header("traceparent", format!("00-{UNSAMPLED}-{CALLER_SPAN}-00"))
        .send()
        .await
        .expect("unsampled request");
    let echo = support::echoed(unsampled).await;
    let sent = seen_header(&echo, "traceparent");
    let parts: Vec<&str> = sent[0].split('-').collect();
    assert_eq!((parts[1], parts[3]), (UNSAMPLED, "00"), "{sent:?}");
    assert_ne!(parts[2], CALLER_SPAN);

    // A second call: no traceparent, so a new trace; the token comes from the cache.
    let untraced = http
        .get(sidecar.url("/obo/orders/43"))
        .bearer_auth(&caller)
        .send()
        .await
        .expect("untraced request");
    assert_eq!(untraced.status(), 200);
    let refused = http
        .get(sidecar.url("/obo/orders/44"))
        .bearer_auth("not-a-jwt")
        .send()
        .await
        .expect("refused request");
    assert_eq!(refused.status(), 401);
    let access = wait_for_access_lines(&sidecar, 4).await;
    assert_eq!(access[0]["trace_id"], CALLER_TRACE);
    assert_eq!(access[1]["trace_id"], UNSAMPLED);
    let access = &access[1..];
    let new_trace = access[1]["trace_id"].as_str().expect("trace_id").to_owned();
    assert_ne!(new_trace, CALLER_TRACE);
    let hit = receiver
        .trace(&new_trace, "GET /obo/", || sidecar.log())
        .await;
    let hit_server = only(&hit, "GET /obo/");
    assert_eq!(
        hit_server.parent_span_id, "",
        "a new trace starts at the sidecar"
    );
    assert_eq!(
        only(&hit, "acquire token").attribute("obo.cache"),
        Some("hit")
    );
    assert_eq!(
        only(&hit, "validate caller").attribute("obo.validated_cache"),
        Some("hit")
    );
    assert!(hit.iter().all(|s| s.name != "POST"), "{hit:#?}");
    let refused_trace = access[2]["trace_id"].as_str().expect("trace_id").to_owned();
    let refusal = receiver
        .trace(&refused_trace, "GET /obo/", || sidecar.log())
        .await;
    let refused_server = only(&refusal, "GET /obo/");
    assert_eq!(
        refused_server.attribute("http.response.status_code"),
        Some("401")
    );
    assert_eq!(
        refused_server.attribute("obo.refusal"),
        Some("invalid_token:NotThreeParts")
    );
    assert_eq!(
        only(&refusal, "validate caller").attribute("obo.refusal"),
        Some("invalid_token:NotThreeParts")
    );

    // A token signed by a key the sidecar has not fetched yet: validation waits for a refetch, in its own
    // span. The refetch may happen once per `jwks_min_refetch` (1 s), counted from the fetch at start.
    tokio::time::sleep_until((ready + Duration::from_millis(1200)).into()).await;
    idp.rotate_key();
    let rotated = http
        .get(sidecar.url("/obo/orders/45"))
        .bearer_auth(idp.mint(&TokenClaims {
            scp: Some("access_as_user".to_owned()),
            ..TokenClaims::user("alice")
        }))
        .send()
        .await
        .expect("request with a new key");
    assert_eq!(rotated.status(), 200);
    let access = wait_for_access_lines(&sidecar, 5).await;
    let rotated_trace = access[4]["trace_id"].as_str().expect("trace_id").to_owned();
    let rotation = receiver
        .trace(&rotated_trace, "GET /obo/", || sidecar.log())
        .await;
    let wait = only(&rotation, "key fetch wait");
    assert_eq!(
        wait.parent_span_id,
        only(&rotation, "validate caller").span_id
    );
    assert_eq!(wait.attribute("obo.key_fetch"), Some("unknown kid"));

    assert!(
        receiver.spans().iter().all(|s| s.trace_id != UNSAMPLED),
        "an unsampled trace was exported"
    );

    // Nothing secret in any attribute of any span.
    let caller_claims = claims(&caller);
    let mut secrets = vec![
        caller.clone(),
        exchanged.trim_start_matches("Bearer ").to_owned(),
        DEFAULT_CLIENT_SECRET.to_owned(),
        "private-query".to_owned(),
        "customer=".to_owned(),
        "not-a-jwt".to_owned(),
    ];
    for claim in ["sub", "oid", "tid"] {
        secrets.push(caller_claims[claim].as_str().expect(claim).to_owned());
    }
    let every_span = receiver.spans();
    for span in &every_span {
        for secret in &secrets {
            assert!(
                !span.name.contains(secret.as_str()),
                "span name {:?} holds a secret",
                span.name
            );
            for (key, value) in &span.attributes {
                assert!(
                    !value.contains(secret.as_str()),
                    "span {:?} attribute {key} = {value:?} holds a secret",
                    span.name
                );
            }
        }
    }
    assert!(
        receiver
            .services
            .lock()
            .expect("services")
            .iter()
            .all(|s| s == "orders-sidecar")
    );
}

/// Without any `OTEL_*` variable traces are off (the log says nothing of them) and the caller's `traceparent`
/// reaches the upstream as it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_otel_variables_the_callers_traceparent_passes_unchanged() {
    let (idp, _upstream, sidecar) = binary_with(&[]).await;
    let caller = idp.mint(&TokenClaims {
        scp: Some("access_as_user".to_owned()),
        ..TokenClaims::user("alice")
    });
    let traceparent = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .get(sidecar.url("/obo/orders"))
        .bearer_auth(&caller)
        .header("traceparent", &traceparent)
        .send()
        .await
        .expect("request");
    let echo = support::echoed(response).await;
    assert_eq!(seen_header(&echo, "traceparent"), [traceparent]);
    assert!(!sidecar.log().contains("traces"), "{}", sidecar.log());
}

/// The development IdP, the echo upstream and the binary in front of them (the base configuration, keys
/// refetched at most once a second, JSON logs), with `env` added to its environment.
async fn binary_with(env: &[(&str, &str)]) -> (DevIdp, EchoUpstream, SidecarProcess) {
    let (idp, upstream) = support::idp_and_upstream().await;
    let config = support::base_config(
        &idp,
        &upstream.url(),
        &idp.token_endpoint(),
        support::dead_addr().await,
    )
    .replacen(
        "clock_skew = \"5s\"",
        "clock_skew = \"5s\"\njwks_min_refetch = \"1s\"",
        1,
    );
    let mut vars = vec![(SECRET_VARIABLE, DEFAULT_CLIENT_SECRET)];
    vars.extend_from_slice(env);
    let sidecar = SidecarProcess::start(
        &support::temp_dir("tracing"),
        &config,
        &["--log-format", "json"],
        &vars,
    )
    .await;
    (idp, upstream, sidecar)
}

/// The access-log lines (JSON) once there are `count` of them.
async fn wait_for_access_lines(sidecar: &SidecarProcess, count: usize) -> Vec<serde_json::Value> {
    let started = Instant::now();
    loop {
        let access: Vec<serde_json::Value> = sidecar
            .log()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|line| line["target"] == "access")
            .collect();
        if access.len() >= count {
            return access;
        }
        assert!(started.elapsed() < PATIENCE, "{}", sidecar.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
