"""migrate.target: the dirty trackers' hold on a live process (pause it, inject into it)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import pytest

from agent.tracer import Tracer
from migrate.target import TracedTarget
from tests._tracking import kill_workload, workload
from transport.errors import NoSuchProcess


@pytest.fixture
def tracer() -> Iterator[Tracer]:
    with Tracer(name="test-tracer") as t:
        yield t


def _state(pid: int, tid: int) -> str:
    return Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_paused_stops_every_thread_then_lets_go(tmp_path: Path, tracer: Tracer) -> None:
    w = workload("dirty_undisturbed", tmp_path, "0")          # two threads: nanosleep and read
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{w.pid}/task")]
        assert len(tids) == 2
        target = TracedTarget(w.pid, tracer)
        with target.paused():
            assert {_state(w.pid, t) for t in tids} == {"t"}     # tracing stop
        assert "TracerPid:\t0" in Path(f"/proc/{w.pid}/status").read_text()
        # Let go: each thread runs on (briefly R) and goes back to sleep in its syscall.
        deadline = time.monotonic() + 5
        while {_state(w.pid, t) for t in tids} != {"S"} and time.monotonic() < deadline:
            time.sleep(0.01)
        assert {_state(w.pid, t) for t in tids} == {"S"}
        with target.injected() as remote:
            assert remote.call("getpid") == w.pid
            with pytest.raises(OSError):
                remote.call("close", 9999)                     # EBADF inside the target
        assert w.verdict() == "PASS"                           # its nanosleep and read were not disturbed
    finally:
        kill_workload(w)


def test_a_missing_process_is_no_such_process(tracer: Tracer) -> None:
    with pytest.raises(NoSuchProcess):
        with TracedTarget(999999999, tracer).paused():
            pass
