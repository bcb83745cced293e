//! End-to-end tests of plugins loaded from libraries by real daemons (issue 5): the
//! example JSON-lines source feeds records into the peer's folder; the example keep-larger
//! policy decides conflicts on both replicas and a panic inside it leaves the daemons
//! serving; a folder whose policy library cannot be loaded stops the daemon at start, any
//! other bad library is reported and skipped.
//!
//! The test builds the example cdylibs itself (same profile, same target directory), so
//! it passes on a clean clone.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{wait_until, Daemon};

const TIMEOUT: Duration = Duration::from_secs(60);

#[path = "../framework/engine/tests/support/example_plugins.rs"]
mod example_plugins;
use example_plugins::example_plugin as plugin;

/// Rewrites the daemon's config: `policy` as the folder's conflict policy, and the
/// libraries (with their opaque config strings) as `[[plugins]]`.
fn configure(d: &Daemon, policy: &str, plugins: &[(&Path, &str)]) {
    let path = d.config();
    let text = fs::read_to_string(&path).unwrap();
    let mut text = text.replace(
        "conflict_policy = \"lww\"",
        &format!("conflict_policy = \"{policy}\""),
    );
    for (lib, config) in plugins {
        text.push_str(&format!(
            "\n[[plugins]]\npath = {:?}\nconfig = {:?}\n",
            lib.display().to_string(),
            config
        ));
    }
    fs::write(path, text).unwrap();
}

fn read(path: &Path) -> Option<Vec<u8>> {
    fs::read(path).ok()
}

#[test]
fn jsonl_source_plugin_feeds_the_peers_folder() {
    let (mut a, mut b) = common::pair();
    let jsonl = a.data.path().join("kv.jsonl");
    fs::write(&jsonl, "").unwrap();
    configure(
        &a,
        "lww",
        &[(&plugin("example_source_jsonl"), jsonl.to_str().unwrap())],
    );
    a.start();
    b.start();
    let mut file = fs::OpenOptions::new().append(true).open(&jsonl).unwrap();
    writeln!(file, r#"{{"id": "greeting", "value": "hello"}}"#).unwrap();
    writeln!(file, r#"{{"id": 7, "value": {{"x": 1}}}}"#).unwrap();
    drop(file);
    let greeting = b.folder().join("kv/greeting");
    let seven = b.folder().join("kv/7");
    let arrived = wait_until(TIMEOUT, || {
        read(&greeting).as_deref() == Some(b"hello")
            && read(&seven).as_deref() == Some(br#"{"x":1}"#)
    });
    assert!(
        arrived,
        "records did not reach B's folder: {:?} {:?}",
        read(&greeting),
        read(&seven)
    );
    a.assert_running();
    a.stop();
    b.stop();
}

#[test]
fn keep_larger_policy_from_a_library_decides_conflicts_and_survives_a_panic() {
    let (mut a, mut b) = common::pair();
    let lib = plugin("example_policy_keep_larger");
    for d in [&a, &b] {
        configure(d, "keep-larger", &[(&lib, "")]);
    }
    // Concurrent writes made while both are stopped; keep-larger must choose B's larger
    // content whichever write last-write-wins would have chosen.
    fs::write(
        b.folder().join("f.txt"),
        b"the larger content, written first",
    )
    .unwrap();
    fs::write(b.folder().join("__panic__"), b"b").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    fs::write(a.folder().join("f.txt"), b"small").unwrap();
    fs::write(a.folder().join("__panic__"), b"a, later").unwrap();
    a.start();
    b.start();
    let decided = wait_until(TIMEOUT, || {
        let (fa, fb) = (
            read(&a.folder().join("f.txt")),
            read(&b.folder().join("f.txt")),
        );
        fa.as_deref() == Some(&b"the larger content, written first"[..]) && fa == fb
    });
    assert!(decided, "keep-larger did not decide f.txt on both replicas");
    // The policy panics on `__panic__`: the host falls back to last-write-wins on both
    // replicas (which write is later depends on when each start-up scan stamped it, so
    // either may win); both agree, and both daemons keep serving.
    let fell_back = wait_until(TIMEOUT, || {
        let (pa, pb) = (
            read(&a.folder().join("__panic__")),
            read(&b.folder().join("__panic__")),
        );
        matches!(pa.as_deref(), Some(b"a, later") | Some(b"b")) && pa == pb
    });
    assert!(
        fell_back,
        "the panicking resolve did not fall back to last-write-wins on both: A {:?}, B {:?}",
        read(&a.folder().join("__panic__")).map(String::from_utf8),
        read(&b.folder().join("__panic__")).map(String::from_utf8),
    );
    a.assert_running();
    b.assert_running();
    fs::write(a.folder().join("after.txt"), b"still serving").unwrap();
    assert!(wait_until(TIMEOUT, || read(&b.folder().join("after.txt"))
        .as_deref()
        == Some(b"still serving")));
    a.stop();
    b.stop();
}

#[test]
fn a_policy_library_that_fails_to_load_stops_the_daemon_any_other_is_skipped() {
    let mut d = Daemon::init("A");
    let bad = d.data.path().join("libbad.so");
    fs::write(&bad, b"not a shared library").unwrap();
    let original = fs::read_to_string(d.config()).unwrap();

    // The folder's policy names the bad library's plugin: refuse to start, naming the file.
    configure(&d, "keep-larger", &[(&bad, "")]);
    let out = Command::new(env!("CARGO_BIN_EXE_converge"))
        .arg("run")
        .arg("--config")
        .arg(d.config())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the daemon started without its policy"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("libbad.so"),
        "the error names the file: {stderr}"
    );
    assert!(
        stderr.contains("keep-larger"),
        "the error names the policy: {stderr}"
    );

    // The same bad library, not needed by the folder: reported, skipped, the daemon runs.
    fs::write(d.config(), original).unwrap();
    configure(&d, "lww", &[(&bad, "")]);
    d.start();
    assert!(
        wait_until(TIMEOUT, || d.log().contains("plugin refused")),
        "the refusal is logged"
    );
    d.assert_running();
    d.stop();
}
