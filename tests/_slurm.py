"""The ``slurm`` fixture: a real Slurm cluster (munged, slurmctld, a slurmd on each of hostA,
hostB and hostC) on the session's test hosts, from ``examples/slurm.py``.

Its state dir, cluster name and slurmctld port are the tests' own, so it never meets a cluster a
human brought up with ``examples/slurm.py up`` (``/run/kcr-slurm``, port 6827).  It runs inside
the ``testbed`` fixture, which holds the test hosts' lock: leftovers of an interrupted session
are removed before it starts (``up`` begins with ``down``), and it is removed before the hosts
are, at interpreter exit failing that.
"""
from __future__ import annotations

import atexit
import os
from pathlib import Path
from typing import Iterator

import pytest

from examples.slurm import SlurmCluster, SlurmUnavailable, check_slurm_available
from examples.testbed import Testbed, TestbedError

TEST_STATE_DIR = Path(os.environ.get("KCR_SLURM_TEST_DIR", "/run/kcr-slurm-test"))
TEST_CLUSTER = "kcrtest"
TEST_CTLD_PORT = 6837


def _down_quietly(cluster: SlurmCluster) -> None:
    try:
        cluster.down()
    except TestbedError as exc:
        print(f"slurm teardown: {exc}")


@pytest.fixture(scope="session")
def slurm(testbed: Testbed) -> Iterator[SlurmCluster]:
    """Slurm on hostA, hostB and hostC (partition ``batch``), up for the whole session; skipped
    where munge or Slurm is not installed."""
    try:
        check_slurm_available()
    except SlurmUnavailable as exc:
        pytest.skip(f"Slurm unavailable: {exc}")
    cluster = SlurmCluster(testbed, TEST_STATE_DIR, cluster=TEST_CLUSTER, ctld_port=TEST_CTLD_PORT,
                           slurmd_port=TEST_CTLD_PORT + 1)
    atexit.register(_down_quietly, cluster)
    try:
        cluster.up()
        yield cluster
    finally:
        try:
            cluster.down()
        finally:
            atexit.unregister(_down_quietly)
