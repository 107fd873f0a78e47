#!/usr/bin/env python3
"""Process trees through checkpoint and restore: what each process adds to the frozen time.

    python3 benchmarks/tree.py [--quick] [--json FILE] [--mib N] [--reps N]

A launcher and its workers (benchmarks/workloads/bench_tree.c), every process holding N MiB
(16 by default) that it keeps writing to, is checkpointed to an image on /dev/shm and
restored, for trees of 1, 4, 16 and 64 processes (--quick: 1, 4 and 16). The anchor, in the
same run: one process holding the whole tree's memory. Ratios divide the tree's frozen time
(the checkpoint's frozen_time_ms: the first process stopped to the image complete) and its
restore wall time by the anchor's. Live migration of trees is not supported yet, so this
measures checkpoint and restore.

Memory here is several times slower on first touch: every process fills its memory before
anything is timed, and each size runs once untimed first (warm-up); the output says so.
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
    KCR, BenchError, become_subreaper, compile_c, guarded, machine_info, machine_summary, run_tool, table,
    write_json,
)

WORKLOAD = REPO / "benchmarks" / "workloads" / "bench_tree.c"


def descendants(pid: int) -> list[int]:
    out, i = [pid], 0
    while i < len(out):
        p = out[i]
        for tid in os.listdir(f"/proc/{p}/task"):
            out.extend(int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split())
        i += 1
    return out


def end_tree(pids: list[int]) -> None:
    """Kill and reap a tree we adopted (as subreaper) or started."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:
                if not Path(f"/proc/{pid}").exists():
                    break
            time.sleep(0.005)


def one(binary: Path, processes: int, mib: int, tmp: Path) -> dict[str, float]:
    """Start a tree, checkpoint it, restore it, end it: the numbers of that one run."""
    work = Path(tempfile.mkdtemp(prefix="tree-", dir=tmp))
    proc = subprocess.Popen([str(binary), str(work), str(processes), str(mib)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pids = [proc.pid]
    try:
        deadline = time.monotonic() + 300
        while not (work / "ready").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the {processes}-process tree did not start")
            time.sleep(0.01)
        pids = descendants(proc.pid)
        if len(pids) != processes:
            raise BenchError(f"expected {processes} processes, found {len(pids)}")
        image = Path("/dev/shm") / f"kcr-bench-tree-{os.getpid()}.img"
        stats = work / "stats.json"
        wall, code, _, err = run_tool([*KCR, "checkpoint", str(proc.pid), "-o", str(image), "--force",
                                       "--stats-json", str(stats)])
        if code != 0:
            raise BenchError(f"checkpoint failed: {err.strip()[-300:]}")
        proc.wait()
        end_tree(pids[1:])                   # the killed children, adopted here: their pids are free again
        frozen = json.loads(stats.read_text())["frozen_time_ms"]
        restore_s, code, _, err = run_tool([*KCR, "restore", "-i", str(image)])
        image.unlink()
        if code != 0:
            raise BenchError(f"restore failed: {err.strip()[-300:]}")
        return {"frozen_ms": frozen, "checkpoint_s": wall, "restore_s": restore_s}
    finally:
        end_tree(pids)


def measure(binary: Path, processes: int, mib: int, reps: int, tmp: Path) -> dict[str, Any]:
    one(binary, processes, mib, tmp)         # warm-up, untimed
    runs = [one(binary, processes, mib, tmp) for _ in range(reps)]
    return {"processes": processes, "mib_each": mib, **{k: statistics.median(r[k] for r in runs) for k in runs[0]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="trees of 1, 4 and 16 processes, 1 repetition (under a minute)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--mib", type=int, default=16, help="memory per process in MiB (default 16)")
    p.add_argument("--reps", type=int, help="timed repetitions (default 3; 1 with --quick)")
    args = p.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    sizes = (1, 4, 16) if args.quick else (1, 4, 16, 64)
    become_subreaper()
    with tempfile.TemporaryDirectory(prefix="kcr-bench-") as tmpdir:
        tmp = Path(tmpdir)
        binary = tmp / "bench_tree"
        compile_c(WORKLOAD, binary)
        rows = []
        for n in sizes:
            tree = measure(binary, n, args.mib, reps, tmp)
            anchor = measure(binary, 1, args.mib * n, reps, tmp) if n > 1 else tree
            rows.append({"tree": tree, "anchor": anchor,
                         "frozen_ratio": tree["frozen_ms"] / anchor["frozen_ms"],
                         "restore_ratio": tree["restore_s"] / anchor["restore_s"]})
    machine = machine_info()
    print(f"process trees through checkpoint/restore (image on /dev/shm), {args.mib} MiB per process, "
          f"median of {reps}; {machine_summary(machine)}")
    print("warm-up: every process filled its memory before anything was timed, and each size ran once untimed")
    print("anchor: one process holding the whole tree's memory, measured in the same run\n")
    out = [["processes", "memory", "frozen ms", "anchor frozen ms", "ratio", "restore s", "anchor restore s",
            "ratio"]]
    for r in rows:
        t, a = r["tree"], r["anchor"]
        out.append([str(t["processes"]), f"{t['processes'] * t['mib_each']} MiB", f"{t['frozen_ms']:.1f}",
                    f"{a['frozen_ms']:.1f}", f"{r['frozen_ratio']:.2f}x", f"{t['restore_s']:.2f}",
                    f"{a['restore_s']:.2f}", f"{r['restore_ratio']:.2f}x"])
    print(table(out))
    if args.json:
        write_json(args.json, {"machine": machine, "mib_each": args.mib, "reps": reps, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(guarded("tree.py", main))
