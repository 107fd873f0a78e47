"""The layout as the destination is told it: whole once, then as what changed.

A live migration sends a process's layout after every round whose layout changed. With tens
of thousands of mappings, the whole of it each time (a ``Mappings`` record) cost a read of
/proc/PID/smaps, the records' encoding, decoding and a plan over every mapping on the
destination, frozen round included. ``SentLayout`` remembers what was sent, each mapping
with its ``Vma`` record, and turns the next layout into a ``MappingsDelta``: the ranges
whose mappings changed, and the mappings there now.

A mapping's advice flags are only in /proc/PID/smaps, whose listing costs the kernel a walk
of every mapping's page tables (about a second for 50,000 mappings). A new maps line that is
a piece of an old mapping after an mprotect, or the old mapping grown or shrunk, has the
flags of the mapping it came from (the kernel keeps them through those, and merges only
mappings whose flags agree). smaps is read only for the others: mappings new to the layout,
and pieces split off with nothing else changed (an madvise or mlock of part of a mapping).
An madvise that does not split a mapping changes no maps line, and is seen only if its
mapping changes later (as it was before: the layout is read again only when it changed).
"""
from __future__ import annotations

import bisect
import operator
from dataclasses import replace
from typing import Sequence

from precopy.intervals import Span, merge_spans, subtract_spans
from precopy.layout import MapEntry, same_backing, smaps_flags, to_vma
from transport.schema import AddressRange, Mappings, MappingsDelta, Vma

_SPECIAL = ("vdso", "vvar", "vvar_vclock", "vsyscall")


