"""Live migration on one host (localhost to localhost: two agents, the full protocol, no SSH).

The migrated workload must finish with the same output as an uninterrupted run, and the
report must tell the truth about rounds, bytes and downtime.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

import pytest

from agent import urgency
from tests._migration import migrate_cli, running_copies, wait_gone
from tests._state import Watch
from tests._tracking import backend_params
from tests._workloads import (LINGERING, Workload, become_subreaper, finished, kcr, one_error_line, reap,
                              start_reference)


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    become_subreaper()


def migrate_workload(name: str, tmp_path: Path, *args: str, cli_args: tuple[str, ...] = (),
                     **kw: object) -> tuple[Workload, Workload, dict]:
    # The job is held (``hold``): one that lingers (ckpt_common.h's linger) waits there until it
    # has moved, however slow the machine; one that does not is stretched to be caught mid-run.
    kw.setdefault("scale", 1 if name in LINGERING else 5)
    ref = start_reference(name, tmp_path, *args, **kw)
    w = Workload(name, tmp_path / "migrated", *args, hold=True, **kw)  # type: ignore[arg-type]
    w.start()
    w.wait_ready()
    watch = Watch(w) if name in LINGERING else None
    code, report, err = migrate_cli(f"{w.pid}@localhost", "localhost", *cli_args)
    assert code == 0, err
    assert w.reap_original() == -9           # the source was ended only after the copy ran
    assert report["state"] == "done" and report["new_pid"] not in (0, w.pid)
    if watch is not None:
        watch.check(report["new_pid"])      # the whole state, not only what the workload checks
    assert w.verdict() == "PASS", (w.dir / "stderr").read_text()
    assert os.WEXITSTATUS(reap(report["new_pid"])) == 0
    return finished(ref), w, report


@pytest.mark.parametrize("name", ["ckpt_threads", "ckpt_blocked", "ckpt_signals", "ckpt_files", "ckpt_pipes",
                                  "ckpt_sockets", "ckpt_attrs", "ckpt_events", "ckpt_sched",
                                  "ckpt_numa", "ckpt_no_vdso"])
def test_c_workloads_finish_as_if_never_moved(tmp_path: Path, name: str) -> None:
    ref, w, report = migrate_workload(name, tmp_path)
    assert w.output() == ref.output()
    assert report["rounds"] >= 1 and report["downtime_ms"] > 0
    for key in ("new_pid", "dest_host", "rounds", "downtime_ms", "total_ms", "bytes_raw", "bytes_on_wire",
                "stop_reason", "per_round"):
        assert key in report
    if urgency.allowed():     # a short freeze's steps ran at real-time priority on both sides (agent.urgency)
        assert report["final_round"]["realtime"] == report["final_round"]["dest_realtime"] == 1, report["final_round"]


def test_a_process_denying_itself_writable_code_keeps_the_denial(tmp_path: Path) -> None:
    # PR_SET_MDWE (systemd's MemoryDenyWriteExecute= sets it): read through injected calls one
    # stop each (no writable code for a batch), set again once restore has mapped all it will.
    if ctypes.CDLL(None).prctl(66, 0, 0, 0, 0) < 0:          # PR_GET_MDWE
        pytest.skip("this kernel lacks PR_SET_MDWE (Linux 6.3+)")
    ref, w, _ = migrate_workload("ckpt_signals", tmp_path, env={"WORKLOAD_MDWE": "1"})
    assert w.output() == ref.output()


def test_read_locks_are_held_by_both_copies_then_the_new_one(tmp_path: Path) -> None:
    """From a host to itself both copies see one file: shared locks are taken by the new process
    while the old one still holds them, so no other process gets in between."""
    ref, w, _ = migrate_workload("ckpt_locks", tmp_path, "read")
    assert w.output() == ref.output() == "locks checked: all held (0)\n"


def test_a_write_lock_on_a_file_both_copies_see_is_refused(tmp_path: Path) -> None:
    """A write lock cannot change hands between two processes without a moment where a third
    could take it: refused in preflight, naming the lock, and the process runs on holding it."""
    w = Workload("ckpt_locks", tmp_path, "write", hold=True)
    w.start()
    w.wait_ready()
    code, report, err = migrate_cli(f"{w.pid}@localhost", "localhost")
    line = err.splitlines()[-1]
    assert code != 0 and report["state"] == "rolled-back", err
    assert "holds a write POSIX record lock on bytes 10-19 of" in line and "sees that same file" in line, line
    assert w.verdict() == "PASS" and w.output() == "locks checked: all held (0)\n"


PY_JOB = r"""
import hashlib, os, sys, time
out_dir = sys.argv[1]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 60
buf = bytearray(24 << 20)
h = b"seed"
with open(os.path.join(out_dir, "output"), "w") as out:
    for i in range(steps):
        for j in range(0, len(buf), 4096 * 8):
            h = hashlib.sha256(h + bytes(buf[j:j + 64])).digest()
            buf[j:j + 32] = h
        out.write(f"{i} {h.hex()}\n")
        out.flush()
        if i == 5:
            open(os.path.join(out_dir, "ready"), "w").close()
        time.sleep(0.02)
