"""Signals sent to a job while it is frozen for a move, after its state was read, reach the
moved process (``agent.signals``): one sent before the point of no return is delivered on
the destination as it starts to run, one sent between that and the source's end is
forwarded after. `kill` and `sigqueue` alike (with its value); with or without a stand-in.
A SIGKILL in that window abandons the move: nothing runs anywhere.

The migrations run through the library API on localhost (under a new pid), so that the test
can send the signals at a precise phase.
"""
from __future__ import annotations

import ctypes
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from migrate import Migration, MigrationError, MigrationOptions, PhaseChanged
from tests._migration import proc_state, running_copies, wait_gone
from tests._workloads import Workload, become_subreaper

SI_USER, SI_QUEUE = 0, -1
RT = signal.SIGRTMIN + 1


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    become_subreaper()


def sigqueue(pid: int, sig: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.sigqueue(pid, sig, ctypes.c_void_p(value)) != 0:
        raise OSError(ctypes.get_errno(), "sigqueue")


def wait_lines(w: Workload, n: int, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = w.output().splitlines()
        if len(lines) >= n or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


@pytest.mark.parametrize("stand_in", [False, True], ids=["killed", "stand-in"])
async def test_signals_sent_while_frozen_reach_the_moved_process(tmp_path: Path, stand_in: bool) -> None:
    w = Workload("late_signals", tmp_path, "16")
    w.start()
    w.wait_ready()
    sent: dict[str, str] = {}

    def on_event(ev: Any) -> None:
        if not isinstance(ev, PhaseChanged):
            return
        if ev.phase == "restore":           # state read and sent: the process is frozen
            sent["restore"] = proc_state(w.pid) or "gone"
            os.kill(w.pid, signal.SIGUSR1)
            sigqueue(w.pid, RT, 42)
        elif ev.phase == "commit":          # the copy runs; the source is not ended yet
            sent["commit"] = proc_state(w.pid) or "gone"
            os.kill(w.pid, signal.SIGUSR2)
            sigqueue(w.pid, RT, 7)

    opts = MigrationOptions(new_pid=True, stand_in=stand_in)
    m = Migration(w.pid, "localhost", "localhost", opts, on_event=on_event)
    report = await m.run()
    assert report.state == "done", report.message
    assert sent == {"restore": "t", "commit": "t"}, "the signals must land while the source is frozen"
    assert len(report.late_signals) == 4, report.late_signals
    lines = wait_lines(w, 4)
    os.kill(report.new_pid, signal.SIGTERM)
    assert sorted(lines) == sorted([f"sig {signal.SIGUSR1} code {SI_USER} value 0",
                                    f"sig {RT} code {SI_QUEUE} value 42",
                                    f"sig {signal.SIGUSR2} code {SI_USER} value 0",
                                    f"sig {RT} code {SI_QUEUE} value 7"]), lines
    # the queued real-time signals keep their order
    assert [ln for ln in lines if ln.startswith(f"sig {RT}")] == [f"sig {RT} code {SI_QUEUE} value 42",
                                                                  f"sig {RT} code {SI_QUEUE} value 7"]
    wait_gone(report.new_pid)
    code = w.reap_original()
    if stand_in:
        assert code == 0, "the stand-in ends as the moved process did"
    assert w.verdict() == "PASS"
    assert w.output().splitlines() == lines, "no signal was handled twice"


async def test_sigkill_while_frozen_abandons_the_move(tmp_path: Path) -> None:
    w = Workload("late_signals", tmp_path, "16")
    w.start()
    w.wait_ready()

    def on_event(ev: Any) -> None:
        if isinstance(ev, PhaseChanged) and ev.phase == "restore":
            os.kill(w.pid, signal.SIGKILL)

    m = Migration(w.pid, "localhost", "localhost", MigrationOptions(new_pid=True), on_event=on_event)
    with pytest.raises(MigrationError, match="killed"):
        await m.run()
    assert m.report.state == "rolled-back"
    assert w.reap_original() == -signal.SIGKILL
    assert running_copies(str(w.dir)) == [], "the copy on the destination must be gone too"
