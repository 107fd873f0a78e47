"""Restore of crafted images: a real image of a small process, mutated at the field level and
sealed again with valid checksums (``tests/_fuzz.py``), through `kcr-migrate restore`. Every
case either restores the process (then killed) or exits non-zero with one error line; none
hangs, prints a traceback or leaves a process behind.

The directed cases are what the tester of issue 13 reported and what fixing it turned up; the
seeded ones are a bounded, deterministic sample of the mutations ``benchmarks/fuzz_restore.py``
runs by the thousand (``KCR_FUZZ_CASES`` sets how many here). Ctrl-C at moments during a
restore ends it the same way."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests._fuzz import (DIRECTED, Outcome, children, directed_image, end_strays, make_image, outcome_of, run_case,
                         run_image, start_restore)
from tests._workloads import become_subreaper

CASES = int(os.environ.get("KCR_FUZZ_CASES", "40"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    become_subreaper()
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def image(workdir: Path) -> bytes:
    return make_image(workdir)


def _describe(o: Outcome) -> str:
    return f"seed {o.seed} ({o.mutation}): {o.result}, leaked {o.leaked}: {o.detail}"


def test_the_image_restores_unchanged(image: bytes, workdir: Path) -> None:
    """As checkpoint wrote it: signed, verified, restored (in the fuzz's read-only sandbox)."""
    outcome = run_image(image, -1, "none", workdir, trust=False)
    assert outcome.result == "restored" and not outcome.leaked, _describe(outcome)


@pytest.mark.parametrize("name", list(DIRECTED))
def test_a_crafted_image_is_refused_in_one_line(image: bytes, workdir: Path, name: str) -> None:
    outcome = run_image(directed_image(image, name, workdir), -2, name, workdir)
    assert outcome.result == "refused" and not outcome.leaked, _describe(outcome)
    assert DIRECTED[name][1] in outcome.detail, _describe(outcome)


def test_mutated_images_restore_or_are_refused(image: bytes, workdir: Path) -> None:
    outcomes = [run_case(image, seed, workdir) for seed in range(CASES)]
    bad = [_describe(o) for o in outcomes if not o.ok]
    assert not bad, "\n".join(bad)
    # The sample reaches both ends: mutations the restorer takes, and ones it refuses.
    results = {o.result for o in outcomes}
    assert CASES < 20 or results == {"restored", "refused"}, results


def _stub_made(before: set[int]) -> bool:
    """Has the restore made the process it rebuilds (``agent.stub``: not the tool's child, an
    orphan from the start, so ours as subreaper)?"""
    for pid in children() - before:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "kcr-stub":
                return True
        except OSError:
            pass
    return False


@pytest.fixture(scope="module")
def big_image(workdir: Path) -> Path:
    """The fuzz target with 96 MiB more memory: its restore takes long enough to interrupt."""
    path = workdir / "ctrl-c.img"
    path.write_bytes(make_image(workdir, mib=96))
    return path


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.03, 1.0])
def test_ctrl_c_while_restoring_ends_it_in_one_line(big_image: Path, delay: float) -> None:
    """Ctrl-C once the tool has made the process to restore into: either the restore ends
    first (the process runs) or nothing of it is left, and either way one line, no traceback."""
    path = big_image
    before = children()
    proc = start_restore(path, trust=False)
    deadline = time.monotonic() + 30
    while not _stub_made(before) and proc.poll() is None:
        assert time.monotonic() < deadline, "the restore never made its process"
        time.sleep(0.001)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    result, detail, pid = outcome_of(proc.returncode, out, err)
    if pid:
        os.kill(pid, signal.SIGKILL)
    assert result in ("restored", "refused"), detail
    assert result == "restored" or "interrupted" in detail, detail
    assert end_strays(before) == []
