"""Live migration of process trees: from hostA to hostC, a test host with pids of its own (as
a second machine has), every process keeping its pid. Each job is moved mid-run and must
finish as an unmoved run does, with every process on hostC under its original pid, with its
parent, and none left on hostA."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from examples.testbed import Testbed
from tests._hosts import start_in, verdict, wait_file
from tests._migration import migrate_cli, proc_state
from tests._workloads import KCR_MIGRATE, STARTED, Reference, build, build_java, node

WORKLOADS = Path(__file__).parent / "workloads"


def tree(pid: int) -> dict[int, int]:
    """pid -> parent pid for ``pid`` and its descendants, as this machine sees them."""
    out = {pid: int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])}
    todo = [pid]
    while todo:
        p = todo.pop()
        for tid in Path(f"/proc/{p}/task").iterdir():
            for child in (tid / "children").read_text().split():
                out[int(child)] = p
                todo.append(int(child))
    return out


def in_host(testbed: Testbed, host: str, pid: int) -> dict[str, str]:
    """/proc/PID/status of ``pid`` as ``host`` numbers it, read inside that host."""
    res = testbed.exec(host, ["cat", f"/proc/{pid}/status"], capture_output=True, text=True)
    assert res.returncode == 0, f"no process {pid} on {host}: {res.stderr}"
    return dict(line.split(":\t", 1) for line in res.stdout.splitlines() if ":\t" in line)


def moved_tree(testbed: Testbed, before: dict[int, int], report: dict) -> None:
    """Every process of ``before`` runs on hostC under its pid, with its parent (the root's
    parent is hostC's, not hostA's), and none is left on hostA."""
    root = next(iter(before))
    assert sorted(p["pid"] for p in report["processes"]) == sorted(before)
    for pid, ppid in before.items():
        status = in_host(testbed, "hostC", pid)
        assert status["Pid"].strip() == str(pid)
        if pid != root:
            assert status["PPid"].strip() == str(ppid), (pid, status["PPid"], ppid)
        assert proc_state(pid) in (None, "Z", "X"), f"pid {pid} still runs on hostA"


def move_tree_to_host_c(testbed: Testbed, before: dict[int, int]) -> dict:
    """Move the tree ``before`` (pid -> parent, the root first) live from hostA to hostC keeping
    its pids; the migration must succeed and leave it there as ``moved_tree`` checks. The report."""
    root = next(iter(before))
    code, report, err = migrate_cli(f"{root}@hostA", "hostC", "--ssh-config", str(testbed.ssh_config_path),
                                    keep_pid=True)
    assert code == 0, err
    moved_tree(testbed, before, report)
    return report


def test_workers_on_socketpairs_move_live_with_their_pids(testbed: Testbed, tmp_path: Path) -> None:
    """A parent, three workers on socketpairs, a progress pipe and a log description they
    share; the parent reaps each worker with waitpid(pid) and checks getppid() there."""
    exe = str(build("tree_workers"))
    ref = Reference([exe, str(tmp_path / "ref")], tmp_path / "ref", WORKLOAD_SCALE="3")
    out = tmp_path / "moved"
    pid = start_in(testbed, "hostA", [exe, str(out)], out, hold=True, WORKLOAD_SCALE="3")
    deadline = time.monotonic() + 30
    while len(before := tree(pid)) < 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    move_tree_to_host_c(testbed, before)
    assert verdict(out) == "PASS", (out / "stderr").read_text()
    assert (out / "output").read_text() == ref.output()
    assert sorted((out / "log").read_text().splitlines()) == sorted((tmp_path / "ref" / "log").read_text().splitlines())


def test_sessions_and_groups_of_exited_leaders_move_live(testbed: Testbed, tmp_path: Path) -> None:
    """ckpt_sessions.c (see test_trees): sessions and groups whose leaders exited, children
    forked before and after their parent's setsid, a zombie in a group, live to hostC."""
    exe = str(build("ckpt_sessions"))
    ref = Reference([exe, str(tmp_path / "ref")], tmp_path / "ref")
    out = tmp_path / "moved"
    pid = start_in(testbed, "hostA", [exe, str(out)], out, hold=True)
    before = tree(pid)
    assert len(before) == 9
    move_tree_to_host_c(testbed, before)
    assert verdict(out) == "PASS", (out / "stderr").read_text()
    assert (out / "output").read_text() == ref.output() == "sessions checked: all good\n"


