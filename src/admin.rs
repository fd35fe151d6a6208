//! The admin listener: `/healthz` (the process serves) and `/readyz` (config loaded and every issuer's
//! keys fetched at least once; a JSON reason when not).

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::Shared;

/// Answers one admin request.
pub async fn handle(request: &Request<Incoming>, shared: &Arc<Shared>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "method not allowed"}),
        );
    }
    match request.uri().path() {
        "/healthz" => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(shared.metrics_text().await)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::telemetry::CONTENT_TYPE),
            );
            response
        }
        "/readyz" => {
            if shared.is_draining() {
                return json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &serde_json::json!({"ready": false, "reason": "draining: shutting down"}),
                );
            }
            let missing = shared.proxy().authenticator().issuers_without_keys();
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
