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
  thp rows      the same, on a process whose memory transparent huge pages back: pages
                reported against pages written, and the bytes a round would send against
                the same backend on small pages (soft-dirty marks whole huge pages; its
                answers are narrowed to the changed pages, which costs reads and hashes)

Anchors, measured in the same run on the same process: a raw read of all its memory with
process_vm_readv (what one full round costs) and one PAGEMAP_SCAN over it (walking the page
tables without protecting anything; a /proc/PID/pagemap read on kernels without it). Ratios divide medians by those anchors.

Memory on the VMs this runs on is several times slower on first touch than afterwards: the
workload touches every page before anything is timed, and every measurement is run once
untimed first (warm-up); the output says so. --quick takes 2 repetitions instead of 5 and
runs in well under a minute.
"""
from __future__ import annotations

import argparse
import platform
import statistics
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
from precopy.hugepages import thp_setting  # noqa: E402
from precopy.intervals import clip  # noqa: E402
from precopy.layout import PageFinder, read_maps, trackable  # noqa: E402
from precopy.pagemap import pagemap_scan_works  # noqa: E402
from precopy.reader import PageReader  # noqa: E402
from precopy.tracker import BACKENDS, Scan, make_tracker, probe_backends  # noqa: E402
from tests._tracking import DirtyBench  # noqa: E402
from transport.schema import PAGE_SIZE  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20


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
    with PageFinder(pid) as finder, PageReader(pid) as reader:     # PAGEMAP_SCAN where the kernel has it
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


def bench_backend(name: str, bench: DirtyBench, reps: int, permille: float, tracer: Tracer,
                  thp: bool = False) -> dict[str, Any]:
    memory = bench.npages * PAGE_SIZE
    out: dict[str, Any] = {"backend": name, "thp": thp}
    t0 = time.perf_counter()
    tracker = make_tracker(name, bench.pid, TracedTarget(bench.pid, tracer))
    try:
        first = tracker.start()
        out["start_ms"] = (time.perf_counter() - t0) * 1000
        out["round0_pages"] = first.pages_dirty
        for batch in tracker.reader.batches(first.data):   # round 0 is sent (narrowing keeps digests)
            tracker.note_sent(batch)
        if thp:
            out["huge_mib_before"] = bench.huge_bytes() / MiB
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
        out["pages_found_in_memory"] = int(statistics.median(npages(clip(s.data, [bench.span])) for s in scans))
        out["send_bytes"] = out["pages_found"] * PAGE_SIZE      # what the round would send
        out["bytes_read_share"] = (out["scan_bytes_read"] + out["dirty_read_bytes"]) / memory
        out["missed"] = max(0, written - out["pages_found_in_memory"])
        if thp:
            out["huge_mib_after"] = bench.huge_bytes() / MiB
    finally:
        tracker.stop()
    return out


def table(result: dict[str, Any]) -> str:
    a = result["anchors"]
    walk = "PAGEMAP_SCAN" if result["pagemap_scan"] else "/proc/PID/pagemap read (no PAGEMAP_SCAN here)"
    lines = [
        f"tracker benchmark: {result['mib']} MiB process ({a['populated_pages']} pages populated), "
        f"{result['permille']:g}\u2030 of its pages written before each dirty scan, median of {result['reps']}",
        f"warm-up: the workload touched every page first ({result['touch_s']:.1f} s: memory here is slow on first "
        f"touch), and each measurement ran once untimed before the timed runs",
        f"anchors: process_vm_readv of all memory {a['full_read_ms']:.1f} ms ({a['full_read_gib_s']:.2f} GiB/s); "
        f"{walk} of all memory {a['pagemap_scan_ms']:.2f} ms",
        f"thp rows: the same process with its memory on transparent huge pages (MADV_HUGEPAGE; system setting "
        f"'{result['thp_setting']}'), {result.get('thp_huge_mib', 0):.0f} MiB huge-page backed before tracking",
        "",
        f"{'backend':<15} {'start ms':>9} {'idle scan ms':>12} {'dirty scan ms':>13} {'vs full read':>12} "
        f"{'vs pagemap':>10} {'found/written':>14} {'send MiB':>8} {'vs 4K':>6} {'read MiB':>9} {'% of mem':>8} "
        f"{'read GiB/s':>10} {'vs readv':>8}",
    ]
    small = {r["backend"]: r for r in result["backends"] if not r.get("thp") and "unavailable" not in r}
    for r in result["backends"]:
        label = r["backend"] + (" thp" if r.get("thp") else "")
        if "unavailable" in r:
            lines.append(f"{label:<15} unavailable: {r['unavailable']}")
            continue
        read_mib = (r["scan_bytes_read"] + r["dirty_read_bytes"]) / MiB
        base = small.get(r["backend"])
        vs = f"{r['send_bytes'] / base['send_bytes']:>5.2f}x" if r.get("thp") and base and base["send_bytes"] else ""
        lines.append(
            f"{label:<15} {r['start_ms']:>9.1f} {r['idle_scan_ms']:>12.2f} {r['dirty_scan_ms']:>13.2f} "
            f"{r['dirty_scan_ms'] / a['full_read_ms']:>11.3f}x {r['dirty_scan_ms'] / a['pagemap_scan_ms']:>9.2f}x "
            f"{r['pages_found_in_memory']:>7}/{r['pages_written']:<6} {r['send_bytes'] / MiB:>8.2f} {vs:>6} "
            f"{read_mib:>9.1f} {100 * r['bytes_read_share']:>7.2f}% "
            f"{r['dirty_read_gib_s']:>10.2f} {r['dirty_read_gib_s'] / a['full_read_gib_s']:>7.2f}x")
    lines.append("")
    lines.append("dirty scan: one collect() after the writes; found/written: pages of the workload's memory reported; "
                 "send MiB: what the round would send; vs 4K: that against the same backend on small pages; read: "
                 "reading the pages it found (random single pages, so slower than one bulk read); % of mem: scan "
                 "reads + page reads")
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
    if args.mib < 4 or args.mib % 2:
        print("error: --mib must be an even number of MiB, at least 4", file=sys.stderr)
        return 2
    reps = args.reps or (2 if args.quick else 5)
    probes = probe_backends()
    available = [name for name in BACKENDS if probes[name].available]
    with tempfile.TemporaryDirectory(prefix="kcr-bench-") as tmp, Tracer(name="bench-tracer") as tracer:
        bench = DirtyBench(Path(tmp) / "small", args.mib)
        try:
            result: dict[str, Any] = {"mib": args.mib, "reps": reps, "permille": args.permille,
                                      "touch_s": bench.touch_s, "kernel": platform.release(),
                                      "pagemap_scan": pagemap_scan_works(), "thp_setting": thp_setting(),
                                      "anchors": anchors(bench.pid, reps), "backends": []}
            for name in BACKENDS:
                if name not in available:
                    result["backends"].append({"backend": name, "unavailable": probes[name].reason})
                    continue
                result["backends"].append(bench_backend(name, bench, reps, args.permille, tracer))
        finally:
            bench.close()
        # Each backend on a fresh huge-page process: a tracker may split huge pages it tracks.
        for name in available:
            huge = DirtyBench(Path(tmp) / f"thp-{name}", args.mib, thp=True)
            try:
                backed = huge.huge_bytes()
                result["thp_huge_mib"] = backed / MiB
                if backed * 2 < huge.npages * PAGE_SIZE:
                    result["backends"].append({"backend": name, "thp": True, "unavailable": (
                        f"no transparent huge pages (THP setting '{thp_setting()}', {backed // MiB} MiB backed)")})
                    continue
                result["backends"].append(bench_backend(name, huge, reps, args.permille, tracer, thp=True))
            finally:
                huge.close()
    print(table(result))
    if args.json:
        write_json(args.json, result)
    bad = [r["backend"] + (" thp" if r.get("thp") else "") for r in result["backends"] if r.get("missed")]
    if bad:
        print(f"error: {', '.join(bad)} found fewer pages than were written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
