"""Transparent huge pages and dirty tracking: which memory huge pages back, and how a tracker
that sees a huge page only as a whole still sends only the 4 KiB pages that changed.

What each tracker sees of a write into a PMD-mapped transparent huge page (THP):

- ``soft-dirty``: the kernel keeps one soft-dirty bit per huge page mapping: a write fault on
  it marks the whole PMD dirty (x86 ``pmd_mkdirty`` sets ``_PAGE_SOFT_DIRTY``), and
  /proc/PID/pagemap repeats the PMD's bit for each of its 512 pages (``pagemap_pmd_range``),
  as ``PAGEMAP_SCAN`` reports it as one 2 MiB region (``pagemap_scan_thp_entry``). One 4 KiB
  write reads as 2 MiB written. ``clear_refs`` keeps the huge page mapped whole
  (``clear_soft_dirty_pmd``), so this repeats every round.
- ``uffd-wp`` (asynchronous): a scan that write-protects a whole huge page protects its PMD
  (``make_uffd_wp_pmd``); the first write to it then splits the PMD into 512 page-table
  entries (``wp_huge_pmd``: ``userfaultfd_wp_async`` -> split) and only the written entry
  loses its protection. After round 0, written pages are reported exactly; the price is that
  a huge page the job writes while tracked is mapped by small pages from then on (the memory
  stays one folio; khugepaged does not collapse ranges holding uffd-wp entries).
- ``checksum``: a digest per 4 KiB page: exact, whatever backs it.

For the trackers of the first kind (``reports_whole_huge_pages``), ``HugePageNarrowing`` keeps a
digest (``PageDigests``) of every page sent from memory that huge pages back, and drops from a
round's answer the pages of such memory whose contents are still those sent. That costs a
hash of each such page as it is sent, and a read and a hash of the reported pages of huge
pages at each scan; pages that changed are never dropped (SHA-256), and a page that changes
after the comparison is written after the tracker's clear, so the next scan reports it again.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Sequence

from precopy.digests import PageDigests
from precopy.intervals import Run, Span, clip, merge_spans, subtract
from precopy.layout import MapEntry
from precopy.pagemap import PAGE_IS_HUGE, PagemapScanner
from precopy.reader import PageReader
from transport.pages import PageBatch

HUGE = 2 << 20          # a PMD-mapped transparent huge page on x86_64
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")

_SMAPS_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")


def thp_setting() -> str:
    """The system's THP mode (``always``, ``madvise``, ``never``), or ``unsupported``."""
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return "unsupported"
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else "unsupported"


def anon_huge_bytes(pid: int) -> dict[Span, int]:
    """Bytes of each mapping that transparent huge pages back (smaps ``AnonHugePages``)."""
    out: dict[Span, int] = {}
    span: Span | None = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = _SMAPS_HEADER.match(line)
            if m:
                span = (int(m.group(1), 16), int(m.group(2), 16))
            elif span is not None and line.startswith("AnonHugePages:"):
                kib = int(line.split()[1])
                if kib:
                    out[span] = kib * 1024
    return out


def _may_hold_huge(e: MapEntry) -> bool:
    # Private anonymous memory (heap and stack included); a private file mapping's own pages
    # are copies made by writes, small ones.
    return not e.shared and e.kind != "file" and e.length >= HUGE


def huge_spans(pid: int, entries: Iterable[MapEntry], scanner: PagemapScanner | None) -> list[Span]:
    """The parts of ``entries`` that PMD-mapped huge pages back now.

    With ``PAGEMAP_SCAN`` the kernel says so page by page (``PAGE_IS_HUGE``). Without it, a
    mapping whose smaps count ``AnonHugePages`` is taken as huge-page backed in each of its
    whole aligned 2 MiB blocks: a block that is not costs a digest per page sent, no more."""
    candidates = [e for e in entries if _may_hold_huge(e)]
    if not candidates:
        return []
    found: list[Span] = []
    if scanner is not None:
        for e in candidates:
            found += [(r.start, r.end) for r in scanner.scan(e.start, e.end, required=PAGE_IS_HUGE,
                                                              returned=PAGE_IS_HUGE)]
        return merge_spans(found)
    backed = anon_huge_bytes(pid)
    for e in candidates:
        if not any(s < e.end and t > e.start for (s, t) in backed):
            continue
        start = (e.start + HUGE - 1) & ~(HUGE - 1)
        end = e.end & ~(HUGE - 1)
        if start < end:
            found.append((start, end))
    return merge_spans(found)


class HugePageNarrowing:
    """Narrows a tracker's answers for huge-page backed memory to the small pages that changed."""

    def __init__(self) -> None:
        self._digests = PageDigests()
        self.huge: list[Span] = []          # huge-page backed memory at the last scan

    def __len__(self) -> int:
        return len(self._digests)

    def narrow(self, data: Sequence[Run], zero: Sequence[Run], huge: list[Span], new_spans: Sequence[Span],
               reader: PageReader) -> tuple[list[Run], int, int]:
        """``data`` without the pages of huge pages still holding what was sent; also the pages
        hashed and bytes read for that. ``huge`` is what huge pages back now, ``zero`` the pages
        this scan sends as zeros, ``new_spans`` the ranges new to this scan's layout."""
        self.huge = huge
        self._digests.follow(huge, new_spans)
        self._digests.forget(zero)
        same, hashed, read = self._digests.unchanged(clip(data, huge), reader)
        return (subtract(data, same) if same else list(data)), hashed, read

    def note_sent(self, batch: PageBatch) -> None:
        self._digests.note_sent(batch)

    def clear(self) -> None:
        self._digests.clear()
        self.huge = []
