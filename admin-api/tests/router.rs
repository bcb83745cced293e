//! Every admin API route through `Router::oneshot`, over a real engine on a temporary log
//! with a folder store: the answers, and each error status (400, 401, 404, 409, 413).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use converge_admin::{router, AdminState, AuthMode, Metrics, ROUTES};
use converge_api::{Event, EventId, Hlc, Key, Meta, Op, ReplicaId};
use converge_framework::log::{EventLog, LocalChange, LogConfig};
use converge_framework::{EngineConfig, PeerConfig, SyncEngine};
use converge_plugin_fs::{FsConfig, FsStore};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

const TOKEN: &str = "t0ken";
const PEER: ReplicaId = ReplicaId([7; 16]);

struct Fixture {
    app: Router,
    engine: Arc<SyncEngine>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

/// An engine with a folder store and a mirror, one configured (never connected) peer,
/// and three keys: `a` and `dir/b` written locally, `a` also written concurrently by
/// another replica (a conflict).
async fn fixture(auth: AuthMode) -> Fixture {
    let metrics = Arc::new(Metrics::new().unwrap());
    let log = EventLog::open(LogConfig::temporary()).unwrap();
    let folder = tempfile::tempdir().unwrap();
    let mirror = tempfile::tempdir().unwrap();
    let engine = SyncEngine::builder(log, Arc::new(converge_policies::Lww))
        .observer(metrics.clone())
        .config(EngineConfig {
            peers: vec![PeerConfig {
                id: PEER,
                address: None,
            }],
            ..EngineConfig::default()
        })
        .store(Arc::new(FsStore::new(FsConfig::new(folder.path()))))
        .store(Arc::new(FsStore::mirror(
            "backup",
            FsConfig::new(mirror.path()),
        )))
        .start()
        .await
        .unwrap();
    let dir = |k: &str| {
        LocalChange::new(
            Key::new(k).unwrap(),
            Op::Put {
                content: None,
                meta: Meta::dir(1),
            },
        )
    };
    engine
        .log()
        .append_local(vec![dir("a"), dir("dir"), dir("dir/b")])
        .await
        .unwrap();
    let other = Event {
        id: EventId {
            origin: ReplicaId([9; 16]),
            seq: 1,
        },
        hlc: Hlc {
            wall_ms: 1,
            logical: 0,
        },
        key: Key::new("a").unwrap(),
        parents: vec![],
        op: Op::Delete,
    };
    engine.log().append(vec![other]).await.unwrap();
    let engine = Arc::new(engine);
    let app = router(AdminState::new(engine.clone(), metrics, TOKEN, auth));
    Fixture {
        app,
        engine,
        _dirs: (folder, mirror),
    }
}

/// Sends one request; `token` goes in `Authorization: Bearer`.
async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Option<String>,
) -> (StatusCode, String) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if body.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let request = request
        .body(body.map_or_else(Body::empty, Body::from))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

/// Checks status and, for JSON answers, returns the body; error bodies must be
/// `{"error", "detail"}`.
async fn check(
    app: &Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Option<Value>,
    expected: StatusCode,
) -> Value {
    let (status, text) = call(app, method, uri, token, body.map(|b| b.to_string())).await;
    assert_eq!(status, expected, "{method} {uri}: {text}");
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if !status.is_success() {
        assert!(
            value["error"].is_string() && value["detail"].is_string(),
            "{method} {uri}: error body {text}"
        );
    }
    value
}

