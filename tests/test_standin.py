"""The home stand-in (--stand-in): a parent that stays on the source starts a child workload
and waits for it; the child is moved, the parent stays. The parent's wait() must see what it
would have seen unmoved (the child's exit status, its death by a signal, its stops and
continues), signals sent to the child's old pid must reach the moved process, and a lost link
must end the stand-in the way the user chose, saying so on the job's stderr.

On localhost (under a new pid: one host holds the old pid) and from hostA to hostC (a test
host with pids of its own, where the child keeps its pid)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from agent.homelink import LINK_LOST_STATUS
from examples.testbed import Testbed
from tests._hosts import start_in, wait_file
from tests._migration import migrate_cli, proc_state
from tests._workloads import build, one_error_line, kcr, start_until_ready

CHILD_MIB = 48
WAIT_S = 60.0


def until(what: str, check: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    """``check()``'s first true value, looked at until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.02)


def text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X")


class Home:
    """A parent (standin_parent) and its child (standin_child) on this machine."""

    def __init__(self, out: Path, mib: int = CHILD_MIB, **env: str) -> None:
        self.out = out
        self.env = {**os.environ, **env}
        out.mkdir(parents=True, exist_ok=True)
        self.argv = [str(build("standin_parent")), str(out), str(build("standin_child")), str(out), str(mib)]
        self.moved = 0

    def start(self) -> int:
        with open(self.out / "stdout", "wb") as o, open(self.out / "stderr", "wb") as e:
            start_until_ready(self.argv, self.out / "ready", stdout=o, stderr=e, start_new_session=True, env=self.env)
        self.child = int(wait_file(self.out / "child_pid"))
        return self.child

    def migrate(self, *args: str) -> dict[str, Any]:
        code, report, err = migrate_cli(f"{self.child}@localhost", "localhost", "--stand-in", *args)
        assert code == 0, err
        assert report["state"] == "done" and report["stand_in"]["pid"] == self.child, report
        self.moved = int(report["new_pid"])
        return report

    def parent_saw(self, line: str) -> None:
        until(f"the parent's wait() reporting {line!r}", lambda: line in text(self.out / "parent_log").splitlines())

    def done(self) -> str:
        return wait_file(self.out / "parent_done", WAIT_S).strip()

    def output(self) -> str:
        return text(self.out / "output")

    def finish(self, code: int) -> None:
        (self.out / "finish.tmp").write_text(f"{code}\n")
        os.replace(self.out / "finish.tmp", self.out / "finish")

    def cleanup(self) -> None:
        if self.moved and alive(self.moved):
            os.kill(self.moved, signal.SIGKILL)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    h = Home(tmp_path / "job")
    yield h
    h.cleanup()


def reference(tmp_path: Path, code: int) -> str:
    """The child's output unmoved, finishing with ``code``."""
    h = Home(tmp_path / "reference")
    h.start()
    h.finish(code)
    assert h.done() == f"exited {code}"
    return h.output()


def test_parent_sees_the_moved_childs_exit_status(home: Home, tmp_path: Path) -> None:
    home.start()
    report = home.migrate()
    assert alive(home.moved) and home.moved != home.child
    # The stand-in holds none of the job's memory; its pid and parent are the child's.
    status = Path(f"/proc/{home.child}/status").read_text()
    rss_kb = int(status.split("VmRSS:")[1].split()[0])
    assert rss_kb * 1024 < report["memory_bytes"] / 50, (rss_kb, report["memory_bytes"])
    assert int(status.split("PPid:")[1].split()[0]) > 1
    assert not os.listdir(f"/proc/{home.child}/fd")
    # The freeze's steps ran at real-time priority (agent.urgency): none of what lives on
    # after it (the keeper, the stand-in, the moved process) keeps it.
    for pid in (report["stand_in"]["keeper_pid"], home.child, home.moved):
        for tid in os.listdir(f"/proc/{pid}/task"):
            assert os.sched_getscheduler(int(tid)) == os.SCHED_OTHER, (pid, tid)
    home.finish(7)
    assert home.done() == "exited 7"
    assert home.output() == reference(tmp_path, 7)
    until("the stand-in gone", lambda: not alive(home.child))


def test_a_child_without_a_vdso_leaves_a_stand_in(tmp_path: Path) -> None:
    """A stand-in sleeps on a syscall instruction of the vDSO it keeps; a process without one
    (valgrind's) keeps the code its syscall instruction was found in instead."""
    home = Home(tmp_path / "job", WORKLOAD_NO_VDSO="1")
    try:
        home.start()
        home.migrate()
        maps = [m for m in Path(f"/proc/{home.child}/maps").read_text().splitlines() if "[vsyscall]" not in m]
        assert len(maps) == 1 and "x" in maps[0].split()[1], maps       # that code alone
        os.kill(home.child, signal.SIGUSR1)          # sent on by its keeper
        until("the moved process counting SIGUSR1", lambda: "usr1 1" in home.output())
        home.finish(5)
        assert home.done() == "exited 5"
        assert home.output() == reference(tmp_path, 5).replace("start\n", "start\nusr1 1\n")
    finally:
        home.cleanup()


