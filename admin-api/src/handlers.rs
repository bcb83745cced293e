//! The handlers of the admin API and the JSON types they answer, each described for the
//! OpenAPI document ([`ApiDoc`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::str::FromStr;
use std::sync::Arc;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use converge_api::{EntryKind, Event, EventId, Head, Hlc, Key, Op, ReplicaId};
use converge_framework::{SourceStatus, SubscriberStatus, SyncEngine};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::{AdminState, ApiError, ErrorBody, JsonBody, MAX_EVENTS_PAGE};

/// Most history entries `/api/v1/keys/{key}` walks.
const MAX_HISTORY: usize = 1000;
/// Most conflicted keys `/api/v1/conflicts` lists.
const MAX_CONFLICTS: usize = 1000;

/// The OpenAPI 3 document of the admin API, generated from the handlers below.
#[derive(OpenApi)]
#[openapi(
    info(title = "converge admin API", description = "Status, metrics and controls of a converge daemon."),
    paths(
        healthz, metrics, status, events, key, conflicts, subscribers, replay, rebuild,
        sync_peer, pause, resume, plugins, openapi
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// `/healthz`'s answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// Liveness: answers while the daemon runs; never needs the token.
#[utoipa::path(get, path = "/healthz", tag = "meta",
    responses((status = 200, description = "The daemon is up", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AdminState>) -> Result<impl IntoResponse, ApiError> {
    let body = state
        .metrics()
        .render(state.engine())
        .map_err(|e| ApiError::internal("rendering metrics", e))?;
    Ok(([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body))
}

/// One peer in `/api/v1/status`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PeerInfo {
    /// Its replica ID.
    pub id: String,
    /// The address it is dialed at, if configured.
    pub address: Option<String>,
    /// Whether a sync session is up.
    pub connected: bool,
    /// The remote address of the current session.
    pub remote: Option<String>,
    /// Events this replica holds that the peer has not acknowledged (what the sync
    /// planner still has to send it).
    pub missing_on_peer: u64,
    /// Events the peer has acknowledged holding that this replica lacks (from its last
    /// announced version vector).
    pub missing_here: u64,
    /// Bytes sent to it since start.
    pub sent_bytes: u64,
    /// Bytes received from it since start.
    pub received_bytes: u64,
    /// Events sent to it since start.
    pub events_sent: u64,
    /// Events received from it since start.
    pub events_received: u64,
    /// Sessions with it since start that ended with an error (a lost connection, a
    /// timeout, or this replica failing to store what it sent, such as on a full disk).
    pub failed_sessions: u64,
    /// Why the last failed session failed; null once a session ended cleanly or a later
    /// one has been up for a minute.
    pub last_error: Option<String>,
}

/// A store subscriber.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SubscriberInfo {
    /// Its name: `folder`, or `mirror-<name>`.
    pub name: String,
    /// The next log offset it will process.
    pub cursor: u64,
    /// Durable events it has not processed yet.
    pub lag: u64,
    /// Events it applied since the daemon started.
    pub applied: u64,
    /// Whether a replay is running.
    pub replaying: bool,
    /// Keys it could not show (a file in a directory the daemon may not write), tried
    /// again; the log names each one and why.
    pub failed_keys: u64,
    /// Why its last batch failed (a full disk, a folder without its marker), until one
    /// succeeds: the batch waits and is tried again, nothing is lost.
    pub error: Option<String>,
}

/// A source of local changes.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SourceInfo {
    /// Its name: `folder`, or a source plugin's.
    pub name: String,
    /// False from a failure until, started again, it has scanned its folder.
    pub up: bool,
    /// Times it failed (and was started again) since the daemon started.
    pub failures: u64,
    /// Why it failed, while it is not up.
    pub error: Option<String>,
}

impl From<SourceStatus> for SourceInfo {
    fn from(s: SourceStatus) -> Self {
        SourceInfo {
            name: s.name,
            up: s.up,
            failures: s.failures,
            error: s.error,
        }
    }
}

impl From<SubscriberStatus> for SubscriberInfo {
    fn from(s: SubscriberStatus) -> Self {
        SubscriberInfo {
            name: s.name,
            cursor: s.cursor,
            lag: s.lag,
            applied: s.applied,
            replaying: s.replaying,
            failed_keys: s.failed,
            error: s.error,
        }
    }
}

/// A plugin running in the engine.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PluginInfo {
    /// Its name.
    pub name: String,
    /// Its role: source, store, transport or policy.
    pub role: String,
    /// The library it was loaded from (dynamically loaded plugins only).
    pub library: Option<String>,
    /// Why the library was refused (the daemon runs without it).
    pub error: Option<String>,
}

