"""Checkpoint to an image stream, and restore from one: the engine under `kcr-migrate
checkpoint` and `kcr-migrate restore`.

Both run on a tracer thread (``agent.tracer``). A checkpoint checks the process before
freezing it; any failure before the image is complete thaws the process untouched. Only a
complete image (end record written and flushed) lets ``--leave-running`` off kill it.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import BinaryIO, Callable, Mapping

from agent import fdtable
from agent import freeze as freezer
from agent.dump import collect, collect_layout, image_header
from agent.inject import RemoteMemory
from agent.procfs import check_supported, check_target, process_tree, read_stat, shared_anonymous_memory
from agent.descriptions import Descriptions
from agent.fdtable import FdState
from agent.restore import ProcessRecords, Restorer
from precopy.layout import PageFinder
from precopy.pagemap import pagemap_scan_works
from precopy.reader import PageReader
from transport.errors import Cancelled, MigrationError, NoSuchProcess, ProtocolError, RestoreError, UnsupportedResource
from transport.image import ImageReader, ImageWriter
from transport.pages import PageBatch
from transport.schema import (
    EventFiles,
    Files,
    ImageHeader,
    Mappings,
    Pipes,
    ProcessBegin,
    ProcessTree,
    TreeMember,
    UnixSockets,
    check_objects_referenced,
)


@dataclass
class CheckpointOptions:
    leave_running: bool = False
    compress_level: int | None = 1      # None: store pages raw
    workers: int = 2
    cancel: threading.Event | None = None   # set it to roll back at the next safe point
    redirect: Mapping[int, str] = field(default_factory=dict)   # fd -> the file it becomes at restore


def _check_cancel(opts: CheckpointOptions, pid: int) -> None:
    if opts.cancel is not None and opts.cancel.is_set():
        raise Cancelled("interrupted: nothing was written and the process was left running", pid=pid)


@dataclass
class CheckpointStats:
    """Names as in CRIU's stats-dump where they mean the same."""

    pid: int = 0
    processes: int = 1
    threads: int = 0
    vmas: int = 0
    pages_written: int = 0
    bytes_raw: int = 0
    bytes_on_wire: int = 0
    frozen_time_ms: float = 0.0
    memdump_time_ms: float = 0.0
    total_time_ms: float = 0.0
    left_running: bool = False

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def checkpoint(pid: int, out: BinaryIO, opts: CheckpointOptions,
               on_complete: Callable[[], None] | None = None) -> CheckpointStats:
    """Dump ``pid`` and its descendants to ``out``. ``on_complete`` runs once the image is
    whole, before the kill (to fsync and rename a file into place: a process is never killed
    for a lost image). Every process is stopped before any state is read."""
    t0 = time.monotonic()
    pids = _check_tree(pid, opts)
    helds: list[freezer.Held] = []
    stats = CheckpointStats(pid=pid)
    complete = False
    try:
        for p in pids:
            helds.append(freezer.seize(p))
        _check_cancel(opts, pid)
        if process_tree(pid) != pids:
            raise UnsupportedResource(f"pid {pid}'s process tree changed while it was being frozen (a fork or an "
                                      "exit): nothing was written; try again", pid=pid)
        _check_tree(pid, opts, pids)          # again, now that nothing can change under us
        _check_cancel(opts, pid)
        fds = fdtable.collect_tree(pids, {pid: opts.redirect})      # checks the fd tables again too
        states = {}
        for held in helds:
            mem = RemoteMemory(held.pid, writable=False)
            try:
                states[held.pid] = collect(held, mem, fds=fds[held.pid])
            finally:
                mem.close()
        layouts = {p: collect_layout(p) for p in pids}
        writer = ImageWriter(out, level=opts.compress_level, workers=opts.workers)
        try:
            writer.record(image_header(pid, "checkpoint", states[pid].threads[0].xstate))
            if len(pids) > 1:
                writer.record(ProcessTree(tuple(_member(p) for p in pids)))
            t_mem = time.monotonic()
            for p in pids:
                if len(pids) > 1:
                    writer.record(ProcessBegin(p))
                state = states[p]
                for rec in (state.process, *state.fds.records(), layouts[p], *state.threads):
                    writer.record(rec)
                write_memory(p, layouts[p], writer, lambda: _check_cancel(opts, pid))
            stats.memdump_time_ms = (time.monotonic() - t_mem) * 1000
            _check_cancel(opts, pid)
            wstats = writer.finish()
        finally:
            writer.close()
        if on_complete is not None:
            on_complete()
        complete = True
        stats.processes = len(pids)
        stats.threads = sum(len(s.threads) for s in states.values())
        stats.vmas = sum(len(layout.vmas) for layout in layouts.values())
        stats.pages_written = wstats.pages
        stats.bytes_raw = wstats.bytes_raw
        stats.bytes_on_wire = wstats.bytes_on_wire
    finally:
        frozen_at = min((h.frozen_at for h in helds if h.frozen_at), default=0.0)
        failed: BaseException | None = None
        for held in reversed(helds):              # children first; every one, whatever fails
            try:
                if complete and not opts.leave_running:
                    freezer.kill(held)
                else:
                    freezer.let_go(held)
            except BaseException as exc:
                failed = failed or exc
        if failed is not None:
            raise failed
        if complete and not opts.leave_running:
            for p in pids:
                freezer.wait_gone(p)
        stats.frozen_time_ms = (time.monotonic() - frozen_at) * 1000 if frozen_at else 0.0
        stats.left_running = not complete or opts.leave_running
    stats.total_time_ms = (time.monotonic() - t0) * 1000
    return stats


