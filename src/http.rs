//! The HTTP server (SPEC §8) on one port: routes → [`ServiceApi`] calls → JSON. Every error is
//! a JSON body `{"error": …}` with a 4xx status for bad requests (including unknown routes and
//! methods, malformed query parameters and bodies); blocking work runs off the async threads.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::api::{ApiError, ServiceApi};

/// Default page size of `/segments/{id}/members`.
const DEFAULT_PAGE: usize = 100;
/// Default sample size of `/segments/preview`.
const DEFAULT_SAMPLE: usize = 10;
/// Largest accepted request body.
const MAX_BODY: usize = 64 * 1024;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

/// A path the router matched but could not decode (e.g. invalid percent-encoding): 400, JSON.
fn path(extracted: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    extracted
        .map(|Path(value)| value)
        .map_err(|rejection| ApiError::BadRequest(format!("bad path: {rejection}")))
}

/// A query string that does not parse: 400, JSON.
fn query(
    extracted: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<HashMap<String, String>, ApiError> {
    extracted
        .map(|Query(params)| params)
        .map_err(|rejection| ApiError::BadRequest(format!("bad query string: {rejection}")))
}

/// The router over a service.
pub fn router(api: Arc<ServiceApi>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/segments", get(segments))
        .route("/segments/preview", post(preview))
        .route("/segments/{id}/members", get(members))
        .route("/customers/{id}", get(customer).delete(erase))
        .route("/customers/{id}/explain", get(explain))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(api)
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Arc<ServiceApi>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(api))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> Response {
    let body = Json(json!({"error": "method not allowed on this route"}));
    (StatusCode::METHOD_NOT_ALLOWED, body).into_response()
}

/// Runs blocking store work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| ApiError::Internal(format!("request task failed: {error}")))?
}

async fn metrics(State(api): State<Arc<ServiceApi>>) -> Result<Response, ApiError> {
    let text = blocking(move || Ok(api.metrics_text())).await?;
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    Ok(([(header::CONTENT_TYPE, content_type)], text).into_response())
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(api): State<Arc<ServiceApi>>) -> Response {
    match api.ready() {
        Ok(()) => Json(json!({"ready": true})).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": reason})),
        )
            .into_response(),
    }
}

async fn segments(State(api): State<Arc<ServiceApi>>) -> Json<Value> {
    Json(api.segments())
}

/// Parses an optional positive integer query parameter.
fn number(params: &HashMap<String, String>, name: &str, default: usize) -> Result<usize, ApiError> {
    match params.get(name) {
        None => Ok(default),
        Some(text) => text.parse().map_err(|_| {
            ApiError::BadRequest(format!(
                "'{name}' must be a non-negative integer, not '{text}'"
            ))
        }),
    }
}

fn only_known(params: &HashMap<String, String>, known: &[&str]) -> Result<(), ApiError> {
    match params.keys().find(|key| !known.contains(&key.as_str())) {
        Some(unknown) => Err(ApiError::BadRequest(format!(
            "unknown query parameter '{unknown}' (accepted: {})",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

async fn members(
    State(api): State<Arc<ServiceApi>>,
    segment: Result<Path<String>, PathRejection>,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult {
    let (segment, params) = (path(segment)?, query(params)?);
    only_known(&params, &["after", "limit"])?;
    let limit = number(&params, "limit", DEFAULT_PAGE)?;
    let after = params.get("after").cloned();
    blocking(move || api.members(&segment, after.as_deref(), limit))
        .await
        .map(Json)
}

/// The body is a rule: either JSON `{"rule": "...", "sample": 10}` or the rule as plain text.
async fn preview(
    State(api): State<Arc<ServiceApi>>,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let params = query(params)?;
    only_known(&params, &["sample"])?;
    if body.len() > MAX_BODY {
        return Err(ApiError::BadRequest(format!(
            "body larger than {MAX_BODY} bytes"
        )));
    }
    let mut sample = number(&params, "sample", DEFAULT_SAMPLE)?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::BadRequest("the body is not UTF-8".into()))?;
    let rule = if is_json || text.trim_start().starts_with('{') {
        let value: Value = serde_json::from_str(text).map_err(|error| {
            ApiError::BadRequest(format!("the body is not valid JSON: {error}"))
        })?;
        if let Some(n) = value.get("sample") {
            sample = n.as_u64().map(|n| n as usize).ok_or_else(|| {
                ApiError::BadRequest("'sample' must be a non-negative integer".into())
            })?;
        }
        value
            .get("rule")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| {
                ApiError::BadRequest("the JSON body needs a string field 'rule'".into())
            })?
    } else {
        text.to_string()
    };
    if rule.trim().is_empty() {
        return Err(ApiError::BadRequest("the rule is empty".into()));
    }
    blocking(move || api.preview(&rule, sample)).await.map(Json)
}

async fn customer(
    State(api): State<Arc<ServiceApi>>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let id = path(id)?;
    blocking(move || api.customer(&id)).await.map(Json)
}

async fn erase(
    State(api): State<Arc<ServiceApi>>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let id = path(id)?;
    let customer = id.clone();
    let exits = blocking(move || api.erase(&id)).await?;
    let exited: Vec<&str> = exits.iter().map(|c| c.segment.as_str()).collect();
    Ok(Json(json!({
        "customer_id": customer,
        "erased": true,
        "exited": exited,
    })))
}

async fn explain(
    State(api): State<Arc<ServiceApi>>,
    id: Result<Path<String>, PathRejection>,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult {
    let (id, params) = (path(id)?, query(params)?);
    only_known(&params, &["segment"])?;
    let segment = params
        .get("segment")
        .filter(|s| !s.is_empty())
        .cloned()
        .ok_or_else(|| ApiError::BadRequest("'segment' query parameter is required".into()))?;
    blocking(move || api.explain(&id, &segment)).await.map(Json)
}
