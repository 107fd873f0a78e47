"""SentLayout: the layout goes whole once, then as what changed; flags come from smaps only
where the change cannot tell them (a real mapping of this process, changed by mprotect and
madvise)."""
from __future__ import annotations

import ctypes
import mmap
import os
import signal
from pathlib import Path

import pytest

from agent.layout_plan import applied
from precopy import layout_delta
from precopy.layout import MapsCache, read_maps
from precopy.layout import smaps_flags as real_flags
from precopy.layout_delta import SentLayout
from tests._tracking import stop_process
from tests._workloads import Workload
from transport.schema import (
    ADV_DONTDUMP,
    ADV_DONTFORK,
    PAGE_SIZE,
    Mappings,
    MappingsDelta,
)

P = PAGE_SIZE
libc = ctypes.CDLL(None, use_errno=True)
MADV_DONTFORK, MADV_DONTDUMP = 10, 16


def _call(name: str, addr: int, length: int, arg: int) -> None:
    fn = getattr(libc, name)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if fn(addr, length, arg) != 0:
        raise OSError(ctypes.get_errno(), name)


def test_changes_go_as_deltas_with_flags_inherited_or_read(monkeypatch: pytest.MonkeyPatch) -> None:
    region = mmap.mmap(-1, 8 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    try:
        _call("madvise", addr, 8 * P, MADV_DONTFORK)
        cache = MapsCache()
        sent = SentLayout(os.getpid())
        whole = sent.record(read_maps(os.getpid(), cache))
        assert isinstance(whole, Mappings) and sent.smaps_reads == 1
        vmas = list(whole.vmas)
        assert any(v.start == addr and v.advice & ADV_DONTFORK for v in vmas)

        # mprotect splits it: the pieces keep DONTFORK without a look at smaps (which is made
        # to know nothing of them here: this process maps other things meanwhile).
        def smaps_blind(pid: int) -> dict[tuple[int, int], frozenset[str]]:
            return {k: v for k, v in real_flags(pid).items() if not addr <= k[0] < addr + 8 * P}

        monkeypatch.setattr(layout_delta, "smaps_flags", smaps_blind)
        _call("mprotect", addr + 2 * P, 2 * P, mmap.PROT_READ)
        delta = sent.record(read_maps(os.getpid(), cache))
        monkeypatch.undo()
        assert isinstance(delta, MappingsDelta)
        # (cleared as a whole: with a neighbour the mapping merged with meanwhile, if one did)
        assert any(r.start <= addr and addr + 8 * P <= r.end for r in delta.cleared), delta.cleared
        ours = [v for v in delta.vmas if addr <= v.start < addr + 8 * P]
        assert [(v.start - addr, v.end - addr, v.prot) for v in ours] == [(0, 2 * P, 3), (2 * P, 4 * P, 1),
                                                                         (4 * P, 8 * P, 3)]
        assert all(v.advice & ADV_DONTFORK for v in ours)
        vmas = applied(vmas, delta)

        # madvise splits a piece with nothing else to show: smaps says which flag changed.
        _call("madvise", addr + 6 * P, 2 * P, MADV_DONTDUMP)
        delta = sent.record(read_maps(os.getpid(), cache))
        assert isinstance(delta, MappingsDelta) and sent.smaps_reads >= 2
        ours = [v for v in delta.vmas if addr <= v.start < addr + 8 * P]
        assert [(v.start - addr, v.end - addr, bool(v.advice & ADV_DONTDUMP)) for v in ours] == [
            (4 * P, 6 * P, False), (6 * P, 8 * P, True)]
        vmas = applied(vmas, delta)
        # The deltas, applied, give the layout as a whole read now does.
        now = SentLayout(os.getpid()).record(read_maps(os.getpid()))
        assert isinstance(now, Mappings)
        mine = [(v.start, v.end, v.prot, v.advice) for v in vmas if addr <= v.start < addr + 8 * P]
        assert mine == [(v.start, v.end, v.prot, v.advice) for v in now.vmas if addr <= v.start < addr + 8 * P]
    finally:
        region.close()


def test_deltas_of_a_churning_layout_add_up_to_the_layout(tmp_path: Path) -> None:
    """A process unmapping, mapping again, reprotecting and emptying its mappings all the time:
    its layout sent whole and then as forty changes (flags inherited, or read from smaps, also
    where smaps no longer lists a mapping of the maps read before it), and a last change once
    it is stopped, is the layout a whole read of the stopped process gives, advice included."""
    w = Workload("many_maps", tmp_path, "2000", "8", "20", "0")
    w.start()
    w.wait_ready()
    try:
        cache = MapsCache()
        sent = SentLayout(w.pid)
        first = sent.record(read_maps(w.pid, cache))
        assert isinstance(first, Mappings)
        vmas = list(first.vmas)
        changes = 0
        for _ in range(40):
            rec = sent.record(read_maps(w.pid, cache))
            if rec is not None:
                assert isinstance(rec, MappingsDelta)
                vmas = applied(vmas, rec)
                changes += 1
        stop_process(w.pid)
        rec = sent.record(read_maps(w.pid, cache))
        if rec is not None:
            vmas = applied(vmas, rec)
        whole = SentLayout(w.pid).record(read_maps(w.pid))
        assert isinstance(whole, Mappings)
        assert changes > 0, "the layout never changed"
        assert vmas == list(whole.vmas)
    finally:
        os.kill(w.pid, signal.SIGKILL)
        w.reap_original()


def test_a_stale_line_of_a_listing_taken_mid_change_costs_no_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel lists a running process's mappings a page of text at a time: an mprotect
    between two pages can show one mapping twice, before and after (seen in a churning
    process: [X] and [X+Y merged], overlapping). When the stale line goes, the change must not
    clear the part of the merged mapping it overlapped from the destination's layout."""
    from precopy.layout import MapEntry

    def anon(start: int, end: int, prot: int) -> MapEntry:
        return MapEntry(start, end, prot, False, 0, (0, 0), 0, "")

    base = 0x7F00_0000_0000
    x, y = anon(base, base + 2 * P, 1), anon(base + 2 * P, base + 6 * P, 3)
    z = anon(base, base + 6 * P, 1)                       # y made read-only: merged with x
    monkeypatch.setattr(layout_delta, "smaps_flags", lambda pid: {(e.start, e.end): frozenset()
                                                                  for e in (x, y, z)})
    sent = SentLayout(os.getpid())
    first = sent.record([x, y])
    assert isinstance(first, Mappings)
    vmas = list(first.vmas)
    for listing in ([x, z], [z]):                         # mid-change (x stale), then stopped
        delta = sent.record(listing)
        assert isinstance(delta, MappingsDelta)
        vmas = applied(vmas, delta)
    assert [(v.start, v.end, v.prot) for v in vmas] == [(z.start, z.end, 1)]
