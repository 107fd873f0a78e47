"""Checkpoint to an image stream: the engine under `kcr-migrate checkpoint` (restoring one is
``agent.image_restore``).

It runs on a tracer thread (``agent.tracer``). A checkpoint checks the process before
freezing it; any failure before the image is complete thaws the process untouched. Only a
complete image (end record written and flushed) lets ``--leave-running`` off kill it.

With ``--leave-running`` the process is frozen only while it is read: its pages are copied
into memory mapped and populated before the freeze (an ``Arena``, when the machine has the
room), the process runs again, and only then are they compressed, signed and written.
"""
from __future__ import annotations

import os
import threading
import time
from itertools import chain
from dataclasses import asdict, dataclass, field
from typing import BinaryIO, Callable, Collection, Mapping

from agent import carried_files, fdtable, mempolicy, procfs, sessions
from agent import freeze as freezer
from agent.as_target import Identity, problem
from agent.dump import Collected, collect, collect_layout, image_header
from agent.inject import RemoteMemory
from agent.tracer import stop_signal_pending
from agent.tree import check_tree, freeze_tree, tree_record
from precopy import parent_frames
from precopy.intervals import Run, Span, merge_spans, normalize
from precopy.layout import FrozenFileMaps, LayoutCache, MapsCache, PageFinder, holds_private_data, read_maps
from precopy.reader import Arena, BufferPool, PageReader
from transport.errors import Cancelled, NoSuchProcess, ProcessExited, UnsupportedResource
from transport.image import ImageWriter
from transport.schema import (
    FileContents,
    Mappings,
    ProcessBegin,
    prepare_codecs,
)
from transport.signing import signing_key


@dataclass
class CheckpointOptions:
    leave_running: bool = False
    compress_level: int | None = 1      # None: store pages raw
    workers: int = 2
    cancel: threading.Event | None = None   # set it to roll back at the next safe point
    redirect: Mapping[int, str] = field(default_factory=dict)   # fd -> the file it becomes at restore
    image_key: str | None = None        # key file that signs the image (None: $KCR_IMAGE_KEY, else
                                        # /etc/kcr-migrate/image.key; see transport.signing)


# A snapshot of a process left running is held in memory while it is compressed and written
# only where it takes at most this share of the memory available.
ARENA_SHARE = 0.5
ARENA_SLACK = 4 << 20       # per process: what it may add between the estimate and the freeze


def _meminfo_kib(pid: int | None, *keys: str) -> int:
    """The sum of ``keys`` (in kB) in /proc/PID/status, or /proc/meminfo for None."""
    path = "/proc/meminfo" if pid is None else f"/proc/{pid}/status"
    total = 0
    with open(path) as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                total += int(value.split()[0])
    return total


def snapshot_arena(pids: list[int]) -> Arena | None:
    """Memory for the pages of ``pids`` (their anonymous and shared memory resident now),
    populated before the freeze; None where the machine has too little available."""
    try:
        need = sum(_meminfo_kib(p, "RssAnon", "RssShmem") * 1024 + ARENA_SLACK for p in pids)
        if need > _meminfo_kib(None, "MemAvailable") * 1024 * ARENA_SHARE:
            return None
        return Arena(need)
    except (OSError, ValueError):
        return None


