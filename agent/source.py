"""The source role of the agent: hold the process, pre-copy its memory, freeze it, send the rest.

The process is traced by a holder (``agent.holder``), a process of its own: if this agent
dies, the holder thaws the process (before the point of no return) or stops it (after). If
this agent loses kcr-migrate instead, it does the same, by the same rule: the protocol core's
(``migrate.phases``) for the holder's state, which every holder answer carries. Dirty
tracking and page reads happen here, off the event loop; everything this side sends to the
destination goes out as one ordered stream (the reply stream of ``source_precopy`` and
``source_freeze``): the image header, layouts and their pages, then the process's state.

Methods: ``source_open`` (preflight: hold the process, choose a tracker, describe what the
destination must have), ``source_very_files`` (what the destination sees as the very same
file: a write lock on one waited out), ``source_precopy`` (rounds while it runs), ``source_freeze`` (freeze,
last delta, state), ``source_commit_pending``, ``source_kill``, ``source_hold``,
``source_release``, ``source_stand_in`` (in place of ``source_kill``: ``agent.standin``).
"""
from __future__ import annotations

import json
import math
import os
import platform
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import trio

from agent import carried_files, cgroups, fdtable, locks, mempolicy, sched, urgency
from agent.carried_files import CarriedFile
from agent.dump import TOOL_VERSION, image_header
from agent.files import FileFact, describe_files, vdso_digest
from agent.holder import HELD_DIR, HolderClient, start_time
from agent.inflight import InFlight
from agent.inject import SCRATCH_SIZE, spare_address
from agent.procfs import ids_held_outside, process_tree, read_status, thread_ids
from precopy import parent_frames, sysv
from precopy.kernel import boot_id, xsave_supported_mask
from precopy.policy import PrecopyPolicy, RoundStats
from precopy.probe import choose_tracker
from agent.tree import tree_record
from migrate.phases import SETTLE, Failure
from precopy.rounds import GroupResult, StreamCursor, final_group, precopy_group
from precopy.tracker import DirtyTracker, make_tracker
from transport.frozen import ready_all
from transport._nursery import service_nursery
from transport.errors import MigrationError, NoSuchProcess, ProcessError, ProcessExited, ProtocolError, UnsupportedResource
from transport.levels import Level, check_level
from transport.pages import PageBatch
from transport.rpc import CallContext
from transport.records import WireRecord
from transport.schema import (
    FORMAT_VERSION,
    EventFiles,
    InetSockets,
    Pipes,
    ProcessBegin,
    UnixSockets,
)
from transport.tcp import HANDSHAKE_TIMEOUT, open_data_channel


class HolderControl:
    """``precopy.control.ProcessControl`` for one process of the job, through the holder.

    While the migration itself holds the job frozen (the final round), pausing is a no-op
    and leaving a pause does not thaw it."""

    def __init__(self, holder: HolderClient, pid: int) -> None:
        self.holder = holder
        self.pid = pid
        self.frozen = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        if self.frozen:
            yield
            return
        self.holder.call("freeze", pid=self.pid)
        try:
            yield
        finally:
            self.holder.call("thaw", pid=self.pid)

    @contextmanager
    def injected(self) -> Iterator["HolderSyscalls"]:
        with self.paused():
            yield HolderSyscalls(self.holder, self.pid)


class HolderSyscalls:
    def __init__(self, holder: HolderClient, pid: int) -> None:
        self.holder = holder
        self.pid = pid

    def call(self, name: str, *args: int) -> int:
        return int(self.holder.call("inject", calls=[[name, list(args)]], pid=self.pid)[0])


class StreamSink:
    """A ``precopy.rounds.PageSink`` over this call's reply stream: layouts as records, pages
    as batches, in order. ``drain`` tells the bytes that went on the wire."""

    def __init__(self, ctx: CallContext, limit: float | None = None) -> None:
        self.ctx = ctx
        self.fs = ctx.rpc.fs
        self._mark = self.fs.stats.sent.bytes_on_wire
        self.limit = limit            # bytes/s of page data, None for no limit
        self._t0 = trio.current_time()
        self._sent = 0

    async def layout(self, mappings: Any) -> None:
        await self.ctx.send_record(mappings)

    async def record(self, rec: Any) -> None:
        await self.ctx.send_record(rec)

    async def send_batch(self, batch: PageBatch) -> int:
        if self.limit:
            # Pace to the limit: the batch may leave once the time for those before it is up.
            await trio.sleep_until(self._t0 + self._sent / self.limit)
            self._sent += len(batch.data)
        await self.ctx.send_batch(batch)
        return 0

    async def drain(self) -> int:
        await self.fs.flush()
        now = self.fs.stats.sent.bytes_on_wire
        sent, self._mark = now - self._mark, now
        return sent