def test_shell_pipeline_moves_live_with_data_in_its_pipes(testbed: Testbed, tmp_path: Path) -> None:
    """sh -c 'gen | tr | sort > out': sh waits for its three children by pid; the pipes hold
    data when the job freezes."""
    gen = tmp_path / "gen.py"
    # held (WORKLOAD_HOLD) three quarters in, a late move still finds data in the pipes
    gen.write_text("import os, sys, time\nn = int(sys.argv[1])\nhold = os.environ.get('WORKLOAD_HOLD')\n"
                   "for i in range(n):\n"
                   "    print(f'line {i} of the pipeline', flush=True)\n    time.sleep(0.002)\n"
                   "    while hold and i == n * 3 // 4 and not os.path.exists(hold):\n        time.sleep(0.01)\n")
    script = f"touch ready; {sys.executable} -S {gen} 2000 | tr a-z A-Z | sort > out; echo $? > status"
    (tmp_path / "ref").mkdir()
    ref = subprocess.Popen(["sh", "-c", script], cwd=tmp_path / "ref")      # the unmoved run, meanwhile
    STARTED.append(ref)
    out = tmp_path / "moved"
    out.mkdir()
    pid = start_in(testbed, "hostA", ["sh", "-c", f"cd {out} && {script}"], out, hold=True)
    deadline = time.monotonic() + 30
    while len(before := tree(pid)) < 4:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    move_tree_to_host_c(testbed, before)
    (out / "go-on").touch()
    assert wait_file(out / "status") == "0\n"
    assert ref.wait(120) == 0
    assert (out / "out").read_bytes() == (tmp_path / "ref" / "out").read_bytes()