def test_signals_reach_the_moved_process_and_stops_show_at_home(home: Home) -> None:
    home.start()
    home.migrate()
    os.kill(home.child, signal.SIGUSR1)
    until("SIGUSR1 handled on the destination", lambda: "usr1 1" in home.output())
    os.kill(home.child, signal.SIGHUP)
    until("SIGHUP handled on the destination", lambda: "hup 1" in home.output())
    os.kill(home.child, signal.SIGSTOP)
    until("the moved process stopped", lambda: proc_state(home.moved) == "T")
    home.parent_saw(f"stopped {signal.SIGSTOP}")
    os.kill(home.child, signal.SIGCONT)
    until("the moved process continued", lambda: proc_state(home.moved) in ("S", "R"))
    home.parent_saw("continued")
    os.kill(home.child, signal.SIGTERM)
    assert home.done() == "exited 3"
    assert home.output().endswith("got SIGTERM\n")
    assert not alive(home.moved)


def test_a_child_killed_on_the_destination_is_seen_killed_at_home(home: Home) -> None:
    home.start()
    home.migrate()
    os.kill(home.moved, signal.SIGKILL)
    assert home.done() == f"signaled {signal.SIGKILL}"


def test_a_child_dying_of_a_signal_is_seen_so_without_a_core(home: Home) -> None:
    home.start()
    home.migrate()
    os.kill(home.moved, signal.SIGABRT)     # the workload leaves SIGABRT at its default: it dies of it
    assert home.done() == f"signaled {signal.SIGABRT}"


def test_the_stand_in_killed_at_home_ends_the_moved_process(home: Home) -> None:
    home.start()
    home.migrate()
    os.kill(home.child, signal.SIGKILL)     # cannot be intercepted: the keeper sees the stand-in die
    assert home.done() == f"signaled {signal.SIGKILL}"
    until("the moved process killed by its deputy", lambda: not alive(home.moved))


def test_a_lost_deputy_ends_the_stand_in_with_the_default_status(home: Home) -> None:
    home.start()
    report = home.migrate("--link-timeout", "3")
    os.kill(report["stand_in"]["deputy_pid"], signal.SIGKILL)
    assert home.done() == f"exited {LINK_LOST_STATUS}"
    line = text(home.out / "stderr").strip()
    assert line.startswith(f"kcr-migrate: stand-in for pid {home.child}: lost pid {home.moved} on localhost"), line
    assert f"exiting with status {LINK_LOST_STATUS}" in line, line
    assert alive(home.moved), "with exit:N the moved process runs on"


def test_a_lost_deputy_with_an_exit_status_chosen(home: Home) -> None:
    home.start()
    report = home.migrate("--link-timeout", "3", "--stand-in-lost", "exit:42")
    os.kill(report["stand_in"]["deputy_pid"], signal.SIGKILL)
    assert home.done() == "exited 42"
    assert "exiting with status 42 (--stand-in-lost exit:42)" in text(home.out / "stderr")


def test_a_lost_keeper_with_kill_ends_both(home: Home) -> None:
    home.start()
    report = home.migrate("--link-timeout", "3", "--stand-in-lost", "kill")
    os.kill(report["stand_in"]["keeper_pid"], signal.SIGKILL)   # the stand-in dies with its keeper
    assert home.done() == f"signaled {signal.SIGKILL}"
    until("the moved process killed by its deputy (--stand-in-lost kill)", lambda: not alive(home.moved))