class DataChannelSink:
    """A PageSink over a direct TCP data channel to the destination agent (``--data-channel
    tcp``): one upload call, ``dest_receive`` on the destination's data listener, carries every
    layout, page and state record of the migration in order. A pump task on this connection's
    nursery owns the channel, so it outlives the calls that feed it."""

    def __init__(self, nursery: trio.Nursery, to: dict[str, Any], level: Level, limit: float | None,
                 connect_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self._tx, self._rx = trio.open_memory_channel[Any](16)
        self.connected = trio.Event()
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.limit = limit
        self.peer: Any = None
        self._t0 = trio.current_time()
        self._sent = 0
        self._wire = 0
        self._mark = 0
        nursery.start_soon(self._pump, to, level, connect_timeout)

    async def _pump(self, to: dict[str, Any], level: Level, connect_timeout: float) -> None:
        try:
            async with open_data_channel(str(to["address"]), int(to["port"]), key=to["key"], level=level,
                                         connect_timeout=connect_timeout) as peer:
                self.peer = peer
                self.connected.set()
                async with peer.open_call("dest_receive", upload=True, session=str(to["session"])) as call:
                    async for item in self._rx:
                        if isinstance(item, _Drain):
                            if not item.applied:
                                call.end_pages()
                            await peer.fs.flush()
                            self._wire = peer.fs.stats.sent.bytes_on_wire
                            if item.applied:
                                await peer.flow.wait_drained()     # applied by the destination
                            item.done.set()
                        elif isinstance(item, PageBatch):
                            await call.send_batch(item)
                        else:
                            await call.send_record(item)
                    await call.result()      # the destination applied it all (or the error)
        except BaseException as exc:   # handed to whoever feeds or closes the sink
            self.error = exc
            if not isinstance(exc, (MigrationError, trio.Cancelled)):
                raise
        finally:
            self.done.set()

    @property
    def cipher(self) -> str:
        return str(getattr(self.peer.fs.transport, "cipher", "")) if self.peer is not None else ""

    async def _until(self, event: trio.Event) -> None:
        """Wait for ``event``, or for the pump to end (the channel is gone) if sooner."""
        async with trio.open_nursery() as nursery:
            async def pump_ended() -> None:
                await self.done.wait()
                nursery.cancel_scope.cancel()
            nursery.start_soon(pump_ended)
            await event.wait()
            nursery.cancel_scope.cancel()

    async def wait_connected(self) -> None:
        """Return once the channel is open (the key proved both ways); raise why it is not."""
        await self._until(self.connected)
        if not self.connected.is_set():
            raise self.error or ProcessError("the data channel closed while opening")

    async def _put(self, item: Any) -> None:
        if self.error is not None:
            raise self.error
        try:
            await self._tx.send(item)
        except trio.BrokenResourceError:
            await self.done.wait()
            raise self.error or ProcessError("the data channel closed") from None

    async def layout(self, mappings: Any) -> None:
        await self._put(mappings)

    async def record(self, rec: Any) -> None:
        await self._put(rec)

    async def send_batch(self, batch: PageBatch) -> int:
        if self.limit:
            await trio.sleep_until(self._t0 + self._sent / self.limit)
            self._sent += len(batch.data)
        await self._put(batch)
        return 0

    async def drain(self) -> int:
        """Wait until the destination has applied everything sent so far; the bytes it took on
        the wire."""
        return await self._drain(_Drain(applied=True))

    async def finish(self) -> int:
        """End the stream: return once all of it is written out (the bytes it took on the
        wire), not once the destination has it. Its ``dest_restore`` waits for the stream and
        fails if it broke; the pump awaits the destination's answer to the upload meanwhile."""
        wire = await self._drain(_Drain(applied=False))
        await self._tx.aclose()
        return wire

    async def _drain(self, mark: "_Drain") -> int:
        await self._put(mark)
        await self._until(mark.done)
        if self.error is not None:
            raise self.error
        if not mark.done.is_set():
            raise ProcessError("the data channel closed")
        sent, self._mark = self._wire - self._mark, self._wire
        return sent


class _Drain:
    """A mark in a data channel's queue: everything before it written (``applied``: and
    applied by the destination; else the upload ends there)."""

    def __init__(self, applied: bool) -> None:
        self.applied = applied
        self.done = trio.Event()


@dataclass
class SourceSession:
    """One migration on the source: the job (a process and its descendants), held by the
    holder, a tracker per process, and what the destination has been told of the tree."""

    pid: int
    holder: HolderClient
    tracker_name: str
    carry_tree: bool = True      # the stream names each process (ids kept); off: one process, new pid
    trackers: dict[int, DirtyTracker] = field(default_factory=dict)
    controls: dict[int, HolderControl] = field(default_factory=dict)
    result: GroupResult | None = None
    rounds: list[RoundStats] = field(default_factory=list)
    cursor: StreamCursor = field(default_factory=StreamCursor)
    told: list[tuple[int, int]] = field(default_factory=list)   # the tree as the destination knows it
    # How many trees the destination was told: it forks each process of the first as the stream
    # turns from its parent, unless the tree changes before (then all at once, ``RestoreSession``).
    trees_told: int = 0
    frozen: bool = False          # the migration holds the job frozen (the final round)
    urgent: bool = False          # its steps run at real-time priority (``agent.urgency``)
    urgency: urgency.Urgency = field(default_factory=urgency.Urgency)
    realtime: bool = False        # ... and do (the agent may)
    header_sent: bool = False
    bandwidth_limit: float | None = None
    level: Level = "auto"
    data_sink: DataChannelSink | None = None
    inflight: InFlight = field(default_factory=InFlight)   # precopy or freeze, while it runs
    idents: dict[str, tuple[int, int]] = field(default_factory=dict)   # the job's files: (st_dev, st_ino)
    very: list[list[int]] = field(default_factory=list)   # of those, the destination's very files
    # Where each process's scratch can go at the freeze, worked out from its tracker's last
    # layout once pre-copy ended (a pass over every mapping: not inside the freeze).
    spares: dict[int, tuple[object, int | None]] = field(default_factory=dict)

    def spare(self, pid: int) -> int | None:
        """``inject.spare_address`` in the last layout of ``pid``'s tracker."""
        layout = self.trackers[pid].layout
        known = self.spares.get(pid)
        if known is None or known[0] is not layout:
            known = self.spares[pid] = (layout, spare_address([(e.start, e.end) for e in layout]))
        return known[1]

    def sink(self, ctx: CallContext, to: dict[str, Any] | None,
             connect_timeout: float = HANDSHAKE_TIMEOUT) -> "StreamSink | DataChannelSink":
        """Where this session's stream goes: the call's reply stream, or the data channel."""
        if to is None:
            return StreamSink(ctx, self.bandwidth_limit)
        if self.data_sink is None:
            self.data_sink = DataChannelSink(ctx.rpc.nursery, to, self.level, self.bandwidth_limit,
                                             connect_timeout)
        return self.data_sink

    def tracked(self, pids: list[int], left: Sequence[int] = ()) -> dict[int, DirtyTracker]:
        """Trackers for ``pids`` (made for processes that joined; not started), those of
        ``left`` stopped."""
        for p in left:
            self._untrack(p)
        initial = not self.trackers
        for p in pids:
            if p not in self.trackers:
                control = HolderControl(self.holder, p)
                control.frozen = self.frozen
                try:
                    self.trackers[p] = make_tracker(self.tracker_name, p, control)
                except ProcessExited:
                    if p == self.pid or self.frozen:
                        raise
                    continue      # gone since the holder listed it: it leaves next round
                self.controls[p] = control
        if len(self.trackers) > 1:      # a tree's pages are read unpinned, so that what they share stays shared
            for tracker in self.trackers.values():
                tracker.reader.pin = False
        if initial and self.carry_tree and self.trees_told == 1:
            # Tracked from the start, each process's first copy goes right after its parent's,
            # and the destination forks its stub between the two: the pages it shares with it
            # go as such (``precopy.parent_frames``). Not where the tree changed since the header
            # told it (a process forked in between): the destination then forks every stub at
            # once; nor for a process that joins later, whose stub is forked before its
            # parent's next pages are in.
            for p, tracker in self.trackers.items():
                try:
                    ppid = int(read_status(p).get("PPid", "0"))
                except (OSError, NoSuchProcess):
                    continue
                tracker.inherits_from = self.trackers.get(ppid)
        # In the order of the tree the destination was told (the holder lists a process that
        # joined last): its plan forks each process's children, in that order, as the stream
        # turns from the process (``RestoreSession``), which must come before them.
        order = {pid: i for i, (pid, _) in enumerate(self.told)}
        return {p: self.trackers[p] for p in sorted((p for p in pids if p in self.trackers),
                                                    key=lambda p: order.get(p, len(order)))}

    def _untrack(self, pid: int) -> None:
        tracker = self.trackers.pop(pid, None)
        self.controls.pop(pid, None)
        if tracker is not None:
            try:
                tracker.stop()
            except OSError:
                pass

    async def tell_tree(self, sink: Any) -> None:
        """Send the tree as it is now (processes, zombies among them) if the destination
        does not know it so."""
        record = await _blocking(tree_record, self.pid)
        now = [(m.pid, m.exit_status) for m in record.members]
        if now == self.told:
            return
        if not self.carry_tree:
            if len(now) > 1:
                raise UnsupportedResource(
                    f"pid {self.pid} forked during the migration ({', '.join(str(p) for p, _ in now[1:5])}): a "
                    "process tree keeps its pids; migrate it without --new-pid", pid=self.pid)
            return
        await sink.record(record)
        self.cursor.reset()
        self.trees_told += 1
        self.told = now

    def close(self, how: str | None = None, failure: Failure = Failure.PEER_DIED) -> dict[str, Any]:
        """Settle the processes and end tracking: ``how`` is the holder's ``release`` (let them
        run) or ``hold`` (stop them); by default, what the protocol core says about ``failure``
        in the holder's state (nothing once they are settled). The holder's answer, if any."""
        self.urgency.end()
        for p in list(self.trackers):
            self._untrack(p)
        event = SETTLE.get(self.holder.action(failure))
        how = how or (event.value if event is not None else None)
        answer: dict[str, Any] = {}
        if how is not None:
            try:
                answer = self.holder.call(how)
            except MigrationError:
                pass
        self.holder.close()
        return answer



SESSIONS: dict[int, SourceSession] = {}
COLLECT_CALLS = 4        # the holder reads a frozen tree's state in this many parts
# A process's records that list nothing when absent: an empty one is not sent (a tree sends
# a process's state inside the downtime, record by record). Type -> its list.
NONE_IF_ABSENT = {Pipes.TYPE: "pipes", UnixSockets.TYPE: "sockets", EventFiles.TYPE: "files"}


def _session(ctx: CallContext) -> SourceSession:
    s = SESSIONS.get(id(ctx.rpc))
    if s is None:
        raise ProcessError("no source process is open on this connection: call source_open first")
    return s


async def _blocking(fn: Any, *args: Any, **kw: Any) -> Any:
    return await trio.to_thread.run_sync(lambda: fn(*args, **kw))


async def source_open(ctx: CallContext, *, pid: int, tracker: str = "auto", exempt: list[str] | None = None,
                      level: Level = "auto", bandwidth_limit: float | None = None,
                      redirect: list[list[Any]] | None = None, new_pid: bool = False) -> dict[str, Any]:
    """Preflight on the source: hold ``pid`` and its descendants (still running), pick a
    tracker, and describe what the destination must match. Refusals leave every process
    untouched. ``redirect`` ([fd, path] pairs): the root's fds to the outside that become
    files on the destination. ``new_pid``: the destination gives the process a new pid, so
    the stream does not carry a tree (a process that forks meanwhile is refused)."""
    if id(ctx.rpc) in SESSIONS:
        raise ProcessError("a source process is already open on this connection")
    try:
        check_level(level)
    except ValueError as exc:
        raise ProcessError(str(exc)) from None
    ctx.rpc.fs.set_level(level)
    if pid == os.getpid() or pid == os.getppid():
        raise ProcessError(f"pid {pid} is kcr-migrate's own agent", pid=pid)
    holder = HolderClient()
    redirected = {int(fd) for fd, _ in redirect or []}
    try:
        seized = await _blocking(holder.call, "seize", pid=pid, redirect=redirect or [])
        pids = [int(p) for p in seized["pids"]]
        choice = await _blocking(choose_tracker, tracker, pid)
        facts: dict[str, FileFact] = {}
        processes = []
        for p in pids:
            try:
                described = await _blocking(describe_files, p, exempt or [], redirected if p == pid else set())
                summary = await _blocking(_process_summary, p, pids)
                processes.append(summary)
            except (NoSuchProcess, FileNotFoundError, ProcessLookupError):
                if p == pid:
                    raise NoSuchProcess(f"pid {pid} exited while it was being checked", pid=pid) from None
                continue      # a child that exited since the holder listed it (make's): it leaves the job
            facts.update((f.path, f) for f in described.files if f.path not in facts)
        vdso = await _blocking(vdso_digest, pid)
        names = await _blocking(fdtable.bound_names, [p["pid"] for p in processes])
        ports = await _blocking(fdtable.inet_bound, [p["pid"] for p in processes])
        segments = await _blocking(sysv.attached, pids)
        outside = await _blocking(ids_held_outside, [p["pid"] for p in processes])
    except BaseException:
        await _blocking(holder.close)
        raise
    SESSIONS[id(ctx.rpc)] = SourceSession(pid, holder, choice.name, carry_tree=not new_pid,
                                          bandwidth_limit=bandwidth_limit, level=level,
                                          idents={f.path: (int(f.ident["dev"]), int(f.ident["ino"]))
                                                  for f in facts.values() if "ino" in f.ident})
    root = processes[0]
    return {
        "pid": pid, "comm": root["comm"], "uid": root["uid"], "threads": sum(p["threads"] for p in processes),
        # what the job needs at the destination: each process's memory, but once what it shares
        # with its parent (``precopy.parent_frames``)
        "tids": root["tids"], "memory_bytes": sum(p["memory_bytes"] - p["shared_bytes"] for p in processes),
        "processes": processes,
        "arch": platform.machine(), "kernel_release": platform.release(), "boot_id": boot_id(),
        "xsave_mask": xsave_supported_mask(), "vdso_sha256": vdso, "files": [f.as_wire() for f in facts.values()],
        "exempt": list(exempt or []),     # filesystem hooks bring these: mapped only at restore
        "pinned_cpus": sorted(set().union(*(p["pinned_cpus"] for p in processes))),
        "numa_nodes": sorted(set().union(*(p["numa_nodes"] for p in processes))),
        "locks": [lock for p in processes for lock in p["locks"]],
        "unix_names": [b.as_wire() for b in names],     # the destination must be able to bind them
        "inet_bound": InetSockets(tuple(ports)).to_wire(),    # and these addresses and ports
        "sysv": [sysv.to_wire(s) for s in segments],      # made again under their ids (or this very one)
        "tracker": choice.name, "tracker_reason": choice.reason, "tool_version": TOOL_VERSION,
        "format_version": FORMAT_VERSION,
        # processes in the job's session or group outside its tree (a daemon it double-forked):
        # they stay here, as phrases (``agent.procfs.ids_held_outside``)
        "held_outside": outside,
    }


async def source_very_files(ctx: CallContext, *, paths: list[str], host: str) -> dict[str, Any]:
    """Preflight: ``paths`` are on ``host`` the very files the job has (the same host, or
    storage both share). A write lock the job holds on one cannot change hands: wait up to
    ``locks.UNLOCK_WAIT`` for a moment it holds none (a database holds its lock per commit),
    and refuse one held throughout; the freeze then waits for such a moment too."""
    s = _session(ctx)
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths) or not isinstance(host, str):
        raise ProtocolError("source_very_files: paths must be a list of paths")
    s.very = [list(s.idents[p]) for p in paths if p in s.idents]
    files = {(dev, ino) for dev, ino in s.very}
    held = await _blocking(locks.wait_unlocked, lambda: process_tree(s.pid), files, locks.UNLOCK_WAIT)
    if held is not None:
        pid, path, lock = held
        locks.refuse_same_file(path, lock, host, pid, held_for=locks.UNLOCK_WAIT)
    return {}


