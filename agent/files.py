"""The files a process needs on the destination, and the vDSO it was built against.

Preflight checks, before anything is frozen, every file the process maps or has open. When
the destination sees the very same file (from a host to itself: the same boot and the same
device and inode; across hosts: a network filesystem with the same filesystem id and inode),
there is nothing to compare, and a file being written (a database, a log) is not read at all.
Otherwise the destination's copy must have the same size and sha256; a file open for writing
may have grown since the source looked, so for those the destination's first ``size`` bytes
must match. Files above ``SAMPLE_ABOVE`` are compared by a sample (their first and last MiB
and 62 blocks spread between, with the size) so preflight never reads a whole large data file.
Paths under a filesystem hook are exempt (the hook brings them). Digests are cached by (path,
device, inode, size, mtime), so repeated migrations of processes sharing libraries do not hash
them again.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import stat as stat_mod
from dataclasses import dataclass, field
from typing import Any, Collection

from agent import locks, shm_files
from agent.fsync import fs_magic
from agent.procfs import list_fds
from precopy.kernel import boot_id, xsave_supported_mask
from precopy.layout import read_maps
from transport.errors import IncompatibleImage, RestoreError, UnsupportedResource
from transport.frozen import frozen
from transport.schema import is_shm_path

CACHE_PATH = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                          "kcr-migrate", "sha256.json")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR
CHUNK = 1 << 20
SAMPLE_ABOVE = 64 << 20          # bigger files are compared by a sample of their blocks
SAMPLE_BLOCKS, SAMPLE_BLOCK = 62, 64 << 10
# statfs f_type of filesystems that several hosts mount as one: NFS, SMB/CIFS, Ceph, Lustre,
# GPFS, BeeGFS, GlusterFS/FUSE, 9p, AFS, OCFS2, GFS2.
SHARED_FS = {0x6969, 0xFE534D42, 0xFF534D42, 0x00C36400, 0x0BD00BD0, 0x47504653, 0x19830326, 0x65735546,
             0x01021997, 0x5346414F, 0x7461636F, 0x01161970}



def identity(path: str, st: os.stat_result) -> dict[str, Any]:
    """What names this very file across agents: the boot, device and inode, the filesystem's
    type and id (a network filesystem's id is the server's, the same on every client)."""
    try:
        fsid, fstype = os.statvfs(path).f_fsid, fs_magic(path)
    except OSError:
        fsid, fstype = 0, 0
    return {"boot": boot_id(), "dev": st.st_dev, "ino": st.st_ino, "fsid": fsid, "fstype": fstype}


def same_file(fact: dict[str, Any], path: str, st: os.stat_result) -> bool:
    """Is ``path`` here the file ``fact`` describes on the source (not a copy of it)?"""
    if "ino" not in fact or fact["ino"] != st.st_ino:
        return False
    here = identity(path, st)
    if fact.get("boot") and fact["boot"] == here["boot"]:
        return bool(fact.get("dev") == st.st_dev)
    return here["fstype"] in SHARED_FS and fact.get("fstype") == here["fstype"] and \
        bool(fact.get("fsid")) and fact.get("fsid") == here["fsid"]


@frozen
class FileFact:
    path: str
    size: int
    sha256: str
    prefix: bool         # compare only the first ``size`` bytes (open for writing)
    ident: dict[str, Any] = field(default_factory=dict)    # ``identity``: is it the same file there?

    def as_wire(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "prefix": self.prefix, **self.ident}


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
            for offset, length in sample_ranges(size):
                f.seek(offset)
                left = length
                while left > 0:
                    chunk = f.read(min(CHUNK, left))
                    if not chunk:
                        break
                    h.update(chunk)
                    left -= len(chunk)
        if size > SAMPLE_ABOVE:
            h.update(f"sampled {size}".encode())
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


def sample_ranges(size: int) -> list[tuple[int, int]]:
    """(offset, length) of what a digest of a ``size``-byte file reads: all of it up to
    ``SAMPLE_ABOVE``, else the first and last MiB and blocks spread evenly between."""
    if size <= SAMPLE_ABOVE:
        return [(0, size)]
    step = (size - 2 * CHUNK) // (SAMPLE_BLOCKS + 1)
    middle = [(CHUNK + step * (i + 1), SAMPLE_BLOCK) for i in range(SAMPLE_BLOCKS)]
    return [(0, CHUNK), *middle, (size - CHUNK, CHUNK)]


def describe_files(pid: int, exempt: list[str], redirected: Collection[int] = ()) -> FileFacts:
    """What the destination must have: files the process maps or has open, but those under
    ``exempt`` (a hook brings them) and the fds in ``redirected`` (files of the user's choice)."""
    cache = DigestCache()
    facts: dict[str, FileFact] = {}
    for m in read_maps(pid):
        if m.kind == "file" and not m.deleted and not under(m.name, exempt) and m.name not in facts:
            if is_shm_path(m.name) and shm_files.carried(m.name, here := os.stat(m.name)):
                # carried whole (agent.shm_files): the destination makes it again
                facts[m.name] = FileFact(m.name, 0, "", False, {**identity(m.name, here), "carried": True})
                continue
            size, digest = cache.digest(m.name)
            facts[m.name] = FileFact(m.name, size, digest, False, identity(m.name, os.stat(m.name)))
    infos = list_fds(pid)
    leased = {info.target: locks.parse(pid, info.fd, info.target, info.locks) for info in infos
              if any(" LEASE " in line for line in info.locks)}
    for info in infos:
        st = info.st
        lease = next((lk for lk in leased.get(info.target, ()) if lk.kind == "lease"), None)
        if lease is not None and lease.write and under(info.target, exempt):
            raise UnsupportedResource(
                f"pid {pid} holds a write lease on {info.target}, which a filesystem hook (--fs) copies: reading "
                "it would break the lease; move the process when it does not hold it, or keep the file on storage "
                "both hosts share", pid=pid)
        if st is None or not info.target.startswith("/") or under(info.target, exempt) or info.fd in redirected \
                or info.target.endswith(" (deleted)"):        # carried whole (agent.fdtable)
            continue
        if not stat_mod.S_ISREG(st.st_mode):
            continue
        if info.target in leased:
            # Not opened (that would start breaking the lease): the destination must see this very file.
            facts[info.target] = FileFact(info.target, st.st_size, "", False, identity(info.target, st))
            continue
        if info.target in facts:
            continue
        if shm_files.carried(info.target, st):
            facts[info.target] = FileFact(info.target, 0, "", False, {**identity(info.target, st), "carried": True})
            continue
        writing = bool(info.flags & WRITE_FLAGS)
        size, digest = cache.digest(info.target)
        facts[info.target] = FileFact(info.target, size, digest, writing, identity(info.target, st))
    cache.save()
    return FileFacts(sorted(facts.values(), key=lambda f: f.path))


def check_files(files: list[dict[str, Any]], host: str) -> set[str]:
    """On the destination: refuse if any file is missing or different (one line each). The
    paths that name here the very file the source has (the same host, or storage both share),
    not a copy of it."""
    cache = DigestCache()
    very: set[str] = set()
    try:
        for f in files:
            path, size, digest, prefix = str(f["path"]), int(f["size"]), str(f["sha256"]), bool(f["prefix"])
            if f.get("carried"):
                _check_carried(f, path, host)
                continue
            try:
                st = os.stat(path)
            except OSError:
                raise RestoreError(f"{path} is missing on {host}: the process maps or has it open; copy it "
                                   f"there (or put it under a filesystem hook with --fs)", host=host) from None
            if same_file(f, path, st):
                very.add(path)
                continue                # not a copy: the very file the source sees
            if not digest:
                raise RestoreError(f"the process holds a lease on {path}, which {host} has a copy of, not that very "
                                   "file: keep it on storage both hosts share, or bring it with --fs", host=host)
            holder = locks.write_lease_holder(path)
            if holder is not None:
                raise RestoreError(f"pid {holder} holds a write lease on {path} on {host}: reading it there (or "
                                   "opening it for the process) would break that lease; move the process when "
                                   "it is released", host=host)
            if (st.st_size < size) if prefix else (st.st_size != size):
                raise RestoreError(f"{path} differs on {host} ({st.st_size} bytes, {size} on the source): "
                                   "install the same version on both hosts", host=host)
            _, here = cache.digest(path, size if prefix else None)
            if here != digest:
                raise RestoreError(f"{path} differs on {host} (sha256 mismatch): install the same version "
                                   "on both hosts", host=host)
    finally:
        cache.save()
    return very


def _check_carried(fact: dict[str, Any], path: str, host: str) -> None:
    """A file of /dev/shm the job's contents make again here: the path must be free, or this
    very file (a host to itself)."""
    if not is_shm_path(path):
        raise RestoreError(f"the source names {path[:80]!r} as a file of /dev/shm: corrupt summary", host=host)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not same_file(fact, path, st):
        raise RestoreError(f"{path} on {host} is another file than the job's: kcr-migrate carries the job's file "
                           "of /dev/shm but does not overwrite another program's; remove it, or move the job "
                           "where that path is free", host=host)


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
