"""Failures during a live migration: each must leave exactly one running copy of the process,
whose output is right. Before GO the source runs on; after GO it is never resumed alone.

The migrations run through the library API on localhost, so the test can act at a precise
phase (events) and reach the agents (their pids are in ``Migration.agents``).
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from migrate import Cancelled, Migration, MigrationError, MigrationOptions, PhaseChanged, RoundDone
from tests._migration import proc_state, running_copies
from tests._workloads import KCR_MIGRATE, Workload, become_subreaper, kcr, reap, run_reference

JOB = ("64", "40", "1300")           # 64 MiB, dirtying 40 MiB/s, about 14 s: outlives each fault


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    become_subreaper()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    return run_reference("mig_dirty", tmp_path_factory.mktemp("ref"), *JOB).output()


def start_job(tmp_path: Path) -> Workload:
    w = Workload("mig_dirty", tmp_path, *JOB, hold=True)
    w.start()
    w.wait_ready()
    return w


def later(seconds: float, fn: Callable[[], None]) -> None:
    threading.Timer(seconds, fn).start()


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


async def run_migration(pid: int, on_event: Callable[[Migration, Any], None], **options: Any) -> Migration:
    opts = MigrationOptions(**{"bandwidth_limit": 24 << 20, "link_timeout_s": 3.0, "new_pid": True, **options})
    m: Migration

    def handler(ev: Any) -> None:
        on_event(m, ev)
    m = Migration(pid, "localhost", "localhost", opts, on_event=handler)
    with pytest.raises(MigrationError) as info:
        await m.run()
    m.error = info.value  # type: ignore[attr-defined]
    return m


def assert_rolled_back(m: Migration, w: Workload, reference: str) -> None:
    assert m.report.state == "rolled-back", m.report
    time.sleep(0.2)
    assert proc_state(w.pid) not in (None, "T", "t"), "the source must run on"
    assert running_copies(str(w.dir)) == [w.pid], "exactly one running copy"
    assert w.verdict() == "PASS"
    assert w.reap_original() == 0
    assert w.output() == reference


async def test_source_agent_killed_during_precopy(tmp_path: Path, reference: str) -> None:
    w = start_job(tmp_path)

    def on_event(m: Migration, ev: Any) -> None:
        if isinstance(ev, PhaseChanged) and ev.phase == "precopy":
            later(0.5, lambda: kill_quietly(m.agents["source"]["pid"]))
    m = await run_migration(w.pid, on_event)
    assert_rolled_back(m, w, reference)


async def test_source_agent_killed_while_the_process_is_frozen(tmp_path: Path, reference: str) -> None:
    """The final round is long (a fast writer, a slow link): the kill lands mid-freeze, and
    the holder process thaws the source when its agent dies."""
    w = start_job(tmp_path)
    seen: dict[str, Any] = {}

    def on_event(m: Migration, ev: Any) -> None:
        if isinstance(ev, PhaseChanged) and ev.phase == "final":
            def kill() -> None:
                seen["state"] = proc_state(w.pid)
                kill_quietly(m.agents["source"]["pid"])
            later(0.4, kill)
    m = await run_migration(w.pid, on_event, max_rounds=1)
    assert seen["state"] == "t", "the kill should land while the process is frozen"
    assert_rolled_back(m, w, reference)


async def test_destination_agent_killed_during_precopy(tmp_path: Path, reference: str) -> None:
    w = start_job(tmp_path)

    def on_event(m: Migration, ev: Any) -> None:
        if isinstance(ev, RoundDone) and ev.round == 0:
            kill_quietly(m.agents["dest"]["pid"])
    m = await run_migration(w.pid, on_event)
    assert_rolled_back(m, w, reference)


async def test_destination_goes_silent_during_final(tmp_path: Path, reference: str) -> None:
    """A link that stops answering without closing (the destination agent is stopped): the
    keepalive notices, the migration rolls back, and the agent settles once it wakes."""
    w = start_job(tmp_path)
    agent: dict[str, int] = {}

    def on_event(m: Migration, ev: Any) -> None:
        if isinstance(ev, PhaseChanged) and ev.phase == "final":
            agent["pid"] = m.agents["dest"]["pid"]
            kill_quietly(agent["pid"], signal.SIGSTOP)
    m = await run_migration(w.pid, on_event, max_rounds=1)
    kill_quietly(agent["pid"], signal.SIGCONT)
    assert_rolled_back(m, w, reference)


def test_sigint_during_precopy_rolls_back(tmp_path: Path, reference: str) -> None:
    w = start_job(tmp_path)
    cli = subprocess.Popen([*KCR_MIGRATE, f"{w.pid}@localhost", "localhost", "--new-pid", "--bandwidth", "16MiB"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert cli.stderr is not None
    seen = b""
    while not seen.startswith(b"pages: "):      # the data channel is chosen: pre-copy begins
        seen = cli.stderr.readline()
        assert seen, "kcr-migrate ended before pre-copy"
    cli.send_signal(signal.SIGINT)
    _, err = cli.communicate(timeout=60)
    assert cli.returncode == 130, err.decode()
    assert "Traceback" not in err.decode() and "interrupted" in err.decode(), err.decode()
    assert proc_state(w.pid) not in (None, "T", "t")
    assert running_copies(str(w.dir)) == [w.pid]
    assert w.verdict() == "PASS"
    assert w.reap_original() == 0
    assert w.output() == reference


def test_lost_answer_after_go_leaves_the_source_stopped_until_resolved(tmp_path: Path, reference: str) -> None:
    """The destination runs the process but its agent dies before confirming: the source is
    left stopped (never resumed by itself), and `kcr-migrate resolve --kill` settles it."""
    w = start_job(tmp_path)
    env = {**os.environ, "KCR_FAULT": "dest-silent-after-go"}
    res = subprocess.run([*KCR_MIGRATE, f"{w.pid}@localhost", "localhost", "--new-pid", "--link-timeout", "3"],
                         env=env, capture_output=True, timeout=120)
    err = res.stderr.decode()
    assert res.returncode == 3 and "resolve" in err, err          # 3: unsettled
    assert proc_state(w.pid) == "T", "the source must stay stopped"
    copies = running_copies(str(w.dir))
    assert len(copies) == 1 and copies[0] != w.pid, "the destination copy runs"
    # resolve refuses what it did not stop, then settles the real one
    assert kcr("resolve", f"{copies[0]}@localhost", "--kill").returncode != 0
    res = kcr("resolve", f"{w.pid}@localhost", "--kill")
    assert res.returncode == 0, res.stderr.decode()
    assert w.reap_original() == -signal.SIGKILL
    assert w.verdict() == "PASS"
    assert os.WEXITSTATUS(reap(copies[0])) == 0
    assert w.output() == reference


def test_resolve_resume(tmp_path: Path, reference: str) -> None:
    w = start_job(tmp_path)
    env = {**os.environ, "KCR_FAULT": "dest-silent-after-go"}
    res = subprocess.run([*KCR_MIGRATE, f"{w.pid}@localhost", "localhost", "--new-pid", "--link-timeout", "3"],
                         env=env, capture_output=True, timeout=120)
    assert res.returncode == 3, res.stderr.decode()
    copies = [p for p in running_copies(str(w.dir)) if p != w.pid]
    for pid in copies:           # say the destination did not really run it after all
        kill_quietly(pid)
        reap(pid)
    res = kcr("resolve", f"{w.pid}@localhost", "--resume")
    assert res.returncode == 0, res.stderr.decode()
    assert w.verdict(timeout=60) == "PASS"
    assert w.reap_original() == 0


async def test_cancel_from_the_library_rolls_back(tmp_path: Path, reference: str) -> None:
    w = start_job(tmp_path)

    def on_event(m: Migration, ev: Any) -> None:
        if isinstance(ev, RoundDone):
            m.cancel()
    m = await run_migration(w.pid, on_event)
    assert_rolled_back(m, w, reference)
    assert isinstance(m.error, Cancelled), m.error  # type: ignore[attr-defined]
    # The connections outlive the cancellation: the rollback reached both agents.
    assert not [x for x in m.report.warnings if "could not reach" in x], m.report.warnings
