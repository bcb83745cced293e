//! # example-source-jsonl
//!
//! A source loaded at run time from a `cdylib`: it tails a JSON-lines file and emits one
//! key `kv/<id>` per record, so converge syncs non-file, local-first data.
//!
//! Run it:
//!
//! ```text
//! cargo build --release -p example-source-jsonl
//! # in the config:
//! #   [[plugins]]
//! #   path = "target/release/libexample_source_jsonl.so"
//! #   config = "/home/me/data/kv.jsonl"      # or set CONVERGE_JSONL_PATH
//! echo '{"id": "greeting", "value": "hello"}' >> /home/me/data/kv.jsonl
//! ```
//!
//! Each line becomes one change; [`parse`] is what the source runs on every line:
//!
//! ```
//! use example_source_jsonl::{parse, Record};
//!
//! let record = parse(r#"{"id": "greeting", "value": "hello"}"#).unwrap();
//! let Record::Put { key, bytes, .. } = record else { panic!("a put") };
//! assert_eq!((key.as_str(), bytes.as_slice()), ("kv/greeting", &b"hello"[..]));
//! assert!(parse(r#"{"id": "../escape", "value": 1}"#).is_err(), "keys are validated");
//! ```
//!
//! Records: `{"id": "a", "value": <any JSON>}` puts `kv/a` (a string value is stored as its
//! UTF-8 text, anything else as its JSON text); `{"id": "a", "delete": true}` deletes it.
//! A number `id` is used as its decimal text. An optional `"at"` (milliseconds since the
//! Unix epoch) says when the change was made, for records written while converge was not
//! running: last-write-wins then orders it as of then. Malformed lines are logged and
//! skipped.
//!
//! The file is read from its start when the source starts (a restart re-emits every
//! record; converge dedupes nothing here, so each restart adds events — fine for an
//! example), then polled every 50 ms for appended lines.
#![deny(missing_docs)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use converge_api::abi::{EmitError, Emitted, Host, SourcePlugin, LOG_DEBUG, LOG_WARN};
use converge_api::{Key, Meta, Op};

/// Environment variable naming the file when the plugin's config string is empty.
pub const PATH_VAR: &str = "CONVERGE_JSONL_PATH";

const POLL: Duration = Duration::from_millis(50);

/// Tails one JSON-lines file on its own thread.
#[derive(Debug, Default)]
pub struct JsonlSource {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl JsonlSource {
    /// A source not yet started.
    pub fn new() -> Self {
        Self::default()
    }
}

impl SourcePlugin for JsonlSource {
    fn name(&self) -> &str {
        "jsonl"
    }

