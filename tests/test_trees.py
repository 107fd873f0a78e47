"""Process trees through checkpoint and restore: a process with all its descendants, their pids,
parent links, sessions and groups, and the pipes, sockets and open files they share.

Each job is checkpointed mid-run and restored; it must finish with the output of an unmoved
run, every process under its own pid again. The test process is a child subreaper: restored
processes are adopted (and reaped) here, and so are the checkpointed tree's killed children.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import freeze
from agent.holder import Holder
from tests._fuzz import TRUST, Frame, children, end_strays, seal, split_image
from tests._hosts import wait_file
from tests._migration import migrate_cli
from tests._workloads import (STARTED, Workload, become_subreaper, build, finished, kcr, one_error_line, reap,
                              start_reference, start_until_ready)
from transport.errors import ProcessExited
from transport.schema import (EndOfImage, EventFiles, FileContents, Files, InetSockets, ParentPages, Pipes, ProcessBegin,
                              ProcessState, ThreadState, UnixSockets)


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    become_subreaper()


def tree(pid: int) -> dict[int, int]:
    """pid -> parent pid, for ``pid`` and all its descendants."""
    out = {pid: 0}
    todo = [pid]
    while todo:
        p = todo.pop()
        for tid in os.listdir(f"/proc/{p}/task"):
            for child in Path(f"/proc/{p}/task/{tid}/children").read_text().split():
                out[int(child)] = p
                todo.append(int(child))
    return out


def reap_orphans(pids: list[int]) -> None:
    """The checkpointed tree's children, killed, were adopted here: reap them, so their pids
    are free for the restore (init does this for a user)."""
    deadline = time.monotonic() + 30
    for pid in pids:
        while True:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:
                if not Path(f"/proc/{pid}").exists():
                    break          # reaped by whoever was its parent
            assert time.monotonic() < deadline, f"killed child {pid} was not reaped"
            time.sleep(0.01)


def checkpoint(root: int, image: Path, processes: int) -> None:
    res = kcr("checkpoint", str(root), "-o", str(image))
    assert res.returncode == 0, res.stderr.decode()
    assert f"{processes} processes" in res.stderr.decode()


def image_restored(image: Path, before: dict[int, int], *options: str) -> int:
    reap_orphans([p for p in before if before[p]])
    res = kcr("restore", "-i", str(image), "--json", *options)
    assert res.returncode == 0, res.stderr.decode()
    root = next(iter(before))
    assert int(res.stdout.split(b'"pid": ')[1].split(b",")[0]) == root
    # The same processes, under the same pids, with the same parents (the root's is now us).
    after = tree(root)
    assert {p: pp for p, pp in after.items() if p != root} == {p: pp for p, pp in before.items() if p != root}
    return root


def test_shell_pipeline(tmp_path: Path) -> None:
    """sh -c 'gen | tr | sort > out': three children with two pipes holding data, sort's
    input not read to its end yet; sh waits for them by pid."""
    gen = tmp_path / "gen.py"
    gen.write_text("import sys, time\nfor i in range(int(sys.argv[1])):\n"
                   "    print(f'line {i} of the pipeline', flush=True)\n    time.sleep(0.003)\n")
    script = f"{sys.executable} -S {gen} 1500 | tr a-z A-Z | sort > out; echo $? > status"

    def run(where: Path) -> subprocess.Popen[bytes]:
        where.mkdir()
        proc = subprocess.Popen(["sh", "-c", script], cwd=where, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        STARTED.append(proc)
        return proc
    ref = run(tmp_path / "reference")        # unmoved, beside the moved one
    proc = run(tmp_path / "moved")
    deadline = time.monotonic() + 60
    while len(tree(proc.pid)) < 4:           # sh and its three children
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.005)
    time.sleep(0.3)                          # the pipes fill
    before = tree(proc.pid)
    checkpoint(proc.pid, tmp_path / "tree.img", 4)
    assert proc.wait(timeout=30) == -9
    root = image_restored(tmp_path / "tree.img", before)
    status = reap(root, timeout=120)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert (tmp_path / "moved" / "status").read_text() == "0\n"
    assert ref.wait(timeout=120) == 0
    assert (tmp_path / "moved" / "out").read_bytes() == (tmp_path / "reference" / "out").read_bytes()


def test_workers_with_socketpairs_reaped_by_pid(tmp_path: Path) -> None:
    """A parent, three workers on socketpairs of their own, one progress pipe they share, one
    log file description they share; the parent reaps each worker with waitpid(pid)."""
    ref = start_reference("tree_workers", tmp_path, scale=3)
    w = Workload("tree_workers", tmp_path / "moved", scale=3, hold=True)
    w.start()
    w.wait_ready()
    before = tree(w.pid)
    assert len(before) == 4
    checkpoint(w.pid, tmp_path / "tree.img", 4)
    assert w.reap_original() == -9
    doc = json.loads(kcr("show", str(tmp_path / "tree.img")).stdout)
    assert [m["pid"] for m in doc["tree"]["members"]] == list(before)
    assert doc["header"]["pid"] == w.pid and sorted(doc["processes"]) == sorted(str(p) for p in before if p != w.pid)
    root = image_restored(tmp_path / "tree.img", before)
    assert w.verdict() == "PASS", (w.dir / "stderr").read_text()
    assert os.WEXITSTATUS(reap(root, timeout=120)) == 0
    assert w.output() == finished(ref).output()
    # The workers' lines interleave as they happen to run; none is lost or overwritten.
    assert sorted((w.dir / "log").read_text().splitlines()) == sorted((ref.dir / "log").read_text().splitlines())


# Run in a pid namespace of its own (unshare --pid --fork --mount-proc): the tree is started in
# the session of a process outside it, which /proc there shows as session 0 and group 0, as a job
# started from a container's shell (or a CI runner's) sees them.
IN_PID_NAMESPACE = r"""
import json, os, subprocess, sys, time
workload, out, image = sys.argv[1:4]
env = {**os.environ, "WORKLOAD_SCALE": "3", "WORKLOAD_HOLD": out + "/go-on"}
with open(out + "/stdout", "wb") as o, open(out + "/stderr", "wb") as e:
    proc = subprocess.Popen([workload, out], stdin=subprocess.DEVNULL, stdout=o, stderr=e, cwd=out, env=env)
while not os.path.exists(out + "/ready"):
    time.sleep(0.01)
ids = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[2:4]
kcr = [sys.executable, "-m", "migrate"]
ckpt = subprocess.run(kcr + ["checkpoint", str(proc.pid), "-o", image], capture_output=True, text=True)
proc.wait()
while True:                  # the killed workers, adopted here (pid 1): reaped, their pids free
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        break
rest = subprocess.run(kcr + ["restore", "-i", image], capture_output=True, text=True)
status = -1
if rest.returncode == 0:
    open(out + "/go-on", "w").close()
    status = os.waitpid(proc.pid, 0)[1]          # restored under its pid, adopted here
