"""Helpers for live-migration tests: run the CLI, read its report, watch migrated workloads."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from tests._workloads import KCR_MIGRATE, kcr


# The test hosts share this machine's pid namespace (and localhost is one host): the source
# holds its pid until the end, so migrations here run under a new pid unless a test says not.
NEW_PID = ("--new-pid",)


def migrate_cli(source: str, dest: str, *args: str, timeout: float = 180,
                keep_pid: bool = False) -> tuple[int, dict[str, Any], str]:
    """Run `kcr-migrate SOURCE DEST --json [--new-pid] ...`; (exit status, report, stderr)."""
    extra = () if keep_pid else NEW_PID
    res = subprocess.run([*KCR_MIGRATE, source, dest, "--json", *extra, *args], capture_output=True,
                         timeout=timeout)
    out = res.stdout.decode().strip()
    report = json.loads(out.splitlines()[-1]) if out else {}
    return res.returncode, report, res.stderr.decode()


def wait_gone(pid: int, timeout: float = 30) -> None:
    """Wait until ``pid`` has exited (reaping it if it is ours, e.g. adopted as subreaper)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got, _ = os.waitpid(pid, os.WNOHANG)
            if got == pid:
                return
        except ChildProcessError:
            pass
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} is still there after {timeout} s")


def proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def running_copies(marker: str) -> list[int]:
    """Pids of live (not zombie, not stopped) processes whose command line contains ``marker``
    (a workload's own directory: a restored copy keeps its command line)."""
    return copies(marker, ("Z", "X", "T", "t"))


def copies(marker: str, not_in: tuple[str, ...] = ("Z", "X")) -> list[int]:
    """Pids of processes whose command line contains ``marker``, in no state of ``not_in``
    (by default: every process not yet dead, a stopped half-restored copy included)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state = stat[stat.rindex(")") + 2]
        if marker in cmdline and state not in not_in:
            pids.append(int(entry))
    return sorted(pids)


def moved(proc: subprocess.Popen[bytes], how: str, tmp_path: Path, *options: str, state: bool = False) -> int:
    """Move ``proc`` by checkpoint and restore, or live (localhost to localhost), with
    ``options``; its original is killed and reaped. Returns the pid it runs under now.
    ``state``: ``proc`` waits (for the test) until it has been moved, and its whole state
    after the move must be what it was before (``tests._state``)."""
    from tests._state import assert_same_state, snapshot
    before = snapshot(proc.pid) if state else None
    pid = _moved(proc, how, tmp_path, *options)
    if before is not None:
        assert_same_state(before, snapshot(pid))
    return pid


def _moved(proc: subprocess.Popen[bytes], how: str, tmp_path: Path, *options: str) -> int:
    if how == "checkpoint":
        image = tmp_path / "moved.img"
        res = kcr("checkpoint", str(proc.pid), "-o", str(image), *options)
        assert res.returncode == 0, res.stderr.decode()
        assert proc.wait(timeout=30) == -9
        res = kcr("restore", "-i", str(image))
        assert res.returncode == 0, res.stderr.decode()
        pid = int(res.stdout.split()[-1])
        assert pid == proc.pid                 # its own pid
        return pid
    code, report, err = migrate_cli(f"{proc.pid}@localhost", "localhost", *options)
    assert code == 0, err
    assert proc.wait(timeout=30) == -9
    return int(report["new_pid"])
