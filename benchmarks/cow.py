#!/usr/bin/env python3
"""Memory a fork shares copy-on-write, through checkpoint and restore: once, or once per process.

    python3 benchmarks/cow.py [--quick] [--json FILE] [--mib N] [--workers N] [--reps N]

A pool forked after loading its data (benchmarks/workloads/bench_cow.c): a process fills N MiB
(256 by default; 64 with --quick) of private memory with bytes that do not compress, then forks
--workers workers (7; 3 with --quick) that share it, each writing one page of it. The anchor,
in the same run: the process alone, holding the same memory. Each is checkpointed to an image
on /dev/shm and restored; the table gives the frozen time, the image's size, the restore's
wall time and the memory the restored processes hold between them (their Pss, summed: a page
that several share counts once), and each as a ratio to the anchor's. Where the pool's
shared memory went once per process, the image and the memory were (1 + workers) times the
anchor's; the aim is 1x. Each row is the median of --reps runs (3; 1 with --quick).

Memory here is several times slower on first touch: each case runs once untimed first
(warm-up), and the output says so. The same sharing, live (pages sent once, the destination's
memory), is what tests/test_live_trees.py checks for a 64 MiB pool.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))      # this checkout's engine, whatever else is installed

from benchmarks._common import (  # noqa: E402
    KCR, BenchError, become_subreaper, compile_c, guarded, machine_info, machine_summary, run_tool,
    stop_on_signals, table, write_json,
)
from benchmarks.tree import descendants, end_tree, log  # noqa: E402

WORKLOAD = REPO / "benchmarks" / "workloads" / "bench_cow.c"
READY_TIMEOUT = 120.0
MiB = 1 << 20


def pss_bytes(pids: list[int]) -> int:
    """The memory ``pids`` hold between them: their Pss, summed."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
    return total


def one(binary: Path, mib: int, workers: int, tmp: Path) -> dict[str, float]:
    """Start the pool, checkpoint it, restore it, end it: the numbers of that one run."""
    work = Path(tempfile.mkdtemp(prefix="cow-", dir=tmp))
    proc = subprocess.Popen([str(binary), str(work), str(mib), str(workers)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pids = [proc.pid]
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not (work / "ready").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the pool of {workers} workers did not start")
            time.sleep(0.01)
        pids = descendants(proc.pid)
        source_bytes = pss_bytes(pids)
        image = Path("/dev/shm") / f"kcr-bench-cow-{os.getpid()}.img"
        stats = tmp / "stats.json"
        _, code, _, err = run_tool([*KCR, "checkpoint", str(proc.pid), "-o", str(image), "--force",
                                    "--stats-json", str(stats)])
        if code != 0:
            raise BenchError(f"checkpoint failed: {err.strip()[-300:]}")
        proc.wait()
        end_tree(pids[1:])                   # the killed workers, adopted here: their pids are free again
        frozen = json.loads(stats.read_text())["frozen_time_ms"]
        image_bytes = image.stat().st_size
        restore_s, code, _, err = run_tool([*KCR, "restore", "-i", str(image)])
        image.unlink()
        if code != 0:
            raise BenchError(f"restore failed: {err.strip()[-300:]}")
        restored = descendants(proc.pid)
        if len(restored) != len(pids):
            raise BenchError(f"{len(restored)} processes restored, not {len(pids)}")
        return {"frozen_ms": frozen, "image_mib": image_bytes / MiB, "restore_s": restore_s,
                "source_mib": source_bytes / MiB, "restored_mib": pss_bytes(restored) / MiB}
    finally:
        end_tree(pids)                       # the restored pool, adopted here under the same pids


def measure(binary: Path, mib: int, workers: int, reps: int, tmp: Path) -> dict[str, Any]:
    one(binary, mib, workers, tmp)           # warm-up, untimed
    runs = [one(binary, mib, workers, tmp) for _ in range(reps)]
    return {"processes": 1 + workers, "mib": mib, **{k: statistics.median(r[k] for r in runs) for k in runs[0]}}


def render(pool: dict[str, Any], anchor: dict[str, Any]) -> str:
    keys = [("frozen_ms", "frozen ms", "{:.1f}"), ("image_mib", "image MiB", "{:.1f}"),
            ("restore_s", "restore s", "{:.2f}"), ("source_mib", "held before, MiB", "{:.1f}"),
            ("restored_mib", "held restored, MiB", "{:.1f}")]
    rows = [["", *[k[1] for k in keys]]]
    for name, r in ((f"pool: 1 + {pool['processes'] - 1} sharing {pool['mib']} MiB", pool),
                    (f"anchor: 1 holding {anchor['mib']} MiB", anchor)):
        rows.append([name, *[fmt.format(r[k]) for k, _, fmt in keys]])
    rows.append(["ratio", *[f"{pool[k] / anchor[k]:.2f}x" if anchor[k] else "-" for k, _, _ in keys]])
    return table(rows)


def bench(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    reps = args.reps or (1 if args.quick else 3)
    mib = args.mib or (64 if args.quick else 256)
    workers = args.workers if args.workers is not None else (3 if args.quick else 7)
    machine = machine_info(memory=True)
    log(f"machine: {machine_summary(machine)}; load average {os.getloadavg()[0]:.2f} at the start")
    become_subreaper()
    with tempfile.TemporaryDirectory(prefix="kcr-bench-cow-") as tmpdir:
        tmp = Path(tmpdir)
        binary = tmp / "bench_cow"
        compile_c(WORKLOAD, binary)
        log(f"pool of 1 + {workers} sharing {mib} MiB ...")
        pool = measure(binary, mib, workers, reps, tmp)
        log("anchor ...")
        anchor = measure(binary, mib, 0, reps, tmp)
    print()
    print(f"memory a fork shares copy-on-write, checkpointed to /dev/shm and restored; median of {reps}")
    print("warm-up: each case ran once untimed first; held: the processes' Pss summed (a shared page once)")
    print(render(pool, anchor))
    print(f"(the aim: image and memory 1x the anchor's; once per process, they were {1 + workers}x)")
    print(f"(total {time.monotonic() - t_start:.0f} s)")
    if args.json:
        write_json(args.json, {"benchmark": "cow", "machine": machine, "reps": reps, "quick": args.quick,
                               "pool": pool, "anchor": anchor,
                               "ratios": {k: pool[k] / anchor[k] for k in anchor if k not in ("processes", "mib")
                                          and anchor[k]},
                               "elapsed_s": time.monotonic() - t_start})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="64 MiB and 3 workers, 1 repetition (under a minute)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--mib", type=int, help="memory the pool shares, MiB (default 256; 64 with --quick)")
    p.add_argument("--workers", type=int, help="workers forked (default 7; 3 with --quick)")
    p.add_argument("--reps", type=int, help="timed repetitions (default 3; 1 with --quick)")
    args = p.parse_args(argv)
    if (args.mib is not None and args.mib < 1) or (args.workers is not None and args.workers < 0) or \
            (args.reps is not None and args.reps < 1):
        p.error("--mib and --reps must be at least 1, --workers not negative")
    stop_on_signals(signal.SIGTERM, signal.SIGHUP)
    return guarded("benchmarks/cow.py", lambda: bench(args), errors=(BenchError,))


if __name__ == "__main__":
    sys.exit(main())
