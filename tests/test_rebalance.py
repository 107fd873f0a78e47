"""The executor and `kcr-migrate rebalance` on this machine alone (localhost): failed moves, the
--on-failure choice, events and the report, and --every."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import trio

from migrate import MigrationOptions, MoveDone, MoveStarted, Plan, Policy, RebalanceOptions, execute
from migrate.planner import Move, Rejected
from tests._workloads import KCR_MIGRATE


def free_pid() -> int:
    """A pid no process has (a child's, once it is reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def move(pid: int) -> Move:
    return Move(pid, "localhost", "localhost", "gone", 1 << 20, 0.5, 0.0, 10.0, 0.1, 1 << 20, 0.0, 1e8, "test")


def test_a_failed_move_goes_on_or_stops_as_chosen() -> None:
    pids = [free_pid(), free_pid()]
    rejected = (Rejected(7, "localhost", "sshd", "excluded by user=0"),)
    p = Plan(tuple(move(pid) for pid in pids), rejected, (), Policy(max_per_host=1))
    events: list[object] = []
    report = trio.run(lambda: execute(p, RebalanceOptions(MigrationOptions(new_pid=True), "continue"),
                                      on_event=events.append))
    assert [m["state"] for m in report.moves] == ["failed", "failed"]
    assert all(f"{m['pid']}" in m["message"] for m in report.moves), report.moves
    assert [type(e) for e in events[:-1]] == [MoveStarted, MoveDone, MoveStarted, MoveDone]
    assert report.rejected == [{"pid": 7, "host": "localhost", "comm": "sshd", "reason": "excluded by user=0"}]
    assert report.as_dict()["failed"] == 2 and not report.stopped

    report = trio.run(execute, p, RebalanceOptions(MigrationOptions(new_pid=True), "stop"))
    assert [m["state"] for m in report.moves] == ["failed", "not-started"]
    assert "--on-failure is stop" in report.stopped
    assert report.moves[1]["message"].startswith("not started: the move of")


def test_every_runs_again_until_interrupted(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost\n")
    proc = subprocess.Popen([*KCR_MIGRATE, "rebalance", "--hosts", str(hosts), "--dry-run", "--every", "1s",
                             "--sample", "0.2", "--include", f"pid={free_pid()}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
    try:
        # wait for two runs: each ends with a line on stderr
        seen = b""
        deadline = time.monotonic() + 120
        while seen.count(b"next run in") < 2:
            assert proc.stderr is not None and time.monotonic() < deadline
            line = proc.stderr.readline()
            assert line, f"it ended: {proc.wait()}"
            seen += line
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (seen + err).decode()
    assert b"Traceback" not in seen + err
    assert out.decode().count("no moves") >= 2
    assert err.decode().strip().splitlines()[-1].startswith("kcr-migrate: error: interrupted")
