"""Dirty-page trackers against ground truth: a C writer logs every page it writes.

Each backend must report every written page (no misses, ever); none may report a page of a
stable mapping that was not written (a transparent huge page counts as all of its small pages
for soft-dirty, which tracks it as one: these scans send nothing, and narrowing a huge page to
its changed pages needs what was sent; tests/test_hugepages.py covers that). Backends the kernel lacks are skipped with the probe's
reason (soft-dirty here: no CONFIG_MEM_SOFT_DIRTY).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Iterator

import pytest

from agent.tracer import Tracer
from precopy.intervals import pages_of
from precopy.layout import LayoutChange, MapEntry, diff_layout, parse_maps
from precopy.tracker import (
    BACKENDS,
    Scan,
    check_trackable,
    choose_tracker,
    make_tracker,
    probe_backends,
    superseded,
)
from tests._tracking import (
    HUGE,
    WriterLog,
    backend_params,
    control_for,
    kill_workload,
    stop_process,
    uffd_traces,
    workload,
)
from transport.errors import KernelFeatureMissing, PermissionDenied, ProcessExited, UnsupportedResource
from transport.schema import PAGE_SIZE


@pytest.fixture
def tracer() -> Iterator[Tracer]:
    with Tracer(name="test-tracer") as t:
        yield t


P = PAGE_SIZE


# --- probes and choice ---------------------------------------------------------------------

def test_probes_say_what_works_and_why() -> None:
    probes = probe_backends()
    assert set(probes) == set(BACKENDS)
    for p in probes.values():
        assert p.reason
    assert probes["checksum"].available
    if not probes["soft-dirty"].available:
        assert "soft-dirty" in probes["soft-dirty"].reason


def test_auto_prefers_uffd_wp_and_says_why() -> None:
    choice = choose_tracker("auto")
    probes = probe_backends()
    expected = next(name for name in BACKENDS if probes[name].available)
    assert choice.name == expected
    assert probes[expected].reason in choice.reason
    if probes["uffd-wp"].available:
        assert choice.name == "uffd-wp"


def test_requesting_a_missing_backend_is_one_clear_error() -> None:
    probes = probe_backends()
    missing = [name for name in BACKENDS if not probes[name].available]
    if not missing:
        pytest.skip("every backend works on this kernel")
    with pytest.raises(KernelFeatureMissing, match=f"the {missing[0]} tracker does not work here"):
        choose_tracker(missing[0])
    with pytest.raises(ValueError):
        choose_tracker("bogus")


def test_pinned_memory_is_refused_by_write_protection_trackers(tmp_path: Path) -> None:
    w = workload("dirty_pinned", tmp_path)
    try:
        for name in ("uffd-wp", "soft-dirty"):
            with pytest.raises(UnsupportedResource, match="checksum"):
                check_trackable(w.pid, name)
        check_trackable(w.pid, "checksum")
        choice = choose_tracker("auto", w.pid)
        assert choice.name == "checksum"
        probes = probe_backends()
        if probes["uffd-wp"].available or probes["soft-dirty"].available:   # else none but checksum works
            assert "pinned" in choice.reason or "io_uring" in choice.reason
    finally:
        kill_workload(w)


# --- ground truth --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params())
def test_every_written_page_is_reported_and_no_other(backend: str, tmp_path: Path, tracer: Tracer) -> None:
    # 16 MiB of small pages + 4 MiB of transparent huge pages, 3000 page writes per second.
    w = workload("dirty_writer", tmp_path, "4096", "3000", "11", "4")
    log = WriterLog(w)
    marks: list[int] = []          # log length read just before each scan
    after: list[int] = []          # ... and shortly after it
    scans: list[Scan] = []
    try:
        with make_tracker(backend, w.pid, control_for(w.pid, tracer)) as tracker:
            marks.append(log.length())
            scans.append(tracker.start())
            after.append(log.length())
            for _ in range(5):
                time.sleep(0.08)
                marks.append(log.length())
                scans.append(tracker.collect())
                time.sleep(0.01)
                after.append(log.length())
            # quiesce (with every store logged): the last scan must catch up exactly
            stop_process(w.pid, signal_to_stop=signal.SIGUSR1)
            marks.append(log.length())
            scans.append(tracker.collect())
            after.append(log.length())
            idle = tracker.collect()             # nothing written since: nothing reported
            entries = log.entries()
    finally:
        os.kill(w.pid, signal.SIGCONT)
        kill_workload(w)
    assert after[-1] == marks[-1] == len(entries), "the writer wrote while stopped"
    assert len(entries) > 500
    reported = [{a for a in pages_of(s.data) | pages_of(s.zero) if log.watched(a)} for s in scans]
    assert reported[0] == {log.addr(i) for i in range(log.npages + log.thp_pages)}, "round 0 must send everything"
    misses = []
    for k in range(1, len(scans)):
        for idx in entries[marks[k - 1]: marks[k]]:
            if log.addr(idx) not in reported[k - 1] | reported[k]:
                misses.append((k, hex(log.addr(idx))))
    assert not misses, f"{backend} missed {len(misses)} written pages: {misses[:10]}"
    false = []
    for k in range(1, len(scans)):
        written = {log.addr(i) for i in entries[marks[k - 1]: after[k]]}
        blocks = {a & ~(HUGE - 1) for a in written if log.in_thp(a)}
        for a in reported[k] - written:
            if not (backend == "soft-dirty" and log.in_thp(a) and a & ~(HUGE - 1) in blocks):
                # what the page is and when it was written last, for whoever reads a failure
                last = max((j for j in range(1, k) if a in
                            {log.addr(i) for i in entries[marks[j - 1]: after[j]]}), default=0)
                false.append((k, hex(a), "thp" if log.in_thp(a) else "small",
                              "zero" if a in pages_of(scans[k].zero) else "data", f"last written by round {last}"))
    assert not false, f"{backend} reported {len(false)} pages that were not written: {false[:10]}"
    assert not {a for a in pages_of(idle.data) | pages_of(idle.zero) if log.watched(a)}
    assert all(s.pages_scanned > 0 for s in scans)


@pytest.mark.parametrize("backend", backend_params())
def test_tracking_leaves_the_process_as_it_was(backend: str, tmp_path: Path, tracer: Tracer) -> None:
    w = workload("dirty_writer", tmp_path, "1024", "500", "3")
    try:
        before = Path(f"/proc/{w.pid}/maps").read_text()
        with make_tracker(backend, w.pid, control_for(w.pid, tracer)) as tracker:
            tracker.start()
            time.sleep(0.05)
            tracker.collect()
            if backend == "uffd-wp":
                uw, fds = uffd_traces(w.pid)
                assert uw > 0 and not fds, "the target must never hold the userfaultfd"
        assert uffd_traces(w.pid) == (0, [])
        assert Path(f"/proc/{w.pid}/maps").read_text() == before
        assert "TracerPid:\t0" in Path(f"/proc/{w.pid}/status").read_text()
        assert w.proc is not None and w.proc.poll() is None
    finally:
        kill_workload(w)


def test_the_process_exiting_mid_tracking_is_a_clean_error(tmp_path: Path, tracer: Tracer) -> None:
    w = workload("dirty_writer", tmp_path, "256", "100", "5")
    with make_tracker("checksum", w.pid) as tracker:
        tracker.start()
        kill_workload(w)
        with pytest.raises(ProcessExited, match=f"process {w.pid} exited"):
            tracker.collect()


@pytest.mark.skipif(not probe_backends()["uffd-wp"].available, reason="uffd-wp unavailable")
def test_a_process_we_may_not_trace_is_refused(tmp_path: Path, tracer: Tracer) -> None:
    import subprocess

    from tests._workloads import build

    # A child that asked to be traced by us (PTRACE_TRACEME) and stopped at exec: nobody else may seize it.
    prog = str(build("dirty_writer"))
    code = ("import ctypes, os, sys; ctypes.CDLL(None).ptrace(0, 0, 0, 0); "
            f"os.execv({prog!r}, [{prog!r}, {str(tmp_path)!r}, '16', '0', '1'])")
    child = subprocess.Popen([os.sys.executable, "-c", code])  # type: ignore[attr-defined]
    try:
        _, status = os.waitpid(child.pid, os.WUNTRACED)      # the exec SIGTRAP stop
        assert os.WIFSTOPPED(status)
        with pytest.raises(PermissionDenied, match="may not trace"):
            with make_tracker("uffd-wp", child.pid, control_for(child.pid, tracer)) as tracker:
                tracker.start()
    finally:
        child.kill()
        child.wait()


def test_a_scratch_put_where_the_last_layout_had_room_is_left_out_of_the_next(tmp_path: Path) -> None:
    """The source reads a frozen process's state beside its last scan: the scratch that
    reading borrows goes where the process's last layout had room, as exactly one mapping
    (shared: it merges with nothing), which the scan leaves out while it is set as hidden."""
    from agent import freeze
    from agent.inject import SCRATCH_SIZE, Injector, RemoteMemory, Scratch, ScratchTaken, spare_address, syscall_gadget
    from precopy.layout import read_maps

    w = workload("dirty_writer", tmp_path, "256", "0", "1")
    try:
        before = Path(f"/proc/{w.pid}/maps").read_text()
        with make_tracker("checksum", w.pid) as tracker:
            first = tracker.start()
            at = spare_address([(e.start, e.end) for e in tracker.layout])
            assert at is not None
            span = (at, at + SCRATCH_SIZE)
            held = freeze.seize(w.pid)
            try:
                mem = RemoteMemory(w.pid)
                inj = Injector(w.pid, syscall_gadget(w.pid, mem))
                try:
                    scratch = Scratch(inj, mem, at=at)
                    scratch.put(0, b"answers" * 100)
                    assert span in [(m.start, m.end) for m in read_maps(w.pid)]
                    tracker.hidden = frozenset({span})
                    hidden = tracker.collect()
                    tracker.hidden = frozenset()
                    seen = tracker.collect()
                    # Taken now, as is any place the process has memory at, or the kernel
                    # will not map at (beyond any user address space, 5-level paging's too).
                    for taken in (at, first.layout[0].start, 1 << 57):
                        with pytest.raises(ScratchTaken):
                            Scratch(inj, mem, at=taken)
                    scratch.release()
                finally:
                    inj.close()
                    mem.close()
            finally:
                freeze.let_go(held)
        layout = [(e.start, e.end) for e in first.layout]
        assert [(e.start, e.end) for e in hidden.layout] == layout
        assert not hidden.change.new_spans
        assert not [a for a in pages_of(hidden.data) | pages_of(hidden.zero) if at <= a < span[1]]
        assert span in [(e.start, e.end) for e in seen.layout], "without hiding it, the scan sees the scratch"
        assert Path(f"/proc/{w.pid}/maps").read_text() == before
    finally:
        kill_workload(w)


def test_a_scratch_goes_in_the_middle_of_the_largest_gap_below_the_user_address_limit() -> None:
    from agent.inject import LOWEST_SPARE, SCRATCH_SIZE, spare_address
    from transport.schema import TASK_SIZE

    low, top = 0x1000_0000_0000, 0x7F00_0000_0000
    spans = [(0x40_0000, 0x60_0000), (low, low + P), (top, top + 64 * P), (0x7FFF_F000_0000, 0x7FFF_F002_0000),
             (0xFFFF_FFFF_FF60_0000, 0xFFFF_FFFF_FF60_1000)]      # [vsyscall], above the limit
    assert spare_address(spans) == (low + P + top) // 2 // P * P
    assert spare_address([]) == (LOWEST_SPARE + TASK_SIZE) // 2 // P * P
    # No gap with room: none (the state is then read after the scan).
    assert spare_address([(LOWEST_SPARE, TASK_SIZE - SCRATCH_SIZE)]) is None


# --- pure parts ----------------------------------------------------------------------------

def _maps(text: str) -> list[MapEntry]:
    return parse_maps(text)


def test_layout_diff_names_each_kind_of_change() -> None:
    old = _maps("""\