/// `/api/v1/status`: what an operator asks first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Status {
    /// This replica's ID.
    pub replica: String,
    /// Events in the log.
    pub log_length: u64,
    /// For each origin replica ID, the highest sequence number held without a gap.
    pub version_vector: BTreeMap<String, u64>,
    /// Whether sync is paused.
    pub paused: bool,
    /// The conflict policy.
    pub policy: String,
    /// Every configured or connected peer.
    pub peers: Vec<PeerInfo>,
    /// Every store subscriber.
    pub subscribers: Vec<SubscriberInfo>,
    /// Every source: whether it is up, and why not.
    pub sources: Vec<SourceInfo>,
    /// Remote events waiting for a gap to fill or for their content.
    pub pending_events: u64,
    /// Why appending remote events last failed (a full disk, an I/O error), while they
    /// wait to be tried again; absent when the last append worked.
    pub applier_error: Option<String>,
    /// Conflicted keys handed to stores since start (each store counts its own).
    pub conflicts: u64,
    /// Events applied by stores since start.
    pub applied: u64,
    /// Plugins running in the engine.
    pub plugins: Vec<PluginInfo>,
}

fn plugin_list(engine: &SyncEngine) -> Vec<PluginInfo> {
    engine
        .plugins()
        .iter()
        .map(|p| PluginInfo {
            name: p.name.clone(),
            role: p.role.clone(),
            library: p.library.as_ref().map(|l| l.display().to_string()),
            error: p.error.clone(),
        })
        .collect()
}

/// The replica's status.
#[utoipa::path(get, path = "/api/v1/status", tag = "status",
    responses((status = 200, description = "Status", body = Status),
              (status = 401, description = "auth = all and no or wrong token", body = ErrorBody)))]
pub async fn status(State(state): State<AdminState>) -> Result<Json<Status>, ApiError> {
    let engine = state.engine();
    let log = engine.log();
    let local = log.version_vector();
    let peers = engine
        .peers()
        .into_iter()
        .map(|p| PeerInfo {
            id: p.id.to_string(),
            address: p.address,
            connected: p.connected,
            remote: p.remote,
            missing_on_peer: p.behind,
            missing_here: p
                .acked
                .0
                .iter()
                .map(|(origin, seq)| seq.saturating_sub(local.get(origin)))
                .sum(),
            sent_bytes: p.sent_bytes,
            received_bytes: p.received_bytes,
            events_sent: p.events_sent,
            events_received: p.events_received,
            failed_sessions: p.failed_sessions,
            last_error: p.last_error,
        })
        .collect();
    let stats = engine.stats();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    Ok(Json(Status {
        replica: log.replica().to_string(),
        log_length: log.len(),
        version_vector: local
            .0
            .iter()
            .map(|(id, seq)| (id.to_string(), *seq))
            .collect(),
        paused: engine.is_paused(),
        policy: engine.policy_name().to_owned(),
        peers,
        subscribers: engine
            .subscribers()?
            .into_iter()
            .map(SubscriberInfo::from)
            .collect(),
        sources: engine.sources().into_iter().map(SourceInfo::from).collect(),
        pending_events: load(&stats.pending),
        applier_error: engine.applier_error(),
        conflicts: load(&stats.conflicts),
        applied: load(&stats.applied),
        plugins: plugin_list(engine),
    }))
}

/// What an event or head does.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OpInfo {
    /// `put` or `delete`.
    pub op: String,
    /// For puts: `file` or `dir`.
    pub kind: Option<String>,
    /// For files: the content's length in bytes.
    pub size: Option<u64>,
    /// For files: the content's root hash (hex).
    pub content: Option<String>,
    /// For puts: the modification time, ms since the Unix epoch.
    pub mtime_ms: Option<i64>,
    /// For puts: whether the owner-executable bit is set.
    pub executable: Option<bool>,
}

impl From<&Op> for OpInfo {
    fn from(op: &Op) -> Self {
        match op {
            Op::Put { content, meta } => OpInfo {
                op: "put".into(),
                kind: Some(
                    match meta.kind {
                        EntryKind::File => "file",
                        EntryKind::Dir => "dir",
                    }
                    .into(),
                ),
                size: content.map(|c| c.size),
                content: content.map(|c| c.root.to_hex()),
                mtime_ms: Some(meta.mtime_ms),
                executable: Some(meta.executable),
            },
            Op::Delete => OpInfo {
                op: "delete".into(),
                kind: None,
                size: None,
                content: None,
                mtime_ms: None,
                executable: None,
            },
        }
    }
}

