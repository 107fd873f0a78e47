"""Checkpoint a running process and restore it: real programs, real ptrace, real images.

Each workload checks itself after restore and writes a verdict; its output must equal an
uninterrupted run's. The test process is a child subreaper, so restored processes (which
are not the tool's children) are reaped here.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._migration import migrate_cli, moved, proc_state
from tests._state import Watch
from tests._workloads import (KCR_MIGRATE, LINGERING, STARTED, Workload, become_subreaper, build, edit_records, finished,
                              kcr, reap, run_reference, start_reference, start_until_ready)
from tests._workloads import one_error_line as _one_error_line
from transport.schema import ImageHeader


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    become_subreaper()


def checkpoint_and_restore(w: Workload, tmp_path: Path, *extra: str) -> tuple[int, dict[str, object]]:
    """Checkpoint ``w`` (started, ready) to a file with the CLI, restore it; return (new pid,
    the checkpoint's statistics with the restore's result under "restore")."""
    image = tmp_path / f"{w.name}.img"
    stats_file = tmp_path / f"{w.name}.stats.json"
    children = Path(f"/proc/{w.pid}/task/{w.pid}/children").read_text().split()
    res = kcr("checkpoint", str(w.pid), "-o", str(image), "--stats-json", str(stats_file), *extra)
    assert res.returncode == 0, res.stderr.decode()
    w.reap_original()
    for child in map(int, children):
        # Ended with the tree; as subreaper we adopted them: reaped, their pids (and the
        # process group they keep of the root's) are free for the restore.
        reap(child)
    stats = json.loads(stats_file.read_text())
    res = kcr("restore", "-i", str(image), "--json")
    assert res.returncode == 0, res.stderr.decode()
    stats["restore"] = json.loads(res.stdout.decode())
    new_pid = int(stats["restore"]["pid"])
    assert new_pid == w.pid          # it keeps its pid (and thread ids: test_threads_keep_their_ids)
    return new_pid, stats


def migrate_once(name: str, tmp_path: Path, *args: str, **kw: object) -> tuple[Workload, Workload, dict[str, object]]:
    # Held, a lingering workload waits until restored; another has room for a loaded machine's CLI.
    kw.setdefault("scale", 1 if name in LINGERING else 3)
    ref = start_reference(name, tmp_path, *args, **kw)
    w = Workload(name, tmp_path / "restored", *args, hold=True, **kw)  # type: ignore[arg-type]
    w.start()
    w.wait_ready()
    watch = Watch(w) if name in LINGERING else None
    new_pid, stats = checkpoint_and_restore(w, tmp_path)
    if watch is not None:
        watch.check(new_pid)            # the whole state, not only what the workload checks
    assert w.verdict() == "PASS", (w.dir / "stderr").read_text()
    status = reap(new_pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"restored process ended with {status:#x}"
    return finished(ref), w, stats


def test_single_threaded_64mib(tmp_path: Path) -> None:
    ref, w, stats = migrate_once("ckpt_array", tmp_path)
    assert w.output() == ref.output()
    assert w.output().count("iter ") == 40
    assert stats["pages_written"] >= (64 << 20) // 4096       # the whole array was populated
    assert stats["frozen_time_ms"] > 0
    if os.path.exists("/proc/sys/vm/unprivileged_userfaultfd"):  # the kernel has userfaultfd
        # The array went into memory the restored process had none of: filled by UFFDIO_COPY.
        assert stats["restore"]["pages_filled"] >= (64 << 20) // 4096, stats["restore"]


def test_threads_mutex_condvar_tls(tmp_path: Path) -> None:
    ref, w, stats = migrate_once("ckpt_threads", tmp_path)
    assert stats["threads"] == 5
    assert w.output() == ref.output()


def test_blocked_in_nanosleep_and_futex(tmp_path: Path) -> None:
    ref, w, _ = migrate_once("ckpt_blocked", tmp_path)
    assert w.output() == ref.output() == "nanosleep rc 0 errno 0\ncond_wait rc 0\n"


def test_signals_handlers_pending_itimer_altstack(tmp_path: Path) -> None:
    ref, w, _ = migrate_once("ckpt_signals", tmp_path)
    assert w.output() == ref.output()


def test_a_process_denying_itself_writable_code_is_read_all_the_same(tmp_path: Path) -> None:
    # Its state is read through injected calls that answer into a scratch mapping, in one go
    # where that mapping may hold code; this process refuses such mappings (PR_SET_MDWE).
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(66, 0, 0, 0, 0) < 0:          # PR_GET_MDWE
        pytest.skip(f"this kernel lacks PR_SET_MDWE (Linux 6.3+): {os.strerror(ctypes.get_errno())}")
    ref, w, _ = migrate_once("ckpt_signals", tmp_path, env={"WORKLOAD_MDWE": "1"})
    assert w.output() == ref.output()


def test_a_process_without_a_vdso(tmp_path: Path) -> None:
    # System calls are run in a process from a syscall instruction of its vDSO; one that has
    # none (valgrind's, or a sandbox's) lends one from its code. It runs on without a vDSO.
    ref, w, _ = migrate_once("ckpt_no_vdso", tmp_path)
    assert w.output() == ref.output() and w.output().endswith("vdso absent\n")


def stopped_and_continued(pid: int) -> None:
    """SIGSTOP, SIGCONT: the sleeping thread goes on in restart_syscall (219). SIGCONT only once
    it has stopped: sent before (a busy machine), it discards the pending SIGSTOP and the
    sleep is never interrupted."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 20
    while proc_state(pid) != "T":
        assert time.monotonic() < deadline, f"pid {pid} did not stop"
        time.sleep(0.001)
    os.kill(pid, signal.SIGCONT)
    in_call(pid, 219)


