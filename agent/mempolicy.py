"""NUMA memory policies: each thread's own (``set_mempolicy``) and those of ranges of the
address space (``mbind``), with their mode flags (MPOL_F_STATIC_NODES, MPOL_F_RELATIVE_NODES).

Only the process can tell them cheaply: the dump injects ``get_mempolicy`` into each thread
(its policy) and, with ``MPOL_F_ADDR``, once per mapping, every mapping's call in the one
batch of the freeze (``agent.dump``): a few microseconds each. ``/proc/PID/numa_maps`` says
the same but walks every page (80-110 ms per GiB), so the freeze never reads it. Restore
gives each range its policy back by an injected ``mbind`` (``MPOL_MF_MOVE``: the pages the
restorer wrote already move to the nodes the policy names) and each thread its own by
``set_mempolicy`` in the thread's batch of calls.

A policy names nodes. Where the destination has no memory on one of them, the policy would
not mean what it did: refused (at restore always, before the process runs; in preflight
where the source has more than one memory node, from ``numa_maps`` read then, outside the
freeze: on a host of one node, policies name that node or none), unless the user chose
``affinity="warn"`` (``--affinity warn``, as for CPUs): then the policy is kept with the
nodes the destination has (or dropped for the default, if none is left) and the report says so.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Callable, Iterable, Sequence

from agent.sched import id_mask, mask_ids
from transport.errors import NoSuchProcess, RestoreError
from precopy.layout import FrozenFileMaps, MapEntry, file_maps
from transport.schema import PAGE_SIZE, TASK_SIZE, MemPolicy, ThreadState

MPOL_DEFAULT, MPOL_PREFERRED, MPOL_BIND, MPOL_INTERLEAVE, MPOL_LOCAL = 0, 1, 2, 3, 4
MPOL_PREFERRED_MANY, MPOL_WEIGHTED_INTERLEAVE = 5, 6
MPOL_F_STATIC_NODES, MPOL_F_RELATIVE_NODES, MPOL_F_NUMA_BALANCING = 1 << 15, 1 << 14, 1 << 13
MODE_FLAGS = MPOL_F_STATIC_NODES | MPOL_F_RELATIVE_NODES | MPOL_F_NUMA_BALANCING
MPOL_F_ADDR = 1 << 1             # get_mempolicy: the policy of the mapping at addr
MPOL_MF_MOVE = 1 << 1            # mbind: move the range's pages (those only this process maps)
MODE_NAMES = {MPOL_DEFAULT: "default", MPOL_PREFERRED: "preferred", MPOL_BIND: "bind",
              MPOL_INTERLEAVE: "interleave", MPOL_LOCAL: "local", MPOL_PREFERRED_MANY: "preferred-many",
              MPOL_WEIGHTED_INTERLEAVE: "weighted-interleave"}
NODE_DIR = "/sys/devices/system/node"


def _node_list(text: str) -> set[int]:
    nodes: set[int] = set()
    for part in filter(None, text.strip().split(",")):
        first, _, last = part.partition("-")
        nodes.update(range(int(first), int(last or first) + 1))
    return nodes


def _read_nodes(name: str) -> set[int] | None:
    try:
        with open(f"{NODE_DIR}/{name}") as f:
            return _node_list(f.read())
    except (OSError, ValueError):
        return None


def memory_nodes() -> set[int]:
    """This host's nodes with memory (a kernel without NUMA has node 0 alone)."""
    return _read_nodes("has_memory") or _read_nodes("online") or {0}


