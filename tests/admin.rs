//! End-to-end tests of the admin API and metrics with real daemons (`converge run` as
//! child processes on 127.0.0.1): `/metrics` checked by `promtool`, scraped by a real
//! Prometheus server, matched against the Grafana dashboard; replay, rebuild, pause and
//! resume, forced sync, auth, and the CLI clients.
//!
//! `promtool` and `prometheus` come from Debian's `prometheus` package (`.ci/run`
//! installs it). A test that needs them fails, never skips, when they are missing.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{free_port, wait_until, Daemon};
use std::time::Duration;

use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(90);

/// The path of a tool from Debian's `prometheus` package. A fresh machine lacks it and
/// the README's test command must pass there too, so the test installs the package when
/// it can (root, with apt-get); otherwise it fails (never skips), naming the package.
fn tool(name: &str) -> PathBuf {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    let find = || {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
    };
    if find().is_none() {
        INSTALL.call_once(|| {
            // SAFETY: getuid has no preconditions and cannot fail.
            let root = unsafe { libc::getuid() } == 0;
            if root && Path::new("/usr/bin/apt-get").exists() {
                eprintln!("installing Debian's prometheus package for the metrics tests");
                let apt = |args: &[&str]| {
                    Command::new("apt-get")
                        .args(args)
                        .env("DEBIAN_FRONTEND", "noninteractive")
                        .status()
                        .is_ok_and(|s| s.success())
                };
                let _ = apt(&["update"])
                    && apt(&["install", "-y", "--no-install-recommends", "prometheus"]);
            }
        });
    }
    find().unwrap_or_else(|| {
        panic!(
            "`{name}` is not installed and could not be installed here: this test needs \
             Debian's `prometheus` package (apt-get update && apt-get install -y prometheus)"
        )
    })
}

/// The admin-API side of a test daemon (the lifecycle is the shared harness's).
trait Admin {
    fn url(&self, path: &str) -> String;
    fn token(&self) -> String;
    fn get(&self, path: &str) -> Value;
    fn text(&self, path: &str) -> String;
    fn post(&self, path: &str, body: Option<Value>, token: Option<&str>) -> (u16, Value);
    fn control(&self, path: &str, body: Option<Value>) -> Value;
    fn status(&self) -> Value;
    fn settle(&self);
    /// Starts the daemon and waits until its admin API answers.
    fn start_admin(&mut self);
}

impl Admin for Daemon {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    fn token(&self) -> String {
        fs::read_to_string(self.data.path().join("admin.token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn get(&self, path: &str) -> Value {
        ureq::get(&self.url(path))
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    }

    fn text(&self, path: &str) -> String {
        ureq::get(&self.url(path))
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    }

    /// A POST with the token; returns status and body.
    fn post(&self, path: &str, body: Option<Value>, token: Option<&str>) -> (u16, Value) {
        let mut request = ureq::post(&self.url(path));
        if let Some(t) = token {
            request = request.set("Authorization", &format!("Bearer {t}"));
        }
        let answer = match body {
            Some(b) => request.send_json(b),
            None => request.call(),
        };
        match answer {
            Ok(r) => (r.status(), r.into_json().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap()),
            Err(e) => panic!("POST {path}: {e}"),
        }
    }

    fn control(&self, path: &str, body: Option<Value>) -> Value {
        let (code, value) = self.post(path, body, Some(&self.token()));
        assert!((200..300).contains(&code), "POST {path}: {code} {value}");
        value
    }

    fn status(&self) -> Value {
        self.get("/api/v1/status")
    }

    /// Waits until every subscriber has caught up with the log and no replay runs.
    fn settle(&self) {
        let ok = wait_until(TIMEOUT, || {
            self.status()["subscribers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["lag"] == 0 && s["replaying"] == false)
        });
        assert!(ok, "subscribers never caught up: {}", self.status());
    }

    fn start_admin(&mut self) {
        self.start();
        let up = wait_until(TIMEOUT, || ureq::get(&self.url("/healthz")).call().is_ok());
        assert!(up, "admin API never came up\n{}", self.log());
    }
}

/// Writes `name` in `dir` atomically (written beside, then renamed in), so the folder
/// source sees one complete file: one event.
fn write_file(dir: &Path, name: &str, content: &[u8]) {
    let scratch = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
    fs::write(scratch.path(), content).unwrap();
    scratch.persist(dir.join(name)).unwrap();
}

/// Every file below `dir` (temp files of the store excluded) with content and mtime.
fn tree(dir: &Path) -> BTreeMap<String, (Vec<u8>, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type().unwrap().is_file() && !name.starts_with(".converge-tmp-") {
            out.insert(
                name,
                (
                    fs::read(entry.path()).unwrap(),
                    entry.metadata().unwrap().modified().unwrap(),
                ),
            );
        }
    }
    out
}

fn promtool_check(metrics: &str) {
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics ---\n{metrics}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The example monitoring file `name`.
fn monitoring(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/monitoring")
        .join(name)
}

/// The metric families a PromQL expression names.
fn metrics_in(expr: &str, names: &mut BTreeSet<String>) {
    let mut rest = expr;
    while let Some(i) = rest.find("converge_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        // Histogram series: the family is named without the suffix.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_owned();
        names.insert(family);
    }
}

/// Metric names used by the Grafana dashboard's panel expressions and by the alerting
/// rules' expressions.
fn dashboard_metrics() -> BTreeSet<String> {
    let path = monitoring("grafana-dashboard.json");
    let dashboard: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    let mut names = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            metrics_in(target["expr"].as_str().unwrap(), &mut names);
        }
    }
    assert!(
        names.len() >= 8,
        "dashboard names too few metrics: {names:?}"
    );
    let alerts = fs::read_to_string(monitoring("alerts.yml")).unwrap();
    let exprs: Vec<&str> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .collect();
    assert_eq!(exprs.len(), 6, "the alerting rules' expressions");
    for expr in exprs {
        metrics_in(expr, &mut names);
    }
    names
}

/// Kills the Prometheus server at the end of the test, pass or fail.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn metrics_pass_promtool_feed_prometheus_and_the_dashboard() {
    const WRITES: u64 = 5;
    let mut a = Daemon::init("A");
    // A configured peer that never comes up: the per-peer metrics exist, at 0.
    let ghost = Daemon::init("B");
    a.add_peer(&ghost);
    a.start_admin();
    for i in 0..WRITES {
        write_file(
            a.folder.path(),
            &format!("file-{i}.txt"),
            format!("content {i}").as_bytes(),
        );
    }
    let me = a.id.clone();
    let written = wait_until(TIMEOUT, || a.status()["version_vector"][&me] == WRITES);
    assert!(written, "expected {WRITES} local events: {}", a.status());
    a.settle();

