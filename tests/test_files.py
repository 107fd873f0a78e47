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


LEASER = ("import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDONLY)\n"
          "fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)\nopen(sys.argv[2], 'w').close()\ntime.sleep(60)\n")


def test_a_leased_file_is_never_opened_to_be_compared(tmp_path: Path) -> None:
    """The source does not hash a file its process holds a lease on (its open would start
    breaking the lease): the destination must see that very file, a copy is refused. Nor does
    the destination open a file one of its processes holds a write lease on."""
    import sys

    from tests._workloads import start_until_ready
    data, ready = tmp_path / "db", tmp_path / "ready"
    data.write_bytes(b"x" * 4096)
    copy = tmp_path / "copy"
    shutil.copy(data, copy)                        # before the lease: this open would break it
    proc = start_until_ready([sys.executable, "-S", "-c", LEASER, str(data), str(ready)], ready)
    described = files.describe_files(proc.pid, [])
    seen = next(f for f in described.files if f.path == str(data))
    assert seen.sha256 == ""                       # not read
    files.check_files([seen.as_wire()], "hostB")   # the very file: nothing to compare, nothing opened
    with pytest.raises(RestoreError, match="holds a lease on .*copy.*, which hostB has a copy of"):
        files.check_files([{**seen.as_wire(), "path": str(copy)}], "hostB")
    with pytest.raises(RestoreError, match=f"pid {proc.pid} holds a write lease on .*db on hostB"):
        files.check_files([{**fact(copy), "path": str(data)}], "hostB")
    fdinfo = "".join(Path(f"/proc/{proc.pid}/fdinfo/{fd}").read_text() for fd in os.listdir(f"/proc/{proc.pid}/fd"))
    assert " LEASE  ACTIVE    WRITE " in fdinfo    # never broken (SIGIO would have ended it)
