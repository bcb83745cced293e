#!/usr/bin/env python3
"""Daemon benchmark of converge against rsync (issue 3, "Benchmark").

Two converge daemons on 127.0.0.1 sync a folder; the same run pushes the same data with
rsync (Debian's package, as a daemon on 127.0.0.1, delta transfer on) as the reference.

Workloads:
  W1  10,000 files of 1-8 KiB random content in two levels of folders (initial sync)
  W2  one 256 MiB file of random data (initial sync)
  W3  W2 with one byte changed in the middle
  W4  W2 with 100 bytes inserted at one third
  L   one small file written on A, 100 times: latency until it is on B (p50, p99)

W1-W4 time both tools the same way: from the change (for converge the rename of a staged
tree or file into A's folder, or the in-place write; for rsync the start of `rsync -a
--stats` pushing A's data to the rsync daemon's module) until the copy last changed, read
from the copy's own ctimes once a poll has found it identical (file count, sorted (path,
size) list, then every file's bytes by hash). On Linux's usual file systems making,
linking or renaming an entry sets its ctime and its directory's, so the latest ctime in
the copy is no earlier than when it became identical, less the kernel's clock
granularity (a jiffy), rather than up to a poll's interval after; a tool that touches the
copy afterwards (rsync setting directory times at the end) is timed until then. So W1
polls only twice a second: each poll lists the 10,000 files, CPU the two daemons would
otherwise have on two cores, where rsync's time has no poll beside it. The admin API's
latency under load (issue 4) is measured on a W1 sync of its own, not timed, for the
same reason. The poll's own times (converge) and rsync's wall time (rsync exits a little
after its last write) are printed with the samples. L times converge by a poll every millisecond and
rsync by its wall time. rsync's bytes are "Total bytes sent" + "Total
bytes received". converge's bytes come from its own counters (the
admin API's GET /api/v1/status, peers[].sent_bytes + received_bytes, as seen by A); when
that API does not answer they are "n/a". The socket-level count (TCP payload bytes of A's
peer connections, from `ss -ti`) is printed beside them as a cross-check.

Each workload's CPU time is printed beside it: user + system seconds from /proc, of both
converge daemons from the change until the poll found the copy identical, and of rsync's
client and the rsync daemon's process for the push. On two cores the time of a sync that
keeps both busy cannot be much less than half its CPU time.

rsync is also timed with `--fsync`, right after the plain push and into a copy of its own:
plain rsync leaves its copy in the page cache (its 256 MiB reach the disk only after it
exits), where converge makes the content durable in its content store before the event
that names it is logged, and so before its folder store shows the file (DESIGN §3); the
folder store's own `syncfs` of the files it wrote follows once they are shown, and is not
timed. `rsync --fsync` syncs every file before it renames it into place, so it does more
of that work inside its time than converge does: the second ratio bounds how much of the
gap the durability of converge's content accounts for, from below, and is not a like for
like comparison. The issue's ratios are to plain rsync.

W1 and W2-W4 are repeated (`--reps`, default 3), each time on a fresh pair of daemons
with fresh data, and the table shows medians (every sample is listed under it). Odd
repetitions run rsync first, so that neither tool always finds the page cache the other
left behind; the large files of a W2 repetition are deleted after it, since a page cache
full of them makes writing slower.

Run from the workspace root after `cargo build --release -p converge`:

    python3 bench/daemon/run.py            # the full run (about three minutes on 2 cores)
    python3 bench/daemon/run.py --quick    # small sizes, to check the script itself

Nothing is deleted between timed steps (ext4 without a journal makes creating thousands
of files right after deleting thousands slow): replaced data is moved into a trash dir
and the whole scratch dir is removed at the end. Wait a few minutes before running it
again: the kernel's cost lasts minutes after a large deletion. The script first times
the creation of 10,000 empty files and logs it, so that a run made while that cost lasts
shows it.

On a virtual machine whose balloon device reports free pages to the host (the
development machines here: virtio-balloon with free page reporting), memory the guest
has not touched since it was reported costs a host fault per page when first written:
about 4 s per GiB here against 0.12 s for a 256 MiB copy into reused pages. Every file
written lands in such pages or in reused ones depending on what ran before, so W2's
times for both tools swing by 2-3x between repetitions; converge, which writes W2's
bytes three times (A's pack, B's pack, B's file), swings more. Hence the repetitions.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import pwd
import grp
import random
import threading
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

KIB = 1024
MIB = 1024 * 1024
HASH = "sha1"  # only to compare copies; the fastest hashlib has here


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync_fs() -> None:
    subprocess.run(["sync"], check=False)


def proc_cpu(pid: int, children: bool = False) -> float | None:
    """User + system CPU seconds of process `pid` from /proc (with `children`: also those
    of its children it has waited for), or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def last_change(path: Path) -> float:
    """The latest ctime (wall clock, seconds) of `path` and, for a directory, of
    everything under it, symlinks not followed: when the copy last changed. (An entry
    removed while it is read counts through its directory's ctime.)"""
    latest = os.lstat(path).st_ctime_ns
    stack = [path] if path.is_dir() else []
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except FileNotFoundError:
            continue
        for e in entries:
            try:
                latest = max(latest, e.stat(follow_symlinks=False).st_ctime_ns)
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
            except FileNotFoundError:
                continue
    return latest / 1e9


def file_digest(path: Path) -> str:
    h = hashlib.new(HASH)
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM the child when this script dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Timeout(Exception):
    pass


# ----------------------------------------------------------------------------- workloads


