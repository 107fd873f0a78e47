"""Scheduling carried per thread (agent/sched.py): what cannot be carried is refused first.

Carrying itself is checked end to end by the ckpt_sched workload (tests/test_checkpoint.py,
tests/test_migrate.py): each thread finds its own nice, policy, priority, CPUs and timer slack.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent import sched
from tests._migration import proc_state
from tests._workloads import kcr, one_error_line, start_until_ready
from transport.errors import RestoreError


def test_cpu_sets_round_trip_as_masks_and_lists() -> None:
    for cpus in ({0}, {1, 2, 3, 9}, set(range(64)), {8191}):
        assert sched.mask_cpus(sched.cpu_mask(cpus)) == cpus
    assert sched.cpu_mask(()) == b""
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
