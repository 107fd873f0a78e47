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

from agent import freeze as freezer
from agent.dump import collect, collect_layout, image_header
from agent.inject import RemoteMemory
from agent.procfs import check_supported, check_target
from agent.restore import Restorer
from precopy.layout import PageFinder
from precopy.pagemap import pagemap_scan_works
from precopy.reader import PageReader
from transport.errors import Cancelled, MigrationError, ProtocolError, RestoreError
from transport.image import ImageReader, ImageWriter
from transport.pages import PageBatch
from transport.schema import (EndOfImage, Files, ImageHeader, Mappings, Pipes, ProcessState, ThreadState,
                              UnixSockets)


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
    """Dump ``pid`` to ``out``. ``on_complete`` runs once the image is whole, before the kill
    (to fsync and rename a file into place: a process is never killed for a lost image)."""
    t0 = time.monotonic()
    check_target(pid)
    check_supported(pid, redirect=opts.redirect)
    held = freezer.seize(pid)
    stats = CheckpointStats(pid=pid)
    complete = False
    try:
        _check_cancel(opts, pid)
        check_supported(pid, redirect=opts.redirect)      # again, now that nothing can change under us
        _check_cancel(opts, pid)
        mem = RemoteMemory(pid, writable=False)
        try:
            state = collect(held, mem, opts.redirect)
        finally:
            mem.close()
        layout = collect_layout(pid)
        writer = ImageWriter(out, level=opts.compress_level, workers=opts.workers)
        try:
            writer.record(image_header(pid, "checkpoint", state.threads[0].xstate))
            writer.record(state.process)
            writer.record(state.files)
            writer.record(state.pipes)
            writer.record(state.sockets)
            writer.record(layout)
            for t in state.threads:
                writer.record(t)
            t_mem = time.monotonic()
            write_memory(pid, layout, writer, lambda: _check_cancel(opts, pid))
            stats.memdump_time_ms = (time.monotonic() - t_mem) * 1000
            _check_cancel(opts, pid)
            wstats = writer.finish()
        finally:
            writer.close()
        if on_complete is not None:
            on_complete()
        complete = True
        stats.threads = len(state.threads)
        stats.vmas = len(layout.vmas)
        stats.pages_written = wstats.pages
        stats.bytes_raw = wstats.bytes_raw
        stats.bytes_on_wire = wstats.bytes_on_wire
    finally:
        if complete and not opts.leave_running:
            freezer.kill(held)
            freezer.wait_gone(pid)
        else:
            freezer.let_go(held)
        stats.frozen_time_ms = (time.monotonic() - held.frozen_at) * 1000 if held.frozen_at else 0.0
        stats.left_running = not complete or opts.leave_running
    stats.total_time_ms = (time.monotonic() - t0) * 1000
    return stats


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

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def restore(src: BinaryIO, *, resume: bool = True, cancel: threading.Event | None = None,
            new_pid: bool = False) -> tuple[RestoreResult, Restorer]:
    """Rebuild the process an image describes; it runs on return unless ``resume`` is False.
    It keeps its pid and thread ids unless ``new_pid``. Setting ``cancel`` aborts at the next
    record or page batch: nothing of it is left."""
    t0 = time.monotonic()
    reader = ImageReader(src)
    restorer: Restorer | None = None
    proc: ProcessState | None = None
    files: Files | None = None
    pipes = Pipes(())
    sockets = UnixSockets(())
    threads: list[ThreadState] = []
    done = False
    try:
        for item in reader:
            if cancel is not None and cancel.is_set():
                raise Cancelled("interrupted: the half-restored process was removed")
            if isinstance(item, ImageHeader):
                restorer = Restorer(item, keep_ids=not new_pid)
            elif isinstance(item, PageBatch):
                if restorer is None or not restorer.layout:
                    raise ProtocolError("page data before the memory layout: corrupt image")
                restorer.write_pages(item)
            elif isinstance(item, ProcessState):
                proc = item
            elif isinstance(item, Files):
                files = item
            elif isinstance(item, Pipes):
                pipes = item
            elif isinstance(item, UnixSockets):
                sockets = item
            elif isinstance(item, Mappings):
                assert restorer is not None
                if not restorer.pid:
                    restorer.begin(item)
                restorer.apply_layout(item)
            elif isinstance(item, ThreadState):
                threads.append(item)
            elif isinstance(item, EndOfImage):
                pass
        if restorer is None or proc is None or files is None or not threads:
            raise ProtocolError("the image lacks process, file or thread records: corrupt image")
        restorer.finish(proc, files, threads, pipes, sockets)
        if resume:
            restorer.resume()
        done = True
    except MigrationError:
        raise
    except OSError as exc:
        raise RestoreError(f"restore failed: {exc}") from None
    finally:
        if not done and restorer is not None:
            restorer.abort()
    result = RestoreResult(pid=restorer.pid, threads=len(threads), pages=restorer.report.pages_written,
                           restore_time_ms=(time.monotonic() - t0) * 1000, pages_filled=restorer.report.pages_filled,
                           warnings=restorer.report.warnings)
    return result, restorer