/// An event of the log.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventInfo {
    /// Its log offset, when known.
    pub offset: Option<u64>,
    /// `origin:seq`.
    pub id: String,
    /// When, by the writer's hybrid logical clock: wall-clock ms.
    pub hlc_ms: u64,
    /// The clock's logical counter.
    pub hlc_logical: u32,
    /// The key (a relative path).
    pub key: String,
    /// The events it supersedes, as `origin:seq`.
    pub parents: Vec<String>,
    /// What it does.
    pub op: OpInfo,
}

impl EventInfo {
    fn new(offset: Option<u64>, event: &Event) -> Self {
        EventInfo {
            offset,
            id: event.id.to_string(),
            hlc_ms: event.hlc.wall_ms,
            hlc_logical: event.hlc.logical,
            key: event.key.to_string(),
            parents: event.parents.iter().map(ToString::to_string).collect(),
            op: OpInfo::from(&event.op),
        }
    }
}

/// Query of `/api/v1/events`.
#[derive(Debug, Deserialize, IntoParams)]
pub struct EventsQuery {
    /// First offset to return (default 0).
    pub from: Option<u64>,
    /// Most events to return (default 100, at most 1000).
    pub limit: Option<usize>,
}

/// A page of the log.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventsPage {
    /// The log's length when read.
    pub log_length: u64,
    /// The offset to ask for next.
    pub next: u64,
    /// The events, in log order.
    pub events: Vec<EventInfo>,
}

/// Runs `f` on a blocking thread: log scans read sled.
async fn blocking<T: Send + 'static>(
    state: &AdminState,
    f: impl FnOnce(&SyncEngine) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let engine = Arc::clone(state.engine());
    tokio::task::spawn_blocking(move || f(&engine))
        .await
        .map_err(|e| ApiError::internal("a blocking read", e))?
}

/// A page of the event log, in log order.
#[utoipa::path(get, path = "/api/v1/events", tag = "log", params(EventsQuery),
    responses((status = 200, description = "Events", body = EventsPage),
              (status = 400, description = "Bad query", body = ErrorBody)))]
pub async fn events(
    State(state): State<AdminState>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<EventsPage>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let from = query.from.unwrap_or(0);
    let limit = query.limit.unwrap_or(100).min(MAX_EVENTS_PAGE);
    blocking(&state, move |engine| {
        let log = engine.log();
        let log_length = log.len();
        let events = log.read(from, limit)?;
        let next = events.last().map_or(from, |(offset, _)| offset + 1);
        Ok(Json(EventsPage {
            log_length,
            next,
            events: events
                .iter()
                .map(|(offset, e)| EventInfo::new(Some(*offset), e))
                .collect(),
        }))
    })
    .await
}

/// A head of a key: an event nothing known supersedes.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HeadInfo {
    /// `origin:seq`.
    pub id: String,
    /// Wall-clock ms of its hybrid logical clock.
    pub hlc_ms: u64,
    /// The clock's logical counter.
    pub hlc_logical: u32,
    /// What it does.
    pub op: OpInfo,
}

impl From<&Head> for HeadInfo {
    fn from(h: &Head) -> Self {
        let Hlc { wall_ms, logical } = h.hlc;
        HeadInfo {
            id: h.id.to_string(),
            hlc_ms: wall_ms,
            hlc_logical: logical,
            op: OpInfo::from(&h.op),
        }
    }
}

/// Query of `/api/v1/keys/{key}`.
#[derive(Debug, Deserialize, IntoParams)]
pub struct KeyQuery {
    /// Most history entries to return (default 100, at most 1000).
    pub history: Option<usize>,
}

/// A key's heads, the view stores show, and its history.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyInfo {
    /// The key.
    pub key: String,
    /// Whether it has more than one head.
    pub conflicted: bool,
    /// The head the conflict policy picks (`None`: the key is absent, e.g. deleted).
    pub winner: Option<String>,
    /// Its heads.
    pub heads: Vec<HeadInfo>,
    /// Events on the key reached from the heads through their parents, newest first.
    pub history: Vec<EventInfo>,
    /// Whether the history was cut at the limit.
    pub history_truncated: bool,
}

/// A key's heads and history.
#[utoipa::path(get, path = "/api/v1/keys/{key}", tag = "log",
    params(("key" = String, Path, description = "The key: a relative path, e.g. notes/todo.md"), KeyQuery),
    responses((status = 200, description = "The key", body = KeyInfo),
              (status = 400, description = "Not a valid key", body = ErrorBody),
              (status = 404, description = "No event on that key", body = ErrorBody)))]
