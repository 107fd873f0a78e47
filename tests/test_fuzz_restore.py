"""Restore of crafted images: a real image of a small process, mutated at the field level and
sealed again with valid checksums (``tests/_fuzz.py``), through `kcr-migrate restore`. Every
case either restores the process (then killed) or exits non-zero with one error line; none
hangs, prints a traceback or leaves a process behind.

The directed cases are what the tester of issue 13 reported and what fixing it turned up; the
seeded ones are a bounded, deterministic sample of the mutations ``benchmarks/fuzz_restore.py``
runs by the thousand (``KCR_FUZZ_CASES`` sets how many here)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests._fuzz import DIRECTED, Outcome, directed_image, make_image, run_case, run_image
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
