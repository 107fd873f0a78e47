"""Shared memory objects the processes of a tree map together, made once at restore.

``MAP_SHARED|MAP_ANONYMOUS`` memory inherited across ``fork`` is one object (a shmem file the
kernel names ``/dev/zero``) that parent and children map: a write by one is seen by all.
An image or stream names it by its inode on the source (``Vma.ino``). The restorer makes
each object once, as a shared anonymous mapping of its own (so the processes' maps read
``/dev/zero (deleted)`` as before), opens it through ``/proc/self/map_files`` (root may),
and every process maps that file at its own address and offset (``Restorer._map``). The
object grows to the largest offset any process maps. A deleted file (a memfd) the job also
holds open is made again whole from its carried contents with the fds, and at finish its
mappings are mapped again from that file (``Restorer._map_carried_files``): one file again.
"""
from __future__ import annotations

import ctypes
import os

from transport.errors import RestoreError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PROT_READ, PROT_WRITE = 1, 2
MAP_SHARED, MAP_ANONYMOUS = 0x01, 0x20
MAP_FAILED = ctypes.c_void_p(-1).value


class SharedObjects:
    """The shared memory objects of one restore, by their inode on the source: an fd each,
    in the restorer, for the processes to take with pidfd_getfd."""

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}

    def fd_for(self, ino: int, size: int) -> int:
        """The object ``ino``, at least ``size`` bytes long."""
        fd = self.fds.get(ino)
        if fd is None:
            fd = self.fds[ino] = _new_object(size)
        elif os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _new_object(size: int) -> int:
    addr = _libc.mmap(None, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0)
    if addr in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise RestoreError(f"cannot make a shared memory object of {size} bytes: {os.strerror(err)}")
    try:
        return os.open(f"/proc/self/map_files/{addr:x}-{addr + size:x}", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise RestoreError(f"cannot open a shared memory object through /proc/self/map_files: {exc.strerror} "
                           "(restoring memory shared between processes needs root)") from None
    finally:
        _libc.munmap(addr, size)
