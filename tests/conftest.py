"""Shared fixtures: the test hosts (network + mount namespaces with sshd) and compiled workloads;
every image the tests write is signed with a key of the session's own."""
from __future__ import annotations

import os
from typing import Iterator

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
