#!/usr/bin/env python3
"""The home stand-in (--stand-in): what it costs and what it holds.

    python3 benchmarks/standin.py [--quick] [--json FILE] [--reps N]

A parent (tests/workloads/standin_parent.c) starts a child holding N MiB (64, 256 and 1024;
--quick: 64 and 256) and waits for it; the child is moved localhost to localhost under a new
pid. For each size, in the same run:

* migration: total_ms and downtime_ms with --stand-in against the same move without it (the
  anchor; the source is then killed, as by default): making the stand-in happens after the
  process runs on the destination, so it adds to the total, never to the downtime;
* memory: the job's VmRSS before the move against the stand-in's after it, and what the
  stand-in's keeper (on the source) and deputy (on the destination) hold, both Python processes;
* signals: the time from kill(SIGUSR1) to the child's handler having written its line, sent to
  the stand-in (forwarded to the moved child) against sent to an unmoved child (the anchor), and
  the time from the child being told to exit to its parent's wait() returning, likewise.
  Median of --reps (20; 5 with --quick) signals, and of 3 exits (1 with --quick).

Needs root (ptrace, kept processes) and a C compiler.
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
sys.path.insert(0, str(REPO))

from benchmarks._common import (  # noqa: E402
    KCR, BenchError, compile_c, guarded, machine_info, machine_summary, run_tool, table, write_json,
)

WAIT_S = 60.0


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def until(what: str, check: Any, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not within {timeout:g} s")
        time.sleep(0.0002)


class Job:
    def __init__(self, bins: Path, out: Path, mib: int) -> None:
        out.mkdir(parents=True)
        self.out = out
        argv = [str(bins / "standin_parent"), str(out), str(bins / "standin_child"), str(out), str(mib)]
        with open(out / "stdout", "wb") as o, open(out / "stderr", "wb") as e:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=o, stderr=e, close_fds=True,
                                         start_new_session=True)
        until("the workload ready", lambda: (out / "ready").exists(), 120)
        until("the child's pid", lambda: (out / "child_pid").exists())
        self.child = int((out / "child_pid").read_text())
        self.moved = 0
        self.usr1 = 0

    def output(self) -> str:
        return (self.out / "output").read_text()

    def signal_ms(self, target: int) -> float:
        self.usr1 += 1
        line = f"usr1 {self.usr1}\n"
        t0 = time.perf_counter()
        os.kill(target, signal.SIGUSR1)
        until("SIGUSR1 handled", lambda: line in self.output())
        return (time.perf_counter() - t0) * 1000

    def exit_ms(self) -> float:
        t0 = time.perf_counter()
        (self.out / "finish.tmp").write_text("7\n")
        os.replace(self.out / "finish.tmp", self.out / "finish")
        until("the parent's wait()", lambda: (self.out / "parent_done").exists())
        ms = (time.perf_counter() - t0) * 1000
        if (self.out / "parent_done").read_text().strip() != "exited 7":
            raise BenchError(f"the parent saw {(self.out / 'parent_done').read_text().strip()!r}, not 'exited 7'")
        self.proc.wait()
        return ms

    def migrate(self, *extra: str) -> dict[str, Any]:
        _, code, out, err = run_tool([*KCR, f"{self.child}@localhost", "localhost", "--new-pid", "--json", *extra])
        if code != 0:
            raise BenchError(f"kcr-migrate failed: {err.strip().splitlines()[-1] if err.strip() else code}")
        report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        self.moved = int(report["new_pid"])
        return report

    def end(self) -> None:
        for pid in (self.moved, self.child):
            try:
                if pid:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def measure(bins: Path, tmp: Path, mib: int, reps: int, exits: int) -> dict[str, Any]:
    row: dict[str, Any] = {"mib": mib, "anchor": {}, "stand_in": {}}
    anchor_sig, anchor_exit, sig, ex, totals, downs, totals_a, downs_a = [], [], [], [], [], [], [], []
    mem: dict[str, int] = {}
    for i in range(exits):
        job = Job(bins, tmp / f"{mib}-anchor-{i}", mib)          # unmoved: signals and exit
        try:
            anchor_sig += [job.signal_ms(job.child) for _ in range(reps)]
            anchor_exit.append(job.exit_ms())
        finally:
            job.end()
        job = Job(bins, tmp / f"{mib}-killed-{i}", mib)          # moved without a stand-in
        try:
            report = job.migrate()
            totals_a.append(report["total_ms"])
            downs_a.append(report["downtime_ms"])
        finally:
            job.end()
        job = Job(bins, tmp / f"{mib}-standin-{i}", mib)         # moved with one
        try:
            before = rss_kb(job.child)
            report = job.migrate("--stand-in")
            totals.append(report["total_ms"])
            downs.append(report["downtime_ms"])
            s = report["stand_in"]
            mem = {"job_rss_kb": before, "stand_in_rss_kb": rss_kb(job.child),
                   "keeper_rss_kb": rss_kb(s["keeper_pid"]), "deputy_rss_kb": rss_kb(s["deputy_pid"])}
            sig += [job.signal_ms(job.child) for _ in range(reps)]
            ex.append(job.exit_ms())
        finally:
            job.end()
    med = statistics.median
    row["anchor"] = {"signal_ms": med(anchor_sig), "exit_ms": med(anchor_exit), "total_ms": med(totals_a),
                     "downtime_ms": med(downs_a)}
    row["stand_in"] = {"signal_ms": med(sig), "exit_ms": med(ex), "total_ms": med(totals), "downtime_ms": med(downs),
                       **mem}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/standin.py", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--reps", type=int)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise BenchError("needs root (ptrace and kept processes)")
    sizes = (64, 256) if args.quick else (64, 256, 1024)
    reps = args.reps or (5 if args.quick else 20)
    exits = 1 if args.quick else 3
    machine = machine_info(memory=True)
    print(f"machine: {machine_summary(machine)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kcr-bench-standin-") as d:
        tmp = Path(d)
        bins = tmp / "bin"
        bins.mkdir()
        for name in ("standin_parent", "standin_child"):
            compile_c(REPO / "tests" / "workloads" / f"{name}.c", bins / name)
        for mib in sizes:
            rows.append(measure(bins, tmp, mib, reps, exits))
    head = ["MiB", "total ms (no stand-in)", "downtime ms (no)", "signal ms (unmoved)", "exit ms (unmoved)",
            "job RSS MiB", "stand-in RSS kB", "keeper MiB", "deputy MiB"]
    lines = [head]
    for r in rows:
        a, s = r["anchor"], r["stand_in"]
        lines.append([str(r["mib"]), f"{s['total_ms']:.0f} ({a['total_ms']:.0f})",
                      f"{s['downtime_ms']:.1f} ({a['downtime_ms']:.1f})",
                      f"{s['signal_ms']:.2f} ({a['signal_ms']:.2f})", f"{s['exit_ms']:.1f} ({a['exit_ms']:.1f})",
                      f"{s['job_rss_kb'] / 1024:.0f}", str(s["stand_in_rss_kb"]), f"{s['keeper_rss_kb'] / 1024:.0f}",
                      f"{s['deputy_rss_kb'] / 1024:.0f}"])
    print(table(lines, left=(0,)))
    if args.json:
        write_json(args.json, {"benchmark": "standin", "machine": machine, "reps": reps, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(guarded("benchmarks/standin.py", main))