def _check_cancel(opts: CheckpointOptions, pid: int) -> None:
    if opts.cancel is not None and (opts.cancel.is_set() or stop_signal_pending()):
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
    file_bytes: int = 0             # of files carried whole (of /dev/shm, deleted, memfds)
    frozen_time_ms: float = 0.0
    memdump_time_ms: float = 0.0
    total_time_ms: float = 0.0
    left_running: bool = False
    signed_with: str = ""           # the key file that signed the image ("": not signed, see warnings)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def checkpoint(pid: int, out: BinaryIO, opts: CheckpointOptions,
               on_complete: Callable[[], None] | None = None) -> CheckpointStats:
    """Dump ``pid`` and its descendants to ``out``. ``on_complete`` runs once the image is
    whole, before the kill (to fsync and rename a file into place: a process is never killed
    for a lost image). Every process is stopped before any state is read."""
    t0 = time.monotonic()
    prepare_codecs()                     # before the freeze: a record type's first use is slow
    ends = not opts.leave_running        # a connection waiting to be accepted may be accepted to read it
    # The host's other fds are read once, by the check, where the job holds anything they
    # could share; brought up to date once it is frozen (``fdtable.OutsideScan``).
    outside = fdtable.OutsideWatch()
    pids = check_tree(pid, opts.redirect, accept_waiting=ends, outside_watch=outside)
    helds: dict[int, freezer.Held] = {}
    stats = CheckpointStats(pid=pid)
    key, unsigned = signing_key(opts.image_key)     # before anything is frozen: a bad key file stops here
    stats.signed_with = key.path if key is not None else ""
    stats.warnings.extend([unsigned] if unsigned else [])
    outsiders = procfs.ids_held_outside(pids)
    if outsiders:
        stats.warnings.append(f"{outsiders[0]}{f' (and {len(outsiders) - 1} more)' if len(outsiders) > 1 else ''}: "
                              "while it runs, the image can be restored on another host only (the id stays in "
                              "use here)")
    complete = False
    thawed = False
    arena = snapshot_arena(pids) if opts.leave_running else None
    # Each process's maps and smaps, read while it runs: frozen, only the mappings that changed
    # since are parsed and made into records.
    maps_read = {p: MapsCache() for p in pids}
    smaps_read = {p: LayoutCache() for p in pids}
    for p in pids:
        try:
            read_maps(p, maps_read[p])
            smaps_read[p].read(p)
        except (FileNotFoundError, ProcessLookupError):
            pass            # gone: it leaves the job as it freezes
    try:
        for p in pids:
            try:
                helds[p] = freezer.seize(p)
            except (NoSuchProcess, ProcessExited):
                if p == pid:
                    raise
                # a child that exited since it was listed (make's compilers do): it leaves the job
        # One cut: a child forked as the tree froze is frozen with it, one that exited leaves
        # (a shell script's commands come and go all the while).
        freeze_tree(pid, helds)
        pids = list(helds)
        _check_cancel(opts, pid)
        tree = tree_record(pid)          # zombies among them: carried as they are
        sessions.check(tree.members)     # as frozen: a restore can make its sessions and groups again
        if [m.pid for m in tree.members if not m.zombie] != pids:
            raise UnsupportedResource(f"pid {pid}'s process tree changed while it was being frozen (a fork or an "
                                      "exit): nothing was written; try again", pid=pid)
        maps = FrozenFileMaps()
        check_tree(pid, opts.redirect, pids, maps=maps)   # again, now that nothing can change under us
        _check_cancel(opts, pid)
        fds = fdtable.collect_tree(pids, {pid: opts.redirect}, accept_waiting=ends,   # checks the fd tables again too
                                   outside_scan=outside.newest, maps=maps)
        states = {}
        job = mempolicy.JobBounds(pids, maps)
        for held in helds.values():
            mem = RemoteMemory(held.pid, writable=False)
            try:
                states[held.pid] = collect(held, mem, fds=fds[held.pid], job=job, layout=maps_read.get(held.pid))
            finally:
                mem.close()
        for held in helds.values():            # before anything is written, and long before the kill
            check_reopenable(states[held.pid])
        layouts = {p: collect_layout(p, smaps_read.get(p)) for p in pids}
        # Frozen to the end (no arena), batches are read into buffers the writer gives back.
        pool = BufferPool() if arena is None else None
        writer = ImageWriter(out, level=opts.compress_level, workers=opts.workers, key=key,
                             recycle=pool.give_back if pool is not None else None)
        try:
            if arena is not None:
                writer.hold()           # written once the process runs again
            writer.record(image_header(pid, "checkpoint", states[pid].threads[0].xstate))
            if len(tree.members) > 1:
                writer.record(tree)
            t_mem = time.monotonic()
            shared: set[tuple[int, int, int]] = set()
            carried_inos = {f.ino for p in pids for f in states[p].fds.carried}
            members = {m.pid: m for m in tree.members}
            for p in pids:
                if len(tree.members) > 1:
                    writer.record(ProcessBegin(p))
                state = states[p]
                # the carried files' slices are read as they are written: any size streams
                carried = (piece for f in state.fds.carried for piece in carried_files.read(f))
                for rec in chain((state.process, *state.fds.records()), carried, (layouts[p], *state.threads)):
                    writer.record(rec)
                    if isinstance(rec, FileContents):
                        stats.file_bytes += len(rec.data)
                ppid = members[p].ppid if p != pid else 0
                write_memory(p, layouts[p], writer, lambda: _check_cancel(opts, pid), shared, arena, carried_inos,
                             parent=(ppid, layouts[ppid]) if ppid in layouts else None, pin=len(pids) == 1, pool=pool)
            stats.memdump_time_ms = (time.monotonic() - t_mem) * 1000
            _check_cancel(opts, pid)
            if arena is not None:       # everything is read: it runs on while the image is written
                thawed = True
                stats.frozen_time_ms = _let_go_all(helds, kill=False)
            wstats = writer.finish(before_end=lambda: _check_cancel(opts, pid))
        finally:
            writer.close()
        if on_complete is not None:
            on_complete()
        complete = True
        stats.processes = len(tree.members)
        stats.threads = sum(len(s.threads) for s in states.values())
        stats.vmas = sum(len(layout.vmas) for layout in layouts.values())
        stats.pages_written = wstats.pages
        stats.bytes_raw = wstats.bytes_raw
        stats.bytes_on_wire = wstats.bytes_on_wire
    finally:
        if arena is not None:
            arena.close()
        if not thawed:
            kill = complete and not opts.leave_running
            if kill:
                fdtable.silence_connections(fds)     # closed by the kill, they send nothing
            stats.frozen_time_ms = _let_go_all(helds, kill)
            if kill:
                for p in pids:
                    freezer.wait_gone(p)
        stats.left_running = not complete or opts.leave_running
    stats.total_time_ms = (time.monotonic() - t0) * 1000
    return stats


