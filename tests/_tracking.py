"""Helpers for the dirty-tracking tests: tracker fixtures, the writer's log, an in-memory sink."""
from __future__ import annotations

import array
import os
import signal
import time
from pathlib import Path

import pytest

from agent.layout_plan import same_backing
from agent.tracer import Tracer
from migrate.target import TracedTarget
from precopy.intervals import merge_spans, pages_of, subtract_spans
from precopy.layout import PageFinder, holds_private_data, read_maps, trackable
from precopy.tracker import BACKENDS, probe_backends
from tests._workloads import Workload
from transport.pages import PageBatch
from transport.schema import PAGE_SIZE, Mappings

HUGE = 2 << 20


def backend_params() -> list[object]:
    """One pytest param per backend, skipped (with the probe's reason) where the kernel lacks it."""
    probes = probe_backends()
    return [pytest.param(name, marks=pytest.mark.skipif(not probes[name].available,
                                                        reason=f"{name}: {probes[name].reason}"))
            for name in BACKENDS]


def control_for(pid: int, tracer: Tracer) -> TracedTarget:
    return TracedTarget(pid, tracer)


class WriterLog:
    """dirty_writer's layout and log of written page numbers."""

    def __init__(self, w: Workload) -> None:
        self.w = w
        fields = dict((line.split()[0], (int(line.split()[1], 16), int(line.split()[2])))
                      for line in (w.dir / "layout").read_text().splitlines())
        self.region, self.npages = fields["region"]
        self.thp, self.thp_pages = fields["thp"]

    def length(self) -> int:
        return (self.w.dir / "log").stat().st_size // 4

    def entries(self, start: int = 0, end: int | None = None) -> list[int]:
        data = array.array("I")
        data.frombytes((self.w.dir / "log").read_bytes())
        return list(data[start:end])

    def addr(self, idx: int) -> int:
        if idx < self.npages:
            return self.region + idx * PAGE_SIZE
        return self.thp + (idx - self.npages) * PAGE_SIZE

    def watched(self, addr: int) -> bool:
        return (self.region <= addr < self.region + self.npages * PAGE_SIZE
                or (self.thp_pages > 0 and self.thp <= addr < self.thp + self.thp_pages * PAGE_SIZE))

    def in_thp(self, addr: int) -> bool:
        return self.thp_pages > 0 and self.thp <= addr < self.thp + self.thp_pages * PAGE_SIZE


def stop_process(pid: int, timeout: float = 5.0) -> None:
    """SIGSTOP and wait until the kernel shows it stopped."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.002)
    raise AssertionError(f"process {pid} did not stop")


def kill_workload(w: Workload) -> None:
    if w.proc is not None and w.proc.poll() is None:
        w.proc.kill()
    if w.proc is not None:
        w.proc.wait(timeout=10)
        w.proc = None


def uffd_traces(pid: int) -> tuple[int, list[str]]:
    """(mappings whose VmFlags show uffd-wp, fds that are userfaultfds) of a process."""
    with open(f"/proc/{pid}/smaps") as f:
        uw = sum(1 for line in f if line.startswith("VmFlags:") and " uw" in line)
    fds = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if "userfaultfd" in target:
            fds.append(name)
    return uw, fds


class MemorySink:
    """A destination in a dict: page address -> bytes, applying each layout as ``PageSink`` says:
    pages no longer in a private mapping are dropped, and a range mapped with another backing
    than before starts out empty."""

    def __init__(self, delay_s: float = 0.0, bandwidth_bytes_s: float | None = None) -> None:
        self.pages: dict[int, bytes] = {}
        self.layouts: list[Mappings] = []
        self.batches = 0
        self.delay_s = delay_s                      # per batch
        self.bandwidth_bytes_s = bandwidth_bytes_s  # a simulated link (None: instant)

    async def layout(self, mappings: Mappings) -> None:
        before = self.layouts[-1].vmas if self.layouts else ()
        self.layouts.append(mappings)
        keep = [(v.start, v.end) for v in mappings.vmas if holds_private_data(v)]
        fresh: list[tuple[int, int]] = []
        for v in mappings.vmas:
            same = merge_spans((max(o.start, v.start), min(o.end, v.end)) for o in before
                               if o.start < v.end and o.end > v.start and same_backing(o, v))
            fresh += subtract_spans([(v.start, v.end)], same)
        self.pages = {a: d for a, d in self.pages.items()
                      if any(s <= a < e for s, e in keep) and not any(s <= a < e for s, e in fresh)}

    async def send_batch(self, batch: PageBatch) -> int:
        import trio

        self.batches += 1
        for addr, data in batch.pages():
            for i in range(len(data) // PAGE_SIZE):
                self.pages[addr + i * PAGE_SIZE] = bytes(data[i * PAGE_SIZE: (i + 1) * PAGE_SIZE])
        delay = self.delay_s
        if self.bandwidth_bytes_s:
            delay += len(batch.data) / self.bandwidth_bytes_s
        if delay:
            await trio.sleep(delay)
        return len(batch.data)


def compare_with_process(sink: MemorySink, pid: int) -> list[str]:
    """Differences between the sink's pages and the (stopped, untracked) process's memory.

    Every populated private page must have been sent with its current contents, and every page
    the sink holds inside a private mapping must equal what the process reads there now (an
    emptied page reads as zeros, or as the file's page in a file mapping)."""
    problems: list[str] = []
    entries = [e for e in read_maps(pid) if trackable(e)]
    spans = [(e.start, e.end, e.name or "anon") for e in entries]
    with PageFinder(pid) as finder:
        populated = {a for e in entries for a in pages_of(finder.populated_entry(e))}
    mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for a in sorted(populated | set(sink.pages)):
            where = next((name for s, e, name in spans if s <= a < e), None)
            if where is None:
                continue             # not a private mapping any more: the destination drops it
            now = os.pread(mem, PAGE_SIZE, a)
            if a not in sink.pages:
                problems.append(f"page {a:#x} ({where}) populated but never sent")
            elif sink.pages[a] != now:
                problems.append(f"page {a:#x} ({where}) differs from the process")
    finally:
        os.close(mem)
    return problems


def workload(name: str, base: Path, *args: str) -> Workload:
    w = Workload(name, base, *args)
    w.start()
    w.wait_ready()
    return w