print(json.dumps({"ids": ids, "checkpoint": ckpt.stderr, "restore": rest.stderr, "status": status}))
"""


def test_a_tree_whose_session_is_outside_its_pid_namespace(tmp_path: Path) -> None:
    """In a container, a job's session and group leader is often outside the pid namespace:
    /proc shows both as 0. The tree is checkpointed and restored there; it finishes as an
    unmoved one."""
    ref = start_reference("tree_workers", tmp_path, scale=3)
    out = tmp_path / "moved"
    out.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(IN_PID_NAMESPACE)
    res = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(driver),
                          str(build("tree_workers")), str(out), str(tmp_path / "tree.img")],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["ids"] == ["0", "0"]               # what this test is about: both outside
    assert "4 processes" in got["checkpoint"], got["checkpoint"]
    assert got["status"] == 0, got["restore"] or (out / "stderr").read_text()
    assert (out / "verdict").read_text().strip() == "PASS"
    assert (out / "output").read_text() == finished(ref).output()


def _ids(pids: list[int]) -> dict[int, tuple[int, int]]:
    return {p: (os.getsid(p), os.getpgid(p)) for p in pids}


def test_sessions_and_groups_that_a_parents_first_fork_would_not_make(tmp_path: Path) -> None:
    """A child forked after its parent's setsid and one forked before it, a group whose leader
    has exited with a zombie in it, a session whose leader exited after forking into it with
    CLONE_PARENT (ckpt_sessions.c): each process comes back in its session and group, under
    its parent, and checks so itself; before, the first two came back in the root's session,
    the group and the session of the exited leaders were lost."""
    ref = start_reference("ckpt_sessions", tmp_path)
    w = Workload("ckpt_sessions", tmp_path / "moved", hold=True)
    w.start()
    w.wait_ready()
    before = tree(w.pid)
    assert len(before) == 9                     # the root, A, A1, A2, B, B1, C1, its zombie C2, D1
    ids = _ids(list(before))
    assert len({sid for sid, _ in ids.values()}) == 4 and len({pgid for _, pgid in ids.values()}) == 6
    res = kcr("checkpoint", str(w.pid), "-o", str(tmp_path / "img"))
    assert res.returncode == 0, res.stderr.decode()
    assert w.reap_original() == -9
    root = image_restored(tmp_path / "img", before)
    assert _ids(list(before)) == ids
    assert w.verdict() == "PASS", (w.dir / "stderr").read_text()
    assert os.WEXITSTATUS(reap(root, timeout=120)) == 0
    assert w.output() == finished(ref).output() == "sessions checked: all good\n"


# A subreaper whose grandchild, in the session of a leader that still runs, was adopted by it:
# no process can fork a child into a session it is not in, and the one leader that could is
# not its parent. (zdtm session02 and session03 build such trees.)
ADOPTED_INTO_ANOTHER_SESSION = r"""
import ctypes, os, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)              # PR_SET_CHILD_SUBREAPER
r, w = os.pipe()
if os.fork() == 0:                                    # the leader
    os.setsid()
    if os.fork() == 0:                                # a middle process
        if os.fork() == 0:                            # its child, in the leader's session
            os.close(r)
            while os.getppid() == os.getpid():
                pass
            time.sleep(3600)
        os._exit(0)
    os.wait()
    os.write(w, b"x")
    time.sleep(3600)
os.read(r, 1)
while len(open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()) < 2:
    time.sleep(0.01)                                  # the grandchild adopted here
open(sys.argv[1], "w").close()
sys.stdin.read()
print("still here", flush=True)
"""


def test_a_tree_whose_sessions_cannot_be_made_again_is_refused_before_freezing(tmp_path: Path) -> None:
    script = tmp_path / "adopted.py"
    script.write_text(ADOPTED_INTO_ANOTHER_SESSION)
    proc = start_until_ready([sys.executable, "-S", str(script), str(tmp_path / "ready")], tmp_path / "ready",
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    leader = next(int(k) for k in kids if os.getsid(int(k)) == int(k))
    adopted = next(int(k) for k in kids if int(k) != leader)
    res = kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img"))
    line = one_error_line(res.stderr)
    assert res.returncode != 0 and not (tmp_path / "img").exists()
    assert f"pid {adopted} is in the session of pid {leader}, but its parent {proc.pid} never was" in line, line
    code, _, err = migrate_cli(f"{proc.pid}@localhost", "localhost")
    assert code != 0 and f"pid {adopted} is in the session of pid {leader}" in err, err
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()                                       # it ran on, untouched
    with proc.stdout:
        assert proc.stdout.readline() == b"still here\n" and proc.wait(timeout=30) == 0
    for p in (leader, adopted):                              # (orphans now: ours to reap)
        os.kill(p, signal.SIGKILL)
        reap(p)


CTRL_Z = r"""
import os, signal, sys, time
d = sys.argv[1]
pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)                  # (a group its parent watches over: SIGTSTP stops it)
    os.kill(os.getpid(), signal.SIGTSTP)
    os._exit(0)
before = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOWAIT)
open(f"{d}/ready", "w").close()
while not os.path.exists(f"{d}/go"):
    time.sleep(0.01)
after = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOWAIT)
os.kill(pid, signal.SIGCONT)
_, status = os.waitpid(pid, 0)
open(f"{d}/output", "w").write(f"{before.si_status} {after.si_status} {os.WEXITSTATUS(status)}\n")
"""


def test_a_child_stopped_by_ctrl_z_is_reported_stopped_by_it(tmp_path: Path) -> None:
    """A job stopped by SIGTSTP (a shell's Ctrl-Z) came back stopped by SIGSTOP: its parent's
    waitid(WSTOPPED) named the other signal (zdtm stopped03)."""
    script = tmp_path / "ctrl_z.py"
    script.write_text(CTRL_Z)
    proc = start_until_ready([sys.executable, "-S", str(script), str(tmp_path)], tmp_path / "ready",
                             start_new_session=True)
    checkpointed_and_restored(proc, tmp_path, 2, release=tmp_path / "go")
    assert (tmp_path / "output").read_text() == f"{int(signal.SIGTSTP)} {int(signal.SIGTSTP)} 0\n"


def checkpointed_workers(tmp_path: Path) -> tuple[Workload, Workload, dict[int, int], Path]:
    """tree_workers (a parent and three workers on socketpairs) checkpointed mid-run: an
    unmoved reference run, the workload, its tree as it was, and its image."""
    ref = start_reference("tree_workers", tmp_path, scale=3)
    w = Workload("tree_workers", tmp_path / "moved", scale=3, hold=True)
    w.start()
    w.wait_ready()
    before = tree(w.pid)
    image = tmp_path / "tree.img"
    checkpoint(w.pid, image, 4)
    assert w.reap_original() == -9
    return ref, w, before, image


def process_begins(frames: list[Frame]) -> list[int]:
    """Where each process's records start in an image's frames."""
    return [i for i, f in enumerate(frames) if f.body is not None and f.body.get("t") == ProcessBegin.TYPE]


def test_records_of_a_process_after_the_stream_left_it_are_refused(tmp_path: Path) -> None:
    """Restore makes each process's memory ready as the stream turns from it to the next one,
    its records all in (``Restorer.prepare``). An image that turns back to a process after
    that, with one more record of it, is refused in one line, and nothing it made is left;
    the image as written restores, and the job finishes as an unmoved one."""
    ref, w, before, image = checkpointed_workers(tmp_path)
    frames = split_image(image.read_bytes())
    begins = process_begins(frames)
    assert len(begins) == 4 and frames[begins[0]].body == {**frames[begins[0]].body, "pid": w.pid}
    thread = next(f for f in frames[begins[0]:begins[1]] if f.body is not None and f.body.get("t") == ThreadState.TYPE)
    # The root again once the second process is in, with its main thread's record once more.
    crafted = frames[:begins[2]] + [copy.deepcopy(frames[begins[0]]), copy.deepcopy(thread)] + frames[begins[2]:]
    (tmp_path / "crafted.img").write_bytes(seal(crafted))
    reap_orphans([p for p in before if before[p]])
    ours = children()
    res = kcr("restore", "-i", str(tmp_path / "crafted.img"), "--trust-image")
    assert res.returncode == 1
    assert "corrupt stream" in one_error_line(res.stderr)
    assert end_strays(ours) == []         # every stub made was removed
    root = image_restored(image, before)
    assert w.verdict() == "PASS", (w.dir / "stderr").read_text()
    assert os.WEXITSTATUS(reap(root, timeout=120)) == 0
    assert w.output() == finished(ref).output()


FD_RECORDS = {Files.TYPE, Pipes.TYPE, UnixSockets.TYPE, EventFiles.TYPE, InetSockets.TYPE, FileContents.TYPE}


def fd_tables_first(frames: list[Frame]) -> tuple[list[Frame], list[list[Frame]]]:
    """A tree image's frames in a live stream's order (``agent.source``): every process's
    memory, then every process's fd table, then every process's state, one process at a
    time; and the state parts (each a ProcessBegin and its state and thread records)."""
    begins = process_begins(frames)
    end = next(i for i in range(len(frames) - 1, -1, -1) if frames[i].body is None
               or frames[i].body.get("t") not in (EndOfImage.TYPE,))
    head, tail = frames[:begins[0]], frames[end + 1:]
    memory: list[Frame] = []
    tables: list[Frame] = []
    states: list[list[Frame]] = []
    for a, b in zip(begins, [*begins[1:], end + 1]):
        section = frames[a:b]
        begin = section[0]
        kinds = [f.body.get("t") if f.body is not None else None for f in section]
        memory += [f for f, k in zip(section, kinds) if k not in FD_RECORDS | {ProcessState.TYPE, ThreadState.TYPE}]
        tables += [copy.deepcopy(begin)] + [f for f, k in zip(section, kinds) if k in FD_RECORDS]
        states.append([copy.deepcopy(begin)] + [f for f, k in zip(section, kinds)
                                                if k in (ProcessState.TYPE, ThreadState.TYPE)])
    return head + memory + tables + [f for part in states for f in part] + tail, states


def test_a_stream_with_every_fd_table_first_restores_each_process_as_its_state_comes(tmp_path: Path) -> None:
    """A live stream sends every process's fd table before any process's state: the
    destination makes what they share then, and restores each process as its state follows,
    while the next ones are still read at the source. An image in that order restores the
    tree, which finishes as an unmoved one; one more fd record once the tables were all in
    (what they share was made without it) is refused in one line, nothing left of it."""
    ref, w, before, image = checkpointed_workers(tmp_path)
    frames, states = fd_tables_first(split_image(image.read_bytes()))
    files = next(f for f in frames if f.body is not None and f.body.get("t") == Files.TYPE)
    late = list(frames)
    at = late.index(states[-1][1])          # the last process's state, after every table
    late.insert(at + 1, copy.deepcopy(files))
    (tmp_path / "late.img").write_bytes(seal(late))
    (tmp_path / "live-order.img").write_bytes(seal(frames))
    reap_orphans([p for p in before if before[p]])
    ours = children()
    res = kcr("restore", "-i", str(tmp_path / "late.img"), *TRUST)
    assert res.returncode == 1
    assert "after every process's fd table was in" in one_error_line(res.stderr)
    assert end_strays(ours) == []
    root = image_restored(tmp_path / "live-order.img", before, *TRUST)
    assert w.verdict() == "PASS", (w.dir / "stderr").read_text()
    assert os.WEXITSTATUS(reap(root, timeout=120)) == 0
    assert w.output() == finished(ref).output()


def stubs() -> set[int]:
    """Restore stubs this test's restores left: adopted by this process, their subreaper (a
    stub another test session made is not this test's)."""
    out = set()
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and Path(f"/proc/{p}/comm").read_text().strip() == "kcr-stub" and \
                    int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                out.add(int(p))
        except (OSError, IndexError, ValueError):
            pass
    return out


def test_a_tree_whose_pids_are_taken_is_refused(tmp_path: Path) -> None:
    """The tree still runs (--leave-running): restore refuses, naming a pid, leaves nothing
    behind; --new-pid is refused for a tree; the original runs on."""
    w = Workload("tree_workers", tmp_path, scale=20, hold=True)
    w.start()
    w.wait_ready()
    image = tmp_path / "tree.img"
    res = kcr("checkpoint", str(w.pid), "-o", str(image), "--leave-running")
    assert res.returncode == 0, res.stderr.decode()
    before = stubs()
    line = one_error_line(kcr("restore", "-i", str(image)).stderr)
    assert f"pid {w.pid} is taken" in line
    line = one_error_line(kcr("restore", "-i", str(image), "--new-pid").stderr)
    assert "keeps its pids" in line and "without --new-pid" in line
    assert stubs() <= before              # nothing half-built is left
    assert len(tree(w.pid)) == 4 and w.proc is not None and w.proc.poll() is None


def test_a_tree_is_never_migrated_under_new_pids(tmp_path: Path) -> None:
    w = Workload("tree_workers", tmp_path, scale=20, hold=True)
    w.start()
    w.wait_ready()
    code, _, err = migrate_cli(f"{w.pid}@localhost", "localhost")      # with --new-pid
    assert code != 0 and "Traceback" not in err
    assert "has 3 descendants" in err.splitlines()[-1] and "without --new-pid" in err.splitlines()[-1]
    assert len(tree(w.pid)) == 4 and w.proc is not None and w.proc.poll() is None
    assert "TracerPid:\t0\n" in Path(f"/proc/{w.pid}/status").read_text()


# A parent and a child increment counters in MAP_SHARED|MAP_ANONYMOUS memory inherited across
# fork, each watching the other's grow; at the end the parent reports both as it sees them.
# Restored as two copies, the parent would see the child's counter stop (and the child wait).
# Counters are read and written with one 8-byte access each (ctypes): struct.pack_into
# zeroes its field before it writes it, so a reader in the other process may see 0.
# With WORKLOAD_HOLD=PATH (a test that moves it), both wait three quarters in until PATH is
# there: on a busy machine a late move still finds them mid-run.
SHARED_COUNTERS = """
import ctypes, mmap, os, struct, sys, time
d, n = sys.argv[1], int(sys.argv[2])
hold = os.environ.get("WORKLOAD_HOLD")
m = mmap.mmap(-1, 1 << 20)
m[409600:409605] = b"hello"
child = os.fork()
mine, theirs = (8, 0) if child == 0 else (0, 8)
my_counter, their_counter = ctypes.c_int64.from_buffer(m, mine), ctypes.c_int64.from_buffer(m, theirs)
seen = 0
for i in range(n):
    my_counter.value = i + 1
    other = their_counter.value
    assert other >= seen, (other, seen)
    seen = other
    if i == 20 and child:
        open(f"{d}/ready", "w").close()
    while hold and i == n * 3 // 4 and not os.path.exists(hold):
        time.sleep(0.01)
    time.sleep(0.003)
if child == 0:
    deadline = time.monotonic() + 60
    while their_counter.value < n and time.monotonic() < deadline:
        time.sleep(0.001)
    os._exit(0 if their_counter.value == n else 3)
_, status = os.waitpid(child, 0)
a, b = struct.unpack_from("qq", m, 0)
open(f"{d}/output", "w").write(f"{a} {b} {bytes(m[409600:409605])} {status}\\n")
"""


def checkpointed_and_restored(proc: subprocess.Popen[bytes], tmp_path: Path, processes: int,
                              release: Path | None = None) -> int:
    """Checkpoint ``proc``'s tree of ``processes`` (killed), restore it, (make ``release``: the
    file a held job waits for) and wait until its root has exited with status 0; its root's pid."""
    before = tree(proc.pid)
    assert len(before) == processes
    checkpoint(proc.pid, tmp_path / "tree.img", processes)
    assert proc.wait(timeout=30) == -9
    root = image_restored(tmp_path / "tree.img", before)
    if release is not None:
        release.touch()
    assert os.WEXITSTATUS(reap(root, timeout=120)) == 0
    return root


# A parent and its child share 512 MiB of MAP_SHARED|MAP_ANONYMOUS memory (a reservation, as
# stress-ng's and many runtimes' arenas are) and write three pages of it; once held there
# (WORKLOAD_HOLD), each checks the pages written and some never written, and the parent
# whether its shared memory is still only what was written.
SPARSE_SHARED = """
import mmap, os, sys, time
d, hold = sys.argv[1], os.environ["WORKLOAD_HOLD"]
SIZE, PAGE = 512 << 20, 4096
m = mmap.mmap(-1, SIZE)
m[3 * PAGE:3 * PAGE + 6] = b"parent"
m[SIZE - PAGE:SIZE - PAGE + 4] = b"last"
child = os.fork()
if child == 0:
    m[100000 * PAGE:100000 * PAGE + 5] = b"child"
    open(f"{d}/child-ready", "w").close()
while not os.path.exists(f"{d}/child-ready"):
    time.sleep(0.001)
if child:
    open(f"{d}/ready", "w").close()
while not os.path.exists(hold):
    time.sleep(0.01)
zeros = all(m[p * PAGE:(p + 1) * PAGE] == bytes(PAGE) for p in (0, 5000, 99999, 100001, 131070))
kept = (m[3 * PAGE:3 * PAGE + 6], m[100000 * PAGE:100000 * PAGE + 5], m[SIZE - PAGE:SIZE - PAGE + 4])
if child == 0:
    os._exit(0 if zeros and kept == (b"parent", b"child", b"last") else 3)
_, status = os.waitpid(child, 0)
shmem = int(next(l for l in open("/proc/self/status") if l.startswith("RssShmem:")).split()[1])
open(f"{d}/output", "w").write(f"{kept} zeros {zeros} small {shmem < 16 * 1024} child {status}\\n")
"""


def test_a_large_shared_reservation_costs_what_was_written_not_its_size(tmp_path: Path) -> None:
    """512 MiB of shared anonymous memory with three pages written: the dump asks the object
    which pages hold data (SEEK_DATA) and reads those. It read all of it through the mapping,
    which allocated every page: a checkpoint left the source holding 512 MiB more than it did
    (frozen 1.3 s for 300 MiB), and a live move read and hashed it all each round. Checked:
    the source's shared memory after a --leave-running checkpoint, and the restored job's,
    besides the bytes written and some never written."""
    script = tmp_path / "sparse.py"
    script.write_text(SPARSE_SHARED)
    proc = start_until_ready([sys.executable, "-S", str(script), str(tmp_path)], tmp_path / "ready",
                             start_new_session=True, env={**os.environ, "WORKLOAD_HOLD": str(tmp_path / "go-on")})

    def shmem_kib() -> int:
        return int(next(line for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                        if line.startswith("RssShmem:")).split()[1])

    before = shmem_kib()
    res = kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "running.img"), "--leave-running")
    assert res.returncode == 0, res.stderr.decode()
    assert shmem_kib() - before < 16 * 1024, f"the dump grew the source's shared memory to {shmem_kib()} KiB"
    checkpointed_and_restored(proc, tmp_path, 2, release=tmp_path / "go-on")
    assert (tmp_path / "output").read_text() == \
        "(b'parent', b'child', b'last') zeros True small True child 0\n"


