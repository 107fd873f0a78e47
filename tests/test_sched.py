"""Scheduling carried per thread (agent/sched.py): what cannot be carried is refused first.

Carrying itself is checked end to end by the ckpt_sched workload (tests/test_checkpoint.py,
tests/test_migrate.py): each thread finds its own nice, policy, priority, CPUs and timer slack.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent import sched
from tests._migration import proc_state
from tests._transport import example_records
from tests._workloads import edit_records, kcr, one_error_line, start_until_ready
from transport.errors import RestoreError
from transport.schema import ThreadState


def test_cpu_sets_round_trip_as_masks_and_lists() -> None:
    for cpus in ({0}, {1, 2, 3, 9}, set(range(64)), {8191}):
        assert sched.mask_ids(sched.id_mask(cpus)) == cpus
    assert sched.id_mask(()) == b""
    assert sched.cpu_list({0, 1, 2, 3, 6, 8, 9}) == "0-3,6,8-9"


def test_a_thread_pinned_to_a_cpu_the_destination_lacks_is_refused() -> None:
    missing = max(sched.online_cpus()) + 1
    with pytest.raises(RestoreError, match=f"pinned to CPUs {missing}, which hostB does not have online"):
        sched.check_cpus({0, missing}, "hostB", 4242)
    sched.check_cpus(sched.online_cpus(), "hostB", 4242)     # all there: nothing to say


def test_sched_deadline_is_refused_before_freezing(tmp_path: Path) -> None:
    chrt = shutil.which("chrt")
    if chrt is None:
        pytest.skip("chrt (util-linux) is not installed")
    ready = tmp_path / "ready"
    script = "import sys, time\nopen(sys.argv[1], 'w').close()\ntime.sleep(60)\n"
    argv = [chrt, "-d", "--sched-runtime", "1000000", "--sched-deadline", "10000000", "--sched-period",
            "10000000", "0", sys.executable, "-c", script, str(ready)]
    probe = subprocess.run(argv[:9] + ["true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"this kernel refuses SCHED_DEADLINE here: {probe.stderr.decode().strip()}")
    proc = start_until_ready(argv, ready)
    try:
        line = one_error_line(kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img")).stderr)
        assert "SCHED_DEADLINE" in line and f"chrt -o -p 0 {proc.pid}" in line, line
        assert not (tmp_path / "img").exists()
        assert proc_state(proc.pid) in ("S", "R")
    finally:
        proc.kill()
        proc.wait()


def test_affinity_warn_says_what_it_runs_without() -> None:
    missing = max(sched.online_cpus()) + 1
    said = sched.missing_cpus({0, missing}, "hostB", 4242, "warn")
    assert said is not None and f"pinned to CPUs {missing}, which hostB does not have online" in said
    assert sched.missing_cpus({0}, "hostB", 4242, "warn") is None
    with pytest.raises(RestoreError, match="does not have online"):
        sched.missing_cpus({0, missing}, "hostB", 4242, "refuse")
    with pytest.raises(ValueError, match="refuse, warn"):
        sched.check_affinity("ignore")


PINNED = ("import os, sys, time\nos.sched_setaffinity(0, {0})\nopen(sys.argv[1], 'w').close()\n"
          "while not os.path.exists(sys.argv[2]):\n    time.sleep(0.01)\n"
          "sys.exit(0 if os.sched_getaffinity(0) == {0} else 1)\n")


def test_a_restore_where_pinned_cpus_are_missing_refuses_or_warns(tmp_path: Path) -> None:
    """An image of a thread pinned to CPU 0 and to one this host lacks (as another host's
    image would be): refused by default; under --affinity warn it runs pinned to CPU 0, and
    the report says which CPU it runs without."""
    import json
    import os

    from tests._workloads import become_subreaper, reap
    become_subreaper()
    if len(sched.online_cpus()) < 2:
        pytest.skip("one CPU online: a pinned thread would not be pinned to a subset")
    ready, go, image = tmp_path / "ready", tmp_path / "go", tmp_path / "img"
    proc = start_until_ready([sys.executable, "-S", "-c", PINNED, str(ready), str(go)], ready)
    res = kcr("checkpoint", str(proc.pid), "-o", str(image))
    assert res.returncode == 0, res.stderr.decode()
    assert proc.wait(timeout=30) == -9
    missing = max(sched.online_cpus()) + 1
    image.write_bytes(edit_records(image.read_bytes(), ThreadState.TYPE, cpus=sched.id_mask({0, missing})))
    # (Under new pids: the copy the refusal killed may linger as a zombie of ours for a while.)
    line = one_error_line(kcr("restore", "-i", str(image), "--trust-image", "--new-pid").stderr)
    assert f"pinned to CPUs {missing}, which" in line and "does not have online" in line, line
    res = kcr("restore", "-i", str(image), "--trust-image", "--new-pid", "--affinity", "warn", "--json")
    assert res.returncode == 0, res.stderr.decode()
    result = json.loads(res.stdout)
    assert any(f"pinned to CPUs 0,{missing};" in w and f"lacks {missing}, so it runs on CPUs 0" in w
               for w in result["warnings"]), result["warnings"]
    go.touch()
    status = reap(int(result["pid"]))
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def policy_of(tid: int) -> tuple[int, int]:
    return os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority


def test_a_restored_thread_made_at_real_time_priority_gets_its_own_policy() -> None:
    """A stub forked while the destination ran at SCHED_FIFO took it (``agent.urgency``): the
    restore's last step gives every thread the policy its image says, SCHED_OTHER included."""
    template = example_records()[ThreadState]
    assert isinstance(template, ThreadState)
    child = subprocess.Popen(["sleep", "60"])
    try:
        try:
            os.sched_setscheduler(child.pid, os.SCHED_FIFO, os.sched_param(1))
        except PermissionError:
            pytest.skip("SCHED_FIFO is not allowed here (no CAP_SYS_NICE, or no real-time budget)")
        sched.apply_thread(child.pid, template, pid=child.pid, host="here")
        assert policy_of(child.pid) == (os.SCHED_OTHER, 0)
        rr = ThreadState(**{**template.__dict__, "sched_policy": os.SCHED_RR, "sched_priority": 5})
        sched.apply_thread(child.pid, rr, pid=child.pid, host="here")
        assert policy_of(child.pid) == (os.SCHED_RR, 5)
    finally:
        child.kill()
        child.wait()