def in_call(pid: int, nr: int, timeout: float = 20) -> None:
    """Wait until ``pid``'s thread sleeps in system call ``nr`` (/proc/PID/syscall)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            now = Path(f"/proc/{pid}/syscall").read_text().split()[0]
        except (OSError, IndexError):
            now = "gone"
        if now == str(nr):
            return
        assert proc_state(pid) not in (None, "Z", "X"), f"pid {pid} ended: its sleep did not go on"
        assert time.monotonic() < deadline, f"pid {pid} is in system call {now}, not {nr}"
        time.sleep(0.01)


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_a_sleep_continued_after_a_stop_sleeps_on_after_the_move(tmp_path: Path, how: str) -> None:
    """Stopped and continued (Slurm's suspend and resume, a debugger, a migration called off),
    a sleeping thread goes on in restart_syscall, which names no call: moved so, it returned
    EINTR at once and its sleep ended. The call is read from the code that made it (glibc's
    clock_nanosleep): the moved thread sleeps in it again."""
    proc = start_until_ready([str(build("restart_sleep")), str(tmp_path), "glibc"], tmp_path / "ready",
                             start_new_session=True)
    stopped_and_continued(proc.pid)
    pid = moved(proc, how, tmp_path)
    try:
        in_call(pid, 230)                      # clock_nanosleep
        assert not (tmp_path / "output").exists()
    finally:
        os.kill(pid, signal.SIGKILL)
        reap(pid)


def test_a_restarted_call_no_code_names_returns_eintr_with_a_warning(tmp_path: Path) -> None:
    """The same sleep made through syscall(), whose number comes from a register: nothing
    names the call, so it returns EINTR, as CRIU's restore does, and the restore says so."""
    proc = start_until_ready([str(build("restart_sleep")), str(tmp_path), "register"], tmp_path / "ready",
                             start_new_session=True)
    stopped_and_continued(proc.pid)
    image = tmp_path / "img"
    assert kcr("checkpoint", str(proc.pid), "-o", str(image)).returncode == 0
    assert proc.wait(timeout=30) == -9
    res = kcr("restore", "-i", str(image))
    assert res.returncode == 0, res.stderr.decode()
    assert "restart_syscall" in res.stderr.decode() and "EINTR" in res.stderr.decode(), res.stderr.decode()
    assert reap(proc.pid) == 0
    assert (tmp_path / "output").read_text() == "slept: Interrupted system call\n"


def test_files_and_mapping_kinds(tmp_path: Path) -> None:
    ref, w, _ = migrate_once("ckpt_files", tmp_path)
    assert w.output() == ref.output() == "files checked: all good\n"
    assert (w.dir / "log.txt").read_text() == "before\nafter\n"


def test_pipes_and_shared_descriptions(tmp_path: Path) -> None:
    """A self-pipe with bytes in it, a pipe whose writer is gone, one whose reader is gone, a
    resized pipe with 200 KiB in flight, flags per description, and dup'd fds sharing an offset."""
    ref, w, _ = migrate_once("ckpt_pipes", tmp_path)
    assert w.output() == ref.output() == "pipes and descriptions checked: all good\n"
    assert (w.dir / "shared.log").read_text() == "one\ntwo\nthree\nfour\n"


def test_unix_sockets_inside_the_process(tmp_path: Path) -> None:
    """Socketpairs of each type with messages queued, shutdown state, a closed peer, an
    unconnected socket, options and flags per end."""
    ref, w, _ = migrate_once("ckpt_sockets", tmp_path)
    assert w.output() == ref.output() == "sockets checked: all good\n"


def test_epoll_eventfd_timerfd_signalfd(tmp_path: Path) -> None:
    ref, w, _ = migrate_once("ckpt_events", tmp_path)
    assert w.output() == ref.output() == "events checked: all good\n"


def kernel_has_guard_pages() -> bool:
    """MADV_GUARD_INSTALL (Linux 6.13)."""
    with mmap.mmap(-1, mmap.PAGESIZE) as m:
        try:
            m.madvise(102)
        except OSError:
            return False
    return True


def test_locked_memory_thp_flag_and_oom_score_adj(tmp_path: Path) -> None:
    ref, w, _ = migrate_once("ckpt_attrs", tmp_path)
    guards = "installed" if kernel_has_guard_pages() else "not on this kernel"
    assert w.output() == ref.output() == f"guard pages: {guards}\nattributes checked: all good\n"


def test_zombie_children_come_back_as_they_ended(tmp_path: Path) -> None:
    """Children that exited or were killed, not yet reaped: after the restore the parent's
    waitpid() of each finds the same end (an exit status, or the signal that killed it)."""
    ref, w, _ = migrate_once("ckpt_zombies", tmp_path)
    assert w.output() == ref.output() == ("child 0: exited 0\nchild 1: exited 3\nchild 2: killed by 9\n"
                                          "child 3: killed by 15\n")


def _left_behind(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A job (sh, then sleep) that left a background process of its session behind: (the job,
    that process)."""
    job = subprocess.Popen(["sh", "-c", "(sleep 600 &); exec sleep 600"], start_new_session=True,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    STARTED.append(job)
    deadline = time.monotonic() + 30
    while not (outsiders := [p for p in os.listdir("/proc") if p.isdigit() and int(p) != job.pid
                             and Path(f"/proc/{p}/stat").exists()
                             and _stat_fields(int(p))[:2] == ("sleep", str(job.pid))]) \
            or Path(f"/proc/{job.pid}/comm").read_text().strip() != "sleep":
        assert time.monotonic() < deadline, "the job never left its background process behind"
        time.sleep(0.01)
    return job, int(outsiders[0])


def test_a_live_move_names_a_session_member_it_leaves_behind(tmp_path: Path) -> None:
    """The same, live: what stays at the source (a daemon the job double-forked, a background
    process of its shell) is named in the report; the job moves."""
    job, outsider = _left_behind(tmp_path)
    code, report, err = migrate_cli(f"{job.pid}@localhost", "localhost", "--new-pid")
    assert code == 0, err
    said = f"pid {outsider} (sleep) is in the session of pid {job.pid} but not in the job: it is not moved"
    assert any(said in w for w in report["warnings"]), report["warnings"]
    assert Path(f"/proc/{outsider}").exists()                # left where it was, running
    for pid in (int(report["new_pid"]), outsider):
        os.kill(pid, signal.SIGKILL)
        reap(pid)


def test_a_session_member_left_outside_the_tree_is_named_when_it_keeps_the_pid(tmp_path: Path) -> None:
    """A background process the job's shell left behind (reparented: not in the job's tree)
    stays in the job's session, which keeps the root's pid in use after the checkpoint: the
    checkpoint warns, the restore says who keeps it, and works once that process has ended."""
    job, outsider = _left_behind(tmp_path)
    image = tmp_path / "job.img"
    res = kcr("checkpoint", str(job.pid), "-o", str(image))
    assert res.returncode == 0, res.stderr.decode()
    # the checkpoint says so already: the image is whole, but not for this host while it runs
    assert f"pid {outsider} (sleep) is in the session of pid {job.pid} but not in the job" in res.stderr.decode()
    job.wait()
    res = kcr("restore", "-i", str(image))
    assert res.returncode != 0
    assert f"the session of pid {outsider} (sleep)" in _one_error_line(res.stderr), res.stderr.decode()
    os.kill(outsider, signal.SIGKILL)
    reap(outsider)
    res = kcr("restore", "-i", str(image), "--json")
    assert res.returncode == 0, res.stderr.decode()
    pid = int(json.loads(res.stdout.decode())["pid"])
    assert pid == job.pid
    os.kill(pid, signal.SIGKILL)
    reap(pid)


def _stat_fields(pid: int) -> tuple[str, str]:
    """(comm, session id) of ``pid``; ("", "") if it is gone."""
    try:
        head, _, rest = Path(f"/proc/{pid}/stat").read_text().rpartition(")")
    except OSError:
        return "", ""
    return head.partition("(")[2], rest.split()[3]


def test_scheduling_per_thread(tmp_path: Path) -> None:
    """nice, SCHED_RR with reset-on-fork, SCHED_BATCH, SCHED_IDLE, pinning, timer slack: each thread's own."""
    ref, w, _ = migrate_once("ckpt_sched", tmp_path)
    assert w.output() == ref.output() == "scheduling checked: all good\n"


def test_numa_policies_per_thread_and_per_mapping(tmp_path: Path) -> None:
    """set_mempolicy in each thread, mbind on mappings (a mapping's middle too), with mode
    flags: each comes back, none as the default."""
    ref, w, _ = migrate_once("ckpt_numa", tmp_path)
    assert w.output() == ref.output() == "NUMA policies checked: all good\n"


def test_file_locks(tmp_path: Path) -> None:
    """POSIX record locks (a range, and to EOF), an OFD lock, a flock: held again, excluding others."""
    ref, w, _ = migrate_once("ckpt_locks", tmp_path)
    assert w.output() == ref.output() == "locks checked: all held (0)\n"


def test_unprivileged_user_keeps_credentials(tmp_path: Path) -> None:
    nobody = 65534
    ref, w, _ = migrate_once("ckpt_creds", tmp_path, user=nobody, groups=[nobody, 100])
    assert w.output() == ref.output()
    assert w.output().startswith(f"uid {nobody}/{nobody}/{nobody} gid {nobody}/{nobody}/{nobody} groups 2 caps 0")


PY_WORKLOAD = r"""
import hashlib, os, sys, time
out_dir = sys.argv[1]
buf = bytearray(16 << 20)
h = b"seed"
with open(os.path.join(out_dir, "output"), "w") as out:
    for i in range(50):
        for j in range(0, len(buf), 4096 * 8):
            h = hashlib.sha256(h + bytes(buf[j:j + 64])).digest()
            buf[j:j + 32] = h
        out.write(f"{i} {h.hex()}\n")
        out.flush()
        if i == 5:
            open(os.path.join(out_dir, "ready"), "w").close()
        # held (WORKLOAD_HOLD), it waits here for the test's verdict: on a busy machine a
        # checkpoint that starts late still lands mid-run, never after the end
        while i == 45 and os.environ.get("WORKLOAD_HOLD") and not os.path.exists(os.environ["WORKLOAD_HOLD"]):
            time.sleep(0.01)
        time.sleep(0.02)
with open(os.path.join(out_dir, ".verdict"), "w") as v:      # whole, or not there: the test polls
    v.write("PASS\n")
os.replace(os.path.join(out_dir, ".verdict"), os.path.join(out_dir, "verdict"))
"""


def test_cpython_script(tmp_path: Path) -> None:
    script = tmp_path / "hashchain.py"
    script.write_text(PY_WORKLOAD)
    ref = Workload("py", tmp_path / "reference", argv=[sys.executable, "-S", str(script), str(tmp_path / "reference" / "py")])
    ref.start()
    assert ref.verdict() == "PASS"
    ref.reap_original()
    w = Workload("py", tmp_path / "restored", argv=[sys.executable, "-S", str(script), str(tmp_path / "restored" / "py")],
                 hold=True)
    w.start()
    w.wait_ready()
    new_pid, _ = checkpoint_and_restore(w, tmp_path)
    assert w.verdict() == "PASS"
    assert os.WEXITSTATUS(reap(new_pid)) == 0
    assert w.output() == ref.output()
    assert w.output().count("\n") == 50


def test_pipe_round_trip(tmp_path: Path) -> None:
    ref = run_reference("ckpt_threads", tmp_path, scale=3)
    w = Workload("ckpt_threads", tmp_path / "piped", scale=3, hold=True)
    w.start()
    w.wait_ready()
    # Streamed into a restore on the same host, the image is rebuilt while the original still
    # holds its pid: this one needs --new-pid.
    cmd = " ".join(KCR_MIGRATE) + f" checkpoint {w.pid} -o - | " + " ".join(KCR_MIGRATE) + " restore -i - --new-pid"
    res = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    w.reap_original()
    new_pid = int(res.stdout.decode().split()[-1])
    assert new_pid != w.pid
    assert w.verdict() == "PASS"
    assert os.WEXITSTATUS(reap(new_pid)) == 0
    assert w.output() == ref.output()


def test_threads_keep_their_ids(tmp_path: Path) -> None:
    """The restored process has its own pid and every thread its own tid."""
    w = Workload("ckpt_threads", tmp_path, scale=3, hold=True)
    w.start()
    w.wait_ready()
    image = tmp_path / "img"
    assert kcr("checkpoint", str(w.pid), "-o", str(image)).returncode == 0
    w.reap_original()
    tids = sorted(t["tid"] for t in json.loads(kcr("show", str(image)).stdout)["threads"])
    assert len(tids) == 5
    res = kcr("restore", str(image), "--json")          # the image as a positional, like show's
    assert res.returncode == 0, res.stderr.decode()
    pid = json.loads(res.stdout)["pid"]
    assert pid == w.pid
    try:
        assert sorted(int(t) for t in os.listdir(f"/proc/{pid}/task")) == tids
    finally:
        assert w.verdict() == "PASS"
        assert os.WEXITSTATUS(reap(pid)) == 0


def test_restore_where_the_pid_is_taken(tmp_path: Path) -> None:
    """The original still runs: restore refuses, naming the pid, and leaves nothing behind;
    with --new-pid it restores a copy under a new pid."""
    w = Workload("ckpt_array", tmp_path / "orig", "120", hold=True)
    w.start()
    w.wait_ready()
    image = tmp_path / "img"
    assert kcr("checkpoint", str(w.pid), "-o", str(image), "--leave-running").returncode == 0
    line = one_error_line(kcr("restore", "-i", str(image)))
    assert f"pid {w.pid} is taken" in line and "--new-pid" in line
    res = kcr("restore", "-i", str(image), "--new-pid")
    assert res.returncode == 0, res.stderr.decode()
    copy = int(res.stdout.split()[-1])
    assert copy != w.pid
    w.release()                   # the original and its copy: both held until now
    assert os.WEXITSTATUS(reap(copy)) == 0
    assert w.verdict() == "PASS"
    assert w.reap_original() == 0


def test_leave_running_then_restore_a_copy(tmp_path: Path) -> None:
    w = Workload("ckpt_array", tmp_path / "orig", "30", hold=True)
    w.start()
    w.wait_ready()
    image = tmp_path / "img"
    res = kcr("checkpoint", str(w.pid), "-o", str(image), "--leave-running")
    assert res.returncode == 0, res.stderr.decode()
    assert w.verdict() == "PASS"                      # the original ran on, undisturbed
    assert w.reap_original() == 0
    assert w.output().count("iter ") == 30
    show = kcr("show", str(image))
    assert show.returncode == 0, show.stderr.decode()
    doc = json.loads(show.stdout)
    assert doc["header"]["pid"] == w.pid and doc["header"]["arch"] == os.uname().machine
    assert {"process", "files", "mappings", "threads", "page_index", "end"} <= doc.keys()
    assert sum(r["pages"] for r in doc["page_index"]) == doc["end"]["pages"]


def test_leave_running_runs_on_while_its_image_is_written(tmp_path: Path) -> None:
    """--leave-running freezes the process only while it is read: it runs on while its image
    is still being written (here into a pipe that nobody reads yet, so the writing waits),
    and the image is whole once read."""
    w = Workload("ckpt_array", tmp_path / "orig", "300", hold=True)
    w.start()
    w.wait_ready()
    r, wr = os.pipe()
    ckpt = subprocess.Popen([*KCR_MIGRATE, "checkpoint", str(w.pid), "-o", "-", "--leave-running"],
                            stdout=wr, stderr=subprocess.PIPE)
    os.close(wr)
    try:
        assert select.select([r], [], [], 120)[0], "the checkpoint wrote nothing"
        ran = w.output().count("iter ")
        deadline = time.monotonic() + 60
        while w.output().count("iter ") < ran + 2:          # two more steps: it runs
            assert time.monotonic() < deadline, "the process stayed frozen while its image was written"
            time.sleep(0.05)
        assert ckpt.poll() is None                          # while the image waits to be read
        image = tmp_path / "img"
        with open(image, "wb") as f:
            while chunk := os.read(r, 1 << 20):
                f.write(chunk)
        assert ckpt.wait(120) == 0, ckpt.stderr.read().decode() if ckpt.stderr else ""
    finally:
        os.close(r)
        if ckpt.poll() is None:
            ckpt.kill()
            ckpt.wait()
        if ckpt.stderr:
            ckpt.stderr.close()
    show = kcr("show", str(image))
    assert show.returncode == 0, show.stderr.decode()
    assert json.loads(show.stdout)["end"]["pages"] >= (64 << 20) // 4096
    assert w.verdict() == "PASS"
    assert w.reap_original() == 0


# --- bad input -------------------------------------------------------------------------------

def one_error_line(res: subprocess.CompletedProcess[bytes]) -> str:
    assert res.returncode != 0
    return _one_error_line(res.stderr)


def test_missing_pid(tmp_path: Path) -> None:
    line = one_error_line(kcr("checkpoint", "4194303", "-o", str(tmp_path / "x")))
    assert "no process" in line
    assert not (tmp_path / "x").exists()


def test_kernel_thread_and_own_pid(tmp_path: Path) -> None:
    assert "kernel thread" in one_error_line(kcr("checkpoint", "2", "-o", str(tmp_path / "x")))
    res = subprocess.run(["bash", "-c", " ".join(KCR_MIGRATE) + f" checkpoint $$ -o {tmp_path / 'y'}"],
                         capture_output=True, timeout=60)
    # bash execs the tool as the last command, so $$ is the tool's own pid
    assert "own process" in one_error_line(res)


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_refuses_a_link_to_the_outside_and_leaves_process_running(tmp_path: Path, kind: str) -> None:
    """A process with a pipe or unix socket whose other end stays outside (here, with the
    test) is refused before anything is frozen, naming the process at the other end; it runs on."""
    w = Workload("ckpt_array", tmp_path / "linked", "20", hold=True)
    if kind == "pipe":
        theirs, ours = os.pipe()
    else:
        a, b = socket.socketpair()
        theirs, ours = a.detach(), b.detach()
    w.argv = ["bash", "-c", f"exec 5</dev/null; exec {' '.join(w.argv)} 7<&{theirs}"]
    w.proc = subprocess.Popen(w.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, pass_fds=(theirs,), start_new_session=True, env=w.env)
    STARTED.append(w.proc)
    os.close(theirs)
    try:
        w.pid = w.proc.pid
        w.wait_ready()
        line = one_error_line(kcr("checkpoint", str(w.pid), "-o", str(tmp_path / "img")))
        shared = "a pipe shared with" if kind == "pipe" else "a unix socket connected to"
        assert f"fd 7 is {shared} pid {os.getpid()} (" in line
        assert "--redirect 7=PATH" in line
        assert not (tmp_path / "img").exists()
        assert w.verdict() == "PASS"
        assert w.reap_original() == 0
    finally:
        os.close(ours)


@pytest.mark.parametrize("stdio", ["pipes", "terminal"])
def test_every_fd_to_redirect_is_named_at_once(tmp_path: Path, stdio: str) -> None:
    """A job started over ssh holds three pipes to sshd; one started from a shell, the terminal
    on two or three fds: the refusal names every one and the --redirect options for all, so
    the second try is the last."""
    ready = tmp_path / "ready"
    argv = [sys.executable, "-S", "-c", "import sys, time\nopen(sys.argv[1], 'w').close()\ntime.sleep(60)\n",
            str(ready)]
    leader = -1
    if stdio == "pipes":
        proc = start_until_ready(argv, ready, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        expected = ("fd 0 is a pipe shared with pid", "(as are its fds 1, 2)",
                    "give --redirect 0=PATH --redirect 1=PATH --redirect 2=PATH to open PATH")
    else:
        leader, follower = os.openpty()
        proc = start_until_ready(argv, ready, stdout=follower, stderr=follower)
        expected = (f"has a terminal ({os.ttyname(follower)}) open as fds 1, 2:",
                    "give --redirect 1=PATH --redirect 2=PATH to open PATH")
        os.close(follower)
    try:
        line = one_error_line(kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img")))
        for part in expected:
            assert part in line, line
        assert proc_state(proc.pid) in ("S", "R")
    finally:
        proc.kill()
        proc.communicate()
        if leader >= 0:
            os.close(leader)


@pytest.mark.parametrize("holding, expected", [
    ("socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)", "a socket other than a unix, TCP or UDP one"),
    ("socket.socket(socket.AF_UNIX); os.chdir(os.path.dirname(sys.argv[2])); keep.bind('sock')",
     "bound to the relative path sock"),
])
def test_refuses_sockets_it_cannot_carry(tmp_path: Path, holding: str, expected: str) -> None:
    """A netlink socket, a unix socket bound to a relative path: one line, before anything is
    frozen; it runs on. (TCP: tests/test_inet_sockets.py.)"""
    script = f"import os, socket, sys, time\nkeep = {holding}\nopen(sys.argv[1], 'w').close()\ntime.sleep(60)\n"
    ready = tmp_path / "ready"
    proc = start_until_ready([sys.executable, "-c", script, str(ready), str(tmp_path / "sock")], ready)
    line = one_error_line(kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img")))
    assert expected in line, line
    assert proc_state(proc.pid) in ("S", "R")


# The bad-image tests restore with --new-pid: the image's pid is long gone and may be anyone's
# by now (pids wrap quickly on a busy machine); what they test comes before or after it.
@pytest.mark.parametrize("holding, expected", [
    ("os.mkdir(sys.argv[2]); os.chdir(sys.argv[2]); os.rmdir(sys.argv[2])", "working directory is"),
    ("keep = open(f'/proc/{os.getpid()}/status')", "a file of a process under /proc"),
    ("keep = open('/proc/self/stat')", "a file of a process under /proc"),
    ("import ctypes; ctx = ctypes.c_ulong(); assert ctypes.CDLL(None).syscall(206, 8, ctypes.byref(ctx)) == 0",
     "has a Linux AIO context (io_setup) at"),
    ("import fcntl, signal; signal.signal(signal.SIGIO, signal.SIG_IGN); "
     "keep = os.open(os.path.dirname(sys.argv[1]), os.O_RDONLY); "
     "fcntl.fcntl(keep, fcntl.F_NOTIFY, fcntl.DN_CREATE | fcntl.DN_MULTISHOT)", "as a dnotify watch (fcntl F_NOTIFY)"),
])
def test_refuses_what_restore_could_not_rebuild(tmp_path: Path, holding: str, expected: str) -> None:
    """A deleted working directory, an fd on a /proc/PID file: checkpoint used to write the
    image, kill the process, and the image could not be restored. A Linux AIO context: its
    ring was carried as memory and the restored process's io_getevents() failed. A dnotify
    watch: dropped, and the restored process told of no change. Refused before freezing."""
    script = f"import os, sys, time\n{holding}\nopen(sys.argv[1], 'w').close()\ntime.sleep(60)\n"
    ready = tmp_path / "ready"
    proc = start_until_ready([sys.executable, "-c", script, str(ready), str(tmp_path / "gone")], ready)
    line = one_error_line(kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img")))
    assert expected in line, line
    assert not (tmp_path / "img").exists()
    assert proc_state(proc.pid) in ("S", "R")


def test_a_posix_message_queue_is_refused_before_anything_freezes(tmp_path: Path) -> None:
    """An mq_open() queue's fd looks like a regular file at /NAME: the checkpoint was written
    and the process killed, and the restore failed ("No such file or directory"): the job was
    lost. Refused before freezing, by checkpoint and live; it runs on."""
    libc = ctypes.CDLL(None, use_errno=True)
    name = f"/kcr-test-{os.getpid()}".encode()
    script = (f"import ctypes, os, sys, time\nkeep = ctypes.CDLL(None).mq_open({name!r}, os.O_RDWR | os.O_CREAT, "
              "0o600, None)\nassert keep >= 0\nopen(sys.argv[1], 'w').close()\ntime.sleep(60)\n")
    ready = tmp_path / "ready"
    try:
        proc = start_until_ready([sys.executable, "-c", script, str(ready)], ready)
        line = one_error_line(kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img")))
        assert f"has a POSIX message queue ({name.decode()}) open as fd" in line, line
        assert not (tmp_path / "img").exists()
        code, _, err = migrate_cli(f"{proc.pid}@localhost", "localhost", "--new-pid")
        assert code != 0 and "a POSIX message queue" in err, err
        assert proc_state(proc.pid) in ("S", "R")
    finally:
        libc.mq_unlink(name)


def test_a_process_whose_main_thread_exited_is_refused_and_runs_on(tmp_path: Path) -> None:
    """pthread_exit() in main while another thread runs (CRIU's zdtm pthread02): the process
    lives on in that thread, its leader a zombie. It was refused as "a zombie: it has already
    exited", which it has not: the refusal says what it is, and the process runs on."""
    script = ("import ctypes, sys, threading, time\n"
              "def work():\n    open(sys.argv[1], 'w').close()\n    while True:\n        time.sleep(0.02)\n"
              "threading.Thread(target=work).start()\nctypes.CDLL(None).pthread_exit(None)\n")
    ready = tmp_path / "ready"
    proc = start_until_ready([sys.executable, "-c", script, str(ready)], ready)
    deadline = time.monotonic() + 30
    while proc_state(proc.pid) != "Z":
        assert time.monotonic() < deadline, "the main thread never exited"
        time.sleep(0.01)
    line = one_error_line(kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img")))
    assert f"pid {proc.pid}'s main thread has exited (pthread_exit) while its other threads run on" in line, line
    assert not (tmp_path / "img").exists()
    assert len(os.listdir(f"/proc/{proc.pid}/task")) == 2, "its other thread runs on"


def test_a_memfd_secret_area_is_refused_before_anything_freezes(tmp_path: Path) -> None:
    """memfd_secret(): memory no other process may read, so none can be carried; its fd looks
    like a deleted file (/secretmem). Refused by name, before anything is frozen."""
    fd = ctypes.CDLL(None, use_errno=True).syscall(447, 0)
    if fd < 0:
        pytest.skip(f"this kernel has no memfd_secret ({os.strerror(ctypes.get_errno())}: secretmem.enable=0?)")
    os.close(fd)
    script = ("import ctypes, mmap, os, sys, time\nkeep = ctypes.CDLL(None).syscall(447, 0)\nos.ftruncate(keep, 4096)\n"
              "area = mmap.mmap(keep, 4096)\narea[:6] = b'secret'\nopen(sys.argv[1], 'w').close()\ntime.sleep(60)\n")
    ready = tmp_path / "ready"
    proc = start_until_ready([sys.executable, "-c", script, str(ready)], ready)
    line = one_error_line(kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img")))
    assert "has a memfd_secret() area (memory no other process may read) open as fd" in line, line
    assert proc_state(proc.pid) in ("S", "R")


def test_a_file_the_process_could_not_open_itself_is_refused_before_the_kill(tmp_path: Path) -> None:
    """A job run as a user with its output in a file only root may open (a root shell's
    'sudo -u user job > log'): the checkpoint wrote the image and killed the job, and restore,
    which grants the process nothing more than its own rights, refused the file: the job was
    lost. Refused before the kill now, naming the fd and the way out; the job runs on."""
    log = tmp_path / "root-only.log"
    log.write_text("")
    log.chmod(0o600)
    with open(log, "w") as out:
        proc = subprocess.Popen(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "sleep", "60"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.DEVNULL, close_fds=True)
    STARTED.append(proc)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "sleep":     # exec'd, as the user
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    line = one_error_line(kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img")))
    assert f"fd 1 is {log}, which the process (its uid 65534 (gid 65534, groups none)) could not open itself" in line
    assert "--redirect 1=PATH" in line, line
    assert not (tmp_path / "img").exists()
    assert proc_state(proc.pid) in ("S", "R")


@pytest.fixture(scope="module")
def good_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    base = tmp_path_factory.mktemp("img")
    w = Workload("ckpt_blocked", base, scale=3, hold=True)
    w.start()
    w.wait_ready()
    res = kcr("checkpoint", str(w.pid), "-o", "-", "--leave-running")
    assert res.returncode == 0, res.stderr.decode()
    w.verdict()
    w.reap_original()
    return res.stdout


def test_truncated_image(good_image: bytes) -> None:
    for cut in (0, 5, 100, len(good_image) // 2, len(good_image) - 1):
        line = one_error_line(kcr("restore", "--new-pid", "-i", "-", input=good_image[:cut]))
        assert "truncated" in line or "empty" in line


def test_bit_flipped_image(good_image: bytes) -> None:
    for pos in (20, len(good_image) // 3, len(good_image) - 40):
        bad = bytearray(good_image)
        bad[pos] ^= 0x10
        line = one_error_line(kcr("restore", "--new-pid", "-i", "-", input=bytes(bad)))
        assert "corrupt" in line or "checksum" in line or "magic" in line


def test_foreign_architecture(good_image: bytes) -> None:
    line = one_error_line(kcr("restore", "--new-pid", "--trust-image", "-i", "-",
                              input=edit_records(good_image, ImageHeader.TYPE, arch="aarch64")))
    assert "aarch64" in line


def test_future_format_version(good_image: bytes) -> None:
    line = one_error_line(kcr("restore", "--new-pid", "--trust-image", "-i", "-",
                              input=edit_records(good_image, ImageHeader.TYPE, format_version=99)))
    assert "version 99" in line and "upgrade" in line


def test_missing_xsave_features(good_image: bytes) -> None:
    line = one_error_line(kcr("restore", "--new-pid", "--trust-image", "-i", "-",
                              input=edit_records(good_image, ImageHeader.TYPE, xsave_mask=1 << 62)))
    assert "CPU" in line


def test_not_an_image(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello world, not an image" * 10)
    assert "not a kcr-migrate image" in one_error_line(kcr("restore", "-i", str(junk)))
    assert "not a kcr-migrate image" in one_error_line(kcr("show", str(junk)))


def test_restore_failure_leaves_nothing_behind(tmp_path: Path, good_image: bytes) -> None:
    """A file the process had open is gone: restore fails cleanly and kills its half-built process."""
    w = Workload("ckpt_files", tmp_path, scale=5)
    w.start()
    w.wait_ready()
    res = kcr("checkpoint", str(w.pid), "-o", str(tmp_path / "img"))
    assert res.returncode == 0, res.stderr.decode()
    w.reap_original()
    os.unlink(w.dir / "log.txt")
    before = set(os.listdir("/proc"))
    line = one_error_line(kcr("restore", "--new-pid", "-i", str(tmp_path / "img")))
    assert "log.txt" in line
    # The half-built process was killed: as subreaper we adopted it, so reap it, then look.
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
    alive = []
    for pid in set(os.listdir("/proc")) - before:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        comm, state = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2]
        if comm in ("kcr-stub", "ckpt_files") and state != "Z":
            alive.append(pid)
    assert not alive


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15, 0.3])
def test_checkpoint_interrupted_never_loses_the_process(tmp_path: Path, delay: float) -> None:
    """Ctrl-C at any moment: either a whole image and a killed process, or no image and a
    process that runs on undisturbed; never a frozen, dead or damaged one."""
    w = Workload("ckpt_array", tmp_path, "30", hold=True)
    w.start()
    w.wait_ready()
    image = tmp_path / "img"
    proc = subprocess.Popen([*KCR_MIGRATE, "checkpoint", str(w.pid), "-o", str(image)],
                            stderr=subprocess.PIPE)
    # Counted from the moment the tool takes hold of the process: before that, a busy machine
    # may still be starting the interpreter, whose own Ctrl-C handling is not ours to test.
    deadline = time.monotonic() + 60
    while "TracerPid:\t0\n" in Path(f"/proc/{w.pid}/status").read_text() and proc.poll() is None:
        assert time.monotonic() < deadline, "the checkpoint never took hold of the process"
        time.sleep(0.001)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err, err.decode()
    # The invariant, whatever the exit status (Ctrl-C may land after the image is complete):
    # an image exists exactly when the process was killed for it.
    if image.exists():
        assert w.reap_original() == -signal.SIGKILL
        assert kcr("show", str(image)).returncode == 0
    else:
        assert proc.returncode != 0
        assert w.verdict() == "PASS"
        assert w.reap_original() == 0
        assert w.output().count("iter ") == 30


ONE_SHOT = r"""
import os, select, sys, time
r, w = os.pipe()
ep = select.epoll()
ep.register(r, select.EPOLLIN | select.EPOLLONESHOT)
os.write(w, b"x")
assert ep.poll(0) == [(r, select.EPOLLIN)]       # fired: disabled until re-armed
os.read(r, 1)                                    # and its pipe is not ready any more
open(sys.argv[1], "w").close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
quiet = ep.poll(0) == []
os.write(w, b"y")
still = ep.poll(0) == []                         # ready now, but the watch waits to be re-armed
ep.modify(r, select.EPOLLIN | select.EPOLLONESHOT)
again = ep.poll(0) == [(r, select.EPOLLIN)]
sys.exit(0 if quiet and still and again else 1)
"""


def test_a_fired_one_shot_watch_whose_file_is_not_ready_is_warned(tmp_path: Path) -> None:
    """A one-shot epoll watch that fired is disabled, which no epoll_ctl can set: restore makes
    it fire again, which needs its file ready; here it is not, so the report says what the
    watch does instead (reports hangups and errors only) and it stays quiet for input."""
    script, ready, go = tmp_path / "oneshot.py", tmp_path / "ready", tmp_path / "go"
    script.write_text(ONE_SHOT)
    proc = start_until_ready([sys.executable, "-S", str(script), str(ready), str(go)], ready)
    image = tmp_path / "img"
    assert kcr("checkpoint", str(proc.pid), "-o", str(image)).returncode == 0
    assert proc.wait(timeout=30) == -signal.SIGKILL
    res = kcr("restore", "-i", str(image), "--json")
    assert res.returncode == 0, res.stderr.decode()
    result = json.loads(res.stdout)
    assert any("one-shot epoll watch of fd" in w for w in result["warnings"]), result
    go.touch()
    status = reap(int(result["pid"]))
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


HIDDEN_DATAGRAM = r"""
import socket, sys, time
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
for m in (b"first", b"", b"third"):
    a.send(m)
b.setsockopt(socket.SOL_SOCKET, 42, 0)                 # SO_PEEK_OFF: peek along the queue
assert b.recv(64, socket.MSG_PEEK) == b"first" and b.recv(64, socket.MSG_PEEK) == b""
open(sys.argv[1], "w").close()
time.sleep(60)
"""


def test_a_datagram_no_peek_shows_is_refused_not_lost(tmp_path: Path) -> None:
    """An empty datagram the program has peeked at is hidden from every later peek: the dump
    sees its sender charged for more than the queue shows, and refuses; the process runs on."""
    ready = tmp_path / "ready"
    proc = start_until_ready([sys.executable, "-S", "-c", HIDDEN_DATAGRAM, str(ready)], ready)
    line = one_error_line(kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img")))
    assert "a message queued that no peek shows" in line, line
    assert not (tmp_path / "img").exists() and proc_state(proc.pid) in ("S", "R")
