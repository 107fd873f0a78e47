"""`kcr-migrate rebalance --slurm-job / --slurm` on a real Slurm on the test hosts (tests/_slurm.py):
the nodes, their states and a running job's workload come from Slurm, the load from the agents."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio

from examples.slurm import SlurmCluster
from examples.testbed import Testbed
from migrate.slurm import Slurm
from tests._migration import proc_state
from tests._workloads import KCR_MIGRATE, build, one_error_line
from tests.test_rebalance_hosts import between
from tests.test_slurm import sacct_line, wait_job

WORKERS = 4
# Four busy workers under the batch shell, each about 30 % of a CPU: the job's workload. They
# run until scancel, or until let go (their go-on file), when they stop at their next hundred
# steps and the batch script ends with them. At nice -10, ahead of whatever else keeps the
# machine busy: starved, a worker uses less than its duty, and a second measurement would not
# see the load the first one set the threshold from.
BATCH = '''#!/bin/sh
for i in {workers}; do WORKLOAD_HOLD={out}/w$i/go-on nice -n -10 {exe} {out}/w$i 30 1000000 16 & done
wait
'''


def _busy(slurm: SlurmCluster, tmp_path: Path, nodes: str) -> Iterator[tuple[int, Path]]:
    """The busy job on ``nodes`` (its batch shell and workers on the first of them)."""
    out = tmp_path / "job"
    for i in range(1, WORKERS + 1):
        (out / f"w{i}").mkdir(parents=True)
    script = out / "job.sh"
    script.write_text(BATCH.format(workers=" ".join(str(i) for i in range(1, WORKERS + 1)),
                                   exe=build("busy_worker"), out=out))
    answer = slurm.command(["sbatch", "--parsable", "-N", str(len(nodes.split(","))), "-w", nodes, "-J", "kcr-busy",
                            "-o", str(out / "slurm.out"), str(script)])
    job_id = int(answer.strip().split(";")[0])
    try:
        yield job_id, out
    finally:
        slurm.command(["scancel", str(job_id)], check=False)


@pytest.fixture
def busy_job(slurm: SlurmCluster, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    yield from _busy(slurm, tmp_path, "hostA")


@pytest.fixture
def busy_job_on_two_nodes(slurm: SlurmCluster, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """Allocated hostA and hostB; its workers all start on hostA."""
    yield from _busy(slurm, tmp_path, "hostA,hostB")


def rebalance(slurm: SlurmCluster, testbed: Testbed, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*KCR_MIGRATE, "rebalance", "--ssh-config", str(testbed.ssh_config_path), "--sample", "1",
                           "--max-mem", "1", "--new-pid", *args],
                          capture_output=True, timeout=300, env={**os.environ, "SLURM_CONF": str(slurm.conf_path)})


async def _ready(inventory: Slurm, job_id: int, out: Path) -> Any:
    with trio.fail_after(60):
        while (await inventory.job(job_id)).state != "RUNNING" or \
                not all((out / f"w{i}" / "ready").exists() for i in range(1, WORKERS + 1)):
            await trio.sleep(0.1)
    return await inventory.job_processes(job_id, "hostA")


def test_a_slurm_jobs_workload_is_planned_within_its_allocation_or_beyond(
        slurm: SlurmCluster, testbed: Testbed, busy_job: tuple[int, Path]) -> None:
    job_id, out = busy_job
    inventory = Slurm(str(slurm.conf_path), ssh_config=str(testbed.ssh_config_path))
    procs = trio.run(_ready, inventory, job_id, out)
    workers = {p.pid for p in procs.workload}
    assert len(workers) == WORKERS
    # measured with the nodes that share this machine's kernel, as the runs below that plan moves
    res = rebalance(slurm, testbed, "--slurm-job", str(job_id), "--max-load", "100", "--dry-run", "--json",
                    "--any-node")
    assert res.returncode == 0, res.stderr.decode()
    max_load = between(json.loads(res.stdout))      # one worker fits under it, all of them do not

    # Its allocation is hostA alone: nowhere to go.
    res = rebalance(slurm, testbed, "--slurm-job", str(job_id), "--max-load", max_load, "--dry-run", "--json")
    assert res.returncode == 0, res.stderr.decode()
    doc = json.loads(res.stdout)
    assert [h["name"] for h in doc["inventory"]["hosts"]] == ["hostA"]
    assert doc["inventory"]["allocations"] == {str(job_id): ["hostA"]}
    (a,) = doc["inventory"]["hosts"]
    assert {c["pid"] for c in a["candidates"]} == workers, "the candidates are the job's workload, nothing else"
    assert all(c["job_id"] == str(job_id) and c["movable"] for c in a["candidates"])
    assert doc["plan"]["moves"] == []
    assert {r["pid"] for r in doc["plan"]["rejected"]} == workers

    # With --any-node every node of its partition may take its processes.
    res = rebalance(slurm, testbed, "--slurm-job", str(job_id), "--max-load", max_load, "--dry-run", "--json",
                    "--any-node")
    assert res.returncode == 0, res.stderr.decode()
    doc = json.loads(res.stdout)
    assert {h["name"] for h in doc["inventory"]["hosts"]} >= {"hostA", "hostB"}
    moves = doc["plan"]["moves"]
    assert moves, (doc["plan"]["rejected"], doc["plan"]["hosts"], doc["plan"]["notes"])
    assert all(m["pid"] in workers and m["source"] == "hostA" and m["dest"] != "hostA" for m in moves)
    assert all(os.path.exists(f"/proc/{pid}") for pid in workers), "a dry run moves nothing"

    # The partition: the same workload, found through the running jobs.
    partition = trio.run(inventory.job, job_id).partition
    res = rebalance(slurm, testbed, "--slurm", partition, "--max-load", max_load, "--dry-run", "--json",
                    "--any-node")
    assert res.returncode == 0, res.stderr.decode()
    doc = json.loads(res.stdout)
    found = {c["pid"] for h in doc["inventory"]["hosts"] for c in h["candidates"]}
    assert workers <= found


def test_a_slurm_jobs_workers_move_and_scancel_still_ends_them_everywhere(
        slurm: SlurmCluster, testbed: Testbed, busy_job: tuple[int, Path]) -> None:
    """The planned moves run: workers go to hostB, each leaving a stand-in under the batch shell
    on hostA (the job keeps running, accounted), and scancel on the job ends the moved workers too."""
    job_id, out = busy_job
    inventory = Slurm(str(slurm.conf_path), ssh_config=str(testbed.ssh_config_path))
    procs = trio.run(_ready, inventory, job_id, out)
    workers = {p.pid for p in procs.workload}
    res = rebalance(slurm, testbed, "--slurm-job", str(job_id), "--max-load", "100", "--dry-run", "--json",
                    "--any-node")
    assert res.returncode == 0, res.stderr.decode()
    res = rebalance(slurm, testbed, "--slurm-job", str(job_id), "--max-load", between(json.loads(res.stdout)),
                    "--json", "--any-node")
    assert res.returncode == 0, res.stderr.decode()
    moved = [m for m in json.loads(res.stdout)["report"]["moves"] if m["state"] == "done"]
    assert moved, res.stderr.decode()
    there = {}
    for m in moved:
        assert m["pid"] in workers and m["stand_in"], m
        pid = there[m["pid"]] = testbed.root_pid(m["dest"], m["new_pid"])   # its pid as this machine sees it
        assert pid is not None and os.stat(f"/proc/{pid}/ns/net").st_ino == \
            os.stat(testbed.netns_path(m["dest"])).st_ino
        assert proc_state(m["pid"]) not in (None, "Z"), "the stand-in holds the worker's pid under the batch shell"
    assert trio.run(inventory.job, job_id).state == "RUNNING"
    slurm.command(["scancel", str(job_id)])
    for m in moved:
        deadline = time.monotonic() + 60
        while proc_state(there[m["pid"]]) not in (None, "Z") or proc_state(m["pid"]) not in (None, "Z"):
            assert time.monotonic() < deadline, f"scancel left {m} running"
            time.sleep(0.05)


def test_a_slurm_job_rebalanced_within_its_allocation_while_it_runs_completes(
        slurm: SlurmCluster, testbed: Testbed, busy_job_on_two_nodes: tuple[int, Path]) -> None:
    """A job allocated two nodes whose workers all run on the first: rebalanced while it runs,
    workers move to its other node (no --any-node: its allocation is where they may go), and
    the job finishes as if never moved: every worker's output is the first lines of an
    unmoved sibling's (the same computation), the batch shell's wait sees them end well, and
    Slurm records it COMPLETED with exit code 0:0; no worker runs on anywhere."""
    job_id, out = busy_job_on_two_nodes
    inventory = Slurm(str(slurm.conf_path), ssh_config=str(testbed.ssh_config_path))
    procs = trio.run(_ready, inventory, job_id, out)
    workers = {p.pid for p in procs.workload}
    res = rebalance(slurm, testbed, "--slurm-job", str(job_id), "--max-load", "100", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr.decode()
    doc = json.loads(res.stdout)
    assert doc["inventory"]["allocations"] == {str(job_id): ["hostA", "hostB"]}
    res = rebalance(slurm, testbed, "--slurm-job", str(job_id), "--max-load", between(doc), "--json")
    assert res.returncode == 0, res.stderr.decode()
    moved = [m for m in json.loads(res.stdout)["report"]["moves"] if m["state"] == "done"]
    assert moved and len(moved) < WORKERS, moved      # some moved, some stayed to compare with
    assert all(m["pid"] in workers and m["dest"] == "hostB" for m in moved), moved
    there = [testbed.root_pid(m["dest"], m["new_pid"]) for m in moved]
    assert all(pid is not None for pid in there)
    for i in range(1, WORKERS + 1):
        (out / f"w{i}" / "go-on").touch()
    job = trio.run(wait_job, inventory, job_id, ("COMPLETED", "FAILED", "CANCELLED"))
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0")
    assert sacct_line(slurm, job_id) == ["COMPLETED", "0:0"]
    outputs = [(out / f"w{i}" / "output").read_text().splitlines() for i in range(1, WORKERS + 1)]
    assert all((out / f"w{i}" / "verdict").read_text() == "PASS\n" for i in range(1, WORKERS + 1))
    longest = max(outputs, key=len)
    assert all(lines and lines == longest[:len(lines)] for lines in outputs), "a worker's results differ"
    for pid in [*workers, *there]:
        assert proc_state(pid) in (None, "Z"), f"pid {pid} runs on after its job completed"


@pytest.mark.parametrize("args,says", [
    (["--slurm-job", "999999"], "Slurm has no job 999999"),
    (["--slurm", "nosuchpartition"], "no partition 'nosuchpartition'"),
])
def test_slurm_bad_input_is_one_line(slurm: SlurmCluster, testbed: Testbed,
                                     args: list[str], says: str) -> None:
    res = rebalance(slurm, testbed, *args, "--dry-run")
    assert res.returncode == 1
    assert says in one_error_line(res.stderr)
