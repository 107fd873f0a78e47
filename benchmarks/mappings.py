#!/usr/bin/env python3
"""Cost per mapping: checkpoint, restore and live migration of a process with N small mappings.

    python3 benchmarks/mappings.py [--quick] [--json FILE] [--counts N,N,...] [--hot N] [--churn N]
                                   [--reps N] [--no-warmup]

One job (tests/workloads/many_maps.c, compiled here with gcc -O2 into a temporary directory)
makes N mappings of 2 pages each, side by side and alternately read-write and read-only (so
the kernel cannot merge them), every page written; then, every millisecond, it writes a word
into the first --hot (8) of them; with --churn C, every 10 ms C others are unmapped and
mapped again, reprotected or emptied (the layout changes all the time; 0 by default: only the
hot ones change). N is 100, 1000, 10000, 30000 and 50000
(100, 1000 and 10000 with --quick). For each N, one after another on this machine:

  checkpoint   `kcr-migrate checkpoint PID -o IMAGE --leave-running` (image in /dev/shm):
               the frozen time it reports (``frozen_time_ms``) and its wall time
  restore      `kcr-migrate restore -i IMAGE --new-pid --json`: ``restore_time_ms``
  live         `kcr-migrate PID@localhost localhost --new-pid --json`: the downtime it
               reports (first thread stopped to the copy running), its final round's parts
               and the whole migration's time

Every restored or migrated copy is asked (SIGUSR1) to check every word of every mapping; a
copy that reports a bad word fails the run (exit 1). Each figure is the median of --reps runs
(1). The ratio columns divide by the same figure at the smallest N of the same run: a cost per
byte or per mapping grows with N (N=100 to N=50000 is 500x the mappings and memory), a cost
per changed mapping stays near 1.

Memory on the VMs this runs on is several times slower on first touch than afterwards and is
handed back to the host once freed. Unless --no-warmup is given, a /dev/shm buffer of twice the
largest job's memory is filled and freed first, and again (the job's size) before each N; the
output says so.

The run is a child subreaper, so restored copies are reaped here; at exit, also on Ctrl-C or
SIGTERM, every process it started or adopted is killed and its files are removed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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
    KCR, MIB, BenchError, become_subreaper, compile_c, fill_and_free, guarded, machine_info, machine_summary,
    run_tool, stop_on_signals, table, write_json)

WORKLOAD_SRC = REPO / "tests" / "workloads" / "many_maps.c"
PAGES_PER_MAPPING = 2
PAGE = 4096
COUNTS = (100, 1000, 10000, 30000, 50000)
QUICK_COUNTS = (100, 1000, 10000)
READY_TIMEOUT = 120.0
VERIFY_TIMEOUT = 300.0


def log(msg: str) -> None:
    print(msg, flush=True)


class Session:
    """The temporary directories and every process started or adopted; ``close`` ends them."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="kcr-bench-maps-"))
        self.shm = Path(tempfile.mkdtemp(prefix="kcr-bench-maps-", dir="/dev/shm"))
        self.children: list[subprocess.Popen[bytes]] = []
        self.pids: set[int] = set()

    def end(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        self.pids.discard(pid)

    def close(self) -> None:
        for p in self.children:
            if p.poll() is None:
                p.kill()
            p.wait()
        for pid in list(self.pids):
            self.end(pid)
        shutil.rmtree(self.shm, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def run_checked(argv: list[str]) -> tuple[float, str]:
    wall, status, out, err = run_tool(argv)
    if status != 0:
        raise BenchError(f"`{' '.join(argv)}` failed (exit {status}): {err.strip()[-2000:]}")
    return wall, out


def start_job(session: Session, binary: Path, n: int, hot: int, churn: int) -> tuple[subprocess.Popen[bytes], Path]:
    wdir = session.tmp / f"job-{n}-{len(session.children)}"
    wdir.mkdir()
    with open(wdir / "stderr", "wb") as err:
        proc = subprocess.Popen([str(binary), str(wdir), str(n), str(hot), str(churn), "0"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, close_fds=True)
    session.children.append(proc)
    deadline = time.monotonic() + READY_TIMEOUT
    while not (wdir / "ready").exists():
        if proc.poll() is not None:
            raise BenchError(f"the job with {n} mappings exited ({proc.returncode}): "
                             f"{(wdir / 'stderr').read_text().strip()}")
        if time.monotonic() > deadline:
            raise BenchError(f"the job with {n} mappings was not ready after {READY_TIMEOUT:.0f} s")
        time.sleep(0.01)
    return proc, wdir


def mappings_of(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for _ in f)


def verify(wdir: Path, pid: int, what: str) -> None:
    """Ask the copy ``pid`` to check its memory; fail unless it says every word is right."""
    result = wdir / f"verify.{pid}"
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + VERIFY_TIMEOUT
    while not result.exists():
        if time.monotonic() > deadline:
            raise BenchError(f"the {what} copy {pid} did not check its memory within {VERIFY_TIMEOUT:.0f} s")
        time.sleep(0.005)
    text = result.read_text().strip()
    if not text.startswith("ok"):
        raise BenchError(f"the {what} copy {pid} came back wrong: {text}")


def warm(session: Session, mib: int, enabled: bool) -> None:
    if enabled:
        fill_and_free(session.shm / "warm", mib)


def measure(session: Session, binary: Path, n: int, hot: int, churn: int, warmup: bool) -> dict[str, Any]:
    """One run of the three operations for ``n`` mappings."""
    mib = max(1, n * PAGES_PER_MAPPING * PAGE // MIB)
    out: dict[str, Any] = {"n": n}
    proc, wdir = start_job(session, binary, n, hot, churn)
    try:
        out["maps_lines"] = mappings_of(proc.pid)
        image = session.shm / "image"
        stats_file = session.tmp / "stats.json"
        warm(session, 2 * mib, warmup)
        wall, _ = run_checked([*KCR, "checkpoint", str(proc.pid), "-o", str(image), "--leave-running",
                               "--stats-json", str(stats_file)])
        stats = json.loads(stats_file.read_text())
        out["checkpoint"] = {"wall_s": wall, "frozen_ms": stats["frozen_time_ms"], "total_ms": stats["total_time_ms"],
                             "vmas": stats["vmas"], "image_bytes": image.stat().st_size}
        warm(session, 2 * mib, warmup)
        wall, text = run_checked([*KCR, "restore", "-i", str(image), "--json", "--new-pid"])
        image.unlink()
        result = json.loads(text.strip().splitlines()[-1])
        copy = int(result["pid"])
        session.pids.add(copy)
        try:
            verify(wdir, copy, "restored")
        finally:
            session.end(copy)
        out["restore"] = {"wall_s": wall, "restore_ms": result["restore_time_ms"]}
        warm(session, 2 * mib, warmup)
        wall, status, text, err = run_tool([*KCR, f"{proc.pid}@localhost", "localhost", "--new-pid", "--json"])
        report = json.loads(text.strip().splitlines()[-1]) if text.strip() else {}
        if status != 0 or report.get("state") != "done":
            raise BenchError(f"live migration of {n} mappings failed (exit {status}): {err.strip()[-2000:]}")
        copy = int(report["new_pid"])
        session.pids.add(copy)
        proc.wait()
        try:
            verify(wdir, copy, "migrated")
        finally:
            session.end(copy)
        final = report.get("final_round", {})
        out["live"] = {"wall_s": wall, "downtime_ms": report["downtime_ms"], "total_ms": report["total_ms"],
                       "rounds": report["rounds"], "stop_reason": report["stop_reason"],
                       "final": {k: final.get(k) for k in ("freeze_ms", "pages_ms", "scan_ms", "send_ms",
                                                            "state_wait_ms", "state_send_ms", "pages_written",
                                                            "layout_changes", "round_ms") if k in final},
                       "phase_ms": report.get("phase_ms", {})}
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return out


METRICS = (("checkpoint frozen", ("checkpoint", "frozen_ms")), ("restore", ("restore", "restore_ms")),
           ("live downtime", ("live", "downtime_ms")), ("live total", ("live", "total_ms")))


def value(run: dict[str, Any], path: tuple[str, str]) -> float:
    return float(run[path[0]][path[1]])


def summarize(runs: dict[int, list[dict[str, Any]]]) -> dict[int, dict[str, float]]:
    return {n: {name: statistics.median(value(r, path) for r in rs) for name, path in METRICS}
            for n, rs in runs.items()}


def render(summary: dict[int, dict[str, float]], runs: dict[int, list[dict[str, Any]]]) -> str:
    counts = sorted(summary)
    base = summary[counts[0]]
    head = ["mappings", "maps lines"]
    for name, _ in METRICS:
        head += [f"{name} ms", "x"]
    rows = [head]
    for n in counts:
        row = [str(n), str(runs[n][0]["maps_lines"])]
        for name, _ in METRICS:
            v = summary[n][name]
            row += [f"{v:.1f}", f"{v / base[name]:.1f}" if base[name] > 0 else "-"]
        rows.append(row)
    parts = [["mappings", "freeze ms", "last pages ms", "state wait ms", "state send ms", "layout changes"]]
    for n in counts:
        f = runs[n][0]["live"]["final"]
        parts.append([str(n)] + [f"{float(f.get(k) or 0):.1f}" for k in ("freeze_ms", "pages_ms", "state_wait_ms",
                                                                           "state_send_ms")]
                     + [str(f.get("layout_changes", "-"))])
    return (table(rows) + f"\n(x: against {counts[0]} mappings in this run)\n\nwhere the live downtime went "
            "at the source (first run of each):\n" + table(parts))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"counts {','.join(map(str, QUICK_COUNTS))}")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    ap.add_argument("--counts", help="mapping counts, comma-separated (default: %s)" % ",".join(map(str, COUNTS)))
    ap.add_argument("--hot", type=int, default=8, help="mappings the job keeps writing (default 8)")
    ap.add_argument("--churn", type=int, default=0, help="mappings changed every 10 ms (default 0)")
    ap.add_argument("--reps", type=int, default=1, help="runs per count (median; default 1)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the memory warm-up")
    args = ap.parse_args()
    try:
        counts = [int(c) for c in args.counts.split(",")] if args.counts else list(QUICK_COUNTS if args.quick
                                                                                   else COUNTS)
    except ValueError:
        raise BenchError(f"--counts {args.counts!r}: give numbers like 100,1000") from None
    if not counts or min(counts) < 2 * args.hot + 2 or args.hot < 0 or args.churn < 0 or args.reps < 1:
        raise BenchError("--counts must each be more than twice --hot, --hot and --churn >= 0 and --reps >= 1")
    limit = int(Path("/proc/sys/vm/max_map_count").read_text())
    if max(counts) + 200 > limit:
        raise BenchError(f"vm.max_map_count is {limit}: a job of {max(counts)} mappings needs more "
                         f"(sysctl vm.max_map_count={max(counts) + 1000})")
    stop_on_signals(signal.SIGTERM)
    become_subreaper()
    machine = machine_info(memory=True)
    log(f"machine: {machine_summary(machine)}")
    session = Session()
    try:
        binary = session.tmp / "many_maps"
        compile_c(WORKLOAD_SRC, binary)
        warmup = not args.no_warmup
        if warmup:
            peak = 2 * max(counts) * PAGES_PER_MAPPING * PAGE // MIB + 64
            log(f"memory warm-up: filled and freed {peak} MiB of /dev/shm first, and twice the job's size "
                "before each operation")
            warm(session, peak, True)
        runs: dict[int, list[dict[str, Any]]] = {}
        for rep in range(args.reps):
            for n in counts:
                t0 = time.perf_counter()
                run = measure(session, binary, n, args.hot, args.churn, warmup)
                runs.setdefault(n, []).append(run)
                log(f"  {n} mappings (run {rep + 1}): checkpoint frozen {run['checkpoint']['frozen_ms']:.1f} ms, "
                    f"restore {run['restore']['restore_ms']:.1f} ms, live downtime {run['live']['downtime_ms']:.1f} "
                    f"ms, total {run['live']['total_ms']:.0f} ms ({time.perf_counter() - t0:.1f} s)")
        summary = summarize(runs)
        log("")
        log(f"{args.hot} of N mappings ({PAGES_PER_MAPPING} pages each) written every ms, {args.churn} changed every "
            f"10 ms; median of {args.reps}:")
        log(render(summary, runs))
        if args.json:
            write_json(args.json, {"machine": machine, "hot": args.hot, "churn": args.churn,
                                   "pages_per_mapping": PAGES_PER_MAPPING,
                                   "reps": args.reps, "warmup": warmup,
                                   "summary": {str(n): s for n, s in summary.items()},
                                   "runs": {str(n): rs for n, rs in runs.items()}})
    finally:
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(guarded("benchmarks/mappings.py", main))
