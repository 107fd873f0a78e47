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

Host-local shared memory with a name is made here too, once per restore:

- a SysV segment (``Vma.shm``) under its id: ``/proc/sys/kernel/shm_next_id`` set just
  before ``shmget`` (as CRIU does), the id read back, the owner and permissions set with
  IPC_SET; each process attaches it with an injected ``shmat``. Where this host sees the
  very segment (the same boot and IPC namespace, id, size and key: a restore on the
  host it was checkpointed on, a live migration from a host to itself) it is used as it is;
  while another process still attaches it (the source, in a live migration) no page is
  written into it. A segment marked IPC_RMID is marked so again once every process attaches
  it (``finish``). Another segment under its id or key here is refused, naming it.
- a file directly in /dev/shm (``FileContents.path``): made at its path with its owner,
  permissions and contents, unless this host sees this very file (same boot, device and
  inode), which is used as it is; another file at that path is refused, never overwritten.

What was made here is removed again if the restore is abandoned (``discard``).
"""
from __future__ import annotations

import ctypes
import os
import socket
import stat
from typing import Iterable

from agent.as_target import Identity
from agent.carried_files import set_times, write_sparse
from precopy import sysv
from precopy.kernel import boot_id
from transport.errors import RestoreError
from transport.frozen import frozen
from transport.schema import FileContents, SysvSegment

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
_libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
PROT_READ, PROT_WRITE = 1, 2
MAP_SHARED, MAP_ANONYMOUS = 0x01, 0x20
MAP_FAILED = ctypes.c_void_p(-1).value
IPC_PRIVATE, IPC_CREAT, IPC_EXCL, IPC_RMID, IPC_SET, IPC_STAT = 0, 0o1000, 0o2000, 0, 1, 2
SHM_NEXT_ID = "/proc/sys/kernel/shm_next_id"
SHMID_DS_SIZE = 112          # x86_64 struct shmid_ds; struct ipc_perm first: key, uid, gid, cuid, cgid, mode


@frozen
class Segment:
    shmid: int               # here
    foreign: bool            # this very segment, attached by a process we do not restore: no pages go in


class SharedObjects:
    """The shared memory objects of one restore, by their inode on the source: an fd each,
    in the restorer, for the processes to take with pidfd_getfd; the SysV segments and
    /dev/shm files made (or found) here."""

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}
        self.segments: dict[int, Segment] = {}      # source id -> here
        self.removed: dict[int, bool] = {}          # source id -> marked IPC_RMID (as last seen)
        self.made_segments: list[int] = []
        self.files: set[str] = set()                # /dev/shm paths carried (made, or this very file)
        self.file_paths: dict[int, str] = {}        # their paths by their inode on the source
        self.made_files: list[str] = []             # paths this restore made (/dev/shm files, FIFOs)
        self._writing: dict[int, int] = {}          # /dev/shm files being written, by source inode
        self._times: dict[int, tuple[int, int]] = {}    # ... their (atime, mtime) ns, set once written

    def fd_for(self, ino: int, size: int) -> int:
        """The object ``ino``, at least ``size`` bytes long."""
        fd = self.fds.get(ino)
        if fd is None:
            fd = self.fds[ino] = _new_object(size)
        elif os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        return fd

    def note(self, seg: SysvSegment) -> None:
        """``seg`` as the latest layout describes it (removed or not)."""
        self.removed[seg.shmid] = seg.removed

    def segment(self, seg: SysvSegment) -> Segment:
        """The SysV segment ``seg`` here: found (this very one) or made under its id."""
        self.note(seg)
        found = self.segments.get(seg.shmid)
        if found is not None:
            return found
        line = check_segment(seg, socket.gethostname())
        if line is not None:
            found = Segment(seg.shmid, line.nattch > 0)
        else:
            found = Segment(_make_segment(seg), False)
            self.made_segments.append(found.shmid)
        self.segments[seg.shmid] = found
        return found

    def write_file(self, c: FileContents, identity: Identity) -> None:
        """One slice of a /dev/shm file of the image, as it arrives: the file is made at its
        path by ``identity`` (the job's, ``agent.as_target``) at its first slice, or found (this
        very file: nothing is written); ``files_written`` closes what was made."""
        if c.id not in self.file_paths:
            fd = _shm_file(c, socket.gethostname(), identity)
            self.files.add(c.path)
            self.file_paths[c.id] = c.path
            if fd < 0:
                return
            self._writing[c.id] = fd
            if c.mtime_ns:
                self._times[c.id] = (c.atime_ns, c.mtime_ns)
            self.made_files.append(c.path)
        fd = self._writing.get(c.id, -1)
        if fd < 0 or not c.data:
            return
        try:
            write_sparse(fd, c.data, c.offset)
        except OSError as exc:
            raise RestoreError(f"cannot write {c.path} again: {exc.strerror}") from None

    def add_files(self, contents: Iterable[FileContents], identity: Identity) -> None:
        """The /dev/shm files of the image not written as they arrived, made (or found) with
        their slices here; then every file is complete."""
        try:
            for c in sorted((c for c in contents if c.path), key=lambda c: (c.id, c.offset)):
                self.write_file(c, identity)
        finally:
            self.files_written()

    def files_written(self) -> None:
        """Every /dev/shm file of the image is complete: our fds of them go."""
        for c_id, fd in self._writing.items():
            set_times(fd, self._times.pop(c_id, None))
            os.close(fd)
        self._writing.clear()

    def finish(self) -> None:
        """Every process attaches its segments: those marked IPC_RMID are marked so again."""
        for src, seg in self.segments.items():
            if self.removed.get(src) and seg.shmid in self.made_segments:
                _libc.shmctl(seg.shmid, IPC_RMID, None)

    def settled(self) -> None:
        """The processes run: what was made here is theirs."""
        self.made_segments.clear()
        self.made_files.clear()

    def discard(self) -> None:
        """The restore is abandoned: what it made goes (its processes are killed)."""
        for shmid in self.made_segments:
            _libc.shmctl(shmid, IPC_RMID, None)
        for path in self.made_files:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.made_segments.clear()
        self.made_files.clear()

    def close(self) -> None:
        self.files_written()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _same_segment(here: sysv.SegmentLine, seg: SysvSegment) -> bool:
    """Is the segment under ``seg``'s id here the source's own (not another one)?"""
    s = here.segment
    # Ids carry a sequence number, so one id names one segment for a long while; its creator's
    # pid reads differently in another pid namespace, its key turns 0 once it is removed.
    return bool(seg.host) and seg.host == s.host and s.size == seg.size and \
        (s.key == seg.key or s.removed or seg.removed)


def check_segment(seg: SysvSegment, host: str,
                  table: dict[int, sysv.SegmentLine] | None = None) -> sysv.SegmentLine | None:
    """None where ``seg`` can be made here under its id and key; its line where this host
    sees this very segment; RestoreError naming the id or key another segment holds here."""
    table = sysv.read_table() if table is None else table
    line = table.get(seg.shmid)
    if line is not None:
        if _same_segment(line, seg):
            return line
        raise RestoreError(f"SysV shared memory id {seg.shmid} is taken on {host} by another segment (key "
                           f"{line.segment.key:#x}, created by pid {line.cpid}): programs keep their "
                           "segment's id; remove that segment (ipcrm -m) or move the job elsewhere", host=host)
    if seg.key != IPC_PRIVATE and not seg.removed:
        other = next((x for x in table.values() if x.segment.key == seg.key and not x.segment.removed), None)
        if other is not None:
            raise RestoreError(f"SysV shared memory key {seg.key:#x} is taken on {host} by segment "
                               f"{other.segment.shmid}: remove it (ipcrm -M {seg.key:#x}) or move the job elsewhere",
                               host=host)
    return None


def check_segments(segments: Iterable[SysvSegment], host: str) -> None:
    """Preflight on the destination: every segment can be made here (or is this very one)."""
    table = sysv.read_table()
    for seg in segments:
        check_segment(seg, host, table)


def _make_segment(seg: SysvSegment) -> int:
    host = socket.gethostname()
    key = IPC_PRIVATE if seg.removed else seg.key
    try:
        with open(SHM_NEXT_ID, "w") as f:
            f.write(str(seg.shmid))
    except OSError as exc:
        raise RestoreError(f"cannot choose the SysV segment's id ({SHM_NEXT_ID}: {exc.strerror}): restoring "
                           "SysV shared memory needs root", host=host) from None
    got = _libc.shmget(key, seg.size, IPC_CREAT | IPC_EXCL | seg.mode)
    if got < 0:
        err = ctypes.get_errno()
        _reset_next_id()
        raise RestoreError(f"cannot make SysV shared memory segment {seg.shmid} ({seg.size} bytes) on {host}: "
                           f"{os.strerror(err)}", host=host)
    if got != seg.shmid:
        _libc.shmctl(got, IPC_RMID, None)
        raise RestoreError(f"SysV shared memory id {seg.shmid} is taken on {host}: programs keep their segment's "
                           "id; remove that segment (ipcrm -m) or move the job elsewhere", host=host)
    ds = ctypes.create_string_buffer(SHMID_DS_SIZE)
    if _libc.shmctl(got, IPC_STAT, ds) == 0:
        ctypes.c_uint32.from_buffer(ds, 4).value = seg.uid
        ctypes.c_uint32.from_buffer(ds, 8).value = seg.gid
        ctypes.c_uint16.from_buffer(ds, 20).value = seg.mode
        if _libc.shmctl(got, IPC_SET, ds) == 0:
            return got
    err = ctypes.get_errno()
    _libc.shmctl(got, IPC_RMID, None)
    raise RestoreError(f"cannot give SysV segment {seg.shmid} its owner and permissions: {os.strerror(err)}",
                       host=host)


def _reset_next_id() -> None:
    try:
        with open(SHM_NEXT_ID, "w") as f:
            f.write("-1")
    except OSError:
        pass


def _shm_file(c: FileContents, host: str, identity: Identity) -> int:
    """An fd of the file ``c.path`` made here by ``identity`` (to write its contents into),
    owned as the source's where ``identity`` may give it that owner; or -1 where this host
    sees the very file the source had there."""
    try:
        st = os.lstat(c.path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if c.boot and c.boot == boot_id() and st.st_dev == c.dev and st.st_ino == c.id:
            return -1
        what = "another file" if stat.S_ISREG(st.st_mode) else "something else"
        raise RestoreError(f"{c.path} on {host} is {what} than the job's: kcr-migrate does not overwrite it; "
                           "remove it, or move the job where that path is free", host=host)
    try:
        fd = identity.open_path(c.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise RestoreError(f"cannot make {c.path} on {host} as the process's {identity}: {exc.strerror}",
                           host=host) from None
    try:
        identity.give(fd, c.uid, c.gid)
        with identity.acting():
            os.fchmod(fd, c.mode)
        os.ftruncate(fd, c.size)
    except OSError as exc:
        os.close(fd)
        os.unlink(c.path)
        raise RestoreError(f"cannot make {c.path} on {host}: {exc.strerror}", host=host) from None
    return fd


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
