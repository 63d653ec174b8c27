//! The HTTP surface: routes, handlers and the one middleware that gives every request an id, a
//! tracing span and a line in the HTTP metrics.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json};
use serde::de::DeserializeOwned;
use shoal_types::{ErrorClass, RequestId};
use tracing::Instrument;

use crate::backend::GenerateEvent;
use crate::body::read_json;
use crate::error::{RequestError, reason};
use crate::generate::{self, Flavor, ResponseMeta, Running};
use crate::metrics::{OPENMETRICS_CONTENT_TYPE, PROMETHEUS_TEXT_CONTENT_TYPE, Route};
use crate::state::ApiState;
use crate::tracker::RequestTracker;
use crate::validate::{self, Validated};
use crate::wire::{ChatCompletionRequest, CompletionRequest, ModelList, ModelObject};

/// The request-id header, honoured when a client or proxy sends a sane one.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-supplied request id we keep; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Builds the gateway's router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        // Model ids may contain '/' (`org/name`), hence the wildcard.
        .route("/v1/models/{*id}", get(get_model))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(unknown_url)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Assigns the request id, opens the request's span and counts the response.
async fn observe(State(state): State<ApiState>, mut req: Request, next: Next) -> Response {
    let request_id = req
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| valid_request_id(id))
        .map(RequestId::from)
        .unwrap_or_else(new_request_id);
    let route = Route::from_matched_path(req.extensions().get::<MatchedPath>().map(|p| p.as_str()));
    let span = tracing::info_span!(
        "http_request",
        request_id = %request_id,
        method = %req.method(),
        route = route.as_str(),
    );
    req.extensions_mut().insert(request_id.clone());
    let mut response = next.run(req).instrument(span.clone()).await;
    let status = response.status();
    span.in_scope(|| {
        if let Some(class) = response.extensions().get::<ErrorClass>() {
            tracing::info!(status = status.as_u16(), class = %class, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), "response headers sent");
        }
    });
    if let Ok(value) = HeaderValue::from_str(request_id.as_str()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    state.metrics().http_response(route, status);
    response
}

fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn new_request_id() -> RequestId {
    RequestId::new(format!("{:032x}", rand::random::<u128>()))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn chat_completions(
    State(state): State<ApiState>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle_generation::<ChatCompletionRequest>(state, Flavor::Chat, request_id, headers, body).await
}

async fn completions(
    State(state): State<ApiState>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle_generation::<CompletionRequest>(state, Flavor::Text, request_id, headers, body).await
}

/// The two wire request types, each with its own validation.
trait GenerationBody: DeserializeOwned {
    fn validate(self, request_id: RequestId) -> Result<Validated, RequestError>;
}

impl GenerationBody for ChatCompletionRequest {
    fn validate(self, request_id: RequestId) -> Result<Validated, RequestError> {
        validate::chat(self, request_id)
    }
}

impl GenerationBody for CompletionRequest {
    fn validate(self, request_id: RequestId) -> Result<Validated, RequestError> {
        validate::completion(self, request_id)
    }
}

async fn handle_generation<B: GenerationBody>(
    state: ApiState,
    flavor: Flavor,
    request_id: RequestId,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Created first so that every exit, including the client vanishing mid-read, is recorded.
    let mut tracker = RequestTracker::new(state.metrics().clone(), request_id.clone());
    match start::<B>(&state, flavor, request_id, &headers, body, &mut tracker).await {
        Ok(running) if running.stream => generate::stream(&state, running, tracker),
        Ok(running) => generate::collect(&state, running, tracker).await,
        Err(err) => {
            tracker.fail(&err);
            state.render(err)
        }
    }
}

/// Reserves the audit entry, authenticates, applies the key's limits, parses, validates,
/// admits and starts the generation; reads its first event.
async fn start<B: GenerationBody>(
    state: &ApiState,
    flavor: Flavor,
    request_id: RequestId,
    headers: &HeaderMap,
    body: Body,
    tracker: &mut RequestTracker,
) -> Result<Running, RequestError> {
    if let Some((slot, include_text)) = state.audit_slot().await? {
        tracker.attach_audit(slot, include_text);
    }
    let principal = state.authenticate(headers)?;
    if let Some(principal) = &principal {
        tracker.set_principal(principal.clone());
    }
    state.admit_key(principal.as_ref())?;
    let wire: B = read_json(headers, body, state.config().body_limit_bytes).await?;
    let validated = wire.validate(request_id.clone())?;
    tracker.on_request(&validated.generate.model, &validated.generate.prompt);
    let model = validated.generate.model.clone();
    let stream = validated.stream;
    if !state.backend().models().iter().any(|card| card.id == model) {
        return Err(RequestError::new(
            ErrorClass::NotFound,
            reason::MODEL_NOT_FOUND,
            format!("The model '{model}' does not exist."),
        )
        .with_param("model"));
    }
    let permit = state.admission().clone().try_acquire_owned().map_err(|_| {
        RequestError::new(
            ErrorClass::CapacityExhausted,
            reason::TOO_MANY_REQUESTS,
            "The server is at its limit of concurrent requests; retry shortly.",
        )
    })?;
    let cancel = state.request_token();
    tracker.admit(permit, cancel.clone());
    let prefix = match flavor {
        Flavor::Chat => "chatcmpl",
        Flavor::Text => "cmpl",
    };
    let meta = ResponseMeta {
        flavor,
        id: format!("{prefix}-{request_id}"),
        created: unix_now(),
        model: model.as_str().to_owned(),
        include_usage: validated.include_usage,
    };
    let mut events = state.backend().generate(validated.generate, cancel).await?;
    tracker.generation_started();
    let first = loop {
        match events.recv().await {
            Some(noted @ (GenerateEvent::Path { .. } | GenerateEvent::Resumed(_))) => {
                tracker.on_event(&noted);
            }
            Some(GenerateEvent::Failed(err)) => return Err(err.into()),
            Some(event) => break event,
            None => {
                return Err(RequestError::new(
                    ErrorClass::Internal,
                    reason::BACKEND_STREAM_TRUNCATED,
                    "backend closed the event stream before its first event",
                ));
            }
        }
    };
    Ok(Running {
        meta,
        stream,
        events,
        first,
    })
}

async fn list_models(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Err(err) = state.authorize(&headers) {
        return state.render(err);
    }
    let data = state
        .backend()
        .models()
        .into_iter()
        .map(ModelObject::from)
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
    .into_response()
}

async fn get_model(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(err) = state.authorize(&headers) {
        return state.render(err);
    }
    match state
        .backend()
        .models()
        .into_iter()
        .find(|card| card.id.as_str() == id)
    {
        Some(card) => Json(ModelObject::from(card)).into_response(),
        None => state.render(
            RequestError::new(
                ErrorClass::NotFound,
                reason::MODEL_NOT_FOUND,
                format!("The model '{id}' does not exist."),
            )
            .with_param("model"),
        ),
    }
}

async fn healthz() -> Response {
    Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn readyz(State(state): State<ApiState>) -> Response {
    match state.backend().readiness() {
        crate::backend::Readiness::Ready => {
            Json(serde_json::json!({"status": "ready"})).into_response()
        }
        crate::backend::Readiness::NotReady { reason } => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not_ready", "reason": reason})),
        )
            .into_response(),
    }
}

/// OpenMetrics for clients that ask for it (Prometheus does), classic text otherwise.
async fn metrics(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let wants_openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (encoded, content_type) = if wants_openmetrics {
        (state.metrics().encode(), OPENMETRICS_CONTENT_TYPE)
    } else {
        (
            state.metrics().encode_prometheus_text(),
            PROMETHEUS_TEXT_CONTENT_TYPE,
        )
    };
    match encoded {
        Ok(text) => ([(header::CONTENT_TYPE, content_type)], text).into_response(),
        Err(_) => state.render(RequestError::new(
            ErrorClass::Internal,
            "metrics_encoding_failed",
            "encoding the metrics registry failed",
        )),
    }
}

async fn unknown_url(State(state): State<ApiState>, method: Method, uri: Uri) -> Response {
    state.render(RequestError::new(
        ErrorClass::NotFound,
        reason::UNKNOWN_URL,
        format!("Unknown request URL: {method} {}.", uri.path()),
    ))
}

async fn method_not_allowed(State(state): State<ApiState>, method: Method, uri: Uri) -> Response {
    state.render(RequestError::new(
        ErrorClass::InvalidRequest,
        reason::METHOD_NOT_ALLOWED,
        format!("Method {method} is not allowed on {}.", uri.path()),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    #[test]
    fn request_id_rules() {
        assert!(valid_request_id("abc-123_x.y:z"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("has space"));
        assert!(!valid_request_id("ünicode"));
        assert!(!valid_request_id(&"a".repeat(MAX_REQUEST_ID_LEN + 1)));
        let generated = new_request_id();
        assert!(valid_request_id(generated.as_str()));
        assert_eq!(generated.as_str().len(), 32);
        assert_ne!(generated, new_request_id());
    }
}
