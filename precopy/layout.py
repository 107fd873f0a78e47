"""A process's address space: /proc/PID/maps (and smaps VmFlags) as schema ``Vma`` records,
and which of its pages hold data worth sending.

Pages worth sending are populated (present or swapped) and private to the process: pages of
the shared zero page are holes, and pages of a private file mapping that were never written
still come from the file. Shared anonymous memory has no reliable page-table view (shmem
pages may exist while unmapped), so all of it is read and all-zero pages are dropped.
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import operator
import os
import re
from dataclasses import field
from typing import Iterable, Sequence

from precopy import sysv
from precopy.intervals import Span, append_run, intersect_spans, merge_spans, subtract_spans
from precopy.kernel import ioctl
from transport.errors import NoSuchProcess
from transport.frozen import frozen
from precopy.pagemap import (
    PAGE_IS_FILE,
    PAGE_IS_PFNZERO,
    PAGE_IS_PRESENT,
    PAGE_IS_SWAPPED,
    PM_FILE,
    PM_PRESENT,
    PM_SWAP,
    PagemapScanner,
    pagemap_scan_works,
    read_pagemap,
)
from transport.schema import (
    ADV_DONTDUMP,
    ADV_DONTFORK,
    ADV_HUGEPAGE,
    ADV_MERGEABLE,
    ADV_RANDOM,
    ADV_SEQUENTIAL,
    ADV_NOHUGEPAGE,
    ADV_WIPEONFORK,
    PAGE_SIZE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    VMA_LOCKED,
    VMA_LOCKONFAULT,
    VMA_MAYWRITE,
    VMA_NORESERVE,
    VMA_DROPPABLE,
    VMA_SEALED,
    Vma,
)

_MAPS_LINE = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+) ([r-])([w-])([x-])([ps]) ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+)\s*(.*)$")

MEMFD_PREFIX = "/memfd:"     # how /proc names a memfd: its fds' links and its mappings
SPECIAL_KINDS = {"[heap]": "heap", "[stack]": "stack", "[vdso]": "vdso", "[vvar]": "vvar",
                 "[vvar_vclock]": "vvar_vclock", "[vsyscall]": "vsyscall"}
_ADVICE_FLAGS = {"dd": ADV_DONTDUMP, "dc": ADV_DONTFORK, "wf": ADV_WIPEONFORK, "hg": ADV_HUGEPAGE,
                 "nh": ADV_NOHUGEPAGE, "mg": ADV_MERGEABLE, "lo": VMA_LOCKED, "lf": VMA_LOCKONFAULT,
                 "mw": VMA_MAYWRITE, "nr": VMA_NORESERVE, "sr": ADV_SEQUENTIAL, "rr": ADV_RANDOM,
                 "sl": VMA_SEALED, "dp": VMA_DROPPABLE}


@frozen
class MapEntry:
    """One mapping as the kernel lists it."""

    start: int
    end: int
    prot: int
    shared: bool
    offset: int
    dev: tuple[int, int]
    inode: int
    name: str                      # path, [heap]/[stack]/..., or "" for anonymous
    vmflags: frozenset[str] = field(default=frozenset())

    @property
    def shared_anon(self) -> bool:
        """Memory shared through an object nothing names any more: MAP_SHARED|MAP_ANONYMOUS
        (the kernel names its shmem file /dev/zero), or a MAP_SHARED mapping of a deleted file
        (a POSIX semaphore or shm_open object unlinked once mapped, as Python's
        multiprocessing does). Carried as the memory it maps, like anonymous memory."""
        return self.shared and self.inode != 0 and self.name.endswith(" (deleted)")

    @property
    def deleted(self) -> bool:
        return self.inode != 0 and self.name.endswith(" (deleted)") and not self.shared_anon

    @property
    def kind(self) -> str:
        if self.name in SPECIAL_KINDS:
            return SPECIAL_KINDS[self.name]
        if self.inode == 0 or self.shared_anon:
            return "anon"   # includes "[anon:...]" names and shared anonymous memory
        return "file"

    @property
    def length(self) -> int:
        return self.end - self.start


def parse_maps(text: str) -> list[MapEntry]:
    out: list[MapEntry] = []
    for line in text.splitlines():
        m = _MAPS_LINE.match(line)
        if not m:
            continue
        start, end, r, w, x, ps, off, dmaj, dmin, ino, name = m.groups()
        prot = (PROT_READ if r == "r" else 0) | (PROT_WRITE if w == "w" else 0) | (PROT_EXEC if x == "x" else 0)
        out.append(MapEntry(int(start, 16), int(end, 16), prot, ps == "s", int(off, 16),
                            (int(dmaj, 16), int(dmin, 16)), int(ino), name))
    return out


MAPS_READS = 20


def read_maps(pid: int, cache: "MapsCache | None" = None) -> list[MapEntry]:
    """/proc/PID/maps as entries. ``cache``: reads of one process again and again (a
    tracker's rounds): a line the last read with this cache had is the very ``MapEntry`` it
    was then, not parsed again, so a read costs the lines that changed, and ``diff_layout``
    skips the entries both reads share.

    The kernel lists a running process's mappings a page of text at a time, and the process
    may change them in between: a mapping can then show twice, before and after an mprotect
    (overlapping lines). Such a listing is read again (a stopped process's never needs it);
    one still out of order after ``MAPS_READS`` tries is returned as it is, which the layout's
    users survive (``precopy.layout_delta`` sends again whatever a stale line overlapped)."""
    entries: list[MapEntry] = []
    for _ in range(MAPS_READS):
        with open(f"/proc/{pid}/maps") as f:
            text = f.read()
        if cache is None:
            entries = parse_maps(text)
            lo, hi = 0, len(entries)
        else:
            entries = cache.parse(text)
            lo, hi = cache.changed
        if in_order(entries, lo, hi):
            return entries
        if cache is not None:
            cache.forget()          # the next read is checked whole
    return entries


def in_order(entries: Sequence[MapEntry], lo: int = 0, hi: int | None = None) -> bool:
    """Whether ``entries[lo:hi]`` and their neighbours follow each other without overlap."""
    hi = len(entries) if hi is None else hi
    return all(entries[i - 1].end <= entries[i].start for i in range(max(lo, 1), min(hi + 1, len(entries))))


class MapsCache:
    """The last maps read of one process (see ``read_maps``). A read is compared with the last
    line by line (in C: list equality, ``map(operator.eq)``); only the lines between the
    common head and tail are looked up or parsed, and the entries list is spliced. An
    unchanged layout returns the very list of the last read."""

    def __init__(self) -> None:
        self._text = ""
        self._lines: list[str] = []
        self.entries: list[MapEntry] = []
        self._tracked: list[bool] = []          # ``trackable`` of each entry
        self._by_line: dict[str, MapEntry] = {}
        self.changed = (0, 0)        # the entries the last parse made: [lo, hi) of ``entries``

    def forget(self) -> None:
        """Parse the next read whole (the last one was not a consistent listing)."""
        self._text = ""
        self._lines = []

    def parse(self, text: str) -> list[MapEntry]:
        if text == self._text and self._lines:
            self.changed = (0, 0)
            return self.entries
        self._text = text
        lines = text.splitlines()
        old = self._lines
        if lines == old:
            self.changed = (0, 0)
            return self.entries
        if not old:                 # parsed whole: nothing of the last entries is kept but by line
            self.entries, self._tracked = [], []
        n, m = len(lines), len(old)
        shortest = min(n, m)
        same = list(map(operator.eq, lines, old))
        head = same.index(False) if False in same else shortest
        same = list(map(operator.eq, reversed(lines), reversed(old)))
        tail = min(same.index(False) if False in same else shortest, shortest - head)
        middle = lines[head: n - tail]
        parsed: list[MapEntry] = []
        for line in middle:
            entry = self._by_line.get(line)
            if entry is None:
                found = parse_maps(line)
                if len(found) != 1:         # not a maps line (never seen): parse it all
                    return self._parse_all(lines)
                entry = found[0]
            parsed.append(entry)
        if old:
            for line in old[head: m - tail]:
                self._by_line.pop(line, None)
            self._by_line.update(zip(middle, parsed))
        else:                       # parsed whole (first, or after ``forget``): only these lines
            self._by_line = dict(zip(middle, parsed))
        self.entries = self.entries[:head] + parsed + self.entries[m - tail:]
        self.changed = (head, head + len(parsed))
        self._tracked = self._tracked[:head] + [trackable(e) for e in parsed] + self._tracked[m - tail:]
        self._lines = lines
        return self.entries

    def _parse_all(self, lines: list[str]) -> list[MapEntry]:
        self.entries = parse_maps("\n".join(lines))
        self.changed = (0, len(self.entries))
        self._tracked = [trackable(e) for e in self.entries]
        self._by_line = {}
        self._lines = []          # the next read parses again
        return self.entries

    def tracked(self, entries: list[MapEntry]) -> list[MapEntry]:
        """``trackable`` entries of ``entries`` (the last read's list: from flags kept with it)."""
        if entries is self.entries and len(self._tracked) == len(entries):
            return list(itertools.compress(entries, self._tracked))
        return [e for e in entries if trackable(e)]


PROCMAP_QUERY = 0xC0686611        # _IOWR('f', 17, struct procmap_query), Linux >= 6.11
_PMQ_READABLE, _PMQ_WRITABLE, _PMQ_EXECUTABLE, _PMQ_SHARED = 0x01, 0x02, 0x04, 0x08
_PMQ_COVERING_OR_NEXT_VMA, _PMQ_FILE_BACKED_VMA = 0x10, 0x20
_NAME_MAX = 4096 + 16


class procmap_query(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size", "query_flags", "query_addr", "vma_start", "vma_end", "vma_flags", "vma_page_size",
        "vma_offset", "inode")] + [(name, ctypes.c_uint32) for name in (
            "dev_major", "dev_minor", "vma_name_size", "build_id_size")] + [
        ("vma_name_addr", ctypes.c_uint64), ("build_id_addr", ctypes.c_uint64)]


def query_maps(pid: int, *, file_backed: bool = False, start: int = 0, end: int = 1 << 64) -> list[MapEntry] | None:
    """The mappings in [start, end) (``file_backed``: only those of a file, shared anonymous
    memory and kernel objects among them), asked one by one with PROCMAP_QUERY, which skips
    the others in the kernel: a look for a process's files costs its file mappings, however
    many anonymous ones it has. None where the kernel lacks PROCMAP_QUERY (before 6.11)."""
    try:
        fd = os.open(f"/proc/{pid}/maps", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"no process {pid}") from None
    name = ctypes.create_string_buffer(_NAME_MAX)
    out: list[MapEntry] = []
    try:
        addr = start
        while addr < end:
            q = procmap_query(size=ctypes.sizeof(procmap_query), query_addr=addr, vma_name_size=_NAME_MAX,
                              vma_name_addr=ctypes.addressof(name),
                              query_flags=_PMQ_COVERING_OR_NEXT_VMA | (_PMQ_FILE_BACKED_VMA if file_backed else 0))
            try:
                ioctl(fd, PROCMAP_QUERY, q)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    break           # nothing at or after addr
                if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                    return None
                raise
            if q.vma_start >= end:
                break
            flags = q.vma_flags
            prot = (PROT_READ if flags & _PMQ_READABLE else 0) | (PROT_WRITE if flags & _PMQ_WRITABLE else 0) | \
                (PROT_EXEC if flags & _PMQ_EXECUTABLE else 0)
            label = name.value.decode(errors="surrogateescape") if q.vma_name_size else ""
            out.append(MapEntry(q.vma_start, q.vma_end, prot, bool(flags & _PMQ_SHARED), q.vma_offset,
                                (q.dev_major, q.dev_minor), q.inode, label))
            addr = q.vma_end
    finally:
        os.close(fd)
    return out


def file_maps(pid: int) -> list[MapEntry]:
    """The mappings of files (memfds, shared anonymous memory, SysV segments and kernel
    objects among them): PROCMAP_QUERY where the kernel has it, else the maps lines that name
    a path or an anonymous inode. What the checks of a job's files need, at the cost of its
    file mappings, not of every mapping it has."""
    try:
        found = query_maps(pid, file_backed=True)
        return found if found is not None else read_maps_naming(pid, "/", "anon_inode:")
    except (ProcessLookupError, FileNotFoundError):
        # (A running job's child that exited: the caller drops it, or names it.)
        raise NoSuchProcess(f"no process with pid {pid}", pid=pid) from None


class FrozenFileMaps:
    """``file_maps`` of the processes of a frozen job, each read at its first ask and kept:
    their mappings cannot change while they are stopped, and the job's checks and its fd
    tables both look at them (once each per freeze, not twice)."""

    def __init__(self) -> None:
        self._found: dict[int, list[MapEntry]] = {}

    def of(self, pid: int) -> list[MapEntry]:
        found = self._found.get(pid)
        if found is None:
            found = self._found[pid] = file_maps(pid)
        return found


def read_maps_naming(pid: int, *needles: str) -> list[MapEntry]:
    """The mappings whose maps line holds one of ``needles`` (a path's "/", "[vdso]"), the
    others skipped unparsed: on a process with tens of thousands of anonymous mappings, a
    look for its files or its vDSO costs the kernel's listing, not a parse of every line."""
    with open(f"/proc/{pid}/maps") as f:
        text = f.read()
    lines = re.findall("^.*(?:" + "|".join(map(re.escape, needles)) + ").*$", text, re.MULTILINE)
    return parse_maps("\n".join(lines))


# A mapping's VmFlags line and the next mapping's first line: one pass of the regex engine
# over the text finds them all, skipping the lines in between (a parse of every line in
# Python took seconds for 50,000 mappings).
_SMAPS_FLAGS_NEXT = re.compile(r"VmFlags:([^\n]*)\n?([^\n]*)")


def _smaps_pairs(text: str) -> list[tuple[str, str]]:
    """(mapping line, VmFlags) of every mapping of an smaps text."""
    found = _SMAPS_FLAGS_NEXT.findall(text)
    if found and not found[-1][1]:
        heads = [text.split("\n", 1)[0]] + [head for _, head in found[:-1]]
        if all(_MAPS_LINE.match(h) for h in (heads[0], heads[-1])):
            return list(zip(heads, (flags for flags, _ in found)))
    # Not shaped as expected (never seen): line by line.
    pairs: list[tuple[str, str]] = []
    head = ""
    for line in text.splitlines():
        if _MAPS_LINE.match(line):
            head = line
        elif line.startswith("VmFlags:") and head:
            pairs.append((head, line[len("VmFlags:"):]))
            head = ""
    return pairs


def smaps_flags(pid: int) -> dict[tuple[int, int], frozenset[str]]:
    """Each mapping's VmFlags, by its (start, end)."""
    with open(f"/proc/{pid}/smaps") as f:
        text = f.read()
    out: dict[tuple[int, int], frozenset[str]] = {}
    for head, flags in _smaps_pairs(text):
        lo, _, hi = head[:head.index(" ")].partition("-")
        out[int(lo, 16), int(hi, 16)] = frozenset(flags.split())
    return out


def read_smaps(pid: int) -> list[MapEntry]:
    """Mappings with their VmFlags (slower than maps: the kernel walks page tables)."""
    return [MapEntry(e.start, e.end, e.prot, e.shared, e.offset, e.dev, e.inode, e.name, flags)
            for e, flags in read_smaps_flags(pid)]


def read_smaps_flags(pid: int) -> list[tuple[MapEntry, frozenset[str]]]:
    """Mappings (without their flags) and their VmFlags, for ``to_vma(entry, flags)``."""
    with open(f"/proc/{pid}/smaps") as f:
        text = f.read()
    pairs = _smaps_pairs(text)
    entries = parse_maps("\n".join(head for head, _ in pairs))
    return [(e, frozenset(f.split())) for e, (_, f) in zip(entries, pairs)]


class LayoutCache:
    """One process's mapping records (``Vma``) as its last smaps read made them, by (maps
    line, VmFlags): a read of the same process again (frozen, after a read while it ran)
    makes records only for the mappings that changed since. Records of files and of SysV
    segments are made at every read: they carry what the file or the segment is then."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], Vma] = {}

    def read(self, pid: int) -> tuple[Vma, ...]:
        with open(f"/proc/{pid}/smaps") as f:
            text = f.read()
        pairs = _smaps_pairs(text)
        missing = [pair for pair in pairs if pair not in self._records]
        entries = parse_maps("\n".join(head for head, _ in missing))
        made = {pair: to_vma(e, frozenset(pair[1].split())) for pair, e in zip(missing, entries)}
        records = tuple(self._records.get(pair) or made[pair] for pair in pairs)
        self._records = {pair: v for pair, v in zip(pairs, records) if v.kind != "file" and v.shm is None}
        return records


def to_vma(entry: MapEntry, vmflags: frozenset[str] | None = None) -> Vma:
    """The record of a mapping, with its VmFlags (``vmflags``, else the entry's own)."""
    if vmflags is None:
        vmflags = entry.vmflags
    kind = entry.kind
    advice = 0
    for flag, bit in _ADVICE_FLAGS.items():
        if flag in vmflags:
            advice |= bit
    path = ""
    size, mtime = -1, 0
    if kind == "file":
        path = entry.name
        try:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            pass
    # A SysV segment's inode is its id (its line in /proc/sysvipc/shm); one removed since the
    # maps were read is described by the mapping alone.
    shm = sysv.segment(entry.inode) if sysv.is_sysv(entry.name, entry.shared) else None
    return Vma(
        start=entry.start, end=entry.end, prot=entry.prot, shared=entry.shared, kind=kind, path=path,
        pgoff=entry.offset if kind == "file" or entry.shared else 0,
        growsdown="gd" in vmflags or kind == "stack", advice=advice, file_size=size, file_mtime_ns=mtime,
        ino=entry.inode if kind == "file" or entry.shared else 0, shm=shm)


def is_special(vma: Vma) -> bool:
    return vma.kind in ("vdso", "vvar", "vvar_vclock", "vsyscall")


def holds_private_data(vma: Vma) -> bool:
    """Can this mapping hold pages that exist only in the process's memory?"""
    if is_special(vma):
        return False
    if vma.kind == "file" and vma.shared:
        return False     # the file itself holds them
    return True


def trackable(entry: MapEntry) -> bool:
    """``holds_private_data`` for a maps line (no stat of the file): pages a tracker must follow.
    A memfd mapped shared is not followed either: the memfd is carried whole while the job is
    frozen (``agent.carried_files``) and the mapping made again from it on the destination."""
    kind = entry.kind
    if kind in ("vdso", "vvar", "vvar_vclock", "vsyscall"):
        return False
    if entry.shared and entry.name.startswith(MEMFD_PREFIX):
        return False
    return not (kind == "file" and entry.shared)


def private_file_spans(entries: Iterable[MapEntry]) -> list[Span]:
    """The address ranges of the private file mappings among ``entries``, merged: where an
    empty page reads as the file's page, not as zeros."""
    return merge_spans((e.start, e.end) for e in entries if e.kind == "file" and not e.shared)


def same_backing(a: MapEntry, b: MapEntry) -> bool:
    """Could ``b`` be (part of) the same memory as ``a``, seen at another time?"""
    if a.shared != b.shared:
        return False
    if a.inode == 0 and b.inode == 0:
        return True
    return a.inode == b.inode and a.dev == b.dev and a.offset - a.start == b.offset - b.start


@frozen
class LayoutChange:
    """How an address space changed between two reads of its maps.

    ``added``, ``grown`` and ``reprotected`` hold current entries; ``removed`` and ``shrunk``
    hold entries of the earlier read. ``new_spans`` are the address ranges whose contents are
    new (added mappings and the grown parts): every populated page there counts as dirty.
    """

    added: tuple[MapEntry, ...] = ()
    removed: tuple[MapEntry, ...] = ()
    grown: tuple[MapEntry, ...] = ()
    shrunk: tuple[MapEntry, ...] = ()
    reprotected: tuple[MapEntry, ...] = ()
    new_spans: tuple[Span, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.grown or self.shrunk or self.reprotected)

    def counts(self) -> dict[str, int]:
        return {"added": len(self.added), "removed": len(self.removed), "grown": len(self.grown),
                "shrunk": len(self.shrunk), "reprotected": len(self.reprotected)}


def _overlaps(a: list[MapEntry], b: list[MapEntry]) -> list[list[MapEntry]]:
    """For each entry of ``a`` (sorted), the entries of ``b`` (sorted) with the same backing that overlap it."""
    out: list[list[MapEntry]] = []
    j = 0
    for x in a:
        while j < len(b) and b[j].end <= x.start:
            j += 1
        hits: list[MapEntry] = []
        k = j
        while k < len(b) and b[k].start < x.end:
            if same_backing(x, b[k]):
                hits.append(b[k])
            k += 1
        out.append(hits)
    return out


def _covered(x: MapEntry, hits: list[MapEntry]) -> list[Span]:
    return intersect_spans([(x.start, x.end)], merge_spans((h.start, h.end) for h in hits))


def diff_layout(old: list[MapEntry], new: list[MapEntry]) -> LayoutChange:
    """Classify the differences between two sorted maps reads (linear in their length, and in
    what differs only where the reads share their unchanged entries, as ``read_maps`` with a cache gives).

    An entry both reads hold (the same object) takes no part: the other entries of either
    read cannot overlap it, so it is covered by itself alone, unchanged."""
    if len(old) == len(new) and all(map(operator.is_, old, new)):
        return LayoutChange()
    if old and new:
        both = {id(e) for e in old}.intersection(map(id, new))
        if both:
            if len(both) == len(old) == len(new):
                return LayoutChange()
            old = [e for e in old if id(e) not in both]
            new = [e for e in new if id(e) not in both]
    added: list[MapEntry] = []
    grown: list[MapEntry] = []
    reprotected: list[MapEntry] = []
    new_spans: list[Span] = []
    for n, hits in zip(new, _overlaps(new, old)):
        covered = _covered(n, hits)
        if not covered:
            added.append(n)
            new_spans.append((n.start, n.end))
            continue
        fresh = subtract_spans([(n.start, n.end)], covered)
        if fresh:
            grown.append(n)
            new_spans.extend(fresh)
        elif any(h.prot != n.prot for h in hits):
            reprotected.append(n)
    removed: list[MapEntry] = []
    shrunk: list[MapEntry] = []
    for o, hits in zip(old, _overlaps(old, new)):
        covered = _covered(o, hits)
        if not covered:
            removed.append(o)
        elif covered != [(o.start, o.end)]:
            shrunk.append(o)
    return LayoutChange(tuple(added), tuple(removed), tuple(grown), tuple(shrunk), tuple(reprotected),
                        tuple(merge_spans(new_spans)))


Run = tuple[int, int]   # (address, number of pages)


class PageFinder:
    """Finds the pages of each mapping that must be copied: with PAGEMAP_SCAN where the kernel
    has it (``pagemap_scan_works``, unless ``use_scan`` says otherwise), else with
    /proc/PID/pagemap."""

    def __init__(self, pid: int, *, use_scan: bool | None = None) -> None:
        self.pid = pid
        if use_scan is None:
            use_scan = pagemap_scan_works()
        self._scanner: PagemapScanner | None = PagemapScanner(pid) if use_scan else None
        self._pagemap_fd = -1 if use_scan else os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)

    @property
    def scanner(self) -> PagemapScanner | None:
        """The PAGEMAP_SCAN handle (None where the kernel lacks it)."""
        return self._scanner

    @property
    def pagemap_fd(self) -> int:
        """The legacy /proc/PID/pagemap descriptor (only where PAGEMAP_SCAN is missing)."""
        return self._pagemap_fd

    def close(self) -> None:
        if self._scanner is not None:
            self._scanner.close()
        if self._pagemap_fd >= 0:
            os.close(self._pagemap_fd)
            self._pagemap_fd = -1

    def __enter__(self) -> "PageFinder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def populated(self, vma: Vma) -> list[Run]:
        """Runs of pages that hold the process's own data in this mapping."""
        if not holds_private_data(vma):
            return []
        return self.populated_span(vma.start, vma.end, file_backed=vma.kind == "file", shared=vma.shared)

    def populated_entry(self, entry: MapEntry) -> list[Run]:
        """``populated`` for a maps line."""
        if not trackable(entry):
            return []
        return self.populated_span(entry.start, entry.end, file_backed=entry.kind == "file",
                                   shared=entry.shared)

    def populated_span(self, start: int, end: int, *, file_backed: bool, shared: bool = False) -> list[Run]:
        """Populated private pages of [start, end), which lies in one mapping of that kind.

        Only valid where no uffd-wp markers exist: the kernel reports a marker as a swapped page.
        """
        if shared:     # what the object holds (zero pages are dropped later)
            held = self.shared_data(start, end)
            return held if held is not None else [(start, (end - start) // PAGE_SIZE)]
        exclude = PAGE_IS_PFNZERO | (PAGE_IS_FILE if file_backed else 0)
        if self._scanner is not None:
            regions = self._scanner.scan(start, end, required=exclude, inverted=exclude,
                                         anyof=PAGE_IS_PRESENT | PAGE_IS_SWAPPED, returned=PAGE_IS_PRESENT)
            return _merge((r.start, (r.end - r.start) // PAGE_SIZE) for r in regions)
        return self._populated_legacy(start, end, file_backed)

    def shared_data(self, start: int, end: int) -> list[Run] | None:
        """The pages of [start, end), within one MAP_SHARED mapping, where the object mapped
        holds data (in memory or swapped out): ``lseek`` SEEK_DATA/SEEK_HOLE on the object,
        opened through /proc/PID/map_files. Its holes read as zeros, and reading one through
        the mapping would allocate it (a 300 MiB shared reservation with two pages written
        became 300 MiB of memory, read and hashed every round). Another process's writes to
        the object count, as they must. None where the object cannot be asked (every page
        is read then)."""
        vma = self._covering(start)
        if vma is None:
            return None
        vstart, vend, offset = vma
        try:
            fd = os.open(f"/proc/{self.pid}/map_files/{vstart:x}-{vend:x}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        runs: list[Run] = []
        try:
            pos, stop = offset + (start - vstart), offset + (min(end, vend) - vstart)
            while pos < stop:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        break                    # no data from pos to the object's end
                    return None
                if data >= stop:
                    break
                hole = min(os.lseek(fd, data, os.SEEK_HOLE), stop)
                first = data - data % PAGE_SIZE
                last = -(-hole // PAGE_SIZE) * PAGE_SIZE
                runs.append((vstart + first - offset, (last - first) // PAGE_SIZE))
                pos = last
        except OSError:
            return None
        finally:
            os.close(fd)
        return _merge(runs)

    def _covering(self, addr: int) -> tuple[int, int, int] | None:
        """(start, end, file offset) of the mapping that holds ``addr``."""
        try:
            found = query_maps(self.pid, start=addr, end=addr + PAGE_SIZE)
            if found is None:
                found = [e for e in read_maps(self.pid) if e.start <= addr < e.end]
        except (OSError, NoSuchProcess):
            return None
        vma = next((e for e in found if e.start <= addr < e.end), None)
        return (vma.start, vma.end, vma.offset) if vma is not None else None

    def _populated_legacy(self, start: int, end: int, file_backed: bool) -> list[Run]:
        entries = read_pagemap(self._pagemap_fd, start, end)
        runs: list[Run] = []
        for i, e in enumerate(entries):
            if not e & (PM_PRESENT | PM_SWAP):
                continue
            if file_backed and e & PM_FILE:
                continue    # still the file's page
            append_run(runs, start + i * PAGE_SIZE)
        return runs


def _merge(runs: Iterable[Run]) -> list[Run]:
    out: list[Run] = []
    for addr, n in runs:
        append_run(out, addr, n)
    return out