# The root asks for SIGTERM when its parent dies, forks a child that asks for SIGUSR1 when the
# root does (PR_SET_PDEATHSIG), and, once let go on (WORKLOAD_HOLD), exits without waiting for
# it: the child reports the signal it got, as an unmoved run's does.
PDEATHSIG = """
import ctypes, os, signal, sys, time
d, hold = sys.argv[1], os.environ["WORKLOAD_HOLD"]
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(1, signal.SIGTERM, 0, 0, 0)
got = []
signal.signal(signal.SIGUSR1, lambda n, f: got.append(n))
child = os.fork()
if child == 0:
    libc.prctl(1, signal.SIGUSR1, 0, 0, 0)
    asked = ctypes.c_int(0)
    libc.prctl(2, ctypes.byref(asked), 0, 0, 0)
    open(f"{d}/ready", "w").close()
    deadline = time.monotonic() + 60
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    open(f"{d}/output", "w").write(f"asked {asked.value} got {got}\\n")
    os._exit(0)
while not os.path.exists(hold):
    time.sleep(0.01)
os._exit(0)
"""


def test_a_held_process_that_exits_as_it_is_frozen_has_exited_and_leaves_the_job() -> None:
    """The tree's freeze looks whether each held process is alive, then freezes it; one that
    exits in between (a pool's worker done with its tasks) leaves the job. It refused the move
    instead, "no process with pid N (or it exited)": 5 live moves in 200 of a Pool replacing
    its workers. What freezing meets in that moment: a zombie, which cannot be traced."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    STARTED.append(child)
    held = freeze.hold(child.pid)
    try:
        assert child.stdin is not None
        child.stdin.close()               # it exits, not waited for yet
        deadline = time.monotonic() + 60
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        with pytest.raises(ProcessExited, match=f"process {child.pid} exited"):
            freeze.freeze(held)
    finally:
        freeze.let_go(held)
        child.wait()


def test_a_rollback_says_whether_the_job_had_ended_by_then() -> None:
    """A job that ends while it is being moved fails the move by what its end changed (a file
    it renamed as it finished: "missing on hostC"). The holder's release says the root had
    exited, for the error to say so: pid N exited while the move was prepared."""
    job = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    STARTED.append(job)
    assert job.stdin is not None
    for ends in (False, True):
        holder = Holder()
        holder.op_seize(job.pid)
        if ends:
            job.stdin.close()
            job.wait()
        assert holder.op_release() == {"root_exited": ends}


def test_a_childs_parent_death_signal_comes_when_its_moved_parent_exits(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG was not carried: the restored child outlived its parent unsignalled
    (a launcher's workers would run on as orphans). The child's is set again; the root's is
    not (its parent does not move: set, the restorer's exit would have killed it)."""
    script = tmp_path / "pdeathsig.py"
    script.write_text(PDEATHSIG)
    proc = start_until_ready([sys.executable, "-S", str(script), str(tmp_path)], tmp_path / "ready",
                             start_new_session=True, env={**os.environ, "WORKLOAD_HOLD": str(tmp_path / "go-on")})
    checkpointed_and_restored(proc, tmp_path, 2, release=tmp_path / "go-on")
    assert wait_file(tmp_path / "output") == "asked 10 got [10]\n"


