"""The ``testbed`` fixture: test hosts hostA, hostB, hostC (namespaces with sshd) for the session.

hostA and hostB share this machine's pids; hostC has a pid namespace of its own, as a separate
machine would (a process can keep its pid when it moves there).

It uses its own state dir, name prefix, bridge and subnet, so it never collides with a testbed a
human brought up with ``examples/testbed.py up`` (``/run/kcr-testbed``, ``kcr-``, 10.77.213.0/24).
A lock file serializes concurrent test sessions on this machine (they would share these hosts).
Leftovers of an interrupted session are torn down before the hosts come up; teardown runs in a
``finally`` (SIGTERM is turned into KeyboardInterrupt so it gets there) and, failing that, at
interpreter exit; ``down`` is idempotent.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Iterator

import pytest

from examples.testbed import Testbed, TestbedError, TestbedUnavailable, check_available
from tests._workloads import STARTED

TEST_STATE_DIR = Path(os.environ.get("KCR_TESTBED_TEST_DIR", "/run/kcr-testbed-test"))
TEST_PREFIX = "kcrt-"
TEST_BRIDGE = "kcrt-br0"
TEST_SUBNET = "10.77.214.0/24"
TEST_HOSTS = ("hostA", "hostB", "hostC")
TEST_OWN_PIDS = ("hostC",)
LOCK_PATH = Path("/run/lock/kcr-testbed-test.lock")
LOCK_WAIT = 600.0


def make_test_testbed() -> Testbed:
    """The session's testbed (not yet up)."""
    return Testbed(TEST_STATE_DIR, hosts=TEST_HOSTS, prefix=TEST_PREFIX, bridge=TEST_BRIDGE,
                   subnet=TEST_SUBNET, own_pids=TEST_OWN_PIDS)


@contextlib.contextmanager
def exclusive_use(lock_path: Path = LOCK_PATH, wait: float = LOCK_WAIT) -> Iterator[None]:
    """Hold the test hosts' lock, so two test sessions never tear down each other's hosts.

    flock is released by the kernel when the holder dies, however it dies.
    """
    with open(lock_path, "a", encoding="utf-8") as lock:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TestbedError(f"another test session has held {lock_path} for "
                                       f"{wait:g} s") from None
                time.sleep(0.2)
        yield  # closing the file releases the lock


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM stop the session like Ctrl-C does, so fixture teardown still runs."""
    previous = signal.getsignal(signal.SIGTERM)
    install = previous is signal.SIG_DFL and threading.current_thread() is threading.main_thread()
    if install:
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        if install and signal.getsignal(signal.SIGTERM) is _raise_interrupt:
            signal.signal(signal.SIGTERM, previous)


def _down_quietly(bed: Testbed) -> None:
    try:
        bed.down()
    except TestbedError as exc:
        print(f"testbed teardown: {exc}")


@contextlib.contextmanager
def torn_down_at_exit(bed: Testbed) -> Iterator[None]:
    """Tear ``bed`` down on leaving, and at interpreter exit should leaving never happen."""
    atexit.register(_down_quietly, bed)
    try:
        yield
    finally:
        try:
            bed.down()
        finally:
            atexit.unregister(_down_quietly)


@pytest.fixture(scope="session")
def testbed() -> Iterator[Testbed]:
    """hostA, hostB and hostC, up for the whole session; skipped where this machine cannot host
    them."""
    try:
        check_available()
    except TestbedUnavailable as exc:
        pytest.skip(f"test hosts unavailable: {exc}")
    bed = make_test_testbed()
    with exclusive_use(), sigterm_as_interrupt(), torn_down_at_exit(bed):
        bed.down()  # whatever an interrupted session left behind
        bed.up()
        yield bed


# --- workloads inside the test hosts ------------------------------------------------------

def start_in(bed: Testbed, host: str, argv: list[str], outdir: Path, hold: bool = False, **env: str) -> int:
    """Start a workload inside ``host``; its pid once it is ready (ended after the test).

    On a host with its own pids that is nsenter's pid, outside the host: see ``Testbed.popen``.
    ``hold``: the workload waits before its verdict until ``verdict(outdir)`` asks for it (a job
    a test moves must not end before it was moved, however busy the machine).
    """
    outdir.mkdir(parents=True, exist_ok=True)
    if hold:
        env["WORKLOAD_HOLD"] = str(outdir / "go-on")
    with open(outdir / "stderr", "wb") as err:
        proc = bed.popen(host, argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                         start_new_session=True, env={**os.environ, **env})
    STARTED.append(proc)
    deadline = time.monotonic() + 20
    while not (outdir / "ready").exists():
        assert proc.poll() is None, (outdir / "stderr").read_text()
        assert time.monotonic() < deadline, f"{' '.join(argv[:3])} never became ready"
        time.sleep(0.02)
    return proc.pid


def verdict(outdir: Path, timeout: float = 60) -> str:
    """A workload's verdict, letting it go on first if it was started with ``hold``."""
    (outdir / "go-on").touch()
    return wait_file(outdir / "verdict", timeout).strip()


def wait_file(path: Path, timeout: float = 60, empty_ok: bool = False) -> str:
    """The contents of ``path`` once it exists and (unless ``empty_ok``: a marker) has any: a
    workload's ``open(...).write(...)`` or a shell's ``echo > FILE`` makes the file before it
    writes it, and the write is one system call."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = None
        if text or (text is not None and empty_ok):
            return text
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s" if text is None else \
            f"{path.name} still empty after {timeout} s"
        time.sleep(0.05)
