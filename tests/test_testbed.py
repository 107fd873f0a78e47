"""Tests for the test hosts (examples/testbed.py): real namespaces, real sshd, no mocks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from examples.testbed import Testbed, TestbedUnavailable, check_available
from tests._hosts import TEST_OWN_PIDS, TEST_SUBNET

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / "examples" / "testbed.py"
BTRFS_STATE_DIR = Path("/run/kcr-testbed-test-btrfs")
BTRFS_PREFIX = "kcrb-"
BTRFS_SUBNET = "10.77.215.0/24"
PIDS_STATE_DIR = Path("/run/kcr-testbed-test-pids")
PIDS_PREFIX = "kcrp-"
PIDS_SUBNET = "10.77.220.0/24"


def ns_inode(link_text: str) -> int:
    """4026532178 from 'net:[4026532178]'."""
    return int(link_text.strip().split("[", 1)[1].rstrip("]"))


def run_cli(state_dir: Path, *args: str,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CLI), "--state-dir", str(state_dir), *args],
                          input=stdin, capture_output=True, text=True, timeout=60)


def host_namespaces(bed: Testbed, host: str, via_ssh: bool) -> tuple[int, int, int]:
    argv = ["readlink", "/proc/self/ns/net", "/proc/self/ns/mnt", "/proc/self/ns/pid"]
    run = bed.ssh if via_ssh else bed.exec
    proc = run(host, argv, capture_output=True, text=True, check=True, timeout=30)
    net, mnt, pid = proc.stdout.split()
    return ns_inode(net), ns_inode(mnt), ns_inode(pid)


def wait_for_exec(pid: int, comm: str) -> None:
    """Wait until process ``pid`` (popen's nsenter, say) has exec'd ``comm``."""
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}/comm").read_text() != f"{comm}\n":
        assert time.monotonic() < deadline, f"{comm} did not start"
        time.sleep(0.01)


@pytest.mark.parametrize("via_ssh", [True, False], ids=["ssh", "exec"])
def test_commands_run_inside_the_hosts_namespaces(testbed: Testbed, via_ssh: bool) -> None:
    ours = tuple(os.stat(f"/proc/self/ns/{kind}").st_ino for kind in ("net", "mnt", "pid"))
    assert testbed.own_pids == TEST_OWN_PIDS == ("hostC",)
    for host in testbed.hosts:
        pidns = testbed.pidns_path(host)
        expected = (os.stat(testbed.netns_path(host)).st_ino,
                    os.stat(testbed.mntns_path(host)).st_ino,
                    os.stat(pidns).st_ino if pidns is not None else ours[2])
        assert host_namespaces(testbed, host, via_ssh) == expected
        assert expected[0] != ours[0] and expected[1] != ours[1]
        assert (expected[2] != ours[2]) == (host in testbed.own_pids)


def test_popen_starts_a_long_running_process_inside_the_host(testbed: Testbed) -> None:
    with testbed.popen("hostB", ["sleep", "30"]) as proc:
        try:
            wait_for_exec(proc.pid, "sleep")
            for kind, path in (("net", testbed.netns_path("hostB")),
                               ("mnt", testbed.mntns_path("hostB")),
                               ("pid", Path("/proc/self/ns/pid"))):
                assert os.stat(f"/proc/{proc.pid}/ns/{kind}").st_ino == os.stat(path).st_ino
            assert testbed.root_pid("hostB", proc.pid) == proc.pid
            assert testbed.host_pid("hostB", proc.pid) == proc.pid
        finally:
            proc.kill()


# --- a host with pids of its own (hostC) ---

SHOW_PID = ["sh", "-c", "echo $$; exec sleep 60"]  # prints its pid, then runs as sleep
# Leaves a sleep behind that outlives the ssh session, and prints its pid.
ORPHAN = ["sh", "-c", "setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $!"]


def gone(pid: int) -> bool:
    """True once ``pid`` has ended (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs after {timeout} s"
        time.sleep(0.01)


@pytest.mark.parametrize("via_ssh", [True, False], ids=["ssh", "popen"])
def test_a_process_in_hostC_has_a_pid_of_hostC(testbed: Testbed, via_ssh: bool) -> None:
    pidns = testbed.pidns_path("hostC")
    assert pidns is not None
    if via_ssh:
        proc = subprocess.Popen(testbed.ssh_argv("hostC", SHOW_PID), stdout=subprocess.PIPE,
                                text=True)
    else:
        proc = testbed.popen("hostC", SHOW_PID, stdout=subprocess.PIPE, text=True)
    root = None
    with proc:
        try:
            assert proc.stdout is not None
            pid = int(proc.stdout.readline())
            root = testbed.root_pid("hostC", pid)
            assert root is not None and root != pid and root != proc.pid
            assert testbed.host_pid("hostC", root) == pid
            wait_for_exec(root, "sleep")
            assert os.stat(f"/proc/{root}/ns/pid").st_ino == os.stat(pidns).st_ino
            assert os.stat(pidns).st_ino != os.stat("/proc/self/ns/pid").st_ino
            # hostC's /proc names it by that pid
            seen = testbed.exec("hostC", ["cat", f"/proc/{pid}/cmdline"], capture_output=True,
                                check=True, timeout=30).stdout
            assert seen == b"sleep\x0060\x00"
            # the other hosts share this machine's pids: not a pid of hostC
            assert testbed.host_pid("hostC", proc.pid) is None
            assert testbed.host_pid("hostA", root) == root
        finally:
            if root is not None:
                os.kill(root, signal.SIGKILL)
            proc.kill()


@pytest.mark.parametrize("via_ssh", [True, False], ids=["ssh", "exec"])
def test_hostC_sees_itself_in_its_proc(testbed: Testbed, via_ssh: bool) -> None:
    argv = ["sh", "-c", "echo $$; exec cat /proc/self/stat /proc/1/cmdline"]
    run = testbed.ssh if via_ssh else testbed.exec
    out = run("hostC", argv, capture_output=True, text=True, check=True, timeout=30).stdout
    shell, stat, init = out.split("\n", 2)
    assert stat.split()[0] == shell  # /proc/self is the process's own pid in hostC
    assert "_pidns_init.py" in init  # and pid 1 there is the host's reaping init
    assert testbed.root_pid("hostC", 1) not in (None, 1)


def test_hostC_init_adopts_and_reaps_orphans(testbed: Testbed) -> None:
    daemon = testbed.ssh("hostC", ORPHAN, capture_output=True, text=True, check=True, timeout=30)
    orphan = testbed.root_pid("hostC", int(daemon.stdout))
    assert orphan is not None
    try:
        init = testbed.root_pid("hostC", 1)
        assert f"PPid:\t{init}\n" in Path(f"/proc/{orphan}/status").read_text()
    finally:
        os.kill(orphan, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{orphan}"):  # a zombie until its parent reaps it
        assert time.monotonic() < deadline, f"orphan {orphan} not reaped"
        time.sleep(0.01)


def test_killing_popen_of_hostC_ends_its_process(testbed: Testbed) -> None:
    with testbed.popen("hostC", SHOW_PID, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        root = testbed.root_pid("hostC", int(proc.stdout.readline()))
        assert root is not None
        assert Path(f"/proc/{root}/status").read_text().count(f"PPid:\t{proc.pid}\n") == 1
        proc.kill()
        assert proc.wait(timeout=10) == -signal.SIGKILL
        wait_gone(root)


# clone3(2) with set_tid: the call that gives a restored process the pid it had.  The parent
# prints the pid clone3 returned, the child its getpid().
CLONE3_SET_TID = """
import ctypes, os, signal, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
want = (ctypes.c_int32 * 1)(int(sys.argv[1]))
# struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
# set_tid, set_tid_size, cgroup
args = ctypes.create_string_buffer(struct.pack(
    "11Q", 0, 0, 0, 0, signal.SIGCHLD, 0, 0, 0, ctypes.addressof(want), 1, 0), 88)
pid = libc.syscall(435, args, 88)
if pid == 0:
    os.write(1, b"%d\\n" % os.getpid())
    os._exit(0)
if pid < 0:
    sys.exit("clone3: " + os.strerror(ctypes.get_errno()))
os.waitpid(pid, 0)
print(pid)
"""


def test_clone3_set_tid_in_hostC_gives_a_pid_this_machine_uses(testbed: Testbed) -> None:
    want = os.getpid()  # in use here, so hostC gets it only because its pids are its own
    proc = testbed.ssh("hostC", [sys.executable, "-c", CLONE3_SET_TID, str(want)],
                       capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(want), str(want)]


def test_exec_cwd_is_a_path_inside_the_host(testbed: Testbed) -> None:
    proc = testbed.exec("hostA", ["pwd"], cwd="/srv", capture_output=True, text=True, check=True)
    assert proc.stdout == "/srv\n"


def test_hosts_reach_each_other_over_ssh(testbed: Testbed) -> None:
    argv = testbed.ssh_argv("hostB", ["readlink", "/proc/self/ns/net"])
    proc = testbed.exec("hostA", argv, capture_output=True, text=True, check=True, timeout=30)
    assert ns_inode(proc.stdout) == os.stat(testbed.netns_path("hostB")).st_ino


def test_hosts_have_no_route_off_their_link(testbed: Testbed) -> None:
    for host in testbed.hosts:
        routes = testbed.exec(host, ["ip", "-4", "route", "show"], capture_output=True,
                              text=True, check=True).stdout.splitlines()
        assert [r.split()[0] for r in routes] == [TEST_SUBNET]
        lo = testbed.exec(host, ["ip", "-o", "link", "show", "lo"], capture_output=True,
                          text=True, check=True).stdout
        assert ",UP," in lo or ",UP>" in lo


def test_srv_is_private_to_each_host(testbed: Testbed) -> None:
    name = f"marker-{uuid.uuid4().hex}"
    testbed.exec("hostA", ["sh", "-c", f"echo hostA > /srv/{name}"], check=True)
    try:
        assert testbed.exec("hostA", ["cat", f"/srv/{name}"], capture_output=True, text=True,
                            check=True).stdout == "hostA\n"
        assert testbed.exec("hostB", ["test", "-e", f"/srv/{name}"]).returncode == 1
        assert not Path("/srv", name).exists()
        srv = testbed.srv_path("hostA")
        assert srv is not None and (srv / name).read_text() == "hostA\n"
    finally:
        testbed.exec("hostA", ["rm", "-f", f"/srv/{name}"], check=True)


def test_ssh_sessions_find_this_pythons_scripts(testbed: Testbed) -> None:
    proc = testbed.ssh("hostA", ["printenv", "PATH"], capture_output=True, text=True, check=True,
                       timeout=30)
    assert proc.stdout.strip().split(":")[0] == sysconfig.get_path("scripts")


def test_up_when_up_is_a_noop(testbed: Testbed) -> None:
    pids = [testbed.sshd_pid(h) for h in testbed.hosts]
    assert None not in pids
    assert testbed.up() is False
    assert [testbed.sshd_pid(h) for h in testbed.hosts] == pids


def test_cli_status_ssh_config_prints_only_the_path(testbed: Testbed) -> None:
    proc = run_cli(testbed.state_dir, "status", "--ssh-config")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{testbed.ssh_config_path}\n", "")
    ssh = subprocess.run(["ssh", "-F", proc.stdout.strip(), "hostB", "true"], timeout=30)
    assert ssh.returncode == 0


def test_cli_status_and_exec(testbed: Testbed) -> None:
    status = run_cli(testbed.state_dir, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert testbed.address("hostB") in status.stdout and "ok" in status.stdout
    assert [line.endswith("ok; own pids") for line in status.stdout.splitlines()[1:4]] == \
        [False, False, True]
    assert run_cli(testbed.state_dir, "exec", "hostB", "--", "sh", "-c", "exit 7").returncode == 7
    echoed = run_cli(testbed.state_dir, "exec", "hostA", "--", "cat", stdin="hello\n")
    assert (echoed.returncode, echoed.stdout) == (0, "hello\n")


def assert_one_line_error(proc: subprocess.CompletedProcess[str], text: str) -> None:
    assert proc.returncode != 0
    assert proc.stderr.startswith("testbed: error:") and proc.stderr.count("\n") == 1
    assert text in proc.stderr and "Traceback" not in proc.stderr


def test_cli_errors_are_one_line(testbed: Testbed, tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert_one_line_error(run_cli(state, "status"), "not up")
    assert_one_line_error(run_cli(testbed.state_dir, "exec", "hostZ", "--", "true"), "hostZ")
    assert_one_line_error(run_cli(state, "up", "--subnet", "8.8.8.0/24"), "private")
    assert_one_line_error(run_cli(state, "up", "--own-pids", "hostZ"), "hostZ")
    assert_one_line_error(run_cli(state, "up", "--subnet", TEST_SUBNET, "--prefix", "kcrx-"),
                          "already used")
    assert not state.exists()


def leftovers(bed: Testbed) -> list[str]:
    """Everything of ``bed`` still on this machine, described."""
    found = [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(bed.prefix)] \
        if os.path.isdir("/run/netns") else []
    found += [f"link {n}" for n in os.listdir("/sys/class/net") if n.startswith(bed.prefix)]
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {line.split()[4]}" for line in f if str(bed.state_dir) in line]
    losetup = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True)
    found += [f"loop {line}" for line in losetup.stdout.splitlines() if str(bed.state_dir) in line]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(bed.state_dir).encode() in cmdline:
            found.append(f"process {pid} {cmdline!r}")
    if bed.state_dir.exists():
        found.append(f"dir {bed.state_dir}")
    return found


def processes_in(namespaces: set[int]) -> list[int]:
    """Pids of live processes whose network, mount or pid namespace inode is in ``namespaces``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            inodes = {os.stat(f"/proc/{pid}/ns/{kind}").st_ino for kind in ("net", "mnt", "pid")}
        except OSError:
            continue
        if inodes & namespaces:
            found.append(int(pid))
    return found


@pytest.fixture
def btrfs_testbed(testbed: Testbed) -> Iterator[Testbed]:
    """A second testbed with btrfs /srv (``testbed`` is requested for its session lock)."""
    bed = Testbed(BTRFS_STATE_DIR, prefix=BTRFS_PREFIX, subnet=BTRFS_SUBNET, srv_fs="btrfs",
                  srv_size=256 << 20)
    try:
        check_available("btrfs")
    except TestbedUnavailable as exc:
        pytest.skip(f"btrfs test hosts unavailable: {exc}")
    try:
        bed.up()
        yield bed
    finally:
        bed.down()


def test_btrfs_srv_then_down_after_damage(btrfs_testbed: Testbed) -> None:
    bed = btrfs_testbed
    fstype = bed.exec("hostA", ["stat", "-f", "-c", "%T", "/srv"], capture_output=True,
                      text=True, check=True).stdout
    assert fstype == "btrfs\n" and bed.srv_path("hostA") is None
    bed.exec("hostA", ["sh", "-c", "echo a > /srv/only-on-hostA"], check=True)
    assert bed.exec("hostB", ["test", "-e", "/srv/only-on-hostA"]).returncode == 1
    assert bed.ssh("hostB", ["true"], timeout=30).returncode == 0
    namespaces = {os.stat(p).st_ino for h in bed.hosts
                  for p in (bed.netns_path(h), bed.mntns_path(h))}
    with bed.popen("hostB", ["sleep", "60"]) as sleeper:
        wait_for_exec(sleeper.pid, "sleep")
        # Damage it the way a crash would: hostA's sshd gone, hostB's netns file removed by hand.
        pid = bed.sshd_pid("hostA")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", bed.netns_name("hostB")], check=True)
        down = run_cli(bed.state_dir, "down")
        assert down.returncode == 0, down.stderr
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
    assert leftovers(bed) == []
    assert processes_in(namespaces) == []
    bed.down()  # idempotent
    assert run_cli(bed.state_dir, "down").returncode == 0
    assert leftovers(bed) == []


@pytest.fixture
def pids_testbed(testbed: Testbed) -> Iterator[Testbed]:
    """A one-host testbed whose host has its own pids (``testbed`` is requested for its lock)."""
    bed = Testbed(PIDS_STATE_DIR, hosts=("hostC",), prefix=PIDS_PREFIX, subnet=PIDS_SUBNET,
                  own_pids=("hostC",))
    try:
        bed.up()
        yield bed
    finally:
        bed.down()


def test_down_ends_everything_of_a_host_with_own_pids(pids_testbed: Testbed) -> None:
    bed = pids_testbed
    pidns = bed.pidns_path("hostC")
    assert pidns is not None
    namespaces = {os.stat(p).st_ino for p in (bed.netns_path("hostC"), bed.mntns_path("hostC"),
                                              pidns)}
    # An orphan left by an ssh session (hostC's init is its parent now), and a process of popen.
    daemon = bed.ssh("hostC", ORPHAN, capture_output=True, text=True, check=True, timeout=30)
    orphan = bed.root_pid("hostC", int(daemon.stdout))
    assert orphan is not None
    with bed.popen("hostC", SHOW_PID, stdout=subprocess.PIPE, text=True) as sleeper:
        assert sleeper.stdout is not None
        inner = bed.root_pid("hostC", int(sleeper.stdout.readline()))
        assert inner is not None
        down = run_cli(bed.state_dir, "down")
        assert down.returncode == 0, down.stderr
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
    assert leftovers(bed) == []
    assert processes_in(namespaces) == []
    bed.down()  # idempotent
    assert run_cli(bed.state_dir, "down").returncode == 0
    assert leftovers(bed) == []