@functools.cache
def node_bits() -> int:
    """Bits of the nodemasks the calls exchange: the kernel's node ids, in 64-bit words
    (get_mempolicy refuses a mask shorter than nr_node_ids). The possible nodes are fixed at
    boot: read once."""
    possible = _read_nodes("possible") or {0}
    return max(64, (max(possible) + 64) // 64 * 64)


def node_list(nodes: Iterable[int]) -> str:
    return ",".join(str(n) for n in sorted(nodes))


def describe(mode: int, flags: int, nodes: bytes) -> str:
    """As numactl would say it: "bind=static:0,1"."""
    out = MODE_NAMES.get(mode, str(mode))
    out += "=static" if flags & MPOL_F_STATIC_NODES else "=relative" if flags & MPOL_F_RELATIVE_NODES else ""
    named = mask_ids(nodes)
    return f"{out}:{node_list(named)}" if named else out


def split(raw_mode: int, raw_mask: bytes) -> tuple[int, int, bytes]:
    """get_mempolicy's answer as (mode, mode flags, nodes trimmed). A mode the kernel has
    since 6.x or later that this tool does not know is refused rather than carried wrong."""
    mode, flags = raw_mode & ~MODE_FLAGS, raw_mode & MODE_FLAGS
    if mode not in MODE_NAMES:
        raise ValueError(f"NUMA policy mode {mode}")
    return mode, flags, bytes(raw_mask).rstrip(b"\0")       # ``id_mask``'s form: little-endian, trimmed


def query_call(mode_at: int, mask_at: int, bits: int, addr: int | None = None) -> tuple[str, tuple[int, ...]]:
    """get_mempolicy for the calling thread's policy, or with ``addr`` the mapping's there."""
    if addr is None:
        return "get_mempolicy", (mode_at, mask_at, bits, 0, 0)
    return "get_mempolicy", (mode_at, mask_at, bits, addr, MPOL_F_ADDR)


Policy = tuple[int, int, bytes]          # mode, mode flags, nodes (``split``)
SHMEM_TYPES = ("tmpfs", "devtmpfs")      # filesystems whose files are shmem objects
_shm_mount: list[tuple[int, int]] = []   # the kernel's own shmem mount, once asked


class ShmemDevices:
    """Whether a device (major, minor) is a shmem filesystem's, as ``pid`` sees them: the kernel's
    own mount that holds shared anonymous memory, SysV segments and memfds (the same in every
    namespace: a memfd of ours tells it), or one of its tmpfs mounts (their devices are
    anonymous, major 0: its mountinfo is read once, when such a device is first asked)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._tmpfs: set[tuple[int, int]] | None = None

    def __contains__(self, dev: object) -> bool:
        if not isinstance(dev, tuple) or dev[0] != 0:
            return False
        if not _shm_mount:
            fd = os.memfd_create("kcr-shm-dev", os.MFD_CLOEXEC)
            try:
                st_dev = os.fstat(fd).st_dev
            finally:
                os.close(fd)
            _shm_mount.append((os.major(st_dev), os.minor(st_dev)))
        if dev == _shm_mount[0]:
            return True
        if self._tmpfs is None:
            self._tmpfs = set()
            try:
                with open(f"/proc/{self.pid}/mountinfo") as f:
                    for line in f:
                        fields, _, rest = line.partition(" - ")
                        if rest.split(" ", 1)[0] in SHMEM_TYPES:
                            major, _, minor = fields.split(" ")[2].partition(":")
                            self._tmpfs.add((int(major), int(minor)))
            except (OSError, ValueError, IndexError):
                pass        # its tmpfs files are then asked at their mappings' starts alone
        return dev in self._tmpfs


class JobBounds:
    """Where the job's mappings of each file begin and end, as offsets in it (by (device,
    inode)): every process's file mappings, read once, when a process with shmem mappings
    first asks (the job is frozen: they stay as read; ``maps``: where the freeze read them already)."""

    def __init__(self, pids: Sequence[int], maps: FrozenFileMaps | None = None) -> None:
        self.pids = list(pids)
        self._file_maps = maps.of if maps is not None else file_maps
        self._bounds: dict[tuple[tuple[int, int], int], set[int]] | None = None

    def of(self, dev: tuple[int, int], inode: int) -> set[int]:
        if self._bounds is None:
            self._bounds = {}
            for pid in self.pids:
                try:
                    maps = self._file_maps(pid)
                except (NoSuchProcess, FileNotFoundError, ProcessLookupError):
                    continue
                for m in maps:
                    if m.inode:
                        self._bounds.setdefault((m.dev, m.inode), set()).update((m.offset, m.offset + m.length))
        return self._bounds.get((dev, inode), set())


def probe(maps: Sequence[MapEntry], shmem: ShmemDevices | set[tuple[int, int]],
          ask: Callable[[list[int]], list[Policy | None] | None],
          job: JobBounds | None = None) -> list[tuple[int, int, int, int, bytes]] | None:
    """(start, end, mode, flags, nodes) of each range of the process's mappings with one policy
    of its own (not the default), ``ask`` answering get_mempolicy(MPOL_F_ADDR) at each address of a list (None at one that is
    not a mapping of the process's own; None for all: a kernel without NUMA). The vsyscall page
    is left out (not a mapping of the process's own).

    A mapping's policy is the same all along it (``mbind`` on part of one splits it), except a
    mapping of a shmem object (``shmem``: the devices of shmem filesystems): there the policy is
    the object's, per range of it (mm/mempolicy.c's shared_policy; ``mbind`` through any mapping
    of the object, shared or private, sets it for that range, which ``get_mempolicy`` then shows
    at that range's addresses in every mapping of it), and the caller's mapping alone is split.
    So each such mapping is asked at its first and last page, and at every bound of the job's
    mappings of the object (this process's, and ``job``'s processes'), which shows every range
    set through a mapping the job still has; and between two neighbouring addresses that answer
    differently, at the middle, until they are adjacent pages: a bound. A range with a policy
    unlike both of its neighbours' that no mapping of the job begins or ends at (set by a
    process that does not move, or through a mapping since unmapped) is not seen, nor is the
    policy of a range no mapping of the job covers (README, Limits)."""
    maps = [m for m in maps if m.end <= TASK_SIZE]
    objects: dict[tuple[tuple[int, int], int], list[MapEntry]] = {}
    for m in maps:
        if m.inode and m.dev in shmem:
            objects.setdefault((m.dev, m.inode), []).append(m)
    # The addresses asked in each mapping of a shmem object (by its index); any other mapping
    # is asked at its start alone.
    points: dict[int, set[int]] = {}
    for i, m in enumerate(maps) if objects else ():
        if not m.inode or (m.dev, m.inode) not in objects:
            continue
        here = {m.start, m.end - PAGE_SIZE}
        offsets = {off for other in objects[(m.dev, m.inode)] for off in (other.offset, other.offset + other.length)}
        for off in offsets | (job.of(m.dev, m.inode) if job is not None else set()):
            at = m.start + off - m.offset
            if m.start < at < m.end:
                here.add(at)
        points[i] = here
    starts = [m.start for m in maps]
    todo = sorted(set(starts).union(*points.values())) if points else starts
    known: dict[int, Policy | None] = {}
    while todo:
        got = ask(todo)
        if got is None:
            return None
        known.update(zip(todo, got))
        more: list[int] = []
        for here in points.values():
            sampled = sorted(here)
            mids = [a + (b - a) // 2 // PAGE_SIZE * PAGE_SIZE for a, b in zip(sampled, sampled[1:])
                    if b - a > PAGE_SIZE and known[a] != known[b]]
            here.update(mids)
            more += mids
        todo = sorted(more)
    found: list[tuple[int, int, int, int, bytes]] = []
    for i, m in enumerate(maps):
        if i not in points:
            policy = known[m.start]
            if policy is not None and policy[0] != MPOL_DEFAULT:
                found.append((m.start, m.end, *policy))
            continue
        sampled = sorted(points[i])
        begin = m.start
        for a, b in zip(sampled, [*sampled[1:], m.end]):
            policy = known[a]
            if b != m.end and known[b] == policy:
                continue
            if policy is not None and policy[0] != MPOL_DEFAULT:
                found.append((begin, b, *policy))
            begin = b
    return found


def ranges(found: list[tuple[int, int, int, int, bytes]]) -> tuple[MemPolicy, ...]:
    """(start, end, mode, flags, nodes) per mapping, in address order -> the ranges with a policy
    of their own, neighbours with the same policy as one."""
    out: list[MemPolicy] = []
    for start, end, mode, flags, nodes in sorted(found):
        if mode == MPOL_DEFAULT:
            continue
        if out and out[-1].end == start and (out[-1].mode, out[-1].flags, out[-1].nodes) == (mode, flags, nodes):
            out[-1] = MemPolicy(out[-1].start, end, mode, flags, nodes)
        else:
            out.append(MemPolicy(start, end, mode, flags, nodes))
    return tuple(out)


# --- restore --------------------------------------------------------------------------------

def usable(mode: int, flags: int, nodes: bytes, *, what: str, pid: int, host: str, affinity: str,
           here: set[int] | None = None) -> tuple[int, int, bytes, str | None]:
    """The policy as this host can give it: unchanged where it has every node named; else a
    refusal, or under ``affinity`` "warn" the policy without the missing nodes (the default
    policy if none is left) and what the process runs without, for the report."""
    named = mask_ids(nodes)
    have = memory_nodes() if here is None else here
    missing = named - have
    if not missing:
        return mode, flags, nodes, None
    if flags & MPOL_F_STATIC_NODES and named & have:
        return mode, flags, nodes, None     # the kernel uses those of them it has, as it did on the source
    was = describe(mode, flags, nodes)
    if affinity != "warn":
        raise RestoreError(
            f"pid {pid}'s {what} has the NUMA policy {was}, naming nodes {node_list(missing)}, which {host} has no "
            f"memory on (it has {node_list(have)}): the policy would be lost; move it to a host with those nodes, or "
            "allow it to run without them (--affinity warn)", pid=pid, host=host)
    left = named & have
    if not left and mode not in (MPOL_LOCAL, MPOL_DEFAULT):
        return MPOL_DEFAULT, 0, b"", f"pid {pid}'s {what} had the NUMA policy {was}; {host} lacks nodes " \
            f"{node_list(missing)}, so it runs under the default policy"
    kept = id_mask(left)
    return mode, flags, kept, (f"pid {pid}'s {what} had the NUMA policy {was}; {host} lacks nodes "
                               f"{node_list(missing)}, so it runs under {describe(mode, flags, kept)}")


def _args(mode: int, flags: int, nodes: bytes, put: Callable[[bytes], int]) -> tuple[int, int, int]:
    """(mode | flags, nodemask address, maxnode) for set_mempolicy and mbind, whose maxnode
    counts one more than the bits they read (the kernel's historic off-by-one)."""
    if not nodes:
        return mode | flags, 0, 0
    bits = max(node_bits(), (len(nodes) * 8 + 63) // 64 * 64)
    return mode | flags, put(nodes.ljust(bits // 8, b"\0")), bits + 1


def thread_call(t: ThreadState, put: Callable[[bytes], int], *, pid: int, host: str, affinity: str,
                warnings: list[str]) -> tuple[str, tuple[int, ...]]:
    """set_mempolicy giving thread ``t`` its policy (the default too: a thread cloned from one
    with a policy has inherited it)."""
    mode, flags, nodes, warning = usable(t.mempolicy, t.mempolicy_flags, t.mempolicy_nodes,
                                         what=f"thread {t.tid}", pid=pid, host=host, affinity=affinity)
    if warning:
        warnings.append(warning)
    m, at, maxnode = _args(mode, flags, nodes, put)
    return "set_mempolicy", (m, at, maxnode)


def range_calls(policies: Iterable[MemPolicy], put: Callable[[bytes], int], *, pid: int, host: str, affinity: str,
                warnings: list[str]) -> list[tuple[str, tuple[int, ...]]]:
    """mbind giving each range its policy back (its pages move where it says)."""
    calls: list[tuple[str, tuple[int, ...]]] = []
    for p in policies:
        mode, flags, nodes, warning = usable(p.mode, p.flags, p.nodes, what=f"memory at {p.start:#x}-{p.end:#x}",
                                             pid=pid, host=host, affinity=affinity)
        if warning:
            warnings.append(warning)
        m, at, maxnode = _args(mode, flags, nodes, put)
        calls.append(("mbind", (p.start, p.end - p.start, m, at, maxnode, MPOL_MF_MOVE)))
    return calls


# --- preflight ------------------------------------------------------------------------------

def missing_nodes(nodes: set[int], host: str, pid: int | None, affinity: str) -> str | None:
    """Preflight, here at the destination: the nodes the source's policies name (``policy_nodes``)
    that this host has no memory on are refused, or under "warn" what the job will run without."""
    missing = nodes - memory_nodes()
    if not missing:
        return None
    said = (f"pid {pid} has NUMA memory policies naming nodes {node_list(missing)}, which {host} has no memory on "
            f"(it has {node_list(memory_nodes())})")
    if affinity != "warn":
        raise RestoreError(f"{said}: the policies would be lost; move it to a host with those nodes, or allow it to "
                           "run without them (--affinity warn)", pid=pid, host=host)
    return f"{said}: its policies keep the nodes {host} has, or become the default (--affinity warn)"


# "7f55a8000000 bind=static:0-1 anon=1 ...", "... prefer (many):0 ...": the policy's nodes
_POLICY = re.compile(r"^[0-9a-f]+ [a-z ()]+(?:=[a-z]+)?:([0-9,-]+)")


def policy_nodes(pid: int, tids: Iterable[int]) -> set[int]:
    """Preflight, from outside: the nodes with memory here that the process's policies name.
    A host of one memory node answers without reading (those policies name that node or none;
    restore checks them); else each thread's numa_maps is read (it walks the pages: slow, so
    never inside the freeze)."""
    have = memory_nodes()
    if len(have) <= 1:
        return set()
    named: set[int] = set()
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/numa_maps") as f:
                text = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue          # the thread exited
        for line in text.splitlines():
            m = _POLICY.match(line)
            if m:
                named |= _node_list(m.group(1))
    return named & have
