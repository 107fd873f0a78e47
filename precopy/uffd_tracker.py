"""The uffd-wp dirty tracker: a userfaultfd created inside the target write-protects its
writable private mappings asynchronously (UFFD_FEATURE_WP_ASYNC: the target never blocks),
and one PAGEMAP_SCAN per mapping reports the pages written since and protects them again.
Mappings it cannot register are tracked by content (``PageDigests``).

The process runs on while it is tracked, so nothing here trusts a maps read to still be the
layout: what is registered is asked of the page tables (``PAGE_IS_WPALLOWED``), and new ranges
are registered whole, with the process held still for that instant.
"""
from __future__ import annotations

import bisect
import errno
import operator
from dataclasses import replace

from precopy import uffd as uffd_mod
from precopy.control import ProcessControl
from precopy.digests import PageDigests
from precopy.intervals import (
    Run,
    Span,
    SpanIndex,
    add_runs,
    clip,
    intersect_spans,
    merge_spans,
    normalize,
    subtract,
    subtract_spans,
    to_runs,
    to_spans,
)
from precopy.layout import LayoutChange, MapEntry, read_maps
from precopy.pagemap import (
    PAGE_IS_FILE,
    PAGE_IS_PFNZERO,
    PAGE_IS_PRESENT,
    PAGE_IS_SWAPPED,
    PAGE_IS_WPALLOWED,
    PAGE_IS_WRITTEN,
    PM_SCAN_WP_MATCHING,
    PagemapScanner,
    Region,
)
from precopy.tracker import _POPULATED, DirtyTracker
from transport.errors import UnsupportedResource
from transport.frozen import frozen
from transport.pages import PageBatch
from transport.schema import PAGE_SIZE, PROT_READ, PROT_WRITE

_CATEGORIES = PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO | PAGE_IS_FILE


def _split_regions(entry: MapEntry, regions: list[Region], fresh: list[Span]) -> tuple[list[Span], list[Span]]:
    """Written regions of one mapping -> (pages to read, pages now empty).

    A page is read when populated and private (not the zero page; in a file mapping, not still
    the file's page). Written but unpopulated pages are empty now (zapped), except inside
    ``fresh`` spans (new address ranges: they simply were never populated).
    """
    file_backed = entry.kind == "file"
    data: list[Span] = []
    empty: list[Span] = []
    for r in regions:
        cats = r.categories
        populated = bool(cats & _POPULATED) and not cats & PAGE_IS_PFNZERO
        if file_backed and cats & PAGE_IS_FILE:
            continue            # still the file's own page
        if populated:
            data.append((r.start, r.end))
        else:
            empty.append((r.start, r.end))
    if empty and fresh:
        empty = subtract_spans(merge_spans(empty), fresh)
    return data, empty


def _stretched(part: MapEntry, now: list[MapEntry], starts: list[int]) -> MapEntry:
    """``part`` widened to the whole of the writable mappings of ``now`` that hold its first
    and its last page (``now`` sorted by address, as the kernel lists it; ``starts``: their
    start addresses)."""
    start, end = part.start, part.end
    for addr in (part.start, part.end - PAGE_SIZE):
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0 and now[i].end > addr and now[i].prot & PROT_WRITE and not now[i].shared:
            start, end = min(start, now[i].start), max(end, now[i].end)
    return part if (start, end) == (part.start, part.end) else replace(part, start=start, end=end)


def _file_runs(entries: list[MapEntry], fresh: dict[int, MapEntry]) -> list[MapEntry]:
    """``entries`` (sorted), with each run of file mappings that follow one another without a
    gap, none of them new (in ``fresh``, by id), as one entry spanning them: what a round asks
    of a file mapping (``_wp_scan``, ``_reverted``) depends only on its being one, and the
    kernel walks the run in one call (a library's five mappings in one)."""
    out: list[MapEntry] = []
    joinable = False
    for e in entries:
        mine = e.kind == "file" and id(e) not in fresh
        if mine and joinable and out[-1].end == e.start:
            out[-1] = replace(out[-1], end=e.end)
        else:
            out.append(e)
        joinable = mine
    return out


