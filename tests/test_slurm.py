"""Slurm as the inventory, on a real Slurm cluster on the test hosts (tests/_slurm.py).

Jobs are submitted with sbatch, run in a test host under slurmstepd, are found through
migrate/slurm.py (sinfo/squeue --json, scontrol listpids on the node over SSH), and a running
job's workload is moved from hostA to hostB with kcr-migrate while Slurm watches.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import trio

from examples.slurm import SlurmCluster, SlurmUnavailable, check_slurm_available
from examples.testbed import Testbed, check_available
from migrate.slurm import (JobProcesses, NodeUnusable, NoSuchJob, Slurm, SlurmError, SlurmJob,
                           SlurmUnreachable, UnknownNode, _job_processes, _node)
from tests._migration import migrate_cli, proc_state, running_copies, wait_gone

WAIT = 60.0

# The job's workload: fills memory with a pattern, says it is ready, runs until told to finish,
# then checks its memory and writes its verdict.  It runs under the batch shell.
WORKLOAD = r'''
import hashlib, os, sys, time
out = sys.argv[1]
data = bytearray(os.urandom(1 << 16) * 128)          # 8 MiB
digest = hashlib.sha256(data).hexdigest()
with open(os.path.join(out, "ready"), "w") as f:
    f.write(str(os.getpid()))
n = 0
while not os.path.exists(os.path.join(out, "finish")):
    i = (n * 4099) % len(data)
    data[i] = data[i]                                  # keeps writing its own memory
    n += 1
    time.sleep(0.005)
verdict = "PASS" if hashlib.sha256(data).hexdigest() == digest else "FAIL"
with open(os.path.join(out, "result"), "w") as f:
    f.write(f"{verdict} job {os.environ.get('SLURM_JOB_ID')}\n")
'''

# The batch script: the workload in the background, then wait for it and exit as it did.
BATCH = '''#!/bin/sh
{python} -S {workload} {out} &
wait $!
status=$?
echo "workload exit $status" > {out}/status
exit $status
'''


@pytest.fixture
def inventory(slurm: SlurmCluster, testbed: Testbed) -> Slurm:
    return Slurm(str(slurm.conf_path), ssh_config=str(testbed.ssh_config_path))


@pytest.fixture
def submit(slurm: SlurmCluster, tmp_path: Path) -> Iterator[Callable[[str], tuple[int, Path]]]:
    """``submit(node)``: sbatch the batch script onto ``node``; (job id, its output dir).  Every
    job submitted is cancelled after the test."""
    jobs: list[int] = []

    def sbatch(node: str) -> tuple[int, Path]:
        out = tmp_path / f"job{len(jobs)}"
        out.mkdir()
        (out / "workload.py").write_text(WORKLOAD)
        script = out / "job.sh"
        script.write_text(BATCH.format(python=sys.executable, workload=out / "workload.py", out=out))
        answer = slurm.command(["sbatch", "--parsable", "-w", node, "-J", "kcr-test", "-o",
                                str(out / "slurm-%j.out"), str(script)])
        jobs.append(int(answer.strip().split(";")[0]))
        return jobs[-1], out

    yield sbatch
    if jobs:
        slurm.command(["scancel", *map(str, jobs)], check=False)


def written(path: Path) -> bool:
    """Has ``path`` been written (it is made empty first, then written in one call)?"""
    return path.exists() and path.stat().st_size > 0


async def wait_for(what: str, check: Callable[[], object], timeout: float = WAIT) -> None:
    deadline = trio.current_time() + timeout
    while not check():
        assert trio.current_time() < deadline, f"{what} after {timeout:g} s"
        await trio.sleep(0.05)


async def wait_job(inventory: Slurm, job_id: int, states: tuple[str, ...]) -> SlurmJob:
    deadline = trio.current_time() + WAIT
    while (job := await inventory.job(job_id)).state not in states:
        assert trio.current_time() < deadline, f"job {job_id} is {job.state}, not {'/'.join(states)}"
        await trio.sleep(0.1)
    return job


async def running_job(inventory: Slurm, submit: Callable[[str], tuple[int, Path]],
                      node: str) -> tuple[int, Path, JobProcesses]:
    """A job running on ``node`` whose workload is ready; its processes there."""
    job_id, out = submit(node)
    await wait_job(inventory, job_id, ("RUNNING",))
    await wait_for("the workload is not ready", (out / "ready").exists)
    return job_id, out, await inventory.job_processes(job_id, node)


def netns_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def sacct_line(slurm: SlurmCluster, job_id: int) -> list[str]:
    """State and exit code of a finished job from the accounting Slurm keeps (jobcomp file)."""
    out = slurm.command(["sacct", "-c", "-n", "-P", "-j", str(job_id), "-o", "jobid,state,exitcode"])
    return [line.split("|")[1:] for line in out.splitlines() if line.split("|")[0] == str(job_id)][0]


# --- what Slurm says is checked before use (no cluster needed) ------------------------------------

NODE = {"name": "node7", "address": "10.0.0.7", "state": "mixed", "state_flags": ["DRAIN"], "cpus": 64,
        "alloc_cpus": 8, "cpu_load": 1250, "real_memory": 257000, "free_memory": 200000,
        "partitions": ["batch"], "reason": "disk"}


def test_a_node_record_is_decoded_with_units_and_state() -> None:
    node = _node(NODE)
    assert (node.load, node.memory_bytes, node.free_memory_bytes) == (12.5, 257000 << 20, 200000 << 20)
    assert (node.host_state, node.describe) == ("drained", "mixed+DRAIN")
    assert _node({**NODE, "state_flags": [], "state": "down"}).host_state == "down"
    assert _node({**NODE, "state_flags": ["NOT_RESPONDING"], "state": "idle"}).host_state == "down"
    assert _node({**NODE, "state_flags": []}).host_state == "up"
    assert _node({**NODE, "free_memory": (1 << 64) - 2}).free_memory_bytes is None   # NO_VAL: not reported


@pytest.mark.parametrize("bad", [{"name": "node7; rm -rf /"}, {"name": 7}, {"cpus": -1}, {"cpus": True},
                                 {"real_memory": 1 << 50}, {"partitions": "batch"}, {"state": None}])
def test_a_node_record_out_of_shape_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(SlurmError, match="^Slurm"):
        _node({**NODE, **bad})


def test_a_listing_that_is_not_the_jobs_pids_is_refused() -> None:
    listing = "PID JOBID STEPID LOCALID GLOBALID\n11 5 batch 0 0\n12 5 batch - -\n"
    ps = " 11  10 slurm_script\n 12  11 python3\n 13  12 sleep\n 99 1 init\n"
    procs = _job_processes(5, listing, ps)
    assert [(p.pid, p.ppid, p.comm, p.local_id) for p in procs] == [(11, 10, "slurm_script", 0),
                                                                    (12, 11, "python3", None)]
    with pytest.raises(SlurmError, match="printed a line that is not a pid of the job"):
        _job_processes(5, listing + "13 6 batch - -\n", ps)


# --- the cluster and the inventory -----------------------------------------------------------------

async def test_nodes_are_the_test_hosts_with_their_cpus_and_state(inventory: Slurm, testbed: Testbed) -> None:
    nodes = await inventory.nodes(partition="batch")
    assert [n.name for n in nodes] == ["hostA", "hostB", "hostC"]
    for node in nodes:
        assert node.address == testbed.address(node.name)
        assert node.cpus == os.cpu_count()
        assert node.host_state == "up" and node.usable, node
        assert node.memory_bytes > 0 and node.free_memory_bytes is not None
        assert node.load >= 0
    assert await inventory.usable_node("hostB") == nodes[1]


async def test_a_batch_job_runs_on_the_chosen_node_and_its_processes_are_found(
        inventory: Slurm, submit: Callable[[str], tuple[int, Path]], testbed: Testbed, slurm: SlurmCluster) -> None:
    job_id, out, procs = await running_job(inventory, submit, "hostA")
    job = await inventory.job(job_id)
    assert (job.nodes, job.batch_host, job.state) == (("hostA",), "hostA", "RUNNING")
    assert [n.name for n in await inventory.job_nodes(job_id)] == ["hostA"]
    shell = procs.batch_shell
    assert shell is not None and shell.comm == "slurm_script"
    assert procs.roots == (shell,)
    workload_pid = int((out / "ready").read_text())
    assert [p.pid for p in procs.workload] == [workload_pid]
    assert procs.workload[0].ppid == shell.pid
    # hostA shares this machine's pids: the pids Slurm gave are these processes, inside hostA.
    for pid in (shell.pid, workload_pid):
        assert netns_of(pid) == os.stat(testbed.netns_path("hostA")).st_ino
    assert (await inventory.nodes())[0].cpus_allocated == 1

    (out / "finish").touch()
    job = await wait_job(inventory, job_id, ("COMPLETED", "FAILED"))
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0")
    assert (out / "result").read_text() == f"PASS job {job_id}\n"
    assert sacct_line(slurm, job_id) == ["COMPLETED", "0:0"]
    with pytest.raises(SlurmError, match=f"Slurm job {job_id} is COMPLETED, not running"):
        await inventory.job_processes(job_id)


async def test_processes_on_a_host_with_its_own_pids_are_that_hosts(
        inventory: Slurm, submit: Callable[[str], tuple[int, Path]], testbed: Testbed) -> None:
    job_id, out, procs = await running_job(inventory, submit, "hostC")
    workload = procs.workload
    assert len(workload) == 1
    root = testbed.root_pid("hostC", workload[0].pid)
    assert root is not None and testbed.host_pid("hostC", root) == workload[0].pid
    assert Path(f"/proc/{root}/cmdline").read_bytes().split(b"\0")[-2] == str(out).encode()
    with pytest.raises(UnknownNode) as err:
        await inventory.job_processes(job_id, "hostA")
    assert str(err.value) == f"node 'hostA' is not one of Slurm job {job_id}'s nodes (hostC): pick one of them"


async def test_a_drained_or_down_node_is_never_usable(inventory: Slurm, slurm: SlurmCluster) -> None:
    try:
        slurm.command(["scontrol", "update", "nodename=hostC", "state=drain", "reason=kcr-test maintenance"])
        node = await inventory.node("hostC")
        assert (node.host_state, node.usable, node.reason) == ("drained", False, "kcr-test maintenance")
        assert "DRAIN" in node.flags
        with pytest.raises(NodeUnusable) as err:
            await inventory.usable_node("hostC")
        assert str(err.value) == ("hostC: node hostC is drained in Slurm (reason: kcr-test maintenance): pick "
                                  "another node, or return it to service with "
                                  "`scontrol update nodename=hostC state=resume`")

        slurm.command(["scontrol", "update", "nodename=hostC", "state=down", "reason=kcr-test dead"])
        node = await inventory.node("hostC")
        assert (node.host_state, node.usable) == ("down", False)
        with pytest.raises(NodeUnusable, match="node hostC is down in Slurm .reason: kcr-test dead."):
            await inventory.usable_node("hostC")
    finally:
        slurm.command(["scontrol", "update", "nodename=hostC", "state=resume"])
    slurm.wait_idle()
    assert (await inventory.usable_node("hostC")).host_state == "up"


async def test_bad_input_gets_one_line_that_says_what_to_do(inventory: Slurm, slurm: SlurmCluster,
                                                             tmp_path: Path) -> None:
    with pytest.raises(UnknownNode) as unknown:
        await inventory.node("hostZ")
    assert str(unknown.value) == ("Slurm has no node 'hostZ' (nodes: hostA, hostB, hostC): "
                                  "check the name with sinfo -N")
    with pytest.raises(NoSuchJob) as nojob:
        await inventory.job(987654)
    assert "Slurm has no job 987654" in str(nojob.value) and "check the id with squeue" in str(nojob.value)
    with pytest.raises(SlurmError, match="no partition 'gpu' .partitions: batch."):
        await inventory.nodes(partition="gpu")

    with pytest.raises(SlurmUnreachable) as missing:
        await Slurm(str(tmp_path / "nowhere.conf")).nodes()
    assert str(missing.value) == (f"the Slurm config {tmp_path}/nowhere.conf, which does not exist: "
                                  "point SLURM_CONF at the cluster's slurm.conf")

    # The same cluster's config, but a slurmctld port where nothing listens: slurmctld is down.
    conf = tmp_path / "slurm.conf"
    conf.write_text(slurm.conf_path.read_text().replace(f"SlurmctldPort={slurm.ctld_port}",
                                                        f"SlurmctldPort={slurm.ctld_port + 10}"))
    with pytest.raises(SlurmUnreachable) as down:
        await Slurm(str(conf)).nodes()
    assert str(down.value) == ("slurmctld does not answer (scontrol ping: DOWN): start it, or point "
                               "SLURM_CONF at the cluster's slurm.conf")
    for err in (unknown, nojob, missing, down):
        assert "\n" not in str(err.value)


async def test_scancel_ends_a_running_job(inventory: Slurm, submit: Callable[[str], tuple[int, Path]],
                                          slurm: SlurmCluster) -> None:
    job_id, out, procs = await running_job(inventory, submit, "hostB")
    slurm.command(["scancel", str(job_id)])
    job = await wait_job(inventory, job_id, ("CANCELLED",))
    # Ended by scancel's SIGTERM (or the SIGKILL after it): the batch shell killed by it (0:15,
    # 0:9), or, where slurmstepd's SIGTERM reached its child first, the shell that saw its child
    # die of it and exited 128 + 15 (143:0). Which one is Slurm's timing, not ours.
    assert job.exit_code in ("0:15", "0:9", "143:0")
    await wait_for("processes of the cancelled job live on",
                   lambda: all(proc_state(pid) in (None, "Z") for pid in procs.pids))
    assert sacct_line(slurm, job_id)[0] == "CANCELLED"
    with pytest.raises(SlurmError, match=f"Slurm job {job_id} is CANCELLED, not running"):
        await inventory.job_processes(job_id)


# --- moving a job's workload ------------------------------------------------------------------------

async def move_workload(inventory: Slurm, submit: Callable[[str], tuple[int, Path]],
                        testbed: Testbed) -> tuple[int, Path, JobProcesses, int]:
    """Start a job on hostA and move its workload (not the batch shell) to hostB while it runs,
    its pid on hostA staying as its stand-in; (job id, output dir, processes before the move,
    the workload's pid on hostB)."""
    job_id, out, procs = await running_job(inventory, submit, "hostA")
    (workload,) = procs.workload
    code, report, err = await trio.to_thread.run_sync(
        lambda: migrate_cli(f"{workload.pid}@hostA", "hostB", "--ssh-config", str(testbed.ssh_config_path),
                            "--stand-in"))
    assert code == 0, err
    assert report["stand_in"], report
    moved = report["new_pid"]
    assert netns_of(moved) == os.stat(testbed.netns_path("hostB")).st_ino
    return job_id, out, procs, moved


async def test_a_jobs_workload_moves_to_another_node_and_the_job_completes(
        inventory: Slurm, submit: Callable[[str], tuple[int, Path]], testbed: Testbed, slurm: SlurmCluster) -> None:
    job_id, out, procs, moved = await move_workload(inventory, submit, testbed)
    (out / "finish").touch()
    await wait_for("the moved workload wrote no result", lambda: written(out / "result"))
    assert (out / "result").read_text() == f"PASS job {job_id}\n"   # it ran on, memory intact, on hostB
    wait_gone(moved)
    job = await wait_job(inventory, job_id, ("COMPLETED", "FAILED", "CANCELLED"))
    # The batch shell's `wait` saw the stand-in end as the moved workload did: exit 0.
    assert (out / "status").read_text() == "workload exit 0\n"
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0")
    assert sacct_line(slurm, job_id) == ["COMPLETED", "0:0"]


async def test_scancel_after_a_move_ends_the_moved_workload(
        inventory: Slurm, submit: Callable[[str], tuple[int, Path]], testbed: Testbed, slurm: SlurmCluster) -> None:
    job_id, out, procs, moved = await move_workload(inventory, submit, testbed)
    try:
        (workload,) = procs.workload
        assert proc_state(workload.pid) not in (None, "Z"), "no stand-in holds the workload's pid on hostA"
        slurm.command(["scancel", str(job_id)])
        await wait_job(inventory, job_id, ("CANCELLED",))
        deadline = time.monotonic() + 30
        while proc_state(moved) not in (None, "Z"):
            assert time.monotonic() < deadline, "scancel left the moved workload running on hostB"
            await trio.sleep(0.05)
        assert not (out / "result").exists()
    finally:
        if proc_state(moved) not in (None, "Z"):
            os.kill(moved, 9)
            wait_gone(moved)

def sigterm_pending(pid: int) -> bool:
    """Is SIGTERM queued for ``pid`` (frozen, it cannot take it)?"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    pending = int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)
    return bool(pending & (1 << (15 - 1)))


async def test_scancel_while_the_workload_is_frozen_for_its_move_ends_the_job_everywhere(
        inventory: Slurm, submit: Callable[[str], tuple[int, Path]], testbed: Testbed, slurm: SlurmCluster) -> None:
    """scancel lands while the workload is frozen, its state already read and sent: Slurm's
    SIGTERM waits in the frozen process's queue, goes to hostB with the move, and ends the
    moved copy there; the job is CANCELLED and no copy of the workload runs anywhere."""
    from migrate import Migration, MigrationOptions, PhaseChanged

    job_id, out, procs = await running_job(inventory, submit, "hostA")
    (workload,) = procs.workload
    seen: dict[str, bool] = {}

    def on_event(ev: object) -> None:
        if isinstance(ev, PhaseChanged) and ev.phase == "restore":
            slurm.command(["scancel", str(job_id)])
            deadline = time.monotonic() + 10          # the move waits: the signal must land now
            while not sigterm_pending(workload.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            seen["pending"] = sigterm_pending(workload.pid)

    opts = MigrationOptions(ssh_config=str(testbed.ssh_config_path), stand_in=True, new_pid=True)
    m = Migration(workload.pid, "hostA", "hostB", opts, on_event=on_event)
    report = await m.run()
    assert seen == {"pending": True}, "scancel's SIGTERM did not wait in the frozen workload"
    assert report.state == "done" and any("SIGTERM" in s for s in report.late_signals), report
    await wait_job(inventory, job_id, ("CANCELLED",))
    await wait_for("a copy of the workload runs on", lambda: running_copies(str(out)) == [])
    assert not (out / "result").exists()


async def test_a_jobs_batch_shell_moves_with_its_workload_and_the_job_completes(
        inventory: Slurm, submit: Callable[[str], tuple[int, Path]], testbed: Testbed, slurm: SlurmCluster) -> None:
    """The whole tree under slurmstepd (the batch shell and its workload) moves to hostC, a host
    with pids of its own, keeping its pids; slurmstepd stays on hostA."""
    job_id, out, procs = await running_job(inventory, submit, "hostA")
    shell = procs.batch_shell
    assert shell is not None
    code, report, err = await trio.to_thread.run_sync(
        lambda: migrate_cli(f"{shell.pid}@hostA", "hostC", "--ssh-config", str(testbed.ssh_config_path),
                            "--stand-in", keep_pid=True))
    assert code == 0, err
    assert report["new_pid"] == shell.pid
    moved = testbed.root_pid("hostC", shell.pid)
    assert moved is not None and moved != shell.pid
    (out / "finish").touch()
    await wait_for("the moved workload wrote no result", lambda: written(out / "result"))
    assert (out / "result").read_text() == f"PASS job {job_id}\n"
    await wait_for("the moved batch shell wrote no status", lambda: written(out / "status"))
    assert (out / "status").read_text() == "workload exit 0\n"   # the shell's `wait` works: both moved
    job = await wait_job(inventory, job_id, ("COMPLETED", "FAILED", "CANCELLED"))
    # slurmstepd, which stayed on hostA, saw the batch shell's stand-in end as the shell did.
    assert (job.state, job.exit_code) == ("COMPLETED", "0:0")
    assert sacct_line(slurm, job_id) == ["COMPLETED", "0:0"]


# --- examples/slurm.py as a human uses it ----------------------------------------------------------

CLI_TESTBED_DIR = Path("/run/kcr-testbed-test-slurm")
CLI_STATE_DIR = Path("/run/kcr-slurm-test-cli")
CLI_PORT = 6847
SLURM_CLI = Path(__file__).resolve().parent.parent / "examples" / "slurm.py"


def slurm_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SLURM_CLI), "--state-dir", str(CLI_STATE_DIR), *args],
                          capture_output=True, text=True, timeout=120)


def daemons_of(state_dir: Path) -> list[int]:
    """Pids of processes started with a path in ``state_dir`` (slurmctld, slurmd, munged)."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and proc_state(int(p)) not in (None, "Z")
            and f"{state_dir}/".encode() in Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")]


def test_the_cli_brings_slurm_up_over_leftovers_and_down_with_its_jobs() -> None:
    check_available()
    try:
        check_slurm_available()
    except SlurmUnavailable as exc:
        pytest.skip(f"Slurm unavailable: {exc}")
    bed = Testbed(CLI_TESTBED_DIR, hosts=("hostA", "hostB"), prefix="kcrs-", subnet="10.77.221.0/24")
    try:
        bed.up()
        up = slurm_cli("up", "--testbed-dir", str(CLI_TESTBED_DIR), "--port", str(CLI_PORT))
        assert up.returncode == 0, up.stderr
        assert f"export SLURM_CONF={CLI_STATE_DIR}/slurm.conf" in up.stdout
        first = daemons_of(CLI_STATE_DIR)
        assert len(first) == 4, first                     # munged, slurmctld, 2 slurmd

        # `up` again, as after an interrupted session: the old cluster goes, a new one comes.
        again = slurm_cli("up", "--testbed-dir", str(CLI_TESTBED_DIR), "--port", str(CLI_PORT))
        assert again.returncode == 0, again.stderr
        assert not set(first) & set(daemons_of(CLI_STATE_DIR)) and len(daemons_of(CLI_STATE_DIR)) == 4

        env = {**os.environ, "SLURM_CONF": str(CLI_STATE_DIR / "slurm.conf")}
        job = subprocess.run(["sbatch", "--parsable", "-w", "hostB", "-o", "/dev/null", "--wrap", "sleep 300"],
                             env=env, capture_output=True, text=True, check=True).stdout.strip()
        deadline = time.monotonic() + WAIT
        while not (pids := subprocess.run(["scontrol", "listpids", job, "hostB"], env=env, capture_output=True,
                                          text=True).stdout.split("\n")[1:]) or not pids[0]:
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.1)
        job_pids = [int(line.split()[0]) for line in pids if line.strip()]
        status = slurm_cli("status")
        assert status.returncode == 0, status.stdout
        assert [line.split()[:2] for line in status.stdout.splitlines()[:2]] == [["hostA", "idle"],
                                                                                  ["hostB", "mix"]]

        down = slurm_cli("down")
        assert down.returncode == 0, down.stderr
        assert daemons_of(CLI_STATE_DIR) == [] and not CLI_STATE_DIR.exists()
        assert all(proc_state(pid) in (None, "Z") for pid in job_pids), "down left the job running"
        assert slurm_cli("down").stdout == "no Slurm cluster recorded: nothing to remove\n"
    finally:
        slurm_cli("down")
        bed.down()