class SentLayout:
    """What one process's destination holds of its layout: the entries last sent (from maps
    reads with a ``MapsCache``, so an unchanged mapping is the same object) and their records."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.entries: Sequence[MapEntry] = ()
        self._vmas: dict[int, Vma] = {}          # by id() of an entry of ``entries``
        # Entries smaps did not list (they changed between the maps read and the smaps read,
        # while the process ran): their flags are a guess until an smaps read lists them, which
        # the next record makes (the last one, with the process frozen, always can).
        self._unsure: dict[int, MapEntry] = {}
        self.smaps_reads = 0

    def vmas(self) -> list[Vma]:
        """The layout the destination holds, as records."""
        return [self._vmas[id(e)] for e in self.entries if id(e) in self._vmas]

    def record(self, entries: Sequence[MapEntry]) -> Mappings | MappingsDelta | None:
        """The record that brings the destination to ``entries``: the whole layout the first
        time (or when the vDSO cluster moved), then the change; None when nothing changed."""
        old = self.entries
        if old and not self._unsure and len(old) == len(entries) and all(map(operator.is_, old, entries)):
            return None
        if old:
            new_ids = {id(e) for e in entries}
            old_ids = {id(e) for e in old}
            gone = [e for e in old if id(e) not in new_ids]
            came = [e for e in entries if id(e) not in old_ids]
            unsure = [e for i, e in self._unsure.items() if i in new_ids and i in old_ids]
            if not gone and not came and not unsure:
                self.entries = entries
                return None
            if not any(e.kind in _SPECIAL for e in (*gone, *came)):
                return self._delta(entries, gone, came, unsure)
        flags = smaps_flags(self.pid)
        self.smaps_reads += 1
        self._unsure = {id(e): e for e in entries if _line_key(e) not in flags}
        self._vmas = {id(e): to_vma(e, flags.get(_line_key(e), frozenset())) for e in entries}
        self.entries = entries
        return Mappings(tuple(self._vmas[id(e)] for e in entries))

    def _delta(self, entries: Sequence[MapEntry], gone: list[MapEntry], came: list[MapEntry],
               unsure: list[MapEntry]) -> MappingsDelta:
        gone_starts = [e.start for e in gone]
        came_starts = [e.start for e in came]
        found: dict[int, Vma] = {}
        unexplained: list[MapEntry] = list(unsure)        # sent again, with the flags smaps gives now
        for n in came:
            donors = [g for g in _overlapping(gone, gone_starts, n.start, n.end) if same_backing(g, n)]
            vma = None if any(id(d) in self._unsure for d in donors) else \
                self._inherited(n, donors, came, came_starts)
            if vma is None:
                unexplained.append(n)
            else:
                found[id(n)] = vma
        for g in gone:
            self._unsure.pop(id(g), None)
        if unexplained:
            flags = smaps_flags(self.pid)
            self.smaps_reads += 1
            for n in unexplained:
                found[id(n)] = to_vma(n, flags.get(_line_key(n), frozenset()))
                if _line_key(n) in flags:
                    self._unsure.pop(id(n), None)
                else:
                    self._unsure[id(n)] = n
        for g in gone:
            del self._vmas[id(g)]
        self._vmas.update(found)
        if unsure:
            came = sorted([*came, *unsure], key=lambda e: e.start)
        cleared = merge_spans([(e.start, e.end) for e in gone] + [(e.start, e.end) for e in came])
        # A line of a listing taken while the process changed its mappings can be stale (the
        # same mapping before and after an mprotect): gone now, it overlaps a mapping that did
        # not change, which the cleared range would take from the destination. Sent again.
        came_ids = {id(e) for e in came}
        again = [e for e in _overlapping_any(entries, cleared) if id(e) not in came_ids]
        if again:
            for e in again:
                found[id(e)] = self._vmas[id(e)]
            came = sorted([*came, *again], key=lambda e: e.start)
            cleared = merge_spans([*cleared, *((e.start, e.end) for e in again)])
        self.entries = entries
        return MappingsDelta(tuple(AddressRange(s, e) for s, e in cleared), tuple(found[id(n)] for n in came))

    def _inherited(self, n: MapEntry, donors: list[MapEntry], came: list[MapEntry],
                   came_starts: list[int]) -> Vma | None:
        """``n``'s record with the flags of the mappings it came from, where the change can
        only have been an mprotect, a growth or a shrink; None where smaps must say."""
        if not donors:
            return None
        first = self._vmas[id(donors[0])]
        if any((self._vmas[id(d)].advice, self._vmas[id(d)].growsdown) != (first.advice, first.growsdown)
               for d in donors[1:]):
            return None
        lo, hi = min(d.start for d in donors), max(d.end for d in donors)
        siblings = [c for c in _overlapping(came, came_starts, lo, hi) if same_backing(donors[0], c)]
        prots = {d.prot for d in donors} | {c.prot for c in siblings}
        was: list[Span] = merge_spans((d.start, d.end) for d in donors)
        now: list[Span] = merge_spans((c.start, c.end) for c in siblings)
        grown = bool(subtract_spans([(n.start, n.end)], was))
        shrunk = bool(subtract_spans(was, now))
        if len(prots) == 1 and not grown and not shrunk:
            return None        # split or merged with nothing else to show: flags may have changed
        return replace(to_vma(n), advice=first.advice, growsdown=first.growsdown)


def _line_key(e: MapEntry) -> tuple[int, int]:
    return e.start, e.end


def _overlapping_any(entries: Sequence[MapEntry], spans: list[Span]) -> list[MapEntry]:
    """The entries (sorted by start) that overlap any of ``spans`` (sorted, disjoint)."""
    out: list[MapEntry] = []
    for s, e in spans:
        # a mapping that starts before s may reach into it: look from the one before
        i = max(bisect.bisect_right(entries, s, key=operator.attrgetter("start")) - 1, 0)
        while i < len(entries) and entries[i].start < e:
            if entries[i].end > s and (not out or out[-1] is not entries[i]):
                out.append(entries[i])
            i += 1
    return out


def _overlapping(entries: list[MapEntry], starts: list[int], start: int, end: int) -> list[MapEntry]:
    """The entries (sorted, disjoint) that overlap [start, end)."""
    i = max(bisect.bisect_right(starts, start) - 1, 0)
    out: list[MapEntry] = []
    while i < len(entries) and entries[i].start < end:
        if entries[i].end > start:
            out.append(entries[i])
        i += 1
    return out
