"""The files a process needs on the destination, and the vDSO it was built against.

Preflight compares, before anything is frozen, every file the process maps or has open with
the destination's copy: the same size and sha256. A file open for writing may have grown
since the source looked (a log on shared storage): for those the destination's first
``size`` bytes must match. Paths under a filesystem hook are exempt (the hook brings them).
Digests are cached by (path, device, inode, size, mtime), so repeated migrations of
processes sharing libraries do not hash them again.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import stat as stat_mod
from dataclasses import dataclass, field
from typing import Any, Collection

from agent.procfs import list_fds
from precopy.kernel import xsave_supported_mask
from precopy.layout import read_maps
from transport.errors import IncompatibleImage, RestoreError

CACHE_PATH = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                          "kcr-migrate", "sha256.json")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR
CHUNK = 1 << 20


@dataclass(frozen=True)
class FileFact:
    path: str
    size: int
    sha256: str
    prefix: bool         # compare only the first ``size`` bytes (open for writing)

    def as_wire(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "prefix": self.prefix}


@dataclass
class FileFacts:
    files: list[FileFact] = field(default_factory=list)

    def as_wire(self) -> list[dict[str, Any]]:
        return [f.as_wire() for f in self.files]


def under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


class DigestCache:
    def __init__(self, path: str = CACHE_PATH) -> None:
        self.path = path
        self.entries: dict[str, str] = {}
        self.dirty = False
        try:
            with open(path) as f:
                data = json.load(f)
            if isinstance(data, dict):
                self.entries = {str(k): str(v) for k, v in data.items()}
        except (OSError, ValueError):
            pass

    def digest(self, path: str, limit: int | None = None) -> tuple[int, str]:
        """(size hashed, sha256 hex) of ``path`` (its first ``limit`` bytes if given)."""
        st = os.stat(path)
        size = st.st_size if limit is None else min(limit, st.st_size)
        key = f"{path}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{size}"
        cached = self.entries.get(key)
        if cached is not None:
            return size, cached
        h = hashlib.sha256()
        with open(path, "rb") as f:
            left = size
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
        digest = h.hexdigest()
        self.entries[key] = digest
        self.dirty = True
        return size, digest

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.entries, f)
            os.replace(tmp, self.path)
        except OSError:
            pass      # a cache, nothing more


def describe_files(pid: int, exempt: list[str], redirected: Collection[int] = ()) -> FileFacts:
    """What the destination must have: files the process maps or has open, but those under
    ``exempt`` (a hook brings them) and the fds in ``redirected`` (files of the user's choice)."""
    cache = DigestCache()
    facts: dict[str, FileFact] = {}
    for m in read_maps(pid):
        if m.kind == "file" and not m.deleted and not under(m.name, exempt) and m.name not in facts:
            size, digest = cache.digest(m.name)
            facts[m.name] = FileFact(m.name, size, digest, False)
    for info in list_fds(pid):
        st = info.st
        if st is None or not info.target.startswith("/") or under(info.target, exempt) or info.fd in redirected:
            continue
        if not stat_mod.S_ISREG(st.st_mode) or info.target in facts:
            continue
        writing = bool(info.flags & WRITE_FLAGS)
        size, digest = cache.digest(info.target)
        facts[info.target] = FileFact(info.target, size, digest, writing)
    cache.save()
    return FileFacts(sorted(facts.values(), key=lambda f: f.path))


def check_files(files: list[dict[str, Any]], host: str) -> None:
    """On the destination: refuse if any file is missing or different (one line each)."""
    cache = DigestCache()
    try:
        for f in files:
            path, size, digest, prefix = str(f["path"]), int(f["size"]), str(f["sha256"]), bool(f["prefix"])
            try:
                st = os.stat(path)
            except OSError:
                raise RestoreError(f"{path} is missing on {host}: the process maps or has it open; copy it "
                                   f"there (or put it under a filesystem hook with --fs)", host=host) from None
            if (st.st_size < size) if prefix else (st.st_size != size):
                raise RestoreError(f"{path} differs on {host} ({st.st_size} bytes, {size} on the source): "
                                   "install the same version on both hosts", host=host)
            _, here = cache.digest(path, size if prefix else None)
            if here != digest:
                raise RestoreError(f"{path} differs on {host} (sha256 mismatch): install the same version "
                                   "on both hosts", host=host)
    finally:
        cache.save()


def vdso_digest(pid: int | str = "self") -> str:
    """sha256 of a process's vDSO image (every process of a kernel shares it)."""
    for m in read_maps(pid):  # type: ignore[arg-type]
        if m.name == "[vdso]":
            fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            try:
                return hashlib.sha256(os.pread(fd, m.length, m.start)).hexdigest()
            finally:
                os.close(fd)
    return ""


def check_machine(summary: dict[str, Any], host: str) -> None:
    """On the destination: same architecture, CPU features covering the source's, same vDSO."""
    arch = platform.machine()
    if summary["arch"] != arch:
        raise IncompatibleImage(f"{host} is {arch} but the process runs on {summary['arch']}", host=host)
    missing = int(summary["xsave_mask"]) & ~xsave_supported_mask()
    if missing:
        raise IncompatibleImage(
            f"{host}'s CPU lacks state components {missing:#x} (XSAVE) the process may use: pick a "
            "destination with the same CPU features", host=host)
    if summary.get("vdso_sha256") and summary["vdso_sha256"] != vdso_digest():
        raise IncompatibleImage(
            f"{host} runs a kernel with another vDSO ({platform.release()}, the source runs "
            f"{summary.get('kernel_release')}): the process's cached vDSO entry points would break; "
            "migrate between hosts running the same kernel", host=host)