def slow_migration(testbed: Testbed, pid: int, meanwhile: Callable[[], object]) -> dict:
    """Migrate ``pid`` from hostA to hostC with the page stream slowed down, call
    ``meanwhile`` once pre-copy has begun (round 0 is going out), and return the report of
    the migration, which must succeed."""
    cli = subprocess.Popen([*KCR_MIGRATE, f"{pid}@hostA", "hostC", "--ssh-config", str(testbed.ssh_config_path),
                            "--bandwidth", "4M", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    STARTED.append(cli)
    assert cli.stderr is not None
    for line in cli.stderr:
        if line.startswith("pages:"):
            break
    else:
        raise AssertionError(f"the migration ended before pre-copy: {cli.wait()}")
    meanwhile()
    stdout, err = cli.communicate(timeout=180)
    assert cli.returncode == 0, err
    return dict(json.loads(stdout.strip().splitlines()[-1]))


FORKS_ON_GO = """
import os, sys, time
d = sys.argv[1]
junk = bytearray(os.urandom(4 << 20))          # memory for pre-copy to send
open(f"{d}/ready", "w").close()
while not os.path.exists(f"{d}/go"):
    time.sleep(0.005)
r, w = os.pipe()
child = os.fork()
if child == 0:
    os.close(r)
    grandchild = os.fork()       # at once: it joins with its parent, or a round later
    if grandchild == 0:
        open(f"{d}/grandchild", "w").write(str(os.getpid()))
        for i in range(200):
            os.write(w, b"g%d\\n" % i)
            time.sleep(0.02)
        while not os.path.exists(f"{d}/done"):      # lasts as long as the migration
            time.sleep(0.01)
        os._exit(5)
    open(f"{d}/child", "w").write(str(os.getpid()))
    for i in range(400):
        os.write(w, b"%d\\n" % i)
        time.sleep(0.01)
    while not os.path.exists(f"{d}/done"):
        time.sleep(0.01)
    got, status = os.waitpid(grandchild, 0)
    os._exit(7 if got == grandchild and os.WEXITSTATUS(status) == 5 else 1)
os.close(w)
data = b""
while chunk := os.read(r, 4096):
    data += chunk
got, status = os.waitpid(child, 0)
open(f"{d}/output", "w").write(f"{len(data.splitlines())} {got == child} {os.WEXITSTATUS(status)}\\n")
"""


def test_a_process_forked_during_precopy_moves_with_the_job(testbed: Testbed, tmp_path: Path) -> None:
    """The job forks a child, which forks a grandchild, while its memory is being copied (the
    copy is slowed down so it lasts): both join the migration (the grandchild's stub on hostC
    is forked from a stub that holds a copy of a half-built one), nothing of the job is left
    running on hostA."""
    script = tmp_path / "forks.py"
    script.write_text(FORKS_ON_GO)
    out = tmp_path / "moved"
    pid = start_in(testbed, "hostA", [sys.executable, "-S", str(script), str(out)], out)
    assert list(tree(pid)) == [pid]
    report = slow_migration(testbed, pid, lambda: (out / "go").touch())
    child = int(wait_file(out / "child"))
    grandchild = int(wait_file(out / "grandchild"))
    moved_tree(testbed, {pid: 0, child: pid, grandchild: child}, report)
    (out / "done").touch()
    assert wait_file(out / "output") == "600 True 7\n"


def test_a_tree_whose_pids_are_taken_is_refused_before_anything_freezes(testbed: Testbed, tmp_path: Path) -> None:
    """hostA and hostB share this machine's pids: the tree's own pids are taken there (by
    the tree itself). Refused in preflight, naming them; the tree runs on, untraced."""
    exe = str(build("tree_workers"))
    out = tmp_path / "moved"
    pid = start_in(testbed, "hostA", [exe, str(out)], out, hold=True, WORKLOAD_SCALE="3")
    deadline = time.monotonic() + 30
    while len(before := tree(pid)) < 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    code, report, err = migrate_cli(f"{pid}@hostA", "hostB", "--ssh-config", str(testbed.ssh_config_path),
                                    keep_pid=True)
    assert code != 0 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert f"pids {pid}, " in line and "taken on" in line and "a process tree keeps its pids" in line, line
    for p in before:
        assert proc_state(p) not in (None, "Z", "X", "T", "t")
        assert "TracerPid:\t0\n" in Path(f"/proc/{p}/status").read_text()
    assert verdict(out) == "PASS", (out / "stderr").read_text()


def test_memory_shared_between_processes_stays_shared_live(testbed: Testbed, tmp_path: Path) -> None:
    """Parent and child increment counters in MAP_SHARED|MAP_ANONYMOUS memory inherited
    across fork (tests/test_trees.py's SHARED_COUNTERS): one object on hostC too."""
    from tests.test_trees import SHARED_COUNTERS
    script = tmp_path / "counters.py"
    script.write_text(SHARED_COUNTERS)
    out = tmp_path / "moved"
    pid = start_in(testbed, "hostA", [sys.executable, "-S", str(script), str(out), "1500"], out, hold=True)
    before = tree(pid)
    assert len(before) == 2
    move_tree_to_host_c(testbed, before)
    (out / "go-on").touch()
    assert wait_file(out / "output") == "1500 1500 b'hello' 0\n"


def test_memory_a_fork_shares_copy_on_write_stays_shared_live(testbed: Testbed, tmp_path: Path) -> None:
    """Three workers forked after their parent filled 64 MiB (tests/test_trees.py's COW_POOL):
    on hostC each holds of its own what it held on hostA, not a copy of the 64 MiB it
    shares with its parent; the digests (with the page each wrote and the MiB each dropped)
    are an unmoved run's. The job's memory the report gives, which preflight asks hostC to
    have, counts that memory once (it was four times 70 MiB), and so do the pages sent."""
    from tests.test_trees import COW_POOL, private_kib
    script = tmp_path / "cow_pool.py"
    script.write_text(COW_POOL)
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "go-on").touch()
    reference = subprocess.Popen([sys.executable, "-S", str(script), str(ref)],
                                 env={**os.environ, "WORKLOAD_HOLD": str(ref / "go-on")})
    STARTED.append(reference)
    out = tmp_path / "moved"
    pid = start_in(testbed, "hostA", [sys.executable, "-S", str(script), str(out)], out, hold=True)
    before = tree(pid)
    assert len(before) == 4
    workers = [p for p in before if p != pid]
    at_source = {p: private_kib(p) for p in workers}
    report = move_tree_to_host_c(testbed, before)
    assert report["memory_bytes"] < 2 * (64 << 20), report["memory_bytes"]
    assert report["bytes_raw"] < 2 * (64 << 20), report["bytes_raw"]

    def private_on_c(p: int) -> int:
        res = testbed.exec("hostC", ["cat", f"/proc/{p}/smaps_rollup"], capture_output=True, text=True)
        fields = dict(line.split(":", 1) for line in res.stdout.splitlines()[1:])
        return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty"))

    moved = {p: private_on_c(p) for p in workers}
    (out / "go-on").touch()
    assert reference.wait(timeout=120) == 0
    assert wait_file(out / "output") == (ref / "output").read_text()
    for p in workers:
        assert moved[p] < at_source[p] + 8 * 1024, f"worker {p} holds {moved[p]} KiB of its own on hostC, " \
                                                    f"{at_source[p]} KiB on hostA"


def test_multiprocessing_pool_moves_live(testbed: Testbed, tmp_path: Path) -> None:
    """Python's multiprocessing.Pool (tests/test_trees.py's POOL): threads, forked workers,
    pipes, and semaphores in deleted /dev/shm files, from hostA to hostC."""
    from tests.test_trees import POOL
    script = tmp_path / "pool.py"
    script.write_text(POOL)
    out = tmp_path / "moved"
    pid = start_in(testbed, "hostA", [sys.executable, str(script), str(out), "3000"], out, hold=True)
    before = tree(pid)
    assert len(before) == 3
    move_tree_to_host_c(testbed, before)
    (out / "go-on").touch()
    assert wait_file(out / "output") == f"{sum(x * x for x in range(3000))}\n"


def test_big_host_local_files_move_live(testbed: Testbed, tmp_path: Path) -> None:
    """tests/test_trees.py's BIG_SHARED: 64 MiB of multiprocessing.shared_memory shared by
    three processes, a deleted file of 24 MiB and a memfd of 20 MiB, from hostA to hostC (the
    test hosts share /dev/shm, so there the file is the very one; the other two travel)."""
    from tests.test_trees import big_shared_reference
    expected = big_shared_reference(tmp_path)
    name = f"kcr-test-big-live-{os.getpid()}"
    out = tmp_path / "moved"
    try:
        pid = start_in(testbed, "hostA", [sys.executable, str(tmp_path / "big_shared.py"), str(out), name], out,
                       hold=True)
        before = tree(pid)
        assert len(before) == 4
        move_tree_to_host_c(testbed, before)
        (out / "go-on").touch()
        assert wait_file(out / "output", 120) == expected
    finally:
        Path("/dev/shm", name).unlink(missing_ok=True)


def test_a_parent_starting_commands_with_vfork_moves_live(testbed: Testbed, tmp_path: Path) -> None:
    """tests/workloads/vfork_loop.c: nearly always in a vfork(), its children joining and
    leaving the job all the while; moved to hostC, every command runs."""
    exe = str(build("vfork_loop"))
    out = tmp_path / "moved"
    # It goes on past 150 commands until GO: a move on a busy machine never finds it ended.
    pid = start_in(testbed, "hostA", [exe, str(out / "output"), str(out / "ready"), "150", str(out / "go")], out)
    code, report, err = migrate_cli(f"{pid}@hostA", "hostC", "--ssh-config", str(testbed.ssh_config_path),
                                    keep_pid=True)
    assert code == 0, err
    assert proc_state(pid) in (None, "Z", "X"), f"pid {pid} still runs on hostA"
    (out / "go").touch()
    ran, total = map(int, wait_file(out / "output", 60).split(" ran")[0].split(" of "))
    assert ran == total >= 150, (ran, total)


def test_a_process_pool_with_named_semaphores_moves_live(testbed: Testbed, tmp_path: Path) -> None:
    """tests/test_trees.py's PROCESS_POOL (spawn start method): the semaphores the parent maps
    under sem_open()'s deleted temporary names stay the files its workers map."""
    from tests.test_trees import PROCESS_POOL, process_pool_output
    script = tmp_path / "pool.py"
    script.write_text(PROCESS_POOL)
    out = tmp_path / "moved"
    pid = start_in(testbed, "hostA", [sys.executable, str(script), str(out), "spawn", "60"], out, hold=True)
    before = tree(pid)
    move_tree_to_host_c(testbed, before)
    (out / "go-on").touch()
    assert wait_file(out / "output", 60) == process_pool_output(60)


def _reference_and_moved_tree(testbed: Testbed, tmp_path: Path, argv: list[str], processes: int,
                              *after: str) -> None:
    """``argv`` (a program taking OUT READY GO, then ``after``) run unmoved here, and on hostA
    moved live to hostC once READY is there and it has ``processes`` processes: let go on (GO)
    once moved, it must end there having written the same OUT."""
    def args(where: Path) -> list[str]:
        return [*argv, str(where / "output"), str(where / "ready"), str(where / "go-on"), *after]
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "go-on").touch()
    reference = Reference(args(ref), ref)
    out = tmp_path / "moved"
    out.mkdir()
    pid = start_in(testbed, "hostA", args(out), out)
    deadline = time.monotonic() + 30
    while len(before := tree(pid)) < processes:
        assert time.monotonic() < deadline, f"{argv[0]} has {len(before)} processes, not {processes}"
        time.sleep(0.01)
    move_tree_to_host_c(testbed, before)
    (out / "go-on").touch()
    deadline = time.monotonic() + 120
    while proc_state(testbed.root_pid("hostC", pid) or 0) not in (None, "Z", "X"):
        assert time.monotonic() < deadline, f"{argv[0]} did not finish on hostC"
        time.sleep(0.02)
    assert (out / "output").read_text() == reference.output()


