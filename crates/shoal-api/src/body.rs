//! Reads a request body as strict JSON: the right content type, a hard size limit enforced while
//! reading (a declared oversize body is refused before a byte of it is read), and parse errors
//! that name the parameter and position at fault.

use axum::body::Body;
use axum::http::{HeaderMap, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;
use shoal_types::ErrorClass;

use crate::error::{RequestError, reason};

/// Reads and deserialises `body`, refusing anything but `application/json` up to `limit` bytes.
pub(crate) async fn read_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<T, RequestError> {
    check_content_type(headers)?;
    if let Some(declared) = declared_length(headers)
        && declared > limit as u64
    {
        return Err(too_large(limit));
    }
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(too_large(limit));
        }
        Err(err) => {
            tracing::debug!(error = %err, "reading request body failed");
            return Err(RequestError::new(
                ErrorClass::InvalidRequest,
                reason::BODY_READ_FAILED,
                "The request body could not be read.",
            ));
        }
    };
    parse_json(&bytes)
}

fn check_content_type(headers: &HeaderMap) -> Result<(), RequestError> {
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = value.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        let shown = if value.is_empty() { "none" } else { value };
        Err(RequestError::new(
            ErrorClass::InvalidRequest,
            reason::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type must be application/json (got {shown})."),
        ))
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn too_large(limit: usize) -> RequestError {
    RequestError::new(
        ErrorClass::InvalidRequest,
        reason::BODY_TOO_LARGE,
        format!("The request body exceeds the limit of {limit} bytes."),
    )
}

/// Parses `bytes`, turning serde's error into one that names the parameter path.
pub(crate) fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RequestError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(de).map_err(json_error)?;
    Ok(value)
}

fn json_error(err: serde_path_to_error::Error<serde_json::Error>) -> RequestError {
    let path = err.path().to_string();
    let inner = err.into_inner();
    let param = (path != ".").then_some(path);
    if !inner.is_data() {
        let at = param
            .as_deref()
            .map(|p| format!(" inside `{p}`"))
            .unwrap_or_default();
        return RequestError::new(
            ErrorClass::InvalidRequest,
            reason::INVALID_JSON,
            format!("The request body is not valid JSON{at}: {inner}."),
        );
    }
    // serde's wording for `deny_unknown_fields` is stable; it is the only signal that tells an
    // unknown parameter apart from a badly typed one.
    let unknown = inner.to_string().starts_with("unknown field");
    let (code, message) = match (&param, unknown) {
        (Some(p), true) => (
            reason::UNKNOWN_PARAMETER,
            format!("Unrecognized request argument supplied: {p} ({inner})."),
        ),
        (Some(p), false) => (
            reason::INVALID_TYPE,
            format!("Invalid value for '{p}': {inner}."),
        ),
        (None, _) => (
            reason::INVALID_TYPE,
            format!("Invalid request body: {inner}."),
        ),
    };
    let err = RequestError::new(ErrorClass::InvalidRequest, code, message);
    match param {
        Some(p) => err.with_param(p),
        None => err,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::wire::ChatCompletionRequest;
    use axum::http::HeaderValue;

    fn parse(s: &str) -> RequestError {
        parse_json::<ChatCompletionRequest>(s.as_bytes()).unwrap_err()
    }

    #[test]
    fn unknown_field_is_named() {
        let err = parse(r#"{"model":"m","messages":[],"tools":[]}"#);
        assert_eq!(err.reason, reason::UNKNOWN_PARAMETER);
        assert_eq!(err.param.as_deref(), Some("tools"));
        assert!(err.message.contains("tools"), "{}", err.message);

        let err = parse(r#"{"model":"m","messages":[{"role":"user","content":"x","foo":1}]}"#);
        assert_eq!(err.param.as_deref(), Some("messages[0].foo"));
    }

    #[test]
    fn bad_type_names_parameter() {
        let err = parse(r#"{"model":"m","messages":[],"temperature":"hot"}"#);
        assert_eq!(err.reason, reason::INVALID_TYPE);
        assert_eq!(err.param.as_deref(), Some("temperature"));

        let err = parse(r#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#);
        assert_eq!(err.param.as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn missing_field_and_syntax_errors() {
        let err = parse(r#"{"messages":[]}"#);
        assert_eq!(err.reason, reason::INVALID_TYPE);
        assert!(
            err.message.contains("missing field `model`"),
            "{}",
            err.message
        );

        let err = parse(r#"{"model":"m","messages":[}"#);
        assert_eq!(err.reason, reason::INVALID_JSON);
        assert!(err.message.contains("line 1 column"), "{}", err.message);

        let err = parse("");
        assert_eq!(err.reason, reason::INVALID_JSON);
    }

    #[test]
    fn content_type_rules() {
        let mut headers = HeaderMap::new();
        assert!(check_content_type(&headers).is_err());
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert_eq!(
            check_content_type(&headers).unwrap_err().reason,
            reason::UNSUPPORTED_MEDIA_TYPE
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("Application/JSON; charset=utf-8"),
        );
        assert!(check_content_type(&headers).is_ok());
    }
}
