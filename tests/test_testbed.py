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
from tests._hosts import TEST_SUBNET

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / "examples" / "testbed.py"
BTRFS_STATE_DIR = Path("/run/kcr-testbed-test-btrfs")
BTRFS_PREFIX = "kcrb-"
BTRFS_SUBNET = "10.77.215.0/24"


def ns_inode(link_text: str) -> int:
    """4026532178 from 'net:[4026532178]'."""
    return int(link_text.strip().split("[", 1)[1].rstrip("]"))


def run_cli(state_dir: Path, *args: str,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CLI), "--state-dir", str(state_dir), *args],
                          input=stdin, capture_output=True, text=True, timeout=60)


def host_namespaces(bed: Testbed, host: str, via_ssh: bool) -> tuple[int, int]:
    argv = ["readlink", "/proc/self/ns/net", "/proc/self/ns/mnt"]
    run = bed.ssh if via_ssh else bed.exec
    proc = run(host, argv, capture_output=True, text=True, check=True, timeout=30)
    net, mnt = proc.stdout.split()
    return ns_inode(net), ns_inode(mnt)


def wait_for_exec(proc: subprocess.Popen[bytes], comm: str) -> None:
    """Wait until popen's nsenter has entered the host and exec'd ``comm``."""
    deadline = time.monotonic() + 5
    while Path(f"/proc/{proc.pid}/comm").read_text() != f"{comm}\n":
        assert time.monotonic() < deadline, f"{comm} did not start"
        time.sleep(0.01)


@pytest.mark.parametrize("via_ssh", [True, False], ids=["ssh", "exec"])
def test_commands_run_inside_the_hosts_namespaces(testbed: Testbed, via_ssh: bool) -> None:
    ours = os.stat("/proc/self/ns/net").st_ino, os.stat("/proc/self/ns/mnt").st_ino
    for host in testbed.hosts:
        expected = (os.stat(testbed.netns_path(host)).st_ino,
                    os.stat(testbed.mntns_path(host)).st_ino)
        assert host_namespaces(testbed, host, via_ssh) == expected
        assert expected[0] != ours[0] and expected[1] != ours[1]


def test_popen_starts_a_long_running_process_inside_the_host(testbed: Testbed) -> None:
    with testbed.popen("hostB", ["sleep", "30"]) as proc:
        try:
            wait_for_exec(proc, "sleep")
            for kind, path in (("net", testbed.netns_path("hostB")),
                               ("mnt", testbed.mntns_path("hostB"))):
                assert os.stat(f"/proc/{proc.pid}/ns/{kind}").st_ino == os.stat(path).st_ino
        finally:
            proc.kill()


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
    """Pids of live processes whose network or mount namespace inode is in ``namespaces``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            inodes = {os.stat(f"/proc/{pid}/ns/{kind}").st_ino for kind in ("net", "mnt")}
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
        wait_for_exec(sleeper, "sleep")
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
