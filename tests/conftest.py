"""Shared fixtures: the test hosts (network + mount namespaces with sshd) and compiled workloads;
every image the tests write is signed with a key of the session's own."""
from __future__ import annotations

import compileall
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests._hosts import testbed  # noqa: F401  (pytest fixtures)
from tests._slurm import slurm  # noqa: F401  (pytest fixture)
from tests._softdirty_vm import (  # noqa: F401  (hooks: the soft-dirty VM starts early, its tests go last)
    pytest_collection_finish,
    pytest_collection_modifyitems,
    pytest_sessionfinish,
)
from tests._workloads import reap_started  # noqa: F401  (ends what each test started)


@pytest.fixture(scope="session", autouse=True)
def session_image_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``KCR_IMAGE_KEY`` for this session (the CLIs the tests run inherit it): the tests sign
    and verify images without making or using this host's /etc/kcr-migrate/image.key."""
    path = str(tmp_path_factory.mktemp("image-key") / "keys" / "image.key")
    before = os.environ.get("KCR_IMAGE_KEY")
    os.environ["KCR_IMAGE_KEY"] = path
    yield path
    if before is None:
        del os.environ["KCR_IMAGE_KEY"]
    else:
        os.environ["KCR_IMAGE_KEY"] = before


def pytest_sessionstart(session: Any) -> None:
    """Compile the checkout's modules once, as installing them does: with
    PYTHONDONTWRITEBYTECODE set (as on these machines) every kcr-migrate, agent and holder
    process the tests start would compile all it imports again (0.2-0.5 s of CPU each)."""
    root = Path(__file__).resolve().parent.parent
    for package in ("agent", "migrate", "precopy", "transport", "examples", "tests"):
        compileall.compile_dir(str(root / package), quiet=2)
