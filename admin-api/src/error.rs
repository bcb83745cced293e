//! `ApiError`: every failure of the admin API, as a status code and a JSON body
//! `{"error": "...", "detail": "..."}`. Internal failures are logged, never leaked.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use converge_framework::{EngineError, LogError};
use serde::Serialize;
use utoipa::ToSchema;

/// A failed admin API call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The request is malformed: a bad key, bad JSON, a bad peer ID, a bad offset.
    #[error("{0}")]
    BadRequest(String),
    /// The bearer token is missing or wrong.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// No such subscriber, peer, key or route.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with what is running (a replay already in progress, a peer
    /// that is not connected).
    #[error("{0}")]
    Conflict(String),
    /// The request body is larger than the API accepts.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// Something failed inside the daemon; the detail goes to the log only.
    #[error("internal error: {0}")]
    Internal(String),
}

/// The JSON body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// A short, stable error code: `bad_request`, `unauthorized`, `not_found`,
    /// `conflict`, `payload_too_large` or `internal`.
    pub error: &'static str,
    /// What went wrong, for a human.
    pub detail: String,
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::Internal(_) => "internal",
        }
    }

    /// An internal failure: logged here with its detail, answered without it.
    pub fn internal(what: &str, err: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %err, "admin API: {what} failed");
        ApiError::Internal(what.to_owned())
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> Self {
        match err {
            EngineError::UnknownSubscriber(_) => ApiError::NotFound(err.to_string()),
            EngineError::ReplayInProgress(_) | EngineError::NotConnected(_) => {
                ApiError::Conflict(err.to_string())
            }
            EngineError::ReplayPastEnd { .. } => ApiError::BadRequest(err.to_string()),
            other => ApiError::internal("engine call", other),
        }
    }
}

impl From<LogError> for ApiError {
    fn from(err: LogError) -> Self {
        ApiError::internal("reading the event log", err)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let detail = match &self {
            ApiError::Internal(what) => format!("{what} failed; see the daemon's log"),
            other => other.to_string(),
        };
        let body = ErrorBody {
            error: self.code(),
            detail,
        };
        let mut response = (self.status(), axum::Json(body)).into_response();
        if matches!(self, ApiError::Unauthorized(_)) {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
