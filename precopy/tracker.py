"""Dirty-page trackers: which pages of a running process were written since the last look.

One interface, three backends, chosen at run time by real probes (``probe_backends``):

- ``uffd-wp`` (``precopy.uffd_tracker``): a userfaultfd created inside the target
  write-protects its writable private mappings asynchronously; one PAGEMAP_SCAN per mapping
  reports written pages and protects them again. Mappings it cannot register are tracked by
  content. Needs Linux >= 6.7.
- ``soft-dirty``: ``clear_refs`` and the pagemap soft-dirty bit (CONFIG_MEM_SOFT_DIRTY). The
  scan and the clear happen with the target paused for that instant, or a write between them
  would be lost.
- ``checksum``: a digest per populated page, compared each round. Works wherever reading the
  process's memory works; costs a full read per round.

A backend that sees a transparent huge page only as a whole (soft-dirty: one bit per huge
page) says so (``reports_whole_huge_pages``); its answers for huge-page backed memory are then
narrowed to the 4 KiB pages whose contents differ from those sent (``precopy.hugepages``).

Every scan (``Scan``) carries the current layout and how it changed, the pages to read and
send (``data``: populated, private, written since the last scan, or in new address ranges) and
the pages that became empty (``zero``: written but no longer populated, e.g. MADV_DONTNEED):
they are sent as zeros. Pages never populated, and private file pages never written, are never
sent.
"""
from __future__ import annotations

import errno
import os
import select
import time
from abc import ABC, abstractmethod
from dataclasses import replace
from typing import ClassVar

from precopy.control import ProcessControl
from precopy.digests import PageDigests
from precopy.hugepages import HugePageNarrowing, huge_spans
from precopy.intervals import (
    Run,
    Span,
    clip,
    intersect,
    merge_spans,
    normalize,
    npages,
    subtract,
    to_runs,
    to_spans,
)
from precopy.kernel import pidfd_open
from precopy.layout_delta import SentLayout
from precopy.layout import (
    LayoutChange,
    MapEntry,
    MapsCache,
    PageFinder,
    diff_layout,
    private_file_spans,
    read_maps,
    trackable,
)
from precopy.pagemap import (
    PAGE_IS_FILE,
    PAGE_IS_PFNZERO,
    PAGE_IS_PRESENT,
    PAGE_IS_SOFT_DIRTY,
    PAGE_IS_SWAPPED,
    PM_FILE,
    PM_PRESENT,
    PM_SOFT_DIRTY,
    PM_SWAP,
    read_pagemap,
)
from precopy.probe import (
    BACKENDS,
    CHOICES,
    Probe,
    TrackerChoice,
    check_target,
    check_trackable,
    choose_tracker,
    probe_backends,
)
from precopy.reader import PageReader
from transport.errors import (
    MigrationError,
    PermissionDenied,
    ProcessExited,
)
from transport.frozen import frozen
from transport.pages import PageBatch
from transport.schema import PAGE_SIZE

__all__ = ["BACKENDS", "CHOICES", "ChecksumTracker", "DirtyTracker", "Probe", "Scan", "SoftDirtyTracker",
           "TrackerChoice", "check_target", "check_trackable", "choose_tracker", "make_tracker",
           "probe_backends", "superseded"]


@frozen
class Scan:
    """One look at the process: its layout and the pages to send."""

    round: int
    layout: tuple[MapEntry, ...]        # every mapping, as /proc/PID/maps lists them
    change: LayoutChange
    data: tuple[Run, ...]               # read these pages and send them
    zero: tuple[Run, ...]               # these pages are empty now: send zeros
    pages_scanned: int                  # pages the tracker examined (page tables or contents)
    bytes_read: int                     # bytes of page contents the tracker itself read
    scan_ms: float
    started: float                      # time.monotonic() when the scan began

    @property
    def pages_dirty(self) -> int:
        return npages(self.data) + npages(self.zero)


def superseded(older: Scan, newer: Scan) -> Scan:
    """``older`` (collected, not sent yet) without the pages ``newer`` reports again.

    Sending ``older`` and then ``newer`` keeps the destination's layout in step with the
    tracker's (each scan's layout changes are relative to the one before), while every page
    travels once, with its newest contents."""
    again = normalize(list(newer.data) + list(newer.zero))
    return replace(older, data=tuple(subtract(older.data, again)), zero=tuple(subtract(older.zero, again)))


# --- the interface -------------------------------------------------------------------------

