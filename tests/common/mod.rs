//! The harness shared by the end-to-end tests: real `converge` daemons as child
//! processes over temporary folders, on 127.0.0.1 with ephemeral ports.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A port on 127.0.0.1 that was free a moment ago, never the same twice in a process, and
/// below the kernel's ephemeral range (32768-60999 on Linux). A port from that range can be
/// taken as the local end of some connection (a peer dialing) while its daemon is killed
/// and restarted, which then cannot listen on it again.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const LAST: u16 = 32_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Test binaries run one after another; the offset keeps one's ports apart from those of
    // daemons the previous one may still be stopping.
    let _ = NEXT.compare_exchange(
        0,
        FIRST + (std::process::id() % 1000) as u16 * 10,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + n.wrapping_sub(FIRST) % (LAST - FIRST);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Polls `cond` every 50 ms until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One replica: its data dir and folder (separate temp dirs), its ports, and the running
/// `converge run` process, if any.
pub struct Daemon {
    /// A label for messages.
    pub name: &'static str,
    /// The data dir (config, database, log).
    pub data: TempDir,
    /// The synced folder.
    pub folder: TempDir,
    /// The transport port.
    pub port: u16,
    /// The admin API port.
    pub admin_port: u16,
    /// The replica ID.
    pub id: String,
    /// The running `converge run`, if started.
    pub child: Option<Child>,
}

impl Daemon {
    /// `converge init` of a new replica (not started).
    pub fn init(name: &'static str) -> Daemon {
        let data = tempfile::Builder::new()
            .prefix(&format!("converge-data-{name}-"))
            .tempdir()
            .unwrap();
        let folder = tempfile::Builder::new()
            .prefix(&format!("converge-folder-{name}-"))
            .tempdir()
            .unwrap();
        let port = free_port();
        let admin = free_port();
        let out = Command::new(env!("CARGO_BIN_EXE_converge"))
            .arg("init")
            .arg("--data-dir")
            .arg(data.path())
            .arg("--folder")
            .arg(folder.path())
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--admin")
            .arg(format!("127.0.0.1:{admin}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "converge init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        assert!(!id.is_empty(), "converge init printed no replica ID");
        let daemon = Daemon {
            name,
            data,
            folder,
            port,
            admin_port: admin,
            id,
            child: None,
        };
        // `converge id` prints the same ID.
        let out = Command::new(env!("CARGO_BIN_EXE_converge"))
            .arg("id")
            .arg("--config")
            .arg(daemon.config())
            .output()
            .unwrap();
        assert!(out.status.success(), "converge id failed");
        assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), daemon.id);
        daemon
    }

    /// `GET` of the admin API (reads need no token with the default `auth`), as JSON.
    pub fn admin_get(&self, path: &str) -> serde_json::Value {
        let url = format!("http://127.0.0.1:{}{path}", self.admin_port);
        ureq::get(&url).call().unwrap().into_json().unwrap()
    }

    /// `GET` of the admin API, as text (`/metrics`).
    pub fn admin_get_text(&self, path: &str) -> String {
        let url = format!("http://127.0.0.1:{}{path}", self.admin_port);
        ureq::get(&url).call().unwrap().into_string().unwrap()
    }

    pub fn config(&self) -> PathBuf {
        self.data.path().join("converge.toml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.data.path().join("daemon.log")
    }

    pub fn folder(&self) -> &Path {
        self.folder.path()
    }

    /// Appends `text` to the config file.
    pub fn append_config(&self, text: &str) {
        let mut file = OpenOptions::new().append(true).open(self.config()).unwrap();
        file.write_all(text.as_bytes()).unwrap();
    }

    /// Appends `other` to this replica's `[[peers]]`.
    pub fn add_peer(&self, other: &Daemon) {
        self.append_config(&format!(
            "\n[[peers]]\nid = \"{}\"\naddress = \"127.0.0.1:{}\"\n",
            other.id, other.port
        ));
    }

    /// Spawns `converge run`, standard error appended to `daemon.log` in the data dir.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_converge"))
            .arg("run")
            .arg("--config")
            .arg(self.config())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("not running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, then waits for the process and asserts it exited with status 0.
    pub fn stop(&mut self) {
        self.stop_within(Duration::from_secs(60));
    }

    /// SIGTERM, then waits up to `timeout` for the process and asserts it exited with
    /// status 0.
    pub fn stop_within(&mut self, timeout: Duration) {
        let child = self.child.as_ref().expect("not running");
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        // SAFETY: `pid` is our own child, which has not been waited for yet.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
        let status = self.wait_exit(timeout);
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM\n{}",
            self.name,
            self.log_tail()
        );
    }

    /// Waits up to `timeout` for the process to exit and returns its status; kills it and
    /// fails when it is still running then.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("not running");
        let mut status = None;
        let exited = wait_until(timeout, || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        if !exited {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!(
                "{} did not exit within {timeout:?}\n{}",
                self.name,
                self.log_tail()
            );
        }
        status.unwrap()
    }

    /// Asserts the daemon is still running (it did not exit on an error).
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("not started");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{} exited with {status}\n{}", self.name, self.log_tail());
        }
    }

    pub fn log(&self) -> String {
        fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The log's warnings and errors (each distinct one once, with its count, the first
    /// ones first) and its last lines, for failure messages: a cause logged early (a full
    /// disk, say) is otherwise lost behind the reconnections it brings.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let mut problems: Vec<(&str, usize)> = Vec::new();
        for line in &lines {
            // `<timestamp>  WARN <target>: <message>`: the same message at another time
            // is the same problem.
            let Some(at) = line.find(" WARN ").or_else(|| line.find(" ERROR ")) else {
                continue;
            };
            let what = line[at..].trim_start();
            match problems.iter_mut().find(|(seen, _)| *seen == what) {
                Some((_, n)) => *n += 1,
                None => problems.push((what, 1)),
            }
        }
        let shown = problems.len().min(20);
        let mut digest: Vec<String> = problems[..shown]
            .iter()
            .map(|(what, n)| format!("{n:>5}x {what}"))
            .collect();
        if problems.len() > shown {
            digest.push(format!("(and {} more)", problems.len() - shown));
        }
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!(
            "--- {name}'s warnings and errors ---\n{}\n--- last lines of {name}'s log ---\n{tail}",
            digest.join("\n"),
            name = self.name,
        )
    }

    /// What `df` says of the file system of the data dir (the tests' temporary folders):
    /// a disk that filled up is a failure's cause the logs name only in passing.
    pub fn disk_space(&self) -> String {
        Command::new("df")
            .arg("-h")
            .arg(self.data.path())
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_else(|e| format!("df: {e}"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A test that gave up on a running daemon: where is each of its threads?
            if std::thread::panicking() && matches!(child.try_wait(), Ok(None)) {
                eprintln!(
                    "--- {}'s threads ---\n{}",
                    self.name,
                    thread_dump(child.id())
                );
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
            eprintln!(
                "--- disk space of {}'s data dir ---\n{}",
                self.name,
                self.disk_space()
            );
        }
    }
}

/// The stack of every thread of process `pid`: from gdb when it is installed (CI installs
/// it), else each thread's name, state and kernel wait channel from `/proc`.
pub fn thread_dump(pid: u32) -> String {
    let gdb = Command::new("timeout")
        .args([
            "-k",
            "5",
            "30",
            "gdb",
            "-p",
            &pid.to_string(),
            "-batch",
            "-nx",
        ])
        .args(["-ex", "set pagination off", "-ex", "thread apply all bt 40"])
        .stdin(Stdio::null())
        .output();
    let mut lines = Vec::new();
    if let Ok(out) = gdb {
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && text.contains("Thread ") {
            return text.into_owned();
        }
        // Not installed, or not allowed to attach (ptrace restricted): say why.
        let why = String::from_utf8_lossy(&out.stderr);
        lines.push(format!("(no stacks from gdb: {})", why.trim()));
    }
    let tasks = fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    for task in tasks.flatten() {
        let path = task.path();
        let read = |name: &str| fs::read_to_string(path.join(name)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next();
        lines.push(format!(
            "{} {} state {} wchan {}\n{}",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            state.unwrap_or("?"),
            read("wchan"),
            read("stack")
        ));
    }
    lines.join("\n")
}

/// Two replicas that list each other as peers (not started).
pub fn pair() -> (Daemon, Daemon) {
    let a = Daemon::init("A");
    let b = Daemon::init("B");
    a.add_peer(&b);
    b.add_peer(&a);
    (a, b)
}
