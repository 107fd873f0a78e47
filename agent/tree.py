"""A job as a process tree: which processes move with a pid, whether they can, and what the
destination must know of each (pid, parent, session, group).

One set of checks for ``checkpoint`` and for live migration: the root and every descendant
is checked alone (``procfs.check_supported``), their fd tables together (what they share
with each other is carried, what they share with the outside is refused). Anonymous memory
they share stays shared (``agent.shared_memory``).
"""
from __future__ import annotations

import os
from typing import Mapping

from agent import fdtable
from agent.procfs import check_supported, check_target, process_tree, read_stat
from transport.errors import NoSuchProcess, ProcessError, UnsupportedResource
from transport.schema import ProcessTree, TreeMember


GROWTH_RETRIES = 20        # a tree that forks on every look (make -j) is checked this often


def check_tree(pid: int, redirect: Mapping[int, str], frozen: list[int] | None = None, *,
               accept_waiting: bool = False) -> list[int]:
    """The processes of ``pid``'s tree that run (parents first; zombies, its children that
    exited and were not waited for yet, are carried by ``tree_record`` alone), each checked.
    ``frozen``: those processes, stopped already; their fd tables are then checked as they
    are read (``fdtable.collect_tree``) rather than here, and the tree must not have grown.
    ``redirect`` (fd -> path) is the root's. ``accept_waiting``: the source ends once dumped
    (``fdtable.describe_tree``). Refusals name what cannot be carried and what to do."""
    check_target(pid)
    every = process_tree(pid)
    if os.getpid() in every:
        raise ProcessError(f"pid {pid} is an ancestor of kcr-migrate itself (pid {os.getpid()}), which would have "
                           "to move with it: run kcr-migrate from outside that process's tree (another terminal, "
                           "or setsid)", pid=pid)
    pids = frozen or [p for p in every if not zombie(p)]
    for p in every[1:]:
        if p not in pids and not zombie(p):
            raise UnsupportedResource(f"pid {pid}'s process tree changed while it was being frozen (a fork): "
                                      "nothing was moved; try again", pid=p)
    for p in pids[1:]:
        try:
            check_target(p)
        except NoSuchProcess:
            raise UnsupportedResource(f"pid {p} of pid {pid}'s tree exited while it was being checked: nothing "
                                      "was moved; try again", pid=p) from None
    if frozen is None:
        # Running: a child may exit while it is being checked (make's compilers do): it leaves
        # the job, as it would a moment later. The root may not. And one may fork: a pipe
        # shared with a process that was not listed yet is the tree's own; check it again.
        for attempt in range(GROWTH_RETRIES + 1):
            try:
                for p in pids:
                    check_supported(p, redirect=redirect if p == pid else None, tree=pids)
                fdtable.describe_tree(pids, {pid: redirect}, accept_waiting=accept_waiting)
                return pids
            except (NoSuchProcess, FileNotFoundError) as exc:
                gone = _vanished(exc)
                if gone not in pids[1:]:
                    raise
                pids = [p for p in pids if p != gone]
            except UnsupportedResource:
                now = [p for p in process_tree(pid) if not zombie(p)]
                if attempt == GROWTH_RETRIES or not set(now) - set(pids):
                    raise
                pids = now
        raise AssertionError("unreachable")
    for p in pids:
        check_supported(p, redirect=redirect if p == pid else None, tree=pids)
    return pids


def _vanished(exc: Exception) -> int | None:
    """The pid whose /proc entry went away, as the error names it."""
    if isinstance(exc, NoSuchProcess):
        return exc.pid
    parts = str(getattr(exc, "filename", "") or "").split("/")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() else None


def zombie(pid: int) -> bool:
    """Has ``pid`` exited, its parent not yet waited for it?"""
    try:
        return read_stat(pid)[3] == "Z"
    except NoSuchProcess:
        return False


def member(pid: int) -> TreeMember:
    stat = read_stat(pid)
    status = int(stat[52]) if stat[3] == "Z" and len(stat) > 52 else -1
    return TreeMember(pid=pid, ppid=int(stat[4]), pgid=int(stat[5]), sid=int(stat[6]), comm=stat[2],
                      exit_status=status)


def tree_record(pid: int) -> ProcessTree:
    """The ``ProcessTree`` record of ``pid``'s tree as it is now, zombies included (the root
    first, parents before children). A process that vanishes as it is read, or whose parent
    did (it was reparented out of the tree), is not in it: it left the job."""
    members = [member(pid)]
    for p in process_tree(pid)[1:]:
        try:
            m = member(p)
        except NoSuchProcess:
            continue
        if any(m.ppid == up.pid for up in members):
            members.append(m)
    return ProcessTree(tuple(members))