#[tokio::test]
async fn reads_answer_json() {
    let f = fixture(AuthMode::Mutating).await;
    let app = &f.app;
    let health = check(app, "GET", "/healthz", None, None, StatusCode::OK).await;
    assert_eq!(health["status"], "ok");

    let status = check(app, "GET", "/api/v1/status", None, None, StatusCode::OK).await;
    let me = f.engine.log().replica().to_string();
    assert_eq!(status["replica"], me);
    assert_eq!(status["log_length"], 4);
    assert_eq!(status["version_vector"][&me], 3);
    assert_eq!(status["version_vector"][ReplicaId([9; 16]).to_string()], 1);
    assert_eq!(status["paused"], false);
    assert_eq!(status["peers"][0]["id"], PEER.to_string());
    assert_eq!(status["peers"][0]["connected"], false);
    assert_eq!(status["peers"][0]["missing_on_peer"], 4);
    let names: Vec<&str> = status["subscribers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["folder", "mirror-backup"]);

    let page = check(
        app,
        "GET",
        "/api/v1/events?from=1&limit=2",
        None,
        None,
        StatusCode::OK,
    )
    .await;
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    assert_eq!(page["events"][0]["offset"], 1);
    assert_eq!(page["events"][0]["key"], "dir");
    assert_eq!(page["next"], 3);
    let capped = check(
        app,
        "GET",
        "/api/v1/events?limit=999999",
        None,
        None,
        StatusCode::OK,
    )
    .await;
    assert_eq!(capped["events"].as_array().unwrap().len(), 4);

    let key = check(app, "GET", "/api/v1/keys/dir/b", None, None, StatusCode::OK).await;
    assert_eq!(key["key"], "dir/b");
    assert_eq!(key["conflicted"], false);
    assert_eq!(key["heads"].as_array().unwrap().len(), 1);
    assert_eq!(key["history"].as_array().unwrap().len(), 1);
    assert_eq!(key["heads"][0]["op"]["kind"], "dir");

    let conflicted = check(app, "GET", "/api/v1/keys/a", None, None, StatusCode::OK).await;
    assert_eq!(conflicted["conflicted"], true);
    assert_eq!(conflicted["heads"].as_array().unwrap().len(), 2);

    let conflicts = check(app, "GET", "/api/v1/conflicts", None, None, StatusCode::OK).await;
    assert_eq!(conflicts["count"], 1);
    assert_eq!(conflicts["conflicts"][0]["key"], "a");
    assert_eq!(conflicts["policy"], "lww");

    let subs = check(
        app,
        "GET",
        "/api/v1/subscribers",
        None,
        None,
        StatusCode::OK,
    )
    .await;
    assert_eq!(subs.as_array().unwrap().len(), 2);

    let plugins = check(app, "GET", "/api/v1/plugins", None, None, StatusCode::OK).await;
    assert_eq!(plugins["policy"], "lww");
    assert!(plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "mirror-backup" && p["role"] == "store"));
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let f = fixture(AuthMode::Mutating).await;
    let (status, text) = call(&f.app, "GET", "/metrics", None, None).await;
    assert_eq!(status, StatusCode::OK);
    for needle in [
        "converge_log_events_total{origin=\"local\"} 3",
        "converge_log_events_total{origin=\"remote\"} 1",
        "converge_log_length_events 4",
        "converge_peer_connected{peer=",
        "converge_peer_session_failures_total{peer=",
        "converge_pending_events{queue=\"remote\"} 0",
        "converge_subscriber_lag_events{subscriber=\"mirror-backup\"}",
        "converge_subscriber_failed_keys{subscriber=\"mirror-backup\"} 0",
        "converge_conflicts_total{policy=\"lww\"}",
        "converge_build_info{version=",
        "# TYPE converge_append_duration_seconds histogram",
        "# TYPE converge_apply_duration_seconds histogram",
        "converge_sync_sent_bytes_total{peer=",
        "converge_sync_received_bytes_total{peer=",
        "converge_events_applied_total{subscriber=\"folder\"}",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    // A second scrape does not count the log twice.
    let (_, again) = call(&f.app, "GET", "/metrics", None, None).await;
    assert!(again.contains("converge_log_events_total{origin=\"local\"} 3"));
}

#[tokio::test]
async fn controls_work() {
    let f = fixture(AuthMode::Mutating).await;
    let app = &f.app;
    let t = Some(TOKEN);
    let paused = check(app, "POST", "/api/v1/sync/pause", t, None, StatusCode::OK).await;
    assert_eq!(paused["paused"], true);
    let status = check(app, "GET", "/api/v1/status", None, None, StatusCode::OK).await;
    assert_eq!(status["paused"], true);
    let resumed = check(app, "POST", "/api/v1/sync/resume", t, None, StatusCode::OK).await;
    assert_eq!(resumed["paused"], false);
    assert!(!f.engine.is_paused());

    let before = check(app, "GET", "/api/v1/keys/a", None, None, StatusCode::OK).await;
    let rebuilt = check(app, "POST", "/api/v1/rebuild", t, None, StatusCode::OK).await;
    assert_eq!(rebuilt["events"], 4);
    let after = check(app, "GET", "/api/v1/keys/a", None, None, StatusCode::OK).await;
    assert_eq!(before, after);

    let body = Some(json!({"from": 0}));
    let started = check(
        app,
        "POST",
        "/api/v1/subscribers/mirror-backup/replay",
        t,
        body.clone(),
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(started["subscriber"], "mirror-backup");
    // The store's loop has not run yet (current-thread runtime, no await in between).
    check(
        app,
        "POST",
        "/api/v1/subscribers/mirror-backup/replay",
        t,
        body,
        StatusCode::CONFLICT,
    )
    .await;
}

#[tokio::test]
async fn errors_have_the_right_status() {
    let f = fixture(AuthMode::Mutating).await;
    let app = &f.app;
    let t = Some(TOKEN);
    let bad = StatusCode::BAD_REQUEST;
    let replay = "/api/v1/subscribers/folder/replay";
    // 400: bad key, bad JSON, bad peer ID, bad query, offset past the end.
    let e = check(app, "GET", "/api/v1/keys/a%00b", None, None, bad).await;
    assert!(e["detail"].as_str().unwrap().contains("a\\0b"), "{e}");
    let (status, text) = call(app, "POST", replay, t, Some("{".into())).await;
    assert_eq!(status, bad, "{text}");
    assert!(text.contains("invalid JSON"), "{text}");
    check(app, "POST", replay, t, Some(json!({"form": 1})), bad).await;
    check(app, "POST", "/api/v1/peers/nope/sync", t, None, bad).await;
    check(app, "GET", "/api/v1/events?from=-1", None, None, bad).await;
    check(app, "POST", replay, t, Some(json!({"from": 99})), bad).await;
    // 401: missing and wrong token, on every mutating route; reads need none.
    for (method, path) in ROUTES.iter().filter(|(m, _)| *m == "post") {
        let path = path
            .replace("{name}", "folder")
            .replace("{id}", &PEER.to_string());
        let method = method.to_uppercase();
        let e = check(app, &method, &path, None, None, StatusCode::UNAUTHORIZED).await;
        assert_eq!(e["detail"], "missing bearer token");
        let e = check(
            app,
            &method,
            &path,
            Some("wrong"),
            None,
            StatusCode::UNAUTHORIZED,
        )
        .await;
        assert_eq!(e["detail"], "wrong bearer token");
    }
    // 404: unknown subscriber, peer, key, route.
    check(
        app,
        "POST",
        "/api/v1/subscribers/nobody/replay",
        t,
        Some(json!({"from": 0})),
        StatusCode::NOT_FOUND,
    )
    .await;
    let stranger = ReplicaId([1; 16]);
    check(
        app,
        "POST",
        &format!("/api/v1/peers/{stranger}/sync"),
        t,
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
    check(
        app,
        "GET",
        "/api/v1/keys/nothing/here",
        None,
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
    check(
        app,
        "GET",
        "/api/v1/nope",
        None,
        None,
        StatusCode::NOT_FOUND,
    )
    .await;
    // 409: a known peer that is not connected.
    check(
        app,
        "POST",
        &format!("/api/v1/peers/{PEER}/sync"),
        t,
        None,
        StatusCode::CONFLICT,
    )
    .await;
    // 413: a body past the limit.
    let huge = format!("{{\"from\": 0, \"pad\": \"{}\"}}", "x".repeat(100 * 1024));
    let (status, text) = call(app, "POST", replay, t, Some(huge)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    assert!(text.contains("\"error\":\"payload_too_large\""), "{text}");
}

#[tokio::test]
async fn auth_all_guards_reads_but_not_healthz() {
    let f = fixture(AuthMode::All).await;
    let app = &f.app;
    check(app, "GET", "/healthz", None, None, StatusCode::OK).await;
    for (_, path) in ROUTES
        .iter()
        .filter(|(m, p)| *m == "get" && *p != "/healthz")
    {
        let path = path.replace("{key}", "a");
        check(app, "GET", &path, None, None, StatusCode::UNAUTHORIZED).await;
        check(
            app,
            "GET",
            &path,
            Some("wrong"),
            None,
            StatusCode::UNAUTHORIZED,
        )
        .await;
        let (status, _) = call(app, "GET", &path, Some(TOKEN), None).await;
        assert_eq!(status, StatusCode::OK, "GET {path}");
    }
}

#[tokio::test]
async fn openapi_lists_every_route() {
    let f = fixture(AuthMode::Mutating).await;
    let doc = check(
        app_of(&f),
        "GET",
        "/api/v1/openapi.json",
        None,
        None,
        StatusCode::OK,
    )
    .await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for (method, path) in ROUTES {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing from the OpenAPI document"
        );
    }
    assert_eq!(doc["paths"].as_object().unwrap().len(), 14);
}

fn app_of(f: &Fixture) -> &Router {
    &f.app
}
