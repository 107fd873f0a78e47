"""One restore session for images and live streams: records in, processes out.

An image (``kcr-migrate restore``) and a live migration's stream (the destination agent) are
the same sequence of records: a header; for a tree, a ``ProcessTree`` and, before each
process's records and pages, a ``ProcessBegin``; layouts, page batches, and each process's
state. A live stream interleaves the processes round by round (``ProcessBegin`` again for
each), and may send a later ``ProcessTree`` when the tree changed while it ran: processes
forked meanwhile join (their stubs forked from their parents' stubs), processes gone leave
(their stubs removed). Each process's children are forked when the stream turns away from it,
its memory in, so that they hold what they share with it copy-on-write (``agent.inherited``).
``take`` applies one item; ``finish`` restores everything but memory, for every process,
with what they share made once; ``resume`` lets them run, children first; ``abort``
removes everything made.

Every method runs on the restorer's tracer thread, except ``write_pages``, which may run in
a worker thread between two ``take`` calls (pages are written while the tracer idles).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from agent import peercred, sessions
from agent.as_target import Identity, check_grantable
from agent.descriptions import DeletedFiles, Descriptions
from agent.fdtable import FdState
from agent.restore import ProcessRecords, Restorer, wait_running
from agent.shared_memory import SharedObjects
from agent.unix_names import Names
from transport.errors import ProtocolError, RestoreError, UnsupportedResource
from transport.pages import PageBatch
from transport.schema import (
    EndOfImage,
    EventFiles,
    FileContents,
    Files,
    ImageHeader,
    InetSockets,
    Mappings,
    MappingsDelta,
    ParentPages,
    Pipes,
    ProcessBegin,
    ProcessTree,
    TreeMember,
    UnixSockets,
)

_FD_RECORDS = (Files, Pipes, UnixSockets, EventFiles, InetSockets, FileContents)
_AFTER_PREPARE = ("{what} for a process whose records were complete when the stream turned to another one "
                  "(its memory was made ready then): corrupt stream")


@dataclass
class RestoredProcess:
    """One process of the stream: its restorer and its records as they arrive."""

    restorer: Restorer
    records: ProcessRecords = field(default_factory=ProcessRecords)
    member: TreeMember | None = None
    finished: bool = False          # restored but for running (``Restorer.finish``)


class RestoreSession:
    def __init__(self, deferred: Sequence[str] = (), *, keep_ids: bool = True, affinity: str = "refuse",
                 cgroup: str | None = None, cgroup_hints: Mapping[int, tuple[str, ...]] | None = None) -> None:
        """``deferred``: paths filesystem hooks bring (mapped at ``finish``); ``keep_ids``:
        every process keeps its pid and thread ids (refused off for a tree); ``affinity``:
        ``agent.sched``'s choice for threads pinned to CPUs this host lacks; ``cgroup``: the
        unified cgroup every process goes in instead of its own (``--cgroup``); ``cgroup_hints``:
        per pid, the cgroups the source said it was in (another host's job: ``Restorer``)."""
        self.deferred = list(deferred)
        self.keep_ids = keep_ids
        self.affinity = affinity
        self.cgroup = cgroup
        self.cgroup_hints = dict(cgroup_hints or {})
        self.header: ImageHeader | None = None
        self.procs: dict[int, RestoredProcess] = {}      # the root first, parents before children
        self.current: RestoredProcess | None = None
        self.tree: ProcessTree | None = None
        self.removed: list[int] = []      # processes that left the tree while it was migrated
        self.resumed = False
        self.shared = SharedObjects()      # memory the processes share, made once
        self.deleted = DeletedFiles()      # deleted files and memfds, written as they arrive
        self._carriers: dict[int, Restorer] = {}     # a carried file's id -> the process it comes with
        self._identity: Identity | None = None       # whom carried files are made as (the job)
        self.names = Names()               # the socket names the processes' sockets are bound to
        self.descriptions: Descriptions | None = None     # what the job's fds share, once made
        # The tree's processes not made yet: ``_make`` carries out these steps of the plan
        # (``agent.sessions``) as the stream goes on (``_forks_of``), so that each process is
        # forked once its parent's memory is in, and shares it copy-on-write as at the source.
        self._steps: list[sessions.Step] = []
        self._done_steps = 0
        self._adding: list[TreeMember] = []
        self._plan_tree: ProcessTree | None = None       # the tree ``_steps`` make
        self._helpers: dict[int, Restorer] = {}

    # -- records in -------------------------------------------------------------------------

    def take(self, item: object) -> None:
        """Apply one item of the stream (on the tracer thread)."""
        if isinstance(item, ImageHeader):
            if self.header is not None:
                raise ProtocolError("a second stream header: corrupt image")
            self.header = item
            self.current = self.procs[item.pid] = RestoredProcess(Restorer(item, self.deferred, keep_ids=self.keep_ids,
                                                                           shared=self.shared, affinity=self.affinity,
                                                                           cgroup=self.cgroup,
                                                                           cgroup_hint=self.cgroup_hints.get(item.pid, ())))
            return
        if self.header is None:
            raise ProtocolError("the stream does not start with its header: corrupt image")
        if isinstance(item, ProcessTree):
            if self.descriptions is not None or any(p.restorer.memory_ready for p in self.procs.values()):
                raise ProtocolError("the process tree changed after its processes' state began to arrive: corrupt stream")
            if not self.keep_ids:
                raise RestoreError("this is a process tree, which keeps its pids (parents wait for their children "
                                   "by pid): restore or migrate it without --new-pid")
            if self.tree is None:
                self._build_tree(item)
            else:
                self._change_tree(item)
            self.tree = item
        elif isinstance(item, ProcessBegin):
            if self.tree is None or item.pid not in {m.pid for m in self.tree.members}:
                raise ProtocolError(f"records of process {item.pid}, which the stream's tree lacks: corrupt image")
            left = self.current
            turned = left is not None and self.procs.get(item.pid) is not left
            if turned:
                assert left is not None
                # Its children are forked now, with its memory in (its first copy ends here:
                # ``Restorer.end_first_copy``), before ``prepare`` makes that memory final
                # (sealed, locked), which a child must not inherit.
                left.restorer.end_first_copy()
                self._make(self._forks_of(left))
                self._prepare(left)
            self._make(self._fork_of(item.pid))
            found = self.procs.get(item.pid)
            if found is None:
                raise ProtocolError(f"records of process {item.pid}, which left the tree: corrupt stream")
            self.current = found
            if turned:
                self._finish_ready()
        elif isinstance(item, EndOfImage):
            pass
        elif (current := self.current) is None:
            # the process the stream was about left the tree: a ProcessBegin comes first
            raise ProtocolError(f"a {type(item).__name__} record of no process (after its process left the "
                                "tree, before the next one is named): corrupt stream")
        elif current.restorer.memory_ready:
            raise ProtocolError(_AFTER_PREPARE.format(what=f"a {type(item).__name__} record"))
        elif self.descriptions is not None and isinstance(item, _FD_RECORDS):
            raise ProtocolError(f"a {type(item).__name__} record after every process's fd table was in "
                                "(the job's pipes, sockets and files were made then): corrupt stream")
        elif isinstance(item, FileContents):
            self._carry(current, item)
        elif isinstance(item, PageBatch):
            self.write_pages(item)
        elif isinstance(item, ParentPages):
            current.restorer.parent_pages(item)
        elif isinstance(item, Mappings):
            if not current.restorer.begun:
                current.restorer.begin(item)
            current.restorer.apply_layout(item)
        elif isinstance(item, MappingsDelta):
            if not current.restorer.begun:
                raise ProtocolError("a layout change before the process's layout: corrupt stream")
            current.restorer.apply_layout(item)
        elif not current.records.take(item):
            raise ProtocolError(f"unexpected {type(item).__name__} record in the stream: corrupt image")

    def _carry(self, proc: RestoredProcess, c: FileContents) -> None:
        """A slice of a file the job carries whole (deleted, memfd, /dev/shm): written into the
        file here as it arrives, made at its first slice by the job's identity (the first
        process's credentials, checked first); the process keeps the slice's description.
        Before the first process's state and its own fds are in (a live stream may send another
        process's state first), the slice is kept whole, and written at ``finish``."""
        first = next(iter(self.procs.values())).records.state
        owner = self._carriers.setdefault(c.id, proc.restorer)
        if owner is not proc.restorer:
            raise ProtocolError(f"the contents of file {c.id} come with two processes: corrupt image")
        if first is None or proc.records.files is None:
            proc.records.take(c)
            return
        if self._identity is None:
            check_grantable(first.creds)          # nothing is made for a claim refused
            self._identity = Identity.of(first.creds)
        if c.path:
            self.shared.write_file(c, self._identity)
        else:
            self.deleted.write(c, proc.records.files, self._identity)
        proc.records.take(replace(c, data=b""))

    def write_pages(self, batch: PageBatch) -> None:
        """Pages of the current process (from a worker thread, between two ``take`` calls)."""
        current = self.current
        if current is None or not current.restorer.layout:
            raise ProtocolError("page data before the memory layout: corrupt image")
        if current.restorer.memory_ready:
            raise ProtocolError(_AFTER_PREPARE.format(what="page data"))
        current.restorer.write_pages(batch)

    def _prepare(self, proc: RestoredProcess) -> None:
        """The stream turns from ``proc`` to another process: once its records are complete,
        its pages are all in too (a stream sends a process's pages before its state, an image
        with it), and the part of ``finish`` that concerns its memory alone is done now
        (``Restorer.prepare``), while the next processes arrive. Nothing more may come for it."""
        state = proc.records.state
        if state is not None and proc.records.complete and not proc.restorer.exited:
            proc.restorer.prepare(state)

    # -- the tree ---------------------------------------------------------------------------

    def _build_tree(self, tree: ProcessTree) -> None:
        """Every process of the tree as a stub with its own pid, each made by its parent's, then
        put in its session and process group (session leaders, group leaders, then the rest)."""
        root = tree.members[0]
        if len(self.procs) != 1 or root.pid not in self.procs or self.procs[root.pid].restorer.begun:
            raise ProtocolError("the process tree does not start with the stream header's process: corrupt image")
        self.procs[root.pid].member = root
        self.procs[root.pid].restorer.spawn_stub()
        self._plan(tree, tree.members[1:])

    def _plan(self, tree: ProcessTree, new: Sequence[TreeMember]) -> None:
        """The steps that make stubs for ``new`` (parents first), each in its session and
        process group, in the order ``agent.sessions`` plans (helpers standing in for leaders
        that exited), zombies ended last: carried out by ``_make``."""
        if self._done_steps < len(self._steps):
            raise ProtocolError("the process tree changed before its processes were all made: corrupt stream")
        try:
            self._steps = sessions.plan(tree.members, new)
        except UnsupportedResource as exc:
            raise RestoreError(str(exc)) from None
        self._done_steps = 0
        self._adding = list(new)
        self._plan_tree = tree

    def _forks_of(self, proc: RestoredProcess) -> int:
        """How many of the plan's steps make ``proc``'s children (and what comes before)."""
        pid = proc.member.pid if proc.member is not None else proc.restorer.pid
        return max((i + 1 for i, step in enumerate(self._steps)
                    if isinstance(step, (sessions.Fork, sessions.Helper)) and step.by == pid), default=0)

    def _fork_of(self, pid: int) -> int:
        """How many of the plan's steps make process ``pid`` (0: none does)."""
        return next((i + 1 for i, step in enumerate(self._steps)
                     if isinstance(step, sessions.Fork) and step.pid == pid), 0)

    def _make(self, upto: int | None = None) -> None:
        """Carry out the plan's steps up to ``upto`` (None: all of them); once all are done,
        each new process's session and group are checked against the tree's, and zombies
        end. A process forked from one whose memory is in shares that memory copy-on-write
        (``Restorer.write_pages`` keeps what it has already)."""
        header = self.header
        tree = self._plan_tree
        assert header is not None
        steps = self._steps
        upto = len(steps) if upto is None else upto
        if self._done_steps < upto:
            self._carry_out(steps[self._done_steps:upto], header)
        if self._done_steps == len(steps) and self._adding and tree is not None:
            self._made(tree)

    def _carry_out(self, steps: Sequence[sessions.Step], header: ImageHeader) -> None:
        """``steps``, the plan's next ones, in order (each counted done as it starts)."""
        members = {m.pid: m for m in self._adding}
        helpers = self._helpers

        def restorer(pid: int) -> Restorer:
            return helpers[pid] if pid in helpers else self.procs[pid].restorer

        def stub(pid: int, by: Restorer, sibling: bool = False) -> Restorer:
            made = Restorer(header, self.deferred, stub_pid=by.fork(pid, sibling=sibling),
                            forked_from=by, shared=self.shared, affinity=self.affinity, cgroup=self.cgroup,
                            cgroup_hint=self.cgroup_hints.get(pid, ()))
            made.join_cgroups_early()
            return made

        for step in steps:
            self._done_steps += 1
            if isinstance(step, sessions.Fork):
                self.procs[step.pid] = RestoredProcess(stub(step.pid, restorer(step.by), step.sibling),
                                                       member=members[step.pid])
            elif isinstance(step, sessions.Helper):
                helpers[step.pid] = stub(step.pid, restorer(step.by))
            elif isinstance(step, sessions.Setsid):
                restorer(step.pid).stub_call("setsid")
            elif isinstance(step, sessions.OwnGroup):
                restorer(step.pid).stub_call("setpgid", 0, 0)
            elif isinstance(step, sessions.Join):
                restorer(step.pid).stub_call("setpgid", 0, step.pgid)
            else:
                helpers.pop(step.helper).remove(restorer(step.by))

    def _made(self, tree: ProcessTree) -> None:
        """Every step of the plan done: the new processes' sessions and groups checked, zombies
        ended, the processes in the tree's order again."""
        new, self._adding = self._adding, []
        got = {m.pid: sessions.Ids(os.getsid(self.procs[m.pid].restorer.pid),
                                   os.getpgid(self.procs[m.pid].restorer.pid)) for m in new}
        wrong = sessions.mismatch(tree.members, got)
        if wrong:
            raise RestoreError(f"{wrong}: kcr-migrate cannot make this tree's sessions again")
        for m in new:
            if m.zombie:
                self.procs[m.pid].restorer.exit_as(m.exit_status)
        order = [m.pid for m in tree.members if m.pid in self.procs]          # the tree's order again
        self.procs = {**{pid: self.procs[pid] for pid in order}, **self.procs}

    def _change_tree(self, tree: ProcessTree) -> None:
        """The tree as it is now, in a live migration: new processes join, gone ones leave."""
        assert self.tree is not None
        self._make()           # (a stream brings every process's memory before the tree changes)
        before = {m.pid: m for m in self.tree.members}
        now = {m.pid: m for m in tree.members}
        if tree.members[0].pid != self.tree.members[0].pid:
            raise ProtocolError("the process tree changed its root: corrupt stream")
        for pid, m in now.items():
            old = before.get(pid)
            if old is not None and (old.ppid, old.sid, old.pgid) != (m.ppid, m.sid, m.pgid) and pid != tree.members[0].pid:
                raise RestoreError(f"process {pid} changed its parent, session or group during the migration "
                                   "(its parent exited, or it called setsid or setpgid): try again", pid=pid)
        # Processes gone first (children first), each reaped by its parent's stub while that
        # still runs; then those that exited become zombies as they are at the source.
        gone = [pid for pid in reversed(list(self.procs)) if pid not in now]
        for pid in gone:
            proc = self.procs.pop(pid)
            parent = self.procs.get(proc.member.ppid) if proc.member is not None else None
            proc.restorer.remove(parent.restorer if parent is not None else None)
            self.removed.append(pid)
            if self.current is proc:
                self.current = None
        for pid, m in now.items():
            old = before.get(pid)
            if old is not None and m.zombie and not old.zombie:       # it exited meanwhile
                self.procs[pid].restorer.exit_as(m.exit_status)
                self.procs[pid].member = m
        self._plan(tree, [m for m in tree.members if m.pid not in before])
        self._make()
        self.procs = {m.pid: self.procs[m.pid] for m in tree.members}

    # -- the rest, and the end ---------------------------------------------------------------

    def _live(self) -> list[tuple[int, RestoredProcess]]:
        return [(pid, p) for pid, p in self.procs.items() if not p.restorer.exited]

    def _make_descriptions(self) -> bool:
        """What the job's fds share (pipes, sockets, event files, carried files), made once every
        live process's fd table is in and the first process's state with it (whose credentials
        the job's files are made with); False while they are not."""
        if self.descriptions is not None:
            return True
        if self._done_steps < len(self._steps):
            return False           # processes not made yet: their fd tables are still to come
        procs = self._live()
        if not procs or procs[0][1].records.state is None or any(p.records.files is None for _, p in procs):
            return False
        each = [p.records.fds() for _, p in procs]
        union = FdState(Files(tuple(f for s in each for f in s.files.fds)),
                        Pipes(tuple(x for s in each for x in s.pipes.pipes)),
                        UnixSockets(tuple(x for s in each for x in s.sockets.sockets)),
                        EventFiles(tuple(x for s in each for x in s.events.files)),
                        tuple(x for s in each for x in s.contents),
                        inet=InetSockets(tuple(x for s in each for x in s.inet.sockets)))
        union.check_referenced()
        if not self.keep_ids and any(e.kind == "pidfd" for e in union.events.files):
            raise RestoreError("the process holds a pidfd, which refers to a process by its pid: restore it "
                               "without --new-pid")
        # What the job shares is made as the job: its first process (each fd of a path is
        # opened as its own process, ``Restorer._files``). Credentials first: nothing is opened
        # for a claim refused (those of the processes whose states are still to come, in a
        # live stream, are checked as each is restored).
        for _, p in procs:
            if p.records.state is not None:
                check_grantable(p.records.state.creds)
        first = procs[0][1].records.state
        assert first is not None
        identity = Identity.of(first.creds)
        makers = {pid: p.restorer for pid, p in procs}
        holders = {f.obj: pid for (pid, _), fds in zip(procs, each) for f in fds.files.fds if f.kind == "unix"}
        pairs = peercred.Sockets(makers, holders, self.root.report.warnings)
        self.descriptions = Descriptions(self.names, made=self.shared.made_files, identity=identity, pairs=pairs,
                                         deleted=self.deleted)
        self.shared.add_files(union.contents, identity)       # /dev/shm files, before the fds that open them
        self.descriptions.add(union)
        return True

    def _finish_one(self, pid: int, proc: RestoredProcess) -> None:
        state = proc.records.state
        assert state is not None and self.descriptions is not None
        if state.pid != pid:
            raise ProtocolError(f"the state of process {state.pid} among the records of process {pid}: corrupt image")
        proc.restorer.finish(state, proc.records.fds(), proc.records.threads, descriptions=self.descriptions)
        proc.finished = True

    def _finish_ready(self) -> None:
        """Each process whose records are complete restored (but for running) as soon as the
        job's shared descriptions are made: a live stream sends every process's fd table
        first, then the processes' states one by one (``agent.source``), and each is restored
        while the next ones are still read at the source. An image, which holds each process
        whole, gets here only with its last one (``finish``). Not where a filesystem hook
        brings files (``deferred``): its final pass runs after the stream, before ``finish``."""
        if self.deferred or not self._make_descriptions():
            return
        for pid, p in self._live():
            if not p.finished and p.records.complete and p is not self.current:
                self._finish_one(pid, p)

    def finish(self) -> None:
        """Everything but memory, for every process; the pipes and sockets they share are made
        once (``agent.descriptions``) and each takes its ends. Every process stays stopped."""
        self._make()          # (all made already, but in a stream that lacks some process's records)
        procs = self._live()
        if not procs or not all(p.records.complete and p.restorer.begun for _, p in procs):
            raise ProtocolError("the stream lacks a layout, or process, file or thread records: corrupt image")
        try:
            if not self._make_descriptions():
                raise ProtocolError("the stream lacks a process's fd table: corrupt image")
            for pid, p in procs:
                if not p.finished:
                    self._finish_one(pid, p)
            assert self.descriptions is not None
            self.descriptions.seal()
            self.shared.finish()
        finally:
            self._close_made()

    def _close_made(self) -> None:
        if self.descriptions is not None:
            self.descriptions.close()
        self.deleted.close()      # every process holds or maps what it has of them by now
        self.shared.close()       # every process maps what it shares by now

    def resume(self) -> int:
        """Let every process run, children first (nothing runs before its parent is whole);
        the root's pid."""
        # Every process let go first, then one wait for all of their threads to have run.
        wait_running([(p.restorer, p.restorer.let_go()) for p in reversed(list(self.procs.values()))
                      if not p.restorer.exited])
        self.resumed = True
        self.names.commit()
        self.shared.settled()
        return self.root.pid

    def abort(self) -> None:
        """Remove every process made (children first); nothing of them survives."""
        self._close_made()
        if self.resumed:
            return
        self.shared.discard()
        for helper in self._helpers.values():
            helper.abort()
        for p in reversed(list(self.procs.values())):
            p.restorer.abort()
        self.names.undo()

    # -- what was made ----------------------------------------------------------------------

    def where(self, pid: int, tid: int) -> tuple[int, int] | None:
        """Process ``pid`` and its thread ``tid`` (0: none) of the image, as restored here;
        None for one not restored (it left the tree, or was never in the stream)."""
        proc = self.procs.get(pid)
        if proc is None or proc.restorer.exited:
            return None
        r = proc.restorer
        return r.pid, (getattr(r, "new_tids", {}).get(tid, 0) if tid else 0)

    @property
    def root(self) -> Restorer:
        if not self.procs:
            raise ProtocolError("the stream has no header: corrupt image")
        return next(iter(self.procs.values())).restorer

    @property
    def running_ns(self) -> int:
        """When every thread of every process had run (``Restorer.resume``)."""
        return max(p.restorer.running_ns for p in self.procs.values() if not p.restorer.exited)

    @property
    def threads(self) -> int:
        return sum(len(p.records.threads) for p in self.procs.values())

    @property
    def warnings(self) -> list[str]:
        return [w for p in self.procs.values() for w in p.restorer.report.warnings]

    def processes(self) -> list[dict[str, object]]:
        """pid, parent and threads of each process, for reports."""
        return [{"pid": p.restorer.pid, "ppid": p.member.ppid if p.member else 0,
                 "comm": p.member.comm if p.member else "", "threads": len(p.records.threads),
                 "exit_status": p.member.exit_status if p.member else -1}
                for p in self.procs.values()]