def test_a_parent_waiting_in_vfork_is_refused_not_waited_for_forever(tmp_path: Path) -> None:
    """A parent in vfork() does not stop (the kernel lets nothing interrupt that wait) until
    its child execs or exits; a checkpoint waited for it forever. After a few seconds it is
    refused naming the child, the job untouched: let go, it finishes as an unmoved run."""
    exe = build("vfork_wait")
    out = tmp_path / "out"
    with open(out, "wb") as f:
        proc = start_until_ready([str(exe), str(tmp_path / "ready"), str(tmp_path / "go")], tmp_path / "ready",
                                 stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    child = next(iter(set(tree(proc.pid)) - {proc.pid}))
    res = kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img"))
    err = one_error_line(res.stderr)
    assert res.returncode == 1 and "vfork()" in err and f"child {child}," in err, err
    assert not (tmp_path / "img").exists()
    (tmp_path / "go").touch()
    assert proc.wait(timeout=30) == 0
    assert out.read_text() == "child ran\nparent: child exited 0\n"


def test_a_parent_starting_commands_with_vfork_is_moved(tmp_path: Path) -> None:
    """A parent that vforks one command after another (make, a shell) is nearly always in a
    vfork(), its child sharing its memory until it execs: the check waits for that to pass
    instead of refusing the job (it did, when two looks in a row found the same vfork()). The
    freeze waits too (a parent in vfork() stops once its child has exec'd)."""
    exe = build("vfork_loop")
    out = tmp_path / "out"
    proc = start_until_ready([str(exe), str(out), str(tmp_path / "ready"), "150"], tmp_path / "ready",
                             start_new_session=True)
    res = kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img"))
    assert res.returncode == 0, res.stderr.decode()
    assert proc.wait(timeout=30) == -9
    members = json.loads(kcr("show", str(tmp_path / "img")).stdout).get("tree", {}).get("members", [])
    reap_orphans([m["pid"] for m in members[1:]])
    res = kcr("restore", "-i", str(tmp_path / "img"), "--json")
    assert res.returncode == 0, res.stderr.decode()
    assert os.WEXITSTATUS(reap(proc.pid, timeout=60)) == 0
    assert out.read_text() == "150 of 150 ran\n"


@pytest.mark.parametrize("mode, shared", [("files", "one fd table"),
                                          ("fs", "one working directory, root and umask"),
                                          ("vm", "its memory")])
@pytest.mark.parametrize("which", ["tree", "child"])
def test_processes_sharing_what_clone_shares_are_refused(tmp_path: Path, mode: str, shared: str, which: str) -> None:
    """Two processes that share an fd table, a working directory or memory since clone() (not
    threads): restored, each had its own, and an fd the child opened was not the parent's any
    more. Refused before anything is frozen, the tree (or the child, whose parent stays: it
    is named) and the live move alike; both run on."""
    exe = build("clone_shared")
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = start_until_ready([str(exe), mode, str(ready), str(go)], ready, start_new_session=True)
    child = int(wait_file(ready))
    target = proc.pid if which == "tree" else child
    whom = f"{'its child' if mode == 'vm' else 'pid'} {child}" if which == "tree" else f"its parent {proc.pid}, which"
    err = one_error_line(kcr("checkpoint", str(target), "-o", str(tmp_path / "img")).stderr)
    assert f"pid {target if which == 'tree' else child} shares {shared} with {whom}" in err, err
    assert not (tmp_path / "img").exists()
    code, _, err = migrate_cli(f"{target}@localhost", "localhost", "--new-pid")
    assert code != 0 and f"shares {shared} with" in err, err
    go.touch()
    assert proc.wait(timeout=30) == 0       # the child ran on and exited 0; so did its parent


@pytest.mark.parametrize("mode, said", [
    ("creds", "runs under credentials of its own (Uid 65534 65534 0 65534 where its process has 0 0 0 0)"),
    ("fs", "has a working directory, root and umask of its own (unshare(CLONE_FS))"),
    ("files", "has an fd table of its own (unshare(CLONE_FILES))"),
])
def test_a_thread_with_credentials_or_tables_of_its_own_is_refused(tmp_path: Path, mode: str, said: str) -> None:
    """A thread that set its ids alone (the raw setresuid, as Samba's threads do) came back
    with its process's, root again; one with its own working directory or fd table shared
    its process's. Refused before anything is frozen, by checkpoint and live; it runs on."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    proc = start_until_ready([str(build("thread_own")), mode, str(ready), str(go)], ready, start_new_session=True)
    thread = max(int(t) for t in os.listdir(f"/proc/{proc.pid}/task"))
    err = one_error_line(kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img")).stderr)
    assert f"thread {thread} of pid {proc.pid} {said}" in err, err
    code, _, err = migrate_cli(f"{proc.pid}@localhost", "localhost", "--new-pid")
    assert code != 0 and f"thread {thread} of pid {proc.pid}" in err, err
    go.touch()
    assert proc.wait(timeout=30) == 0


def test_memory_shared_between_processes_stays_shared(tmp_path: Path) -> None:
    script = tmp_path / "counters.py"
    script.write_text(SHARED_COUNTERS)
    proc = start_until_ready([sys.executable, "-S", str(script), str(tmp_path), "600"], tmp_path / "ready",
                             start_new_session=True, env={**os.environ, "WORKLOAD_HOLD": str(tmp_path / "go-on")})
    checkpointed_and_restored(proc, tmp_path, 2, release=tmp_path / "go-on")
    assert (tmp_path / "output").read_text() == "600 600 b'hello' 0\n"


# A parent fills 64 MiB of private anonymous memory (bytes that do not compress), then forks
# three workers, which share it copy-on-write (a Python pool forked after loading its data).
# Each worker writes one page of it and drops one MiB (MADV_DONTNEED: zeros again for it
# alone), then waits (WORKLOAD_HOLD); the output is each process's digest of the memory as it
# sees it.
COW_POOL = """
import hashlib, mmap, os, random, sys, time
d, hold = sys.argv[1], os.environ["WORKLOAD_HOLD"]
SIZE, PAGE, MIB, KIDS = 64 << 20, 4096, 1 << 20, 3
data = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE)
data[:] = random.Random(7).randbytes(SIZE)
r, w = os.pipe()
kids = []
for k in range(KIDS):
    pid = os.fork()
    if pid == 0:
        data[(k + 1) * 100 * PAGE:(k + 1) * 100 * PAGE + 5] = b"kid-%d" % k
        data.madvise(mmap.MADV_DONTNEED, (k + 10) * MIB, MIB)
        os.write(w, b"k")
        while not os.path.exists(hold):
            time.sleep(0.01)
        open(f"{d}/kid-{k}", "w").write(hashlib.sha256(data).hexdigest())
        os._exit(0)
    kids.append(pid)