def test_node_children_on_ipc_channels_move_live_with_their_pids(testbed: Testbed, tmp_path: Path) -> None:
    """Node.js's child_process.fork: a parent and two children on the IPC channels node makes
    (unix socketpairs), the parent waiting for both answers each step and, at the end, for
    their exit codes (tests/workloads/node_ipc.js)."""
    _reference_and_moved_tree(testbed, tmp_path, [node(), str(WORKLOADS / "node_ipc.js")], 3)


def test_a_java_program_and_its_child_on_a_pipe_move_live_with_their_pids(testbed: Testbed, tmp_path: Path) -> None:
    """A JVM with a thread pool and a shell it started (ProcessBuilder): the shell's lines
    wait in a pipe to the JVM, whose reaper thread waits for it by pid
    (tests/workloads/JavaPool.java)."""
    _reference_and_moved_tree(testbed, tmp_path, build_java("JavaPool"), 2, "40")


def test_an_asyncio_program_moves_live_with_its_pid(testbed: Testbed, tmp_path: Path) -> None:
    """CPython's asyncio (an epoll instance, a socketpair as its self-pipe, timers), live:
    it must keep its pid, as asyncio notices a new one (tests/workloads/asyncio_job.py)."""
    _reference_and_moved_tree(testbed, tmp_path, [sys.executable, "-S", str(WORKLOADS / "asyncio_job.py")], 1)


