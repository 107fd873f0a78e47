"""The frozen job's own work runs first: SCHED_FIFO for the few milliseconds a job is frozen.

While a job is frozen the source agent, its holder and the destination agent hand work to one
another dozens of times (a page batch to read, the state to collect, a record to apply). Traced
on a 2-CPU host (``perf record -e sched:sched_switch`` around ``benchmarks/migrate.py``), a
thread woken on a CPU that another of them kept busy (the holder collecting the state, say)
waited there 1.5-3.5 ms while the other CPU idled: the scheduler leaves a task that ran a
moment ago where it is, and an idle CPU looks for work again only at its next tick. A woken
real-time thread goes at once to a CPU that runs nothing of its class. So the steps of the
freeze (the last delta and the state, the destination's restore and GO, the holder's part) run
at SCHED_FIFO priority 1, the lowest real-time one.

Only for short steps: the freeze after a pre-copy that converged (its last delta small), never
a stop-and-copy or a pre-copy that gave up, whose frozen step moves much of the memory; a
real-time thread that ran long would starve the host's other work (the kernel's real-time
throttling leaves it 5% at worst). Where the process may not (no CAP_SYS_NICE, a cgroup with no
real-time budget), the steps run as they are."""
from __future__ import annotations

import os
import threading

PRIORITY = 1
# The last delta, at most, that a freeze takes at real-time priority (pages): 64 MiB, some tens
# of milliseconds of reading and sending.
MAX_PAGES = 16384

def short_freeze(pages_pending: int) -> bool:
    """Whether a freeze that starts with ``pages_pending`` left by pre-copy (negative: none
    ran) is short enough for real-time priority. The source and kcr-migrate (for the
    destination) decide by this one rule."""
    return 0 <= pages_pending <= MAX_PAGES


_lock = threading.Lock()
_depth = 0
_raised: dict[int, tuple[int, int]] = {}     # tid -> (policy, priority) it had before
_there: set[int] = set()                     # the threads at the outermost entry


def _tids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [threading.get_native_id()]


def allowed() -> bool:
    """Whether this process may run at SCHED_FIFO (tried on the caller's thread, given back)."""
    stretch = Urgency(this_thread=True)
    try:
        return stretch.begin()
    finally:
        stretch.end()


def _set(tid: int, policy: int, priority: int) -> bool:
    try:
        os.sched_setscheduler(tid, policy, os.sched_param(priority))
        return True
    except OSError:               # gone meanwhile, or not allowed
        return False


class Urgency:
    """A stretch at real-time priority that spans several calls (a freeze's steps, from the
    freeze to the commit): ``begin`` raises every thread of this process (``this_thread``:
    the caller's alone) to SCHED_FIFO, ``end`` puts each back as it was, and a thread started
    in between (which took it from its creator) at SCHED_OTHER; a thread real-time already
    (or SCHED_DEADLINE) is left as it is. Both may be called again, and from any thread;
    stretches overlap (the first ``begin`` raises, the last ``end`` restores)."""

    def __init__(self, this_thread: bool = False) -> None:
        self.this_thread = this_thread
        self.on = False

    def begin(self) -> bool:
        """Whether the threads run at SCHED_FIFO now (not where the process may not)."""
        global _depth
        with _lock:
            if not self.on:
                self.on = True
                _depth += 1
                if _depth == 1:
                    _raise([threading.get_native_id()] if self.this_thread else None)
            return bool(_raised)

    def end(self) -> None:
        global _depth
        with _lock:
            if self.on:
                self.on = False
                _depth -= 1
                if _depth == 0:
                    _restore()


def _raise(tids: list[int] | None) -> None:
    _there.update(_tids())
    for tid in tids if tids is not None else sorted(_there):
        try:
            before = (os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority)
        except OSError:
            continue
        if before[0] not in (os.SCHED_OTHER, os.SCHED_BATCH, os.SCHED_IDLE):
            continue              # real-time (or deadline) already: left as it is
        if not _set(tid, os.SCHED_FIFO, PRIORITY):
            break                 # not allowed here: nothing more is tried
        _raised[tid] = before


def _restore() -> None:
    if _raised:
        for tid in _tids():
            if tid not in _there:     # started in the stretch, by a thread at SCHED_FIFO
                _set(tid, os.SCHED_OTHER, 0)
        for tid, (policy, priority) in _raised.items():
            _set(tid, policy, priority)
    _raised.clear()
    _there.clear()
