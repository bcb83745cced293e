//! `converge status|peers|log|replay|conflicts`: thin clients of a running replica's
//! admin API, printing tables (or the API's JSON with `--json`).

use std::fmt::Write as _;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::cli::{ClientArgs, Command};

/// Runs one client subcommand (see [`Command::is_client`]).
pub fn run(command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Status(args) => get(args, "/api/v1/status").map(|v| show(args, &v, status)),
        Command::Peers(args) => get(args, "/api/v1/status").map(|v| show(args, &v, peers)),
        Command::Conflicts(args) => {
            get(args, "/api/v1/conflicts").map(|v| show(args, &v, conflicts))
        }
        Command::Log(log) => get(
            &log.client,
            &format!("/api/v1/events?from={}&limit={}", log.from, log.limit),
        )
        .map(|v| show(&log.client, &v, events)),
        Command::Replay(replay) => call(
            &replay.client,
            "POST",
            &format!("/api/v1/subscribers/{}/replay", replay.subscriber),
            Some(serde_json::json!({ "from": replay.from })),
        )
        .map(|v| {
            show(&replay.client, &v, |v| {
                format!(
                    "replay of {} from offset {} started; watch its lag with `converge status`\n",
                    text(&v["subscriber"]),
                    v["from"]
                )
            })
        }),
        other => bail!("{other:?} is not an admin API client command"),
    }
}

fn show(args: &ClientArgs, value: &Value, table: impl Fn(&Value) -> String) {
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
        );
    } else {
        print!("{}", table(value));
    }
}

fn get(args: &ClientArgs, path: &str) -> anyhow::Result<Value> {
    call(args, "GET", path, None)
}

/// One call; an error answer becomes an error naming the API's `error` and `detail`.
fn call(args: &ClientArgs, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let url = format!("{}{path}", args.admin.trim_end_matches('/'));
    let mut request = ureq::request(method, &url).timeout(std::time::Duration::from_secs(30));
    if let Some(file) = &args.token_file {
        let token = std::fs::read_to_string(file)
            .with_context(|| format!("reading the admin token from {}", file.display()))?;
        request = request.set("Authorization", &format!("Bearer {}", token.trim()));
    }
    let answer = match body {
        Some(body) => request.send_json(body),
        None => request.call(),
    };
    match answer {
        Ok(response) => response
            .into_json()
            .with_context(|| format!("reading the answer of {method} {url}")),
        Err(ureq::Error::Status(code, response)) => {
            let body: Value = response.into_json().unwrap_or(Value::Null);
            let hint = if code == 401 && args.token_file.is_none() {
                " (pass --token-file DATA_DIR/admin.token)"
            } else {
                ""
            };
            bail!(
                "{method} {url}: {code} {}: {}{hint}",
                text(&body["error"]),
                text(&body["detail"])
            )
        }
        Err(err) => Err(err).with_context(|| {
            format!("calling {url} (is `converge run` up with an [admin] section?)")
        }),
    }
}

/// A JSON value as plain text: strings unquoted, null as `-`.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn status(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "replica      {}", text(&v["replica"]));
    let _ = writeln!(out, "log length   {} events", v["log_length"]);
    let _ = writeln!(
        out,
        "sync         {}",
        if v["paused"] == true {
            "PAUSED"
        } else {
            "running"
        }
    );
    let _ = writeln!(out, "policy       {}", text(&v["policy"]));
    let _ = writeln!(out, "pending      {} events", v["pending_events"]);
    if let Some(error) = v["applier_error"].as_str() {
        let _ = writeln!(out, "APPEND FAILING (retried): {error}");
    }
    let _ = writeln!(
        out,
        "conflicts    {} (handed to stores since start)",
        v["conflicts"]
    );
    if let Some(vv) = v["version_vector"].as_object() {
        let _ = writeln!(out, "version vector:");
        for (origin, seq) in vv {
            let _ = writeln!(out, "  {origin}  {seq}");
        }
    }
    let _ = writeln!(out, "subscribers:");
    out.push_str(&table(
        &["NAME", "CURSOR", "LAG", "APPLIED", "REPLAYING", "FAILED"],
        items(&v["subscribers"]),
        |s| {
            vec![
                text(&s["name"]),
                text(&s["cursor"]),
                text(&s["lag"]),
                text(&s["applied"]),
                text(&s["replaying"]),
                text(&s["failed_keys"]),
            ]
        },
    ));
    for s in items(&v["subscribers"]) {
        if let Some(error) = s["error"].as_str() {
            let _ = writeln!(out, "  {} is held back: {error}", text(&s["name"]));
        }
    }
    let _ = writeln!(out, "sources:");
    for s in items(&v["sources"]) {
        let state = if s["up"].as_bool() == Some(false) {
            "DOWN"
        } else {
            "up"
        };
        let _ = writeln!(
            out,
            "  {}  {state}  (failures since start: {})",
            text(&s["name"]),
            text(&s["failures"])
        );
        if let Some(error) = s["error"].as_str() {
            let _ = writeln!(out, "    {error}");
        }
    }
    let _ = writeln!(out, "peers:");
    out.push_str(&peers(v));
    let plugins: Vec<String> = items(&v["plugins"])
        .iter()
        .map(|p| format!("{} ({})", text(&p["name"]), text(&p["role"])))
        .collect();
    let _ = writeln!(out, "plugins      {}", plugins.join(", "));
    out
}

