"""The pre-copy round loop: scan, read the dirty pages in worker threads, hand them to a sink.

Transport-agnostic: a ``PageSink`` receives the layout and page batches (a channel to the
destination agent, an image writer, or an in-memory dict in tests). Round 0 sends every
populated page; then each round collects the pages written meanwhile, asks the policy whether
to stop, and sends them if not. The loop ends with a ``StopReason`` and the dirty set it found
last but did not send (``pending``): the caller freezes the process and calls
``final_round``, which scans once more and sends both.

Tracker calls and page reads block, so they run in worker threads (``trio.to_thread``); reading
the next pages overlaps sending those before. The scans of a job's processes go in one pass
(``send_scans``): their reads share worker-thread hops, each a wake-up both ways.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Awaitable, Callable, Iterator, Protocol, Sequence, TypeVar

import trio

from precopy import parent_frames
from precopy.intervals import Run, clip, merge_spans, npages, subtract, union
from precopy.policy import PrecopyPolicy, RoundStats, StopReason, closes, decide
from precopy.reader import split_runs, zero_batches
from precopy.tracker import DirtyTracker, Scan, superseded
from transport._nursery import service_nursery
from transport.errors import MigrationError, ProcessExited
from transport.frozen import frozen
from transport.pages import PageBatch
from transport.schema import PAGE_SIZE, Mappings, MappingsDelta, ParentPages, ProcessBegin, Record

MiB = 1 << 20
T = TypeVar("T")
LayoutRecord = Mappings | MappingsDelta | ParentPages      # what goes with a process's pages


class PageSink(Protocol):
    """Where pages go. The destination applies each layout as a restorer does: what is no longer
    mapped is dropped, and a range mapped with another backing than before (``diff_layout``'s
    ``new_spans``: added mappings, the new parts of grown ones) starts out empty; memory whose
    mapping stayed keeps its contents. Trackers rely on that: they never send the holes of a
    new range, nor zeros for pages that went away with their mapping."""

    async def layout(self, mappings: LayoutRecord) -> None:
        """The address space as it is now (or its change since the last layout: a
        ``MappingsDelta``); the pages that follow belong to it. Or, in a first copy, which
        of them are the process's parent's very pages (``ParentPages``), not sent."""
        ...

    async def send_batch(self, batch: PageBatch) -> int:
        """Send one batch; return the bytes it took on the wire (after compression), or 0
        if that is known only once the sink drains."""
        ...


class DrainingSink(PageSink, Protocol):
    """A sink that queues: ``drain`` returns once everything sent so far has left, with the
    bytes it took on the wire that ``send_batch`` did not report. A round's send time ends
    after the drain, so bandwidth is not overestimated by a deep queue."""

    async def drain(self) -> int: ...


class SyncPageSink(Protocol):
    def layout(self, mappings: LayoutRecord) -> None: ...

    def send_batch(self, batch: PageBatch) -> int: ...


class ThreadedSink:
    """A blocking sink (a file, an image writer) driven from worker threads."""

    def __init__(self, sink: SyncPageSink) -> None:
        self.sink = sink

    async def layout(self, mappings: LayoutRecord) -> None:
        await trio.to_thread.run_sync(self.sink.layout, mappings)

    async def send_batch(self, batch: PageBatch) -> int:
        return await trio.to_thread.run_sync(self.sink.send_batch, batch)


@frozen
class PrecopyResult:
    stop_reason: StopReason
    rounds: tuple[RoundStats, ...]
    pending: Scan              # found dirty but not sent: ``final_round`` sends it
    memory_bytes: int          # populated bytes at round 0

    @property
    def bytes_raw(self) -> int:
        return sum(r.bytes_raw for r in self.rounds)

    @property
    def bytes_on_wire(self) -> int:
        return sum(r.bytes_on_wire for r in self.rounds)

    def as_dict(self) -> dict[str, object]:
        return {"stop_reason": str(self.stop_reason), "rounds": [r.as_dict() for r in self.rounds],
                "pages_pending": self.pending.pages_dirty, "memory_bytes": self.memory_bytes,
                "bytes_raw": self.bytes_raw, "bytes_on_wire": self.bytes_on_wire}


async def _blocking(tracker: DirtyTracker, fn: Callable[..., T], *args: object) -> T:
    """Run a blocking tracker or reader call in a worker thread; OSErrors become our errors."""
    try:
        return await trio.to_thread.run_sync(fn, *args)
    except MigrationError:
        raise
    except OSError as exc:
        raise tracker.explain(exc) from None


@frozen
class ScanSend:
    """One scan to send with ``send_scans``: its pages read by ``tracker``, sent to ``sink``
    (for a process of a job, its ``ProcessSink``). ``first``, ``layout`` and ``shared_zeros``
    as for ``send_scan``."""

    tracker: DirtyTracker
    sink: PageSink
    scan: Scan
    previous: Scan | None = None
    first: bool = False
    layout: bool | None = None
    shared_zeros: bool = False

    def sends_layout(self) -> bool:
        return self.layout if self.layout is not None else (self.first or bool(self.scan.change))

    def quiet(self) -> bool:
        """Nothing to send (a quiet process of a tree)."""
        return not (self.sends_layout() or self.scan.data or self.scan.zero)


# What a worker thread hands the sending side: the index of the scan it belongs to, and its
# layout record, its pages that are its parent's (``ParentPages``), a page batch, or the error
# that ended that scan's reads.
_Item = tuple[int, LayoutRecord | PageBatch | Exception]

# Page bytes read per worker-thread hop: the pages of several small scans (a tree's quiet
# processes) share one hop; a hop costs a wake-up each way, milliseconds on a busy machine.
READ_HOP_BYTES = 2 << 20


def _scan_items(index: int, s: ScanSend, skipped: list[int]) -> Iterator[_Item]:
    """One scan's items in stream order (blocking: runs in worker threads): its layout record
    if it changed, its pages, then its empty pages. ``skipped[index]`` counts the all-zero
    pages left out."""
    tracker, scan = s.tracker, s.scan
    if s.sends_layout():
        # The whole layout the first time, then what changed since the one sent (``SentLayout``).
        rec = tracker.sent_layout.record(scan.layout)
        if rec is not None:
            yield index, rec
    reader = tracker.reader
    shared = merge_spans((e.start, e.end) for e in scan.layout if e.shared)
    plain: list[Run] = list(scan.data)
    parent = tracker.inherits_from if s.first else None
    if parent is not None and parent.sent_layout.entries and tracker.sent_layout.entries:
        # (its parent's first copy went out before: the destination holds its pages)
        said, plain = parent_frames.parent_pages(tracker.pid, parent.pid, plain, tracker.sent_layout.vmas(),
                                                 parent.sent_layout.vmas())
        for parents in said:
            yield index, parents
    zero_dropping: list[Run] = []
    if s.first and shared and not s.shared_zeros:    # the destination starts with zero-filled shared memory
        zero_dropping = clip(plain, shared)
        plain = subtract(plain, zero_dropping)
    for runs, drop in ((plain, False), (zero_dropping, True)):
        for group in split_runs(runs, reader.batch_pages):
            before = reader.pages_skipped_zero
            # (a later scan's pages were written since: the process's own, pinned at no cost)
            batch = next(iter(reader.batches(group, drop_zero=drop, pin=reader.pin or not s.first)), None)
            skipped[index] += reader.pages_skipped_zero - before
            if batch is not None:
                tracker.note_sent(batch)
                yield index, batch
    for batch in zero_batches(scan.zero, reader.batch_pages):
        yield index, batch      # empty pages: nothing for a digest to remember


def _all_items(sends: Sequence[ScanSend], skipped: list[int]) -> Iterator[_Item]:
    """Every scan's items, in order. A scan whose reads fail ends with its error, and the
    later scans of its tracker are left out (their layouts follow from the failed one's)."""
    failed: set[int] = set()
    for i, s in enumerate(sends):
        if id(s.tracker) in failed or s.quiet():
            continue
        try:
            yield from _scan_items(i, s, skipped)
        except (MigrationError, OSError) as exc:
            failed.add(id(s.tracker))
            yield i, exc if isinstance(exc, MigrationError) else s.tracker.explain(exc)


def _take(items: Iterator[_Item], budget: int) -> tuple[list[_Item], bool]:
    """The next items, up to ``budget`` bytes of pages (at least one item); and whether
    they are the last."""
    out: list[_Item] = []
    size = 0
    for item in items:
        out.append(item)
        if isinstance(item[1], PageBatch):
            size += len(item[1].data)
            if size >= budget:
                return out, False
    return out, True


async def send_scans(sends: Sequence[ScanSend], *, clock: Callable[[], float] = time.monotonic,
                     after: Callable[[int], Awaitable[None]] | None = None) -> list[RoundStats | Exception]:
    """Send several scans' layouts and pages, in order (the scans of a job's processes, each
    to its process's sink): each scan's figures, or the error that ended its reads (the
    process exited; its later scans are then left out, and what was sent of it is moot).
    Pages are read in worker threads, several scans' in one hop up to ``READ_HOP_BYTES``,
    while those read before are sent. Returns once they are queued: the caller drains.
    ``after(i)`` is awaited once scan ``i``'s items are all queued, before the next scan's
    (for a scan that sent anything), for the caller to put records of its own in between."""
    t0 = clock()
    skipped = [0] * len(sends)
    pages = [0] * len(sends)
    wire = [0] * len(sends)
    errors: dict[int, Exception] = {}
    items = _all_items(sends, skipped)
    send_channel, receive_channel = trio.open_memory_channel[list[_Item]](1)

    async def produce() -> None:
        async with send_channel:
            last = False
            while not last:
                chunk, last = await trio.to_thread.run_sync(_take, items, READ_HOP_BYTES)
                if chunk:
                    await send_channel.send(chunk)

    async with service_nursery() as nursery:
        nursery.start_soon(produce)
        async with receive_channel:
            current = -1          # the scan whose items went last
            async for chunk in receive_channel:
                for i, what in chunk:
                    if i != current:
                        if after is not None and current >= 0:
                            await after(current)
                        current = i
                    sink = sends[i].sink
                    if isinstance(what, PageBatch):
                        wire[i] += await sink.send_batch(what)
                        pages[i] += what.npages
                    elif isinstance(what, Exception):
                        errors[i] = what
                    else:
                        await sink.layout(what)
            if after is not None and current >= 0:
                await after(current)
    t1 = clock()
    out: list[RoundStats | Exception] = []
    for i, s in enumerate(sends):
        scan = s.scan
        if i in errors:
            out.append(errors[i])
        elif s.quiet():
            out.append(RoundStats(round=scan.round, pages_scanned=scan.pages_scanned, pages_dirty=0, pages_written=0,
                                  pages_skipped_zero=0, bytes_raw=0, bytes_on_wire=0, round_ms=scan.scan_ms,
                                  scan_ms=scan.scan_ms, send_ms=0.0, dirty_rate_mib_s=0.0,
                                  bytes_read=scan.bytes_read))
        else:
            interval = scan.started - s.previous.started if s.previous is not None else 0.0
            rate = scan.pages_dirty * PAGE_SIZE / MiB / interval if interval > 0 and not s.first else 0.0
            out.append(RoundStats(
                round=scan.round, pages_scanned=scan.pages_scanned, pages_dirty=scan.pages_dirty,
                pages_written=pages[i], pages_skipped_zero=skipped[i], bytes_raw=pages[i] * PAGE_SIZE,
                bytes_on_wire=wire[i], round_ms=scan.scan_ms + (t1 - t0) * 1000, scan_ms=scan.scan_ms,
                send_ms=(t1 - t0) * 1000, dirty_rate_mib_s=rate, bytes_read=scan.bytes_read,
                layout_changes=sum(scan.change.counts().values()) if not s.first else 0))
    return out


async def send_scan(tracker: DirtyTracker, sink: PageSink, scan: Scan, *, previous: Scan | None,
                    first: bool = False, layout: bool | None = None, drain: bool = True,
                    shared_zeros: bool = False, clock: Callable[[], float] = time.monotonic) -> RoundStats:
    """Send one scan's pages (and, if it changed or ``layout`` says so, its layout) to the sink.
    ``drain`` False: return once they are queued, not once the destination has them (the
    caller drains later; the round's ``bytes_on_wire`` then counts only what the sink reported).
    ``shared_zeros``: a first scan sends the empty pages of shared memory too, for memory other
    processes share: another may have sent a page since emptied (the object is not empty there)."""
    t0 = clock()
    one = ScanSend(tracker, sink, scan, previous, first, layout, shared_zeros)
    [stats] = await send_scans([one], clock=clock)
    if isinstance(stats, Exception):
        raise stats
    drained = getattr(sink, "drain", None) if drain and not one.quiet() else None
    if drained is None:
        return stats
    wire = await drained()
    send_ms = (clock() - t0) * 1000
    return replace(stats, bytes_on_wire=stats.bytes_on_wire + wire, send_ms=send_ms,
                   round_ms=scan.scan_ms + send_ms)


async def precopy(tracker: DirtyTracker, sink: PageSink, policy: PrecopyPolicy = PrecopyPolicy(), *,
                  on_round: Callable[[RoundStats], None] | None = None,
                  clock: Callable[[], float] = time.monotonic) -> PrecopyResult:
    """Start ``tracker`` and iterate rounds until the policy says stop; the process keeps running."""
    scan = await _blocking(tracker, tracker.start)
    memory = npages(scan.data) * PAGE_SIZE
    stats = await send_scan(tracker, sink, scan, previous=None, first=True, clock=clock)
    rounds = [stats]
    if on_round is not None:
        on_round(stats)
    previous = scan
    while True:
        scan = await _blocking(tracker, tracker.collect)
        reason = decide(policy, rounds, scan.pages_dirty, memory_bytes=memory)
        if reason is not None:
            if closes(policy, reason, rounds, scan.pages_dirty):
                stats = await send_scan(tracker, sink, scan, previous=previous, clock=clock)
                rounds.append(stats)
                if on_round is not None:
                    on_round(stats)
                scan = await _blocking(tracker, tracker.collect)
            return PrecopyResult(reason, tuple(rounds), scan, memory)
        stats = await send_scan(tracker, sink, scan, previous=previous, clock=clock)
        rounds.append(stats)
        if on_round is not None:
            on_round(stats)
        previous = scan


async def final_round(tracker: DirtyTracker, sink: PageSink, result: PrecopyResult | None = None, *,
                      clock: Callable[[], float] = time.monotonic,
                      scanned: Callable[[], object] | None = None) -> RoundStats:
    """The last round, with the process frozen by the caller: one more scan, sent after what the
    loop left pending (that scan's layout first, then its pages the last scan does not repeat).
    ``scanned`` is called once the scan has read the layout: from then on the caller may work
    on the frozen process while its pages are read and sent. The pages are queued, not drained:
    the caller sends the rest of the state after them and drains once (every wait for the
    destination here would be frozen time)."""
    t0 = clock()
    scan = await _blocking(tracker, tracker.collect)
    if scanned is not None:
        scanned()
    if result is None:
        return await send_scan(tracker, sink, scan, previous=None, layout=True, drain=False, clock=clock)
    pending = superseded(result.pending, scan)
    first = await send_scan(tracker, sink, pending, previous=None, drain=False, clock=clock)
    last = await send_scan(tracker, sink, scan, previous=result.pending, drain=False, clock=clock)
    pages = npages(union(union(result.pending.data, result.pending.zero), union(scan.data, scan.zero)))
    return replace(last, pages_dirty=pages, pages_written=first.pages_written + last.pages_written,
                   pages_skipped_zero=first.pages_skipped_zero + last.pages_skipped_zero,
                   bytes_raw=first.bytes_raw + last.bytes_raw, bytes_on_wire=first.bytes_on_wire + last.bytes_on_wire,
                   round_ms=(clock() - t0) * 1000, send_ms=first.send_ms + last.send_ms,
                   layout_changes=first.layout_changes + last.layout_changes)


# --- several processes: a job's tree ----------------------------------------------------

class RecordSink(PageSink, Protocol):
    async def record(self, rec: Record) -> None:
        """Any other record, in order with the layouts and pages."""
        ...


class StreamCursor:
    """Which process the stream's layouts and pages belong to now (``ProcessBegin``).
    ``named`` off: the stream is one process's and names none."""

    def __init__(self, named: bool = False) -> None:
        self.pid = 0
        self.named = named

    def reset(self) -> None:
        """The next layout or page names its process again (after a ``ProcessTree`` record)."""
        self.pid = 0


class ProcessSink:
    """One process's view of a sink the processes of a job share: its layouts and pages
    follow a ``ProcessBegin`` naming it, sent whenever the stream turns to it."""

    def __init__(self, sink: RecordSink, pid: int, cursor: StreamCursor) -> None:
        self.sink = sink
        self.pid = pid
        self.cursor = cursor

    async def _turn(self) -> None:
        if self.cursor.named and self.cursor.pid != self.pid:
            await self.sink.record(ProcessBegin(self.pid))
            self.cursor.pid = self.pid

    async def layout(self, mappings: LayoutRecord) -> None:
        await self._turn()
        await self.sink.layout(mappings)

    async def send_batch(self, batch: PageBatch) -> int:
        await self._turn()
        return await self.sink.send_batch(batch)


@frozen
class GroupResult:
    """``PrecopyResult`` for the processes of a job: what each one's last scan found."""

    stop_reason: StopReason
    rounds: tuple[RoundStats, ...]
    pending: dict[int, Scan]
    memory_bytes: int
    # Processes whose pending scan is their first (they joined in the last round looked at):
    # none of their pages, nor their layout, went out yet.
    unsent: frozenset[int] = frozenset()

    @property
    def pages_pending(self) -> int:
        """The pages the last scans found written: the freeze sends them."""
        return sum(s.pages_dirty for s in self.pending.values())

    def as_dict(self) -> dict[str, object]:
        return {"stop_reason": str(self.stop_reason), "rounds": [r.as_dict() for r in self.rounds],
                "pages_pending": self.pages_pending, "memory_bytes": self.memory_bytes,
                "bytes_raw": sum(r.bytes_raw for r in self.rounds),
                "bytes_on_wire": sum(r.bytes_on_wire for r in self.rounds)}


Members = Callable[[], Awaitable[dict[int, DirtyTracker]]]


class _Group:
    """The trackers of a job's processes, each started on the round it joined."""

    def __init__(self, sink: RecordSink, cursor: StreamCursor, clock: Callable[[], float]) -> None:
        self.sink = sink
        self.cursor = cursor
        self.clock = clock
        self.started: set[int] = set()
        self.previous: dict[int, Scan] = {}

    async def look(self, trackers: dict[int, DirtyTracker]) -> dict[int, tuple[Scan, bool]]:
        """Each process's scan (its first: every populated page), skipping any that exited:
        the caller's ``members`` drops it next time."""
        def scan_all() -> dict[int, tuple[Scan, bool]]:
            """In one worker thread: a hop per process made a tree's round last longer than
            one process's, and the longer a round, the more its processes write meanwhile."""
            scans: dict[int, tuple[Scan, bool]] = {}
            for pid, tracker in trackers.items():
                first = pid not in self.started
                try:
                    scan = (tracker.start if first else tracker.collect)()
                except ProcessExited:
                    continue
                except OSError as exc:
                    error = tracker.explain(exc)
                    if isinstance(error, ProcessExited):
                        continue
                    raise error from None
                scans[pid] = (scan, first)
            return scans

        scans = await trio.to_thread.run_sync(scan_all)
        self.started.update(scans)
        return scans

    async def send(self, number: int, trackers: dict[int, DirtyTracker], scans: dict[int, tuple[Scan, bool]],
                   *, drain: bool = True) -> RoundStats:
        t0 = self.clock()
        order = list(scans)
        sent = await send_scans([ScanSend(trackers[pid], ProcessSink(self.sink, pid, self.cursor), scan,
                                          previous=self.previous.get(pid), first=first,
                                          shared_zeros=len(trackers) > 1)
                                 for pid, (scan, first) in scans.items()], clock=self.clock)
        parts = []
        for pid, stats in zip(order, sent):
            if isinstance(stats, ProcessExited):
                # Exited while its pages went out: what was sent of it is moot, the caller's
                # ``members`` drops it (or ends the job, if it was the job's root).
                self.previous.pop(pid, None)
                continue
            if isinstance(stats, Exception):
                raise stats
            parts.append(stats)
            self.previous[pid] = scans[pid][0]
        drained = getattr(self.sink, "drain", None) if drain else None
        wire = await drained() if drained is not None else 0
        return combine(number, parts, wire, (self.clock() - t0) * 1000)


def combine(number: int, parts: Sequence[RoundStats], wire: int = 0, send_ms: float | None = None) -> RoundStats:
    """One round's figures over the processes of a job (sent one after another)."""
    scan_ms = sum(p.scan_ms for p in parts)
    send = send_ms if send_ms is not None else sum(p.send_ms for p in parts)
    return RoundStats(
        round=number, pages_scanned=sum(p.pages_scanned for p in parts), pages_dirty=sum(p.pages_dirty for p in parts),
        pages_written=sum(p.pages_written for p in parts),
        pages_skipped_zero=sum(p.pages_skipped_zero for p in parts), bytes_raw=sum(p.bytes_raw for p in parts),
        bytes_on_wire=sum(p.bytes_on_wire for p in parts) + wire, round_ms=scan_ms + send, scan_ms=scan_ms,
        send_ms=send, dirty_rate_mib_s=sum(p.dirty_rate_mib_s for p in parts),
        bytes_read=sum(p.bytes_read for p in parts), layout_changes=sum(p.layout_changes for p in parts))


async def precopy_group(members: Members, sink: RecordSink, cursor: StreamCursor,
                        policy: PrecopyPolicy = PrecopyPolicy(), *,
                        on_round: Callable[[RoundStats], None] | None = None,
                        clock: Callable[[], float] = time.monotonic) -> GroupResult:
    """``precopy`` for the processes of a job, all running. ``members`` is awaited before each
    round: the trackers of the processes in the job now (one that joined is started in that
    round: all its pages go; one that left is no longer listed). The policy decides on the
    job's total dirty set."""
    group = _Group(sink, cursor, clock)
    trackers = await members()
    scans = await group.look(trackers)
    memory = sum(npages(s.data) * PAGE_SIZE for s, _ in scans.values())
    rounds = [await group.send(0, trackers, scans)]
    if on_round is not None:
        on_round(rounds[-1])
    while True:
        trackers = await members()
        scans = await group.look(trackers)
        memory += sum(npages(s.data) * PAGE_SIZE for s, first in scans.values() if first)
        dirty = sum(s.pages_dirty for s, _ in scans.values())
        reason = decide(policy, rounds, dirty, memory_bytes=memory)
        if reason is not None:
            if closes(policy, reason, rounds, dirty):
                rounds.append(await group.send(len(rounds), trackers, scans))
                if on_round is not None:
                    on_round(rounds[-1])
                scans = await group.look(trackers)
            return GroupResult(reason, tuple(rounds), {pid: s for pid, (s, _) in scans.items()}, memory,
                               frozenset(pid for pid, (_, first) in scans.items() if first))
        rounds.append(await group.send(len(rounds), trackers, scans))
        if on_round is not None:
            on_round(rounds[-1])


async def final_group(trackers: dict[int, DirtyTracker], sink: RecordSink, cursor: StreamCursor,
                      result: GroupResult | None, *, scanned: Callable[[], object] | None = None,
                      scanned_one: Callable[[int], object] | None = None,
                      pages_sent: Callable[[int], Awaitable[None]] | None = None,
                      clock: Callable[[], float] = time.monotonic) -> RoundStats:
    """``final_round`` for the processes of a job, all frozen: every process is scanned
    first (``scanned_one(pid)`` after each, then ``scanned``), then each one's pages go: what pre-copy left pending
    (for a process that joined in pre-copy's last look: its first scan, layout and all) and
    the last scan, or every page of a process pre-copy did not track (it joined the job as it
    froze, or there was no pre-copy). Queued, not drained. ``pages_sent(pid)`` is awaited
    once a process's last pages are queued, before the next process's (for one that sent
    any): the caller may send that process's state then."""
    t0 = clock()
    pending = result.pending if result is not None else {}
    unsent = result.unsent if result is not None else frozenset()

    def scan_all() -> dict[int, tuple[Scan, bool]]:
        """Every process's scan, in one worker thread (a hop each adds up in a large tree).
        Shared memory that several processes map is read and hashed once: nothing changes it
        while the job is frozen (``PageDigests.frozen_objects``)."""
        out: dict[int, tuple[Scan, bool]] = {}
        objects: dict[tuple[tuple[int, int], int, int], bytes] | None = {} if len(trackers) > 1 else None
        try:
            for pid, tracker in trackers.items():
                first = pid not in pending
                tracker.share_frozen_objects(objects)
                try:
                    out[pid] = ((tracker.start if first else tracker.collect)(), first)
                except MigrationError:
                    raise
                except OSError as exc:
                    raise tracker.explain(exc) from None
                if scanned_one is not None:      # without waiting for the event loop to run it
                    token.run_sync_soon(scanned_one, pid)
        finally:
            for tracker in trackers.values():
                tracker.share_frozen_objects(None)
        return out

    token = trio.lowlevel.current_trio_token()
    scans = await trio.to_thread.run_sync(scan_all)
    if scanned is not None:
        scanned()
    sends: list[ScanSend] = []
    pids: list[int] = []
    for pid, (scan, first) in scans.items():
        psink = ProcessSink(sink, pid, cursor)
        if first:
            sends.append(ScanSend(trackers[pid], psink, scan, first=True, shared_zeros=len(trackers) > 1))
            pids.append(pid)
            continue
        sends.append(ScanSend(trackers[pid], psink, superseded(pending[pid], scan), first=pid in unsent,
                              shared_zeros=len(trackers) > 1))
        sends.append(ScanSend(trackers[pid], psink, scan, previous=pending[pid]))
        pids += [pid, pid]
    # Every process's pages in one pass: reads of several processes share a worker-thread hop.
    last_of = {pid: i for i, pid in enumerate(pids) if not sends[i].quiet()}

    async def after(i: int) -> None:
        if pages_sent is not None and last_of.get(pids[i]) == i:
            await pages_sent(pids[i])

    t_send = clock()
    sent = await send_scans(sends, clock=clock, after=after if pages_sent is not None else None)
    send_ms = (clock() - t_send) * 1000
    parts: list[RoundStats] = []
    for pid, one, stats in zip(pids, sends, sent):
        if isinstance(stats, Exception):
            raise stats
        if one.previous is not None:      # the last scan of a process pre-copy tracked
            pages = npages(union(union(pending[pid].data, pending[pid].zero), union(one.scan.data, one.scan.zero)))
            stats = replace(stats, pages_dirty=pages - parts[-1].pages_dirty)
        parts.append(stats)
    number = (len(result.rounds) if result is not None else 0)
    return replace(combine(number, parts, send_ms=send_ms), round_ms=(clock() - t0) * 1000)