pub async fn key(
    State(state): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<KeyQuery>, QueryRejection>,
) -> Result<Json<KeyInfo>, ApiError> {
    let Path(raw) = path.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let key =
        Key::new(raw.clone()).map_err(|e| ApiError::BadRequest(format!("key {raw:?}: {e}")))?;
    let limit = query.history.unwrap_or(100).min(MAX_HISTORY);
    blocking(&state, move |engine| {
        let log = engine.log();
        let state = log.state(&key)?;
        if state.heads.is_empty() {
            return Err(ApiError::NotFound(format!("no event on key {key:?}")));
        }
        let view = engine.reconciler().view(&key, &state);
        // Breadth-first from the heads through parents, bounded.
        let mut seen: BTreeSet<EventId> = BTreeSet::new();
        let mut queue: VecDeque<EventId> = state.heads.iter().map(|h| h.id).collect();
        let mut history = Vec::new();
        let mut truncated = false;
        while let Some(id) = queue.pop_front() {
            if !seen.insert(id) {
                continue;
            }
            if history.len() == limit {
                truncated = true;
                break;
            }
            if let Some(event) = log.get(&id)? {
                queue.extend(event.parents.iter().copied());
                history.push(event);
            }
        }
        history.sort_by_key(|e| std::cmp::Reverse(e.lww_rank()));
        Ok(Json(KeyInfo {
            key: key.to_string(),
            conflicted: state.heads.len() > 1,
            winner: view.winner.as_ref().map(|h| h.id.to_string()),
            heads: state.heads.iter().map(HeadInfo::from).collect(),
            history: history.iter().map(|e| EventInfo::new(None, e)).collect(),
            history_truncated: truncated,
        }))
    })
    .await
}

/// A key with more than one head.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConflictInfo {
    /// The key.
    pub key: String,
    /// The head the conflict policy picks (`None`: a delete won).
    pub winner: Option<String>,
    /// Every head.
    pub heads: Vec<HeadInfo>,
}

/// `/api/v1/conflicts`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Conflicts {
    /// The conflict policy resolving them.
    pub policy: String,
    /// Conflicted keys listed.
    pub count: usize,
    /// Whether the list was cut at 1000 keys.
    pub truncated: bool,
    /// The conflicted keys.
    pub conflicts: Vec<ConflictInfo>,
}

/// Keys with more than one head, and what the policy shows for each.
#[utoipa::path(get, path = "/api/v1/conflicts", tag = "log",
    responses((status = 200, description = "Conflicted keys", body = Conflicts)))]
pub async fn conflicts(State(state): State<AdminState>) -> Result<Json<Conflicts>, ApiError> {
    blocking(&state, |engine| {
        let mut conflicts = Vec::new();
        let mut truncated = false;
        for item in engine.log().states() {
            let (key, state) = item?;
            if state.heads.len() < 2 {
                continue;
            }
            if conflicts.len() == MAX_CONFLICTS {
                truncated = true;
                break;
            }
            let view = engine.reconciler().view(&key, &state);
            conflicts.push(ConflictInfo {
                key: key.to_string(),
                winner: view.winner.as_ref().map(|h| h.id.to_string()),
                heads: state.heads.iter().map(HeadInfo::from).collect(),
            });
        }
        Ok(Json(Conflicts {
            policy: engine.policy_name().to_owned(),
            count: conflicts.len(),
            truncated,
            conflicts,
        }))
    })
    .await
}

/// Every store subscriber with its cursor and lag.
#[utoipa::path(get, path = "/api/v1/subscribers", tag = "subscribers",
    responses((status = 200, description = "Subscribers", body = [SubscriberInfo])))]
pub async fn subscribers(
    State(state): State<AdminState>,
) -> Result<Json<Vec<SubscriberInfo>>, ApiError> {
    Ok(Json(
        state
            .engine()
            .subscribers()?
            .into_iter()
            .map(SubscriberInfo::from)
            .collect(),
    ))
}

/// Body of a replay request.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// The log offset to re-apply from (0: everything).
    pub from: u64,
}

/// A replay that was started.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReplayStarted {
    /// The subscriber.
    pub subscriber: String,
    /// Where it restarts.
    pub from: u64,
}

/// Rewinds a subscriber to an offset and re-applies everything after it (idempotently).
#[utoipa::path(post, path = "/api/v1/subscribers/{name}/replay", tag = "subscribers",
    params(("name" = String, Path, description = "The subscriber, e.g. folder or mirror-backup")),
    request_body = ReplayRequest,
    security(("bearer" = [])),
    responses((status = 202, description = "Replay started", body = ReplayStarted),
              (status = 400, description = "Bad body or offset past the end", body = ErrorBody),
              (status = 401, description = "No or wrong token", body = ErrorBody),
              (status = 404, description = "No such subscriber", body = ErrorBody),
              (status = 409, description = "A replay of it is running", body = ErrorBody),
              (status = 413, description = "Body too large", body = ErrorBody)))]
