"""Files in /dev/shm the job holds open or maps: POSIX ``shm_open`` objects, Python's
``multiprocessing.shared_memory``. /dev/shm is a tmpfs, so their contents live on this host
only: they are carried whole, read while the job is frozen (``FileContents`` with the file's
``path``), and made again at their path on the destination with their owner and permissions
(``agent.shared_memory``), unless the destination sees this very file. fds and mappings keep
naming the file by its path. Deleted ones are deleted files (``agent.fdtable``); files in a
directory under /dev/shm are ordinary files (the destination must have them).

They count against the limits of deleted files: ``MAX_DELETED_FILE`` each, and with them
``MAX_DELETED_TOTAL`` a job.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Mapping, Sequence

from agent.procfs import fd_links, mount_table
from precopy.layout import MapEntry
from precopy.kernel import boot_id
from transport.errors import UnsupportedResource
from transport.records import MAX_BYTES
from transport.schema import MAX_DELETED_FILE, SHM_DIR, FileContents, is_shm_path

SHM_MOUNT = SHM_DIR.rstrip("/")


@dataclass(frozen=True)
class ShmFile:
    pid: int                 # a process of the job that has it
    path: str
    source: str              # where to read it: the process's fd or mapping, under /proc
    st: os.stat_result


def find(pids: Sequence[int], maps: Mapping[int, list[MapEntry]]) -> dict[int, ShmFile]:
    """The /dev/shm files these processes hold open or map, by inode. ``maps``: their file
    mappings (``precopy.layout.file_maps``)."""
    out: dict[int, ShmFile] = {}
    tmpfs = _tmpfs_device()
    if tmpfs is None:
        return out
    for pid in pids:
        for fd, target in fd_links(pid):
            if is_shm_path(target):
                _add(out, pid, target, f"/proc/{pid}/fd/{fd}", tmpfs)
        for m in maps[pid]:
            if m.kind == "file" and is_shm_path(m.name) and m.inode not in out:
                _add(out, pid, m.name, f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}", tmpfs)
    return out


def carried(path: str, st: os.stat_result) -> bool:
    """Is the file ``path`` (``st``) one of /dev/shm this module carries?"""
    return is_shm_path(path) and st.st_dev == _tmpfs_device()


def _tmpfs_device() -> int | None:
    """The device of /dev/shm where a tmpfs is mounted there (None: not host-local memory)."""
    if not any(fstype == "tmpfs" and point == SHM_MOUNT for fstype, point, _, _ in mount_table()):
        return None
    try:
        return os.stat(SHM_MOUNT).st_dev
    except OSError:
        return None


def _add(out: dict[int, ShmFile], pid: int, path: str, source: str, device: int) -> None:
    try:
        st = os.stat(source)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode) and st.st_dev == device and st.st_ino not in out:   # the first holder's
        out[st.st_ino] = ShmFile(pid, path, source, st)


def check_size(files: dict[int, ShmFile], root: int) -> int:
    """Refuse a file over ``MAX_DELETED_FILE``; the bytes they hold in all."""
    for f in files.values():
        if f.st.st_size > MAX_DELETED_FILE:
            raise UnsupportedResource(
                f"pid {f.pid} uses {f.path} ({f.st.st_size >> 20} MiB): kcr-migrate carries files of /dev/shm up to "
                f"{MAX_DELETED_FILE >> 20} MiB (their contents go while the job is frozen)", pid=root)
    return sum(f.st.st_size for f in files.values())


def contents(files: dict[int, ShmFile]) -> dict[int, list[FileContents]]:
    """Each file's contents in slices, by the pid whose records carry them."""
    out: dict[int, list[FileContents]] = {}
    boot = boot_id()
    for ino, f in files.items():
        fd = os.open(f.source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_ino != ino or st.st_size > MAX_DELETED_FILE:
                raise UnsupportedResource(f"{f.path} changed while pid {f.pid}'s job was being read: try again",
                                          pid=f.pid)
            offset = 0
            while True:
                data = os.pread(fd, min(MAX_BYTES, st.st_size - offset), offset)
                out.setdefault(f.pid, []).append(FileContents(
                    id=ino, size=st.st_size, offset=offset, data=data, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid,
                    gid=st.st_gid, path=f.path, dev=st.st_dev, boot=boot))
                offset += len(data)
                if not data or offset >= st.st_size:
                    break
        finally:
            os.close(fd)
    return out
