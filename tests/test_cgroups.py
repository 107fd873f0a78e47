"""A process's cgroups (agent/cgroups.py): joined again on the destination where they exist,
said so in the report where they do not."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from agent import cgroups
from tests._migration import migrate_cli
from tests._workloads import become_subreaper, kcr, reap, start_until_ready

SLEEPER = "import sys, time\nopen(sys.argv[1], 'w').close()\nwhile True:\n    time.sleep(0.05)\n"


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    become_subreaper()


@pytest.fixture
def test_cgroups() -> Iterator[dict[str, str]]:
    """A cgroup of this test's in the unified hierarchy and in v1's pids one, where mounted:
    controllers -> its path in that hierarchy."""
    made: dict[str, str] = {}
    where = cgroups.mounts()
    name = f"/kcr-test-{os.getpid()}-{time.monotonic_ns()}"
    for controllers in ("", "pids"):
        if controllers in where and where[controllers][1] == "/":
            try:
                os.mkdir(where[controllers][0] + name)
            except OSError:
                continue
            made[controllers] = name
    if not made:
        pytest.skip("this machine mounts no cgroup hierarchy a test may make a cgroup in")
    yield made
    for controllers, path in made.items():
        for _ in range(100):         # emptied as the test's processes are reaped
            try:
                os.rmdir(where[controllers][0] + path)
                break
            except OSError:
                time.sleep(0.05)


def cgroup_of(pid: int) -> dict[str, str]:
    return dict(cgroups.parse(line) for line in cgroups.read(pid))


def start_in_cgroups(tmp_path: Path, groups: dict[str, str]) -> int:
    proc = start_until_ready([sys.executable, "-S", "-c", SLEEPER, str(tmp_path / "ready")], tmp_path / "ready",
                             start_new_session=True)
    where = cgroups.mounts()
    for controllers, path in groups.items():
        Path(where[controllers][0] + path, "cgroup.procs").write_text(str(proc.pid))
    assert {c: p for c, p in cgroup_of(proc.pid).items() if c in groups} == groups
    return proc.pid


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_the_process_joins_its_cgroups_again(tmp_path: Path, test_cgroups: dict[str, str], how: str) -> None:
    pid = start_in_cgroups(tmp_path, test_cgroups)
    if how == "checkpoint":
        res = kcr("checkpoint", str(pid), "-o", str(tmp_path / "img"))
        assert res.returncode == 0, res.stderr.decode()
        reap(pid)
        res = kcr("restore", "-i", str(tmp_path / "img"))
        assert res.returncode == 0 and b"warning" not in res.stderr, res.stderr.decode()
        new = int(res.stdout.split()[-1])
    else:
        code, report, err = migrate_cli(f"{pid}@localhost", "localhost", "--new-pid")
        assert code == 0 and not report.get("warnings"), err
        new = report["new_pid"]
        reap(pid)
    try:
        assert {c: p for c, p in cgroup_of(new).items() if c in test_cgroups} == test_cgroups
    finally:
        os.kill(new, 9)
        reap(new)


def test_a_cgroup_missing_on_the_destination_is_a_warning(tmp_path: Path, test_cgroups: dict[str, str]) -> None:
    pid = start_in_cgroups(tmp_path, test_cgroups)
    res = kcr("checkpoint", str(pid), "-o", str(tmp_path / "img"))
    assert res.returncode == 0, res.stderr.decode()
    reap(pid)
    where = cgroups.mounts()
    for controllers, path in test_cgroups.items():
        os.rmdir(where[controllers][0] + path)
    res = kcr("restore", "-i", str(tmp_path / "img"))
    assert res.returncode == 0, res.stderr.decode()
    new = int(res.stdout.split()[-1])
    try:
        err = res.stderr.decode()
        for path in test_cgroups.values():
            assert f"cgroup {path}, which does not exist on" in err, err
        assert not set(cgroup_of(new).values()) & set(test_cgroups.values())
    finally:
        os.kill(new, 9)
        reap(new)
        for controllers, path in test_cgroups.items():
            os.mkdir(where[controllers][0] + path)      # for the fixture to remove