def _process_summary(pid: int, tree: list[int]) -> dict[str, Any]:
    """pid, parent, command, threads and memory of one process of the job ``tree``, for
    preflight and reports; "shared_bytes": of its memory, what it holds as its parent's very
    pages, if the parent is in the tree (its restore shares them again)."""
    status = read_status(pid)
    tids = thread_ids(pid)
    ppid = int(status.get("PPid", "0"))
    shared = 0
    if ppid in tree and pid != tree[0]:
        try:
            shared = parent_frames.shared_with_parent(pid, ppid)
        except (OSError, NoSuchProcess):
            shared = 0           # (either exited meanwhile: the job's checks see to that)
    return {"pid": pid, "ppid": ppid, "comm": status.get("Name", ""),
            "uid": int(status["Uid"].split()[1]), "threads": int(status.get("Threads", "1")),
            "tids": tids, "memory_bytes": int(status.get("VmRSS", "0 kB").split()[0]) * 1024, "shared_bytes": shared,
            "pinned_cpus": sorted(sched.pinned_cpus(tids)), "locks": locks.held_by(pid),
            "numa_nodes": sorted(mempolicy.policy_nodes(pid, tids)), "cgroups": list(cgroups.read(pid))}


async def source_connect(ctx: CallContext, *, to: dict[str, Any], timeout: float = HANDSHAKE_TIMEOUT
                         ) -> dict[str, Any]:
    """Open the data channel ``to`` now, in preflight, and keep it for the migration.
    ``connected`` False (with the reason) when it cannot be opened within ``timeout``."""
    s = _session(ctx)
    if not 0 < timeout <= HANDSHAKE_TIMEOUT:
        raise ProtocolError(f"source_connect: a timeout of {timeout} s")
    sink = s.sink(ctx, to, timeout)
    if not isinstance(sink, DataChannelSink):
        raise ProtocolError("source_connect needs a data channel address")
    try:
        await sink.wait_connected()
    except MigrationError as exc:
        s.data_sink = None
        return {"connected": False, "error": str(exc)}
    return {"connected": True, "cipher": sink.cipher}