/// The elements of the JSON array `v`; none if it is not an array.
fn items(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn peers(v: &Value) -> String {
    let list = items(&v["peers"]);
    let mut out = table(
        &[
            "PEER",
            "ADDRESS",
            "CONNECTED",
            "THEY LACK",
            "WE LACK",
            "SENT",
            "RECEIVED",
            "FAILED",
        ],
        list,
        |p| {
            vec![
                text(&p["id"]),
                text(&p["address"]),
                text(&p["connected"]),
                text(&p["missing_on_peer"]),
                text(&p["missing_here"]),
                bytes(&p["sent_bytes"]),
                bytes(&p["received_bytes"]),
                text(&p["failed_sessions"]),
            ]
        },
    );
    for p in list {
        if let Some(error) = p["last_error"].as_str() {
            let _ = writeln!(out, "  {}: last session failed: {error}", text(&p["id"]));
        }
    }
    out
}

fn events(v: &Value) -> String {
    let mut out = table(
        &["OFFSET", "ID", "OP", "KEY", "SIZE", "PARENTS"],
        items(&v["events"]),
        |e| {
            vec![
                text(&e["offset"]),
                text(&e["id"]),
                match e["op"]["kind"].as_str() {
                    Some(kind) => format!("{} {kind}", text(&e["op"]["op"])),
                    None => text(&e["op"]["op"]),
                },
                text(&e["key"]),
                text(&e["op"]["size"]),
                e["parents"].as_array().map_or(0, Vec::len).to_string(),
            ]
        },
    );
    let _ = writeln!(
        out,
        "log length {}; next page: --from {}",
        v["log_length"], v["next"]
    );
    out
}

fn conflicts(v: &Value) -> String {
    let list = items(&v["conflicts"]);
    if list.is_empty() {
        return "no conflicted keys\n".into();
    }
    let mut out = table(&["KEY", "HEADS", "SHOWN (POLICY'S PICK)"], list, |c| {
        vec![
            text(&c["key"]),
            c["heads"].as_array().map_or(0, Vec::len).to_string(),
            text(&c["winner"]),
        ]
    });
    let _ = writeln!(
        out,
        "{} conflicted keys{}, resolved by {}",
        v["count"],
        if v["truncated"] == true {
            " (first 1000)"
        } else {
            ""
        },
        text(&v["policy"])
    );
    out
}

fn bytes(v: &Value) -> String {
    let n = v.as_u64().unwrap_or(0);
    match n {
        0..=1023 => format!("{n} B"),
        1024..=1_048_575 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / 1_048_576.0),
    }
}

/// Left-aligned columns, two spaces apart.
fn table(headers: &[&str], rows: &[Value], cells: impl Fn(&Value) -> Vec<String>) -> String {
    let rows: Vec<Vec<String>> = rows.iter().map(cells).collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "  {}", padded.join("  ").trim_end());
    };
    line(&mut out, headers.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(&mut out, row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let rows = [serde_json::json!({"a": "x", "b": 12345})];
        let out = table(&["A", "BEE"], &rows, |r| vec![text(&r["a"]), text(&r["b"])]);
        assert_eq!(out, "  A  BEE\n  x  12345\n");
    }
}
