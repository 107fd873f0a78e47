"""Real-time priority for a short freeze's steps (agent/urgency.py), on this process's own
threads (tests/test_migrate.py checks that a live move takes it on both sides)."""
from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from agent.urgency import PRIORITY, Urgency, allowed


def policy(tid: int) -> tuple[int, int]:
    return os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority


def fifo_allowed() -> None:
    if not allowed():
        pytest.skip("this process may not use SCHED_FIFO here (no CAP_SYS_NICE, or no real-time budget)")


class Parked:
    """A thread of this process waiting to be told to end; its tid."""

    def __init__(self) -> None:
        self.done = threading.Event()
        started = threading.Event()
        self.tid = 0

        def run() -> None:
            self.tid = threading.get_native_id()
            started.set()
            self.done.wait()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        started.wait()

    def end(self) -> None:
        self.done.set()
        self.thread.join()


@pytest.fixture
def parked() -> Iterator[list[Parked]]:
    threads: list[Parked] = []
    yield threads
    for t in threads:
        t.end()


def test_a_stretch_raises_every_thread_and_gives_each_its_own_back(parked: list[Parked]) -> None:
    fifo_allowed()
    me = threading.get_native_id()
    plain, niced, rt = Parked(), Parked(), Parked()
    parked += [plain, niced, rt]
    os.setpriority(os.PRIO_PROCESS, niced.tid, 7)
    os.sched_setscheduler(rt.tid, os.SCHED_RR, os.sched_param(3))
    stretch = Urgency()
    assert stretch.begin()
    try:
        for tid in (me, plain.tid, niced.tid):
            assert policy(tid) == (os.SCHED_FIFO, PRIORITY)
        assert policy(rt.tid) == (os.SCHED_RR, 3), "a real-time thread is left as it was"
        born = Parked()          # started inside: it takes SCHED_FIFO from its creator
        parked.append(born)
        assert policy(born.tid) == (os.SCHED_FIFO, PRIORITY)
    finally:
        stretch.end()
    for tid in (me, plain.tid, niced.tid, born.tid):
        assert policy(tid) == (os.SCHED_OTHER, 0)
    assert os.getpriority(os.PRIO_PROCESS, niced.tid) == 7, "its nice value is kept"
    assert policy(rt.tid) == (os.SCHED_RR, 3)


def test_overlapping_stretches_restore_once_the_last_ends() -> None:
    fifo_allowed()
    me = threading.get_native_id()
    first, second = Urgency(), Urgency()
    first.begin()
    second.begin()
    first.end()
    first.end()                  # twice: nothing more
    assert policy(me) == (os.SCHED_FIFO, PRIORITY)
    second.end()
    assert policy(me) == (os.SCHED_OTHER, 0)


def test_this_thread_alone(parked: list[Parked]) -> None:
    fifo_allowed()
    other = Parked()
    parked.append(other)
    stretch = Urgency(this_thread=True)
    assert stretch.begin()
    try:
        assert policy(threading.get_native_id()) == (os.SCHED_FIFO, PRIORITY)
        assert policy(other.tid) == (os.SCHED_OTHER, 0)
    finally:
        stretch.end()
    assert policy(threading.get_native_id()) == (os.SCHED_OTHER, 0)
