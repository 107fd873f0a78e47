"""migrate/inventory.py, the rebalancer's inventory of a cluster: the host file, and real hosts measured by
their agents (tests/test_inventory.py checks agent/inventory.py, what a process holds)."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import trio

from examples.testbed import Testbed
from migrate import Host, InventoryError, MeasureOptions, Rule, measure, read_hosts_file
from migrate.inventory import parse_hosts
from tests._hosts import start_in
from tests._workloads import build, kcr, one_error_line

GiB = 1 << 30


def test_host_file_format(tmp_path: Path) -> None:
    f = tmp_path / "hosts"
    f.write_text("# the cluster\nnode1 cpus=32 mem=128G label=gpu,fast\n\n  node2   # spare\n"
                 "node3 state=drain\nnode4 state=down mem=500MB\n")
    hosts = read_hosts_file(str(f))
    assert hosts == [Host("node1", 32, 128 * GiB, "up", ("gpu", "fast")), Host("node2"),
                     Host("node3", state="drained"), Host("node4", memory_bytes=500_000_000, state="down")]
    assert [h.usable for h in hosts] == [True, True, False, False]


@pytest.mark.parametrize("text,says", [
    ("a\nb cpus=many\n", "line 2: cpus=many"),
    ("a mem=12 parsecs\n", "line 1: 'parsecs' is not KEY=VALUE"),
    ("a mem=lots\n", "line 1: 'lots' is not a size"),
    ("a colour=blue\n", "line 1: unknown key 'colour'"),
    ("a\na\n", "line 2: host a is listed twice"),
    ("a state=sleepy\n", "line 1: host a: state 'sleepy'"),
    ("a cpus=0\n", "line 1: host a: cpus must be >= 1"),
    ("# nothing\n", "lists no hosts"),
])
def test_host_file_errors_name_the_line(text: str, says: str) -> None:
    with pytest.raises(InventoryError) as e:
        parse_hosts(text, "hosts")
    assert says in str(e.value), str(e.value)


@pytest.mark.parametrize("content", [b"\xff\xfe binary", None])
def test_rebalance_refuses_a_bad_hosts_file_in_one_line(tmp_path: Path, content: bytes | None) -> None:
    f = tmp_path / "hosts"
    if content is not None:
        f.write_bytes(content)
    res = kcr("rebalance", "--hosts", str(f), "--dry-run")
    assert res.returncode != 0
    line = one_error_line(res.stderr)
    assert str(f) in line and ("not text" in line or "No such file" in line), line


def test_rebalance_bad_options_are_usage_errors(tmp_path: Path) -> None:
    f = tmp_path / "hosts"
    f.write_text("localhost\n")
    for args in (["--max-mem", "2"], ["--include", "colour=red"], ["--every", "soon"], ["--max-per-host", "0"]):
        res = kcr("rebalance", "--hosts", str(f), *args)
        assert res.returncode == 2, args
        assert "Traceback" not in res.stderr.decode()


def _busy(testbed: Testbed, tmp_path: Path, name: str, duty: int = 40, steps: int = 3000) -> int:
    exe = str(build("busy_worker"))
    out = tmp_path / name
    return start_in(testbed, "hostA", [exe, str(out), str(duty), str(steps), "16"], out)


HOLDS_A_SOCKET = """
import os, socket, sys
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)   # (a UDP socket moves now)
open(os.path.join(sys.argv[1], "ready"), "w").close()
x = 0
while True:
    x += 1
"""


def test_measure_between_test_hosts(testbed: Testbed, tmp_path: Path) -> None:
    pid = _busy(testbed, tmp_path, "busy")
    script = tmp_path / "holds_a_socket.py"
    script.write_text(HOLDS_A_SOCKET)
    stuck = start_in(testbed, "hostA", [sys.executable, "-S", str(script), str(tmp_path / "stuck")],
                     tmp_path / "stuck")
    hosts = [Host("hostA", cpus=1), Host("hostB", cpus=1), Host("hostC", cpus=1, state="drained"),
             Host("nowhere", state="down")]
    opts = MeasureOptions(sample_s=1.0, dirty_s=0.3, ssh_config=str(testbed.ssh_config_path),
                          include=(Rule("command", "busy_worker"), Rule("pid", str(stuck))),
                          link_sample_bytes=8 << 20)
    inv = trio.run(measure, hosts, opts)
    a, b, c, down = inv.hosts
    assert [h.name for h in inv.hosts] == ["hostA", "hostB", "hostC", "nowhere"]
    # the hosts share this machine's kernel: each counts its own processes
    assert a.shared_kernel and b.shared_kernel
    assert a.load > b.load and a.load > 0.1, (a.load, b.load)
    (cand,) = [x for x in a.candidates if x.comm == "busy_worker"]
    assert cand.pid == pid and cand.movable and cand.reason == "", cand
    assert cand.cpu > 0.1 and cand.memory_bytes >= 16 << 20
    assert cand.dirty_rate > 0, "it writes all the time"
    (held,) = [x for x in a.candidates if x.pid == stuck]
    assert not held.movable and "socket" in held.reason and held.cpu > 0.1, held
    assert held.dirty_rate == -1.0, "what cannot move is not sampled"
    # what the rules leave out is listed, not inspected
    assert all(not x.movable and x.reason == "matches no --include rule" for x in b.candidates + c.candidates)
    assert not down.host.usable and down.load == 0.0
    assert inv.bandwidth_source == "measured"
    assert set(inv.bandwidth) == {"hostA", "hostB", "hostC"} and all(v > 1 << 20 for v in inv.bandwidth.values())
    assert os.path.exists(f"/proc/{pid}"), "measuring leaves the process running"


def test_measure_an_unreachable_host_is_one_line(testbed: Testbed, tmp_path: Path) -> None:
    f = tmp_path / "hosts"
    f.write_text("hostA\nno-such-host.invalid\n")
    res = kcr("rebalance", "--hosts", str(f), "--ssh-config", str(testbed.ssh_config_path), "--dry-run",
              "--sample", "0.5", timeout=120)
    assert res.returncode == 1
    line = one_error_line(res.stderr)
    assert "no-such-host.invalid" in line, line


def test_a_named_process_is_measured_with_its_tree(testbed: Testbed, tmp_path: Path) -> None:
    """A job's shell names the job (a scheduler gives its pids): it uses no CPU itself, its
    worker does; the candidate is the tree, with the worker's CPU and dirty rate."""
    exe = str(build("busy_worker"))
    out = tmp_path / "job"
    shell = start_in(testbed, "hostA", ["sh", "-c", f"{exe} {out} 40 100000 16 & wait"], out)
    try:
        _measure_tree(testbed, shell)
    finally:
        os.killpg(shell, signal.SIGKILL)     # the worker too (the shell is its session's leader)


def _measure_tree(testbed: Testbed, shell: int) -> None:
    opts = MeasureOptions(sample_s=1.0, dirty_s=0.3, ssh_config=str(testbed.ssh_config_path), bandwidth=1e9,
                          pids={"hostA": (shell, 1 << 21)}, include=(Rule("pid", str(shell)),))
    (a,) = trio.run(measure, [Host("hostA")], opts).hosts
    (job,) = [c for c in a.candidates if c.pid == shell]
    assert job.comm == "sh" and len(job.tree) == 2 and job.tree[0] == shell, job
    assert job.movable, job.reason
    assert job.cpu > 0.1 and job.dirty_rate > 0, job
    assert all(c.pid != 1 << 21 for c in a.candidates), "a named pid that is not there is left out"
