"""The restore stub with real processes: a kept pid is exactly the pid asked for, a taken pid
or a missing privilege is a clear error, and the forking stub works as before."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import ptrace, stub
from agent.inject import Injector
from tests._workloads import become_subreaper

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    become_subreaper()      # stubs are not our children: as subreaper we adopt and reap them


@pytest.fixture
def stubs() -> Iterator[list[int]]:
    """Every stub a test made (append its pid) is killed and reaped when the test ends."""
    made: list[int] = []
    yield made
    for pid in made:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)      # ours as subreaper (or as tracer): no zombie is left


def free_pid() -> int:
    """A pid no process or thread has right now, well above the ones being handed out."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(pid_max - 1000, 300, -1):
        if not os.path.exists(f"/proc/{pid}"):      # /proc/TID exists for threads too
            return pid
    raise AssertionError("no free pid")


def spawn_kept(stubs: list[int]) -> int:
    """``stub.spawn`` at a free pid, tried again if another process takes it first."""
    for _ in range(5):
        pid = free_pid()
        try:
            got = stub.spawn(pid)
        except stub.PidTaken:
            continue
        stubs.append(got)
        assert got == pid
        return got
    raise AssertionError("every free pid tried was taken meanwhile")


def comm(pid: int, timeout: float = 10) -> str:
    """The stub's name once it has set it (until then it is the memfd's name)."""
    deadline = time.monotonic() + timeout
    while True:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        if name == "kcr-stub" or time.monotonic() > deadline:
            return name
        time.sleep(0.01)


def status_field(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_spawn_keeps_the_pid(stubs: list[int]) -> None:
    pid = spawn_kept(stubs)
    assert os.path.exists(f"/proc/{pid}")
    assert comm(pid) == "kcr-stub"
    assert status_field(pid, "NSpid") == str(pid)
    assert int(status_field(pid, "PPid")) == os.getpid()    # adopted: we are the subreaper


def test_kept_pid_is_not_the_callers_child(stubs: list[int]) -> None:
    """A tool process spawns the stub and exits: the stub's parent is the subreaper (us)."""
    for _ in range(5):
        pid = free_pid()
        tool = subprocess.run(
            [sys.executable, "-c",
             "import os, sys; from agent import stub\n"
             "try: print(os.getpid(), stub.spawn(int(sys.argv[1])))\n"
             "except stub.PidTaken: print(os.getpid(), 0)\n", str(pid)],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert tool.returncode == 0, tool.stderr
        tool_pid, got = map(int, tool.stdout.split())
        if got:
            break
    else:
        raise AssertionError("every free pid tried was taken meanwhile")
    stubs.append(got)
    assert got == pid
    assert comm(pid) == "kcr-stub"
    assert int(status_field(pid, "PPid")) == os.getpid() != tool_pid


def test_kept_pid_stub_takes_injected_calls_at_stub_syscall(stubs: list[int]) -> None:
    """The restorer drives every stub through ``STUB_SYSCALL``: it holds for a kept pid too."""
    assert stub.build(free_pid())[1] == stub.STUB_SYSCALL
    pid = spawn_kept(stubs)
    assert comm(pid) == "kcr-stub"          # named after setsid: it has its session
    ptrace.seize(pid, ptrace.PTRACE_O_EXITKILL)
    ptrace.interrupt(pid)
    ptrace.wait_stop(pid)
    inj = Injector(pid, stub.STUB_SYSCALL)
    assert inj.call("getpid") == pid
    assert inj.raw(124, 0) == pid            # getsid(0): the stub made its own session
    inj.close()


def test_taken_pid_raises_pid_taken() -> None:
    me = os.getpid()
    with pytest.raises(stub.PidTaken, match=rf"pid {me} is taken on this host") as info:
        stub.spawn(me)
    assert info.value.errno == errno.EEXIST
    assert info.value.pid == me
    assert isinstance(info.value, OSError)


def test_a_threads_tid_is_taken_too() -> None:
    tid: list[int] = []
    ready, done = threading.Event(), threading.Event()

    def run() -> None:
        tid.append(threading.get_native_id())
        ready.set()
        done.wait(30)

    t = threading.Thread(target=run)
    t.start()
    try:
        ready.wait(30)
        with pytest.raises(stub.PidTaken, match=rf"pid {tid[0]} is taken"):
            stub.spawn(tid[0])
    finally:
        done.set()
        t.join()


def test_pid_outside_pid_max_is_refused() -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    with pytest.raises(OSError, match=rf"cannot create pid {pid_max}") as info:
        stub.spawn(pid_max)
    assert info.value.errno == errno.EINVAL
    assert not isinstance(info.value, stub.PidTaken)
    for bad in (0, -1, 2**31):        # set_tid 0 would mean "any pid": never sent
        with pytest.raises(ValueError):
            stub.spawn(bad)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_kept_pid_without_the_privilege_says_it_needs_root() -> None:
    """Root in a new user namespace lacks CAP_CHECKPOINT_RESTORE over our pid namespace."""
    pid = free_pid()
    res = subprocess.run(
        ["unshare", "--user", "--map-root-user", sys.executable, "-c",
         "import sys; from agent import stub\n"
         "try: stub.spawn(int(sys.argv[1]))\n"
         "except OSError as e: print(type(e).__name__, e.errno, e.strerror)\n", str(pid)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    if res.returncode != 0 and "unshare" in res.stderr:
        pytest.skip(f"no user namespaces here: {res.stderr.strip()}")
    assert res.returncode == 0, res.stderr
    name, err, message = res.stdout.strip().split(" ", 2)
    assert name != "PidTaken"
    assert int(err) == errno.EPERM
    assert f"cannot create pid {pid}" in message
    assert "kept pids need root (CAP_CHECKPOINT_RESTORE" in message
    assert not os.path.exists(f"/proc/{pid}")


def test_spawn_without_pid_still_forks(stubs: list[int]) -> None:
    pid = stub.spawn()
    stubs.append(pid)
    assert pid > 0 and pid != os.getpid()
    assert comm(pid) == "kcr-stub"
    assert int(status_field(pid, "PPid")) == os.getpid()
    assert status_field(pid, "NSpid") == str(pid)


def test_clone_args_layout() -> None:
    raw = stub.clone_args(0x10000, stub.SIGCHLD, 0x1234, 1, stack=0x5000, stack_size=0x1000,
                          tls=0x7000, child_tid=0x8000, parent_tid=0x9000)
    assert len(raw) == stub.CLONE_ARGS_SIZE_VER2 == 88
    # flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid,
    # set_tid_size, cgroup
    assert struct.unpack("<11Q", raw) == (0x10000, 0, 0x8000, 0x9000, 17, 0x5000, 0x1000,
                                          0x7000, 0x1234, 1, 0)
