"""Real programs, not written for these tests, moved mid-run: checkpoint/restore and live
migration (localhost to localhost). Each must finish with the output of an unmoved run.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import subprocess
import time
from pathlib import Path

import pytest

from tests._migration import migrate_cli, moved, proc_state
from tests._postgres import PostgresServer
from tests._workloads import (KCR_MIGRATE, STARTED, build_java, become_subreaper, kcr, node, reap,
                              start_until_ready)

WORKLOADS = Path(__file__).parent / "workloads"


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    become_subreaper()


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~4 MB of words: xz -6 takes a few seconds on it, writing output as it goes."""
    r = random.Random(7)
    words = ["".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(2, 9))) for _ in range(5000)]
    path = tmp_path_factory.mktemp("xz") / "words"
    path.write_bytes(" ".join(r.choice(words) for _ in range(600_000)).encode())
    return path


def xz(text: Path, where: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """Start xz compressing a copy of ``text`` in ``where``; returns it and its output path."""
    where.mkdir()
    shutil.copy(text, where / "words")
    proc = subprocess.Popen(["xz", "-6", "-T1", "-k", str(where / "words")], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True, cwd=where)
    STARTED.append(proc)
    return proc, where / "words.xz"


def started_writing(proc: subprocess.Popen[bytes], out: Path) -> None:
    """Wait until xz is mid-run: its output has begun."""
    deadline = time.monotonic() + 60
    while not (out.exists() and out.stat().st_size > 0):
        assert proc.poll() is None, "xz finished before it could be moved: give it more text"
        assert time.monotonic() < deadline, "xz wrote nothing in 60 s"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def compressed(text: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """What an unmoved xz makes of ``text`` (one run for the module's tests)."""
    proc, out = xz(text, tmp_path_factory.mktemp("xz-reference") / "run")
    assert proc.wait(timeout=300) == 0
    return out.read_bytes()


def finished(pid: int, timeout: float = 300) -> None:
    status = reap(pid, timeout=timeout)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the moved process ended with {status:#x}"


def moved_output(tmp_path: Path, program: str, how: str, *args: str, state: bool = False) -> str:
    """Run ``program`` (Python: argv[1] its folder, where it makes ``ready``, then waits for
    ``go`` and writes ``output``), move it (``how``; ``state``: compare its whole state), let
    it go and return what it wrote once it has ended well."""
    script = tmp_path / "program.py"
    script.write_text(program)
    proc = start_until_ready([sys.executable, "-S", str(script), str(tmp_path), *args], tmp_path / "ready",
                             start_new_session=True)
    pid = moved(proc, how, tmp_path, state=state)
    (tmp_path / "go").touch()
    finished(pid)
    return (tmp_path / "output").read_text()


@pytest.mark.skipif(shutil.which("xz") is None, reason="no xz on this machine (apt-get install xz-utils)")
@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_xz(tmp_path: Path, text: Path, compressed: bytes, how: str) -> None:
    """xz keeps a self-pipe for its signal handlers: carried, with the file being written."""
    proc, out = xz(text, tmp_path / "moved")
    started_writing(proc, out)
    finished(moved(proc, how, tmp_path))
    assert out.read_bytes() == compressed


COUNTER = r"""
import sys, time
for i in range(int(sys.argv[1])):
    print(f"line {i}", flush=True)
    time.sleep(0.01)
"""


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_output_to_a_launcher_pipe_redirected_to_a_file(tmp_path: Path, how: str) -> None:
    """A job printing to a pipe its launcher reads (here, the test): refused as it is; with
    --redirect 1=PATH its output goes on in PATH after the move, nothing lost or repeated."""
    script = tmp_path / "counter.py"
    script.write_text(COUNTER)
    proc = subprocess.Popen([sys.executable, "-u", "-S", str(script), "600"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
    STARTED.append(proc)
    assert proc.stdout is not None
    with proc.stdout:
        _move_counter(proc, tmp_path, how)


def _move_counter(proc: subprocess.Popen[bytes], tmp_path: Path, how: str) -> None:
    assert proc.stdout is not None
    before = [proc.stdout.readline() for _ in range(20)]
    assert before[-1] == b"line 19\n"
    out = tmp_path / "out.log"
    refused = kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "refused.img"))
    assert f"fd 1 is a pipe shared with pid {os.getpid()}" in refused.stderr.decode()
    pid = moved(proc, how, tmp_path, "--redirect", f"1={out}")
    rest = proc.stdout.read()       # what it wrote to the pipe before the move: to its end
    finished(pid, timeout=120)
    got = b"".join(before) + rest + out.read_bytes()
    assert got == b"".join(b"line %d\n" % i for i in range(600))


LOCKER = r"""
import fcntl, os, struct, sys, time
path, how, ready = sys.argv[1], sys.argv[2], sys.argv[3]
if how == "wlease":
    fd = os.open(path, os.O_RDONLY)
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
else:
    fd = os.open(path, os.O_RDWR)
    if how == "posix":
        fcntl.lockf(fd, fcntl.LOCK_EX)
    elif how == "flock":
        fcntl.flock(fd, fcntl.LOCK_SH)
    elif how == "xflock":
        fcntl.flock(fd, fcntl.LOCK_EX)
    else:                                   # an OFD lock: F_OFD_SETLK
        fcntl.fcntl(fd, 37, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
open(ready, "w").close()
time.sleep(120)
"""


@pytest.mark.parametrize("how, move, said", [
    ("wlease", "live", "holds a write lease of"),
    ("posix", "live", "holds a write POSIX record lock from byte 0 on of"),
    ("ofd", "live", "holds a write OFD lock from byte 0 on of"),
])
def test_a_lock_that_cannot_be_carried_is_refused_and_kept(tmp_path: Path, how: str, move: str, said: str) -> None:
    """A write lease on a file both copies see (a host to itself) would be broken by the
    destination's open; a write lock there cannot change hands without a window. Refused
    before anything is frozen, and before anything opens the file, naming the lock; it stays
    held, unbroken. (Locks and leases that can be carried are: tests/test_checkpoint.py,
    test_migrate.py, test_migrate_hosts.py and test_leases below.)"""
    data = tmp_path / "db"
    data.write_bytes(b"x" * 4096)
    script = tmp_path / "locker.py"
    script.write_text(LOCKER)
    ready = tmp_path / "ready"
    proc = start_until_ready([sys.executable, "-S", str(script), str(data), how, str(ready)], ready)
    if move == "checkpoint":
        res = kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img"))
        err = res.stderr.decode()
    else:
        _, _, err = migrate_cli(f"{proc.pid}@localhost", "localhost")
    assert "Traceback" not in err
    assert said in err.splitlines()[-1] and str(data) in err.splitlines()[-1], err
    assert proc.poll() is None
    kind = {"wlease": "LEASE  ACTIVE", "posix": "POSIX", "ofd": "OFDLCK"}[how]
    fdinfo = "".join(Path(f"/proc/{proc.pid}/fdinfo/{fd}").read_text() for fd in os.listdir(f"/proc/{proc.pid}/fd"))
    assert f" {kind} " in fdinfo              # still held (a lease: not being broken)


# A read lease (break signalled by SIGIO) and, for an image, a write lease whose break sends
# SIGUSR1 (F_SETSIG). After the move each is held again and breaks as before: another process's
# conflicting open fails at once (O_NONBLOCK) and the holder gets its signal.
LEASES = r"""
import fcntl, os, signal, sys, time
d, write = sys.argv[1], sys.argv[2] == "write"
got = []
for s in (signal.SIGIO, signal.SIGUSR1):
    signal.signal(s, lambda n, f: got.append(n))
a = os.open(os.path.join(d, "a"), os.O_RDONLY)
fcntl.fcntl(a, fcntl.F_SETLEASE, fcntl.F_RDLCK)
if write:
    b = os.open(os.path.join(d, "b"), os.O_RDONLY)
    fcntl.fcntl(b, 10, signal.SIGUSR1)                  # F_SETSIG
    fcntl.fcntl(b, fcntl.F_SETLEASE, fcntl.F_WRLCK)
open(os.path.join(d, "ready"), "w").close()
while not os.path.exists(os.path.join(d, "go")):
    time.sleep(0.01)
def breaks(path, flags, sig):
    if os.fork() == 0:
        try:
            os.open(path, flags | os.O_NONBLOCK)
            os._exit(1)
        except BlockingIOError:
            os._exit(0)
    _, status = os.wait()
    deadline = time.monotonic() + 10
    while sig not in got and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.waitstatus_to_exitcode(status) == 0 and sig in got
out = [fcntl.fcntl(a, fcntl.F_GETLEASE) == fcntl.F_RDLCK, breaks(os.path.join(d, "a"), os.O_WRONLY, signal.SIGIO)]
if write:
    out += [fcntl.fcntl(b, fcntl.F_GETLEASE) == fcntl.F_WRLCK, breaks(os.path.join(d, "b"), os.O_RDONLY, signal.SIGUSR1)]
open(os.path.join(d, "output"), "w").write(f"{out}\n")
"""


@pytest.mark.parametrize("how, write", [("checkpoint", True), ("live", False)])
def test_leases(tmp_path: Path, how: str, write: bool) -> None:
    """Held again before the process runs (live from a host to itself: a read lease, held by
    both copies until the source ends; a write lease there is refused, above)."""
    for name in ("a", "b"):
        (tmp_path / name).write_text(name)
    script = tmp_path / "leases.py"
    script.write_text(LEASES)
    proc = start_until_ready([sys.executable, "-S", str(script), str(tmp_path), "write" if write else "read"],
                             tmp_path / "ready", start_new_session=True)
    pid = moved(proc, how, tmp_path, state=True)
    (tmp_path / "go").touch()
    finished(pid)
    assert (tmp_path / "output").read_text() == ("[True, True, True, True]\n" if write else "[True, True]\n")


# A file rewritten in place while the process moves (a database's pages): from a host to
# itself both copies see the one file, so preflight must not take it for a different copy
# (its contents change between the source's look and the destination's).
REWRITER = r"""
import hashlib, os, sys, time
path, ready, out, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
hold = os.environ.get("WORKLOAD_HOLD")    # a moved run waits there, three quarters in, until moved
fd = os.open(path, os.O_RDWR)
size = os.fstat(fd).st_size
for i in range(n):
    os.pwrite(fd, i.to_bytes(8, "little"), (i * 4099) % (size - 8))
    if i == 20:
        open(ready, "w").close()
    while hold and i == n * 3 // 4 and not os.path.exists(hold):
        time.sleep(0.01)
    time.sleep(0.005)
os.lseek(fd, 0, os.SEEK_SET)
open(out, "w").write(hashlib.sha256(os.read(fd, size)).hexdigest() + "\n")
"""


def test_a_file_rewritten_in_place_moves_from_a_host_to_itself(tmp_path: Path) -> None:
    script = tmp_path / "rewriter.py"
    script.write_text(REWRITER)
    outputs = []
    for name, move in (("reference", False), ("moved", True)):
        data, ready, out = tmp_path / f"{name}.db", tmp_path / f"{name}.ready", tmp_path / f"{name}.out"
        data.write_bytes(bytes(1 << 20))
        hold = tmp_path / f"{name}.go-on"
        proc = start_until_ready([sys.executable, "-S", str(script), str(data), str(ready), str(out), "800"], ready,
                                 start_new_session=True, env={**os.environ, "WORKLOAD_HOLD": str(hold)} if move else None)
        if move:
            pid = moved(proc, "live", tmp_path)
            hold.touch()
            finished(pid)
        else:
            assert proc.wait(timeout=120) == 0
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1]


# Deleted files held open: Python's TemporaryFile (O_TMPFILE), and a file unlinked after it was
# opened twice (two descriptions of one inode, one of them dup'd) holding more than one slice.
DELETED = r"""
import hashlib, os, sys, tempfile, time
d = sys.argv[1]
t = tempfile.TemporaryFile(dir=d)
t.write(b"temporary " * 1000)
t.flush()
path = os.path.join(d, "gone.dat")
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
os.write(fd, bytes(range(256)) * 12000)
fd2 = os.open(path, os.O_RDONLY)
os.lseek(fd2, 1000, os.SEEK_SET)
fd3 = os.dup(fd)
os.utime(fd, ns=(10**9, 123456 * 10**9))      # as tar or make leave a file's times
os.unlink(path)
open(os.path.join(d, "ready"), "w").close()
while not os.path.exists(os.path.join(d, "go")):
    time.sleep(0.01)
mtime = os.fstat(fd).st_mtime_ns
t.seek(0)
first = hashlib.sha256(t.read()).hexdigest()[:16]
os.write(fd3, b"tail")
st, st2 = os.fstat(fd), os.fstat(fd2)
seen = os.read(fd2, 8).hex()
os.lseek(fd2, -4, os.SEEK_END)
last = os.read(fd2, 4)
with open(os.path.join(d, "output"), "w") as out:
    out.write(f"{first} {st.st_size} {st.st_nlink} {oct(st.st_mode & 0o777)} {st.st_ino == st2.st_ino} "
              f"{os.lseek(fd, 0, os.SEEK_CUR)} {seen} {last} {os.listdir(d)} mtime {mtime}\n")
"""


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_deleted_files_held_open(tmp_path: Path, how: str) -> None:
    script = tmp_path / "deleted.py"
    script.write_text(DELETED)
    outputs = []
    for name, move in (("reference", False), ("moved", True)):
        d = tmp_path / name
        d.mkdir()
        proc = start_until_ready([sys.executable, "-S", str(script), str(d)], d / "ready", start_new_session=True)
        pid = moved(proc, how, tmp_path, state=True) if move else proc.pid
        (d / "go").touch()
        if move:
            finished(pid)
        else:
            assert proc.wait(timeout=60) == 0
        outputs.append((d / "output").read_text())
    assert outputs[0] == outputs[1]
    assert " 3072004 0 0o640 True 3072004 e8e9eaebecedeeef b'tail' " in outputs[1], outputs[1]
    assert outputs[1].endswith(" mtime 123456000000000\n"), outputs[1]      # the file's times, kept


BIG_DELETED = r"""
import hashlib, os, sys, time
d, mib = sys.argv[1], int(sys.argv[2])
fd = os.open(os.path.join(d, "big"), os.O_RDWR | os.O_CREAT, 0o600)
for _ in range(mib):
    os.write(fd, os.urandom(1 << 20))
os.unlink(os.path.join(d, "big"))

def digest():
    os.lseek(fd, 0, os.SEEK_SET)
    h = hashlib.sha256()
    while block := os.read(fd, 1 << 20):
        h.update(block)
    return h.hexdigest()

open(os.path.join(d, "before"), "w").write(digest())
open(os.path.join(d, "ready"), "w").close()
while not os.path.exists(os.path.join(d, "go")):
    time.sleep(0.01)
open(os.path.join(d, "output"), "w").write(digest())
"""


def test_a_restore_writes_a_carried_file_as_its_slices_come(tmp_path: Path) -> None:
    """A deleted file (like a /dev/shm file or a memfd) travels whole, in slices; the restore
    writes each into the file made again as it comes, holding one slice at a time: restoring
    a job with 64 MiB of it takes no more memory than one with 1 MiB, give or take a slice
    or two (it held them all, and more: 65 MiB more). Read from stdin, the image is not mapped
    either. The file comes back the same."""
    script = tmp_path / "big.py"
    script.write_text(BIG_DELETED)
    peak: dict[int, int] = {}
    for mib in (1, 64):
        d = tmp_path / str(mib)
        d.mkdir()
        proc = start_until_ready([sys.executable, "-S", str(script), str(d), str(mib)], d / "ready",
                                 start_new_session=True)
        image = tmp_path / f"{mib}.img"
        done = kcr("checkpoint", str(proc.pid), "-o", str(image))
        assert done.returncode == 0, done.stderr.decode()
        proc.wait(timeout=60)
        with image.open("rb") as f, (d / "out").open("wb") as out, (d / "err").open("wb") as err:
            restore = subprocess.Popen([*KCR_MIGRATE, "restore", "-", "--json"], stdin=f, stdout=out, stderr=err)
        peak[mib] = _wait_with_usage(restore)      # (its own peak: wait4's, not every child's)
        assert restore.returncode == 0, (d / "err").read_text()
        pid = int(json.loads((d / "out").read_text())["pid"])
        (d / "go").touch()
        finished(pid)
        assert (d / "output").read_text() == (d / "before").read_text()
    assert peak[64] - peak[1] < 16 << 10, f"peak RSS of the restores (KiB): {peak}"


def _wait_with_usage(proc: subprocess.Popen[bytes], timeout: float = 120) -> int:
    """Wait for ``proc`` to end (its ``returncode`` set); its peak RSS in KiB."""
    deadline = time.monotonic() + timeout
    while True:
        got, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if got == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return int(usage.ru_maxrss)
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"the restore did not end within {timeout} s")
        time.sleep(0.05)


ASYNC_JOB = Path(__file__).parent / "workloads" / "asyncio_job.py"


def _run_and_move(argv: list[str], tmp_path: Path, how: str, timeout: float = 120) -> None:
    """Run ``argv`` (a program taking OUT READY GO) unmoved, then again moved by ``how`` once
    READY is there; the moved run, let go on (GO) once moved, must write the same OUT."""
    outputs = []
    for name in ("reference", "moved"):
        out, ready, go = (tmp_path / f"{name}.{part}" for part in ("out", "ready", "go"))
        if name == "reference":
            go.touch()
        proc = start_until_ready([*argv, str(out), str(ready), str(go)], ready, timeout=timeout)
        if name == "reference":
            assert proc.wait(timeout=timeout) == 0
        else:
            pid = moved(proc, how, tmp_path)
            go.touch()
            finished(pid, timeout=timeout)
        outputs.append(out.read_text())
    assert outputs[1] == outputs[0]


@pytest.mark.parametrize("move", ["checkpoint"])
def test_asyncio_program(tmp_path: Path, move: str) -> None:
    """CPython's asyncio: an epoll instance, a socketpair as its self-pipe, timers, a queue.
    Live between two hosts in tests/test_live_trees.py: asyncio takes a new pid for a fork
    ("no running event loop"), so it cannot move with --new-pid as a localhost move does."""
    _run_and_move([sys.executable, "-S", str(ASYNC_JOB)], tmp_path, move)


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_node_event_loop_with_worker_threads(tmp_path: Path, how: str) -> None:
    """Node.js: libuv's event loop (epoll, eventfds, timers, its thread pool), V8's JIT code and
    heap, and four worker threads stepping on timers, posting messages and adding into a
    SharedArrayBuffer with Atomics (tests/workloads/node_workers.js)."""
    _run_and_move([node(), str(WORKLOADS / "node_workers.js")], tmp_path, how)


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_java_thread_pool(tmp_path: Path, how: str) -> None:
    """A JVM (HotSpot): its JIT compiler, garbage collector and signal threads, its perf data
    file mapped shared from /tmp, and a thread pool whose tasks the main thread waits for
    (tests/workloads/JavaPool.java)."""
    _run_and_move(build_java("JavaPool"), tmp_path, how)


def test_an_eventfd_shared_with_a_process_that_stays_is_refused(tmp_path: Path) -> None:
    """A parent and its child share one eventfd; moving the child alone would split it."""
    script = ("import os, sys, time\nefd = os.eventfd(0)\nchild = os.fork()\nif child == 0:\n"
              "    time.sleep(60)\n    os._exit(0)\n"
              "open(sys.argv[2], 'w').write(str(child))\nopen(sys.argv[1], 'w').close()\ntime.sleep(60)\n")
    ready, child_file = tmp_path / "ready", tmp_path / "child"
    proc = start_until_ready([sys.executable, "-S", "-c", script, str(ready), str(child_file)], ready)
    child = int(child_file.read_text())
    try:
        res = kcr("checkpoint", str(child), "-o", str(tmp_path / "img"))
        line = res.stderr.decode().splitlines()[-1]
        assert res.returncode != 0 and f"is an eventfd shared with pid {proc.pid} (" in line, line
        assert Path(f"/proc/{child}").exists() and not (tmp_path / "img").exists()
    finally:
        os.kill(child, 9)


# What the timer programs share: struct sigevent, and a SIGUSR1 handler counting ticks.
TIMER_PRELUDE = """
import ctypes, os, signal, sys, time
libc = ctypes.CDLL(None, use_errno=True)
ticks = 0
def on(sig, frame):
    global ticks
    ticks += 1
signal.signal(signal.SIGUSR1, on)
class sigevent(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64), ("signo", ctypes.c_int), ("notify", ctypes.c_int),
                ("tid", ctypes.c_int), ("pad", ctypes.c_int * 11)]
"""

# Two timer_create() timers (raw system calls): one firing SIGUSR1 every 5 ms with a value
# the handler's siginfo carries, one disarmed; after the move both are there under their ids
# (timer_gettime on each), the first still periodic, the second still disarmed.
POSIX_TIMERS = TIMER_PRELUDE + """
d, n = sys.argv[1], int(sys.argv[2])
ids = []
for clock in (1, 0):
    ev = sigevent(0xABC, signal.SIGUSR1, 0, 0)
    tid = ctypes.c_int(0)
    assert libc.syscall(222, clock, ctypes.byref(ev), ctypes.byref(tid)) == 0
    ids.append(tid.value)
spec = (ctypes.c_long * 4)(0, 5_000_000, 0, 5_000_000)
assert libc.syscall(223, ids[0], 0, spec, None) == 0
while ticks < 20:
    time.sleep(0.001)
open(f"{d}/ready", "w").close()
while ticks < n:
    time.sleep(0.001)
cur = (ctypes.c_long * 4)()
ok = libc.syscall(224, ids[0], cur) == 0 and tuple(cur[:2]) == (0, 5_000_000)
ok = ok and libc.syscall(224, ids[1], cur) == 0 and tuple(cur) == (0, 0, 0, 0)
timers = open("/proc/self/timers").read()
ok = ok and sum(line.startswith("ID:") for line in timers.splitlines()) == 2
ok = ok and "signal: 10/0000000000000abc" in timers
for t in ids:             # before exiting: Python's finalization puts SIGUSR1 back to its default
    ok = ok and libc.syscall(226, t) == 0
open(f"{d}/output", "w").write(f"{ok}\\n")
"""


# 200 timers due in about 1000 s, each with its own interval and clock, and one firing every
# 4 ms: more than the freeze asks in the process's batch of calls (128), so the rest are asked
# one at a time. After the move every timer has its interval and about the time left it had,
# the firing one its period and ticks, and the list is whole.
MANY_TIMERS = TIMER_PRELUDE + """
d = sys.argv[1]
ids = []
for i in range(201):
    tid = ctypes.c_int(0)
    assert libc.syscall(222, i % 2, ctypes.byref(sigevent(i, signal.SIGUSR1, 0, 0)), ctypes.byref(tid)) == 0
    ids.append(tid.value)
    # due in 1000 s + i us, then every 1 ms + i us; the last one every 4 ms from now
    spec = (ctypes.c_long * 4)(0, 1_000_000 + 1000 * i, 1000, 1000 * i)
    if i == 200:
        spec[:] = [0, 4_000_000, 0, 4_000_000]
    assert libc.syscall(223, ids[-1], 0, spec, None) == 0
while ticks < 5:
    time.sleep(0.001)
open(f"{d}/ready", "w").close()
while not os.path.exists(f"{d}/go"):
    time.sleep(0.001)
seen = ticks
while ticks < seen + 5:
    time.sleep(0.001)
cur = (ctypes.c_long * 4)()
ok = True
for i, t in enumerate(ids[:200]):
    ok = ok and libc.syscall(224, t, cur) == 0 and tuple(cur[:2]) == (0, 1_000_000 + 1000 * i) and 900 < cur[2] < 1000
ok = ok and libc.syscall(224, ids[200], cur) == 0 and tuple(cur[:2]) == (0, 4_000_000)
ok = ok and sum(line.startswith("ID:") for line in open("/proc/self/timers").read().splitlines()) == 201
for t in ids:
    ok = ok and libc.syscall(226, t) == 0
open(f"{d}/output", "w").write(f"{ok}\\n")
"""


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_more_timers_than_one_batch_asks(tmp_path: Path, how: str) -> None:
    assert moved_output(tmp_path, MANY_TIMERS, how) == "True\n"


# An inotify instance with watch numbers after a gap (three watches added and removed first), a
# watch with IN_ONESHOT: after the move each event names its watch by the number it had, no
# IN_IGNORED left over from restoring the numbers, and the one-shot watch still fires once.
INOTIFY = """
import ctypes, os, struct, sys, time
d = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
IN_CREATE, IN_DELETE, IN_ONESHOT = 0x100, 0x200, 0x80000000
a, b = os.path.join(d, "a"), os.path.join(d, "b")
os.mkdir(a)
os.mkdir(b)
fd = libc.inotify_init1(os.O_CLOEXEC)
for _ in range(3):
    libc.inotify_rm_watch(fd, libc.inotify_add_watch(fd, a.encode(), IN_CREATE))
os.read(fd, 4096)
wa = libc.inotify_add_watch(fd, a.encode(), IN_CREATE | IN_DELETE)
wb = libc.inotify_add_watch(fd, b.encode(), IN_CREATE | IN_ONESHOT)
open(f"{d}/ready", "w").close()
while not os.path.exists(f"{d}/go"):
    time.sleep(0.01)
open(os.path.join(a, "x"), "w").close()
open(os.path.join(b, "y"), "w").close()
open(os.path.join(b, "z"), "w").close()
os.unlink(os.path.join(a, "x"))
data = os.read(fd, 4096)
events = []
while data:
    wd, mask, cookie, size = struct.unpack_from("iIII", data)
    events.append(f"{wd}:{mask:x}:{data[16:16 + size].rstrip(bytes(1)).decode()}")
    data = data[16 + size:]
watches = sum(line.startswith("inotify ") for line in open(f"/proc/self/fdinfo/{fd}"))
open(f"{d}/output", "w").write(f"{wa} {wb} {' '.join(events)} watches={watches}\\n")
"""


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_inotify(tmp_path: Path, how: str) -> None:
    assert moved_output(tmp_path, INOTIFY, how, state=True) == "4 5 4:100:x 5:100:y 5:8000: 4:200:x watches=1\n"


# A watch on a symlink itself (IN_DONT_FOLLOW, a flag no watch's mask keeps) beside one on its
# target: each still reports its own inode's events under its own number.
INOTIFY_LINK = """
import ctypes, os, struct, sys, time
d = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
IN_ATTRIB, IN_DONT_FOLLOW = 0x4, 0x2000000
target, link = os.path.join(d, "t"), os.path.join(d, "l")
open(target, "w").close()
os.symlink("t", link)
fd = libc.inotify_init1(os.O_CLOEXEC)
wt = libc.inotify_add_watch(fd, target.encode(), IN_ATTRIB)
wl = libc.inotify_add_watch(fd, link.encode(), IN_ATTRIB | IN_DONT_FOLLOW)
open(f"{d}/ready", "w").close()
while not os.path.exists(f"{d}/go"):
    time.sleep(0.01)
os.utime(link, (1, 1), follow_symlinks=False)      # the link's own times
os.chmod(target, 0o600)
data = os.read(fd, 4096)
events = []
while data:
    wd, mask, cookie, size = struct.unpack_from("iIII", data)
    events.append(f"{wd}:{mask:x}")
    data = data[16 + size:]
open(f"{d}/output", "w").write(f"{wt} {wl} {' '.join(events)}\\n")
"""


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_inotify_on_a_symlink_itself(tmp_path: Path, how: str) -> None:
    assert moved_output(tmp_path, INOTIFY_LINK, how, state=True) == "1 2 2:4 1:4\n"


# MAP_DROPPABLE memory (glibc 2.41 keeps getrandom()'s state there) beside plain memory: the
# kernel may empty it at any time; a move empties it, so that two processes restored from one
# image never share such a state. It stays droppable, and is refilled as after a drop.
DROPPABLE = """
import ctypes, mmap, os, sys, time
d = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
dp = libc.mmap(None, 8192, mmap.PROT_READ | mmap.PROT_WRITE, 0x08 | mmap.MAP_ANONYMOUS, -1, 0)   # MAP_DROPPABLE
assert dp != ctypes.c_void_p(-1).value, ctypes.get_errno()
ctypes.memmove(dp, b"a random state" * 10, 140)
plain = mmap.mmap(-1, 4096)
plain.write(b"kept")
open(f"{d}/ready", "w").close()
while not os.path.exists(f"{d}/go"):
    time.sleep(0.01)
flags = [line.split()[1:] for line in open("/proc/self/smaps") if line.startswith("VmFlags")]
start = [int(line.split("-")[0], 16) for line in open("/proc/self/smaps") if line[0] in "0123456789abcdef"]
droppable = "dp" in flags[start.index(dp)]
emptied = ctypes.string_at(dp, 8192) == bytes(8192)
ctypes.memmove(dp, b"again", 5)
open(f"{d}/output", "w").write(f"droppable={droppable} emptied={emptied} refilled={ctypes.string_at(dp, 5)} "
                                f"plain={plain[:4]}\\n")
"""


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_droppable_memory_comes_back_empty(tmp_path: Path, how: str) -> None:
    assert moved_output(tmp_path, DROPPABLE, how, state=True) == \
        "droppable=True emptied=True refilled=b'again' plain=b'kept'\n"


# A SIGTRAP the process sent itself and blocks (as a debugger agent's or a runtime's
# self-test): our injected calls step with SIGTRAP unblocked, so it was taken by them, and
# neither the image nor the restored process had it any more (zdtm sigtrap).
PENDING_SIGTRAP = """
import os, signal, sys, time
d = sys.argv[1]
signal.signal(signal.SIGTRAP, lambda s, f: None)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTRAP])
os.kill(os.getpid(), signal.SIGTRAP)
open(f"{d}/ready", "w").close()
while not os.path.exists(f"{d}/go"):
    time.sleep(0.01)
caught = int([l for l in open("/proc/self/status") if l.startswith("SigCgt")][0].split()[1], 16) >> 4 & 1
info = signal.sigtimedwait([signal.SIGTRAP], 0)
open(f"{d}/output", "w").write(f"pending={info is not None and info.si_signo} caught={caught}\\n")
"""


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_a_pending_sigtrap_stays_pending(tmp_path: Path, how: str) -> None:
    assert moved_output(tmp_path, PENDING_SIGTRAP, how) == "pending=5 caught=1\n"


# A program that runs a tool it keeps in a memfd (as runc and systemd do with their own
# binaries): memfd_create's fd is no writer to the kernel, a reopened one is, and exec of a
# file someone may write fails (ETXTBSY) (zdtm memfd04).
MEMFD_EXEC = """
import os, sys, time
d = sys.argv[1]
fd = os.memfd_create("tool", 0)
os.write(fd, b"#!/bin/true\\n")
open(f"{d}/ready", "w").close()
while not os.path.exists(f"{d}/go"):
    time.sleep(0.01)
pid = os.fork()
if pid == 0:
    try:
        os.execve(fd, ["tool"], {})
    except OSError as exc:
        os._exit(exc.errno)
_, status = os.waitpid(pid, 0)
open(f"{d}/output", "w").write(f"exec={os.waitstatus_to_exitcode(status)}\\n")
"""


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_a_program_runs_its_memfd_after_the_move(tmp_path: Path, how: str) -> None:
    assert moved_output(tmp_path, MEMFD_EXEC, how, state=True) == "exec=0\n"


# A sparse scratch file the program deleted and keeps open (as databases and sort programs
# do): it came back named "DIR/#INODE (deleted)" and with its holes filled (zdtm
# unlink_multiple_largefiles, ghost_holes00). Its name, where free, and its holes are kept.
DELETED_SPARSE = """
import os, sys, time
d = sys.argv[1]
path = os.path.join(d, "scratch.bin")
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
os.pwrite(fd, b"a" * 4096, 0)
os.pwrite(fd, b"b" * 4096, 64 * 4096)
os.ftruncate(fd, 128 * 4096)
os.unlink(path)

def layout():
    spans, at = [], 0
    while True:
        try:
            start = os.lseek(fd, at, os.SEEK_DATA)
        except OSError:
            return spans
        at = os.lseek(fd, start, os.SEEK_HOLE)
        spans.append((start, at))

before, name = layout(), os.readlink(f"/proc/self/fd/{fd}")
open(f"{d}/ready", "w").close()
while not os.path.exists(f"{d}/go"):
    time.sleep(0.01)
data = os.pread(fd, 1, 0) + os.pread(fd, 1, 64 * 4096) + os.pread(fd, 1, 100 * 4096)
open(f"{d}/output", "w").write(f"name={os.readlink(f'/proc/self/fd/{fd}') == name} layout={layout() == before} "
                                f"spans={len(before)} data={data}\\n")
"""


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_a_deleted_sparse_file_keeps_its_name_and_holes(tmp_path: Path, how: str) -> None:
    assert moved_output(tmp_path, DELETED_SPARSE, how, state=True) == \
        "name=True layout=True spans=2 data=b'ab\\x00'\n"


# A datagram socket bound to a name and connected to that very name (it hears itself, as
# zdtm sockets_dgram's): its record named it its own peer, which no restore takes; the
# checkpoint killed the process and its image could not be restored.
SELF_CONNECTED = """
import os, socket, sys, time
d = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(f"{d}/self.sock")
s.connect(f"{d}/self.sock")
s.send(b"to myself")
open(f"{d}/ready", "w").close()
while not os.path.exists(f"{d}/go"):
    time.sleep(0.01)
s.send(b"again")
open(f"{d}/output", "w").write(f"{s.recv(100)} {s.recv(100)} {s.getpeername() == s.getsockname()}\\n")
"""


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_a_datagram_socket_connected_to_itself(tmp_path: Path, how: str) -> None:
    assert moved_output(tmp_path, SELF_CONNECTED, how, state=True) == "b'to myself' b'again' True\n"


# A server that removed its socket file once its client had connected (only that client may
# talk to it), with a FIFO made at the path since, and a datagram socket whose directory was
# removed too (zdtm del_standalone_un, fifo_upon_unix_socket00, sk-unix01): each comes back
# bound to its name, with no file of its own there, and the FIFO left as it was.
GONE_FILES = """
import os, socket, stat, sys, time
d = sys.argv[1]
path = f"{d}/server.sock"
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen(1)
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
client.connect(path)
conn, _ = server.accept()
os.unlink(path)
os.mkfifo(path)
os.mkdir(f"{d}/gone")
lone = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
lone.bind(f"{d}/gone/lone.sock")
os.unlink(f"{d}/gone/lone.sock")
os.rmdir(f"{d}/gone")
pairs = []                      # two datagram servers bound in turn to one name, each with its client
for _ in range(2):
    srv, cli = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(f"{d}/shared.sock")
    cli.connect(f"{d}/shared.sock")
    os.unlink(f"{d}/shared.sock")
    pairs.append((srv, cli))
open(f"{d}/ready", "w").close()
while not os.path.exists(f"{d}/go"):
    time.sleep(0.01)
client.send(b"ping")
got = conn.recv(10)
for i, (srv, cli) in enumerate(pairs):
    cli.send(b"AB"[i:i + 1])
got += b"".join(srv.recv(10) for srv, _ in pairs)
try:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.connect(path)
    reached = "reached"
except OSError:
    reached = "nothing there"
open(f"{d}/output", "w").write(f"{server.getsockname() == path} {lone.getsockname() == d + '/gone/lone.sock'} "
                                f"{got} fifo={stat.S_ISFIFO(os.lstat(path).st_mode)} gone={os.path.exists(d + '/gone')} "
                                f"{reached}\\n")
"""


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_sockets_whose_files_were_removed_keep_their_names(tmp_path: Path, how: str) -> None:
    assert moved_output(tmp_path, GONE_FILES, how, state=True) == \
        "True True b'pingAB' fifo=True gone=False nothing there\n"


# A timer whose signal was held back for 100 periods: its signal came with an overrun count,
# which no call sets again. The restore says so rather than dropping it silently.
OVERRUN = TIMER_PRELUDE + """
signal.signal(signal.SIGUSR2, lambda s, f: None)
tid = ctypes.c_int(0)
assert libc.syscall(222, 1, ctypes.byref(sigevent(0, signal.SIGUSR2, 0, 0)), ctypes.byref(tid)) == 0
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
assert libc.syscall(223, tid.value, 0, (ctypes.c_long * 4)(0, 1_000_000, 0, 1_000_000), None) == 0
time.sleep(0.1)
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR2])
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])     # no delivery since: the count stays
assert libc.syscall(225, tid.value) > 0
open(sys.argv[1], "w").close()
time.sleep(60)
"""


def test_a_timer_overrun_is_reported_not_dropped(tmp_path: Path) -> None:
    proc = start_until_ready([sys.executable, "-S", "-c", OVERRUN, str(tmp_path / "ready")], tmp_path / "ready",
                             start_new_session=True)
    res = kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img"))
    assert res.returncode == 0, res.stderr.decode()
    assert proc.wait(timeout=30) == -9
    res = kcr("restore", "-i", str(tmp_path / "img"))
    assert res.returncode == 0, res.stderr.decode()
    pid = int(res.stdout.split()[-1])
    try:
        assert "kcr-migrate: warning: POSIX timer 0 had an overrun count of " in res.stderr.decode()
    finally:
        os.kill(pid, 9)
        reap(pid)


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_posix_timers(tmp_path: Path, how: str) -> None:
    script = tmp_path / "timers.py"
    script.write_text(POSIX_TIMERS)
    proc = start_until_ready([sys.executable, "-S", str(script), str(tmp_path), "1000"], tmp_path / "ready",
                             start_new_session=True)
    finished(moved(proc, how, tmp_path))
    assert (tmp_path / "output").read_text() == "True\n"


# A fanotify notification group: its directory's children watched for close-after-write (an
# inode mark), the mount and the filesystem marked too, one file ignored (an ignored mask that
# survives modification). After the move each mark is there again and events still come, but
# not for the ignored file.
FANOTIFY = r"""
import ctypes, os, struct, sys, time
d = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
libc.fanotify_mark.argtypes = (ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p)
ADD, MOUNT, FILESYSTEM, IGNORED, SURV = 0x1, 0x10, 0x100, 0x20, 0x40
CLOSE_WRITE, ACCESS, ON_CHILD = 0x8, 0x1, 0x08000000
w = os.path.join(d, "watched")
os.mkdir(w)
open(os.path.join(w, "quiet"), "w").close()
fd = libc.fanotify_init(int(sys.argv[2], 0) | 0x3, os.O_RDONLY)       # FAN_CLOEXEC | FAN_NONBLOCK
assert fd >= 0, os.strerror(ctypes.get_errno())
for flags, mask, path in ((ADD, CLOSE_WRITE | ON_CHILD, w), (ADD | IGNORED | SURV, CLOSE_WRITE, os.path.join(w, "quiet")),
                          (ADD | MOUNT, CLOSE_WRITE, d), (ADD | FILESYSTEM | IGNORED | SURV, ACCESS, d)):
    assert libc.fanotify_mark(fd, flags, mask, -100, path.encode()) == 0, os.strerror(ctypes.get_errno())
open(os.path.join(d, "ready"), "w").close()
while not os.path.exists(os.path.join(d, "go")):
    time.sleep(0.01)
for name in ("a", "quiet", "b"):
    with open(os.path.join(w, name), "a") as f:
        f.write(name)
seen = set()
while True:
    try:
        data = os.read(fd, 1 << 16)
    except BlockingIOError:
        break
    while data:
        size, _, _, _, mask, efd, _ = struct.unpack_from("<IBBHQii", data)
        if efd >= 0:
            path = os.readlink(f"/proc/self/fd/{efd}")
            os.close(efd)
            if path.startswith(w + "/"):
                seen.add((os.path.basename(path), mask & CLOSE_WRITE))
        data = data[size:]
open(os.path.join(d, "output"), "w").write(f"{sorted(seen)}\n")
"""


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_fanotify(tmp_path: Path, how: str) -> None:
    assert moved_output(tmp_path, FANOTIFY, how, "0", state=True) == "[('a', 8), ('b', 8)]\n"


def test_a_fanotify_permission_group_is_refused(tmp_path: Path) -> None:
    script = tmp_path / "fan.py"
    script.write_text(FANOTIFY)
    proc = start_until_ready([sys.executable, "-S", str(script), str(tmp_path), "0x4"], tmp_path / "ready",
                             start_new_session=True)          # FAN_CLASS_CONTENT
    res = kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img"))
    assert res.returncode != 0 and "a fanotify instance of a permission class" in res.stderr.decode(), res.stderr
    assert not (tmp_path / "img").exists() and proc.poll() is None


# Signal-driven I/O: a pipe whose reads are announced by SIGUSR1 (O_ASYNC, F_SETOWN, F_SETSIG).
ASYNC_IO = r"""
import fcntl, os, signal, sys, time
d = sys.argv[1]
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
r, w = os.pipe()
fcntl.fcntl(r, fcntl.F_SETOWN, os.getpid())
fcntl.fcntl(r, 10, signal.SIGUSR1)                                   # F_SETSIG
fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_ASYNC | os.O_NONBLOCK)
open(os.path.join(d, "ready"), "w").close()
while not os.path.exists(os.path.join(d, "go")):
    time.sleep(0.01)
os.write(w, b"x")
deadline = time.monotonic() + 10
while not got and time.monotonic() < deadline:
    time.sleep(0.01)
ok = fcntl.fcntl(r, fcntl.F_GETOWN) == os.getpid() and fcntl.fcntl(r, 11) == signal.SIGUSR1
open(os.path.join(d, "output"), "w").write(f"{ok} {got}\n")
"""


def test_signal_driven_io(tmp_path: Path) -> None:
    assert moved_output(tmp_path, ASYNC_IO, "checkpoint", state=True) == "True [10]\n"


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_a_stopped_job_stays_stopped(tmp_path: Path, how: str) -> None:
    """A job stopped by SIGSTOP (Ctrl-Z, `kill -STOP`, Slurm's `scontrol suspend`) is moved
    stopped: it was let run on the destination, carrying on with work its user had suspended.
    SIGCONT goes on, nothing lost or repeated."""
    script = tmp_path / "counter.py"
    script.write_text(COUNTER)
    out = tmp_path / "out.log"
    with out.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-u", "-S", str(script), "100"], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.DEVNULL, close_fds=True)
    STARTED.append(proc)
    deadline = time.monotonic() + 60
    while out.read_bytes().count(b"\n") < 20:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGSTOP)
    while proc_state(proc.pid) != "T":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    lines = out.read_bytes().count(b"\n")
    pid = moved(proc, how, tmp_path, state=True)       # its whole state, stopped, as it was
    # (the state check stops it for an instant: back in its stop a moment later, not at once)
    while proc_state(pid) != "T":
        assert time.monotonic() < deadline, f"the moved job is {proc_state(pid)}, not stopped: its stop was lost"
        time.sleep(0.01)
    assert out.read_bytes().count(b"\n") == lines, "the moved job ran before it stopped"
    os.kill(pid, signal.SIGCONT)
    finished(pid, timeout=120)
    assert out.read_bytes() == b"".join(b"line %d\n" % i for i in range(100))