# A job to be moved does not end before it was: on a busy machine the steps may all be done
# before the migration starts. It waits (running) until the test says it has moved, writing
# meanwhile: each pass, every page of a scratch buffer must hold the count of passes so far.
scratch, passes = bytearray(1 << 20), 0
while len(sys.argv) > 3 and not os.path.exists(sys.argv[3]):
    for j in range(0, len(scratch), 4096):
        if int.from_bytes(scratch[j:j + 8], "little") != passes:
            sys.exit(f"scratch page {j // 4096} lost the write of pass {passes}")
        scratch[j:j + 8] = (passes + 1).to_bytes(8, "little")
    passes += 1
    time.sleep(0.01)
with open(os.path.join(out_dir, ".verdict"), "w") as v:      # whole, or not there: the test polls
    v.write("PASS\n")
os.replace(os.path.join(out_dir, ".verdict"), os.path.join(out_dir, "verdict"))
"""


@pytest.mark.parametrize("tracker", backend_params())
def test_cpython_job(tmp_path: Path, tracker: str) -> None:
    """With each tracker the kernel has (soft-dirty runs in tests/test_softdirty_vm.py's VM
    where this kernel lacks it)."""
    script = tmp_path / "job.py"
    script.write_text(PY_JOB)

    def job(base: Path, *moved: str) -> Workload:
        return Workload("py", base, argv=[sys.executable, "-S", str(script), str(base / "py"), "60", *moved])
    ref = job(tmp_path / "reference")
    ref.start()
    assert ref.verdict() == "PASS"
    ref.reap_original()
    moved = tmp_path / "moved"
    w = job(tmp_path / "migrated", str(moved))
    w.start()
    w.wait_ready()
    code, report, err = migrate_cli(f"{w.pid}@localhost", "localhost", "--tracker", tracker)
    assert code == 0, err
    assert report["tracker"] == tracker
    moved.touch()
    w.reap_original()
    assert w.verdict() == "PASS"
    assert os.WEXITSTATUS(reap(report["new_pid"])) == 0
    assert w.output() == ref.output()


def test_a_job_holding_a_few_dozen_kernel_objects_moves_with_them(tmp_path: Path) -> None:
    """An event-loop program's kind of state (tests/workloads/objects.h: eight each of eventfd,
    timerfd, pipe and socketpair with bytes in flight, an epoll set over them, a signalfd, an
    inotify watch, a flock, a POSIX timer) beside dirtied memory: each holds what it held."""
    ref, w, report = migrate_workload("mig_dirty", tmp_path, "32", "20", "150", env={"WORKLOAD_OBJECTS": "8"})
    assert w.output() == ref.output()      # and its verdict PASSed: every object held what it held


def test_precopy_really_happens_and_downtime_is_honest(tmp_path: Path) -> None:
    """256 MiB dirtying 10 MiB/s: at least two rounds, under 10% of the bytes sent while frozen,
    and a downtime no shorter than what a ticker thread inside the job saw."""
    ref, w, report = migrate_workload("mig_dirty", tmp_path, "256", "10", "150", "1",
                                      cli_args=("--downtime", "5"))
    assert w.output() == ref.output()
    assert report["rounds"] >= 2, report["per_round"]
    assert report["frozen_bytes_raw"] < 0.10 * report["bytes_raw"]
    assert report["bytes_raw"] >= 256 << 20
    gap_ms, jitter_ms = (int(x) / 1e6 for x in (w.dir / "gap").read_text().split())
    assert gap_ms > 0, "the ticker never saw the pid change"
    # The ticker's gap also holds however long it waited for a CPU around the freeze; its own
    # longest wait at any other time bounds that.
    assert report["downtime_ms"] >= gap_ms - jitter_ms, (report["downtime_ms"], gap_ms, jitter_ms)


def test_a_writer_faster_than_the_link_still_migrates(tmp_path: Path) -> None:
    """Dirtying 400 MiB/s over a link limited to 40 MiB/s: pre-copy cannot converge, stops
    for the right reason, and the job still finishes correctly."""
    ref, w, report = migrate_workload("mig_dirty", tmp_path, "32", "400", "150",
                                      cli_args=("--bandwidth", "40MiB", "--max-rounds", "6"))
    assert w.output() == ref.output()
    assert report["stop_reason"] in ("dirty-growing", "max-rounds", "max-bytes"), report["stop_reason"]
    assert any("pre-copy did not converge" in w and "--bandwidth" in w for w in report["warnings"]), \
        report["warnings"]


def test_stop_and_copy(tmp_path: Path) -> None:
    ref, w, report = migrate_workload("ckpt_threads", tmp_path, cli_args=("--no-precopy",))
    assert w.output() == ref.output()
    assert report["rounds"] == 0 and report["stop_reason"] == "stop-and-copy"
    assert report["frozen_bytes_raw"] == report["bytes_raw"] > 0


def test_dry_run_moves_nothing(tmp_path: Path) -> None:
    w = Workload("ckpt_array", tmp_path, "200")
    w.start()
    w.wait_ready()
    code, report, err = migrate_cli(f"{w.pid}@localhost", "localhost", "--dry-run")
    assert code == 0, err
    assert report["state"] == "dry-run" and report["new_pid"] == 0
    assert w.verdict() == "PASS"
    assert w.reap_original() == 0


def test_a_taken_pid_is_refused_in_preflight(tmp_path: Path) -> None:
    """It keeps its pid by default; from a host to itself the source holds it: refused before
    anything is frozen, saying so, and the process runs on."""
    w = Workload("ckpt_array", tmp_path, "100000")
    w.start()
    w.wait_ready()
    code, report, err = migrate_cli(f"{w.pid}@localhost", "localhost", keep_pid=True)
    assert code != 0 and "Traceback" not in err
    line = err.splitlines()[-1]
    assert f"pid {w.pid} taken on " in line and "one host" in line and "--new-pid" in line
    assert report["state"] != "done"
    status = Path(f"/proc/{w.pid}/status").read_text()
    assert "TracerPid:\t0\n" in status and "State:\tS" in status or "State:\tR" in status, status


def test_bad_input_gets_one_line(tmp_path: Path) -> None:
    code, _, err = migrate_cli("4194303@localhost", "localhost")
    assert code != 0 and "no process" in one_error_line(err)
    res = kcr("12@", "localhost")
    assert res.returncode != 0 and b"PID@HOST" in res.stderr


def test_unreachable_destination_leaves_the_process_alone(tmp_path: Path) -> None:
    w = Workload("ckpt_array", tmp_path, "60")
    w.start()
    w.wait_ready()
    code, _, err = migrate_cli(f"{w.pid}@localhost", "no-such-host.invalid")
    assert code != 0 and "no-such-host.invalid" in one_error_line(err)
    assert w.verdict() == "PASS"
    assert w.reap_original() == 0


def test_two_unreachable_hosts_make_one_error_line() -> None:
    # Both agents are reached at once: both failing is still one clear error, not two.
    code, _, err = migrate_cli("1@no-such-source.invalid", "no-such-dest.invalid")
    assert code != 0 and ".invalid" in one_error_line(err)


def test_a_process_someone_else_traces_is_refused(tmp_path: Path) -> None:
    from agent import ptrace
    from agent.tracer import Tracer

    w = Workload("ckpt_array", tmp_path, "200", hold=True)    # (it may not end before it is let go)
    w.start()
    w.wait_ready()
    with Tracer() as tracer:
        tracer.call(ptrace.seize, w.pid)       # like a debugger attached to it
        code, _, err = migrate_cli(f"{w.pid}@localhost", "localhost")

        def let_go() -> None:
            ptrace.interrupt(w.pid)
            ptrace.wait_stop(w.pid)
            ptrace.detach(w.pid)
        tracer.call(let_go)
    assert code != 0 and "may not trace" in one_error_line(err)
    assert w.verdict() == "PASS"
    assert w.reap_original() == 0
    assert not running_copies(str(w.dir))
    wait_gone(w.pid)


@pytest.mark.parametrize("tracker", backend_params())
def test_a_layout_that_changes_during_precopy_keeps_its_contents(tmp_path: Path, tracker: str) -> None:
    """The heap grows by brk, an arena by mprotect, a mapping by mremap in place, and a mapping
    splits and merges again, between rounds: the destination keeps every page the mapping had
    (the job checks every word it wrote, at each step and at the end). With every tracker the
    kernel has (soft-dirty runs in tests/test_softdirty_vm.py's VM where this kernel lacks it)."""
    ref, w, report = migrate_workload("mig_layout", tmp_path, "60",
                                      cli_args=("--bandwidth", "20MiB", "--downtime", "1", "--tracker", tracker))
    assert w.output() == ref.output()
    assert report["tracker"] == tracker
    assert report["rounds"] >= 2, report["per_round"]


def test_thousands_of_mappings_changing_while_tracked_arrive_intact(tmp_path: Path) -> None:
    """3,000 small mappings, alternately writable and read-only, eight of them written every
    millisecond; every 10 ms ten others are unmapped and mapped again with new contents, flip
    their protection (merging with their neighbours and splitting off again) or, read-only,
    are emptied (MADV_DONTNEED), all while pre-copy tracks them and sends each round's layout
    as what changed. The moved copy then checks every word of every mapping."""
    w = Workload("many_maps", tmp_path, "3000", "8", "10", "0")
    w.start()
    w.wait_ready()
    code, report, err = migrate_cli(f"{w.pid}@localhost", "localhost", "--bandwidth", "40MiB", "--downtime", "1")
    assert code == 0, err
    assert w.reap_original() == -9
    assert report["rounds"] >= 2, report["per_round"]
    assert sum(r["layout_changes"] for r in report["per_round"][1:]) > 0, "the layout did not change while tracked"
    copy = report["new_pid"]
    try:
        os.kill(copy, signal.SIGUSR1)
        assert w.wait_file(f"verify.{copy}", 60).strip() == "ok 3000"
    finally:
        os.kill(copy, signal.SIGKILL)
        reap(copy)


async def test_a_job_mapping_memory_where_its_state_was_to_be_read_moves_intact(tmp_path: Path) -> None:
    """The state of a frozen process is read beside its last scan, through a scratch mapped
    into it for a moment at a place chosen from its last pre-copy layout (the middle of its
    largest gap), which that scan leaves out. A job that mapped memory just there since (as the
    freeze begins) keeps it: its state is read once it was scanned instead, with the scratch
    where the kernel puts it; no scratch is left behind or carried, and the job's page arrives."""
    from migrate import Migration, MigrationOptions, PhaseChanged
    from agent.inject import spare_address
    from precopy.layout import read_maps

    w = Workload("scratch_squat", tmp_path, hold=True)
    w.start()
    w.wait_ready()
    squatted: list[str] = []

    def on_event(ev: object) -> None:
        # Pre-copy is over (its last layout read); the freeze is next.
        if isinstance(ev, PhaseChanged) and ev.phase == "freeze":
            at = spare_address([(m.start, m.end) for m in read_maps(w.pid)])
            assert at is not None
            (w.dir / "map").write_text(f"{at:x}\n")
            squatted.append(w.wait_file("mapped", 30))
    report = await Migration(w.pid, "localhost", "localhost", MigrationOptions(new_pid=True),
                             on_event=on_event).run()
    assert squatted and squatted[0].startswith("mapped "), squatted
    assert report.final_round["states_after_scan"] == 1, report.final_round
    assert w.reap_original() == -9
    assert w.verdict() == "PASS", w.output()
    assert w.output() == "page: 0 bad bytes; mappings near it: 1\n"
    assert os.WEXITSTATUS(reap(report.new_pid)) == 0