def test_a_postgresql_server_moves_live_with_its_pids(testbed: Testbed) -> None:
    """PostgreSQL's five processes (shared memory, a SysV segment, self-pipes, epoll, the unix
    socket it listens on) from hostA to hostC with their pids; there it takes new
    connections (a backend forked there), writes and checkpoints."""
    from tests._postgres import PostgresServer
    pg = PostgresServer(lambda argv, **kw: testbed.popen("hostA", argv, **kw))
    moved = 0
    try:
        assert pg.sql("create table t (i int); insert into t select generate_series(1, 1000)").returncode == 0
        deadline = time.monotonic() + 30
        while len(before := tree(pg.proc.pid)) != 5:       # the server alone: the backend psql had ends
            assert time.monotonic() < deadline, before
            time.sleep(0.01)
        move_tree_to_host_c(testbed, before)
        moved = testbed.root_pid("hostC", pg.proc.pid) or 0
        got = pg.sql("insert into t select generate_series(1, 500); checkpoint; select count(*) from t")
        assert got.stdout.splitlines() == ["INSERT 0 500", "CHECKPOINT", "1500"], got.stderr + pg.log.read_text()
    finally:
        pg.close(moved or pg.proc.pid)


def test_a_postgresql_server_listening_on_tcp_moves_live(testbed: Testbed) -> None:
    """The same server listening on TCP too (IPv4 and IPv6 listeners): on hostC, a client of
    hostC's own reaches it at hostC's address; hostA no longer answers."""
    from tests._postgres import PostgresServer
    port = 20000 + os.getpid() % 20000
    pg = PostgresServer(lambda argv, **kw: testbed.popen("hostA", argv, **kw), tcp_port=port)
    moved = 0

    def over_tcp(host: str, query: str) -> subprocess.CompletedProcess[str]:
        return testbed.exec(host, ["psql", "-h", testbed.address(host), "-p", str(port), "-U", "postgres",
                                   "-tAc", query], capture_output=True, text=True, timeout=60)
    try:
        assert over_tcp("hostA", "create table t (i int); insert into t values (7)").returncode == 0
        deadline = time.monotonic() + 30
        while len(before := tree(pg.proc.pid)) != 5:
            assert time.monotonic() < deadline, before
            time.sleep(0.01)
        move_tree_to_host_c(testbed, before)
        moved = testbed.root_pid("hostC", pg.proc.pid) or 0
        got = over_tcp("hostC", "insert into t values (8); select sum(i) from t")
        assert got.stdout.splitlines() == ["INSERT 0 1", "15"], got.stderr + pg.log.read_text()
        assert over_tcp("hostA", "select 1").returncode != 0
    finally:
        pg.close(moved or pg.proc.pid)


