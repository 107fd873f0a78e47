"""The pre-copy round loop with real processes and an in-memory destination.

After the last round (the process stopped, as the final phase freezes it) the destination must
hold exactly the process's memory, whatever the process did to its layout meanwhile. The loop
stops for the reason the policy gives: it converges on a slow writer, gives up on one that
writes faster than the link, and respects the caps on rounds and bytes.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio

from agent.tracer import Tracer
from precopy.policy import PrecopyPolicy, RoundStats, StopReason
from precopy.layout import MapEntry
from precopy.rounds import (
    ProcessSink,
    ScanSend,
    StreamCursor,
    ThreadedSink,
    final_group,
    final_round,
    precopy,
    precopy_group,
    send_scan,
    send_scans,
)
from precopy.intervals import pages_of
from precopy.tracker import Scan, make_tracker
from tests._tracking import (
    MemorySink,
    backend_params,
    compare_with_process,
    control_for,
    kill_workload,
    stop_process,
    uffd_traces,
    workload,
)
from tests._workloads import Workload
from transport.errors import ProcessExited
from transport.pages import PageBatch
from transport.schema import PAGE_SIZE, Mappings, ProcessBegin


@pytest.fixture
def tracer() -> Iterator[Tracer]:
    with Tracer(name="test-tracer") as t:
        yield t


def never_converge(**kw: Any) -> PrecopyPolicy:
    """A policy that stops only at a cap (or when nothing at all is left)."""
    return PrecopyPolicy(downtime_target_ms=0.0, min_pages=0, growth_limit=1e9, **kw)


@pytest.mark.parametrize("seed", ["5", "6"])
@pytest.mark.parametrize("backend", backend_params())
async def test_destination_matches_after_layout_churn(backend: str, seed: str, tmp_path: Path,
                                                      tracer: Tracer) -> None:
    w = workload("layout_churn", tmp_path, seed, "1500")
    sink = MemorySink(delay_s=0.015)
    try:
        tracker = make_tracker(backend, w.pid, control_for(w.pid, tracer))
        try:
            result = await precopy(tracker, sink, never_converge(max_rounds=15, max_bytes_factor=1e6))
            # (a round that found nothing to send converges early: fine, as long as there were rounds)
            assert result.stop_reason is StopReason.MAX_ROUNDS or result.pending.pages_dirty == 0
            assert len(result.rounds) >= 4
            assert sum(r.layout_changes for r in result.rounds) > 0, "the workload did not churn"
            stop_process(w.pid)                 # what the final phase's freeze does
            last = await final_round(tracker, sink, result)
            assert last.pages_written >= 0
        finally:
            tracker.stop()
        problems = compare_with_process(sink, w.pid)
        assert not problems, f"{len(problems)} problems: {problems[:8]}"
        assert uffd_traces(w.pid) == (0, [])
    finally:
        os.kill(w.pid, signal.SIGCONT)
        kill_workload(w)


class RacingMaps:
    """``read_maps`` for the tracker that lets the process change its layout right after one
    read of its maps and before the scan that follows it: the race a running process wins now
    and then, made certain. ``layout_race`` runs one step per command byte."""

    def __init__(self, w: Workload, monkeypatch: pytest.MonkeyPatch) -> None:
        import precopy.tracker

        self.w = w
        self.steps: list[str] = []       # to run after the next maps read
        self.done = 0
        self._read = precopy.tracker.read_maps
        monkeypatch.setattr(precopy.tracker, "read_maps", self)

    def run(self, step: str) -> None:
        fd = os.open(self.w.dir / "cmd", os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, step.encode())
        finally:
            os.close(fd)
        self.done += 1
        self.w.wait_file(f"ack{self.done}", 10)

    def __call__(self, pid: int, *cache: object) -> list[MapEntry]:
        entries = self._read(pid, *cache)
        while self.steps:
            self.run(self.steps.pop(0))
        return entries


async def _race(backend: str, tmp_path: Path, tracer: Tracer, monkeypatch: pytest.MonkeyPatch,
                steps: list[str], scans: list[Scan] | None = None) -> tuple[MemorySink, dict[str, int]]:
    """Track ``layout_race``: round 0, then one round after each of ``steps`` (in a step written
    "x~y", y runs right after that round's maps read; in "x>z", z runs after the round's scan,
    before its pages are read and sent), then the final round with the process stopped. The destination must then match the process page for page, and tracking
    must have left no trace; returns the sink and the workload's mapping addresses (and
    appends each step's scan to ``scans``)."""
    w = workload("layout_race", tmp_path)
    race = RacingMaps(w, monkeypatch)
    sink = MemorySink()
    try:
        with make_tracker(backend, w.pid, control_for(w.pid, tracer)) as tracker:
            scan = tracker.start()
            await send_scan(tracker, sink, scan, previous=None, first=True)
            for step in steps:
                step, _, late = step.partition(">")
                before, _, racing = step.partition("~")
                if before:
                    race.run(before)
                if racing:
                    race.steps = [racing]
                scan = tracker.collect()
                if scans is not None:
                    scans.append(scan)
                if late:
                    race.run(late)
                await send_scan(tracker, sink, scan, previous=None)
            stop_process(w.pid)
            await final_round(tracker, sink)
        assert race.done == len("".join(steps).replace("~", "").replace(">", ""))
        problems = compare_with_process(sink, w.pid)
        assert not problems, f"{len(problems)} problems: {problems[:8]}"
        assert uffd_traces(w.pid) == (0, [])
        return sink, {line.split()[0]: int(line.split()[1], 16) for line in (w.dir / "layout").read_text().splitlines()}
    finally:
        os.kill(w.pid, signal.SIGCONT)
        kill_workload(w)