def _protectable(entry: MapEntry) -> bool:
    """Tracked by write-protection (else by content): private mappings that are writable, and
    anonymous ones that are readable. A read-only anonymous mapping (written, then protected:
    data made read-only, JIT code) changes only through the layout (mprotect), by MADV_DONTNEED
    or by a debugger's forced write; write-protected, a round costs it nothing, where by
    content every round reads and hashes all of it, frozen time included. Mappings that are
    not accessible at all (PROT_NONE: guard pages, address space reserved for later) hold no
    pages to speak of, and arming the holes of a large reservation would fill page tables."""
    if entry.shared:
        return False
    return bool(entry.prot & PROT_WRITE) or (entry.kind != "file" and bool(entry.prot & PROT_READ))


@frozen
class _Shape:
    """What a round needs of one maps read, worked out once for as long as the layout stays
    (the rule from one round to the next): the address ranges it covers, the anonymous ones
    (walked together) and the file mappings (walked one by one: their pages may be the file's)."""

    entries: list[MapEntry]
    starts: list[int]
    tracked: list[Span]
    plain: list[Span]
    files: list[MapEntry]
    file_runs: list[MapEntry]      # ``files``, those that follow one another as one (``_file_runs``)
    pages: int

    @staticmethod
    def of(entries: list[MapEntry]) -> "_Shape":
        plain: list[Span] = []
        files: list[MapEntry] = []
        for e in entries:
            if e.kind == "file":
                files.append(e)
            else:
                plain.append((e.start, e.end))
        return _Shape(entries, [e.start for e in entries], merge_spans((e.start, e.end) for e in entries),
                      merge_spans(plain), files, _file_runs(files, {}), sum(e.length for e in entries) // PAGE_SIZE)

    def overlapping(self, start: int, end: int) -> list[MapEntry]:
        """The entries that overlap [start, end) (a bisect, then those)."""
        i = max(bisect.bisect_right(self.starts, start) - 1, 0)
        out: list[MapEntry] = []
        while i < len(self.entries) and self.entries[i].start < end:
            if self.entries[i].end > start:
                out.append(self.entries[i])
            i += 1
        return out

    def pieces(self, spans: list[Span]) -> list[MapEntry]:
        """The parts of the entries inside ``spans`` (sorted, disjoint): an entry wholly inside
        is itself."""
        out: list[MapEntry] = []
        for start, end in spans:
            for e in self.overlapping(start, end):
                s, t = max(start, e.start), min(end, e.end)
                out.append(e if (s, t) == (e.start, e.end) else replace(e, start=s, end=t))
        return out


class UffdWpTracker(DirtyTracker):
    """Exact for transparent huge pages too: a write to a write-protected huge page splits its
    mapping and unprotects only the written page (``precopy.hugepages``)."""

    name = "uffd-wp"

    def __init__(self, pid: int, control: ProcessControl | None = None) -> None:
        if control is None:
            raise ValueError("the uffd-wp tracker needs a ProcessControl to create its userfaultfd in the target")
        self._uffd: uffd_mod.Userfaultfd | None = None     # set before the base class's cleanup may look
        self._digests = PageDigests()      # mappings that are not write-protected
        super().__init__(pid, control)
        self._known: list[Run] = []        # pages populated as far as the scans showed
        self._shape: _Shape | None = None   # of the last round's layout

    def _arm(self, entries: list[MapEntry]) -> tuple[list[Run], int, int]:
        assert self.control is not None
        with self.control.injected() as remote:
            self._uffd = uffd_mod.open_in_target(remote, self._pidfd)
        self._uffd.api()
        data, _, scanned, read = self._track(entries, (), first=True)
        return data, scanned, read

    def _scan(self, entries: list[MapEntry], change: LayoutChange) -> tuple[list[Run], list[Run], int, int]:
        return self._track(entries, change.new_spans, first=False)

    @property
    def _scanner(self) -> PagemapScanner:
        scanner = self.finder.scanner
        assert scanner is not None, "uffd-wp needs PAGEMAP_SCAN"
        return scanner

    def _wp_scan(self, entry: MapEntry) -> list[Region]:
        """Report and re-protect the written pages of the registered mappings in ``entry``'s range.

        Without ``PM_SCAN_CHECK_WPASYNC`` the kernel skips the mappings we have not registered
        and leaves them untouched (``_registration`` finds those). With it, the scan would fail
        with EPERM at the first one, *after* re-protecting the pages of the registered mappings
        before it, whose written state it then throws away with the rest of its answer: the maps
        read a moment earlier may be stale (a MAP_FIXED mmap has split the mapping since), so
        that would lose writes."""
        return self._scanner.scan(entry.start, entry.end, required=PAGE_IS_WRITTEN, returned=_CATEGORIES,
                                  flags=PM_SCAN_WP_MATCHING)

    def _written(self, start: int, end: int) -> list[Span]:
        """The written pages of the registered anonymous mappings in [start, end), re-protected.

        Asking for the written bit alone, with nothing else returned, takes the kernel's fast
        path (a test of each entry's uffd-wp bit; 0.3 ms per GiB here, against 9 ms for a walk
        that also classifies pages). Every hole of a mapping armed once holds a uffd-wp marker,
        so the only unprotected empty entries it can meet are pages zapped since (MADV_DONTNEED):
        those are read like the rest, as the zeros they now hold. File mappings, and new ranges
        (whose holes are not marked yet), take ``_wp_scan``, which tells such pages apart."""
        return [(r.start, r.end) for r in self._scanner.scan(
            start, end, required=PAGE_IS_WRITTEN, returned=PAGE_IS_WRITTEN, flags=PM_SCAN_WP_MATCHING)]

    def _registration(self, spans: list[Span], *, registered: bool) -> list[Span]:
        """The parts of ``spans`` whose mappings are (``registered``) or are not write-protected
        by our userfaultfd, as the kernel has them now. Not: new mappings, moved ones (mremap
        drops the registration and the pages' protection), and those we track by content."""
        inverted = 0 if registered else PAGE_IS_WPALLOWED
        found: list[Span] = []
        for start, end in spans:
            found += [(r.start, r.end) for r in self._scanner.scan(
                start, end, required=PAGE_IS_WPALLOWED, inverted=inverted, returned=PAGE_IS_WPALLOWED)]
        return merge_spans(found)

    def _arm_parts(self, parts: list[MapEntry], *, first: bool) -> set[Span]:
        """Register ``parts`` and clear any write-protection the page tables of what was not
        registered still carry, so that the next scans report every populated page of them;
        the spans of the parts that are registered now (the others cannot be: tracked by
        content).

        A part comes from a maps read the process may have outgrown since (brk, mremap in
        place, mprotect joining a neighbour). A registration that ends inside a mapping splits
        it there, and until the next round registers the rest the process's own mremap() of the
        mapping fails (EFAULT: a range across two mappings). So the registrations are made with
        the process held still, against a maps read taken then, and cover the mappings at
        either end of a part whole; what lies beyond a part is new to this round's layout and
        reported by the next round as such. The hold covers the registrations only (ioctls on
        mappings); clearing protection walks page tables, so it comes after, which is safe: a
        write meanwhile clears a page's protection itself.

        A mapping can lose its registration without moving: mremap() of a registered mapping
        next to a registered neighbour of the same flags (another piece of one original mapping)
        merges the moved range into the neighbour, and then, as we do not ask for
        UFFD_FEATURE_EVENT_REMAP, drops the userfaultfd context of the whole merged mapping. The
        neighbour's page-table entries keep their uffd-wp bits and markers, and a write there
        meanwhile makes its entry writable without clearing the bit: registered again as it is,
        such a page would never read as written. Only what was not registered is cleared:
        clearing registered pages would lose the record of their writes."""
        if not parts:
            return set()
        assert self.control is not None and self._uffd is not None
        armed: set[Span] = set()
        clear: list[Span] = []
        with self.control.paused():
            now = read_maps(self.pid, self._maps)     # (what changed since the round's read is parsed)
            starts = [e.start for e in now]
            for part in parts:
                whole = _stretched(part, now, starts)
                span = [(whole.start, whole.end)]
                # (the first round: nothing of ours was registered)
                before = span if first else self._registration(span, registered=False)
                if whole != part and self._register(whole):
                    done = whole
                elif self._register(part):
                    done = part
                else:
                    continue
                armed.add((part.start, part.end))
                clear += intersect_spans(before, [(done.start, done.end)])
        self._clear_protection(merge_spans(clear))
        return armed

    def _clear_protection(self, spans: list[Span]) -> None:
        assert self._uffd is not None
        for _ in range(8):
            try:
                for start, end in self._registration(spans, registered=True):
                    self._uffd.writeprotect(start, end, protect=False)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EAGAIN):
                    raise
                # A mapping there changed between the two calls (ENOENT: no longer registered);
                # what is unregistered now waits for the next round.
        raise UnsupportedResource(
            f"pid {self.pid} changes its memory layout faster than write-protection can follow: "
            f"use --tracker checksum", pid=self.pid)

    def _populated_registered(self, entry: MapEntry, spans: list[Span]) -> list[Span]:
        """Populated private pages of ``spans`` (parts of ``entry``) in registered mappings,
        written since the last scan or not (a uffd-wp marker counts as populated: it reads as zeros)."""
        exclude = PAGE_IS_PFNZERO | (PAGE_IS_FILE if entry.kind == "file" else 0)
        out: list[Span] = []
        for start, end in spans:
            out += [(r.start, r.end) for r in self._scanner.scan(
                start, end, required=PAGE_IS_WPALLOWED | exclude, inverted=exclude, anyof=_POPULATED,
                returned=PAGE_IS_PRESENT)]
        return out

    def _register(self, entry: MapEntry) -> bool:
        assert self._uffd is not None
        try:
            self._uffd.register_wp(entry.start, entry.end)
            return True
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise UnsupportedResource(
                    f"pid {self.pid} write-protects its own memory with userfaultfd (mapping at {entry.start:#x}): "
                    f"use --tracker checksum", pid=self.pid) from None
            if exc.errno in (errno.EINVAL, errno.EPERM, errno.ENOMEM, errno.ENOENT):
                return False     # not registrable (or gone meanwhile): tracked by content instead
            raise

    def _reverted(self, entry: MapEntry, known_index: SpanIndex) -> list[Span]:
        """Copied-on-write pages of a private file mapping that went back to the file's page.

        Zapping (MADV_DONTNEED) a write-protected page of a file mapping leaves a uffd-wp marker
        instead of an empty entry, so the page is not reported as written, yet it reads as the
        file's page again. Pages we knew as private that are not private now are read again
        (a swapped-out private page looks like a marker: it is read again too, harmlessly)."""
        known = known_index.clip(entry.start, entry.end)
        if not known:
            return []
        scanner = self.finder.scanner
        assert scanner is not None
        private = [(r.start, r.end) for r in scanner.scan(
            entry.start, entry.end, required=PAGE_IS_PRESENT | PAGE_IS_FILE, inverted=PAGE_IS_FILE,
            returned=PAGE_IS_PRESENT)]
        return subtract_spans(known, merge_spans(private))

    def _shape_of(self, entries: list[MapEntry]) -> "_Shape":
        """The shape of this round's layout: the last round's while its maps read is the same
        (entry for entry, as ``read_maps`` with a cache gives it)."""
        last = self._shape
        if last is not None and len(last.entries) == len(entries) and all(map(operator.is_, last.entries, entries)):
            return last
        self._shape = _Shape.of(entries)
        return self._shape

    def _track(self, entries: list[MapEntry], new_spans: tuple[Span, ...], *, first: bool
               ) -> tuple[list[Run], list[Run], int, int]:
        """One round. ``entries`` come from a maps read that may already be stale: the process
        runs on, so nothing here trusts an entry to be one mapping, or to be the mapping it was.
        What is registered is found from the page tables' own answer (``_registration``).

        A round costs the mappings that changed, not all of them: the anonymous mappings are
        walked together (one call for a run of neighbours; the kernel skips what is not
        registered), what the layout implies is worked out once per layout (``_Shape``), and
        the pages known so far are updated in place."""
        last = self._shape
        shape = self._shape_of(entries)
        data: list[Span] = []
        empty: list[Span] = []
        by_content: list[MapEntry] = []
        known_spans: list[Span] | None = None
        known_at: SpanIndex | None = None

        def known() -> list[Span]:
            nonlocal known_spans
            if known_spans is None:
                known_spans = to_spans(self._known)
            return known_spans

        def known_index() -> SpanIndex:
            nonlocal known_at
            if known_at is None:
                known_at = SpanIndex(known())
            return known_at

        fresh_spans = merge_spans(new_spans)
        fresh_index = SpanIndex(fresh_spans)
        fresh_entries = {id(e): e for s, t in fresh_spans for e in shape.overlapping(s, t)}
        plain = shape.plain
        fresh_anon = merge_spans((e.start, e.end) for e in fresh_entries.values() if e.kind != "file")
        if fresh_anon:
            plain = subtract_spans(plain, fresh_anon)
        # 1. The registered mappings: their written pages, re-protected in the same walk. File
        # mappings that follow one another (a library's, an executable's) in one walk.
        walks = shape.file_runs if not fresh_entries else _file_runs(
            sorted([*fresh_entries.values(), *(f for f in shape.files if id(f) not in fresh_entries)],
                   key=lambda e: e.start), fresh_entries)
        for e in walks:
            fresh = fresh_index.clip(e.start, e.end) if fresh_index else []
            if fresh:
                # New address ranges start out empty at the destination: all their pages travel,
                # also those a scan reported already under an older layout (a mapping replaced
                # by one of another backing between a maps read and its scan). Read before the
                # scan below protects holes with markers.
                data += self._populated_registered(e, fresh)
            d, z = _split_regions(e, self._wp_scan(e), fresh)
            if e.kind == "file" and not first:
                # Empty now: read again as the file's page, and no longer known as a copy.
                z += self._reverted(e, known_index())
            data += d
            empty += z
        for start, end in plain:
            data += self._written(start, end)
        # 2. What is not registered now (after the scans above, so nothing the process unmapped
        # and mapped anew in between escapes): a new mapping, a moved one, or one we never
        # write-protect (inaccessible and read-only file mappings: arming their holes would
        # allocate page tables for nothing). Exactly those ranges are new to the tracker; the
        # rest of an entry is not.
        tracked = shape.tracked
        parts = shape.pieces(intersect_spans(self._registration(tracked, registered=False), tracked))
        # Shared memory goes by content: its pages live in the object (another process's
        # writes, pages no page table of this one maps), not in this process's page tables.
        armed = self._arm_parts([p for p in parts if _protectable(p)], first=first)
        for part in parts:
            start, end = part.start, part.end
            if (start, end) not in armed:
                by_content.append(part)
                continue
            # Just registered and un-protected: this reports every populated page (and protects
            # them all).
            d, _ = _split_regions(part, self._wp_scan(part), [(start, end)])
            data += d
            if not first:
                # Whatever was here before is gone (munmap + mmap, MAP_FIXED, mremap onto it):
                # pages known here that the new mapping lacks are empty now.
                empty += subtract_spans(known_index().clip(start, end), merge_spans(d))
        found = self._digests.scan(by_content, self.finder, self.reader, new_spans)
        emptied: list[Span] = []
        if by_content:
            # Mappings tracked by content may have replaced write-protected ones: pages we knew
            # there that are not populated any more are empty now.
            content_spans = merge_spans((e.start, e.end) for e in by_content)
            emptied = subtract_spans(subtract_spans(intersect_spans(known(), content_spans),
                                                    to_spans(found.populated)), fresh_spans)
        runs = normalize(to_runs(data) + found.changed)
        zero = [] if first else subtract(normalize(to_runs(empty + emptied) + found.gone), runs)
        known_now = add_runs(self._known, runs)
        if zero:
            known_now = subtract(known_now, zero)
        if shape is not last:        # mappings went away: so did what was known of them
            known_now = clip(known_now, tracked)
        self._known = known_now
        return runs, zero, shape.pages + found.pages_hashed, found.bytes_read

    def note_sent(self, batch: PageBatch) -> None:
        super().note_sent(batch)
        self._digests.note_sent(batch)

    def _release(self) -> None:
        # Closing our (only) descriptor unregisters every mapping and clears every protection.
        if self._uffd is not None:
            self._uffd.close()
            self._uffd = None
        self._digests.clear()
