"""Page digests: which pages changed, found by content instead of page tables.

The checksum tracker keeps a digest of every populated page and compares each round; the
uffd-wp tracker does the same for the few mappings it cannot write-protect; trackers that see
a transparent huge page only as a whole keep digests of the small pages they sent from huge
pages, to tell which of them changed (``precopy.hugepages``). A digest is replaced by the
digest of the bytes actually *sent* (``note_sent``), so a page is reported whenever it differs
from what the other side holds, even if it changed while being read.
"""
from __future__ import annotations

import hashlib
import operator
from dataclasses import replace
from typing import Iterable, Sequence

from precopy.intervals import Run, Span, append_run, merge_spans, normalize, pages_of, runs_of, subtract, within
from precopy.layout import MapEntry, PageFinder, private_file_spans, trackable
from precopy.reader import PageReader, split_runs
from transport.frozen import frozen
from transport.pages import PageBatch
from transport.schema import PAGE_SIZE


def _private_runs(entries: list[MapEntry]) -> list[MapEntry]:
    """``entries`` (sorted), with each run of private mappings of one kind (file, or not) that
    follow one another without a gap as one entry spanning them: the kernel finds their
    populated pages in one call (the read-only mappings of a library, for one)."""
    out: list[MapEntry] = []
    for e in entries:
        last = out[-1] if out else None
        if (last is not None and last.end == e.start and not e.shared and not last.shared
                and (e.kind == "file") == (last.kind == "file") and trackable(e) == trackable(last)):
            out[-1] = replace(last, end=e.end)
        else:
            out.append(e)
    return out


def digest(page: bytes | memoryview) -> bytes:
    return hashlib.sha256(page).digest()


@frozen
class DigestScan:
    changed: list[Run]      # populated pages whose contents differ from the last digest (or are unknown)
    gone: list[Run]         # pages that had contents and are empty now
    populated: list[Run]    # every populated page found
    pages_hashed: int
    bytes_read: int


