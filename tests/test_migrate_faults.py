"""Failures during a live migration: each must leave exactly one running copy of the process,
whose output is right. Before GO the source runs on; after GO it is never resumed alone.

The migrations run through the library API on localhost, so the test can act at a precise
phase (events) and reach the agents (their pids are in ``Migration.agents``); every fault comes
from outside (a signal to an agent, a cancel), none from a switch inside the tool.

The job dirties its memory for about 4 s, then is held (``Workload(hold=True)``) before it
prints its checksum: a test lets it end once the fault is settled, instead of waiting out a long
run.
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

from migrate import (
    Cancelled,
    Migration,
    MigrationError,
    MigrationOptions,
    MigrationUnsettled,
    PhaseChanged,
    RoundDone,
)
from migrate.cli import EXIT_ERROR, EXIT_UNSETTLED, exit_status
from tests._migration import copies, proc_state, running_copies
from tests._workloads import (
    KCR_MIGRATE,
    Workload,
    become_subreaper,
    kcr,
    reap,
    run_reference,
)

JOB = ("64", "40", "100")           # 64 MiB, dirtying 40 MiB/s for 100 steps (1 s and more), then it waits, dirtying on


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    become_subreaper()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    return run_reference("mig_dirty", tmp_path_factory.mktemp("ref"), *JOB).output()


def start_job(tmp_path: Path, env: dict[str, str] | None = None) -> Workload:
    w = Workload("mig_dirty", tmp_path, *JOB, hold=True, env=env)
    w.start()
    w.wait_ready()
    return w


def let_end(w: Workload) -> None:
    """The fault is settled: the job may print its checksum and end."""
    w.release()


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
    let_end(w)
    assert w.verdict() == "PASS"
    assert w.reap_original() == 0
    assert w.output() == reference


def assert_released_before_go(m: Migration, w: Workload, reference: str, phases: tuple[str, ...]) -> None:
    """The source was asked to commit and GO never written: the orchestrator released it
    itself (exit status 1: nothing changed), no `resolve` to run, no copy anywhere else."""
    error = m.error  # type: ignore[attr-defined]
    assert error.phase in phases, (error.phase, error)
    assert f"GO was never sent: rolled back: pid {w.pid} runs on at localhost" in str(error), error
    assert exit_status(error) == EXIT_ERROR
    assert not [x for x in m.report.warnings if "resolve" in x], m.report.warnings
    assert copies(str(w.dir)) == [w.pid], "no copy besides the source, not even a stopped one"
    assert_rolled_back(m, w, reference)


async def test_source_agent_killed_during_precopy(tmp_path: Path, reference: str) -> None:
    w = start_job(tmp_path)

    def on_event(m: Migration, ev: Any) -> None:
        if isinstance(ev, PhaseChanged) and ev.phase == "precopy":
            later(0.5, lambda: kill_quietly(m.agents["source"]["pid"]))
    m = await run_migration(w.pid, on_event)
    assert_rolled_back(m, w, reference)


async def test_source_agent_killed_while_the_process_is_frozen(tmp_path: Path, reference: str) -> None:
    """The final round is long (a fast writer, a slow link): the kill lands mid-freeze, once
    the process is seen frozen, and the holder process thaws the source when its agent dies."""
    w = start_job(tmp_path)
    seen: dict[str, Any] = {}
    ended = threading.Event()

    def kill_once_frozen(agent: int) -> None:
        # "final" is announced as the freeze is asked for: wait for the freeze itself
        while (state := proc_state(w.pid)) != "t" and not ended.is_set():
            time.sleep(0.005)
        seen["state"] = state
        kill_quietly(agent)

    def on_event(m: Migration, ev: Any) -> None:
        if isinstance(ev, PhaseChanged) and ev.phase == "final":
            seen["killer"] = threading.Thread(target=kill_once_frozen, args=(m.agents["source"]["pid"],))
            seen["killer"].start()
    # The kill closes the agent's connection: no link timeout is waited for, and a long one
    # keeps a loaded machine's slow answers from failing the move before its final round.
    try:
        m = await run_migration(w.pid, on_event, max_rounds=1, link_timeout_s=30.0)
    finally:
        ended.set()
    assert "killer" in seen, f"the move ended before its final round: {m.error}"  # type: ignore[attr-defined]
    seen["killer"].join()
    assert seen["state"] == "t", "the kill should land while the process is frozen"
    assert_rolled_back(m, w, reference)


async def test_holder_killed_after_the_state_was_read(tmp_path: Path, reference: str) -> None:
    """The holder (the source's tracer) is killed once it has read the frozen process's state
    by injected system calls: the kernel lets the process go, and it runs on unharmed (it died
    of the last injected step's SIGTRAP when the holder left it in that signal's stop)."""
    w = start_job(tmp_path)
    holders: list[int] = []

    def on_event(m: Migration, ev: Any) -> None:
        if isinstance(ev, PhaseChanged) and ev.phase == "restore":
            holders.extend(holders_of(m.agents["source"]["pid"]))
            for pid in holders:
                kill_quietly(pid)
    m = await run_migration(w.pid, on_event, max_rounds=1)
    assert len(holders) == 1, holders
    assert_rolled_back(m, w, reference)


async def test_holder_killed_after_go_leaves_the_source_stopped(tmp_path: Path, reference: str) -> None:
    """The holder is killed once the destination runs the process, before it ended the source:
    the kernel lets the source go, and it must stop (the guard SIGSTOP queued at the point of
    no return), never run beside its copy. The report says how to settle it, and that works."""
    w = start_job(tmp_path)
    holders: list[int] = []

    def on_event(ev: Any) -> None:
        if isinstance(ev, PhaseChanged) and ev.phase == "commit":
            holders.extend(holders_of(m.agents["source"]["pid"]))
            for pid in holders:
                kill_quietly(pid)
    m = Migration(w.pid, "localhost", "localhost", MigrationOptions(link_timeout_s=3.0, new_pid=True),
                  on_event=on_event)
    report = await m.run()
    assert len(holders) == 1, holders
    assert any(f"kcr-migrate resolve {w.pid}@localhost --kill" in x for x in report.warnings), report.warnings
    deadline = time.monotonic() + 10
    while proc_state(w.pid) != "T":
        assert proc_state(w.pid) != "t" and time.monotonic() < deadline, f"the source is {proc_state(w.pid)}"
        time.sleep(0.02)
    assert running_copies(str(w.dir)) == [report.new_pid], "only the destination's copy runs"
    res = kcr("resolve", f"{w.pid}@localhost", "--kill")
    assert res.returncode == 0, res.stderr.decode()
    assert w.reap_original() == -signal.SIGKILL
    let_end(w)
    assert w.verdict() == "PASS"
    assert os.WEXITSTATUS(reap(report.new_pid)) == 0
    assert w.output() == reference


async def test_destination_agent_killed_during_precopy(tmp_path: Path, reference: str) -> None:
    w = start_job(tmp_path)

    def on_event(m: Migration, ev: Any) -> None:
        if isinstance(ev, RoundDone) and ev.round == 0:
            kill_quietly(m.agents["dest"]["pid"])
    m = await run_migration(w.pid, on_event)
    assert_rolled_back(m, w, reference)


async def test_destination_agent_killed_as_the_source_commits_rolls_back(tmp_path: Path, reference: str) -> None:
    """The destination agent dies while the source is asked to commit (its copy, held ready,
    dies with it): GO is never written, so the orchestrator releases the source itself (its
    guard SIGSTOP discarded, if it had committed): it runs on, with no copy anywhere else and
    no `resolve` to run, and the error says so (exit status 1: nothing changed)."""
    w = start_job(tmp_path)
    agent: dict[str, int] = {}

    def on_event(m: Migration, ev: Any) -> None:
        if isinstance(ev, PhaseChanged) and ev.phase == "commit-asked":
            agent["pid"] = m.agents["dest"]["pid"]
            kill_quietly(agent["pid"])
            # dead, and its copy with it (then nothing holds its end of the connection)
            deadline = time.monotonic() + 30
            while proc_state(agent["pid"]) not in (None, "Z", "X") or copies(str(w.dir)) != [w.pid]:
                assert time.monotonic() < deadline, f"the destination agent did not die: {copies(str(w.dir))}"
                time.sleep(0.005)
            agent["dead"] = 1
    m = await run_migration(w.pid, on_event, link_timeout_s=30.0, bandwidth_limit=None)
    assert "dead" in agent
    # seen before GO (by the destination's answer awaited beside the commit, or as GO is refused)
    assert_released_before_go(m, w, reference, ("commit-asked", "source-committed"))


async def test_destination_killed_while_the_source_commits_beside_the_restore(tmp_path: Path,
                                                                              reference: str) -> None:
    """A job that cannot see a SIGCONT has its source asked to commit while the destination
    restores. The destination agent dies then: GO was never written, the orchestrator rolls
    back and releases the source itself; it runs on, with no copy anywhere else and no
    `resolve` to run."""
    w = start_job(tmp_path)
    phases: list[str] = []

    def on_event(m: Migration, ev: Any) -> None:
        if isinstance(ev, PhaseChanged):
            phases.append(ev.phase)
            if ev.phase == "commit-asked-restoring":
                kill_quietly(m.agents["dest"]["pid"])
    m = await run_migration(w.pid, on_event, link_timeout_s=30.0, bandwidth_limit=None)
    assert "commit-asked-restoring" in phases, phases
    assert_released_before_go(m, w, reference, ("commit-asked-restoring", "commit-asked", "source-committed"))


async def test_a_job_that_sees_sigcont_is_asked_to_commit_only_once_the_copy_is_ready(tmp_path: Path,
                                                                                     reference: str) -> None:
    """A job catching SIGCONT would see the one a release after the commit sends: its source is
    asked to commit only once the destination holds the copy ready, as before; it moves, and
    sees no SIGCONT (its verdict fails on one)."""
    w = start_job(tmp_path, env={"WORKLOAD_SIGCONT": "1"})
    phases: list[str] = []
    m = Migration(w.pid, "localhost", "localhost", MigrationOptions(link_timeout_s=30.0, new_pid=True),
                  on_event=lambda ev: phases.append(ev.phase) if isinstance(ev, PhaseChanged) else None)
    report = await m.run()
    assert report.state == "done", report
    assert "commit-asked-restoring" not in phases and "commit-asked" in phases, phases
    assert w.reap_original() == -signal.SIGKILL
    let_end(w)
    assert os.WEXITSTATUS(reap(report.new_pid)) == 0
    assert w.verdict() == "PASS"
    assert w.output() == reference


async def test_destination_goes_silent_during_final(tmp_path: Path, reference: str) -> None:
    """A link that stops answering without closing (the destination agent is stopped): the
    keepalive notices, the migration rolls back, and the agent settles once it wakes."""
    w = start_job(tmp_path)
    agent: dict[str, int] = {}

    def on_event(m: Migration, ev: Any) -> None:
        if isinstance(ev, PhaseChanged) and ev.phase == "final":
            agent["pid"] = m.agents["dest"]["pid"]
            kill_quietly(agent["pid"], signal.SIGSTOP)
    m = await run_migration(w.pid, on_event, max_rounds=1, link_timeout_s=1.5)
    kill_quietly(agent["pid"], signal.SIGCONT)
    assert_rolled_back(m, w, reference)


def test_sigint_during_precopy_rolls_back(tmp_path: Path, reference: str) -> None:
    w = start_job(tmp_path)
    cli = subprocess.Popen([*KCR_MIGRATE, f"{w.pid}@localhost", "localhost", "--new-pid", "--bandwidth", "16MiB",
                            "--events"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert cli.stdout is not None
    for line in cli.stdout:          # the CLI's own events: pre-copy has begun
        if b'"phase": "precopy"' in line:
            break
    time.sleep(0.5)
    cli.send_signal(signal.SIGINT)
    _, err = cli.communicate(timeout=60)
    assert cli.returncode == 130, err.decode()
    assert "Traceback" not in err.decode() and "interrupted" in err.decode(), err.decode()
    assert proc_state(w.pid) not in (None, "T", "t")
    assert running_copies(str(w.dir)) == [w.pid]
    let_end(w)
    assert w.verdict() == "PASS"
    assert w.reap_original() == 0
    assert w.output() == reference


def descendants(pid: int) -> list[int]:
    """Live (not zombie) processes below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if stat[0] not in ("Z", "X"):
                children.setdefault(int(stat[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def holders_of(agent: int) -> list[int]:
    """The holders below an agent (forked by its zygote, ``agent.zygote``, which is not one)."""
    out = []
    for pid in descendants(agent):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "kcr-holder":
                out.append(pid)
        except OSError:
            pass
    return out


def test_agents_settle_when_kcr_migrate_goes_silent(tmp_path: Path, reference: str) -> None:
    """kcr-migrate is stopped (SIGSTOP) while the process is frozen: its connections stay open
    but silent. Within the link timeout the source's agent lets the process run on, the
    destination's destroys its copy, and both agents and the holder exit."""
    w = start_job(tmp_path)
    cli = subprocess.Popen([*KCR_MIGRATE, f"{w.pid}@localhost", "localhost", "--new-pid", "--bandwidth", "24MiB",
                            "--max-rounds", "1", "--link-timeout", "1.5", "--events"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert cli.stdout is not None
    try:
        for line in cli.stdout:
            if b'"phase": "final"' in line:
                break
        deadline = time.monotonic() + 10
        while proc_state(w.pid) != "t":      # asked to freeze: frozen soon
            assert time.monotonic() < deadline, f"the process is not frozen: state {proc_state(w.pid)}"
            time.sleep(0.01)
        tools = descendants(cli.pid)         # the two agents, their holder zygotes and the holder
        cli.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 30
        while (left := [p for p in tools if proc_state(p) not in (None, "Z", "X")]) or proc_state(w.pid) in ("t", "T"):
            assert time.monotonic() < deadline, f"still there: {left}, the process in state {proc_state(w.pid)}"
            time.sleep(0.05)
    finally:
        cli.kill()
        cli.wait()
        cli.stdout.close()
    assert len(tools) >= 5, tools
    assert running_copies(str(w.dir)) == [w.pid], "exactly one running copy"
    let_end(w)
    assert w.verdict() == "PASS"
    assert w.reap_original() == 0
    assert w.output() == reference


async def go_unanswered(w: Workload, on_unsettled: Callable[[int], None]) -> Migration:
    """Move ``w`` while its destination agent goes silent (SIGSTOP, from outside) as GO is
    about to be sent: GO waits unread, the orchestrator gives up past the point of no return.
    ``on_unsettled(agent_pid)`` runs once it has, before it ends its connections."""
    agent: dict[str, int] = {}

    def on_event(m: Migration, ev: Any) -> None:
        if isinstance(ev, PhaseChanged) and ev.phase == "go":
            agent["pid"] = m.agents["dest"]["pid"]
            kill_quietly(agent["pid"], signal.SIGSTOP)
        elif isinstance(ev, PhaseChanged) and ev.phase == "unsettled":
            on_unsettled(agent["pid"])
    m = await run_migration(w.pid, on_event, link_timeout_s=1.5, bandwidth_limit=None)
    assert isinstance(m.error, MigrationUnsettled), m.error  # type: ignore[attr-defined]
    assert m.report.state == "unsettled"
    assert f"kcr-migrate resolve {w.pid}@localhost" in str(m.error)  # type: ignore[attr-defined]
    assert proc_state(w.pid) == "T", "the source must stay stopped"
    return m


async def test_lost_answer_after_go_leaves_the_source_stopped_until_resolved(tmp_path: Path, reference: str) -> None:
    """The destination agent wakes after the orchestrator gave up on it: it finds GO waiting
    and runs the process, but its answer is lost. The source is left stopped (never resumed
    by itself), and `kcr-migrate resolve --kill` settles it."""
    w = start_job(tmp_path)

    def wake(agent: int) -> None:
        kill_quietly(agent, signal.SIGCONT)
        deadline = time.monotonic() + 30
        while not [p for p in running_copies(str(w.dir)) if p != w.pid]:
            assert time.monotonic() < deadline, "the woken agent never ran the process it was told to"
            time.sleep(0.02)
    await go_unanswered(w, wake)
    running = running_copies(str(w.dir))
    assert len(running) == 1 and running[0] != w.pid, "the destination copy runs, alone"
    # resolve refuses what it did not stop, then settles the real one
    assert kcr("resolve", f"{running[0]}@localhost", "--kill").returncode != 0
    res = kcr("resolve", f"{w.pid}@localhost", "--kill")
    assert res.returncode == 0, res.stderr.decode()
    assert w.reap_original() == -signal.SIGKILL
    let_end(w)
    assert w.verdict() == "PASS"
    assert os.WEXITSTATUS(reap(running[0])) == 0
    assert w.output() == reference


async def test_resolve_resume(tmp_path: Path, reference: str) -> None:
    """The destination agent never wakes (it is ended, and its copy with it): `kcr-migrate
    resolve --resume` lets the stopped source go on."""
    w = start_job(tmp_path)
    m = await go_unanswered(w, lambda agent: None)
    assert exit_status(m.error) == EXIT_UNSETTLED  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while copies(str(w.dir)) != [w.pid]:      # the stopped agent was ended, its copy with it
        assert time.monotonic() < deadline, f"copies left besides the source: {copies(str(w.dir))}"
        time.sleep(0.02)
    res = kcr("resolve", f"{w.pid}@localhost", "--resume")
    assert res.returncode == 0, res.stderr.decode()
    let_end(w)
    assert w.verdict(timeout=60) == "PASS"
    assert w.reap_original() == 0
    assert w.output() == reference


async def test_cancel_from_the_library_rolls_back(tmp_path: Path, reference: str) -> None:
    w = start_job(tmp_path)

    def on_event(m: Migration, ev: Any) -> None:
        if isinstance(ev, RoundDone):
            m.cancel()
    # No link is cut here: a link timeout long enough for a loaded machine (3 s was not, under
    # stress-ng: the rollback was right, its reason a stuck link)
    m = await run_migration(w.pid, on_event, link_timeout_s=30.0)
    assert_rolled_back(m, w, reference)
    assert isinstance(m.error, Cancelled), m.error  # type: ignore[attr-defined]
    # The connections outlive the cancellation: the rollback reached both agents.
    assert not [x for x in m.report.warnings if "could not reach" in x], m.report.warnings