    let metrics = a.text("/metrics");
    promtool_check(&metrics);
    assert!(
        metrics.contains(&format!(
            "converge_log_events_total{{origin=\"local\"}} {WRITES}"
        )),
        "{metrics}"
    );
    let families: BTreeSet<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    for name in dashboard_metrics() {
        assert!(
            families.contains(name.as_str()),
            "the dashboard or the alerts use {name}, absent from /metrics:\n{metrics}"
        );
    }

    // A real Prometheus server scrapes the daemon every second.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("prometheus.yml");
    fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - '{}'\n\
             scrape_configs:\n  - job_name: converge\n    \
             static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            monitoring("alerts.yml").display(),
            a.admin_port
        ),
    )
    .unwrap();
    let log = fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _prometheus = Reaper(
        Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let query = format!(
        "http://127.0.0.1:{port}/api/v1/query?query=converge_log_events_total%7Borigin%3D%22local%22%7D"
    );
    let mut last = Value::Null;
    let scraped = wait_until(Duration::from_secs(120), || {
        let Ok(answer) = ureq::get(&query).call() else {
            return false;
        };
        last = answer.into_json().unwrap_or(Value::Null);
        last["data"]["result"][0]["value"][1].as_str() == Some(WRITES.to_string().as_str())
    });
    assert!(
        scraped,
        "Prometheus never returned converge_log_events_total{{origin=\"local\"}} = {WRITES}: {last}\n{}",
        fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );
    // The example alerting rules load and evaluate against the daemon's series: the peer
    // this replica is configured with never runs, so that alert matches (pending for its
    // first 15 minutes), and no other does.
    let rules = format!("http://127.0.0.1:{port}/api/v1/rules");
    let state = |rules: &Value, name: &str| -> String {
        rules
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["name"] == name)
            .map_or(String::new(), |r| {
                r["state"].as_str().unwrap_or_default().to_owned()
            })
    };
    let evaluated = wait_until(Duration::from_secs(60), || {
        let Ok(answer) = ureq::get(&rules).call() else {
            return false;
        };
        last = answer.into_json().unwrap_or(Value::Null);
        let rules = &last["data"]["groups"][0]["rules"];
        rules.as_array().map_or(0, Vec::len) == 6
            && rules
                .as_array()
                .into_iter()
                .flatten()
                .all(|r| r["health"] == "ok")
            && state(rules, "ConvergePeerDisconnected") == "pending"
    });
    assert!(
        evaluated,
        "the alerting rules did not load and evaluate: {last:#}"
    );
    let rules = last["data"]["groups"][0]["rules"].as_array().unwrap();
    for rule in rules {
        if rule["name"] != "ConvergePeerDisconnected" {
            assert_eq!(rule["state"], "inactive", "{last:#}");
        }
    }
    a.stop();
}

