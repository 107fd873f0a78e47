"""Helpers for the dirty-tracking tests: tracker fixtures, the writer's log, an in-memory sink."""
from __future__ import annotations

import array
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent.layout_plan import applied, same_backing
from agent.tracer import Tracer
from migrate.target import TracedTarget
from precopy.intervals import merge_spans, pages_of, subtract_spans
from precopy.layout import PageFinder, holds_private_data, read_maps, trackable
from precopy.hugepages import anon_huge_bytes, thp_setting
from precopy.tracker import BACKENDS, probe_backends
from tests._workloads import STARTED, Workload, build
from transport.pages import PageBatch
from transport.schema import PAGE_SIZE, Mappings, MappingsDelta

HUGE = 2 << 20


def backend_params() -> list[object]:
    """One pytest param per backend, skipped (with the probe's reason) where the kernel lacks it."""
    probes = probe_backends()
    return [pytest.param(name, marks=pytest.mark.skipif(not probes[name].available,
                                                        reason=f"{name}: {probes[name].reason}"))
            for name in BACKENDS]


class DirtyBench:
    """The dirty_bench workload: MIB MiB of populated private memory (huge-page backed with
    ``thp``, as far as the kernel gives huge pages) that writes pages on command."""

    def __init__(self, outdir: Path, mib: int, *, thp: bool = False) -> None:
        t0 = time.monotonic()
        outdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([str(build("dirty_bench")), str(outdir), str(mib), *(["thp"] if thp else [])],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        STARTED.append(self.proc)       # type: ignore[arg-type]   # ended with the test whatever happens
        assert self.proc.stdout is not None
        words = self.proc.stdout.readline().split()
        if not words or words[0] != "ready":
            raise RuntimeError("dirty_bench did not start")
        self.pid = self.proc.pid
        self.addr = int(words[1], 16)
        self.npages = int(words[2])
        self.span = (self.addr, self.addr + self.npages * PAGE_SIZE)
        self.touch_s = time.monotonic() - t0
        self.seed = 1

    def dirty(self, permille: float) -> int:
        """Write one byte into ``permille`` per mille of the pages (distinct, at random); how many."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.seed += 1
        self.proc.stdin.write(f"dirty {int(permille * 1000)} {self.seed}\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline().split()[1])

    def huge_bytes(self) -> int:
        """Bytes of its memory that transparent huge pages back now (smaps AnonHugePages)."""
        start, end = self.span
        return sum(n for (s, e), n in anon_huge_bytes(self.pid).items() if s < end and e > start)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


def require_huge_pages(bench: DirtyBench) -> None:
    """Skip unless transparent huge pages back (most of) ``bench``'s memory."""
    setting = thp_setting()
    backed = bench.huge_bytes()
    if backed * 2 < bench.npages * PAGE_SIZE:
        bench.close()
        pytest.skip(f"transparent huge pages unavailable (THP setting '{setting}', "
                    f"{backed >> 10} kB of {bench.npages * PAGE_SIZE >> 10} kB huge-page backed after MADV_HUGEPAGE)")


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


def stop_process(pid: int, timeout: float = 5.0, *, signal_to_stop: int = signal.SIGSTOP) -> None:
    """SIGSTOP (or ``signal_to_stop``, which a dirty_writer answers with a SIGSTOP of its own
    once its log is whole) and wait until the kernel shows it stopped."""
    os.kill(pid, signal_to_stop)
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

    async def layout(self, mappings: Mappings | MappingsDelta) -> None:
        before = self.layouts[-1].vmas if self.layouts else ()
        if isinstance(mappings, MappingsDelta):
            assert self.layouts, "a layout change before any layout"
            mappings = Mappings(tuple(applied(before, mappings)))
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
