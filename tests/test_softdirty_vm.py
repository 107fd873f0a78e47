"""Soft-dirty for real: Debian's own kernel (CONFIG_MEM_SOFT_DIRTY, which this machine's kernel
may lack) boots under qemu and runs the tracker and round tests and a live migration, localhost
to localhost, with transparent huge pages ``always`` and then ``never`` (tests/_softdirty_vm.py).

The guest starts when the session has collected these tests and runs, niced (``KCR_VM_NICE``,
19), while the rest of the suite does; these tests go last (``KCR_VM_EARLY=0`` starts it only
when they run). Add a test to ``VM_TESTS`` to run it there too. Skipped only where qemu cannot
run at all (no qemu, no unpacked kernel: scripts/setup installs both).
"""
from __future__ import annotations

import pytest

from tests._softdirty_vm import Case, RunPlan, VmResult, junit_cases, kernel_files, session_result, unavailable_reason

# What the guest runs, under each THP mode (a soft-dirty kernel tracks a huge page as one).
VM_TESTS = (
    "tests/test_tracker.py",
    "tests/test_rounds.py",
    "tests/test_hugepages.py",
    "tests/test_migrate.py::test_cpython_job[soft-dirty]",
)
# The checksum tracker is the same on every kernel: the host's run covers it.
VM_OPTIONS = ("-k", "not checksum")
THP_MODES = ("always", "never")
RUN_TIMEOUT_S = 900
SOFTDIRTY_VM_RUNS = [RunPlan(mode, (*VM_OPTIONS, *VM_TESTS), RUN_TIMEOUT_S) for mode in THP_MODES]

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=f"qemu cannot run: {unavailable_reason()}")


@pytest.fixture(scope="module")
def vm() -> VmResult:
    return session_result(SOFTDIRTY_VM_RUNS)


def explain(vm: VmResult, what: str) -> str:
    return f"{what}\nthe guest's console:\n{vm.console}"


def test_the_guest_runs_debians_kernel_and_soft_dirty_works_there(vm: VmResult) -> None:
    _, _, release = kernel_files()
    assert vm.kernel == release, explain(vm, f"the guest ran {vm.kernel}, not the unpacked {release}")
    soft_dirty = vm.probes["soft-dirty"]
    assert soft_dirty["available"], explain(vm, f"soft-dirty probed unavailable in the guest: {soft_dirty['reason']}")


@pytest.mark.parametrize("thp", THP_MODES)
def test_tracker_round_and_migration_tests_pass_there(vm: VmResult, thp: str) -> None:
    run = vm.run(thp)
    assert f"[{thp}]" in run.thp_line, explain(vm, f"THP was {run.thp_line!r}, not {thp}")
    assert run.status is not None, explain(vm, f"THP {thp}: pytest did not finish within {RUN_TIMEOUT_S} s")
    assert run.junit.exists(), explain(vm, f"THP {thp}: pytest (status {run.status}) wrote no junit xml")
    cases = junit_cases(run.junit)
    bad = [c for c in cases if c.outcome in ("failed", "error")]
    assert not bad and run.status == 0, explain(vm, f"THP {thp}: pytest status {run.status}: " + "; ".join(
        f"{c.nodeid} {c.outcome}: {c.message.splitlines()[0] if c.message else ''}" for c in bad))
    ran = [c for c in cases if c.outcome == "passed" and "soft-dirty" in c.nodeid]
    assert ran, explain(vm, f"THP {thp}: no soft-dirty test ran")


def test_each_selected_test_ran_with_soft_dirty(vm: VmResult) -> None:
    """Really run, not skipped: each file (or test) of VM_TESTS passed soft-dirty cases, under
    one THP mode at least (huge-page tests skip under ``never``)."""
    cases = [c for mode in THP_MODES if vm.run(mode).junit.exists() for c in junit_cases(vm.run(mode).junit)]
    for selected in VM_TESTS:
        mine = [c for c in cases if matches(c, selected)]
        ran = [c for c in mine if c.outcome == "passed" and "soft-dirty" in c.nodeid]
        assert ran, explain(vm, f"no soft-dirty test of {selected} ran: "
                                + ", ".join(f"{c.nodeid} {c.outcome} {c.message}" for c in mine))


def matches(case: Case, selected: str) -> bool:
    """Is ``case`` one of the tests that ``selected`` (a file, or file::test[param]) names?"""
    return case.nodeid == selected or case.nodeid.startswith(selected + "::")