class DirtyTracker(ABC):
    """Follows one process's writes: ``start`` once, ``collect`` each round, ``stop`` at the end.

    ``start`` arms tracking and returns round 0: every populated page. ``collect`` returns the
    pages written since the previous scan. ``note_sent`` lets a content-based tracker remember
    what the other side now holds. ``stop`` leaves the process exactly as it was. Methods
    block (page-table walks, reads): call them from a worker thread in async code.
    """

    name: ClassVar[str]
    # One dirty bit per transparent huge page: a small write reads as 2 MiB written. Such a
    # backend's answers are narrowed by content (``HugePageNarrowing``).
    reports_whole_huge_pages: ClassVar[bool] = False

    def __init__(self, pid: int, control: ProcessControl | None = None) -> None:
        self.pid = pid
        self.control = control
        self._huge = HugePageNarrowing() if self.reports_whole_huge_pages else None
        self._round = -1
        self._layout: list[MapEntry] = []
        self._maps = MapsCache()
        # Mappings of ours in the process, not its own, left out of every layout read while
        # they are set: a scratch the holder maps at an address chosen beforehand
        # (``agent.inject.Scratch``), for as long as it may be there.
        self.hidden: frozenset[Span] = frozenset()
        self.sent_layout = SentLayout(pid)     # what the destination holds of the layout
        # Its parent's tracker, where its first scan may send the pages that are the parent's
        # very pages as such (``precopy.parent_frames``): a process tracked from the start of
        # a tree's migration, its parent too (the destination forks it right after its
        # parent's first copy, which went out before its own). None: every page goes.
        self.inherits_from: DirtyTracker | None = None
        self._pidfd = -1
        self._finder: PageFinder | None = None
        self._reader: PageReader | None = None
        try:
            self._pidfd = pidfd_open(pid)
            self._finder = PageFinder(pid)
            self._reader = PageReader(pid)
        except OSError as exc:
            self.stop()
            raise self.explain(exc) from None

    def share_frozen_objects(self, objects: dict[tuple[tuple[int, int], int, int], bytes] | None) -> None:
        """While the whole job is frozen: the digests of shared memory pages every tracker of
        it reads and adds to (``PageDigests.frozen_objects``), None after."""
        digests = getattr(self, "_digests", None)
        if isinstance(digests, PageDigests):
            digests.frozen_objects = objects

    # Subclasses fill these in.
    @abstractmethod
    def _arm(self, entries: list[MapEntry]) -> tuple[list[Run], int, int]:
        """Begin tracking; return (every populated page, pages scanned, bytes read)."""

    @abstractmethod
    def _scan(self, entries: list[MapEntry], change: LayoutChange) -> tuple[list[Run], list[Run], int, int]:
        """Return (data, zero, pages scanned, bytes read) since the last scan."""

    def _release(self) -> None:
        """Undo whatever ``_arm`` did to the process."""

    def _rereading(self, runs: list[Run]) -> None:
        """These emptied pages of file or shared mappings are to be read again (after the scan,
        the process running): what they hold then is what the other side gets."""

    # The interface.
    def start(self) -> Scan:
        if self._round >= 0:
            raise RuntimeError("tracker already started")
        return self._look(first=True)

    def collect(self) -> Scan:
        if self._round < 0:
            raise RuntimeError("tracker not started")
        return self._look(first=False)

    def note_sent(self, batch: PageBatch) -> None:
        """The pages of ``batch`` were sent as they are (content-based trackers remember them,
        and so does the narrowing of whole huge pages)."""
        if self._huge is not None:
            self._huge.note_sent(batch)

    def huge_backed(self) -> list[Span]:
        """Memory huge pages backed at the last scan, where this backend's answers are narrowed
        by content (``reports_whole_huge_pages``); else nothing. ``note_sent`` of pages there is
        what lets the next scans tell which of them changed."""
        return list(self._huge.huge) if self._huge is not None else []

    def stop(self) -> None:
        try:
            self._release()
        finally:
            if self._huge is not None:
                self._huge.clear()
            for obj in (self._finder, self._reader):
                if obj is not None:
                    obj.close()
            self._finder = self._reader = None
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1

    def __enter__(self) -> "DirtyTracker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Helpers.
    @property
    def finder(self) -> PageFinder:
        if self._finder is None:
            raise RuntimeError("tracker is stopped")
        return self._finder

    @property
    def reader(self) -> PageReader:
        if self._reader is None:
            raise RuntimeError("tracker is stopped")
        return self._reader

    def exited(self) -> bool:
        if self._pidfd < 0:
            return True
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(0))

    def explain(self, exc: OSError) -> Exception:
        """The error to raise for an OSError met while tracking (the process exited, permission...)."""
        if exc.errno == errno.ESRCH or (exc.errno == errno.ENOENT and not os.path.exists(f"/proc/{self.pid}")) \
                or (self._pidfd >= 0 and self.exited()):
            return ProcessExited(f"process {self.pid} exited while its memory was tracked", pid=self.pid)
        if exc.errno in (errno.EPERM, errno.EACCES):
            return PermissionDenied(f"may not read pid {self.pid}'s memory: run kcr-migrate as the process's owner "
                                    f"or as root", pid=self.pid)
        return exc

    @property
    def layout(self) -> list[MapEntry]:
        """The layout of the last scan (none before the first)."""
        return self._layout

    def _read_layout(self) -> list[MapEntry]:
        entries = read_maps(self.pid, self._maps)
        if self.hidden:
            entries = [e for e in entries if (e.start, e.end) not in self.hidden]
        if not entries:
            raise ProcessExited(f"process {self.pid} exited while its memory was tracked", pid=self.pid)
        return entries

    def _look(self, *, first: bool) -> Scan:
        t0 = time.monotonic()
        if self.exited():
            raise ProcessExited(f"process {self.pid} exited while its memory was tracked", pid=self.pid)
        try:
            entries = self._read_layout()
            tracked = self._maps.tracked(entries)
            if first:
                change = diff_layout([], entries)
                data, scanned, read = self._arm(tracked)
                zero: list[Run] = []
            else:
                change = diff_layout(self._layout, entries)
                data, zero, scanned, read = self._scan(tracked, change)
        except MigrationError:
            raise
        except OSError as exc:
            raise self.explain(exc) from None
        self._layout = entries
        self._round += 1
        data = normalize(data)
        zero = subtract(normalize(zero), data)
        if zero:
            # An emptied page of a file mapping shows the file again, one of a shared mapping
            # lives on in the shared object: read those instead of sending zeros.
            backed = merge_spans((e.start, e.end) for e in entries if trackable(e) and (e.kind == "file" or e.shared))
            reread = clip(zero, backed)
            if reread:
                data = normalize(data + reread)
                zero = subtract(zero, reread)
                self._rereading(reread)
        if self._huge is not None:
            try:
                huge = huge_spans(self.pid, (e for e in entries if trackable(e)), self.finder.scanner)
                data, _, narrowing_read = self._huge.narrow(data, zero, huge, change.new_spans, self.reader)
            except OSError as exc:
                raise self.explain(exc) from None
            read += narrowing_read
        return Scan(self._round, tuple(entries), change, tuple(data), tuple(zero), scanned, read,
                    (time.monotonic() - t0) * 1000, t0)


