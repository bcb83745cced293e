//! Plugins loaded from `cdylib`s: the example policy decides conflicts between two
//! replicas, the example source feeds the other replica, and bad libraries are refused
//! with errors naming the file. The test builds the example cdylibs itself (same profile).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use converge_api::abi::{self, PluginDeclaration, PluginKind};
use converge_api::{ConflictPolicy, ContentRef, Key, Meta, Op};
use converge_framework::log::{EventLog, LocalChange, LogConfig};
use converge_framework::plugin::dylib::{
    self, check_declaration, CallError, DylibError, PluginRegistry, PluginRole,
};
use converge_framework::{EngineConfig, PeerConfig, SyncEngine};
use converge_transport_memory::{Faults, MemoryNetwork};

#[path = "support/example_plugins.rs"]
mod example_plugins;
#[path = "support/heads.rs"]
mod heads;
use heads::head;

fn lib(name: &str) -> PathBuf {
    example_plugins::example_plugin(name)
}

fn keep_larger_path() -> PathBuf {
    lib("example_policy_keep_larger")
}

fn jsonl_path() -> PathBuf {
    lib("example_source_jsonl")
}

fn policy() -> Arc<dylib::DylibPolicy> {
    match dylib::load(keep_larger_path()).unwrap().role {
        PluginRole::Policy(p) => p,
        PluginRole::Source(_) => panic!("keep-larger loaded as a source"),
    }
}

fn test_config(peers: Vec<PeerConfig>) -> EngineConfig {
    EngineConfig {
        peers,
        keepalive_interval: Duration::from_secs(5),
        keepalive_timeout: Duration::from_secs(3600),
        handshake_timeout: Duration::from_secs(2),
        tick_interval: Duration::from_millis(100),
        dial_backoff: (Duration::from_millis(20), Duration::from_millis(200)),
        chunk_timeout: Duration::from_secs(1),
        ..EngineConfig::default()
    }
}