@pytest.mark.skipif(shutil.which("rsync") is None, reason="no rsync on this machine (scripts/setup installs it)")
def test_rsync_mid_copy(tmp_path: Path) -> None:
    """rsync copying a directory: three processes on socketpairs, each holding O_PATH fds of
    the directories it walks (restore opened them with flags openat2 refuses alongside
    O_PATH: EINVAL). Checkpointed mid-copy and restored, it finishes the copy."""
    src = tmp_path / "src"
    src.mkdir()
    r = random.Random(3)
    for i in range(16):
        (src / f"f{i}").write_bytes(r.randbytes(256 << 10))
    dst = tmp_path / "dst"
    proc = subprocess.Popen(["rsync", "-a", "--bwlimit=2m", f"{src}/", f"{dst}/"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                            start_new_session=True)
    STARTED.append(proc)
    deadline = time.monotonic() + 60
    while not (dst.exists() and len(list(dst.iterdir())) >= 3):      # a few files in: mid-copy
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    from tests.test_trees import reap_orphans
    res = kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "rsync.img"))
    assert res.returncode == 0, res.stderr.decode()
    assert "3 processes" in res.stderr.decode()
    assert proc.wait(timeout=30) == -9
    shown = json.loads(kcr("show", str(tmp_path / "rsync.img")).stdout)
    reap_orphans([m["pid"] for m in shown["tree"]["members"][1:]])
    res = kcr("restore", "-i", str(tmp_path / "rsync.img"))
    assert res.returncode == 0, res.stderr.decode()
    finished(int(res.stdout.split()[-1]), timeout=120)
    assert sorted(p.name for p in dst.iterdir()) == sorted(p.name for p in src.iterdir())
    assert all((dst / p.name).read_bytes() == p.read_bytes() for p in src.iterdir())