#[test]
fn replay_rebuild_pause_resume_and_auth() {
    let mut a = Daemon::init("A");
    let mut b = Daemon::init("B");
    let mirror = tempfile::tempdir().unwrap();
    a.add_peer(&b);
    b.add_peer(&a);
    a.append_config(&format!(
        "\n[[mirrors]]\nname = \"backup\"\npath = \"{}\"\n",
        mirror.path().display()
    ));
    a.start_admin();
    b.start_admin();
    write_file(a.folder.path(), "kept.txt", b"in the mirror");
    write_file(a.folder.path(), "other.txt", b"second");
    let synced = wait_until(TIMEOUT, || {
        mirror.path().join("kept.txt").exists() && b.folder.path().join("other.txt").exists()
    });
    assert!(synced, "mirror or peer never got the files: {}", a.status());
    a.settle();
    let connected = wait_until(TIMEOUT, || a.status()["peers"][0]["connected"] == true);
    assert!(connected, "{}", a.status());

    // 401 without and with a wrong token, on a mutating call.
    let (code, body) = a.post("/api/v1/sync/pause", None, None);
    assert_eq!((code, body["error"].as_str()), (401, Some("unauthorized")));
    let (code, _) = a.post("/api/v1/sync/pause", None, Some("wrong"));
    assert_eq!(code, 401);
    assert_eq!(a.status()["paused"], false);

    // A forced anti-entropy round with a connected peer.
    a.control(&format!("/api/v1/peers/{}/sync", b.id), None);

    // Replay of a mirror restores a file removed from it by hand.
    fs::remove_file(mirror.path().join("kept.txt")).unwrap();
    a.control(
        "/api/v1/subscribers/mirror-backup/replay",
        Some(json!({"from": 0})),
    );
    let restored = wait_until(TIMEOUT, || mirror.path().join("kept.txt").exists());
    assert!(
        restored,
        "replay did not restore the mirror: {}",
        a.status()
    );
    assert_eq!(
        fs::read(mirror.path().join("kept.txt")).unwrap(),
        b"in the mirror"
    );

    // Replay of the folder's own store changes nothing.
    a.settle();
    let before = tree(a.folder.path());
    let log_before = a.status()["log_length"].clone();
    a.control(
        "/api/v1/subscribers/folder/replay",
        Some(json!({"from": 0})),
    );
    a.settle();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        tree(a.folder.path()),
        before,
        "folder replay changed the folder"
    );
    assert_eq!(
        a.status()["log_length"],
        log_before,
        "folder replay wrote events"
    );

    // Rebuild gives the projection it replaced.
    let keys = |d: &Daemon| {
        (
            d.get("/api/v1/keys/kept.txt"),
            d.get("/api/v1/keys/other.txt"),
            d.get("/api/v1/conflicts"),
        )
    };
    let projection = keys(&a);
    let rebuilt = a.control("/api/v1/rebuild", None);
    assert_eq!(rebuilt["events"], log_before);
    assert_eq!(keys(&a), projection);

    // Pause: status shows it, nothing reaches the peer; resume catches up.
    assert_eq!(a.control("/api/v1/sync/pause", None)["paused"], true);
    assert_eq!(a.status()["paused"], true);
    let down = wait_until(TIMEOUT, || a.status()["peers"][0]["connected"] == false);
    assert!(down, "pause left the session up: {}", a.status());
    write_file(a.folder.path(), "while-paused.txt", b"later");
    let me = a.id.clone();
    assert!(wait_until(TIMEOUT, || a.status()["version_vector"][&me] == 3));
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !b.folder.path().join("while-paused.txt").exists(),
        "a file written while paused reached the peer"
    );
    assert_eq!(a.control("/api/v1/sync/resume", None)["paused"], false);
    let arrived = wait_until(TIMEOUT, || {
        b.folder.path().join("while-paused.txt").exists()
    });
    assert!(arrived, "resume did not catch the peer up: {}", a.status());

    // The CLI clients: tables by default, JSON on request, the token from a file.
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_converge"))
            .args(args)
            .output()
            .unwrap()
    };
    let admin = a.url("");
    let out = cli(&["status", "--admin", &admin]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&a.id) && text.contains("mirror-backup"),
        "{text}"
    );
    let out = cli(&["peers", "--admin", &admin, "--json"]);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["peers"][0]["id"], b.id);
    let out = cli(&["log", "--admin", &admin, "--limit", "2"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("kept.txt"));
    let out = cli(&["conflicts", "--admin", &admin]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no conflicted keys"));
    let out = cli(&["replay", "mirror-backup", "--admin", &admin]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    let token = a.data.path().join("admin.token");
    let out = cli(&[
        "replay",
        "mirror-backup",
        "--admin",
        &admin,
        "--token-file",
        token.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    a.stop();
    b.stop();
}

/// A client that sent half a request and went quiet does not hold up SIGTERM: the daemon
/// stops its admin API after a bounded wait, flushes and closes its engine, and exits 0
/// (regression: the admin API waited for that request for ever, and the engine was
/// stopped only after it, so it was never flushed).
#[test]
fn a_half_sent_admin_request_does_not_hold_up_shutdown() {
    let mut a = Daemon::init("A");
    a.start_admin();
    let mut client = std::net::TcpStream::connect(("127.0.0.1", a.admin_port)).unwrap();
    client
        .write_all(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // Let the server accept the connection and read what was sent.
    std::thread::sleep(Duration::from_millis(500));
    a.stop_within(Duration::from_secs(8));
    let log = a.log();
    assert!(log.contains("stopped cleanly"), "{}", a.log_tail());
    drop(client);
}
