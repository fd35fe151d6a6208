//! The admin listener: `/healthz` (the process serves), `/readyz` (config loaded and every issuer's keys
//! fetched at least once; a JSON reason when not) and `/metrics`.

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;

/// What the admin endpoints read of the running sidecar.
pub(crate) trait Readiness: Send + Sync {
    /// SIGTERM was received: not ready, whatever the keys.
    fn is_draining(&self) -> bool;
    /// Fixed issuers whose keys have not been fetched yet.
    fn issuers_without_keys(&self) -> Vec<String>;
    /// The Prometheus exposition of every metric (SPEC §6).
    fn metrics_text(&self) -> BoxFuture<'_, String>;
}

/// Answers one admin request.
pub(crate) async fn handle<B>(
    request: &Request<B>,
    sidecar: &dyn Readiness,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "method not allowed"}),
        );
    }
    match request.uri().path() {
        "/healthz" => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(sidecar.metrics_text().await)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::telemetry::CONTENT_TYPE),
            );
            response
        }
        "/readyz" => {
            if sidecar.is_draining() {
                return json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({"ready": false, "reason": "draining: shutting down"}),
                );
            }
            let missing = sidecar.issuers_without_keys();
            if missing.is_empty() {
                json(StatusCode::OK, &serde_json::json!({"ready": true}))
            } else {
                json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({
                        "ready": false,
                        "reason": "signing keys not fetched yet",
                        "issuers": missing,
                    }),
                )
            }
        }
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not found"}),
        ),
    }
}

fn json(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
