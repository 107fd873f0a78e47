"""The writable working set of a live process, measured without migrating it (`kcr-migrate wss`,
and the agent's ``measure`` for the rebalancer).

A dirty tracker follows the process; every interval it reports how many distinct pages were
written, the dirty rate, the distinct pages written since measuring began, and what a
migration would do at a given bandwidth (``precopy.policy.estimate``: the pre-copy policy
replayed on a model of the process). The process is left exactly as it was: uffd-wp holds it
for two injected system calls at the start, soft-dirty for an instant per interval, checksum
never; ending the measurement (or this process dying) removes every trace of tracking.

Soft-dirty reports a written transparent huge page whole; its answers are narrowed to the
pages whose contents changed since they were last seen (``precopy.hugepages``), so the meter
reads the pages it is told of in huge pages, as a migration would send them.
"""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import field
from typing import Callable, Iterator

from agent.tracer import Tracer
from agent.target import TracedTarget
from precopy.intervals import Run, clip, merge_spans, npages, union
from precopy.layout import trackable
from precopy.policy import Estimate, PrecopyPolicy, estimate
from precopy.tracker import DirtyTracker, Scan, TrackerChoice, check_target, choose_tracker, make_tracker
from transport.frozen import frozen
from transport.schema import PAGE_SIZE

MiB = 1 << 20
GIGABIT = 125_000_000.0        # bytes per second


@frozen
class WssOptions:
    interval_s: float = 1.0
    count: int = 0                          # intervals to measure; 0: until interrupted
    tracker: str = "auto"
    bandwidth_bytes_s: float = GIGABIT      # for the downtime estimate
    # the modelled migration's policy (``migrate.wss.WssOptions`` defaults to a migration's own)
    policy: PrecopyPolicy = field(default_factory=PrecopyPolicy)

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError("the interval must be > 0 seconds")
        if self.count < 0:
            raise ValueError("the count must be >= 0")
        if self.bandwidth_bytes_s <= 0:
            raise ValueError("the bandwidth must be > 0")


@frozen
class WssSample:
    interval: int               # 1, 2, ...
    interval_s: float           # measured: from one scan to the next
    pages_dirty: int            # distinct pages written in the interval
    dirty_rate_mib_s: float
    wss_pages: int              # distinct pages written since measuring began (still mapped)
    memory_pages: int           # populated private pages when measuring began
    pages_scanned: int
    scan_ms: float
    tracker_bytes_read: int     # page bytes the tracker read to find them (checksum: all)
    layout_changes: int
    estimate: Estimate
    tracker: str

    def as_dict(self) -> dict[str, object]:
        return {
            "interval": self.interval, "interval_s": round(self.interval_s, 6), "pages_dirty": self.pages_dirty,
            "dirty_mib": self.pages_dirty * PAGE_SIZE / MiB, "dirty_rate_mib_s": round(self.dirty_rate_mib_s, 3),
            "wss_pages": self.wss_pages, "wss_mib": self.wss_pages * PAGE_SIZE / MiB,
            "memory_pages": self.memory_pages, "pages_scanned": self.pages_scanned, "scan_ms": round(self.scan_ms, 3),
            "tracker_bytes_read": self.tracker_bytes_read, "layout_changes": self.layout_changes,
            "est_rounds": self.estimate.rounds, "est_stop_reason": str(self.estimate.stop_reason),
            "est_downtime_ms": round(self.estimate.downtime_ms, 3), "tracker": self.tracker,
        }


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back while the process is held or injected into; deliver
    the first afterwards, to whatever handled it before (Ctrl-C: KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda sig, frame: caught.append(sig))
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        signal.raise_signal(caught[0])


class WssMeter:
    """``with WssMeter(pid, options) as meter: for sample in meter.samples(): ...``"""

    def __init__(self, pid: int, options: WssOptions | None = None, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.pid = pid
        self.options = options or WssOptions()
        self._sleep = sleep
        check_target(pid)
        self.choice: TrackerChoice = choose_tracker(self.options.tracker, pid)   # probes: nothing frozen yet
        self._tracer: Tracer | None = None
        self._tracker: DirtyTracker | None = None

    def __enter__(self) -> "WssMeter":
        self._tracer = Tracer(name="kcr-wss-tracer")
        try:
            self._tracker = make_tracker(self.choice.name, self.pid, TracedTarget(self.pid, self._tracer))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop tracking: the process is left as it was."""
        try:
            if self._tracker is not None:
                with deferred_interrupts():
                    self._tracker.stop()
        finally:
            self._tracker = None
            if self._tracer is not None:
                self._tracer.close()
                self._tracer = None

    def _seen(self, scan: Scan) -> None:
        """Remember the contents of the pages ``scan`` reports in huge pages, as a migration
        sending them would: the next scan then tells which of them changed."""
        tracker = self._tracker
        assert tracker is not None
        huge = tracker.huge_backed()
        if huge:
            try:
                for batch in tracker.reader.batches(clip(scan.data, huge)):
                    tracker.note_sent(batch)
            except OSError as exc:
                raise tracker.explain(exc) from None

    def samples(self) -> Iterator[WssSample]:
        tracker = self._tracker
        if tracker is None:
            raise RuntimeError("use WssMeter as a context manager")
        opts = self.options
        with deferred_interrupts():
            first = tracker.start()
        self._seen(first)
        memory = npages(first.data)
        written: list[Run] = []
        previous = first
        n = 0
        while opts.count == 0 or n < opts.count:
            n += 1
            self._sleep(max(0.0, first.started + n * opts.interval_s - time.monotonic()))
            with deferred_interrupts():
                scan = tracker.collect()
            self._seen(scan)
            spans = merge_spans((e.start, e.end) for e in scan.layout if trackable(e))
            written = clip(union(union(written, scan.data), scan.zero), spans)
            elapsed = scan.started - previous.started
            rate = scan.pages_dirty * PAGE_SIZE / elapsed if elapsed > 0 else 0.0
            est = estimate(opts.policy, memory_bytes=max(memory, npages(written)) * PAGE_SIZE,
                           dirty_rate_bytes_s=rate, bandwidth_bytes_s=opts.bandwidth_bytes_s,
                           wss_bytes=npages(written) * PAGE_SIZE)
            yield WssSample(n, elapsed, scan.pages_dirty, rate / MiB, npages(written), memory, scan.pages_scanned,
                            scan.scan_ms, scan.bytes_read, sum(scan.change.counts().values()), est, tracker.name)
            previous = scan


def measure_wss(pid: int, options: WssOptions | None = None) -> Iterator[WssSample]:
    """The samples of one measurement; tracking ends when the iterator is exhausted or closed."""
    with WssMeter(pid, options) as meter:
        yield from meter.samples()