/// Two replicas over the memory network, each with its policy and optional source.
async fn two_replicas(
    network: &MemoryNetwork,
    policy: Arc<dyn ConflictPolicy>,
    source_on_a: Option<Arc<dyn converge_framework::plugin::Source>>,
) -> (Vec<EventLog>, Vec<SyncEngine>) {
    let logs: Vec<EventLog> = (0..2)
        .map(|_| EventLog::open(LogConfig::temporary()).unwrap())
        .collect();
    let address = |i: usize| format!("replica-{i}");
    let mut engines = Vec::new();
    for (i, log) in logs.iter().enumerate() {
        let other = 1 - i;
        let peers = vec![PeerConfig {
            id: logs[other].replica(),
            address: Some(address(other)),
        }];
        let mut builder = SyncEngine::builder(log.clone(), policy.clone())
            .config(test_config(peers))
            .transport(Arc::new(network.endpoint(&address(i))));
        if i == 0 {
            if let Some(source) = &source_on_a {
                builder = builder.source(source.clone());
            }
        }
        engines.push(builder.start().await.unwrap());
    }
    (logs, engines)
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn file_of(log: &EventLog, bytes: &[u8], mtime: i64) -> Op {
    let root = log.chunks().put(bytes).unwrap();
    Op::Put {
        content: Some(ContentRef {
            root,
            size: bytes.len() as u64,
            depth: 0,
        }),
        meta: Meta::file(mtime),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dylib_policy_decides_conflicts_the_same_on_both_replicas() {
    let policy: Arc<dyn ConflictPolicy> = policy();
    assert_eq!(policy.name(), "keep-larger");
    let network = MemoryNetwork::new(7, Faults::none());
    let (logs, engines) = two_replicas(&network, policy, None).await;
    network.partition("replica-0", "replica-1");

    // The larger write is made first, so last-write-wins would pick the other one.
    let key = Key::new("doc.txt").unwrap();
    let large = b"a much larger body of text".to_vec();
    let small = b"small".to_vec();
    let op = file_of(&logs[0], &large, 1);
    let large_id = logs[0]
        .append_local(vec![LocalChange::new(key.clone(), op)])
        .await
        .unwrap()[0]
        .id;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let op = file_of(&logs[1], &small, 2);
    let small_event = logs[1]
        .append_local(vec![LocalChange::new(key.clone(), op)])
        .await
        .unwrap()
        .remove(0);
    assert!(small_event.hlc > logs[0].heads(&key).unwrap()[0].hlc);

    network.heal_all();
    eventually("both replicas hold both writes", || {
        logs.iter().all(|l| l.heads(&key).unwrap().len() == 2)
    })
    .await;
    for (log, engine) in logs.iter().zip(&engines) {
        let view = engine.reconciler().view(&key, &log.state(&key).unwrap());
        assert!(view.conflicted);
        assert_eq!(
            view.winner.map(|w| w.id),
            Some(large_id),
            "the larger write wins"
        );
    }
    for engine in &engines {
        engine.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dylib_source_records_reach_the_other_replica() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kv.jsonl");
    // A record made an hour ago, while nothing ran: stamped as of then.
    let an_hour_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        - 3_600_000;
    std::fs::write(
        &data,
        format!(
            "{{\"id\": \"early\", \"value\": \"e\", \"at\": {an_hour_ago}}}\n\
             {{\"id\": \"first\", \"value\": \"one\"}}\n"
        ),
    )
    .unwrap();
    let registry = PluginRegistry::load_all([jsonl_path()]);
    assert!(registry.failures().is_empty(), "{:?}", registry.failures());
    let plugin = registry.get("jsonl").unwrap();
    assert_eq!(plugin.kind(), PluginKind::Source);
    let source = plugin.source(data.to_str().unwrap()).unwrap();

    let network = MemoryNetwork::new(11, Faults::none());
    let (logs, engines) =
        two_replicas(&network, Arc::new(converge_policies::Lww), Some(source)).await;

    // Appended after start: the tail picks it up.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&data)
        .unwrap();
    writeln!(file, "{{\"id\": 2, \"value\": {{\"n\": 2}}}}").unwrap();
    writeln!(file, "not json at all").unwrap();
    writeln!(file, "{{\"id\": \"first\", \"delete\": true}}").unwrap();
    file.flush().unwrap();

    let other = &logs[1];
    let content_of = |key: &str| -> Option<Vec<u8>> {
        let heads = other.heads(&Key::new(key).unwrap()).unwrap();
        let content = heads.first()?.op.content().copied()?;
        other.chunks().get(&content.root).unwrap()
    };
    eventually("kv/2 on the other replica with its bytes", || {
        content_of("kv/2").as_deref() == Some(br#"{"n":2}"#.as_slice())
    })
    .await;
    eventually("kv/first deleted on the other replica", || {
        let heads = other.heads(&Key::new("kv/first").unwrap()).unwrap();
        heads.len() == 1 && heads[0].op == Op::Delete
    })
    .await;
    // The first put (from before the start) reached it too: the delete's parent.
    assert_eq!(other.len(), 4);
    let early = other.heads(&Key::new("kv/early").unwrap()).unwrap();
    assert_eq!(
        early[0].hlc.wall_ms, an_hour_ago,
        "stamped when it was made"
    );
    for engine in &engines {
        engine.shutdown().await.unwrap();
    }
}

fn check_refused(path: &Path, expected: impl Fn(&DylibError) -> bool, words: &[&str]) {
    let err = dylib::load(path).unwrap_err();
    assert!(expected(&err), "unexpected error: {err:?}");
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    for w in words {
        assert!(text.contains(w), "{text:?} lacks {w:?}");
    }
}

#[test]
fn refusals_name_the_file_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("libgarbage.so");
    std::fs::write(&garbage, b"this is not an ELF file").unwrap();
    check_refused(
        &garbage,
        |e| matches!(e, DylibError::Open { .. }),
        &["cannot load"],
    );
    check_refused(
        &dir.path().join("libmissing.so"),
        |e| matches!(e, DylibError::Open { .. }),
        &["cannot load"],
    );
    // A real library without the declaration symbol.
    check_refused(
        Path::new("libc.so.6"),
        |e| matches!(e, DylibError::MissingSymbol { .. }),
        &["converge_plugin_declaration"],
    );

    // The same library twice through the registry: the second is refused, naming both.
    let path = keep_larger_path();
    let registry = PluginRegistry::load_all([&path, &path]);
    assert_eq!(registry.plugins().len(), 1);
    assert_eq!(registry.failures().len(), 1);
    let dup = registry.failures()[0].error.to_string();
    assert!(
        matches!(
            registry.failures()[0].error,
            DylibError::DuplicateName { .. }
        ),
        "{dup}"
    );
    assert_eq!(dup.matches(&path.display().to_string()).count(), 2, "{dup}");
    assert!(registry.require_policy("keep-larger").is_ok());
    let missing = registry
        .require_policy("no-such")
        .err()
        .unwrap()
        .to_string();
    assert!(
        missing.contains("no-such") && missing.contains("already taken"),
        "{missing}"
    );
}

fn declaration(magic: u64, abi_version: u32, kind: u32) -> PluginDeclaration {
    PluginDeclaration {
        magic,
        abi_version,
        kind,
        name: abi::StrRef::new("x"),
        version: abi::StrRef::new("0"),
        free_buffer: Some(abi::free_buffer),
        policy: abi::PolicyFns { resolve: None },
        source: abi::SourceFns {
            start: None,
            stop: None,
        },
    }
}

#[test]
fn header_checks_refuse_wrong_magic_future_abi_and_unknown_kinds() {
    let path = Path::new("/plugins/libx.so");
    let check = |decl: PluginDeclaration| check_declaration(path, &decl);
    assert_eq!(
        check(declaration(abi::MAGIC, abi::ABI_VERSION, 1)).unwrap(),
        PluginKind::Policy
    );
    assert_eq!(
        check(declaration(abi::MAGIC, abi::ABI_VERSION, 2)).unwrap(),
        PluginKind::Source
    );

    let err = check(declaration(0xdead_beef, abi::ABI_VERSION, 1)).unwrap_err();
    assert!(
        matches!(
            err,
            DylibError::BadMagic {
                found: 0xdead_beef,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("/plugins/libx.so") && err.to_string().contains("magic"));

    let err = check(declaration(abi::MAGIC, abi::ABI_VERSION + 1, 1)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "plugin /plugins/libx.so: built for plugin ABI {}, this converge speaks {}; rebuild it against a matching converge-api",
            abi::ABI_VERSION + 1,
            abi::ABI_VERSION
        )
    );
    for kind in [3, 0, 99] {
        let err = check(declaration(abi::MAGIC, abi::ABI_VERSION, kind)).unwrap_err();
        assert!(matches!(err, DylibError::UnsupportedKind { .. }), "{err}");
    }
}

#[test]
fn a_panicking_call_is_an_error_and_the_next_call_works() {
    let policy = policy();
    let heads = [head(1, 100, 50), head(2, 200, 10)];
    let panic_key = Key::new("__panic__").unwrap();

    let err = policy.try_resolve(&panic_key, &heads).unwrap_err();
    assert!(
        matches!(&err, CallError::Panicked { message, .. } if message.contains("asked to panic")),
        "{err}"
    );
    // Through the engine's trait: last-write-wins instead (origin 2 has the later clock).
    let before = policy.fallbacks();
    assert_eq!(policy.resolve(&panic_key, &heads).winner, heads[1].id);
    assert_eq!(policy.fallbacks(), before + 1);
    // The plugin keeps serving: the larger head wins again.
    let key = Key::new("fine").unwrap();
    assert_eq!(policy.resolve(&key, &heads).winner, heads[0].id);
    assert_eq!(
        policy.try_resolve(&key, &heads).unwrap().winner,
        heads[0].id
    );
}
