//! # converge-admin
//!
//! The daemon's admin HTTP API and its Prometheus metrics: an axum [`Router`] built by
//! [`router`] over an [`AdminState`] (the running engine, the [`Metrics`] and the bearer
//! token), so tests drive it with `oneshot` and the daemon serves it on `[admin] listen`.
//!
//! Every call answers JSON (`/metrics` answers the Prometheus text format); every error
//! is an [`ApiError`] with body `{"error": "...", "detail": "..."}`. Calls that change
//! something (POST) need `Authorization: Bearer <token>`; with [`AuthMode::All`] reads do
//! too; `/healthz` never does. The OpenAPI document at `/api/v1/openapi.json` is
//! generated from the handlers ([`ApiDoc`]).
//!
//! ```
//! use std::sync::Arc;
//! use axum::body::Body;
//! use axum::http::{Request, StatusCode};
//! use converge_admin::{router, AdminState, AuthMode, Metrics};
//! use converge_framework::log::{EventLog, LogConfig};
//! use converge_framework::SyncEngine;
//! use tower::ServiceExt;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let metrics = Arc::new(Metrics::new()?);
//! let log = EventLog::open(LogConfig::temporary())?;
//! let engine = SyncEngine::builder(log, Arc::new(converge_policies::Lww))
//!     .observer(metrics.clone())
//!     .start()
//!     .await?;
//! let app = router(AdminState::new(Arc::new(engine), metrics, "s3cret", AuthMode::Mutating));
//! let response = app
//!     .oneshot(Request::post("/api/v1/sync/pause").body(Body::empty())?)
//!     .await?;
//! assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
#![deny(missing_docs)]

mod error;
mod handlers;
mod metrics;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use converge_framework::SyncEngine;
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;

pub use error::{ApiError, ErrorBody};
pub use handlers::*;
pub use metrics::{Metrics, MetricsError};

/// Largest request body accepted, in bytes; larger ones get 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Most events `/api/v1/events` returns in one page.
pub const MAX_EVENTS_PAGE: usize = 1000;

/// Every route the router serves, as `(method, OpenAPI path)`; the OpenAPI document lists
/// each (a test checks it).
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/metrics"),
    ("get", "/api/v1/status"),
    ("get", "/api/v1/events"),
    ("get", "/api/v1/keys/{key}"),
    ("get", "/api/v1/conflicts"),
    ("get", "/api/v1/subscribers"),
    ("post", "/api/v1/subscribers/{name}/replay"),
    ("post", "/api/v1/rebuild"),
    ("post", "/api/v1/peers/{id}/sync"),
    ("post", "/api/v1/sync/pause"),
    ("post", "/api/v1/sync/resume"),
    ("get", "/api/v1/plugins"),
    ("get", "/api/v1/openapi.json"),
];

/// Which calls need the bearer token (`[admin] auth`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuthMode {
    /// Only calls that change something (POST).
    #[default]
    Mutating,
    /// Every call but `/healthz`.
    All,
}

/// What the handlers share: cheap to clone.
#[derive(Clone)]
pub struct AdminState {
    inner: Arc<Shared>,
}

struct Shared {
    engine: Arc<SyncEngine>,
    metrics: Arc<Metrics>,
    token: Vec<u8>,
    auth: AuthMode,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("engine", &self.inner.engine)
            .field("auth", &self.inner.auth)
            .finish_non_exhaustive()
    }
}

impl AdminState {
    /// The state of an API over `engine`, rendering `metrics` (the engine's observer),
    /// accepting bearer `token` (surrounding whitespace ignored, as in a token file).
    pub fn new(
        engine: Arc<SyncEngine>,
        metrics: Arc<Metrics>,
        token: impl AsRef<str>,
        auth: AuthMode,
    ) -> AdminState {
        AdminState {
            inner: Arc::new(Shared {
                engine,
                metrics,
                token: token.as_ref().trim().as_bytes().to_vec(),
                auth,
            }),
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<SyncEngine> {
        &self.inner.engine
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Whether `header` (an `Authorization` value) carries the token. Constant-time in the
    /// token's content; an empty configured token accepts nothing.
    fn accepts(&self, header: Option<&[u8]>) -> bool {
        let Some(given) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
            return false;
        };
        !self.inner.token.is_empty() && bool::from(given.trim_ascii().ct_eq(&self.inner.token))
    }
}

/// The admin API: every route of [`ROUTES`], the auth check, a 64 KiB body limit and JSON
/// errors for unknown routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(handlers::healthz))
        .route("/metrics", get(handlers::metrics))
        .route("/api/v1/status", get(handlers::status))
        .route("/api/v1/events", get(handlers::events))
        .route("/api/v1/keys/{*key}", get(handlers::key))
        .route("/api/v1/conflicts", get(handlers::conflicts))
        .route("/api/v1/subscribers", get(handlers::subscribers))
        .route("/api/v1/subscribers/{name}/replay", post(handlers::replay))
        .route("/api/v1/rebuild", post(handlers::rebuild))
        .route("/api/v1/peers/{id}/sync", post(handlers::sync_peer))
        .route("/api/v1/sync/pause", post(handlers::pause))
        .route("/api/v1/sync/resume", post(handlers::resume))
        .route("/api/v1/plugins", get(handlers::plugins))
        .route("/api/v1/openapi.json", get(handlers::openapi))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::BadRequest("method not allowed on this route".into())
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Checks the bearer token where the [`AuthMode`] asks for it.
async fn authorize(
    State(state): State<AdminState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let read = matches!(*request.method(), Method::GET | Method::HEAD);
    let needs_token =
        request.uri().path() != "/healthz" && (!read || state.inner.auth == AuthMode::All);
    if needs_token {
        match request.headers().get(header::AUTHORIZATION) {
            None => return Err(ApiError::Unauthorized("missing bearer token")),
            Some(value) if !state.accepts(Some(value.as_bytes())) => {
                return Err(ApiError::Unauthorized("wrong bearer token"))
            }
            Some(_) => {}
        }
    }
    Ok(next.run(request).await)
}

/// A JSON request body whose every rejection is an [`ApiError`]: 413 past
/// [`MAX_BODY_BYTES`], 400 for anything that is not the expected JSON.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(format!(
                    "the request body is larger than {MAX_BODY_BYTES} bytes"
                ))
            } else {
                ApiError::BadRequest(r.body_text())
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
    }
}

/// How long [`serve`] lets the calls in flight finish once told to stop.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Serves [`router`]`(state)` on `listener` until `shutdown` resolves, then lets the calls
/// in flight finish for up to [`SHUTDOWN_GRACE`] and returns. The bound matters: a
/// client that sent half a request keeps its connection busy for as long as it likes,
/// and the daemon stops its engine (flushing it) only once this returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AdminState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopping.send(());
    });
    let grace_over = async move {
        match stopped.await {
            Ok(()) => tokio::time::sleep(SHUTDOWN_GRACE).await,
            // The server ended first (it failed): nothing to bound.
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        served = std::future::IntoFuture::into_future(server) => served,
        () = grace_over => {
            tracing::warn!(
                "admin API: connections still open {SHUTDOWN_GRACE:?} after shutdown began, leaving them"
            );
            Ok(())
        }
    }
}