def test_auto_leaves_no_stand_in_for_an_orphan_of_init(tmp_path: Path) -> None:
    out = tmp_path / "orphan"
    out.mkdir()
    # The child is orphaned (its parent exits): its parent is now init, nobody waits for it.
    proc = subprocess.Popen(["sh", "-c", f'{build("standin_child")} {out} 4 & echo $! > {out}/pid'],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    proc.wait()
    pid = int(wait_file(out / "pid"))
    report: dict[str, Any] = {}
    try:
        wait_file(out / "ready", empty_ok=True)
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        code, report, err = migrate_cli(f"{pid}@localhost", "localhost", "--stand-in-auto")
        assert code == 0, err
        if ppid == 1:
            assert report["stand_in"] == {} and not alive(pid)
        else:       # adopted by a subreaper (a test session that made itself one), which may wait
            assert report["stand_in"]["pid"] == pid
    finally:        # the orphan, unmoved if the test failed early, and its moved copy
        for left in (pid, int(report.get("new_pid") or 0)):
            if left and alive(left):
                os.kill(left, signal.SIGKILL)


def test_relayed_stdout_reaches_the_parent_through_the_stand_in(home: Home, tmp_path: Path) -> None:
    """The child's stdout is a pipe its parent reads (as a launcher's or `$(...)`): with
    --relay 1 what the moved child writes comes back through it, and the parent reads to the
    end before it waits."""
    home.argv.insert(1, "-p")
    home.start()
    home.migrate("--relay", "1")
    os.kill(home.child, signal.SIGUSR1)
    until("relayed output", lambda: "usr1 1\n" in text(home.out / "relayed"))
    assert not (home.out / "relay_eof").exists(), "the pipe stays open while the child runs"
    home.finish(9)
    assert home.done() == "exited 9"
    assert text(home.out / "relayed") == home.output()
    assert home.output().startswith("start\nusr1 1\nsum ") and home.output().endswith("bye\n")


def test_relayed_output_of_a_process_that_lost_its_stand_in_goes_to_a_file(home: Home) -> None:
    """The keeper dies (and its stand-in with it); under exit:N the moved process runs on, and
    what it writes to its relayed stdout is kept beside the deputy's log, not met by SIGPIPE."""
    home.argv.insert(1, "-p")
    home.start()
    report = home.migrate("--relay", "1", "--link-timeout", "3")
    os.kill(report["stand_in"]["keeper_pid"], signal.SIGKILL)
    assert home.done() == f"signaled {signal.SIGKILL}"
    kept = Path(f"/run/kcr-migrate/deputy/pid{home.moved}.fd1")
    until("the deputy keeping the output", lambda: kept.exists())
    os.kill(home.moved, signal.SIGUSR1)
    until("output kept after the link was lost", lambda: "usr1 1\n" in text(kept))
    assert alive(home.moved)
    kept.unlink()


def test_relay_without_a_stand_in_is_one_line() -> None:
    res = kcr("1@localhost", "localhost", "--relay", "1")
    assert res.returncode != 0
    assert "give --stand-in too" in one_error_line(res.stderr)


def test_a_bad_stand_in_lost_rule_is_one_line() -> None:
    res = kcr("1@localhost", "localhost", "--stand-in", "--stand-in-lost", "sometimes")
    assert res.returncode != 0
    assert "stand-in-lost 'sometimes'" in one_error_line(res.stderr)


# --- between test hosts --------------------------------------------------------------------

def in_host_state(testbed: Testbed, host: str, pid: int) -> str:
    res = testbed.exec(host, ["cat", f"/proc/{pid}/stat"], capture_output=True, text=True)
    return res.stdout.rsplit(")", 1)[1].split()[0] if res.returncode == 0 else ""


def test_stand_in_on_host_a_for_a_child_moved_to_host_c(testbed: Testbed, tmp_path: Path) -> None:
    out = tmp_path / "job"
    argv = [str(build("standin_parent")), str(out), str(build("standin_child")), str(out), str(CHILD_MIB)]
    start_in(testbed, "hostA", argv, out)
    child = int(wait_file(out / "child_pid"))
    code, report, err = migrate_cli(f"{child}@hostA", "hostC", "--ssh-config", str(testbed.ssh_config_path),
                                    "--stand-in", keep_pid=True)
    try:
        assert code == 0, err
        assert report["stand_in"]["pid"] == child and report["new_pid"] == child
        assert in_host_state(testbed, "hostC", child) in ("S", "R")
        os.kill(child, signal.SIGUSR1)
        until("SIGUSR1 handled on hostC", lambda: "usr1 1" in text(out / "output"))
        os.kill(child, signal.SIGSTOP)
        until("the moved process stopped on hostC", lambda: in_host_state(testbed, "hostC", child) == "T")
        until("the parent on hostA saw the stop", lambda: f"stopped {signal.SIGSTOP}" in text(out / "parent_log"))
        os.kill(child, signal.SIGCONT)
        until("the moved process continued on hostC", lambda: in_host_state(testbed, "hostC", child) in ("S", "R"))
        (out / "finish").write_text("7\n")
        assert wait_file(out / "parent_done", WAIT_S).strip() == "exited 7"
        assert text(out / "output").endswith("bye\n")
    finally:
        testbed.exec("hostC", ["kill", "-9", str(child)])


THREADED = '''
import os, sys, threading, time
d = sys.argv[1]
stop = threading.Event()
def work(i):
    x = bytearray(4 << 20)
    while not stop.wait(0.01):
        x[i] = (x[i] + 1) % 256
ts = [threading.Thread(target=work, args=(i,)) for i in range(3)]
for t in ts: t.start()
open(os.path.join(d, "output"), "a").write("start\\n")
open(os.path.join(d, "ready"), "w").close()
f = os.path.join(d, "finish")
while not os.path.exists(f): time.sleep(0.01)
stop.set()
for t in ts: t.join()
open(os.path.join(d, "output"), "a").write("bye\\n")
sys.exit(int(open(f).read()))
'''


def test_a_threaded_cpython_child_leaves_a_one_thread_stand_in(home: Home, tmp_path: Path) -> None:
    script = tmp_path / "threaded.py"
    script.write_text(THREADED)
    home.argv = [str(build("standin_parent")), str(home.out), sys.executable, "-S", str(script), str(home.out)]
    home.start()
    assert len(os.listdir(f"/proc/{home.child}/task")) == 4
    home.migrate()
    assert os.listdir(f"/proc/{home.child}/task") == [str(home.child)]
    home.finish(5)
    assert home.done() == "exited 5"
    assert home.output() == "start\nbye\n"


def test_a_tree_moved_to_host_c_leaves_one_stand_in(testbed: Testbed, tmp_path: Path) -> None:
    """The child is a shell with a workload of its own: both move, the workload's source copy is
    killed, the shell's pid stays as the stand-in and exits as the moved shell does."""
    out = tmp_path / "job"
    shell = f'{build("standin_child")} {out} 8 & wait $!; exit $?'
    argv = [str(build("standin_parent")), str(out), "/bin/sh", "-c", shell]
    start_in(testbed, "hostA", argv, out)
    child = int(wait_file(out / "child_pid"))
    workload = int(Path(f"/proc/{child}/task/{child}/children").read_text().split()[0])
    code, report, err = migrate_cli(f"{child}@hostA", "hostC", "--ssh-config", str(testbed.ssh_config_path),
                                    "--stand-in", keep_pid=True)
    try:
        assert code == 0, err
        assert sorted(p["pid"] for p in report["processes"]) == sorted([child, workload])
        assert report["stand_in"]["pid"] == child
        until("the workload's source copy gone", lambda: not alive(workload))
        assert Path(f"/proc/{child}/task/{child}/children").read_text().split() == []
        assert in_host_state(testbed, "hostC", workload) in ("S", "R")
        (out / "finish").write_text("7\n")
        assert wait_file(out / "parent_done", WAIT_S).strip() == "exited 7"
    finally:
        testbed.exec("hostC", ["kill", "-9", str(child), str(workload)])


def test_a_source_that_cannot_reach_the_destination_is_refused_a_stand_in(testbed: Testbed, tmp_path: Path) -> None:
    """The keeper connects to the destination as the data channel does: where the source cannot,
    --stand-in fails in preflight (nothing moves) rather than after the move."""
    out = tmp_path / "job"
    argv = [str(build("standin_parent")), str(out), str(build("standin_child")), str(out), "4"]
    start_in(testbed, "hostA", argv, out)
    child = int(wait_file(out / "child_pid"))
    route = ["ip", "route", "add", "unreachable", f"{testbed.address('hostB')}/32"]
    testbed.exec("hostA", route, check=True)
    try:
        code, report, err = migrate_cli(f"{child}@hostA", "hostB", "--ssh-config", str(testbed.ssh_config_path),
                                        "--stand-in")
    finally:
        testbed.exec("hostA", ["ip", "route", "del", *route[3:]], check=True)
    assert code != 0
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line.startswith("kcr-migrate: error: "), err
    assert "stand-in" in line and "hostA cannot connect to hostB" in line, line
    assert report["state"] == "rolled-back" and alive(child)
    assert not (out / "parent_log").exists()


def test_relayed_stdout_from_host_c_reaches_the_parent_on_host_a(testbed: Testbed, tmp_path: Path) -> None:
    out = tmp_path / "job"
    argv = [str(build("standin_parent")), "-p", str(out), str(build("standin_child")), str(out), "8"]
    start_in(testbed, "hostA", argv, out)
    child = int(wait_file(out / "child_pid"))
    code, report, err = migrate_cli(f"{child}@hostA", "hostC", "--ssh-config", str(testbed.ssh_config_path),
                                    "--stand-in", "--relay", "1", keep_pid=True)
    try:
        assert code == 0, err
        os.kill(child, signal.SIGUSR1)
        until("output relayed from hostC", lambda: "usr1 1\n" in text(out / "relayed"))
        (out / "finish").write_text("7\n")
        assert wait_file(out / "parent_done", WAIT_S).strip() == "exited 7"
        assert text(out / "relayed") == text(out / "output") and text(out / "output").endswith("bye\n")
    finally:
        testbed.exec("hostC", ["kill", "-9", str(child)])
