"""Files in /dev/shm the job holds open or maps: POSIX ``shm_open`` objects, Python's
``multiprocessing.shared_memory``. /dev/shm is a tmpfs, so their contents live on this host
only: they are carried whole, read while the job is frozen (``agent.carried_files``: slices
with the file's ``path``), and made again at their path on the destination with their owner
and permissions (``agent.shared_memory``), unless the destination sees this very file. fds
and mappings keep naming the file by its path. Deleted ones are deleted files
(``agent.fdtable``); files in a directory under /dev/shm are ordinary files (the destination
must have them).
"""
from __future__ import annotations

import os
import stat
from typing import Mapping, Sequence

from agent.procfs import fd_links, mount_table
from precopy.layout import MapEntry
from transport.frozen import frozen
from transport.schema import SHM_DIR, is_shm_path

SHM_MOUNT = SHM_DIR.rstrip("/")


@frozen
class ShmFile:
    pid: int                 # a process of the job that has it
    path: str
    source: str              # where to read it: the process's fd or mapping, under /proc
    st: os.stat_result


def find(pids: Sequence[int], maps: Mapping[int, list[MapEntry]]) -> dict[int, ShmFile]:
    """The /dev/shm files these processes hold open or map, by inode. ``maps``: their file
    mappings (``precopy.layout.file_maps``)."""
    out: dict[int, ShmFile] = {}
    tmpfs: int | None = None
    looked = False

    def device() -> int | None:
        """/dev/shm's device, read (the mount table) at the first file there: most jobs have none."""
        nonlocal tmpfs, looked
        if not looked:
            tmpfs, looked = _tmpfs_device(), True
        return tmpfs

    for pid in pids:
        for fd, target in fd_links(pid):
            # (one unlinked shows its old name with " (deleted)": a deleted file, ``agent.fdtable``)
            if is_shm_path(target) and not target.endswith(" (deleted)") and (dev := device()) is not None:
                _add(out, pid, target, f"/proc/{pid}/fd/{fd}", dev)
        for m in maps[pid]:
            if m.inode in out:
                continue
            source = f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"
            if m.kind == "file" and is_shm_path(m.name):
                if (dev := device()) is not None:
                    _add(out, pid, m.name, source, dev)
            elif m.shared_anon and is_shm_path(m.name[:-len(" (deleted)")]) and (dev := device()) is not None:
                # sem_open() makes its file under a temporary name, maps it, links it under
                # the semaphore's name and unlinks the first: the mapping shows a deleted
                # name, but the file lives on under its own, which other processes open.
                try:
                    st = os.stat(source)
                except OSError:
                    continue
                path = linked_name(st)
                if path is not None:
                    _add(out, pid, path, source, dev)
    return out


def linked_name(st: os.stat_result) -> str | None:
    """The name in /dev/shm of the file ``st`` (mapped under a name it no longer has), if it
    has one there."""
    if not st.st_nlink:
        return None
    try:
        with os.scandir(SHM_MOUNT) as entries:
            for entry in entries:
                if entry.inode() == st.st_ino and entry.stat(follow_symlinks=False).st_dev == st.st_dev:
                    return entry.path
    except OSError:
        pass
    return None


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
