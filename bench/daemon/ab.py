#!/usr/bin/env python3
"""A/B benchmark of converge builds: the same workload on fresh daemon pairs, builds
alternated, medians of wall time and of each daemon's CPU time.

Where run.py compares converge with rsync, this compares converge with itself: build the
two versions (for example, `git worktree add ../base HEAD~1` and build there with its own
`CARGO_TARGET_DIR`), copy each binary somewhere, then

    python3 bench/daemon/ab.py --workload W1 --reps 4 /tmp/conv-before /tmp/conv-after

Each repetition starts a fresh pair of daemons with every binary (the order flips every
repetition, so neither build always runs first), generates fresh data, and times the
change on A until B's copy last changed (its latest ctime, once a poll has found it
identical), as run.py does. CPU time is read from /proc/<pid>/stat (user + system) of
each daemon just before the change and once the poll has found B identical, so it covers
the whole sync on both sides. A change that shifts work
from one daemon to the other shows in the CPU columns even when the wall time, which
moves more from run to run on these machines (see run.py), does not.

Nothing is deleted between timed steps, except a W2 repetition's large files (a few
inodes, so no ext4 deletion trap); the scratch dir is removed at the end, unless `--keep`
(W1 runs back to back: a run started within a minute or two of that removal measures the
file system, not converge).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

_spec = importlib.util.spec_from_file_location("run", Path(__file__).with_name("run.py"))
assert _spec and _spec.loader
run = importlib.util.module_from_spec(_spec)
sys.modules["run"] = run
_spec.loader.exec_module(run)


def cpu_seconds(daemon: "run.Daemon") -> float:
    """User + system CPU time of `daemon` so far (run.py's reading of /proc)."""
    cpu = daemon.cpu()
    if cpu is None:
        raise RuntimeError(f"daemon {daemon.name} is gone")
    return cpu


def one_run(binary: Path, root: Path, name: str, workload: str, files: int, big_mib: int,
            seed: int, timeout: float) -> tuple[float, float, float]:
    """(seconds until B is identical, A's CPU seconds, B's CPU seconds) for one fresh pair."""
    pair = run.Pair(binary, root, name)
    pair.start(timeout)
    try:
        staging = pair.root / "staging"
        staging.mkdir()
        if workload == "W2":
            src = staging / "big.bin"
            size = big_mib * run.MIB
            digest = run.make_big(src, size)
            target = pair.a.folder / "big.bin"
        else:
            expected = run.make_w1(staging / "w1", files, random.Random(seed))
            src = staging / "w1"
            target = pair.a.folder / "w1"
        run.sync_fs()
        time.sleep(0.3)
        a0, b0 = cpu_seconds(pair.a), cpu_seconds(pair.b)
        started = time.time()
        t0 = time.monotonic()
        os.rename(src, target)
        # Timed as run.py times it: until the copy last changed (its latest ctime), once
        # a poll has found it identical.
        if workload == "W2":
            copy = pair.b.folder / "big.bin"
            run.wait_file(copy, size, digest, t0, timeout, [], "W2", interval=0.01)
        else:
            copy = pair.b.folder / "w1"
            run.wait_tree(copy, expected, t0, timeout, [], "W1")
        took = run.last_change(copy) - started
        return took, cpu_seconds(pair.a) - a0, cpu_seconds(pair.b) - b0
    finally:
        pair.stop()
        if workload == "W2":
            run.drop_large_files(pair.root)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("binaries", nargs="+", help="converge binaries to compare (two or more)")
    ap.add_argument("--workload", default="W1", choices=["W1", "W2"],
                    help="W1: many small files; W2: one large file (as in run.py)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per binary")
    ap.add_argument("--files", type=int, default=10_000, help="W1 file count")
    ap.add_argument("--big-mib", type=int, default=256, help="W2 file size in MiB")
    ap.add_argument("--timeout", type=float, default=120, help="bound of every wait, seconds")
    ap.add_argument("--dir", default=None, help="scratch parent dir (default: the system temp dir)")
    ap.add_argument("--keep", action="store_true",
                    help="leave the scratch dir in place (deleting W1's files makes file creation "
                         "slow for a minute or more afterwards: see run.py)")
    args = ap.parse_args()

    binaries = [Path(b).resolve() for b in args.binaries]
    for b in binaries:
        if not os.access(b, os.X_OK):
            print(f"error: {b} is not an executable file", file=sys.stderr)
            return 2
    if len(binaries) < 2 or len({b.name for b in binaries}) != len(binaries):
        print("error: give two or more binaries with different file names", file=sys.stderr)
        return 2

    root = Path(tempfile.mkdtemp(prefix="converge-ab-", dir=args.dir))
    run.log(f"scratch dir {root}")
    # Shows whether a recent deletion still makes creating files slow (see run.py).
    run.creation_check(root / 'check')
    results: dict[Path, list[tuple[float, float, float]]] = {b: [] for b in binaries}
    try:
        for rep in range(args.reps):
            for binary in (binaries if rep % 2 == 0 else binaries[::-1]):
                sample = one_run(binary, root, f"{binary.name}-{rep}", args.workload, args.files,
                                 args.big_mib, rep, args.timeout)
                results[binary].append(sample)
                run.log(f"{binary.name} #{rep + 1}: {sample[0]:.2f} s, "
                        f"CPU A {sample[1]:.2f} s, B {sample[2]:.2f} s")
    finally:
        if args.keep:
            run.log(f"scratch dir left in place: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    what = (f"{args.files:,} files of 1-8 KiB" if args.workload == "W1"
            else f"one {args.big_mib} MiB file")
    print()
    print(f"{args.workload} ({what}), medians of {args.reps} repetitions, builds alternated")
    print()
    print("| binary | time | CPU A | CPU B | CPU A + B | time samples (s) |")
    print("|---|--:|--:|--:|--:|---|")
    for binary in binaries:
        took, cpu_a, cpu_b = zip(*results[binary])
        both = [a + b for a, b in zip(cpu_a, cpu_b)]
        print(f"| {binary.name} | {statistics.median(took):.2f} s | {statistics.median(cpu_a):.2f} s "
              f"| {statistics.median(cpu_b):.2f} s | {statistics.median(both):.2f} s "
              f"| {', '.join(f'{t:.2f}' for t in took)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