def small_project(where: Path, files: int = 12) -> None:
    """A C project whose build takes a few seconds with make -j2 (each compile pauses too).
    With WORKLOAD_HOLD=PATH in its environment, the compile of the middle file waits until
    PATH is there (the others go on): on a busy machine a late move still finds it building."""
    where.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (where / f"f{i}.c").write_text(f"int f{i}(int x) {{ return x * {i + 1} + {i}; }}\n")
    calls = " + ".join(f"f{i}(1)" for i in range(files))
    decls = "".join(f"int f{i}(int);\n" for i in range(files))
    (where / "main.c").write_text(f'#include <stdio.h>\n{decls}int main(void) {{ printf("%d\\n", {calls}); return 0; }}\n')
    objs = " ".join(f"f{i}.o" for i in range(files)) + " main.o"
    held = f"f{files // 2}"
    (where / "Makefile").write_text(f"prog: {objs}\n\tgcc -o $@ {objs}\n%.o: %.c\n\t@touch ready\n"
                                    "\tgcc -O1 -c $< -o $@\n\t@sleep 0.4\n"
                                    f"{held}.o: {held}.c\n"
                                    '\t@while [ -n "$$WORKLOAD_HOLD" ] && [ ! -e "$$WORKLOAD_HOLD" ]; do sleep 0.2; done\n'
                                    "\tgcc -O1 -c $< -o $@\n")


def test_make_j2_moves_live_mid_build(testbed: Testbed, tmp_path: Path) -> None:
    """make -j2 building a small C project: make, its shells, compilers forking and exec'ing
    all the while (they join and leave the migration); the build finishes on hostC."""
    out = tmp_path / "moved"
    small_project(out)
    pid = start_in(testbed, "hostA", ["make", "-s", "-j2", "-C", str(out)], out, hold=True)
    code, report, err = migrate_cli(f"{pid}@hostA", "hostC", "--ssh-config", str(testbed.ssh_config_path),
                                    keep_pid=True)
    (out / "go-on").touch()
    assert code == 0, err
    assert report["processes"][0]["pid"] == pid and len(report["processes"]) > 1, report["processes"]
    assert proc_state(pid) in (None, "Z", "X"), "make still runs on hostA"
    deadline = time.monotonic() + 120
    while not (out / "prog").exists() or proc_state(testbed.root_pid("hostC", pid) or 0) not in (None, "Z", "X"):
        assert time.monotonic() < deadline, "the build did not finish on hostC"
        time.sleep(0.05)
    res = subprocess.run([str(out / "prog")], capture_output=True, text=True)
    assert res.stdout == f"{sum(i + 1 + i for i in range(12))}\n"


# A batch script as HPC jobs are: a shell running short commands in pipes, one after another,
# until told to stop; each command's output is the same, and the count is checked at the end.
SHORT_COMMANDS = """
n=0
while [ ! -e "$1/stop" ]; do
    seq 1 20000 | md5sum >> "$1/sums"
    n=$((n + 1))
    [ "$n" = 3 ] && : > "$1/ready"
done
echo "$n $(sort -u "$1/sums" | wc -l) $(wc -l < "$1/sums")" > "$1/output"
"""


