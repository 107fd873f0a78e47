"""`kcr-migrate wss`: the writable working set of a live process, which must not notice."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from migrate.cli import rate as parse_rate
from migrate.wss import WssMeter, WssOptions
from precopy.tracker import probe_backends
from tests._tracking import kill_workload, uffd_traces, workload
from tests._workloads import Workload, build, kcr
from transport.errors import NoSuchProcess
from transport.schema import PAGE_SIZE

MiB = 1 << 20
UFFD = probe_backends()["uffd-wp"].available


def _left_alone(pid: int, maps_before: str) -> None:
    assert uffd_traces(pid) == (0, [])
    assert Path(f"/proc/{pid}/maps").read_text() == maps_before
    assert "TracerPid:\t0" in Path(f"/proc/{pid}/status").read_text()


def test_json_lines_per_interval(tmp_path: Path) -> None:
    # 4096 pages, 2000 random page writes per second: ~380 distinct pages per 0.2 s.
    w = workload("dirty_writer", tmp_path, "4096", "2000", "9")
    try:
        before = Path(f"/proc/{w.pid}/maps").read_text()
        res = kcr("wss", str(w.pid), "--interval", "0.2", "--count", "3", "--json", "--bandwidth", "1gbit")
        assert res.returncode == 0, res.stderr.decode()
        lines = res.stdout.decode().splitlines()
        assert len(lines) == 3
        rows = [json.loads(line) for line in lines]
        for i, row in enumerate(rows, 1):
            assert row["interval"] == i
            assert 0.15 < row["interval_s"] < 0.5
            assert 150 < row["pages_dirty"] < 600, row
            rate = row["pages_dirty"] * PAGE_SIZE / MiB / row["interval_s"]
            assert row["dirty_rate_mib_s"] == pytest.approx(rate, rel=0.01)
            assert row["est_downtime_ms"] >= 0 and row["est_stop_reason"]
            assert row["memory_pages"] >= 4096
        assert rows[-1]["wss_pages"] >= rows[0]["pages_dirty"]
        err = res.stderr.decode()
        expected = "uffd-wp" if UFFD else "checksum"
        assert f"tracking pid {w.pid} with {expected}: " in err and err.count("\n") == 1
        _left_alone(w.pid, before)
        assert w.proc is not None and w.proc.poll() is None
    finally:
        kill_workload(w)


def test_table_with_the_checksum_tracker(tmp_path: Path) -> None:
    w = workload("dirty_writer", tmp_path, "1024", "0", "1")      # writes nothing
    try:
        res = kcr("wss", str(w.pid), "--interval", "0.1", "--count", "2", "--tracker", "checksum")
        assert res.returncode == 0, res.stderr.decode()
        out = res.stdout.decode().splitlines()
        assert "dirty pages" in out[0] and "est. downtime" in out[0] and len(out) == 3
        # Interval 1: the program writes nothing, but the kernel may: each time the thread moves
        # to another CPU it updates the cpu id in the thread's rseq area (one page of the TCB).
        assert out[1].split()[0] == "1" and int(out[1].split()[2]) <= 1, out[1]
        assert "with checksum: requested" in res.stderr.decode()
    finally:
        kill_workload(w)


def _run_with_signals(w: Workload, count: int, *, tracker: str | None) -> int:
    """Start ``w`` (dirty_undisturbed), send it ``count`` SIGRTMIN once it is busy, optionally
    measuring it with ``tracker`` meanwhile (tracking starts while it sits in nanosleep and read).
    Returns how many signals arrived while it was tracked."""
    w.start()
    try:
        w.wait_ready()
        time.sleep(0.15)                      # main thread inside nanosleep, the other in read()
        busy = w.dir / "busy"
        sent = 0
        if tracker is not None:
            with WssMeter(w.pid, WssOptions(interval_s=0.1, count=12, tracker=tracker)) as meter:
                for _ in meter.samples():
                    for _ in range(3 if busy.exists() and sent < count else 0):
                        os.kill(w.pid, signal.SIGRTMIN)    # signals while it is tracked
                        sent += 1
        tracked = sent
        w.wait_file("busy", 10)
        while sent < count:
            os.kill(w.pid, signal.SIGRTMIN)
            sent += 1
            time.sleep(0.005)
        assert w.verdict() == "PASS", (w.dir / "stderr").read_text()
        assert w.reap_original() == 0
        return tracked
    finally:
        kill_workload(w)


@pytest.mark.parametrize("tracker", ["auto", "checksum"])
def test_a_measured_process_does_not_notice(tracker: str, tmp_path: Path) -> None:
    signals = 30
    ref = Workload("dirty_undisturbed", tmp_path / "reference", str(signals))
    _run_with_signals(ref, signals, tracker=None)
    w = Workload("dirty_undisturbed", tmp_path / "measured", str(signals))
    assert _run_with_signals(w, signals, tracker=tracker) >= 3
    assert w.output() == ref.output()
    assert "nanosleep rc 0 errno 0" in w.output() and "read rc 5 errno 0 'hello'" in w.output()
    assert f"signals {signals}" in w.output()


@pytest.mark.skipif(not UFFD, reason="uffd-wp unavailable")
def test_killing_the_tool_leaves_no_trace(tmp_path: Path) -> None:
    w = workload("dirty_writer", tmp_path, "1024", "500", "4")
    try:
        before = Path(f"/proc/{w.pid}/maps").read_text()
        cli = subprocess.Popen([sys.executable, "-m", "migrate", "wss", str(w.pid), "--interval", "0.1", "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert cli.stdout is not None
        json.loads(cli.stdout.readline())                    # tracking runs
        assert uffd_traces(w.pid)[0] > 0
        cli.kill()                                            # SIGKILL: no cleanup code runs
        cli.wait()
        cli.stdout.close()
        deadline = time.monotonic() + 5
        while uffd_traces(w.pid) != (0, []) and time.monotonic() < deadline:
            time.sleep(0.01)
        _left_alone(w.pid, before)
        assert w.proc is not None and w.proc.poll() is None
    finally:
        kill_workload(w)


def test_a_process_that_exits_while_measured_is_one_error_line(tmp_path: Path) -> None:
    w = workload("dirty_writer", tmp_path, "256", "100", "2")
    try:
        cli = subprocess.Popen([sys.executable, "-m", "migrate", "wss", str(w.pid), "--interval", "0.1",
                                "--count", "50", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert cli.stdout is not None
        assert cli.stdout.readline().startswith(b"{")     # an interval measured: tracking is on
        kill_workload(w)
        out, err = cli.communicate(timeout=30)
        assert cli.returncode == 1, err.decode()
        lines = err.decode().splitlines()
        assert lines[-1] == f"kcr-migrate: error: process {w.pid} exited while its memory was tracked"
        assert "Traceback" not in err.decode()
    finally:
        kill_workload(w)


@pytest.mark.skipif(not UFFD, reason="uffd-wp unavailable")
def test_a_pid_we_may_not_trace_is_one_error_line(tmp_path: Path) -> None:
    prog = str(build("dirty_writer"))
    code = ("import ctypes, os; ctypes.CDLL(None).ptrace(0, 0, 0, 0); "
            f"os.execv({prog!r}, [{prog!r}, {str(tmp_path)!r}, '16', '0', '1'])")
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        _, status = os.waitpid(child.pid, os.WUNTRACED)     # traced by us, stopped at exec
        assert os.WIFSTOPPED(status)
        res = kcr("wss", str(child.pid), "--count", "1")
        assert res.returncode == 1
        err = res.stderr.decode().splitlines()
        assert err[-1].startswith(f"kcr-migrate: error: may not trace pid {child.pid}"), err
        assert "Traceback" not in res.stderr.decode()
    finally:
        child.kill()
        child.wait()


def test_no_such_process() -> None:
    res = kcr("wss", "999999999", "--count", "1")
    assert res.returncode == 1
    assert res.stderr.decode().strip() == ("kcr-migrate: error: no process with pid 999999999: "
                                           "check the pid (ps -p 999999999)")
    with pytest.raises(NoSuchProcess):
        WssMeter(999999999)


def test_bandwidth_units() -> None:
    # The one rate parser (transport.units, table in test_cli): a bare number is bytes/s, as for migrate.
    assert parse_rate("117") == 117
    assert parse_rate("117M") == 117 * MiB
    assert parse_rate("1gbit") == 125_000_000
    assert parse_rate("10Gbit/s") == 1_250_000_000
    assert parse_rate("500MB") == 500e6
    assert parse_rate("2GiB") == 2 << 30
    for bad in ("fast", "0", "-1", "1parsec"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_rate(bad)
    with pytest.raises(ValueError):
        WssOptions(interval_s=0)
