"""A process's cgroups (agent/cgroups.py): joined again on the destination where they exist,
said so in the report where they do not."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from agent import cgroups
from tests._migration import migrate_cli, proc_state
from tests._workloads import become_subreaper, kcr, one_error_line, reap, start_until_ready

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
                             start_new_session=True, cwd=tmp_path)
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


def test_a_job_from_another_host_joins_its_cgroups_as_it_is_made(tmp_path: Path,
                                                                  test_cgroups: dict[str, str]) -> None:
    """Another host's job (its cgroups there named by the source in preflight: the session's
    hints) is put in them here as its process is made, in pre-copy, not once it is frozen:
    a move between cgroups waits out an RCU grace period for each hierarchy (a restore
    placed by --cgroup in finish spent 15-33 ms of its downtime there). The restore session a
    live migration feeds, fed here from an image and stopped before finish. (Between two
    hosts only: on the same one the job's own cgroup would be charged its memory twice.)"""
    from contextlib import closing

    from agent.restore_session import RestoreSession
    from transport.image import ImageReader
    from transport.signing import ImageVerifier, key_path, load_key

    proc = subprocess.Popen(["sleep", "600"])
    res = kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img"))
    assert res.returncode == 0, res.stderr.decode()
    proc.wait()
    ids = {cgroups.parse(line)[0]: line.split(":", 1)[0] for line in cgroups.read(os.getpid())}
    hint = tuple(f"{ids[c]}:{c}:{path}" for c, path in test_cgroups.items())
    session = RestoreSession(keep_ids=False, cgroup_hints={proc.pid: hint})
    made = 0
    try:
        with open(tmp_path / "img", "rb") as src, \
                closing(iter(ImageReader(src, verifier=ImageVerifier(load_key(key_path()[0])),
                                         sink=session.write_pages))) as items:
            for item in items:
                session.take(item)
                if session.procs and session.root.pid:
                    made = session.root.pid
                    break
        assert made, "the image made no process"
        assert {c: p for c, p in cgroup_of(made).items() if c in test_cgroups} == test_cgroups
    finally:
        session.abort()
    assert not os.path.exists(f"/proc/{made}") or open(f"/proc/{made}/stat").read().split()[2] in "ZX"


# --- --cgroup: the user chooses where it runs ------------------------------------------------

PARENT_AND_CHILD = ("import os, sys, time\nchild = os.fork()\nif child == 0:\n    while True:\n        time.sleep(0.05)\n"
                    "open(sys.argv[1] + '.tmp', 'w').write(str(child))\nos.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
                    "while True:\n    time.sleep(0.05)\n")


@pytest.fixture
def chosen() -> Iterator[str]:
    """Another unified cgroup, empty: the one a test asks for with --cgroup."""
    where = cgroups.mounts()
    if "" not in where or where[""][1] != "/":
        pytest.skip("this machine mounts no cgroup v2 hierarchy a test may make a cgroup in")
    path = f"/kcr-chosen-{os.getpid()}-{time.monotonic_ns()}"
    os.mkdir(where[""][0] + path)
    yield path
    for _ in range(100):
        try:
            os.rmdir(where[""][0] + path)
            break
        except OSError:
            time.sleep(0.05)


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_cgroup_puts_the_job_where_the_user_says(tmp_path: Path, test_cgroups: dict[str, str], chosen: str,
                                                 how: str) -> None:
    """--cgroup PATH: every process of the job (a parent and its child through an image; one
    process live, from this host to itself) runs in PATH instead of its own unified cgroup;
    its v1 cgroups are joined as recorded."""
    if "" not in test_cgroups:
        pytest.skip("this machine has no cgroup v2 hierarchy a test may make a cgroup in")
    if how == "checkpoint":
        proc = start_until_ready([sys.executable, "-S", "-c", PARENT_AND_CHILD, str(tmp_path / "ready")],
                                 tmp_path / "ready", start_new_session=True, cwd=tmp_path)
        pid, child = proc.pid, int((tmp_path / "ready").read_text())
        where = cgroups.mounts()
        for controllers, path in test_cgroups.items():
            for p in (pid, child):
                Path(where[controllers][0] + path, "cgroup.procs").write_text(str(p))
        res = kcr("checkpoint", str(pid), "-o", str(tmp_path / "img"))
        assert res.returncode == 0, res.stderr.decode()
        reap(child)
        reap(pid)
        res = kcr("restore", str(tmp_path / "img"), "--cgroup", chosen)
        assert res.returncode == 0 and b"warning" not in res.stderr, res.stderr.decode()
        assert int(res.stdout.split()[-1]) == pid
        moved = [pid, child]
    else:
        pid = start_in_cgroups(tmp_path, test_cgroups)
        code, report, err = migrate_cli(f"{pid}@localhost", "localhost", "--cgroup", chosen)
        assert code == 0 and not report.get("warnings"), err
        reap(pid)
        moved = [report["new_pid"]]
    try:
        for p in moved:
            assert cgroup_of(p) == {**cgroup_of(p), "": chosen, **{c: g for c, g in test_cgroups.items() if c}}
        assert Path(cgroups.mounts()[""][0] + test_cgroups[""], "cgroup.procs").read_text() == ""
    finally:
        for p in reversed(moved):
            os.kill(p, 9)
        reap(moved[0])


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_a_chosen_cgroup_that_is_not_there_is_refused_first(tmp_path: Path, test_cgroups: dict[str, str],
                                                            how: str) -> None:
    """--cgroup naming no cgroup: refused in one line before anything is frozen or made; the
    source runs on, the image restores without it."""
    if "" not in test_cgroups:
        pytest.skip("this machine has no cgroup v2 hierarchy a test may make a cgroup in")
    missing = test_cgroups[""] + "-not-there"
    pid = start_in_cgroups(tmp_path, test_cgroups)
    if how == "checkpoint":
        res = kcr("checkpoint", str(pid), "-o", str(tmp_path / "img"))
        assert res.returncode == 0, res.stderr.decode()
        reap(pid)
        res = kcr("restore", str(tmp_path / "img"), "--cgroup", missing)
        assert res.returncode == 1
        assert f"--cgroup {missing}: no such cgroup on" in one_error_line(res.stderr)
        assert not os.path.exists(f"/proc/{pid}")
        res = kcr("restore", str(tmp_path / "img"))
        assert res.returncode == 0, res.stderr.decode()
    else:
        code, report, err = migrate_cli(f"{pid}@localhost", "localhost", "--cgroup", missing)
        assert code == 1
        assert f"--cgroup {missing}: no such cgroup on" in err
        assert proc_state(pid) not in (None, "T", "t")
    try:
        assert {c: p for c, p in cgroup_of(pid).items() if c in test_cgroups} == test_cgroups
    finally:
        os.kill(pid, 9)
        reap(pid)


def test_cgroup_takes_an_absolute_path() -> None:
    res = kcr("restore", "img", "--cgroup", "system.slice/job.scope")
    assert res.returncode == 2
    assert "--cgroup 'system.slice/job.scope': give an absolute cgroup path" in res.stderr.decode()
