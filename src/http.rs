//! The HTTP server (SPEC §8) on one port: routes → [`ServiceApi`] calls → JSON. Every error is
//! a JSON body `{"error": …}` with a 4xx status for bad requests (including unknown routes and
//! methods, malformed query parameters and bodies); blocking work runs off the async threads.
//! Reading routes need a `read` token and erasure an `admin` one (`access`); bodies, request
//! time and TLS are bounded and set up by `access` and `serve`.

pub mod access;
pub mod serve;

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::api::{ApiError, ServiceApi};
use crate::auth::Caller;
use crate::settings::HttpSettings;
use access::AUDIT;

/// Default page size of `/segments/{id}/members`.
const DEFAULT_PAGE: usize = 100;
/// Default sample size of `/segments/preview`.
const DEFAULT_SAMPLE: usize = 10;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut response = access::error(status, self.to_string());
        if status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
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

/// What the preview handler needs besides the service: the body limit it enforces.
#[derive(Clone)]
struct AppState {
    api: Arc<ServiceApi>,
    max_body_bytes: usize,
}

impl axum::extract::FromRef<AppState> for Arc<ServiceApi> {
    fn from_ref(state: &AppState) -> Arc<ServiceApi> {
        state.api.clone()
    }
}

/// The router over a service, guarded and bounded as `settings` say. Layers, outermost first:
/// the request deadline, the declared-body limit, routing, then the route's access check.
pub fn router(api: Arc<ServiceApi>, settings: &HttpSettings) -> Router {
    let guard = Arc::new(settings.access.clone());
    let state = AppState {
        api,
        max_body_bytes: settings.max_body_bytes,
    };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/segments", get(segments))
        .route("/segments/preview", post(preview))
        .route("/segments/{id}/members", get(members))
        .route("/customers/{id}", get(customer).delete(erase))
        .route("/customers/{id}/explain", get(explain))
        .route_layer(from_fn_with_state(guard, access::require))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(DefaultBodyLimit::max(settings.max_body_bytes))
        .layer(from_fn_with_state(
            settings.max_body_bytes,
            access::limit_body,
        ))
        .layer(from_fn_with_state(
            settings.request_timeout,
            access::deadline,
        ))
}

/// Serves the API on `listener` (HTTPS when `tls` is set) until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Arc<ServiceApi>,
    settings: &HttpSettings,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = router(api, settings);
    serve::serve(listener, router, tls, settings.request_timeout, shutdown).await
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
    State(state): State<AppState>,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, Response> {
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(access::too_large(state.max_body_bytes));
        }
        Err(rejection) => {
            let message = format!("cannot read the body: {}", rejection.body_text());
            return Err(ApiError::BadRequest(message).into_response());
        }
    };
    preview_rule(state.api, params, &headers, &body)
        .await
        .map_err(IntoResponse::into_response)
}

async fn preview_rule(
    api: Arc<ServiceApi>,
    params: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult {
    let params = query(params)?;
    only_known(&params, &["sample"])?;
    let mut sample = number(&params, "sample", DEFAULT_SAMPLE)?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let text = std::str::from_utf8(body)
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

/// Erasure; every attempt that reaches it writes one audit line (target `segmenter::audit`) with the
/// caller's token name, the customer and the outcome.
async fn erase(
    State(api): State<Arc<ServiceApi>>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let id = match path(id) {
        Ok(id) => id,
        Err(error) => {
            let refused: Result<Vec<crate::model::Change>, ApiError> = Err(error.clone());
            audit_erasure(&caller, "", &refused);
            return Err(error);
        }
    };
    let customer = id.clone();
    let outcome = blocking(move || api.erase(&id)).await;
    audit_erasure(&caller, &customer, &outcome);
    let exits = outcome?;
    let exited: Vec<&str> = exits.iter().map(|c| c.segment.as_str()).collect();
    Ok(Json(json!({
        "customer_id": customer,
        "erased": true,
        "exited": exited,
    })))
}

fn audit_erasure<T: AsRef<[crate::model::Change]>>(
    caller: &Caller,
    customer: &str,
    outcome: &Result<T, ApiError>,
) {
    let token = caller.name.as_str();
    match outcome {
        Ok(exits) => tracing::info!(
            target: AUDIT,
            token,
            customer,
            outcome = "erased",
            exited = exits.as_ref().len(),
            "customer erasure"
        ),
        Err(error) => {
            let outcome = match error {
                ApiError::NotFound(_) => "not_found",
                ApiError::BadRequest(_) => "bad_request",
                ApiError::Unavailable(_) | ApiError::Busy(_) => "unavailable",
                ApiError::Unprocessable(_) | ApiError::Internal(_) => "failed",
            };
            tracing::warn!(
                target: AUDIT,
                token,
                customer,
                outcome,
                %error,
                "customer erasure"
            );
        }
    }
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