got = b""
while len(got) < KIDS:
    got += os.read(r, KIDS - len(got))
open(f"{d}/ready", "w").close()
statuses = [os.waitpid(pid, 0)[1] for pid in kids]
seen = [open(f"{d}/kid-{k}").read() for k in range(KIDS)]
open(f"{d}/output", "w").write(f"{hashlib.sha256(data).hexdigest()} {seen} {statuses}\\n")
"""


def private_kib(pid: int) -> int:
    """The memory ``pid`` alone holds (Private_Clean + Private_Dirty), KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty"))


def test_memory_a_fork_shares_copy_on_write_stays_shared(tmp_path: Path) -> None:
    """Restored, each worker holds what it held alone at the source (the page it wrote, what
    Python wrote of its heap), not a copy of the 64 MiB it shares with its parent: it was one
    copy per process (4 x 64 MiB for a job of 64 MiB). The page each wrote and the MiB each
    dropped are its own still: the digests are an unmoved run's. The image holds the shared
    memory once (the workers' pages that are the parent's go as ``ParentPages``), and a job
    left running after a checkpoint still shares it."""
    script = tmp_path / "cow_pool.py"
    script.write_text(COW_POOL)
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / "go-on").touch()
    reference = subprocess.Popen([sys.executable, "-S", str(script), str(tmp_path / "reference")],
                                 env={**os.environ, "WORKLOAD_HOLD": str(tmp_path / "reference" / "go-on")})
    STARTED.append(reference)
    proc = start_until_ready([sys.executable, "-S", str(script), str(tmp_path)], tmp_path / "ready",
                             start_new_session=True, env={**os.environ, "WORKLOAD_HOLD": str(tmp_path / "go-on")})
    workers = sorted(p for p, parent in tree(proc.pid).items() if parent == proc.pid)
    at_source = {p: private_kib(p) for p in workers}
    # Read for an image, the job left running still shares what it shared: its pages are read
    # without pinning them, which would have given each process its own copy.
    everyone = [proc.pid, *workers]
    unread = {p: private_kib(p) for p in everyone}
    res = kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "running.img"), "--leave-running")
    assert res.returncode == 0, res.stderr.decode()
    for p in everyone:
        assert private_kib(p) < unread[p] + 8 * 1024, f"pid {p}: {private_kib(p)} KiB of its own, {unread[p]} before"
    before = tree(proc.pid)
    checkpoint(proc.pid, tmp_path / "tree.img", 4)
    assert proc.wait(timeout=30) == -9
    assert (tmp_path / "tree.img").stat().st_size < 2 * (64 << 20)
    shown = json.loads(kcr("show", str(tmp_path / "tree.img")).stdout)
    for p in workers:     # (``show`` lists them apart from the pages the image holds)
        said = sum(r["pages"] for r in shown["processes"][str(p)]["parent_pages"])
        assert said > (60 << 20) // 4096, f"worker {p}: {said} pages said to be its parent's"
    # A ParentPages record among the root's records (it has no parent's memory to hold) is
    # refused in one line, and nothing made is left.
    frames = split_image((tmp_path / "tree.img").read_bytes())
    begins = process_begins(frames)
    said = next(f for f in frames if f.body is not None and f.body.get("t") == ParentPages.TYPE)
    (tmp_path / "crafted.img").write_bytes(seal(frames[:begins[1]] + [copy.deepcopy(said)] + frames[begins[1]:]))
    reap_orphans([p for p in before if before[p]])
    ours = children()
    res = kcr("restore", "-i", str(tmp_path / "crafted.img"), "--trust-image")
    assert res.returncode == 1 and "corrupt stream" in one_error_line(res.stderr)
    assert end_strays(ours) == []
    root = image_restored(tmp_path / "tree.img", before)
    restored = {p: private_kib(p) for p in workers}
    (tmp_path / "go-on").touch()
    assert os.WEXITSTATUS(reap(root, timeout=120)) == 0
    assert reference.wait(timeout=120) == 0
    assert (tmp_path / "output").read_text() == (tmp_path / "reference" / "output").read_text()
    for p in workers:
        assert restored[p] < at_source[p] + 8 * 1024, \
            f"worker {p} holds {restored[p]} KiB of its own restored, {at_source[p]} KiB at the source"