# A writer in the middle of an sqlite write transaction (BEGIN IMMEDIATE: its write lock held,
# its rows not committed) when it is checkpointed; it commits once told to go on.
SQLITE_TRANSACTION = r"""
import os, sqlite3, sys
db_path, d, mode = sys.argv[1], sys.argv[2], sys.argv[3]
db = sqlite3.connect(db_path, isolation_level=None)
db.execute(f"pragma journal_mode={mode}")
db.execute("create table t (i integer)")
db.executemany("insert into t values (?)", [(i,) for i in range(100)])
db.execute("begin immediate")
db.executemany("insert into t values (?)", [(i,) for i in range(100, 200)])
open(os.path.join(d, "ready"), "w").close()
while not os.path.exists(os.path.join(d, "go")):
    import time; time.sleep(0.01)
db.execute("commit")
rows, total = db.execute("select count(*), sum(i) from t").fetchone()
sound = db.execute("pragma integrity_check").fetchone()[0]
open(os.path.join(d, "output"), "w").write(f"{rows} rows, sum {total}, integrity {sound}\n")
"""


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_an_sqlite_write_transaction_keeps_its_lock_across_a_checkpoint(tmp_path: Path, mode: str) -> None:
    """Restored, the writer holds its write lock again before it runs (another connection
    cannot begin writing, and does not see the uncommitted rows); let go, it commits, and
    the database holds every row, sound. In rollback-journal mode the lock is a POSIX lock
    on the database, in WAL mode one on its -shm file."""
    import sqlite3
    db, script = tmp_path / "jobs.db", tmp_path / "txn.py"
    script.write_text(SQLITE_TRANSACTION)
    proc = start_until_ready([sys.executable, "-S", str(script), str(db), str(tmp_path), mode],
                             tmp_path / "ready", start_new_session=True)
    restored = moved(proc, "checkpoint", tmp_path)
    other = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        assert other.execute("select count(*) from t").fetchone()[0] == 100
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("begin immediate")
    finally:
        other.close()
    (tmp_path / "go").touch()
    finished(restored, timeout=60)
    assert (tmp_path / "output").read_text() == "200 rows, sum 19900, integrity ok\n"