pub async fn replay(
    State(state): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
    JsonBody(body): JsonBody<ReplayRequest>,
) -> Result<(StatusCode, Json<ReplayStarted>), ApiError> {
    let Path(name) = path.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    state.engine().replay(&name, body.from)?;
    tracing::info!(subscriber = %name, from = body.from, "admin API: replay started");
    Ok((
        StatusCode::ACCEPTED,
        Json(ReplayStarted {
            subscriber: name,
            from: body.from,
        }),
    ))
}

/// A finished rebuild.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Rebuilt {
    /// Events folded into the new projection.
    pub events: u64,
}

/// Drops the projection and folds the whole log into it again.
#[utoipa::path(post, path = "/api/v1/rebuild", tag = "subscribers",
    security(("bearer" = [])),
    responses((status = 200, description = "Rebuilt", body = Rebuilt),
              (status = 401, description = "No or wrong token", body = ErrorBody)))]
pub async fn rebuild(State(state): State<AdminState>) -> Result<Json<Rebuilt>, ApiError> {
    let events = state.engine().rebuild().await?;
    tracing::info!(events, "admin API: projection rebuilt");
    Ok(Json(Rebuilt { events }))
}

/// A forced sync round.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SyncStarted {
    /// The peer.
    pub peer: String,
}

/// Runs an anti-entropy round with one connected peer now.
#[utoipa::path(post, path = "/api/v1/peers/{id}/sync", tag = "sync",
    params(("id" = String, Path, description = "The peer's replica ID")),
    security(("bearer" = [])),
    responses((status = 202, description = "Round started", body = SyncStarted),
              (status = 400, description = "Not a replica ID", body = ErrorBody),
              (status = 401, description = "No or wrong token", body = ErrorBody),
              (status = 404, description = "Not a peer of this replica", body = ErrorBody),
              (status = 409, description = "The peer is not connected", body = ErrorBody)))]
pub async fn sync_peer(
    State(state): State<AdminState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<SyncStarted>), ApiError> {
    let Path(raw) = path.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let id = ReplicaId::from_str(&raw)
        .map_err(|e| ApiError::BadRequest(format!("peer {raw:?}: {e}")))?;
    if !state.engine().peers().iter().any(|p| p.id == id) {
        return Err(ApiError::NotFound(format!(
            "{id} is not a peer of this replica"
        )));
    }
    state.engine().sync_now(&id)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(SyncStarted {
            peer: id.to_string(),
        }),
    ))
}

/// Whether sync is paused.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Paused {
    /// `true` after pause, `false` after resume.
    pub paused: bool,
}

/// Stops sending and receiving: closes every session until resumed.
#[utoipa::path(post, path = "/api/v1/sync/pause", tag = "sync",
    security(("bearer" = [])),
    responses((status = 200, description = "Paused", body = Paused),
              (status = 401, description = "No or wrong token", body = ErrorBody)))]
pub async fn pause(State(state): State<AdminState>) -> Json<Paused> {
    state.engine().pause();
    tracing::info!("admin API: sync paused");
    Json(Paused { paused: true })
}

/// Resumes sync; sessions reconnect and catch up.
#[utoipa::path(post, path = "/api/v1/sync/resume", tag = "sync",
    security(("bearer" = [])),
    responses((status = 200, description = "Resumed", body = Paused),
              (status = 401, description = "No or wrong token", body = ErrorBody)))]
pub async fn resume(State(state): State<AdminState>) -> Json<Paused> {
    state.engine().resume();
    tracing::info!("admin API: sync resumed");
    Json(Paused { paused: false })
}

/// `/api/v1/plugins`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Plugins {
    /// The conflict policy.
    pub policy: String,
    /// The plugins running in the engine.
    pub plugins: Vec<PluginInfo>,
}

/// The conflict policy and the plugins running in the engine.
#[utoipa::path(get, path = "/api/v1/plugins", tag = "status",
    responses((status = 200, description = "Plugins", body = Plugins)))]
pub async fn plugins(State(state): State<AdminState>) -> Json<Plugins> {
    Json(Plugins {
        policy: state.engine().policy_name().to_owned(),
        plugins: plugin_list(state.engine()),
    })
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3 document", body = Object)))]
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