class PageDigests:
    """Digests of the pages of a set of mappings, keyed by page address."""

    def __init__(self) -> None:
        self._digests: dict[int, bytes] = {}
        self._spans: list[Span] = []        # the mappings tracked by content this round
        # While the job is frozen (``precopy.rounds.final_group``): digests of the pages of
        # shared memory objects by (device, inode, offset), for every tracker of the job. Each
        # process that maps an object reads the same bytes there, so only the first to come
        # to a page reads and hashes it; each still compares it with what it last saw itself.
        self.frozen_objects: dict[tuple[tuple[int, int], int, int], bytes] | None = None
        # The last scan's entries and their runs (``_private_runs``), for as long as a
        # tracker's layout stays (entry for entry, as ``read_maps`` with a cache gives it).
        self._runs: tuple[list[MapEntry], list[MapEntry]] | None = None

    def __len__(self) -> int:
        return len(self._digests)

    def _inside(self, addr: int) -> bool:
        return within(self._spans, addr)

    def scan(self, entries: Iterable[MapEntry], finder: PageFinder, reader: PageReader,
             new_spans: Sequence[Span] = ()) -> DigestScan:
        """Read and hash the populated pages of ``entries``; report what changed since the last scan.

        Digests of pages outside ``entries`` are forgotten (those mappings went away, or another
        mechanism tracks them now). ``new_spans`` start out empty at the destination: every page
        found there counts as changed, whatever its digest was (a mapping of another backing may
        hold the same bytes, or the last scan may have read them under an older layout), and
        pages that vanished there are not reported.
        """
        entries = list(entries)
        self._spans = merge_spans((e.start, e.end) for e in entries)
        if new_spans:
            fresh = merge_spans(new_spans)
            for addr in [a for a in self._digests if within(fresh, a)]:
                del self._digests[addr]
        changed: list[Run] = []
        populated: list[Run] = []
        seen: set[int] = set()
        hashed = 0
        before = reader.bytes_read
        objects = self.frozen_objects
        known: list[int] = []          # pages changed, found by another process's digest
        last = self._runs
        if last is None or len(last[0]) != len(entries) or not all(map(operator.is_, last[0], entries)):
            last = self._runs = (entries, _private_runs(entries))
        for e in last[1]:
            runs = finder.populated_entry(e)
            populated += runs
            key = (e.dev, e.inode, e.offset - e.start) if objects is not None and e.shared and e.inode else None
            if key is not None and objects is not None:
                dev, ino, base = key
                unread: list[Run] = []
                for addr, n in runs:
                    for a in range(addr, addr + n * PAGE_SIZE, PAGE_SIZE):
                        d = objects.get((dev, ino, base + a))
                        if d is None:
                            append_run(unread, a)
                            continue
                        seen.add(a)
                        if self._digests.get(a) != d:
                            self._digests[a] = d
                            known.append(a)
                runs = unread
            for group in split_runs(runs, reader.batch_pages):
                batch = reader.read(group)
                hashed += batch.npages
                for addr, data in _pages(batch):
                    seen.add(addr)
                    d = digest(data)
                    if key is not None and objects is not None:
                        objects[(key[0], key[1], key[2] + addr)] = d
                    if self._digests.get(addr) != d:
                        self._digests[addr] = d
                        append_run(changed, addr)
        if known:
            changed = normalize(changed + runs_of(known))
        stale = [addr for addr in self._digests if addr not in seen]
        # An empty page of a private file mapping reads as the file's page: one sent as that
        # (a dropped copy, read again) is still what the other side holds, and is kept.
        files = private_file_spans(entries)
        kept: set[int] = set()
        if stale and files:
            same, hashed_same, _ = self.unchanged(runs_of(a for a in stale if self._inside(a) and within(files, a)),
                                                  reader)
            hashed += hashed_same
            kept = pages_of(same)
        gone: list[int] = []
        for addr in stale:
            if addr in kept:
                continue
            if self._inside(addr):
                gone.append(addr)
            del self._digests[addr]
        return DigestScan(changed, subtract(runs_of(gone), _as_runs(new_spans)), populated, hashed,
                          reader.bytes_read - before)

    def follow(self, spans: Sequence[Span], new_spans: Sequence[Span] = ()) -> None:
        """Remember sent pages of ``spans`` from now on; forget digests outside them, and
        inside ``new_spans`` (ranges that start out empty at the destination)."""
        spans = merge_spans(spans)
        fresh = merge_spans(new_spans)
        if spans == self._spans and not fresh:
            return
        self._spans = spans
        for addr in [a for a in self._digests if not self._inside(a) or within(fresh, a)]:
            del self._digests[addr]

    def forget(self, runs: Iterable[Run]) -> None:
        """The other side holds something else now for these pages (zeros sent for them)."""
        for addr, n in runs:
            for i in range(n):
                self._digests.pop(addr + i * PAGE_SIZE, None)

    def unchanged(self, runs: Iterable[Run], reader: PageReader) -> tuple[list[Run], int, int]:
        """The pages of ``runs`` whose contents are those last sent (their digests match now);
        also the pages hashed and bytes read to find out. Pages without a digest, or that
        cannot be read, are not among them."""
        known: list[Run] = []
        for addr, n in runs:
            for i in range(n):
                a = addr + i * PAGE_SIZE
                if a in self._digests:
                    append_run(known, a)
        same: list[Run] = []
        hashed = 0
        before = reader.bytes_read
        for group in split_runs(known, reader.batch_pages):
            batch = reader.read(group)
            hashed += batch.npages
            for addr, data in _pages(batch):
                if self._digests.get(addr) == digest(data):
                    append_run(same, addr)
        return same, hashed, reader.bytes_read - before

    def note_sent(self, batch: PageBatch) -> None:
        """Remember the digests of pages as sent (only for mappings tracked by content)."""
        if not self._spans:
            return
        for addr, data in _pages(batch):
            if self._inside(addr):
                self._digests[addr] = digest(data)

    def clear(self) -> None:
        self._digests.clear()
        self._spans = []
        self._runs = None


def _pages(batch: PageBatch) -> Iterable[tuple[int, memoryview]]:
    """(address, contents) of each page of ``batch``."""
    view = memoryview(batch.data)
    off = 0
    for addr, n in batch.runs:
        for i in range(n):
            yield addr + i * PAGE_SIZE, view[off: off + PAGE_SIZE]
            off += PAGE_SIZE


def _as_runs(spans: Iterable[Span]) -> list[Run]:
    return [(s, (e - s) // PAGE_SIZE) for s, e in spans]
