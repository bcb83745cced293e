#!/usr/bin/env python3
"""Peak memory of the two converge daemons as W1 and W2 grow (issue 3, "Benchmark": the
log and the files are never held in memory whole, so peak RSS must stay flat as the
workload grows).

For each size, a fresh pair of daemons (as `run.py` starts them) syncs one workload:
  W2 at each --sizes entry: one file of random data of that many MiB (initial sync);
  W1 at each --files entry: that many files of 1-8 KiB in two levels of folders.
Each row gives the time until B's copy is complete (polled; `run.py` times W1 and W2
more finely), each daemon's peak RSS (VmHWM, read once the copy is complete, which
covers the transfer, the event's append and the folder store's write) and its CPU time.
The pair and its data are removed after each row; moved aside first for W1, whose many
deletions would slow the next file creations on ext4 (see run.py).

Usage: python3 bench/daemon/rss.py [--sizes 256,1024,3072] [--files 10000,40000]
       [--reps 1] [--binary target/release/converge] [--dir DIR]
"""
import argparse
import importlib.util
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("run", HERE / "run.py")
run = importlib.util.module_from_spec(spec)
sys.modules["run"] = run
spec.loader.exec_module(run)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(binary: Path, root: Path, label: str, stage, wait, timeout: float) -> dict:
    """One row: starts a pair, stages the workload outside A's folder, moves it in, waits
    for B's copy, and reads both daemons' peak RSS and CPU time."""
    pair = run.Pair(binary, root, f"rss-{label}-{int(time.time())}")
    pair.start(timeout)
    try:
        staging = pair.root / "staging"
        staging.mkdir()
        src, expected = stage(staging)
        run.sync_fs()
        time.sleep(0.5)
        cpu0 = {d.name: cpu_seconds(d.proc.pid) for d in (pair.a, pair.b)}
        t0 = time.monotonic()
        os.rename(src, pair.a.folder / src.name)
        elapsed = wait(pair.b.folder / src.name, expected, t0, timeout)
        row = {"label": label, "time": elapsed}
        for d in (pair.a, pair.b):
            row[f"rss_{d.name}"] = (d.vm("VmHWM") or 0) / 1024
            row[f"cpu_{d.name}"] = cpu_seconds(d.proc.pid) - cpu0[d.name]
        return row
    finally:
        pair.stop()
        aside = root / "old" / pair.root.name
        aside.parent.mkdir(exist_ok=True)
        os.rename(pair.root, aside)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="target/release/converge", help="converge binary")
    ap.add_argument("--sizes", default="256,1024,3072", help="W2 file sizes in MiB, comma-separated ('' for none)")
    ap.add_argument("--files", default="10000,40000", help="W1 file counts, comma-separated ('' for none)")
    ap.add_argument("--reps", type=int, default=1, help="rows per size")
    ap.add_argument("--timeout", type=float, default=600, help="bound of every wait, seconds")
    ap.add_argument("--dir", default=None, help="scratch parent dir (default: the system temp dir)")
    args = ap.parse_args()
    binary = Path(args.binary).resolve()
    if not binary.exists():
        print(f"no converge binary at {binary}: run `cargo build --release` first", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",") if s]
    counts = [int(s) for s in args.files.split(",") if s]
    root = Path(tempfile.mkdtemp(prefix="converge-rss-", dir=args.dir))
    # Shows whether a recent deletion still makes creating files slow (see run.py).
    run.creation_check(root / 'check')
    rng = random.Random(7)
    rows = []
    try:
        for mib in sizes:
            for _ in range(args.reps):
                def stage(staging: Path, mib=mib):
                    src = staging / "big.bin"
                    return src, run.make_big(src, mib * run.MIB)

                def wait(path: Path, digest: str, t0: float, timeout: float, mib=mib):
                    return run.wait_file(path, mib * run.MIB, digest, t0, timeout, [], "W2")

                rows.append(measure(binary, root, f"W2 {mib} MiB", stage, wait, args.timeout))
                # The copies on disk go at once: a large file's deletion is cheap.
                shutil.rmtree(root / "old", ignore_errors=True)
        for count in counts:
            for _ in range(args.reps):
                def stage(staging: Path, count=count):
                    src = staging / "w1"
                    return src, run.make_w1(src, count, rng)

                def wait(path: Path, expected, t0: float, timeout: float):
                    return run.wait_tree(path, expected, t0, timeout, [], "W1")

                rows.append(measure(binary, root, f"W1 {count:,} files", stage, wait, args.timeout))
    finally:
        print()
        print("| workload | time | peak RSS A | peak RSS B | CPU A | CPU B |")
        print("|---|--:|--:|--:|--:|--:|")
        for r in rows:
            print(f"| {r['label']} | {r['time']:.2f} s | {r['rss_A']:.0f} MiB | {r['rss_B']:.0f} MiB "
                  f"| {r['cpu_A']:.2f} s | {r['cpu_B']:.2f} s |")
        print(f"\nscratch dir (W1's files moved aside, remove when convenient): {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
