//! Access control and request limits of the HTTP API as axum middleware: which role a route
//! needs, the bearer-token check (401 without or with an unknown token, 403 without the role),
//! the audit line of a refused admin request, the body-size limit (413) and the per-request
//! deadline (408). Every refusal is a JSON `{"error": …}` like the routes' own errors.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::auth::{Caller, Role};
use crate::settings::HttpAccess;

/// The tracing target of audit lines (erasures, refused admin requests): under `segmenter` so
/// the usual `RUST_LOG=segmenter=info` keeps them, and selectable alone.
pub const AUDIT: &str = "segmenter::audit";

/// The caller of a route when no token is asked for (`http.auth = "none"`, or loopback with no
/// token configured); the name the audit log shows.
pub const ANONYMOUS: &str = "anonymous";

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Probes and metrics: no token.
    Open,
    Role(Role),
}

/// The role `method` on `route` (the router's pattern, e.g. `/customers/{id}`) needs. Routes
/// not listed need `admin`: a route added later is closed until someone decides otherwise.
pub fn need(method: &Method, route: &str) -> Need {
    let reading = *method == Method::GET || *method == Method::HEAD;
    match route {
        "/metrics" | "/healthz" | "/readyz" if reading => Need::Open,
        "/segments" | "/segments/{id}/members" | "/customers/{id}" | "/customers/{id}/explain"
            if reading =>
        {
            Need::Role(Role::Read)
        }
        "/segments/preview" if *method == Method::POST => Need::Role(Role::Read),
        _ => Need::Role(Role::Admin),
    }
}

/// A JSON error answer.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The token of an `Authorization: Bearer TOKEN` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn unauthorized(message: &str, challenge: &'static str) -> Response {
    let mut response = error(StatusCode::UNAUTHORIZED, message);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

/// Checks the caller against what the matched route needs; puts the [`Caller`] into the
/// request's extensions for the handler (erasure names it in the audit log).
pub async fn require(
    State(access): State<Arc<HttpAccess>>,
    mut request: Request,
    next: Next,
) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or_else(
        || request.uri().path().to_string(),
        |m| m.as_str().to_string(),
    );
    let needed = match need(request.method(), &route) {
        Need::Open => return next.run(request).await,
        Need::Role(role) => role,
    };
    let caller = match access.as_ref() {
        HttpAccess::Open { .. } => Caller {
            name: ANONYMOUS.to_string(),
            role: Role::Admin,
        },
        HttpAccess::Tokens(tokens) => {
            let Some(token) = bearer(request.headers()) else {
                refused(&request, needed, "-", "no token");
                return unauthorized(
                    "this route needs a bearer token (Authorization: Bearer TOKEN)",
                    "Bearer realm=\"segmenter\"",
                );
            };
            let Some(caller) = tokens.verify(token) else {
                refused(&request, needed, "-", "unknown token");
                return unauthorized(
                    "the bearer token is not known",
                    "Bearer realm=\"segmenter\", error=\"invalid_token\"",
                );
            };
            if !caller.role.grants(needed) {
                refused(&request, needed, &caller.name, "role");
                return error(
                    StatusCode::FORBIDDEN,
                    format!(
                        "token '{}' has the role '{}'; this route needs '{needed}'",
                        caller.name, caller.role
                    ),
                );
            }
            caller
        }
    };
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// Audit line of a refused admin request (erasure); reading routes refused are not audited.
fn refused(request: &Request, needed: Role, token: &str, reason: &str) {
    if needed == Role::Admin {
        tracing::warn!(
            target: AUDIT,
            token,
            method = %request.method(),
            path = %request.uri().path(),
            outcome = "refused",
            reason,
            "admin request refused"
        );
    }
}

/// 413 for a declared body larger than `max` (bodies without a length are cut at `max` by the
/// router's `DefaultBodyLimit` and answered 413 by the handler that reads them).
pub async fn limit_body(State(max): State<usize>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max as u64) {
        return too_large(max);
    }
    next.run(request).await
}

/// The answer to a body over the limit.
pub fn too_large(max: usize) -> Response {
    let mut response = error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is larger than {max} bytes (http.max_body_bytes)"),
    );
    close(&mut response);
    response
}

/// 408 when a request (its body included) is not answered within `timeout`; the connection is
/// closed after the answer, so a stalled client holds nothing.
pub async fn deadline(State(timeout): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let mut response = error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request was not completed within {} ms (http.request_timeout)",
                    timeout.as_millis()
                ),
            );
            close(&mut response);
            response
        }
    }
}

fn close(response: &mut Response) {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_open_reads_need_read_and_everything_else_admin() {
        for route in ["/metrics", "/healthz", "/readyz"] {
            assert_eq!(need(&Method::GET, route), Need::Open, "{route}");
        }
        for route in [
            "/segments",
            "/segments/{id}/members",
            "/customers/{id}",
            "/customers/{id}/explain",
        ] {
            assert_eq!(need(&Method::GET, route), Need::Role(Role::Read), "{route}");
        }
        assert_eq!(
            need(&Method::POST, "/segments/preview"),
            Need::Role(Role::Read)
        );
        assert_eq!(
            need(&Method::DELETE, "/customers/{id}"),
            Need::Role(Role::Admin)
        );
        // Not listed: closed to readers.
        assert_eq!(need(&Method::POST, "/segments"), Need::Role(Role::Admin));
        assert_eq!(need(&Method::PUT, "/healthz"), Need::Role(Role::Admin));
        assert_eq!(need(&Method::GET, "/admin/reload"), Need::Role(Role::Admin));
    }

    #[test]
    fn only_a_bearer_authorization_carries_a_token() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(value).expect("header"),
            );
            bearer(&headers).map(str::to_string)
        };
        assert_eq!(with("Bearer sgt_abc"), Some("sgt_abc".into()));
        assert_eq!(with("bearer  sgt_abc "), Some("sgt_abc".into()));
        assert_eq!(with("Basic b3BzOnNlY3JldA=="), None);
        assert_eq!(with("Bearer "), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }
}