def _check_tree(pid: int, opts: CheckpointOptions, frozen: list[int] | None = None) -> list[int]:
    """``pid`` and its descendants, each checked (and, before they are frozen, their fd tables
    together: frozen, ``collect_tree`` checks those as it reads them); refusals name what
    cannot be carried."""
    check_target(pid)
    pids = frozen or process_tree(pid)
    for p in pids[1:]:
        try:
            check_target(p)
        except NoSuchProcess:
            raise UnsupportedResource(
                f"pid {p}, a child in pid {pid}'s tree, has exited and was not reaped yet: kcr-migrate cannot "
                "carry a zombie yet; try again once its parent has waited for it", pid=p) from None
    for p in pids:
        check_supported(p, redirect=opts.redirect if p == pid else None, tree=pids)
    if frozen is None:
        fdtable.describe_tree(pids, {pid: opts.redirect})
    shared_anonymous_memory(pids)
    return pids


def _member(pid: int) -> TreeMember:
    stat = read_stat(pid)
    return TreeMember(pid=pid, ppid=int(stat[4]), pgid=int(stat[5]), sid=int(stat[6]), comm=stat[2])


def write_memory(pid: int, layout: Mappings, writer: ImageWriter,
                 check: Callable[[], None] = lambda: None) -> None:
    with PageFinder(pid, use_scan=pagemap_scan_works()) as finder, PageReader(pid) as reader:
        for vma in layout.vmas:
            runs = finder.populated(vma)
            if runs:
                for batch in reader.batches(runs, drop_zero=vma.shared):
                    check()
                    writer.pages(batch)


@dataclass
class RestoreResult:
    pid: int
    threads: int
    pages: int
    restore_time_ms: float
    pages_filled: int = 0      # of ``pages``, put in place by UFFDIO_COPY (the rest via /proc/PID/mem)
    warnings: list[str] = field(default_factory=list)
    processes: int = 1

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class _Process:
    """One process of an image: its restorer and its records as they arrive."""

    restorer: Restorer
    records: ProcessRecords = field(default_factory=ProcessRecords)