def test_a_shell_script_running_short_commands_moves_live(testbed: Testbed, tmp_path: Path) -> None:
    """A script whose commands start and exit all the while, faster than a tree is read: each
    look at the running tree finds processes gone (a command exited between two reads of it:
    'No such process', 'exited while it was being checked'), or a pipe shared with one just
    forked and gone. None of that is a refusal: the job moves, its commands run on on hostC."""
    out = tmp_path / "moved"
    script = tmp_path / "script.sh"
    script.write_text(SHORT_COMMANDS)
    pid = start_in(testbed, "hostA", ["sh", str(script), str(out)], out)
    code, report, err = migrate_cli(f"{pid}@hostA", "hostC", "--ssh-config", str(testbed.ssh_config_path),
                                    keep_pid=True)
    (out / "stop").touch()
    assert code == 0, err
    assert report["processes"][0]["pid"] == pid, report["processes"]
    assert proc_state(pid) in (None, "Z", "X"), "the script still runs on hostA"
    runs, distinct, lines = map(int, wait_file(out / "output").split())
    assert (distinct, lines) == (1, runs) and runs >= 3


def test_a_write_flock_on_a_file_both_hosts_see_is_refused_before_anything_freezes(testbed: Testbed,
                                                                                  tmp_path: Path) -> None:
    """hostC has pids of its own, and the kernel shows in a pid namespace's /proc/locks only
    the locks of its own processes: hostA's job's exclusive flock on a file both hosts see
    went unseen in preflight, and the move failed at restore, after pre-copy (`flock job sh -c
    ...` in a batch script). Refused in preflight from the file's identity, naming the lock;
    the job runs on, its lock held."""
    from tests.test_programs import LOCKER
    data = tmp_path / "db"
    data.write_bytes(b"x" * 4096)
    script = tmp_path / "locker.py"
    script.write_text(LOCKER)
    out = tmp_path / "job"
    pid = start_in(testbed, "hostA", [sys.executable, "-S", str(script), str(data), "xflock", str(out / "ready")], out)
    code, report, err = migrate_cli(f"{pid}@hostA", "hostC", "--ssh-config", str(testbed.ssh_config_path),
                                    keep_pid=True)
    assert code == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "holds a write flock lock of" in line and "sees that same file" in line and str(data) in line, err
    assert not report.get("per_round") and "precopy" not in report.get("phase_ms", {}), report   # in preflight
    assert proc_state(pid) not in (None, "Z", "X", "T", "t")
    assert " FLOCK  ADVISORY  WRITE " in "".join(
        Path(f"/proc/{pid}/fdinfo/{fd}").read_text() for fd in os.listdir(f"/proc/{pid}/fd"))


def test_a_pidfd_to_a_child_moves_live(testbed: Testbed, tmp_path: Path) -> None:
    """A parent polls a pidfd of its child and collects it with waitid(P_PIDFD) on hostC."""
    from tests.test_trees import PIDFD_WAIT
    script = tmp_path / "pidfd.py"
    script.write_text(PIDFD_WAIT)
    out = tmp_path / "moved"
    pid = start_in(testbed, "hostA", [sys.executable, "-S", str(script), str(out)], out)
    before = tree(pid)
    move_tree_to_host_c(testbed, before)
    (out / "go").touch()
    assert wait_file(out / "output") == "True 5\n"


REAPS_ON_GO = """
import os, sys, time
d = sys.argv[1]
junk = bytearray(os.urandom(4 << 20))          # memory for pre-copy to send
child = os.fork()
if child == 0:
    while not os.path.exists(f"{d}/go"):
        time.sleep(0.005)
    os._exit(3)
open(f"{d}/child", "w").write(str(child))
open(f"{d}/ready", "w").close()
got, status = os.waitpid(child, 0)
open(f"{d}/reaped", "w").close()
while not os.path.exists(f"{d}/done"):
    time.sleep(0.005)
open(f"{d}/output", "w").write(f"{got == child} {os.WEXITSTATUS(status)}\\n")
"""