async def _send_fd_table(sink: Any, table: dict[str, Any]) -> None:
    """A process's fd records (Files, Pipes, UnixSockets, EventFiles, InetSockets), as the
    holder's ``collect_files`` wire them (ours), then the files it carries whole."""
    for wire in table["fds"]:
        listed = NONE_IF_ABSENT.get(wire["t"])
        if listed is not None and not wire.get(listed):
            continue       # none: the destination starts with none (``agent.restore.ProcessRecords``)
        await sink.record(WireRecord(wire))
    for c in table["carried"]:
        await _send_carried(sink, CarriedFile.from_wire(c))


async def _send_carried(sink: Any, c: CarriedFile) -> None:
    """A carried file's slices (``agent.carried_files``), each read off the event loop as the
    one before it goes out: the job is frozen, and the file is never held whole."""
    slices = carried_files.read(c)
    try:
        while (rec := await _blocking(next, slices, None)) is not None:
            await sink.record(rec)
    finally:
        slices.close()


async def _send_header(sink: Any, s: SourceSession) -> None:
    if not s.header_sent:
        await sink.record(image_header(s.pid, "live", b""))
        s.header_sent = True
        if s.carry_tree:
            s.cursor.named = True
            await s.tell_tree(sink)


def _policy(args: dict[str, Any] | None) -> PrecopyPolicy:
    try:
        return PrecopyPolicy(**(args or {}))
    except (TypeError, ValueError) as exc:
        raise ProcessError(f"invalid pre-copy policy: {exc}") from None