def restore(src: BinaryIO, *, resume: bool = True, cancel: threading.Event | None = None,
            new_pid: bool = False) -> tuple[RestoreResult, Restorer]:
    """Rebuild the process an image describes (with its descendants, for a tree); it runs on
    return unless ``resume`` is False. It keeps its pid and thread ids unless ``new_pid``
    (refused for a tree). Setting ``cancel`` aborts at the next record or page batch:
    nothing of it is left."""
    t0 = time.monotonic()
    reader = ImageReader(src)
    procs: dict[int, _Process] = {}
    current: _Process | None = None
    done = False
    try:
        for item in reader:
            if cancel is not None and cancel.is_set():
                raise Cancelled("interrupted: the half-restored process was removed")
            if isinstance(item, ImageHeader):
                current = procs[item.pid] = _Process(Restorer(item, keep_ids=not new_pid))
                continue
            if current is None:
                raise ProtocolError("the image does not start with its header: corrupt image")
            if isinstance(item, ProcessTree):
                if new_pid:
                    raise RestoreError("this image holds a process tree, which keeps its pids (parents wait for "
                                       "their children by pid): restore it without --new-pid")
                _build_tree(item, procs, current.restorer.header)
            elif isinstance(item, ProcessBegin):
                if item.pid not in procs or len(procs) == 1:
                    raise ProtocolError(f"records of process {item.pid}, which the image's tree lacks: corrupt image")
                current = procs[item.pid]
            elif isinstance(item, PageBatch):
                if not current.restorer.layout:
                    raise ProtocolError("page data before the memory layout: corrupt image")
                current.restorer.write_pages(item)
            elif isinstance(item, Mappings):
                if not current.restorer.begun:
                    current.restorer.begin(item)
                current.restorer.apply_layout(item)
            else:
                current.records.take(item)
        _finish(list(procs.values()))
        if resume:
            for p in reversed(procs.values()):           # children first: nothing runs before its parent is whole
                p.restorer.resume()
        done = True
    except MigrationError:
        raise
    except OSError as exc:
        raise RestoreError(f"restore failed: {exc}") from None
    finally:
        if not done:
            for p in reversed(procs.values()):
                p.restorer.abort()
    root = next(iter(procs.values())).restorer
    result = RestoreResult(
        pid=root.pid, threads=sum(len(p.records.threads) for p in procs.values()),
        pages=sum(p.restorer.report.pages_written for p in procs.values()),
        restore_time_ms=(time.monotonic() - t0) * 1000,
        pages_filled=sum(p.restorer.report.pages_filled for p in procs.values()),
        warnings=[w for p in procs.values() for w in p.restorer.report.warnings], processes=len(procs))
    return result, root


def _build_tree(tree: ProcessTree, procs: dict[int, _Process], header: ImageHeader) -> None:
    """Every process of the tree as a stub with its own pid, each made by its parent's, then
    put in its session and process group (session leaders, group leaders, then the rest)."""
    root = tree.members[0]
    if len(procs) != 1 or root.pid not in procs:
        raise ProtocolError("the image's process tree does not start with its header's process: corrupt image")
    procs[root.pid].restorer.spawn_stub()
    for m in tree.members[1:]:
        parent = procs[m.ppid].restorer
        procs[m.pid] = _Process(Restorer(header, stub_pid=parent.fork(m.pid)))
    members = {m.pid: m for m in tree.members}
    for m in tree.members[1:]:
        if m.sid == m.pid:
            procs[m.pid].restorer.stub_call("setsid")
    for m in tree.members[1:]:
        if m.pgid == m.pid and m.sid != m.pid:
            procs[m.pid].restorer.stub_call("setpgid", 0, 0)
    for m in tree.members[1:]:
        leader = members.get(m.pgid)
        if m.pgid != m.pid and leader is not None and leader.pgid == leader.pid and leader is not root:
            procs[m.pid].restorer.stub_call("setpgid", 0, m.pgid)


def _finish(procs: list[_Process]) -> None:
    """Everything but memory, for every process; the pipes and sockets they share are made
    once (``agent.descriptions``) and each takes its ends."""
    if not all(p.records.complete for p in procs):
        raise ProtocolError("the image lacks process, file or thread records: corrupt image")
    each = [p.records.fds() for p in procs]
    union = FdState(Files(tuple(f for s in each for f in s.files.fds)), Pipes(tuple(x for s in each for x in s.pipes.pipes)),
                    UnixSockets(tuple(x for s in each for x in s.sockets.sockets)),
                    EventFiles(tuple(x for s in each for x in s.events.files)))
    check_objects_referenced(*union.records())
    descriptions = Descriptions()
    try:
        descriptions.add(union)
        for p, fds in zip(procs, each):
            p.restorer.finish(p.records.state, fds, p.records.threads, descriptions=descriptions)  # type: ignore[arg-type]
    finally:
        descriptions.close()