    fn start(&mut self, host: Host) -> Result<(), String> {
        let path = match host.config().trim() {
            "" => std::env::var(PATH_VAR).map_err(|_| {
                format!("no file to tail: give the path as the plugin's config or in {PATH_VAR}")
            })?,
            p => p.to_owned(),
        };
        let path = PathBuf::from(path);
        let stop = self.stop.clone();
        let thread = std::thread::Builder::new()
            .name("jsonl-source".into())
            .spawn(move || tail(&path, &host, &stop))
            .map_err(|e| format!("starting the tail thread: {e}"))?;
        self.thread = Some(thread);
        Ok(())
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

converge_api::export_plugin!(source: JsonlSource::new());

/// What one line asks for.
#[derive(Debug, PartialEq)]
pub enum Record {
    /// Put `bytes` at `key`.
    Put {
        /// `kv/<id>`.
        key: Key,
        /// The value's bytes.
        bytes: Vec<u8>,
        /// When it was made (`"at"`), if the line says.
        at_ms: Option<u64>,
    },
    /// Delete `key`.
    Delete {
        /// `kv/<id>`.
        key: Key,
        /// When it was made (`"at"`), if the line says.
        at_ms: Option<u64>,
    },
}

/// Parses one line.
pub fn parse(line: &str) -> Result<Record, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let id = match value.get("id") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => return Err("no string or number \"id\"".into()),
    };
    let key = Key::new(format!("kv/{id}")).map_err(|e| e.to_string())?;
    let at_ms = match value.get("at") {
        None => None,
        Some(at) => Some(at.as_u64().ok_or("\"at\" is not a time in milliseconds")?),
    };
    if value.get("delete").and_then(|d| d.as_bool()) == Some(true) {
        return Ok(Record::Delete { key, at_ms });
    }
    let bytes = match value.get("value") {
        Some(serde_json::Value::String(s)) => s.clone().into_bytes(),
        Some(v) => serde_json::to_vec(v).map_err(|e| e.to_string())?,
        None => return Err("no \"value\" (and not a delete)".into()),
    };
    Ok(Record::Put { key, bytes, at_ms })
}

fn tail(path: &std::path::Path, host: &Host, stop: &AtomicBool) {
    let mut offset = 0u64;
    let mut pending = Vec::new();
    let mut warned_missing = false;
    while !stop.load(Ordering::SeqCst) {
        match read_from(path, offset) {
            Ok(bytes) => {
                warned_missing = false;
                offset += bytes.len() as u64;
                pending.extend_from_slice(&bytes);
                // Only complete lines: a writer may be half-way through the last one.
                while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let line = String::from_utf8_lossy(&line);
                    if line.trim().is_empty() {
                        continue;
                    }
                    match parse(line.trim()) {
                        Ok(record) => {
                            if !emit(host, record, stop) {
                                return;
                            }
                        }
                        Err(e) => host.log(
                            LOG_WARN,
                            &format!("{}: skipping a line: {e}", path.display()),
                        ),
                    }
                }
            }
            Err(e) if !warned_missing => {
                warned_missing = true;
                host.log(LOG_WARN, &format!("reading {}: {e}", path.display()));
            }
            Err(_) => {}
        }
        std::thread::sleep(POLL);
    }
}

fn read_from(path: &std::path::Path, offset: u64) -> std::io::Result<Vec<u8>> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Emits one record, backing off while the host is busy. `false` when stopping.
fn emit(host: &Host, record: Record, stop: &AtomicBool) -> bool {
    let mut backoff = Duration::from_millis(1);
    loop {
        let change = match &record {
            Record::Put { key, bytes, at_ms } => Emitted {
                key: key.clone(),
                op: Op::Put {
                    content: None,
                    meta: Meta::file(
                        at_ms
                            .and_then(|t| i64::try_from(t).ok())
                            .unwrap_or_else(now_ms),
                    ),
                },
                bytes: Some(bytes.clone()),
                made_at_ms: *at_ms,
            },
            Record::Delete { key, at_ms } => Emitted {
                key: key.clone(),
                op: Op::Delete,
                bytes: None,
                made_at_ms: *at_ms,
            },
        };
        let result = host.emit_change(&change);
        match result {
            Ok(()) => return true,
            Err(EmitError::Busy) => {
                if stop.load(Ordering::SeqCst) {
                    return false;
                }
                host.log(LOG_DEBUG, "host busy; backing off");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
            Err(EmitError::Failed) => {
                host.log(LOG_WARN, "host refused a record; skipping it");
                return true;
            }
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn check(line: &str, expected: Result<Record, ()>) {
        assert_eq!(parse(line).map_err(|_| ()), expected, "{line}");
    }

    #[test]
    fn lines() {
        let key = |id: &str| Key::new(format!("kv/{id}")).unwrap();
        check(
            r#"{"id":"a","value":"hi"}"#,
            Ok(Record::Put {
                key: key("a"),
                bytes: b"hi".to_vec(),
                at_ms: None,
            }),
        );
        check(
            r#"{"id":7,"value":{"x":1}}"#,
            Ok(Record::Put {
                key: key("7"),
                bytes: br#"{"x":1}"#.to_vec(),
                at_ms: None,
            }),
        );
        check(
            r#"{"id":"a","delete":true}"#,
            Ok(Record::Delete {
                key: key("a"),
                at_ms: None,
            }),
        );
        check(
            r#"{"id":"a","delete":true,"at":1700000000000}"#,
            Ok(Record::Delete {
                key: key("a"),
                at_ms: Some(1_700_000_000_000),
            }),
        );
        check(r#"{"id":"a","value":1,"at":"yesterday"}"#, Err(()));
        check(r#"{"id":"../x","value":1}"#, Err(()));
        check(r#"{"value":1}"#, Err(()));
        check("not json", Err(()));
    }
}