# Host-local files bigger than kcr-migrate once carried (16 MiB a file, 48 MiB a job): a
# parent and two forked workers share 64 MiB of multiprocessing.shared_memory (a file of
# /dev/shm, named by argv[2]; with it comes multiprocessing's resource tracker), and the parent
# holds a deleted temporary file of 24 MiB and maps a memfd of 20 MiB. Halfway through their
# rounds the workers wait (WORKLOAD_HOLD); the output is a digest of all three files.
BIG_SHARED = """
import hashlib, mmap, os, sys, tempfile, time
from multiprocessing import shared_memory
d, name, hold = sys.argv[1], sys.argv[2], os.environ["WORKLOAD_HOLD"]
N, PAGE, ROUNDS = 64 << 20, 4096, 6
shm = shared_memory.SharedMemory(name=name, create=True, size=N)
tmp = tempfile.TemporaryFile(dir=d)
tmp.write(bytes(range(256)) * (24 << 12))
tmp.flush()
mfd = os.memfd_create("kcr-big", 0)
os.ftruncate(mfd, 20 << 20)
mm = mmap.mmap(mfd, 20 << 20)
mm[::PAGE] = bytes(i * 7 & 255 for i in range((20 << 20) // PAGE))
r, w = os.pipe()
kids = []
for k in range(2):
    pid = os.fork()
    if pid == 0:
        b = shm.buf
        for rnd in range(ROUNDS):
            for i in range(k * PAGE, N, 2 * PAGE):
                b[i] = (b[i] + rnd + 1) & 255
            if rnd == ROUNDS // 2:
                os.write(w, b"h")
                while not os.path.exists(hold):
                    time.sleep(0.01)
        os._exit(0)
    kids.append(pid)
got = b""
while len(got) < 2:
    got += os.read(r, 2 - len(got))
open(f"{d}/ready", "w").close()
for pid in kids:
    assert os.waitpid(pid, 0)[1] == 0
tmp.seek(0)
h = hashlib.sha256(bytes(shm.buf))
h.update(tmp.read())
h.update(mm[:])
shm.close()
shm.unlink()
open(f"{d}/output", "w").write(h.hexdigest() + "\\n")
"""


def big_shared_reference(tmp_path: Path) -> str:
    """BIG_SHARED's output, unmoved."""
    where = tmp_path / "reference"
    where.mkdir()
    (where / "go-on").touch()
    script = tmp_path / "big_shared.py"
    script.write_text(BIG_SHARED)
    subprocess.run([sys.executable, str(script), str(where), f"kcr-test-ref-{os.getpid()}"], check=True, timeout=120,
                   env={**os.environ, "WORKLOAD_HOLD": str(where / "go-on")})
    return (where / "output").read_text()


def test_big_shared_memory_deleted_file_and_memfd(tmp_path: Path) -> None:
    """Files of /dev/shm, deleted files and memfds of any size are carried whole: the slices
    stream into the image as they are read. The /dev/shm file is removed once the job is
    checkpointed, as on another host: restore makes it again from the image."""
    expected = big_shared_reference(tmp_path)
    name = f"kcr-test-big-{os.getpid()}"
    shm = Path("/dev/shm") / name
    script = tmp_path / "big_shared.py"
    moved = tmp_path / "moved"
    moved.mkdir()
    try:
        proc = start_until_ready([sys.executable, str(script), str(moved), name], moved / "ready",
                                 start_new_session=True, env={**os.environ, "WORKLOAD_HOLD": str(moved / "go-on")})
        before = tree(proc.pid)
        assert len(before) == 4          # the parent, its two workers, multiprocessing's resource tracker
        res = kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "tree.img"))
        assert res.returncode == 0, res.stderr.decode()
        assert "4 processes" in res.stderr.decode() and "108.0 MiB of files carried whole" in res.stderr.decode()
        assert proc.wait(timeout=30) == -9
        shm.unlink()
        root = image_restored(tmp_path / "tree.img", before)
        assert shm.stat().st_size == 64 << 20
        (moved / "go-on").touch()
        assert os.WEXITSTATUS(reap(root, timeout=120)) == 0
        assert (moved / "output").read_text() == expected
    finally:
        shm.unlink(missing_ok=True)


# concurrent.futures.ProcessPoolExecutor with the "spawn" or "forkserver" start method (the
# default from Python 3.14 on): its queues' locks are POSIX named semaphores, files of /dev/shm
# that sem_open() maps under a temporary name before it links them under their own, which the
# workers open. Held (WORKLOAD_HOLD) halfway through the results.
PROCESS_POOL = """
import concurrent.futures as cf, hashlib, multiprocessing as mp, os, sys, time
def work(i):
    time.sleep(0.01)
    return i, hashlib.sha256(str(i).encode()).hexdigest()[:8]
if __name__ == "__main__":
    d, method, n, hold = sys.argv[1], sys.argv[2], int(sys.argv[3]), os.environ["WORKLOAD_HOLD"]
    out = []
    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context(method)) as ex:
        for i, digest in ex.map(work, range(n)):
            out.append(f"{i} {digest}")
            if i == 10:
                open(f"{d}/ready", "w").close()
            while i == n // 2 and not os.path.exists(hold):
                time.sleep(0.01)
    open(f"{d}/output", "w").write("\\n".join(out) + "\\n")
"""


def process_pool_output(n: int) -> str:
    import hashlib
    return "".join(f"{i} {hashlib.sha256(str(i).encode()).hexdigest()[:8]}\n" for i in range(n))


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_process_pool_with_named_semaphores(tmp_path: Path, method: str) -> None:
    """The parent maps each semaphore under sem_open()'s temporary name, deleted: restored as
    memory of its own (not the file the workers map), its locks no longer reached them and the
    pool hung. They are the files of /dev/shm the workers map, carried by their own names:
    removed after the checkpoint, as on another host, they are made again."""
    script = tmp_path / "pool.py"
    script.write_text(PROCESS_POOL)
    sems = set(Path("/dev/shm").glob("sem.*"))
    proc = start_until_ready([sys.executable, str(script), str(tmp_path), method, "60"], tmp_path / "ready",
                             start_new_session=True, env={**os.environ, "WORKLOAD_HOLD": str(tmp_path / "go-on")})
    ours = set(Path("/dev/shm").glob("sem.*")) - sems
    try:
        before = tree(proc.pid)
        checkpoint(proc.pid, tmp_path / "tree.img", len(before))
        assert proc.wait(timeout=30) == -9
        assert ours, "the pool made no named semaphore"
        for sem in ours:
            sem.unlink()
        root = image_restored(tmp_path / "tree.img", before)
        assert all(sem.exists() for sem in ours)
        (tmp_path / "go-on").touch()
        assert os.WEXITSTATUS(reap(root, timeout=60)) == 0
        assert (tmp_path / "output").read_text() == process_pool_output(60)
    finally:
        for sem in ours:
            sem.unlink(missing_ok=True)


# Python's multiprocessing.Pool: a parent with three threads, two forked workers, pipes
# between them and POSIX semaphores (files in /dev/shm, unlinked once mapped).
POOL = """
import multiprocessing as mp, os, sys, time
def work(x):
    time.sleep(0.004)
    return x * x
if __name__ == "__main__":
    d, n = sys.argv[1], int(sys.argv[2])
    mp.set_start_method("fork")
    with mp.Pool(2) as pool:
        total = 0
        for i, r in enumerate(pool.imap(work, range(n))):
            total += r
            if i == 50:
                open(f"{d}/ready", "w").close()
            while i == n * 3 // 4 and os.environ.get("WORKLOAD_HOLD") and not os.path.exists(os.environ["WORKLOAD_HOLD"]):
                time.sleep(0.01)    # held (as SHARED_COUNTERS is)
    open(f"{d}/output", "w").write(f"{total}\\n")
"""


