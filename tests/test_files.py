"""Preflight's file checks (agent/files.py): the very same file is recognised, copies compared."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from agent import files
from transport.errors import RestoreError


def fact(path: Path) -> dict[str, object]:
    """What the source says of ``path`` (as describe_files would)."""
    size, digest = files.DigestCache(str(path) + ".cache").digest(str(path))
    return files.FileFact(str(path), size, digest, False, files.identity(str(path), os.stat(path))).as_wire()


def test_the_same_file_is_not_compared_a_copy_is(tmp_path: Path) -> None:
    data = tmp_path / "db"
    data.write_bytes(os.urandom(1 << 16))
    seen = fact(data)
    data.write_bytes(os.urandom(1 << 16))        # rewritten since the source looked: still the one file
    files.check_files([seen], "hostB")
    copy = tmp_path / "copy"
    shutil.copy(data, copy)
    moved = {**seen, "path": str(copy)}           # another inode under the path the source named
    with pytest.raises(RestoreError, match="sha256 mismatch"):
        files.check_files([moved], "hostB")


def test_a_large_file_is_compared_by_a_sample_that_covers_its_ends(tmp_path: Path) -> None:
    size = files.SAMPLE_ABOVE + (5 << 20)
    ranges = files.sample_ranges(size)
    assert ranges[0] == (0, files.CHUNK) and ranges[-1] == (size - files.CHUNK, files.CHUNK)
    assert len(ranges) == files.SAMPLE_BLOCKS + 2 and sum(n for _, n in ranges) < size // 8
    big, other = tmp_path / "big", tmp_path / "other"
    with open(big, "wb") as f:
        f.truncate(size)
    shutil.copy(big, other)
    with open(other, "r+b") as f:                 # the very last byte differs
        f.seek(size - 1)
        f.write(b"x")
    source = {**fact(big), "path": str(other)}
    with pytest.raises(RestoreError, match="sha256 mismatch"):
        files.check_files([source], "hostB")