async def source_precopy(ctx: CallContext, *, policy: dict[str, Any] | None = None,
                         to: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pre-copy rounds while the process runs, streamed back (or over the data channel ``to``);
    ends when the policy says stop."""
    s = _session(ctx)
    ready_all()           # what the agent imported since it began: compiled now, not while frozen
    with s.inflight.run("source_precopy"):
        return await _precopy(ctx, s, policy, to)


async def _precopy(ctx: CallContext, s: SourceSession, policy: dict[str, Any] | None,
                   to: dict[str, Any] | None) -> dict[str, Any]:
    sink = s.sink(ctx, to)
    await _send_header(sink, s)

    async def members() -> dict[int, DirtyTracker]:
        now = await _blocking(s.holder.call, "members")
        pids = [int(p) for p in now["pids"]]
        await s.tell_tree(sink)
        return await _blocking(s.tracked, pids, [int(p) for p in now["left"]])

    def on_round(stats: RoundStats) -> None:
        s.rounds.append(stats)
        ctx.progress(event="round", **stats.as_dict())

    s.result = await precopy_group(members, sink, s.cursor, _policy(policy), on_round=on_round)
    for p in list(s.trackers):
        s.spare(p)
    out = s.result.as_dict()
    return {k: out[k] for k in ("stop_reason", "rounds", "pages_pending", "memory_bytes")}


async def source_freeze(ctx: CallContext, *, to: dict[str, Any] | None = None) -> dict[str, Any]:
    """Freeze every thread, send the last delta and the process's state (the downtime starts)."""
    s = _session(ctx)
    with s.inflight.run("source_freeze"):
        return await _freeze(ctx, s, to)


async def _freeze(ctx: CallContext, s: SourceSession, to: dict[str, Any] | None) -> dict[str, Any]:
    # After a pre-copy that converged, the freeze's steps here and in the holder run at
    # real-time priority (``agent.urgency``), and so does the commit that follows.
    s.urgent = urgency.short_freeze(s.result.pages_pending if s.result is not None else -1)
    s.realtime = s.urgency.begin() if s.urgent else False      # until the commit, or the session's end
    try:
        return await _frozen_steps(ctx, s, to)
    except BaseException:
        s.urgency.end()
        raise


async def _frozen_steps(ctx: CallContext, s: SourceSession, to: dict[str, Any] | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    frozen = await _blocking(s.holder.call, "freeze", unlocked=s.very, urgent=s.urgent)
    t_frozen = time.perf_counter()
    lock_retries = int(frozen.get("lock_retries", 0))
    if lock_retries:              # let run, and frozen again, for a write lock: the last freeze counts
        t0 = t_frozen - (time.monotonic_ns() - int(frozen["first_interrupt_ns"])) / 1e9
    s.frozen = True
    for control in s.controls.values():
        control.frozen = True
    pids = [int(p) for p in frozen["pids"]]
    t_state = t_frozen
    # A tracker that starts now (a process that joined as the job froze; stop-and-copy) lends
    # the process a userfaultfd fd for a moment: its fd table is read after that.
    starting = s.result is None or any(p not in s.result.pending for p in pids)
    # A process pre-copy tracked has its state read from the start, beside its last scan: the
    # scratch that reading maps into it for a moment goes where its last layout had room, and
    # its scan leaves that very mapping out. A process whose spare room it took since, or one
    # without a layout yet, is read once it was scanned.
    scratch: dict[int, int] = {}
    if not starting:
        for p, tracker in [(p, s.trackers[p]) for p in pids]:
            at = s.spare(p)
            if at is not None:
                scratch[p] = at
                tracker.hidden = frozenset({(at, at + SCRATCH_SIZE)})
    states_in, states_out = trio.open_memory_channel[dict[str, Any]](math.inf)
    sigcont_unseen = [False]
    threads = 0
    after_scan = 0        # processes whose state could only be read once they were scanned
    try:
        async with service_nursery() as nursery:
            files_read = trio.Event()
            fd_tables: dict[int, dict[str, Any]] = {}

            def files_in(tables: list[list[Any]]) -> None:
                fd_tables.update({int(p): table for p, table in tables})
                files_read.set()

            async def collect_files() -> None:
                files_in((await _blocking(s.holder.call, "collect_files", urgent=s.urgent))["processes"])

            # The rest of the state is read while the last pages are scanned and go out: a few
            # processes at a time (COLLECT_CALLS calls), sent while the next part is read. The fd
            # tables (and the tree's checks) touch no memory: read first, beside the scans (by
            # the first part, where it can start at once).
            scans_done: dict[int, trio.Event] = {p: trio.Event() for p in pids}

            async def read_states(part: list[int], placed: dict[int, int]) -> list[int]:
                """``part``'s states, queued to go; the processes left for later (their scratch's
                place was taken)."""
                files = not files_read.is_set()
                got = await _blocking(s.holder.call, "collect", pids=part, files=files, urgent=s.urgent,
                                      scratch=[[p, placed[p]] for p in part if p in placed])
                if files:
                    files_in(got["fd_tables"])
                sigcont_unseen[0] = bool(got.get("sigcont_unseen", False))     # of all read so far
                for proc in got["processes"]:
                    states_in.send_nowait(proc)
                return [int(p) for p in got["later"]]

            async def collect_state() -> None:
                nonlocal t_state, after_scan
                async with states_in:
                    if starting:
                        for done in scans_done.values():
                            await done.wait()
                        await collect_files()
                    elif not scratch:
                        await files_read.wait()
                    step = max(1, -(-len(pids) // COLLECT_CALLS))
                    for i in range(0, len(pids), step):
                        part = pids[i:i + step]
                        for p in part:
                            if p not in scratch:
                                await scans_done[p].wait()
                        later = await read_states(part, scratch)
                        for p in later:
                            await scans_done[p].wait()
                        if later:
                            await read_states(later, {})
                        after_scan += len(later) + sum(p not in scratch for p in part)
                    t_state = time.perf_counter()

            def scanned_one(pid: int) -> None:
                if pid in scans_done:
                    scans_done[pid].set()

            def scanned() -> None:
                for done in scans_done.values():     # (a process without a tracker: gone, it fails below)
                    done.set()

            if not starting and not scratch:
                nursery.start_soon(collect_files)
            nursery.start_soon(collect_state)

            sink = s.sink(ctx, to)
            await _send_header(sink, s)
            await s.tell_tree(sink)           # processes forked, exited or gone since the last round
            trackers = await _blocking(s.tracked, pids, [int(p) for p in frozen["left"]])
            # After pre-copy: what it left pending and the last delta; without (stop-and-copy),
            # or for a process that joined as the job froze: every page, now.
            # A tree's fd tables go before any state, every process's: the destination makes
            # what they share then, and restores each process as its state follows
            # (``agent.restore_session``). A process's state goes once its last pages are out
            # and it was read, between the next processes' pages: the destination restores it
            # while the rest come, and the holder reads the next ones meanwhile.
            tables_sent = False
            pages_out: set[int] = set()
            held: dict[int, dict[str, Any]] = {}       # states read, their pages still to go

            async def send_tables() -> None:
                nonlocal tables_sent
                tables_sent = True
                for p in pids:
                    await sink.record(ProcessBegin(p))
                    await _send_fd_table(sink, fd_tables[p])
                    s.cursor.pid = p

            async def send_state(proc: dict[str, Any]) -> None:
                nonlocal threads
                pid = int(proc["pid"])
                threads += len(proc["threads"])
                if s.carry_tree:
                    await sink.record(ProcessBegin(pid))
                    s.cursor.pid = pid
                await sink.record(WireRecord(proc["process"]))      # the holder's: ours
                if not s.carry_tree:
                    await _send_fd_table(sink, fd_tables[pid])
                for t in proc["threads"]:
                    await sink.record(WireRecord(t))

            async def pages_sent(pid: int) -> None:
                pages_out.add(pid)
                while True:
                    try:
                        proc = states_out.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    held[int(proc["pid"])] = proc
                ready = [p for p in pids if p in held and p in pages_out]
                if not ready or not files_read.is_set():
                    return
                if not tables_sent:
                    await send_tables()
                for p in ready:
                    await send_state(held.pop(p))

            final = await final_group(trackers, sink, s.cursor, s.result, scanned=scanned, scanned_one=scanned_one,
                                      pages_sent=pages_sent if s.carry_tree else None)
            t_pages = time.perf_counter()
            await files_read.wait()
            if s.carry_tree and not tables_sent:
                await send_tables()
            for p in [p for p in pids if p in held]:
                await send_state(held.pop(p))
            async with states_out:
                async for proc in states_out:
                    await send_state(proc)
    finally:
        for tracker in s.trackers.values():
            tracker.hidden = frozenset()     # every scratch is unmapped by then, whatever happened
    s.cursor.reset()
    # Written out, not yet applied: dest_restore waits for the stream on the destination.
    state_bytes = await (sink.finish() if isinstance(sink, DataChannelSink) else sink.drain())
    t_end = time.perf_counter()
    final = replace(final, bytes_on_wire=final.bytes_on_wire + state_bytes)
    # Where the frozen time on this side went: stopping the threads, the last pages (scanned,
    # read and queued), waiting for the rest of the state (read meanwhile), and sending it
    # until the destination had everything, the last pages included.
    t_state = max(t_state, t_pages)
    times = {"freeze_ms": (t_frozen - t0) * 1000, "pages_ms": (t_pages - t_frozen) * 1000,
             "state_wait_ms": (t_state - t_pages) * 1000, "state_send_ms": (t_end - t_state) * 1000,
             "lock_retries": lock_retries, "states_after_scan": after_scan, "realtime": int(s.realtime)}
    # Tracking ends when the session does (kill, hold or release): unregistering a large
    # address space takes tens of milliseconds that do not belong in the downtime.
    # "commit_beside_restore": the job would not see the SIGCONT a release after commit_pending
    # sends, so the orchestrator may ask for the commit while the destination restores.
    return {"first_interrupt_ns": frozen["first_interrupt_ns"], "final": {**final.as_dict(), **times},
            "threads": threads, "processes": pids,
            "joined": frozen["joined"], "left": frozen["left"], "commit_beside_restore": sigcont_unseen[0]}


async def source_commit_pending(ctx: CallContext) -> dict[str, Any]:
    """The destination is about to run the process: from now on, losing us stops the source.
    Returns the signals sent to the job since its state was read (``agent.signals``)."""
    s = _session(ctx)
    try:
        got = await _blocking(s.holder.call, "commit_pending", urgent=s.urgent)
    finally:
        s.urgency.end()
    return {"signals": got.get("signals", [])}


async def source_kill(ctx: CallContext) -> dict[str, Any]:
    """The destination runs the process: end the source (via its pidfd). Returns the signals
    sent to the job since ``source_commit_pending`` (``agent.signals``)."""
    s = SESSIONS.pop(id(ctx.rpc), None)
    if s is None:
        raise ProcessError("no source process is open on this connection")
    await s.inflight.stop()
    got = await _blocking(s.holder.call, "kill")
    await _blocking(s.close)
    return {"signals": got.get("signals", [])}


async def source_stand_in(ctx: CallContext, *, to: dict[str, Any]) -> dict[str, Any]:
    """The destination runs the process: instead of ending the source, make its root a stand-in
    (``agent.standin``) linked to the deputy ``to`` names (address, port, key, lost rule,
    timeout); its other processes are ended. The holder becomes the stand-in's keeper and
    outlives this agent. If that fails, the source was ended as by ``source_kill``, and the
    error says so."""
    s = SESSIONS.pop(id(ctx.rpc), None)
    if s is None:
        raise ProcessError("no source process is open on this connection")
    await s.inflight.stop()
    for p in list(s.trackers):
        s._untrack(p)
    try:
        result: dict[str, Any] = await _blocking(s.holder.call, "stand_in", to=to)
    except MigrationError:
        await _blocking(s.holder.close)
        raise
    s.holder.let_live()
    return result


async def source_hold(ctx: CallContext) -> dict[str, Any]:
    """The destination's fate is unknown: leave the source stopped (SIGSTOP), untraced."""
    s = SESSIONS.pop(id(ctx.rpc), None)
    if s is None:
        raise ProcessError("no source process is open on this connection")
    await s.inflight.stop()
    await _blocking(s.close, "hold")
    return {"pid": s.pid}


async def source_release(ctx: CallContext) -> dict[str, Any]:
    """Roll back: the process runs on as if nothing happened. ``root_exited``: it had ended
    by then (the job finished while it was being moved)."""
    s = SESSIONS.pop(id(ctx.rpc), None)
    if s is None:
        return {}
    await s.inflight.stop()
    answer = await _blocking(s.close, "release")
    return {"root_exited": bool(answer.get("root_exited", False))}


async def resolve(ctx: CallContext, *, pid: int, action: str) -> dict[str, Any]:
    """Settle a source a migration left stopped: ``kill`` it or ``resume`` it."""
    if action not in ("kill", "resume"):
        raise ProcessError(f"unknown action {action!r}: use kill or resume")
    status = await _blocking(read_status, pid)
    if not status.get("State", "").startswith("T"):
        raise ProcessError(f"pid {pid} is not stopped (state {status.get('State')}): there is nothing to settle",
                           pid=pid)
    record = os.path.join(HELD_DIR, f"{pid}.json")
    try:
        with open(record) as f:
            noted = json.load(f)
    except (OSError, ValueError):
        noted = None
    if noted is None or noted.get("start_time") != start_time(pid):
        raise ProcessError(f"pid {pid} was not left stopped by a migration on this host: settle it by hand "
                           "(kill -CONT or kill -KILL) if you are sure", pid=pid)
    os.kill(pid, signal.SIGKILL if action == "kill" else signal.SIGCONT)
    os.unlink(record)
    return {"pid": pid, "action": action}


def close_sessions(rpc: object, failure: Failure = Failure.PEER_DIED) -> None:
    """The connection ended (``failure``: closed, or silent past its link timeout): settle the
    process it left as the protocol core says for the holder's state: it runs on, or after
    commit_pending stays stopped."""
    s = SESSIONS.pop(id(rpc), None)
    if s is not None:
        s.close(failure=failure)


METHODS = {
    "source_open": source_open, "source_connect": source_connect, "source_precopy": source_precopy,
    "source_freeze": source_freeze,
    "source_commit_pending": source_commit_pending, "source_kill": source_kill,
    "source_very_files": source_very_files,
    "source_stand_in": source_stand_in,
    "source_hold": source_hold, "source_release": source_release, "resolve": resolve,
}
