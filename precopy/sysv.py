"""SysV shared memory segments as the kernel lists them (/proc/sysvipc/shm).

A process's maps name an attached segment ``/SYSV<key in hex> (deleted)``, and its inode
number is the segment's id (the kernel sets it so), which keys the segment's line in
/proc/sysvipc/shm: key, id, permissions (with SHM_DEST, 01000, once marked IPC_RMID; its key
reads 0 then), size, creator and last pids, attach count, owner and creator ids.
``host_ipc`` names the boot and IPC namespace the ids belong to: where another agent reads
the same, it sees the very same segments.
"""
from __future__ import annotations

import os

from precopy.kernel import boot_id
from transport.frozen import frozen
from transport.schema import SHM_MODE, SysvSegment

SHM_DEST = 0o1000
SHM_TABLE = "/proc/sysvipc/shm"


@frozen
class SegmentLine:
    """One line of /proc/sysvipc/shm."""

    segment: SysvSegment
    nattch: int
    cpid: int
    cuid: int
    cgid: int


def is_sysv(name: str, shared: bool) -> bool:
    return shared and name.startswith("/SYSV")



def host_ipc() -> str:
    """This boot and IPC namespace ("BOOT ipc:[N]"): SysV ids are names within it."""
    try:
        return f"{boot_id()} {os.readlink('/proc/self/ns/ipc')}"
    except OSError:
        return ""


def read_table(path: str = SHM_TABLE) -> dict[int, SegmentLine]:
    """Every segment of this IPC namespace, by id."""
    out: dict[int, SegmentLine] = {}
    host = host_ipc()
    try:
        with open(path) as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        if len(fields) < 14:
            continue
        key, shmid, _, size, cpid, _lpid, nattch, uid, gid, cuid, cgid = (int(x) for x in fields[:11])
        perms = int(fields[2], 8)
        seg = SysvSegment(shmid=shmid, key=key, size=max(size, 1), mode=perms & SHM_MODE, uid=uid, gid=gid,
                          removed=bool(perms & SHM_DEST), host=host)
        out[shmid] = SegmentLine(seg, nattch, cpid, cuid, cgid)
    return out


def segment(shmid: int) -> SysvSegment | None:
    """The segment ``shmid`` as it is now (None: gone)."""
    line = read_table().get(shmid)
    return line.segment if line is not None else None


def attached(pids: list[int]) -> list[SysvSegment]:
    """The segments these processes attach, each once."""
    from precopy.layout import read_maps     # it reads segments through this module

    table = read_table()
    out: dict[int, SysvSegment] = {}
    for pid in pids:
        try:
            maps = read_maps(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
        for m in maps:
            if is_sysv(m.name, m.shared) and m.inode in table:
                out.setdefault(m.inode, table[m.inode].segment)
    return list(out.values())


def to_wire(seg: SysvSegment) -> dict[str, object]:
    return {"shmid": seg.shmid, "key": seg.key, "size": seg.size, "removed": seg.removed, "host": seg.host}


def from_wire(d: object) -> SysvSegment:
    """A segment as a preflight summary names it (untrusted: ValueError if malformed)."""
    if not isinstance(d, dict):
        raise ValueError("not a map")
    seg = SysvSegment(shmid=int(d["shmid"]), key=int(d["key"]), size=int(d["size"]), mode=0, uid=0, gid=0,
                      removed=bool(d["removed"]), host=str(d["host"])[:128])
    if not (0 <= seg.shmid < 1 << 31 and -(1 << 31) <= seg.key < 1 << 31 and 0 < seg.size):
        raise ValueError(f"segment {seg.shmid}")
    return seg