def check_reopenable(state: Collected) -> None:
    """Each file and directory the process has open: may the process itself open it as restore
    will (its access mode, no symbolic link followed; asked of the kernel without opening it,
    which could break a lease)? One a more privileged process opened for it (a root shell's
    ``> log`` for a job run as a user) restore refuses (it grants nothing more): refused now
    instead, with the way out, before the checkpoint kills the job for an image that would not
    restore here."""
    identity = Identity.of(state.process.creds)
    if identity == Identity.mine():
        return                          # the checkpoint's own rights: the same opens succeed
    pid = state.process.pid
    with identity.acting():
        for f in state.fds.files.fds:
            if f.kind not in ("file", "dir"):
                continue
            try:
                identity.may_open(f.path, f.flags | (os.O_DIRECTORY if f.kind == "dir" else 0))
            except OSError as exc:
                raise UnsupportedResource(
                    f"pid {pid}'s fd {f.fd} is {f.path}, which the process (its {identity}) could not open itself "
                    f"({problem(exc)}), so a restore would refuse it: give --redirect {f.fd}=PATH for a file it "
                    "may open, or checkpoint it with rights on that file", pid=pid) from None


def _let_go_all(helds: dict[int, freezer.Held], kill: bool) -> float:
    """Let every held process go on (or kill it), children first, every one whatever fails;
    returns how long they were frozen, in ms."""
    frozen_at = min((h.frozen_at for h in helds.values() if h.frozen_at), default=0.0)
    failed: BaseException | None = None
    for held in reversed(list(helds.values())):
        try:
            if kill:
                freezer.kill(held)
            else:
                freezer.let_go(held)
        except BaseException as exc:
            failed = failed or exc
    if failed is not None:
        raise failed
    return (time.monotonic() - frozen_at) * 1000 if frozen_at else 0.0


def write_memory(pid: int, layout: Mappings, writer: ImageWriter,
                 check: Callable[[], None] = lambda: None, shared: set[tuple[int, int, int]] | None = None,
                 arena: Arena | None = None, carried: Collection[int] = (),
                 parent: tuple[int, Mappings] | None = None, pin: bool = True, pool: BufferPool | None = None) -> None:
    """The pages of ``pid``'s layout. ``shared``: shared anonymous memory and SysV segments (inode, offset,
    length) written already by another process of the tree, which maps the same object:
    sent once; new ones are added. ``arena``: where to read them into while it has room.
    ``carried``: inodes of the files the image carries whole (``agent.carried_files``): their
    shared mappings are mapped again from those files, so their pages are not written twice.
    ``parent``: its parent in the tree (pid, layout), written before it: pages that are the
    parent's very pages go as ``ParentPages`` (``precopy.parent_frames``), not again. ``pin`` off:
    its pages are read without pinning them (a tree's: ``PageReader``), so that what its
    processes share stays shared (for ``parent``, and in a job left running). ``pool``: buffers
    to read into where ``arena`` has no room (given back by ``writer``)."""
    with PageFinder(pid) as finder, PageReader(pid, arena=arena, pin=pin, pool=pool) as reader:
        private: list[Run] = []
        anonymous: list[Span] = []
        shared_runs: list[Run] = []
        for vma in layout.vmas:
            if vma.shared and vma.kind == "anon" and vma.shm is None and vma.ino in carried:
                continue
            if shared is not None and vma.shared and vma.kind == "anon" and (vma.ino or vma.shm):
                key = (vma.ino if vma.shm is None else -1 - vma.ino, vma.pgoff, vma.length)    # SysV ids apart
                if key in shared:
                    continue
                shared.add(key)
            if not holds_private_data(vma):
                continue
            if vma.shared:
                shared_runs += finder.populated(vma)
            elif vma.kind == "file":
                private += finder.populated(vma)
            else:
                anonymous.append((vma.start, vma.end))
        # Private anonymous neighbours are scanned as one range, and every page goes in full
        # batches whatever mapping it is in: a process of many small mappings costs its pages,
        # not a scan and a batch per mapping.
        for start, end in merge_spans(anonymous):
            private += finder.populated_span(start, end, file_backed=False)
        private = normalize(private)
        if parent is not None:
            said, private = parent_frames.parent_pages(pid, parent[0], private, list(layout.vmas), list(parent[1].vmas))
            for rec in said:
                writer.record(rec)
        for runs, drop_zero in ((private, False), (normalize(shared_runs), True)):
            for batch in reader.batches(runs, drop_zero=drop_zero):
                check()
                writer.pages(batch)
