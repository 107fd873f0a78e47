"""A job as a process tree: which processes move with a pid, whether they can, and what the
destination must know of each (pid, parent, session, group).

One set of checks for ``checkpoint`` and for live migration: the root and every descendant
is checked alone (``procfs.check_supported``), their fd tables together (what they share
with each other is carried, what they share with the outside is refused), and memory
shared between them is refused.
"""
from __future__ import annotations

from typing import Mapping

from agent import fdtable
from agent.procfs import check_supported, check_target, process_tree, read_stat, shared_anonymous_memory
from transport.errors import NoSuchProcess, UnsupportedResource
from transport.schema import ProcessTree, TreeMember


def check_tree(pid: int, redirect: Mapping[int, str], frozen: list[int] | None = None) -> list[int]:
    """``pid`` and its descendants (parents first), each checked. ``frozen``: the processes,
    stopped already; their fd tables are then checked as they are read (``fdtable.collect_tree``)
    rather than here. ``redirect`` (fd -> path) is the root's. Refusals name what cannot be
    carried and what to do."""
    check_target(pid)
    pids = frozen or process_tree(pid)
    for p in process_tree(pid)[1:] if frozen else pids[1:]:
        try:
            check_target(p)
        except NoSuchProcess:
            raise UnsupportedResource(
                f"pid {p}, a child in pid {pid}'s tree, has exited and was not reaped yet: kcr-migrate cannot "
                "carry a zombie yet; try again once its parent has waited for it", pid=p) from None
        if p not in pids:
            raise UnsupportedResource(f"pid {pid}'s process tree changed while it was being frozen (a fork): "
                                      "nothing was moved; try again", pid=p)
    for p in pids:
        check_supported(p, redirect=redirect if p == pid else None, tree=pids)
    if frozen is None:
        fdtable.describe_tree(pids, {pid: redirect})
    shared_anonymous_memory(pids)
    return pids


def member(pid: int) -> TreeMember:
    stat = read_stat(pid)
    return TreeMember(pid=pid, ppid=int(stat[4]), pgid=int(stat[5]), sid=int(stat[6]), comm=stat[2])


def tree_record(pids: list[int]) -> ProcessTree:
    """The ``ProcessTree`` record of these processes (the root first, parents before children)."""
    return ProcessTree(tuple(member(p) for p in pids))