def test_multiprocessing_pool(tmp_path: Path) -> None:
    script = tmp_path / "pool.py"
    script.write_text(POOL)
    proc = start_until_ready([sys.executable, str(script), str(tmp_path), "1500"], tmp_path / "ready",
                             start_new_session=True, env={**os.environ, "WORKLOAD_HOLD": str(tmp_path / "go-on")})
    checkpointed_and_restored(proc, tmp_path, 3, release=tmp_path / "go-on")
    assert (tmp_path / "output").read_text() == f"{sum(x * x for x in range(1500))}\n"


def test_make_j2_mid_build(tmp_path: Path) -> None:
    """make -j2: make, its shells and compilers, forking and exec'ing all the while (a fork or
    exit while the tree freezes is refused: try again, as a user would)."""
    from tests.test_live_trees import small_project
    project = tmp_path / "project"
    small_project(project)
    proc = start_until_ready(["make", "-s", "-j2", "-C", str(project)], project / "ready", start_new_session=True)
    image = tmp_path / "tree.img"
    for _ in range(10):
        res = kcr("checkpoint", str(proc.pid), "-o", str(image))
        if res.returncode == 0 or b"try again" not in res.stderr:
            break
    assert res.returncode == 0, res.stderr.decode()
    assert proc.wait(timeout=30) == -9
    members = json.loads(kcr("show", str(image)).stdout).get("tree", {}).get("members", [])
    reap_orphans([m["pid"] for m in members[1:]])
    res = kcr("restore", "-i", str(image), "--json")
    assert res.returncode == 0, res.stderr.decode()
    assert os.WEXITSTATUS(reap(proc.pid, timeout=120)) == 0
    built = subprocess.run([str(project / "prog")], capture_output=True, text=True)
    assert built.stdout == f"{sum(i + 1 + i for i in range(12))}\n"


# A parent waits for its child through a pidfd (poll, then waitid(P_PIDFD)), as asyncio's
# pidfd child watcher does; the child exits with 5 once told to.
PIDFD_WAIT = """
import os, select, sys, time
d = sys.argv[1]
child = os.fork()
if child == 0:
    while not os.path.exists(f"{d}/go"):
        time.sleep(0.01)
    os._exit(5)
fd = os.pidfd_open(child)
open(f"{d}/ready", "w").close()
p = select.poll()
p.register(fd, select.POLLIN)
while not p.poll(50):
    pass
info = os.waitid(os.P_PIDFD, fd, os.WEXITED)
open(f"{d}/output", "w").write(f"{info.si_pid == child} {info.si_status}\\n")
"""


def test_a_pidfd_to_a_child_that_moves_too(tmp_path: Path) -> None:
    script = tmp_path / "pidfd.py"
    script.write_text(PIDFD_WAIT)
    proc = start_until_ready([sys.executable, "-S", str(script), str(tmp_path)], tmp_path / "ready",
                             start_new_session=True)
    before = tree(proc.pid)
    checkpoint(proc.pid, tmp_path / "tree.img", 2)
    assert proc.wait(timeout=30) == -9
    root = image_restored(tmp_path / "tree.img", before)
    (tmp_path / "go").touch()
    assert os.WEXITSTATUS(reap(root, timeout=60)) == 0
    assert (tmp_path / "output").read_text() == "True 5\n"


def test_a_pidfd_to_a_process_that_stays_is_refused(tmp_path: Path) -> None:
    script = ("import os, sys, time\nfd = os.pidfd_open(os.getppid())\nopen(sys.argv[1], 'w').close()\n"
              "time.sleep(60)\n")
    proc = start_until_ready([sys.executable, "-c", script, str(tmp_path / "ready")], tmp_path / "ready")
    line = one_error_line(kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img")).stderr)
    assert f"is a pidfd of pid {os.getpid()}, which does not move with it" in line
    assert not (tmp_path / "img").exists() and proc.poll() is None


def test_a_running_tree_is_checked_as_it_changes_not_refused_for_it(tmp_path: Path) -> None:
    """check_tree on a running shell loop whose commands start and exit all the while (what a
    live migration's preflight and pre-copy do): a command gone between two reads of it, one
    on its way out (no memory, no namespaces to read), a pipe shared with a child just forked
    and gone, are not refusals. The old check refused about one look in twenty, each time
    with another false reason ("in another time namespace", "exited while it was being
    checked", a raw "No such process")."""
    from agent.tree import check_tree
    job = subprocess.Popen(["sh", "-c", "while :; do (seq 1 2000 | md5sum) >/dev/null; done"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    STARTED.append(job)
    looks = changed = 0
    seen: set[int] = set()
    deadline = time.monotonic() + 60
    while changed < 100 or looks < 200:       # checks that raced with the loop, however fast they are
        assert time.monotonic() < deadline, f"the tree changed in {changed} of {looks} looks only: no race"
        pids = check_tree(job.pid, {})
        looks += 1
        changed += bool(set(pids) - seen)
        seen = set(pids)
        assert pids[0] == job.pid



def test_a_shell_script_running_short_commands_is_checkpointed_as_one_cut(tmp_path: Path) -> None:
    """The batch script of tests/test_live_trees.py, its commands starting and exiting all the
    while, checkpointed five times as it runs (--leave-running) and then for good, restored
    under its pids: it finishes with every command's output equal. A child forked as the tree
    froze is frozen with it, one that exited leaves: the old checkpoint refused more than
    half of such tries ("the process tree changed while it was being frozen")."""
    from tests.test_live_trees import SHORT_COMMANDS
    script = tmp_path / "script.sh"
    script.write_text(SHORT_COMMANDS)
    proc = start_until_ready(["sh", str(script), str(tmp_path)], tmp_path / "ready", start_new_session=True)
    for i in range(5):
        res = kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / f"try{i}.img"), "--leave-running")
        assert res.returncode == 0, res.stderr.decode()
    res = kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "tree.img"))
    assert res.returncode == 0, res.stderr.decode()
    assert proc.wait(timeout=30) == -9
    shown = json.loads(kcr("show", str(tmp_path / "tree.img")).stdout)
    reap_orphans([m["pid"] for m in shown["tree"]["members"][1:]] if shown.get("tree") else [])
    res = kcr("restore", "-i", str(tmp_path / "tree.img"), "--json")
    assert res.returncode == 0, res.stderr.decode()
    root = json.loads(res.stdout)["pid"]
    assert root == proc.pid            # (its commands go on at once: the tree it has now is another)
    (tmp_path / "stop").touch()
    assert os.WEXITSTATUS(reap(root, timeout=120)) == 0
    runs, distinct, lines = map(int, (tmp_path / "output").read_text().split())
    assert (distinct, lines) == (1, runs) and runs >= 3
