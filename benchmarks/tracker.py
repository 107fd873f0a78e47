#!/usr/bin/env python3
"""Dirty tracking speed: what one tracking round costs each backend, against raw anchors.

    python3 benchmarks/tracker.py [--quick] [--json FILE] [--mib N] [--reps N] [--permille N]

One workload (tests/workloads/dirty_bench.c) holds N MiB (1024, also with --quick) of
populated private memory and, on command, writes one byte into a given share of its pages
(1% by default), chosen at random. For each backend the kernel supports:

  start         arming the tracker (uffd-wp: injected userfaultfd, register, write-protect;
                checksum: read and hash everything) = round 0's scan
  idle scan     one collect() with nothing written since the last
  dirty scan    one collect() after 1% of the pages were written: the tracking scan itself
  read          reading the pages that scan found (PageReader: process_vm_readv), in GiB/s
  bytes read    page bytes the scan read plus the dirty pages read, as a share of memory

Anchors, measured in the same run on the same process: a raw read of all its memory with
process_vm_readv (what one full round costs) and one PAGEMAP_SCAN over it (walking the page
tables without protecting anything). Ratios divide medians by those anchors.

Memory on the VMs this runs on is several times slower on first touch than afterwards: the
workload touches every page before anything is timed, and every measurement is run once
untimed first (warm-up); the output says so. --quick takes 2 repetitions instead of 5 and
runs in well under a minute.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))      # this checkout's engine, whatever else is installed

from agent.tracer import Tracer  # noqa: E402
from benchmarks._common import write_json  # noqa: E402
from migrate.target import TracedTarget  # noqa: E402
from precopy.intervals import npages  # noqa: E402
from precopy.layout import PageFinder, read_maps, trackable  # noqa: E402
from precopy.reader import PageReader  # noqa: E402
from precopy.tracker import BACKENDS, Scan, make_tracker, probe_backends  # noqa: E402
from tests._workloads import build  # noqa: E402
from transport.schema import PAGE_SIZE  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20


class Bench:
    """The dirty_bench process: dirties pages on command."""

    def __init__(self, mib: int, outdir: Path) -> None:
        t0 = time.monotonic()
        self.proc = subprocess.Popen([str(build("dirty_bench")), str(outdir), str(mib)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        words = self.proc.stdout.readline().split()
        if not words or words[0] != "ready":
            raise SystemExit("dirty_bench did not start")
        self.pid = self.proc.pid
        self.addr = int(words[1], 16)
        self.npages = int(words[2])
        self.touch_s = time.monotonic() - t0
        self.seed = 1

    def dirty(self, permille: float) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.seed += 1
        self.proc.stdin.write(f"dirty {int(permille * 1000)} {self.seed}\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline().split()[1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


def timed(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    """Median seconds of ``reps`` timed runs after one untimed warm-up; the last result."""
    fn()
    times = []
    result = None
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def anchors(pid: int, reps: int) -> dict[str, Any]:
    entries = [e for e in read_maps(pid) if trackable(e)]
    with PageFinder(pid) as finder, PageReader(pid) as reader:
        runs = [r for e in entries for r in finder.populated_entry(e)]

        def read_all() -> int:
            total = 0
            for batch in reader.batches(runs):
                total += len(batch.data)
            return total

        def scan_all() -> int:
            return sum(len(finder.populated_entry(e)) for e in entries)

        read_s, nbytes = timed(read_all, reps)
        scan_s, _ = timed(scan_all, reps)
    return {"populated_pages": npages(runs), "full_read_ms": read_s * 1000, "full_read_gib_s": nbytes / GiB / read_s,
            "pagemap_scan_ms": scan_s * 1000}


def bench_backend(name: str, bench: Bench, reps: int, permille: float, tracer: Tracer) -> dict[str, Any]:
    memory = bench.npages * PAGE_SIZE
    out: dict[str, Any] = {"backend": name}
    t0 = time.perf_counter()
    tracker = make_tracker(name, bench.pid, TracedTarget(bench.pid, tracer))
    try:
        first = tracker.start()
        out["start_ms"] = (time.perf_counter() - t0) * 1000
        out["round0_pages"] = first.pages_dirty
        tracker.collect()                                  # warm-up
        idle = []
        for _ in range(reps):
            idle.append(tracker.collect())
        out["idle_scan_ms"] = statistics.median(s.scan_ms for s in idle)
        out["idle_pages_found"] = max(s.pages_dirty for s in idle)
        scans: list[Scan] = []
        reads: list[float] = []
        read_bytes: list[int] = []
        written = 0
        for i in range(reps + 1):                          # the first one is the warm-up
            written = bench.dirty(permille)
            scan = tracker.collect()
            before = tracker.reader.bytes_read
            t1 = time.perf_counter()
            batches = list(tracker.reader.batches(scan.data))
            t2 = time.perf_counter()
            for batch in batches:
                tracker.note_sent(batch)                   # as the round loop does (checksum: hashes)
            if i:
                reads.append(t2 - t1)
                read_bytes.append(tracker.reader.bytes_read - before)
                scans.append(scan)
        scan_ms = statistics.median(s.scan_ms for s in scans)
        read_s = statistics.median(reads)
        pages_read = statistics.median(read_bytes)
        out.update({
            "pages_written": written, "dirty_scan_ms": scan_ms,
            "pages_found": int(statistics.median(s.pages_dirty for s in scans)),
            "scan_bytes_read": int(statistics.median(s.bytes_read for s in scans)),
            "dirty_read_bytes": int(pages_read), "dirty_read_ms": read_s * 1000,
            "dirty_read_gib_s": pages_read / GiB / read_s if read_s > 0 else 0.0,
        })
        out["bytes_read_share"] = (out["scan_bytes_read"] + out["dirty_read_bytes"]) / memory
        out["missed"] = max(0, written - out["pages_found"])
    finally:
        tracker.stop()
    return out


def table(result: dict[str, Any]) -> str:
    a = result["anchors"]
    lines = [
        f"tracker benchmark: {result['mib']} MiB process ({a['populated_pages']} pages populated), "
        f"{result['permille']:g}\u2030 of its pages written before each dirty scan, median of {result['reps']}",
        f"warm-up: the workload touched every page first ({result['touch_s']:.1f} s: memory here is slow on first "
        f"touch), and each measurement ran once untimed before the timed runs",
        f"anchors: process_vm_readv of all memory {a['full_read_ms']:.1f} ms ({a['full_read_gib_s']:.2f} GiB/s); "
        f"PAGEMAP_SCAN of all memory {a['pagemap_scan_ms']:.2f} ms",
        "",
        f"{'backend':<11} {'start ms':>9} {'idle scan ms':>12} {'dirty scan ms':>13} {'vs full read':>12} "
        f"{'vs pagemap':>10} {'found/written':>14} {'read MiB':>9} {'% of mem':>8} {'read GiB/s':>10} "
        f"{'vs readv':>8}",
    ]
    for r in result["backends"]:
        if "unavailable" in r:
            lines.append(f"{r['backend']:<11} unavailable: {r['unavailable']}")
            continue
        read_mib = (r["scan_bytes_read"] + r["dirty_read_bytes"]) / MiB
        lines.append(
            f"{r['backend']:<11} {r['start_ms']:>9.1f} {r['idle_scan_ms']:>12.2f} {r['dirty_scan_ms']:>13.2f} "
            f"{r['dirty_scan_ms'] / a['full_read_ms']:>11.3f}x {r['dirty_scan_ms'] / a['pagemap_scan_ms']:>9.2f}x "
            f"{r['pages_found']:>7}/{r['pages_written']:<6} {read_mib:>9.1f} {100 * r['bytes_read_share']:>7.2f}% "
            f"{r['dirty_read_gib_s']:>10.2f} {r['dirty_read_gib_s'] / a['full_read_gib_s']:>7.2f}x")
    lines.append("")
    lines.append("dirty scan: one collect() after the writes; read: reading the pages it found (random single pages, "
                 "so slower than one bulk read); % of mem: scan reads + page reads")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 repetitions (well under a minute)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--mib", type=int, default=1024, help="workload size in MiB (default 1024)")
    p.add_argument("--reps", type=int, help="timed repetitions (default 5; 2 with --quick)")
    p.add_argument("--permille", type=float, default=10.0, help="share of pages written per round, in \u2030 "
                   "(default 10 = 1%%)")
    args = p.parse_args(argv)
    reps = args.reps or (2 if args.quick else 5)
    probes = probe_backends()
    with tempfile.TemporaryDirectory(prefix="kcr-bench-") as tmp:
        bench = Bench(args.mib, Path(tmp))
        try:
            result: dict[str, Any] = {"mib": args.mib, "reps": reps, "permille": args.permille,
                                      "touch_s": bench.touch_s, "kernel": platform.release(),
                                      "anchors": anchors(bench.pid, reps), "backends": []}
            with Tracer(name="bench-tracer") as tracer:
                for name in BACKENDS:
                    if not probes[name].available:
                        result["backends"].append({"backend": name, "unavailable": probes[name].reason})
                        continue
                    result["backends"].append(bench_backend(name, bench, reps, args.permille, tracer))
        finally:
            bench.close()
    print(table(result))
    if args.json:
        write_json(args.json, result)
    bad = [r["backend"] for r in result["backends"] if r.get("missed")]
    if bad:
        print(f"error: {', '.join(bad)} found fewer pages than were written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