def test_a_child_that_exits_during_precopy_leaves_the_job(testbed: Testbed, tmp_path: Path) -> None:
    """The job's child exits and is reaped while its memory is being copied: it leaves the
    migration (its half-built copy on hostC is removed and reaped there), the parent moves."""
    script = tmp_path / "reaps.py"
    script.write_text(REAPS_ON_GO)
    out = tmp_path / "moved"
    pid = start_in(testbed, "hostA", [sys.executable, "-S", str(script), str(out)], out)
    assert len(tree(pid)) == 2
    report = slow_migration(testbed, pid, lambda: ((out / "go").touch(), wait_file(out / "reaped", empty_ok=True)))
    moved_tree(testbed, {pid: 0}, report)
    child = int((out / "child").read_text())
    assert testbed.exec("hostC", ["test", "-e", f"/proc/{child}"]).returncode != 0, "a zombie was left on hostC"
    (out / "done").touch()
    assert wait_file(out / "output") == "True 3\n"


def test_memfd_shared_by_a_tree_stays_one_file_live(testbed: Testbed, tmp_path: Path) -> None:
    """Parent and child share memfds and a deleted file, as fds and as mappings (tests/test_memfd.py's
    MEMFD_WORKLOAD): on hostC each is one file again, with its contents, name and seals."""
    from tests.test_memfd import MEMFD_WORKLOAD
    script = tmp_path / "memfd.py"
    script.write_text(MEMFD_WORKLOAD)
    ref = tmp_path / "reference"
    ref.mkdir()
    (ref / "go").touch()
    expected = Reference([sys.executable, "-S", str(script), str(ref), "fork"], ref).output()
    out = tmp_path / "moved"
    pid = start_in(testbed, "hostA", [sys.executable, "-S", str(script), str(out), "fork"], out)
    before = tree(pid)
    assert len(before) == 2
    move_tree_to_host_c(testbed, before)
    (out / "go").touch()
    assert wait_file(out / "verdict").strip() == "PASS", (out / "stderr").read_text()
    assert (out / "output").read_text() == expected
    assert (out / "child").read_text() == (ref / "child").read_text()
    assert "parent '/memfd:kcr-test (deleted)'\n" in expected


def test_sysv_segments_and_a_dev_shm_file_move_live(testbed: Testbed, tmp_path: Path) -> None:
    """Parent and child count in SysV segments (private, keyed, removed while attached, and
    one attached read-only) and a /dev/shm file (tests/test_shm.py's workload). hostC sees the
    same segments and /dev/shm (one machine): each is attached again under its id while the
    source still runs on it, no page of it written over, and the job ends as an unmoved run."""
    from tests.test_shm import OUTPUT, workload
    exe = str(build("shm_counter"))
    ref = workload(tmp_path, "ref")
    (ref.dir / "go").touch()
    assert Reference([exe, *ref.argv[1:]], ref.dir).output() == OUTPUT
    w = workload(tmp_path, "moved")
    pid = start_in(testbed, "hostA", w.argv, w.dir)
    before = tree(pid)
    assert len(before) == 2
    try:
        move_tree_to_host_c(testbed, before)
        (w.dir / "go").touch()
        assert wait_file(w.dir / "verdict").strip() == "PASS", (w.dir / "stderr").read_text()
        assert (w.dir / "output").read_text() == OUTPUT
    finally:
        w.shm_file.unlink(missing_ok=True)          # type: ignore[attr-defined]


def test_a_unix_server_and_its_clients_move_live_at_their_path(testbed: Testbed, tmp_path: Path) -> None:
    """tests/workloads/unix_server.c: a server listening at a path, two workers
    mid-conversation on connections it accepted, a third child waiting in its accept queue,
    datagrams queued from the workers' named sockets. On hostC the conversation goes on, the
    waiting client is accepted, and a client connecting after the move reaches the server at
    its path (the job's own socket file, which both hosts see, is replaced)."""
    import socket

    from tests.test_unix_servers import expected_output
    exe = str(build("unix_server"))
    out = tmp_path / "moved"
    path = str(tmp_path / "srv.sock")
    pid = start_in(testbed, "hostA", [exe, str(out), path], out)
    before = tree(pid)
    assert len(before) == 4
    move_tree_to_host_c(testbed, before)
    (out / "go").touch()            # the server waits mid-conversation until the job has moved
    wait_file(out / "serving", empty_ok=True)
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(30)
        c.connect(path)
        c.sendall(b"late")
        assert c.recv(100) == b"served 3540"
    assert wait_file(out / "verdict").strip() == "PASS", (out / "stderr").read_text()
    assert (out / "output").read_text() == expected_output()
    assert not [p for p in tmp_path.iterdir() if ".kcr-" in p.name]