00400000-00401000 r-xp 00000000 08:01 100 /bin/x
00600000-00610000 rw-p 00000000 00:00 0
00700000-00710000 rw-p 00000000 00:00 0
00800000-00810000 rw-p 00000000 00:00 0
00900000-00910000 rw-p 00000000 00:00 0
""")
    new = _maps("""\
00400000-00401000 r-xp 00000000 08:01 100 /bin/x
00600000-00620000 rw-p 00000000 00:00 0
00700000-00708000 rw-p 00000000 00:00 0
00800000-00808000 rw-p 00000000 00:00 0
00808000-00810000 r--p 00000000 00:00 0
00a00000-00a01000 rw-p 00000000 00:00 0
""")
    change = diff_layout(old, new)
    assert [e.start for e in change.added] == [0xa00000]
    assert [e.start for e in change.removed] == [0x900000]
    assert [e.start for e in change.grown] == [0x600000]
    assert [e.start for e in change.shrunk] == [0x700000]
    assert [e.start for e in change.reprotected] == [0x808000]
    assert change.new_spans == ((0x610000, 0x620000), (0xa00000, 0xa01000))
    assert not diff_layout(new, new)
    assert diff_layout([], new).new_spans[0] == (0x400000, 0x401000)
    assert isinstance(change, LayoutChange) and change.counts()["added"] == 1


def test_layout_diff_sees_a_file_replacing_anonymous_memory() -> None:
    old = _maps("00600000-00610000 rw-p 00000000 00:00 0\n")
    new = _maps("00600000-00610000 rw-p 00000000 08:01 7 /data\n")
    change = diff_layout(old, new)
    assert change.added and change.removed and change.new_spans == ((0x600000, 0x610000),)


def _scan(layout: str, data: list[tuple[int, int]], zero: list[tuple[int, int]], rnd: int = 1) -> Scan:
    return Scan(rnd, tuple(_maps(layout)), LayoutChange(), tuple(data), tuple(zero), 0, 0, 0.0, 0.0)


def test_a_pending_scan_loses_the_pages_the_next_one_repeats() -> None:
    layout = "00600000-00610000 rw-p 00000000 00:00 0\n"
    older = _scan(layout, [(0x600000, 4), (0x700000, 1)], [(0x608000, 2)])
    newer = _scan(layout, [(0x609000, 1)], [(0x601000, 1)], rnd=2)
    left = superseded(older, newer)
    assert left.round == 1 and left.layout == older.layout
    assert pages_of(left.data) == {0x600000, 0x602000, 0x603000, 0x700000}
    assert pages_of(left.zero) == {0x608000}


def test_a_vanished_page_costs_only_itself_when_reading() -> None:
    import ctypes
    import mmap

    from precopy.reader import PageReader

    m = mmap.mmap(-1, 4 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = (ctypes.c_char * (4 * P)).from_buffer(m)
    base = ctypes.addressof(buf)
    for i in range(4):
        buf[i * P] = bytes([65 + i])
    libc = ctypes.CDLL(None)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    assert libc.munmap(ctypes.c_void_p(base + P), P) == 0          # a hole inside one run
    with PageReader(os.getpid()) as reader:
        batch = reader.read([(base, 4)])
    del buf
    m.close()
    assert batch.runs == ((base, 1), (base + 2 * P, 2))
    assert [bytes(d[:1]) for _, d in batch.pages()] == [b"A", b"C"]


def test_frozen_trackers_read_shared_memory_once_and_each_sees_what_changed() -> None:
    """While a job is frozen (``precopy.rounds.final_group``) the trackers of the processes
    that map one shared object read and hash each of its pages once between them; each still
    reports the pages changed since it last looked, whoever wrote them."""
    import ctypes
    import mmap
    size, page = 16 << 20, 4096
    shared = mmap.mmap(-1, size)
    shared[:] = b"\1" * size
    addr = ctypes.addressof(ctypes.c_char.from_buffer(shared))
    orders, acks = os.pipe(), os.pipe()
    kids = []
    for k in range(2):
        pid = os.fork()
        if pid == 0:
            try:
                while os.read(orders[0], 1) == b"w":     # write a page, say so
                    shared[5 * page] = 7
                    os.write(acks[1], b"k")
            finally:
                os._exit(0)
        kids.append(pid)
    trackers = {p: make_tracker("checksum", p) for p in kids}
    try:
        for t in trackers.values():
            t.start()
        os.write(orders[1], b"w")                         # one child writes, through its mapping
        assert os.read(acks[0], 1) == b"k"
        for p in kids:
            os.kill(p, signal.SIGSTOP)
        objects: dict = {}
        scans = []
        for t in trackers.values():
            t.share_frozen_objects(objects)
            scans.append(t.collect())
            t.share_frozen_objects(None)
        for scan in scans:
            assert addr + 5 * page in pages_of(scan.data), "a tracker missed a page of the shared object that changed"
            assert addr + 6 * page not in pages_of(scan.data)
        assert scans[0].bytes_read - scans[1].bytes_read >= size - (1 << 20), \
            (scans[0].bytes_read, scans[1].bytes_read)    # the second read none of the object again
    finally:
        for p in kids:
            os.kill(p, signal.SIGKILL)
            os.waitpid(p, 0)
        for t in trackers.values():
            t.stop()
        for fd in (*orders, *acks):
            os.close(fd)