def test_an_sqlite_write_transaction_held_throughout_a_live_move_is_refused(tmp_path: Path) -> None:
    """Live, to a host that sees the same database (here: itself), a write lock cannot change
    hands; held throughout preflight's wait (an open transaction, not a commit's moment) the
    move is refused, naming it, before anything froze; the writer goes on and commits."""
    db, script = tmp_path / "jobs.db", tmp_path / "txn.py"
    script.write_text(SQLITE_TRANSACTION)
    proc = start_until_ready([sys.executable, "-S", str(script), str(db), str(tmp_path), "wal"],
                             tmp_path / "ready", start_new_session=True)
    code, report, err = migrate_cli(f"{proc.pid}@localhost", "localhost")
    assert code == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "holds a write POSIX record lock" in line and "(held throughout 1 s)" in line and f"{db}-shm" in line, err
    assert not report.get("per_round"), report
    (tmp_path / "go").touch()
    assert proc.wait(timeout=30) == 0
    assert (tmp_path / "output").read_text() == "200 rows, sum 19900, integrity ok\n"



def test_a_postgresql_server_is_checkpointed_and_restored(tmp_path: Path) -> None:
    """PostgreSQL: five processes sharing memory (anonymous shared mappings and a SysV segment),
    latches on self-pipes and epoll, a unix socket it listens on, its WAL and data files; after
    the restore it takes new connections (forks a backend), writes and checkpoints."""
    pg = PostgresServer()
    pid = pg.proc.pid
    try:
        assert pg.sql("create table t (i int); insert into t select generate_series(1, 1000)").returncode == 0
        res = kcr("checkpoint", str(pid), "-o", str(tmp_path / "pg.img"))
        assert res.returncode == 0, res.stderr.decode()
        assert "5 processes" in res.stderr.decode(), res.stderr.decode()
        assert pg.proc.wait(timeout=30) == -9
        from tests.test_trees import reap_orphans        # its children are ours to reap (subreaper)
        shown = json.loads(kcr("show", str(tmp_path / "pg.img")).stdout)
        reap_orphans([m["pid"] for m in shown["tree"]["members"][1:]])
        res = kcr("restore", "-i", str(tmp_path / "pg.img"))
        assert res.returncode == 0, res.stderr.decode()
        got = pg.sql("insert into t select generate_series(1, 500); checkpoint; select count(*), sum(i) from t")
        assert got.returncode == 0, got.stderr + pg.log.read_text()
        assert got.stdout.splitlines() == ["INSERT 0 500", "CHECKPOINT",
                                           f"1500|{sum(range(1, 1001)) + sum(range(1, 501))}"], got.stdout
    finally:
        pg.close(pid)
