"""Seccomp filters: a process under filters is checkpointed and restored, or moved, and its
filters still act in each thread as they did (and /proc shows the same chains); a filter that
hands calls to a supervisor is refused in one line and the process runs on."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from tests._migration import migrate_cli
from tests._state import Watch
from tests._workloads import Workload, become_subreaper, kcr, one_error_line, reap, start_reference
from tests.test_checkpoint import checkpoint_and_restore
from tests.test_trees import checkpoint, image_restored, tree


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    become_subreaper()


def _ends_killed_by_its_filter(status: int) -> bool:
    # The workload's last call is one a filter answers with SECCOMP_RET_KILL_PROCESS.
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


@pytest.mark.parametrize("mode,live", [("shared", False), ("own", False), ("shared", True)],
                         ids=["one-chain-checkpoint", "chain-per-thread-checkpoint", "one-chain-live"])
def test_filters_act_as_before_after_the_move(tmp_path: Path, mode: str, live: bool) -> None:
    """Two threads under three filters (one failing getppid with errno 42, one killing the
    process at acct, logged, one failing prctl with EPERM, which the dump's and the restore's
    own prctls must pass): shared by both threads (TSYNC), or the last two in one thread only."""
    ref = start_reference("ckpt_seccomp", tmp_path, mode)
    w = Workload("ckpt_seccomp", tmp_path / "restored", mode, hold=True)
    w.start()
    w.wait_ready()
    watch = Watch(w)            # the state, the seccomp row among it: mode, filters, no_new_privs per thread
    if live:
        code, report, err = migrate_cli(f"{w.pid}@localhost", "localhost")
        assert code == 0, err
        assert w.reap_original() == -signal.SIGKILL
        new_pid = int(report["new_pid"])
    else:
        new_pid, _ = checkpoint_and_restore(w, tmp_path)
    watch.check(new_pid)
    assert w.verdict() == "PASS", (w.dir / "stderr").read_text()
    assert _ends_killed_by_its_filter(reap(new_pid))
    assert ref.verdict() == "PASS", (ref.dir / "stderr").read_text()
    assert ref.reap_original() == -signal.SIGSYS
    assert w.output() == ref.output()
    other = "prctl -1 errno 1, mode 2, filters 3" if mode == "shared" else "prctl 0 errno 0, mode 2, filters 1"
    assert w.output() == ("main: getppid -1 errno 42, prctl -1 errno 1, mode 2, filters 3\n"
                          f"other: getppid -1 errno 42, {other}\n")


# CPython under a filter (logged) that fails uname() with EPERM, as a sandbox's would; with
# "fork", a child made after the filter inherits it.
PYTHON_FILTERED = r"""
import ctypes, os, struct, sys, time
out_dir, mode = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(38, 1, 0, 0, 0)                                          # PR_SET_NO_NEW_PRIVS
insns = [(0x20, 0, 0, 0), (0x15, 0, 1, 63), (0x06, 0, 0, 0x00050001), (0x06, 0, 0, 0x7fff0000)]
prog = ctypes.create_string_buffer(b"".join(struct.pack("<HBBI", *i) for i in insns))
fprog = struct.pack("<HxxxxxxQ", len(insns), ctypes.addressof(prog))
assert libc.syscall(317, 1, 2, ctypes.c_char_p(fprog)) == 0, ctypes.get_errno()   # SECCOMP_FILTER_FLAG_LOG
child = os.fork() if mode == "fork" else -1
if child:
    open(os.path.join(out_dir, "ready"), "w").close()
while not os.path.exists(os.path.join(out_dir, "go")):
    time.sleep(0.01)
try:
    os.uname()
    result = "uname works"
except PermissionError:
    result = "uname EPERM"
if child == 0:
    os._exit(0 if result == "uname EPERM" else 1)
if child > 0:
    _, status = os.waitpid(child, 0)
    result += ", child " + ("EPERM" if status == 0 else "unfiltered")
with open(os.path.join(out_dir, "output"), "w") as f:
    f.write(result + "\n")