@pytest.mark.parametrize("step", ["s", "f"], ids=["split", "rebacked"])
@pytest.mark.parametrize("backend", backend_params())
async def test_a_layout_change_between_maps_and_scan_loses_nothing(backend: str, step: str, tmp_path: Path,
                                                                   tracer: Tracer,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # "split": after the maps read, pages 1 and 6 of an 8-page mapping are written and a new page is
    # mapped over page 4; the scan then meets three mappings, the middle one unregistered (uffd-wp:
    # a PM_SCAN_CHECK_WPASYNC scan failed there, after it had re-protected pages 0-3 and lost the
    # write to page 1; the retry took the whole range for a new mapping and sent pages 0-3, 5 and 7
    # as zeros). "rebacked": a file is mapped over anonymous memory and one page of it written; the
    # next layout shows a new backing there, which the destination starts empty: every populated
    # page of it must travel again.
    await _race(backend, tmp_path, tracer, monkeypatch, [f"~{step}", "w"])


@pytest.mark.parametrize("backend", backend_params())
async def test_a_mapping_grown_before_it_is_registered_stays_one_mapping(backend: str, tmp_path: Path,
                                                                          tracer: Tracer,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A new 4-page mapping grows in place to 8 pages after the maps read that found it, before
    # the round registers it. Registered as read (4 pages), it was split in two, and the
    # process's next mremap() of it failed with EFAULT (a range across two mappings) until a
    # later round registered the rest: the workload's third step grows it again, and exits if
    # that fails.
    await _race(backend, tmp_path, tracer, monkeypatch, ["n~g", "G"])


@pytest.mark.parametrize("backend", backend_params())
async def test_a_mapping_unregistered_by_its_neighbours_mremap_is_sent_whole(backend: str, tmp_path: Path,
                                                                            tracer: Tracer,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Page 0 of a 4-page mapping moves away (a round registers it there) and back: mremap merges it
    # into pages 1-3 and drops the merged mapping's registration, while pages 1-3 keep their uffd-wp
    # state; page 2 is written then. Registered again, pages 1-3 would not read as written: page 2's
    # write was lost (and every later one: its entry is writable now), pages 1 and 3 went as zeros.
    await _race(backend, tmp_path, tracer, monkeypatch, ["m", "b", "w"])


@pytest.mark.parametrize("backend", backend_params())
async def test_a_zapped_page_arrives_as_zeros(backend: str, tmp_path: Path, tracer: Tracer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # MADV_DONTNEED of a page sent already: the destination must not keep its old contents.
    # (uffd-wp: the zapped entry is the one unprotected empty entry an armed mapping can hold.)
    sink, layout = await _race(backend, tmp_path, tracer, monkeypatch, ["z", "w"])
    assert sink.pages.get(layout["split"] + 3 * PAGE_SIZE, bytes(PAGE_SIZE)) == bytes(PAGE_SIZE)


@pytest.mark.parametrize("backend", backend_params())
async def test_a_file_mapped_again_reads_as_the_file(backend: str, tmp_path: Path, tracer: Tracer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # A private file mapping whose page 0 was written (copied) is mapped again from the same file
    # at the same place: the same backing, so the destination keeps the mapping, and page 0 must
    # come back as the file's contents, not as zeros.
    sink, layout = await _race(backend, tmp_path, tracer, monkeypatch, ["f", "r", "w"])
    assert sink.pages.get(layout["swap"], b"a" * PAGE_SIZE) == b"a" * PAGE_SIZE


@pytest.mark.parametrize("backend", backend_params())
async def test_a_file_page_copied_while_it_is_read_as_the_files_is_sent_again(backend: str, tmp_path: Path,
                                                                               tracer: Tracer,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Page 0 of a private file mapping is written (a copy, sent), dropped (the next round reads it
    # again, as the file's page), written again after that round's scan and before its read (the
    # copy is what is sent), and dropped again: the destination must hold the file's page. The
    # soft-dirty tracker lost the last drop (the page was not populated at the scan that read it,
    # and a dropped page leaves no soft-dirty bit), and the destination kept the copy.
    sink, layout = await _race(backend, tmp_path, tracer, monkeypatch, ["f", "d>c", "d"])
    assert sink.pages.get(layout["swap"], b"a" * PAGE_SIZE) == b"a" * PAGE_SIZE


@pytest.mark.parametrize("backend", backend_params())
async def test_a_dropped_copy_of_a_file_page_is_sent_once(backend: str, tmp_path: Path, tracer: Tracer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Page 0 of a private file mapping is written (a copy) and dropped: the round after the drop
    # sends the file's page; the rounds after it, the page unchanged, must not send it again (the
    # checksum tracker sent it every round, so a job that drops copies never converged below them).
    scans: list[Scan] = []
    _, layout = await _race(backend, tmp_path, tracer, monkeypatch, ["f", "d", "w", "w"], scans)
    page = layout["swap"]
    assert [page in pages_of(s.data) for s in scans] == [True, True, False, False]


async def test_converges_on_a_slow_writer(tmp_path: Path, tracer: Tracer) -> None:
    w = workload("dirty_writer", tmp_path, "2048", "100", "1")
    sink = MemorySink()
    seen: list[RoundStats] = []
    try:
        tracker = make_tracker(_best(), w.pid, control_for(w.pid, tracer))
        try:
            result = await precopy(tracker, sink, PrecopyPolicy(min_pages=0), on_round=seen.append)
            stop_process(w.pid)
            last = await final_round(tracker, sink, result)
        finally:
            tracker.stop()
        assert result.stop_reason is StopReason.CONVERGED
        assert list(result.rounds) == seen
        r0 = result.rounds[0]
        assert r0.round == 0 and r0.pages_written >= 2048 and r0.bytes_raw == r0.pages_written * PAGE_SIZE
        assert r0.bytes_on_wire == r0.bytes_raw and r0.round_ms > 0 and r0.scan_ms > 0
        assert result.memory_bytes >= 2048 * PAGE_SIZE
        assert last.pages_written >= result.pending.pages_dirty - 1
        assert not compare_with_process(sink, w.pid)
        assert result.as_dict()["stop_reason"] == "converged"
    finally:
        os.kill(w.pid, signal.SIGCONT)
        kill_workload(w)


async def test_gives_up_on_a_writer_faster_than_the_link(tmp_path: Path, tracer: Tracer) -> None:
    # 32 MiB; 2000 page writes/s, at random; after round 0 the link carries 500 pages/s, a
    # quarter: each round finds more dirty pages than the one before. (Rates low beside the
    # region: where a round takes long, as in the soft-dirty guest under TCG, a writer of 8000
    # pages/s had written nearly every page in each round, and a dirty set that cannot grow
    # ran into the byte cap instead.)
    w = workload("dirty_writer", tmp_path, "8192", "2000", "2")
    sink = MemorySink()

    def slow_link(stats: RoundStats) -> None:
        sink.bandwidth_bytes_s = 500 * PAGE_SIZE

    try:
        with make_tracker(_best(), w.pid, control_for(w.pid, tracer)) as tracker:
            policy = PrecopyPolicy(downtime_target_ms=10, min_pages=0, max_rounds=8, bandwidth_bytes_s=500 * PAGE_SIZE)
            result = await precopy(tracker, sink, policy, on_round=slow_link)
        assert result.stop_reason is StopReason.DIRTY_GROWING, [r.pages_dirty for r in result.rounds]
        assert result.pending.pages_dirty > result.rounds[-1].pages_dirty * 1.1
        assert all(r.dirty_rate_mib_s > 0 for r in result.rounds[1:])
    finally:
        kill_workload(w)


@pytest.mark.parametrize("cap", ["rounds", "bytes"])
async def test_respects_the_caps(cap: str, tmp_path: Path, tracer: Tracer) -> None:
    w = workload("dirty_writer", tmp_path, "1024", "3000", "3")
    sink = MemorySink(delay_s=0.005)
    policy = (never_converge(max_rounds=3) if cap == "rounds"
              else never_converge(max_rounds=50, max_bytes_factor=1.2))
    try:
        with make_tracker("checksum", w.pid) as tracker:
            result = await precopy(tracker, sink, policy)
        if cap == "rounds":
            assert result.stop_reason is StopReason.MAX_ROUNDS and len(result.rounds) == 3
        else:
            assert result.stop_reason is StopReason.MAX_BYTES
            assert result.bytes_raw <= policy.byte_cap(result.memory_bytes)
            assert result.bytes_raw + result.pending.pages_dirty * PAGE_SIZE > policy.byte_cap(result.memory_bytes)
    finally:
        kill_workload(w)


class _SyncSink:
    def __init__(self) -> None:
        self.pages = 0
        self.layouts = 0

    def layout(self, mappings: Mappings) -> None:
        self.layouts += 1

    def send_batch(self, batch: PageBatch) -> int:
        self.pages += batch.npages
        return len(batch.data) // 2


async def test_a_blocking_sink_works_through_threads(tmp_path: Path) -> None:
    w = workload("dirty_writer", tmp_path, "512", "200", "4")
    sink = _SyncSink()
    try:
        with make_tracker("checksum", w.pid) as tracker:
            result = await precopy(tracker, ThreadedSink(sink), never_converge(max_rounds=2))
        assert sink.layouts >= 1 and sink.pages == sum(r.pages_written for r in result.rounds)
        assert result.bytes_on_wire * 2 == result.bytes_raw
    finally:
        kill_workload(w)


async def test_the_process_exiting_mid_precopy_is_a_clean_error(tmp_path: Path, tracer: Tracer) -> None:
    w = workload("dirty_writer", tmp_path, "1024", "1000", "6")
    sink = MemorySink(delay_s=0.02)

    async def killer() -> None:
        await trio.sleep(0.15)
        kill_workload(w)

    try:
        with make_tracker(_best(), w.pid, control_for(w.pid, tracer)) as tracker:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(killer)
                with pytest.raises(ProcessExited, match="exited"):
                    await precopy(tracker, sink, never_converge(max_rounds=1000))
    finally:
        kill_workload(w)


class _JobSink:
    """A destination for a job's stream: one ``MemorySink`` per process, chosen by ``ProcessBegin``."""

    def __init__(self) -> None:
        self.sinks: dict[int, MemorySink] = {}
        self.current: MemorySink | None = None

    async def record(self, rec: Any) -> None:
        assert isinstance(rec, ProcessBegin)
        self.current = self.sinks.setdefault(rec.pid, MemorySink())

    async def layout(self, mappings: Mappings) -> None:
        assert self.current is not None, "a layout before any ProcessBegin"
        await self.current.layout(mappings)

    async def send_batch(self, batch: PageBatch) -> int:
        assert self.current is not None, "pages before any ProcessBegin"
        return await self.current.send_batch(batch)


async def _new_writes(w: Workload) -> None:
    """Wait until ``w`` (a dirty_writer) has stored to a page since this call: its log grows
    after each burst, so the second growth seen is of a burst that began after the call."""
    log = w.dir / "log"
    size = log.stat().st_size
    for _ in range(2):
        with trio.fail_after(30):
            while log.stat().st_size == size:
                await trio.sleep(0.005)
        size = log.stat().st_size


@pytest.mark.parametrize("backend", backend_params())
async def test_a_process_joining_in_the_last_round_arrives_whole(backend: str, tmp_path: Path,
                                                                 tracer: Tracer) -> None:
    """A process that joins the job in the round pre-copy stops at (a child forked just then)
    has been scanned but none of its pages sent: the final round sends it all, layout first."""
    first = workload("dirty_writer", tmp_path / "a", "512", "200", "1")
    late = workload("dirty_writer", tmp_path / "b", "768", "200", "1")
    sink = _JobSink()
    cursor = StreamCursor(named=True)
    trackers = {first.pid: make_tracker(backend, first.pid, control_for(first.pid, tracer))}
    calls = 0

    async def members() -> dict[int, Any]:
        nonlocal calls
        calls += 1
        if calls == 2:               # round 1 must find a page written since round 0's scan, or it
            await _new_writes(first)  # converges (a writer starved of CPU by a busy machine writes none)
        if calls == 3:               # joins in round 2, the last the cap allows
            trackers[late.pid] = make_tracker(backend, late.pid, control_for(late.pid, tracer))
        return dict(trackers)

    try:
        try:
            result = await precopy_group(members, sink, cursor, never_converge(max_rounds=2))
            assert result.stop_reason is StopReason.MAX_ROUNDS
            assert late.pid in result.pending and late.pid in result.unsent
            assert late.pid not in sink.sinks, "pages of the late process went out before the final round"
            for w in (first, late):
                stop_process(w.pid)
            await final_group(dict(trackers), sink, cursor, result)
        finally:
            for t in trackers.values():
                t.stop()
        for w in (first, late):
            problems = compare_with_process(sink.sinks[w.pid], w.pid)
            assert not problems, f"pid {w.pid}: {len(problems)} problems: {problems[:8]}"
        assert len(sink.sinks[late.pid].pages) >= 768
    finally:
        for w in (first, late):
            os.kill(w.pid, signal.SIGCONT)
            kill_workload(w)


async def test_a_process_that_exited_is_left_out_of_a_pass_and_the_others_go(tmp_path: Path, tracer: Tracer) -> None:
    """``send_scans`` over a job's processes: one that exited before its pages were read
    answers ProcessExited, and the processes after it in the pass still arrive whole."""
    gone = workload("dirty_writer", tmp_path / "a", "256", "200", "1")
    kept = workload("dirty_writer", tmp_path / "b", "384", "200", "1")
    sink = _JobSink()
    cursor = StreamCursor(named=True)
    try:
        trackers = {w.pid: make_tracker(_best(), w.pid, control_for(w.pid, tracer)) for w in (gone, kept)}
        try:
            stop_process(kept.pid)
            scans = {pid: t.start() for pid, t in trackers.items()}
            kill_workload(gone)
            sent = await send_scans([ScanSend(trackers[pid], ProcessSink(sink, pid, cursor), scans[pid], first=True,
                                              shared_zeros=True) for pid in (gone.pid, kept.pid)])
        finally:
            for t in trackers.values():
                t.stop()
        assert isinstance(sent[0], ProcessExited)
        assert isinstance(sent[1], RoundStats) and sent[1].pages_written >= 384
        problems = compare_with_process(sink.sinks[kept.pid], kept.pid)
        assert not problems, f"{len(problems)} problems: {problems[:8]}"
    finally:
        os.kill(kept.pid, signal.SIGCONT)
        for w in (gone, kept):
            kill_workload(w)


def _best() -> str:
    """The tracker kcr-migrate picks here: uffd-wp, else soft-dirty (the soft-dirty VM's older
    kernel), else checksum. (Checksum there read the whole memory per round, under TCG slowly
    enough that the dirty writer rewrote all of it within round 0: no round could find more.)"""
    from precopy.probe import choose_tracker
    return choose_tracker("auto").name


async def test_the_final_round_says_when_each_process_pages_are_out(tmp_path: Path, tracer: Tracer) -> None:
    """``final_group(pages_sent=...)``: awaited once a process's last pages are queued and
    before the next process's first (the source sends that process's state there), once per
    process; what a callback puts in the stream between two processes breaks neither."""
    jobs = [workload("dirty_writer", tmp_path / name, pages, "200", "1") for name, pages in (("a", "300"), ("b", "500"))]
    sink = _JobSink()
    cursor = StreamCursor(named=True)
    order: list[tuple[str, int]] = []
    send_batch = sink.send_batch

    async def logged(batch: PageBatch) -> int:
        order.append(("pages", cursor.pid))
        return await send_batch(batch)
    sink.send_batch = logged           # type: ignore[method-assign]

    async def pages_sent(pid: int) -> None:
        order.append(("sent", pid))
        await sink.record(ProcessBegin(pid))     # as the source's state for it would go
        cursor.pid = pid

    trackers = {w.pid: make_tracker(_best(), w.pid, control_for(w.pid, tracer)) for w in jobs}
    try:
        for w in jobs:
            stop_process(w.pid)
        try:
            await final_group(dict(trackers), sink, cursor, None, pages_sent=pages_sent)
        finally:
            for t in trackers.values():
                t.stop()
        pids = [w.pid for w in jobs]
        assert [e for e in order if e[0] == "sent"] == [("sent", p) for p in pids]
        for pid in pids:
            at = order.index(("sent", pid))
            assert ("pages", pid) in order[:at] and ("pages", pid) not in order[at:]
        assert order.index(("sent", pids[0])) < order.index(("pages", pids[1]))
        for w in jobs:
            problems = compare_with_process(sink.sinks[w.pid], w.pid)
            assert not problems, f"pid {w.pid}: {len(problems)} problems: {problems[:8]}"
    finally:
        for w in jobs:
            os.kill(w.pid, signal.SIGCONT)
            kill_workload(w)