_POPULATED = PAGE_IS_PRESENT | PAGE_IS_SWAPPED


class SoftDirtyTracker(DirtyTracker):
    """clear_refs + soft-dirty bits; the scan and the clear run with the process paused."""

    name = "soft-dirty"
    reports_whole_huge_pages = True

    def __init__(self, pid: int, control: ProcessControl | None = None) -> None:
        if control is None:
            raise ValueError("the soft-dirty tracker needs a ProcessControl to pause the target while it clears")
        super().__init__(pid, control)
        self._populated: list[Run] = []
        # Emptied pages of file mappings the last scan had read again, and the digests of what
        # was sent of them: see ``_unsettled``.
        self._reread: list[Run] = []
        self._reread_sent = PageDigests()

    def _clear(self) -> None:
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("4")

    def _bits(self, e: MapEntry) -> tuple[list[Run], list[Run]]:
        """(populated private pages, of which soft-dirty) of one mapping."""
        file_backed = e.kind == "file"
        if e.shared:
            whole = [(e.start, e.length // PAGE_SIZE)]
            return whole, whole
        populated: list[Run] = []
        dirty: list[Run] = []
        scanner = self.finder.scanner
        if scanner is not None:
            for r in scanner.scan(e.start, e.end, anyof=_POPULATED, returned=PAGE_IS_SOFT_DIRTY | PAGE_IS_PFNZERO
                                  | PAGE_IS_FILE | _POPULATED):
                if r.categories & PAGE_IS_PFNZERO or (file_backed and r.categories & PAGE_IS_FILE):
                    continue
                run = (r.start, (r.end - r.start) // PAGE_SIZE)
                populated.append(run)
                if r.categories & PAGE_IS_SOFT_DIRTY:
                    dirty.append(run)
            return populated, dirty
        for i, bits in enumerate(read_pagemap(self.finder.pagemap_fd, e.start, e.end)):
            if not bits & (PM_PRESENT | PM_SWAP) or (file_backed and bits & PM_FILE):
                continue
            run = (e.start + i * PAGE_SIZE, 1)
            populated.append(run)
            if bits & PM_SOFT_DIRTY:
                dirty.append(run)
        return populated, dirty

    def _arm(self, entries: list[MapEntry]) -> tuple[list[Run], int, int]:
        assert self.control is not None
        with self.control.paused():
            self._clear()
        populated: list[Run] = []
        for e in entries:
            populated += self.finder.populated_entry(e)
        self._populated = normalize(populated)
        return self._populated, sum(e.length for e in entries) // PAGE_SIZE, 0

    def _scan(self, entries: list[MapEntry], change: LayoutChange) -> tuple[list[Run], list[Run], int, int]:
        assert self.control is not None
        populated: list[Run] = []
        dirty: list[Run] = []
        with self.control.paused():      # a write between scan and clear would be lost
            for e in entries:
                p, d = self._bits(e)
                populated += p
                dirty += d
            populated = normalize(populated)
            unsettled, read = self._unsettled(entries, populated)
            self._clear()
        new_runs = to_runs(change.new_spans)
        dirty = normalize(dirty + intersect(populated, new_runs))
        spans = merge_spans((e.start, e.end) for e in entries)
        gone = subtract(clip(normalize(subtract(self._populated, populated) + unsettled), spans), new_runs)
        self._populated = populated
        return dirty, gone, sum(e.length for e in entries) // PAGE_SIZE, read

    def _rereading(self, runs: list[Run]) -> None:
        self._reread = runs
        self._reread_sent.clear()
        self._reread_sent.follow(to_spans(runs))

    def note_sent(self, batch: PageBatch) -> None:
        super().note_sent(batch)
        self._reread_sent.note_sent(batch)

    def _unsettled(self, entries: list[MapEntry], populated: list[Run]) -> tuple[list[Run], int]:
        """Pages of file mappings the last scan read again as emptied, that are still empty but
        may not hold at the other side what they hold now; and the bytes read to find out.
        Runs with the process paused.

        An emptied page of a private file mapping shows the file's page, and is read again after
        the scan, the process running. If the process copies the page (a write) before that read
        and drops the copy (MADV_DONTNEED) after it, the copy is what was sent, and nothing
        reports the drop: the dropped entry takes its soft-dirty bit with it, and the page was
        not populated at the scan before. So each such page still empty now is read (it shows
        the file's page: the process is paused) and compared with what was sent (a page not
        sent, or not readable, counts as different)."""
        watched, self._reread = self._reread, []
        if not watched:
            return [], 0
        empty = subtract(clip(watched, private_file_spans(entries)), populated)
        same, _, read = self._reread_sent.unchanged(empty, self.reader)
        self._reread_sent.clear()
        return subtract(empty, same), read


class ChecksumTracker(DirtyTracker):
    name = "checksum"

    def __init__(self, pid: int, control: ProcessControl | None = None) -> None:
        super().__init__(pid, control)
        self._digests = PageDigests()

    def _arm(self, entries: list[MapEntry]) -> tuple[list[Run], int, int]:
        found = self._digests.scan(entries, self.finder, self.reader)
        return found.changed, found.pages_hashed, found.bytes_read

    def _scan(self, entries: list[MapEntry], change: LayoutChange) -> tuple[list[Run], list[Run], int, int]:
        found = self._digests.scan(entries, self.finder, self.reader, change.new_spans)
        return found.changed, found.gone, found.pages_hashed, found.bytes_read

    def note_sent(self, batch: PageBatch) -> None:
        super().note_sent(batch)
        self._digests.note_sent(batch)

    def _release(self) -> None:
        self._digests.clear()


def make_tracker(name: str, pid: int, control: ProcessControl | None = None) -> DirtyTracker:
    """A tracker of backend ``name`` (one of ``BACKENDS``) for ``pid``; not started yet."""
    if name == "uffd-wp":
        from precopy.uffd_tracker import UffdWpTracker  # it builds on this module
        return UffdWpTracker(pid, control)
    if name == "soft-dirty":
        return SoftDirtyTracker(pid, control)
    if name == "checksum":
        return ChecksumTracker(pid, control)
    raise ValueError(f"unknown tracker {name!r} (choose from {', '.join(BACKENDS)})")