os.replace(os.path.join(out_dir, "output"), os.path.join(out_dir, "verdict"))
"""


@pytest.mark.parametrize("mode", ["alone", "fork"], ids=["process", "tree"])
def test_cpython_under_a_filter(tmp_path: Path, mode: str) -> None:
    """CPython under a filter, alone, or with a child that inherited it (each process of the
    restored tree gets its own chain again)."""
    path = tmp_path / "filtered.py"
    path.write_text(PYTHON_FILTERED)
    w = Workload("filtered", tmp_path, argv=[sys.executable, "-S", str(path), str(tmp_path / "filtered"), mode])
    w.start()
    w.wait_ready()
    before = tree(w.pid)
    assert len(before) == (2 if mode == "fork" else 1)
    for pid in before:
        with open(f"/proc/{pid}/status") as f:
            assert "Seccomp_filters:\t1\n" in f.read()
    if mode == "fork":
        checkpoint(w.pid, tmp_path / "tree.img", 2)
        assert w.reap_original() == -signal.SIGKILL
        new_pid = image_restored(tmp_path / "tree.img", before)
    else:
        new_pid, _ = checkpoint_and_restore(w, tmp_path)
    for pid in before:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
        assert "Seccomp:\t2\n" in status and "Seccomp_filters:\t1\n" in status and "NoNewPrivs:\t1\n" in status
    (w.dir / "go").touch()
    assert w.verdict() == ("uname EPERM, child EPERM" if mode == "fork" else "uname EPERM")
    assert os.WEXITSTATUS(reap(new_pid)) == 0


# A filter answering getppid with SECCOMP_RET_USER_NOTIF (its listener closed at once: calls
# then fail with ENOSYS, but a supervisor holding it would have answered them).
USER_NOTIF = r"""
import ctypes, os, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(38, 1, 0, 0, 0)                                          # PR_SET_NO_NEW_PRIVS
insns = [(0x20, 0, 0, 0), (0x15, 0, 1, 110), (0x06, 0, 0, 0x7fc00000), (0x06, 0, 0, 0x7fff0000)]
prog = ctypes.create_string_buffer(b"".join(struct.pack("<HBBI", *i) for i in insns))
fprog = struct.pack("<HxxxxxxQ", len(insns), ctypes.addressof(prog))
fd = libc.syscall(317, 1, 8, ctypes.c_char_p(fprog))                # SECCOMP_FILTER_FLAG_NEW_LISTENER
assert fd >= 0, ctypes.get_errno()
os.close(fd)
open(os.path.join(sys.argv[1], "ready"), "w").close()
time.sleep(600)
"""


# A filter installed by root without no_new_privs, CAP_SYS_ADMIN dropped since (capset).
CAP_DROPPED = r"""
import ctypes, os, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
insns = [(0x20, 0, 0, 0), (0x15, 0, 1, 63), (0x06, 0, 0, 0x00050001), (0x06, 0, 0, 0x7fff0000)]
prog = ctypes.create_string_buffer(b"".join(struct.pack("<HBBI", *i) for i in insns))
fprog = struct.pack("<HxxxxxxQ", len(insns), ctypes.addressof(prog))
assert libc.syscall(317, 1, 0, ctypes.c_char_p(fprog)) == 0, ctypes.get_errno()
header = ctypes.create_string_buffer(struct.pack("<Ii", 0x20080522, 0))
data = ctypes.create_string_buffer(24)
assert libc.syscall(125, header, data) == 0                          # capget
eff, prm, inh, eff1, prm1, inh1 = struct.unpack("<6I", data.raw)
data = ctypes.create_string_buffer(struct.pack("<6I", eff & ~(1 << 21), prm & ~(1 << 21), inh, eff1, prm1, inh1))
assert libc.syscall(126, header, data) == 0, ctypes.get_errno()     # capset: CAP_SYS_ADMIN gone
open(os.path.join(sys.argv[1], "ready"), "w").close()
time.sleep(600)
"""


@pytest.mark.parametrize("script,expected", [
    (USER_NOTIF, "hands calls to a supervisor (SECCOMP_RET_USER_NOTIF)"),
    (CAP_DROPPED, "installed while it had a capability it has dropped since (CAP_SYS_ADMIN, without no_new_privs)"),
], ids=["user-notif", "cap-dropped"])
def test_filters_that_cannot_be_carried_are_refused_in_one_line(tmp_path: Path, script: str, expected: str) -> None:
    path = tmp_path / "refused.py"
    path.write_text(script)
    w = Workload("refused", tmp_path, argv=[sys.executable, "-S", str(path), str(tmp_path / "refused")])
    w.start()
    w.wait_ready()
    try:
        res = kcr("checkpoint", str(w.pid), "-o", str(tmp_path / "x.img"))
        assert res.returncode != 0
        assert expected in one_error_line(res.stderr)
        assert not (tmp_path / "x.img").exists()
        with open(f"/proc/{w.pid}/status") as f:
            assert "TracerPid:\t0\n" in f.read()
        os.kill(w.pid, 0)                   # it runs on
    finally:
        os.kill(w.pid, signal.SIGKILL)
        w.reap_original()


def test_strict_mode_holds_after_checkpoint_and_restore(tmp_path: Path) -> None:
    """A thread in strict mode, waiting in read(): restored, its signal handler still runs and
    wakes it (read, write and sigreturn pass), and the first other call kills it."""
    w = Workload("ckpt_seccomp", tmp_path, "strict")
    w.start()
    w.wait_ready()
    with open(f"/proc/{w.pid}/status") as f:
        while "Seccomp:\t1\n" not in f.read():     # it enters strict mode just after it is ready
            f.seek(0)
            os.sched_yield()
    watch = Watch(w)
    new_pid, _ = checkpoint_and_restore(w, tmp_path)
    watch.check(new_pid)
    os.kill(new_pid, signal.SIGUSR1)
    status = reap(new_pid)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert w.output() == "strict mode holds\n"
