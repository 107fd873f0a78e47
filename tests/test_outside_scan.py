"""The outside's fds, read before a job is frozen and brought up to date once it is
(``agent.fdtable.OutsideScan``): a pipe of the job that a process outside holds is refused at
the freeze, naming that process, whether it started after the read or left the job since; and
the frozen job pays for those processes, not for every fd on the host.

Real processes: a job holding a pipe, and processes that get hold of it."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import sys
import time
from pathlib import Path

import pytest

from agent import freeze
from agent.holder import Holder
from agent.fdtable import Outside, OutsideScan, OutsideWatch, ScanStopped, collect_tree, describe_tree
from tests._migration import proc_state
from tests._workloads import STARTED, become_subreaper, reap
from transport.errors import UnsupportedResource


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    become_subreaper()


def started(code: str, ready: Path, *args: str) -> subprocess.Popen[bytes]:
    """A Python process running ``code`` (with ``ready``, a file it writes once set, as argv[1]);
    returned once that file is there."""
    proc = subprocess.Popen([sys.executable, "-c", code, str(ready), *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    STARTED.append(proc)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None, f"exited {proc.returncode}"
        assert time.monotonic() < deadline, f"{ready} never appeared"
        time.sleep(0.01)
    return proc


# The job: a pipe, both ends its own, until a process outside takes one.
JOB = """
import os, signal, sys
r, w = os.pipe()
open(sys.argv[1] + ".tmp", "w").write(f"{r} {w} {os.fstat(r).st_ino}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
signal.pause()
"""

# A process outside the job that opens the job's pipe through /proc (as a monitoring tool could).
TAKER = """
import os, signal, sys
fd = os.open(f"/proc/{sys.argv[2]}/fd/{sys.argv[3]}", os.O_WRONLY)
open(sys.argv[1], "w").write(str(fd))
signal.pause()
"""

# A job whose child forks a grandchild holding the pipe; once told (SIGUSR1), the child exits
# and the grandchild, reparented away, is no longer in the job.
LEAVING = """
import os, signal, sys
r, w = os.pipe()
signal.signal(signal.SIGUSR1, lambda *a: os._exit(0))
if os.fork() == 0:
    grandchild = os.fork()
    if grandchild == 0:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        while True:
            signal.pause()
    open(sys.argv[1] + ".tmp", "w").write(f"{os.getpid()} {grandchild} {os.fstat(r).st_ino}")
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    while True:
        signal.pause()
signal.signal(signal.SIGUSR1, signal.SIG_DFL)
while True:
    signal.pause()
"""


# A job that, once told (SIGUSR1), forks a child holding its pipe (as a pool replaces a worker).
FORKING = """
import os, signal, sys
r, w = os.pipe()
def fork(*a):
    if os.fork() == 0:
        while True:
            signal.pause()
signal.signal(signal.SIGUSR1, fork)
open(sys.argv[1] + ".tmp", "w").write(f"{r} {w} {os.fstat(r).st_ino}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    signal.pause()
"""


def descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for t in os.listdir(f"/proc/{p}/task"):
            for c in Path(f"/proc/{p}/task/{t}/children").read_text().split():
                out.add(int(c))
                todo.append(int(c))
    return out


def test_a_process_started_after_the_read_holding_the_jobs_pipe_is_refused_at_the_freeze(tmp_path: Path) -> None:
    job = started(JOB, tmp_path / "job")
    r, w, ino = (int(x) for x in (tmp_path / "job").read_text().split())
    taker: subprocess.Popen[bytes] | None = None
    try:
        scan = OutsideScan({job.pid})
        assert not Outside(scan.fds).holders({("pipe", ino)})
        taker = started(TAKER, tmp_path / "taker", str(job.pid), str(w))
        assert not Outside(scan.fds).holders({("pipe", ino)}), "the earlier read cannot know it"
        found = scan.now({job.pid}).holders({("pipe", ino)})
        assert {p.pid for p in found[("pipe", ino)]} == {taker.pid}
        held = freeze.seize(job.pid)
        try:
            with pytest.raises(UnsupportedResource, match=rf"pid {job.pid}'s fd {r} is a pipe shared with pid {taker.pid} "):
                collect_tree([job.pid], {job.pid: {}}, outside_scan=scan)
        finally:
            freeze.let_go(held)
    finally:
        for proc in (job, taker):
            if proc is not None:
                proc.kill()
                proc.wait()


def test_a_process_the_read_saw_holding_the_jobs_pipe_that_has_exited_since_holds_nothing(tmp_path: Path) -> None:
    """A scan made while the job ran can list a process that has exited since (make's
    children come and go): it was named as a holder of the job's pipe, '(?)', and the move
    refused. Holders are asked again when they are looked up; one still there is refused."""
    job = started(JOB, tmp_path / "job")
    r, w, ino = (int(x) for x in (tmp_path / "job").read_text().split())
    taker = started(TAKER, tmp_path / "taker", str(job.pid), str(w))
    try:
        scan = OutsideScan({job.pid})
        assert {p.pid for p in scan.now({job.pid}).holders({("pipe", ino)})[("pipe", ino)]} == {taker.pid}
        taker.kill()
        taker.wait()
        assert not scan.now({job.pid}).holders({("pipe", ino)})
        held = freeze.seize(job.pid)
        try:
            collect_tree([job.pid], {job.pid: {}}, outside_scan=scan)      # not refused
        finally:
            freeze.let_go(held)
    finally:
        for proc in (job, taker):
            proc.kill()
            proc.wait()


def test_a_child_the_job_forked_since_its_pids_were_listed_is_of_the_job_not_outside(tmp_path: Path) -> None:
    """A running job forks (a pool's new worker, make's next child) between the listing of its
    pids and the read of the fds outside it. The child holds the job's pipe and joins the job at
    its next look: it is no peer outside. A Pool replacing its workers (maxtasksperchild) was
    refused, "a pipe shared with pid N (python3), which does not move with it": 3 live moves in
    200. A process outside holding the pipe is still refused."""
    job = started(FORKING, tmp_path / "job")
    r, w, ino = (int(x) for x in (tmp_path / "job").read_text().split())
    try:
        listed = [job.pid]
        os.kill(job.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while not descendants(job.pid):
            assert time.monotonic() < deadline, "the job did not fork"
            time.sleep(0.01)
        describe_tree(listed, {job.pid: {}})           # not refused
        assert not OutsideScan(set(listed)).now(set(listed)).holders({("pipe", ino)})
        taker = started(TAKER, tmp_path / "taker", str(job.pid), str(w))
        with pytest.raises(UnsupportedResource, match=f"shared with pid {taker.pid} "):
            describe_tree(listed, {job.pid: {}})
    finally:
        children = descendants(job.pid)
        for child in children:
            os.kill(child, signal.SIGKILL)
        job.kill()
        job.wait()
        for child in children:       # adopted (we are the subreaper)
            reap(child)


def test_a_process_that_left_the_job_since_the_read_holding_its_pipe_is_refused_at_the_freeze(
        tmp_path: Path) -> None:
    job = started(LEAVING, tmp_path / "job")
    child, grandchild, ino = (int(x) for x in (tmp_path / "job").read_text().split())
    try:
        assert descendants(job.pid) == {child, grandchild}
        scan = OutsideScan({job.pid, child, grandchild})
        assert not Outside(scan.fds).holders({("pipe", ino)})
        os.kill(child, signal.SIGUSR1)          # the grandchild is reparented away (here: a subreaper)
        deadline = time.monotonic() + 30
        while grandchild in descendants(job.pid):
            assert time.monotonic() < deadline, "the grandchild did not leave the job"
            time.sleep(0.01)
        # Not a new process: only having left the job makes it read again.
        assert not scan.last_pid < grandchild
        found = scan.now({job.pid}).holders({("pipe", ino)})
        assert {p.pid for p in found[("pipe", ino)]} == {grandchild}
    finally:
        os.kill(grandchild, signal.SIGKILL)
        reap(grandchild)
        job.kill()
        job.wait()


def test_the_freeze_takes_the_scan_the_check_made_and_stops_one_that_runs(tmp_path: Path) -> None:
    job = started(JOB, tmp_path / "job")
    r, w, ino = (int(x) for x in (tmp_path / "job").read_text().split())
    taker: subprocess.Popen[bytes] | None = None
    try:
        stop = threading.Event()
        stop.set()
        with pytest.raises(ScanStopped):
            OutsideScan({job.pid}, stop)
        watch = OutsideWatch()
        checked = watch.latest({job.pid})             # the job's first check makes one ...
        assert watch.latest({job.pid}) is checked     # ... which its later checks take
        checked.started -= 3600                       # due again: the watch reads the host anew
        watch.refresh({job.pid})
        frozen = watch.latest({job.pid})              # the freeze: a whole scan, and none left running
        assert not any(t.name == "outside-scan" for t in threading.enumerate())
        assert frozen is checked or frozen.started > checked.started
        taker = started(TAKER, tmp_path / "taker", str(job.pid), str(w))
        found = frozen.now({job.pid}).holders({("pipe", ino)})
        assert {p.pid for p in found[("pipe", ino)]} == {taker.pid}
    finally:
        for proc in (job, taker):
            if proc is not None:
                proc.kill()
                proc.wait()


def test_the_holders_freeze_refuses_a_process_started_after_its_read_holding_the_jobs_pipe(tmp_path: Path) -> None:
    """The holder's freeze reads the outside again for processes started since its read: one
    holding the job's pipe is refused, named, and the job, let go, runs on as it was."""
    job = started(JOB, tmp_path / "job")
    r, w, ino = (int(x) for x in (tmp_path / "job").read_text().split())
    taker: subprocess.Popen[bytes] | None = None
    holder = Holder()
    try:
        holder.op_seize(job.pid)
        holder.outside_watch.latest({job.pid})        # the read before the freeze ...
        taker = started(TAKER, tmp_path / "taker", str(job.pid), str(w))     # ... and one started after it
        holder.op_freeze()
        with pytest.raises(UnsupportedResource, match=rf"pid {job.pid}'s fd {r} is a pipe shared with pid {taker.pid} "):
            holder.op_collect()
        holder.op_release()
        assert proc_state(job.pid) in ("S", "R") and "TracerPid:\t0" in Path(f"/proc/{job.pid}/status").read_text()
        assert f"pipe:[{ino}]" in os.readlink(f"/proc/{job.pid}/fd/{r}")
    finally:
        if holder.helds:
            holder.op_release()
        for proc in (job, taker):
            if proc is not None:
                proc.kill()
                proc.wait()