def creation_check(root: Path, files: int = 10_000) -> float:
    """Creates `files` empty files in 100 folders under `root` (left there), logs how long
    it took and returns the seconds: about 0.5 s for 10,000 here. After a large deletion,
    ext4 without a journal makes creating files cost several times that in kernel time,
    for minutes (measured: 10,000 files took 1.3-4.1 s, batch after batch, for more than
    a minute after millions were deleted), and a W1 run then measures the disk's state
    rather than the tools. Creating files does not end it; waiting does."""
    sync_fs()
    t0 = time.monotonic()
    for d in range(100):
        folder = root / f"d{d:02}"
        folder.mkdir(parents=True)
        for n in range(files // 100):
            (folder / f"{n:04}").touch()
    took = time.monotonic() - t0
    log(f"{files:,} empty files created in {took:.2f} s (about 0.5 s for 10,000 on a quiet "
        f"disk; much more means a recent deletion still costs: file-heavy work will show it)")
    return took


def make_w1(root: Path, files: int, rng: random.Random) -> dict[str, tuple[int, str]]:
    """Writes `files` files of 1-8 KiB random bytes in two levels of folders under `root`
    (d00/s00/f0000.bin); returns {relative path: (size, digest)}."""
    top = max(1, round((files / 20) ** 0.5))  # ~20 files per leaf folder
    sub = max(1, -(-files // (top * 20)))
    expected: dict[str, tuple[int, str]] = {}
    n = 0
    for i in range(top):
        for j in range(sub):
            if n >= files:
                break
            leaf = root / f"d{i:02}" / f"s{j:02}"
            leaf.mkdir(parents=True)
            for _ in range(20):
                if n >= files:
                    break
                size = rng.randint(1 * KIB, 8 * KIB)
                data = os.urandom(size)
                name = f"f{n:05}.bin"
                (leaf / name).write_bytes(data)
                expected[f"d{i:02}/s{j:02}/{name}"] = (size, hashlib.new(HASH, data).hexdigest())
                n += 1
    return expected


def make_big(path: Path, size: int) -> str:
    """Writes `size` random bytes to `path`; returns the digest."""
    h = hashlib.new(HASH)
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(4 * MIB, left))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def digest_with_flip(path: Path, offset: int) -> tuple[str, int]:
    """The digest `path` will have once its byte at `offset` is flipped, and the new byte."""
    h = hashlib.new(HASH)
    new_byte = 0
    with open(path, "rb") as f:
        pos = 0
        while chunk := f.read(4 * MIB):
            if pos <= offset < pos + len(chunk):
                b = bytearray(chunk)
                new_byte = b[offset - pos] ^ 0xFF
                b[offset - pos] = new_byte
                chunk = bytes(b)
            h.update(chunk)
            pos += len(chunk)
    return h.hexdigest(), new_byte


def copy_with_insert(src: Path, dst: Path, offset: int, insert: bytes) -> str:
    """Copies `src` to `dst` with `insert` inserted at `offset`; returns dst's digest."""
    h = hashlib.new(HASH)
    with open(src, "rb") as f, open(dst, "wb") as out:
        head = offset
        while head:
            chunk = f.read(min(4 * MIB, head))
            out.write(chunk)
            h.update(chunk)
            head -= len(chunk)
        out.write(insert)
        h.update(insert)
        while chunk := f.read(4 * MIB):
            out.write(chunk)
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------ waiting for B


def tree_listing(root: Path) -> list[tuple[str, int]] | None:
    """Sorted (relative path, size) of every file under `root`; None if it is missing."""
    if not root.is_dir():
        return None
    out = []
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except FileNotFoundError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                else:
                    out.append((os.path.relpath(e.path, root), e.stat(follow_symlinks=False).st_size))
            except FileNotFoundError:
                continue
    out.sort()
    return out


def count_files(root: Path) -> int:
    n = 0
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            for e in os.scandir(d):
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                else:
                    n += 1
        except FileNotFoundError:
            continue
    return n


# Seconds between the polls of B's copy in W1. The time is read from the copy's ctimes, so
# a longer interval costs nothing in precision, only in how long the script waits.
W1_POLL = 0.5


def wait_tree(root: Path, expected: dict[str, tuple[int, str]], t0: float, timeout: float,
              notes: list[str], label: str, interval: float = 0.1) -> float:
    """Polls every `interval` seconds until `root` holds exactly `expected`; returns the
    time of the poll that first saw the matching listing (bytes verified afterwards, not
    timed)."""
    want = sorted((p, s) for p, (s, _) in expected.items())
    last_bad: set[str] = set()
    while True:
        now = time.monotonic()
        if now - t0 > timeout:
            raise Timeout(f"{label}: {count_files(root) if root.is_dir() else 0} of {len(want)} files after {timeout:.0f} s")
        if root.is_dir() and count_files(root) == len(want):
            seen = time.monotonic()
            if tree_listing(root) == want:
                bad = {p for p, (_, d) in expected.items() if file_digest(root / p) != d}
                if not bad:
                    return seen - t0
                if bad != last_bad:
                    notes.append(f"{label}: {len(bad)} file(s) had the right size but wrong bytes at {seen - t0:.2f} s (e.g. {sorted(bad)[0]}); kept polling")
                    last_bad = bad
        time.sleep(interval)


def drop_large_files(*dirs: Path) -> None:
    """Deletes the files of 1 MiB or more below `dirs`, between repetitions: a few inodes,
    so no ext4 deletion trap, and the pages they free are written into again quickly,
    before the balloon reports them to the host (see the module docs)."""
    for d in dirs:
        for path in d.rglob("*"):
            if path.is_file() and path.stat().st_size >= MIB:
                path.unlink()


def file_sig(st: os.stat_result) -> tuple:
    return (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)


def wait_file(path: Path, size: int, digest: str, t0: float, timeout: float,
              notes: list[str], label: str, interval: float = 0.02,
              old_sig: tuple | None = None) -> float:
    """Polls until `path` has `size` bytes with `digest`; returns the time of the poll
    that saw the new version (size/inode/mtime changed to a matching size). `old_sig`,
    the file's `file_sig` before the change, is not hashed again."""
    checked = old_sig
    while True:
        now = time.monotonic()
        if now - t0 > timeout:
            try:
                st = path.stat()
                have = f"{st.st_size} bytes"
            except FileNotFoundError:
                have = "missing"
            raise Timeout(f"{label}: B's file is {have} (want {size}) after {timeout:.0f} s")
        try:
            st = path.stat()
        except FileNotFoundError:
            st = None
        if st is not None and st.st_size == size:
            sig = file_sig(st)
            if sig != checked:
                seen = time.monotonic()
                if file_digest(path) == digest:
                    return seen - t0
                if checked is not None and checked != old_sig:
                    notes.append(f"{label}: B's file had the right size but other bytes at {seen - t0:.2f} s; kept polling")
                checked = sig
        time.sleep(interval)


# ---------------------------------------------------------------------------- converge


@dataclass
class Daemon:
    name: str
    data: Path
    folder: Path
    port: int
    admin_port: int
    replica: str = ""
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    def status(self) -> dict | None:
        """GET /api/v1/status as JSON, or None if it does not answer."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}/api/v1/status")
        token = self.data / "admin.token"
        if token.exists():
            req.add_header("Authorization", f"Bearer {token.read_text().strip()}")
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return json.loads(r.read())
        except Exception:
            return None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except FileNotFoundError:
            return ""

    def cpu(self) -> float | None:
        """User + system CPU seconds the process has used (its threads too)."""
        return proc_cpu(self.proc.pid) if self.proc else None

    def vm(self, key: str) -> int | None:
        """VmHWM / VmRSS of the process in KiB."""
        if not self.proc:
            return None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            return None
        return None


class AdminPoller:
    """Requests /metrics and /api/v1/status of one daemon, ten rounds a second, on a
    thread (the admin-API benchmark of issue 4: their latency while a workload syncs)."""

    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon
        self.samples: dict[str, list[float]] = {"/metrics": [], "/api/v1/status": []}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        token = (self.daemon.data / "admin.token").read_text().strip()
        while not self.stopping.is_set():
            for path, out in self.samples.items():
                req = urllib.request.Request(f"http://127.0.0.1:{self.daemon.admin_port}{path}")
                req.add_header("Authorization", f"Bearer {token}")
                t = time.monotonic()
                try:
                    with urllib.request.urlopen(req, timeout=5) as r:
                        r.read()
                    out.append(time.monotonic() - t)
                except Exception:
                    pass
            # Ten rounds a second: enough samples for a median, without taking a real
            # share of the two cores from the workload being timed (Prometheus itself
            # scrapes every 15 s).
            time.sleep(0.1)

    def __enter__(self) -> "AdminPoller":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)

    def summary(self) -> str:
        parts = []
        for path, xs in self.samples.items():
            if xs:
                parts.append(f"{path}: median {statistics.median(xs) * 1000:.1f} ms over {len(xs)} requests")
            else:
                parts.append(f"{path}: no answer")
        return "; ".join(parts)


def find_peer_counters(obj) -> tuple[int, int] | None:
    """Sums sent/received bytes over the `peers` list found anywhere in a status JSON."""
    if isinstance(obj, dict):
        peers = obj.get("peers")
        if isinstance(peers, list) and peers and all(isinstance(p, dict) for p in peers):
            sent = recv = 0
            found = False
            for p in peers:
                s = p.get("sent_bytes", p.get("bytes_sent"))
                r = p.get("received_bytes", p.get("bytes_received"))
                if isinstance(s, int) and isinstance(r, int):
                    sent += s
                    recv += r
                    found = True
            if found:
                return sent, recv
        for v in obj.values():
            got = find_peer_counters(v)
            if got is not None:
                return got
    elif isinstance(obj, list):
        for v in obj:
            got = find_peer_counters(v)
            if got is not None:
                return got
    return None


def tcp_bytes(pid: int, exclude_ports: set[int]) -> dict[tuple[str, str], int]:
    """TCP payload bytes (sent + received) per established connection of `pid`, from
    `ss -tinp`, leaving out connections whose local port is in `exclude_ports`."""
    try:
        out = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    lines = out.splitlines()
    result: dict[tuple[str, str], int] = {}
    for i, line in enumerate(lines):
        # With a state filter, ss leaves out the State column: Recv-Q Send-Q Local Peer Process.
        m = re.match(r"^\s*\d+\s+\d+\s+(\S+):(\d+)\s+(\S+):(\d+)\s+users:\(\(\"[^\"]*\",pid=(\d+),", line)
        if not m or int(m.group(5)) != pid or int(m.group(2)) in exclude_ports:
            continue
        info = lines[i + 1] if i + 1 < len(lines) else ""
        sent = re.search(r"bytes_sent:(\d+)", info)
        recv = re.search(r"bytes_received:(\d+)", info)
        total = (int(sent.group(1)) if sent else 0) + (int(recv.group(1)) if recv else 0)
        result[(f"{m.group(1)}:{m.group(2)}", f"{m.group(3)}:{m.group(4)}")] = total
    return result


@dataclass
class Counters:
    api: tuple[int, int] | None
    tcp: dict[tuple[str, str], int]


class Pair:
    """Two fresh converge daemons, A and B, peered on 127.0.0.1."""

    def __init__(self, binary: Path, root: Path, name: str):
        self.binary = binary
        self.root = root / name
        self.name = name
        self.a = Daemon("A", self.root / "a-data", self.root / "a", free_port(), free_port())
        self.b = Daemon("B", self.root / "b-data", self.root / "b", free_port(), free_port())

    def cpu(self) -> float | None:
        """CPU seconds both daemons have used so far."""
        a, b = self.a.cpu(), self.b.cpu()
        return None if a is None or b is None else a + b

    def start(self, timeout: float) -> None:
        # A port found free can be taken before the daemon binds it (by a dial's local
        # port, say): then start again, on other ports, in an empty place.
        for attempt in range(3):
            try:
                return self._start(timeout)
            except RuntimeError as e:
                if "Address already in use" not in str(e) or attempt == 2:
                    raise
                log(f"{self.name}: a port was taken before the daemons bound it; starting again")
                self.stop()
                shutil.rmtree(self.root, ignore_errors=True)
                self.a = Daemon("A", self.root / "a-data", self.root / "a", free_port(), free_port())
                self.b = Daemon("B", self.root / "b-data", self.root / "b", free_port(), free_port())

    def _start(self, timeout: float) -> None:
        for d in (self.a, self.b):
            out = subprocess.run(
                [str(self.binary), "init", "--data-dir", str(d.data), "--folder", str(d.folder),
                 "--listen", f"127.0.0.1:{d.port}", "--admin", f"127.0.0.1:{d.admin_port}"],
                capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                raise RuntimeError(f"converge init ({self.name} {d.name}) failed: {out.stderr.strip()}")
            d.replica = out.stdout.strip()
        for d, other in ((self.a, self.b), (self.b, self.a)):
            with open(d.data / "converge.toml", "a") as f:
                f.write(f'\n[[peers]]\nid = "{other.replica}"\naddress = "127.0.0.1:{other.port}"\n')
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"), NO_COLOR="1")
        for d in (self.a, self.b):
            d.log_path = self.root / f"{d.name}.log"
            with open(d.log_path, "wb") as logf:
                d.proc = subprocess.Popen(
                    [str(self.binary), "run", "--config", str(d.data / "converge.toml")],
                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                    env=env, preexec_fn=_die_with_parent)
        t0 = time.monotonic()
        connected_at = None
        while True:
            for d in (self.a, self.b):
                if d.proc.poll() is not None:
                    raise RuntimeError(f"converge {self.name} {d.name} exited with {d.proc.returncode}:\n{d.log_text()[-2000:]}")
            connected = all("peer connected" in d.log_text() for d in (self.a, self.b))
            scanned = all("initial scan done" in d.log_text() for d in (self.a, self.b))
            # The scan-done line is only a courtesy: give it 3 s once both are connected.
            if connected and (scanned or connected_at and time.monotonic() - connected_at > 3):
                break
            if connected and connected_at is None:
                connected_at = time.monotonic()
            if time.monotonic() - t0 > timeout:
                raise Timeout(f"{self.name}: daemons not connected after {timeout:.0f} s")
            time.sleep(0.05)
        log(f"{self.name}: daemons up and connected in {time.monotonic() - t0:.2f} s "
            f"(A pid {self.a.proc.pid}, B pid {self.b.proc.pid})")

    def counters(self) -> Counters:
        status = self.a.status()
        api = find_peer_counters(status) if status is not None else None
        tcp = tcp_bytes(self.a.proc.pid, {self.a.admin_port}) if self.a.proc else {}
        return Counters(api, tcp)

    def stop(self) -> None:
        procs = [d.proc for d in (self.a, self.b) if d.proc and d.proc.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"{self.name}: pid {p.pid} ignored SIGTERM for 20 s; SIGKILL")
                p.kill()
                p.wait()

    def warnings(self) -> list[str]:
        """Log lines at WARN or ERROR level, and any panic."""
        out = []
        for d in (self.a, self.b):
            for line in d.log_text().splitlines():
                if " WARN " in line or " ERROR " in line or "panicked" in line:
                    out.append(f"{self.name} {d.name}: {line.strip()[:300]}")
        return out


def bytes_between(before: Counters, after: Counters) -> tuple[int | None, int | None, bool]:
    """(API bytes, TCP bytes, whether a connection of the TCP count closed in between)."""
    api = None
    if before.api is not None and after.api is not None:
        api = (after.api[0] - before.api[0]) + (after.api[1] - before.api[1])
    tcp = None
    lost = False
    if after.tcp or before.tcp:
        tcp = sum(v - before.tcp.get(k, 0) for k, v in after.tcp.items())
        lost = any(k not in after.tcp for k in before.tcp)
    return api, tcp, lost


# ------------------------------------------------------------------------------- rsync


class Rsyncd:
    def __init__(self, root: Path):
        self.root = root / "rsync"
        self.dest = self.root / "dest"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        # CPU seconds of the last push: the client's and the daemon's process for it.
        self.last_cpu: float | None = None

    def start(self) -> None:
        self.dest.mkdir(parents=True)
        conf = self.root / "rsyncd.conf"
        user = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(os.getgid()).gr_name
        conf.write_text(
            f"use chroot = no\npid file = {self.root / 'rsyncd.pid'}\nlog file = {self.root / 'rsyncd.log'}\n"
            f"uid = {user}\ngid = {group}\n\n[bench]\npath = {self.dest}\nread only = no\n")
        self.proc = subprocess.Popen(
            ["rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={self.port}",
             "--address=127.0.0.1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent)
        t0 = time.monotonic()
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() - t0 > 10:
                    raise RuntimeError("the rsync daemon did not start")
                time.sleep(0.05)

    def push(self, src: str, dest_rel: str, timeout: float, fsync: bool = False) -> tuple[float, float, int]:
        """rsync -a --stats [--fsync] SRC rsync://.../bench/DEST_REL; returns (wall seconds,
        seconds until the copy last changed, bytes)."""
        sync_fs()
        cmd = ["rsync", "-a", "--stats", *(["--fsync"] if fsync else []), src,
               f"rsync://127.0.0.1:{self.port}/bench/{dest_rel}"]
        self.last_cpu = None
        client0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        daemon0 = proc_cpu(self.proc.pid, children=True) if self.proc else None
        started = time.time()
        t0 = time.monotonic()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Timeout(f"rsync {src}: no exit after {timeout:.0f} s")
        elapsed = time.monotonic() - t0
        if out.returncode != 0:
            raise RuntimeError(f"rsync failed ({out.returncode}): {out.stderr.strip()}")
        client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        client = (client1.ru_utime + client1.ru_stime) - (client0.ru_utime + client0.ru_stime)
        # The daemon's process for this push (its generator and receiver) counts in the
        # daemon's children's time once the daemon has waited for it, right after it exits.
        if self.proc and daemon0 is not None and self.wait_children():
            daemon = proc_cpu(self.proc.pid, children=True)
            if daemon is not None:
                self.last_cpu = client + daemon - daemon0

        def stat(name: str) -> int:
            m = re.search(rf"^{name}: ([\d,.]+)", out.stdout, re.M)
            if not m:
                raise RuntimeError(f"no '{name}' in rsync --stats:\n{out.stdout}")
            return int(re.sub(r"[,.]", "", m.group(1)))

        done = last_change(self.dest / dest_rel / Path(src).name) - started
        return elapsed, done, stat("Total bytes sent") + stat("Total bytes received")

    def wait_children(self) -> bool:
        """Whether the daemon has no child process left (within three seconds)."""
        assert self.proc
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        for _ in range(300):
            try:
                if not children.read_text().split():
                    return True
            except OSError:
                return False
            time.sleep(0.01)
        return False

    def push_fsync(self, row: "Row", source: Path, dest_rel: str, timeout: float,
                   notes: list[str]) -> None:
        """Times `rsync --fsync` of SOURCE into DEST_REL (a copy of its own) for `row`."""
        try:
            wall, done, _ = self.push(str(source), dest_rel, timeout, fsync=True)
            row.f_times.append(done)
            row.f_walls.append(wall)
        except (Timeout, RuntimeError) as e:
            row.f_err = "timeout" if isinstance(e, Timeout) else "error"
            notes.append(f"rsync --fsync: {e}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -------------------------------------------------------------------------------- report


@dataclass
class Row:
    """One workload's results over all repetitions: times as samples, bytes from the
    first repetition that measured them, peak RSS as the largest seen."""
    name: str
    what: str
    # Until the copy last changed (see the module docs); the poll's times beside them.
    c_times: list[float] = field(default_factory=list)
    c_polled: list[float] = field(default_factory=list)
    c_err: str | None = None
    c_api: int | None = None
    c_tcp: int | None = None
    tcp_lost: bool = False
    r_times: list[float] = field(default_factory=list)
    r_walls: list[float] = field(default_factory=list)
    r_err: str | None = None
    r_bytes: int | None = None
    # `rsync --fsync`: the copy made durable before rsync exits, as converge's is.
    f_times: list[float] = field(default_factory=list)
    f_walls: list[float] = field(default_factory=list)
    f_err: str | None = None
    rss_kib: tuple[int, int] | None = None
    # CPU seconds through each sync: both converge daemons; rsync's client and daemon.
    c_cpu: list[float] = field(default_factory=list)
    r_cpu: list[float] = field(default_factory=list)

    @property
    def c_time(self) -> float | None:
        return statistics.median(self.c_times) if self.c_times else None

    @property
    def r_time(self) -> float | None:
        return statistics.median(self.r_times) if self.r_times else None

    @property
    def f_time(self) -> float | None:
        return statistics.median(self.f_times) if self.f_times else None

    def record_bytes(self, api: int | None, tcp: int | None, lost: bool) -> None:
        if self.c_api is None and self.c_tcp is None:
            self.c_api, self.c_tcp, self.tcp_lost = api, tcp, lost

    def record_cpu(self, before: float | None, after: float | None) -> None:
        if before is not None and after is not None:
            self.c_cpu.append(after - before)

    def cpu(self) -> str:
        def med(xs: list[float]) -> str:
            return f"{statistics.median(xs):.2f}" if xs else "—"
        if not self.c_cpu and not self.r_cpu:
            return "—"
        return f"{med(self.c_cpu)} / {med(self.r_cpu)} s"

    def record_rss(self, pair: "Pair") -> None:
        a, b = pair.a.vm("VmHWM") or 0, pair.b.vm("VmHWM") or 0
        old = self.rss_kib or (0, 0)
        self.rss_kib = (max(old[0], a), max(old[1], b))

    def rss(self) -> str:
        if not self.rss_kib:
            return "—"
        return f"{self.rss_kib[0] / 1024:.0f} / {self.rss_kib[1] / 1024:.0f}"


def fmt_time(t: float | None, err: str | None) -> str:
    if err:
        return err
    return "—" if t is None else f"{t:.2f} s"


def fmt_bytes(b: int | None) -> str:
    if b is None:
        return "n/a"
    if b >= 10 * MIB:
        return f"{b / MIB:,.1f} MiB"
    if b >= 10 * KIB:
        return f"{b / KIB:,.1f} KiB"
    return f"{b:,} B"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b <= 0:
        return "n/a"
    return f"{a / b:.2f}×"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default="target/release/converge", help="converge binary (copied before use)")
    ap.add_argument("--files", type=int, default=10_000, help="W1 file count")
    ap.add_argument("--big-mib", type=int, default=256, help="W2 file size in MiB")
    ap.add_argument("--latency-runs", type=int, default=100, help="L repetitions")
    ap.add_argument("--timeout", type=float, default=300, help="bound of every wait, seconds")
    ap.add_argument("--only", default="W1,W2,L", help="families to run: W1, W2 (W2-W4), L")
    ap.add_argument("--reps", type=int, default=None,
                    help="repetitions of W1 and W2-W4, each on a fresh pair; medians are reported "
                         "(default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="500 files, 16 MiB, 20 latency runs")
    ap.add_argument("--dir", default=None, help="scratch parent dir (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir (logs, data)")
    args = ap.parse_args()
    if args.quick:
        args.files, args.big_mib, args.latency_runs = 500, 16, 20
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    only = {s.strip().upper() for s in args.only.split(",")}

    src_bin = Path(args.binary)
    if not src_bin.is_file():
        print(f"error: {src_bin} not found: run `cargo build --release -p converge` first", file=sys.stderr)
        return 2
    if shutil.which("rsync") is None:
        print("error: rsync not found: apt-get install -y rsync", file=sys.stderr)
        return 2

    root = Path(tempfile.mkdtemp(prefix="converge-bench-", dir=args.dir))
    trash = root / "trash"
    staging = root / "staging"
    trash.mkdir()
    staging.mkdir()
    binary = root / "converge"
    shutil.copy2(src_bin, binary)  # a rebuild during the run must not swap it
    log(f"scratch dir {root}")

    rows: list[Row] = []
    admin_latency = ""
    notes: list[str] = []
    lat: dict[str, list[float] | str] = {}
    pairs: list[Pair] = []
    rsyncd = Rsyncd(root)
    rng = random.Random(3)
    t_start = time.monotonic()
    try:
        rsyncd.start()
        creation_check(trash / "check")

        # Each repetition runs on a fresh pair with fresh data. Odd repetitions run rsync
        # first, so that neither tool always finds the page cache the other left behind.

        # ---------------------------------------------------------------- W1
        if "W1" in only:
            row = Row("W1", f"{args.files:,} files of 1–8 KiB, initial sync")
            rows.append(row)
            for rep in range(args.reps):
                log(f"W1 #{rep + 1}: generating {args.files} files")
                src = staging / f"w1-{rep}" / "w1"
                expected = make_w1(src, args.files, rng)
                pair = Pair(binary, root, f"pair-w1-{rep}")
                pairs.append(pair)
                pair.start(args.timeout)

                def converge_w1() -> None:
                    sync_fs()
                    before = pair.counters()
                    log(f"W1 #{rep + 1}: converge")
                    cpu0 = pair.cpu()
                    started = time.time()
                    t0 = time.monotonic()
                    os.rename(src, pair.a.folder / "w1")
                    try:
                        # Polled twice a second: each poll lists 10,000 files, CPU taken
                        # from the two daemons on two cores (rsync's time has no poll).
                        row.c_polled.append(wait_tree(pair.b.folder / "w1", expected, t0,
                                                      args.timeout, notes, "W1",
                                                      interval=W1_POLL))
                        row.record_cpu(cpu0, pair.cpu())
                        row.c_times.append(last_change(pair.b.folder / "w1") - started)
                        time.sleep(1.0)  # let acknowledgements settle before reading the counters
                        row.record_bytes(*bytes_between(before, pair.counters()))
                    except Timeout as e:
                        row.c_err = "timeout"
                        notes.append(str(e))
                    row.record_rss(pair)

                def rsync_w1() -> None:
                    log(f"W1 #{rep + 1}: rsync")
                    source = src if src.exists() else pair.a.folder / "w1"
                    try:
                        wall, done, b = rsyncd.push(str(source), f"r{rep}/", args.timeout)
                        if rsyncd.last_cpu is not None:
                            row.r_cpu.append(rsyncd.last_cpu)
                        row.r_times.append(done)
                        row.r_walls.append(wall)
                        row.r_bytes = row.r_bytes or b
                        if tree_listing(rsyncd.dest / f"r{rep}" / "w1") != sorted((p, s) for p, (s, _) in expected.items()):
                            notes.append("W1: rsync's copy differs from the source (!)")
                    except (Timeout, RuntimeError) as e:
                        row.r_err = "timeout" if isinstance(e, Timeout) else "error"
                        notes.append(str(e))
                    rsyncd.push_fsync(row, source, f"f{rep}/", args.timeout, notes)

                for step in ((converge_w1, rsync_w1) if rep % 2 == 0 else (rsync_w1, converge_w1)):
                    step()
                pair.stop()

            # The admin API's latency under load (issue 4), on a W1 sync of its own: the
            # poller's requests take CPU from the daemons, so no timed run has it.
            log("W1 with the admin API polled (not timed)")
            src = staging / "w1-admin" / "w1"
            expected = make_w1(src, args.files, rng)
            pair = Pair(binary, root, "pair-w1-admin")
            pairs.append(pair)
            pair.start(args.timeout)
            sync_fs()
            t0 = time.monotonic()
            os.rename(src, pair.a.folder / "w1")
            try:
                with AdminPoller(pair.a) as poller:
                    wait_tree(pair.b.folder / "w1", expected, t0, args.timeout, notes, "W1 (admin)")
                admin_latency = poller.summary()
            except Timeout as e:
                notes.append(str(e))
            pair.stop()

        # ---------------------------------------------------------- W2–W4
        if "W2" in only:
            size = args.big_mib * MIB
            w2 = Row("W2", f"one {args.big_mib} MiB random file, initial sync")
            w3 = Row("W3", "W2 with 1 byte changed in the middle")
            w4 = Row("W4", "W2 with 100 bytes inserted at 1/3")
            rows += [w2, w3, w4]
            for rep in range(args.reps):
                log(f"W2 #{rep + 1}: generating {args.big_mib} MiB")
                src = staging / f"big-{rep}.bin"
                digest = make_big(src, size)
                pair = Pair(binary, root, f"pair-w2-{rep}")
                pairs.append(pair)
                pair.start(args.timeout)
                a_file, b_file = pair.a.folder / "big.bin", pair.b.folder / "big.bin"
                dest_rel = f"r{rep}/"

                def converge_step(row: Row, change, size: int, digest: str) -> bool:
                    sync_fs()
                    before = pair.counters()
                    old_sig = file_sig(b_file.stat()) if b_file.exists() else None
                    cpu0 = pair.cpu()
                    started = time.time()
                    t0 = time.monotonic()
                    change()
                    try:
                        row.c_polled.append(wait_file(b_file, size, digest, t0, args.timeout, notes,
                                                      row.name, old_sig=old_sig))
                        row.record_cpu(cpu0, pair.cpu())
                        row.c_times.append(last_change(b_file) - started)
                        time.sleep(1.0)
                        row.record_bytes(*bytes_between(before, pair.counters()))
                        return True
                    except Timeout as e:
                        row.c_err = "timeout"
                        notes.append(str(e))
                        return False
                    finally:
                        row.record_rss(pair)

                def rsync_step(row: Row, source: Path, want_digest: str) -> None:
                    log(f"{row.name} #{rep + 1}: rsync")
                    try:
                        wall, done, b = rsyncd.push(str(source), dest_rel, args.timeout)
                        if rsyncd.last_cpu is not None:
                            row.r_cpu.append(rsyncd.last_cpu)
                        row.r_times.append(done)
                        row.r_walls.append(wall)
                        row.r_bytes = row.r_bytes or b
                        if file_digest(rsyncd.dest / dest_rel / "big.bin") != want_digest:
                            notes.append(f"{row.name}: rsync's copy differs from the source (!)")
                    except (Timeout, RuntimeError) as e:
                        row.r_err = "timeout" if isinstance(e, Timeout) else "error"
                        notes.append(str(e))
                    rsyncd.push_fsync(row, source, f"f{rep}/", args.timeout, notes)

                # rsync names the copy after its source: stage it as big.bin.
                (staging / f"w2-{rep}").mkdir()
                os.rename(src, staging / f"w2-{rep}" / "big.bin")
                src = staging / f"w2-{rep}" / "big.bin"
                ok = True
                for first in ((True, False) if rep % 2 == 0 else (False, True)):
                    if first:
                        log(f"W2 #{rep + 1}: converge")
                        ok = converge_step(w2, lambda: os.rename(src, a_file), size, digest)
                    else:
                        rsync_step(w2, src if src.exists() else a_file, digest)

                # W3: flip the middle byte in place.
                middle = size // 2
                d3, new_byte = digest_with_flip(a_file, middle)

                def flip() -> None:
                    with open(a_file, "r+b") as f:
                        f.seek(middle)
                        f.write(bytes([new_byte]))

                if ok:
                    log(f"W3 #{rep + 1}: converge")
                    ok = converge_step(w3, flip, size, d3)
                else:
                    flip()
                    w3.c_err = "skipped"
                rsync_step(w3, a_file, d3)

                # W4: 100 bytes inserted at one third, staged and renamed over A's file (the
                # old inode is kept alive by a link in the trash: nothing is freed while timed).
                d4 = copy_with_insert(a_file, staging / "big4.bin", size // 3, os.urandom(100))
                os.link(a_file, trash / f"big-w3-{rep}.bin")
                if ok:
                    log(f"W4 #{rep + 1}: converge")
                    converge_step(w4, lambda: os.rename(staging / "big4.bin", a_file), size + 100, d4)
                else:
                    os.rename(staging / "big4.bin", a_file)
                    w4.c_err = "skipped"
                rsync_step(w4, a_file, d4)
                pair.stop()
                drop_large_files(pair.root, rsyncd.dest / dest_rel, rsyncd.dest / f"f{rep}", trash)

        # ------------------------------------------------------------------ L
        if "L" in only:
            pair = Pair(binary, root, "pair-l")
            pairs.append(pair)
            pair.start(args.timeout)
            (pair.a.folder / "lat").mkdir()
            wait_deadline = time.monotonic() + args.timeout
            while not (pair.b.folder / "lat").is_dir():
                if time.monotonic() > wait_deadline:
                    raise Timeout("L: the folder lat/ never reached B")
                time.sleep(0.01)
            log(f"L: {args.latency_runs} small files, converge then rsync")
            conv: list[float] = []
            rs: list[float] = []
            timeouts = 0
            for i in range(args.latency_runs):
                data = os.urandom(1024)
                name = f"lat/f{i:03}.txt"
                time.sleep(0.1)  # not within the previous change's debounce window
                t0 = time.monotonic()
                with open(pair.a.folder / name, "wb") as f:
                    f.write(data)
                try:
                    conv.append(wait_file(pair.b.folder / name, len(data), hashlib.new(HASH, data).hexdigest(),
                                          t0, min(args.timeout, 30), notes, f"L#{i}", interval=0.001))
                except Timeout as e:
                    timeouts += 1
                    notes.append(str(e))
                    if timeouts >= 3:
                        notes.append("L: stopped after 3 timeouts")
                        break
            lat["converge"] = conv
            lat["converge_timeouts"] = timeouts  # type: ignore[assignment]
            # rsync: push the same folder after each single new file (the command's wall
            # time; rsync has no watcher, so this leaves out noticing the change).
            rsrc = root / "rsync-lat"
            rsrc.mkdir()
            for i in range(min(args.latency_runs, len(conv) or args.latency_runs)):
                (rsrc / f"f{i:03}.txt").write_bytes(os.urandom(1024))
                try:
                    wall, _, _ = rsyncd.push(str(rsrc), "", min(args.timeout, 30))
                    rs.append(wall)
                except (Timeout, RuntimeError) as e:
                    notes.append(f"L rsync: {e}")
                    break
            lat["rsync"] = rs
            pair.stop()
    except Timeout as e:
        notes.append(f"aborted: {e}")
    except Exception as e:  # report what was measured, then the error
        notes.append(f"aborted: {type(e).__name__}: {e}")
    finally:
        for p in pairs:
            try:
                p.stop()
            except Exception as e:
                notes.append(f"stopping {p.name}: {e}")
            notes += p.warnings()[:10]
        rsyncd.stop()

    # ------------------------------------------------------------------------ table
    total = time.monotonic() - t_start
    api_any = any(r.c_api is not None for r in rows)
    print()
    print(f"converge vs rsync {subprocess.run(['rsync', '--version'], capture_output=True, text=True).stdout.split()[2]}"
          f" on 127.0.0.1, {os.cpu_count()} cores, one run ({total:.0f} s in all); W1 and W2–W4: "
          + (f"medians of {args.reps} repetitions" if args.reps > 1 else "one repetition each"))
    print()
    print("| workload | converge time | rsync time | time ratio | rsync --fsync time | time ratio to it "
          "| converge bytes (counters) | converge bytes (TCP) | rsync bytes | bytes ratio | peak RSS A / B (MiB) "
          "| CPU converge / rsync |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        conv_bytes = r.c_api if r.c_api is not None else r.c_tcp
        bytes_ratio = ratio(conv_bytes, r.r_bytes)
        if r.c_api is None and r.c_tcp is not None and bytes_ratio != "n/a":
            bytes_ratio += " (TCP)"
        tcp = fmt_bytes(r.c_tcp) + (" (a connection closed: low)" if r.tcp_lost else "")
        print(f"| {r.name}: {r.what} | {fmt_time(r.c_time, r.c_err)} | {fmt_time(r.r_time, r.r_err)} "
              f"| {ratio(r.c_time, r.r_time)} | {fmt_time(r.f_time, r.f_err)} | {ratio(r.c_time, r.f_time)} "
              f"| {fmt_bytes(r.c_api)} | {tcp} | {fmt_bytes(r.r_bytes)} "
              f"| {bytes_ratio} | {r.rss()} | {r.cpu()} |")
    if "converge" in lat:
        conv = sorted(lat["converge"])  # type: ignore[arg-type]
        rs = sorted(lat.get("rsync", []))  # type: ignore[arg-type]

        def pct(xs: list[float], q: float) -> str:
            if not xs:
                return "n/a"
            return f"{xs[min(len(xs) - 1, int(q * len(xs)))] * 1000:.0f} ms"

        med = lambda xs: f"{statistics.median(xs) * 1000:.0f} ms" if xs else "n/a"
        n_to = lat.get("converge_timeouts", 0)
        print(f"| L: 1 KiB file written on A, {len(conv)} times{f' ({n_to} timeouts)' if n_to else ''} "
              f"| p50 {med(conv)}, p99 {pct(conv, 0.99)} | p50 {med(rs)}, p99 {pct(rs, 0.99)} (rsync command only) "
              f"| {ratio(statistics.median(conv) if conv else None, statistics.median(rs) if rs else None)} (p50) "
              f"| | | | | | | | |")
    print()
    print("Time: from the change on A (converge) or the start of `rsync -a --stats` (rsync; the "
          "issue's reference) or of `rsync -a --stats --fsync` (rsync --fsync: each file made "
          "durable before it is renamed into place, where converge makes the content durable "
          "in its content store before it shows a file and syncs the folder's copy after, "
          "untimed; run right after the plain push, into a copy of its own) until the copy last changed "
          "(its latest ctime, read once a poll found it identical; L: converge polled every "
          "1 ms, rsync's wall time). Bytes: converge's own counters (admin API "
          "/api/v1/status, A's peers[].sent_bytes + received_bytes)"
          + ("" if api_any else ": the admin API did not answer, so n/a")
          + "; TCP: payload bytes of A's peer connections from `ss -ti`; rsync: Total bytes "
          "sent + received (first repetition). Peak RSS: VmHWM of each daemon at the end of "
          "the workload, the largest over the repetitions (W3/W4: the W2 pair's, so "
          "including W2). CPU: user + system seconds (/proc), medians: converge's two daemons "
          "from the change until the poll found the copy identical; rsync's client and the "
          "rsync daemon's process for the push (plain rsync).")
    if any(r.c_times or r.r_times for r in rows):
        print()
        print("Samples, in run order (s):")
        for r in rows:
            def xs(ts: list[float]) -> str:
                return ", ".join(f"{t:.2f}" for t in ts) or "—"

            print(f"- {r.name}: converge {xs(r.c_times)} (polled {xs(r.c_polled)}); rsync "
                  f"{xs(r.r_times)} (wall {xs(r.r_walls)}); rsync --fsync {xs(r.f_times)} "
                  f"(wall {xs(r.f_walls)}); CPU converge {xs(r.c_cpu)}, rsync {xs(r.r_cpu)}")
    if admin_latency:
        print()
        print(f"Admin API on A while W1 synced (both endpoints, ten rounds a second): {admin_latency}")
    if notes:
        print()
        print("Notes:")
        for n in notes:
            print(f"- {n}")

    if args.keep:
        log(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    failed = any(r.c_err == "timeout" or r.r_err or r.f_err for r in rows) or any(n.startswith("aborted") for n in notes)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
