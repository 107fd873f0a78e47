"""`kcr-migrate rebalance` between test hosts: hostA runs busy jobs, hostB is idle; the plan
moves what brings hostA under its threshold, and every job ends as an unmoved run does."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from examples.testbed import Testbed
from tests._hosts import start_in, verdict
from tests._migration import wait_gone
from tests._workloads import KCR_MIGRATE, build, kcr, one_error_line

ARGS = ["30", "1000000", "16"]   # duty percent, steps, MiB: as long as the test holds it (``verdict``)


def netns_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def rebalance(testbed: Testbed, hosts: Path, pids: list[int], *args: str) -> tuple[int, dict, str]:
    """`kcr-migrate rebalance --json` that may move ``pids`` only."""
    only = [arg for pid in pids for arg in ("--include", f"pid={pid}")]
    res = subprocess.run([*KCR_MIGRATE, "rebalance", "--hosts", str(hosts), "--ssh-config",
                          str(testbed.ssh_config_path), "--json", "--new-pid", "--sample", "1",
                          "--max-mem", "1", *only, *args],
                         capture_output=True, timeout=300)
    out = res.stdout.decode().strip()
    return res.returncode, json.loads(out.splitlines()[-1]) if out else {}, res.stderr.decode()


def between(doc: dict, host: str = "hostA") -> str:
    """A --max-load that ``host``, as just measured (``doc``: a --json output), is over, but that
    its busiest candidate alone stays under: halfway between that candidate and the host's load
    (measured again by the next run: the shares of a loaded machine's CPUs vary)."""
    (h,) = [h for h in doc["inventory"]["hosts"] if h["name"] == host]
    biggest = max(c["cpu"] for c in h["candidates"])
    assert h["load"] > biggest * 1.2, h
    return f"{(h['load'] + biggest) / 2 / h['cpus_measured']:.4f}"


def test_rebalance_moves_a_busy_job_to_the_idle_host(testbed: Testbed, tmp_path: Path) -> None:
    exe = str(build("busy_worker"))
    jobs = {}
    for i in range(4):                # 4 x 30 % of a CPU: what a move takes is well apart from the rest
        out = tmp_path / f"job{i}"
        pid = start_in(testbed, "hostA", [exe, str(out), *ARGS], out, hold=True)
        # Ahead of whatever else keeps the machine busy (the hosts share its CPUs): a job
        # starved of them would use less than its duty, and the second measurement would not
        # see the load the first one set the threshold from.
        os.setpriority(os.PRIO_PROCESS, pid, -10)
        jobs[pid] = out
    hosts = tmp_path / "hosts"
    hosts.write_text("hostA cpus=1\nhostB cpus=1\n")
    host_a = os.stat(testbed.netns_path("hostA")).st_ino

    code, first, err = rebalance(testbed, hosts, list(jobs), "--max-load", "100", "--dry-run")
    assert code == 0, err
    max_load = between(first)
    # --dry-run: the plan, and nothing moves
    code, dry, err = rebalance(testbed, hosts, list(jobs), "--max-load", max_load, "--dry-run")
    assert code == 0, err
    assert dry["report"] is None
    assert dry["plan"]["moves"], dry["plan"]
    assert all(m["source"] == "hostA" and m["dest"] == "hostB" for m in dry["plan"]["moves"])
    assert all(netns_of(pid) == host_a for pid in jobs), "a dry run moves nothing"

    code, result, err = rebalance(testbed, hosts, list(jobs), "--max-load", max_load)
    assert code == 0, err
    moves = result["report"]["moves"]
    done = [m for m in moves if m["state"] == "done"]
    assert done, moves
    host_b = os.stat(testbed.netns_path("hostB")).st_ino
    for m in done:
        assert m["pid"] in jobs and m["dest"] == "hostB"
        assert netns_of(m["new_pid"]) == host_b, "it runs inside hostB"
        assert m["downtime_ms"] > 0 and m["bytes_on_wire"] > 0
    # Two at a time (--max-per-host 2), yet frozen one after another: from a job's first thread
    # stopped on hostA to its running on hostB, no other job of these hosts was frozen.
    windows = sorted(m["frozen_s"] for m in done)
    assert all(a[0] < a[1] <= b[0] for a, b in zip(windows, windows[1:])), windows
    # Each job, moved or not, stops at its next hundred steps: its output must be the first
    # lines of an unmoved run's (made after, at full speed: the duty changes no result).
    outputs = {}
    for pid, out in jobs.items():
        assert verdict(out, timeout=120) == "PASS", f"job {pid}"
        outputs[pid] = (out / "output").read_text()
    steps = max(len(text.splitlines()) for text in outputs.values()) * 100
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    # (at the jobs' nice -10, or a busy machine makes it slower than they were)
    subprocess.run([exe, str(ref_dir), "100", str(steps), ARGS[2]], stdin=subprocess.DEVNULL, check=True, timeout=300,
                   preexec_fn=lambda: os.nice(-10))
    expected = (ref_dir / "output").read_text().splitlines(keepends=True)
    assert (ref_dir / "verdict").read_text() == "PASS\n"
    for pid, text in outputs.items():
        lines = text.splitlines(keepends=True)
        assert lines and lines == expected[:len(lines)], f"job {pid}"
    for m in done:
        wait_gone(m["new_pid"])


def test_a_drained_host_receives_nothing(testbed: Testbed, tmp_path: Path) -> None:
    exe = str(build("busy_worker"))
    out = tmp_path / "job"
    pid = start_in(testbed, "hostA", [exe, str(out), "60", "100000", "8"], out)
    hosts = tmp_path / "hosts"
    hosts.write_text("hostA cpus=1\nhostB cpus=1 state=drained\n")
    code, result, err = rebalance(testbed, hosts, [pid], "--max-load", "0.2")
    assert code == 0, err
    assert result["plan"]["moves"] == [] and result["report"] is None
    (r,) = [r for r in result["plan"]["rejected"] if r["pid"] == pid]
    assert "no usable host" in r["reason"]
    assert netns_of(pid) == os.stat(testbed.netns_path("hostA")).st_ino


def test_an_unknown_host_is_one_line(testbed: Testbed, tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("hostA\nhostZ\n")
    res = kcr("rebalance", "--hosts", str(hosts), "--ssh-config", str(testbed.ssh_config_path), "--dry-run",
              "--sample", "0.5")
    assert res.returncode == 1
    assert "hostZ" in one_error_line(res.stderr)
