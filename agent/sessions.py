"""The order in which a tree's processes are made again so that each is in its session and
process group: a plan of steps (``plan``), which ``agent.restore_session`` carries out and a
checkpoint checks for before anything is frozen.

The kernel's rules the plan follows: a process gets its session (and group) from the process
that forks it, at the fork; ``setsid`` makes the caller the leader of a new session and group;
``setpgid`` moves a process to its own group or to another group of its session. The job's root
is made a session leader of its own (it leaves the session it ran in); a process in that
outside session joins the root's, and likewise for the outside group.

Three things a tree may hold that a plain parents-first fork does not make:
- a process forked before its parent's ``setsid`` keeps the session the parent had then: it is
  forked before the parent calls ``setsid`` (its "born" session, as CRIU calls it);
- a session whose leader has exited, members holding its id: a helper takes the leader's pid,
  calls ``setsid``, and forks the members with ``CLONE_PARENT``, so that their parent is the
  helper's own (which must then be every such member's parent: else the tree is refused);
- a process group whose leader has exited: a helper takes that pid, makes the group, the
  members join it, and it ends.
Helpers are reaped by the process that forked them before anything runs.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from transport.errors import UnsupportedResource
from transport.frozen import frozen
from transport.schema import TreeMember


@frozen
class Fork:
    """Make ``pid`` from ``by``'s stub; ``sibling``: with CLONE_PARENT (``by`` is a helper)."""
    pid: int
    by: int
    sibling: bool = False


@frozen
class Helper:
    """Make a helper with the exited leader's ``pid`` from ``by``'s stub (reaped by it later)."""
    pid: int
    by: int


@frozen
class Setsid:
    pid: int


@frozen
class OwnGroup:
    pid: int                     # setpgid(0, 0)


@frozen
class Join:
    pid: int
    pgid: int                    # setpgid(0, pgid)


@frozen
class Reap:
    helper: int
    by: int


Step = Fork | Helper | Setsid | OwnGroup | Join | Reap


@frozen
class Ids:
    """Where a process must end up: its session and group as the restored tree numbers them."""
    sid: int
    pgid: int


def targets(members: Sequence[TreeMember]) -> dict[int, Ids]:
    """Each member's session and group once restored: the root's own where it had the
    root's outside one (or one /proc showed as 0: led from outside the pid namespace)."""
    root = members[0]
    out = {root.pid: Ids(root.pid, root.pid)}
    for m in members[1:]:
        sid = root.pid if m.sid in (0, root.sid) else m.sid
        pgid = root.pid if m.pgid in (0, root.pgid) else m.pgid
        out[m.pid] = Ids(sid, pgid)
    return out


def plan(members: Sequence[TreeMember], new: Sequence[TreeMember]) -> list[Step]:
    """The steps that make ``new`` (parents first; the others of ``members`` exist already,
    in their sessions and groups). Raises UnsupportedResource where no order makes the tree."""
    want = targets(members)
    pids = {m.pid for m in members}
    adding = {m.pid for m in new}
    children: dict[int, list[TreeMember]] = {}
    for m in new:
        children.setdefault(m.ppid, []).append(m)

    # The session each new process must be born in (None: any), children before parents: a
    # leader that forked a child before its setsid must be born in that child's session.
    born: dict[int, int | None] = {}
    for m in reversed(new):
        if want[m.pid].sid != m.pid:
            born[m.pid] = want[m.pid].sid
            continue
        needs = {born[c.pid] for c in children.get(m.pid, ())} - {None, m.pid}
        # A child in a session whose leader exited may come from a helper instead (CLONE_PARENT
        # made it a child of this one); one in a living session cannot.
        if len(needs) > 1 and len(needs & pids) <= 1:
            needs = needs & pids or {min(n for n in needs if n is not None)}
        if len(needs) > 1:
            raise UnsupportedResource(
                f"pid {m.pid} has children in {len(needs)} sessions other than its own, whose leaders still run "
                f"(sessions {', '.join(map(str, sorted(n for n in needs if n is not None)))}): kcr-migrate "
                "cannot make that tree again", pid=m.pid)
        born[m.pid] = needs.pop() if needs else None

    steps: list[Step] = []
    session = {pid: want[pid].sid for pid in pids - adding}      # what each process has now
    group = {pid: want[pid].pgid for pid in pids - adding}
    helper_of: dict[int, int] = {}          # exited session leader's pid -> the parent of its helper
    # Each process's forks in one run of steps, the processes in the tree's order (the order a
    # stream or image brings them): a restore forks a process's children once its memory is in,
    # so that they share it copy-on-write (``agent.restore_session``).
    order = {m.pid: i for i, m in enumerate(members)}
    todo: list[int] = sorted((pid for pid in children if pid not in adding), key=lambda p: order.get(p, -1))
    while todo:
        pid = todo.pop(0)
        kids = children.get(pid, [])
        leads = pid in adding and want[pid].sid == pid
        forked: set[int] = set()
        if leads:
            # Before its setsid: the children that keep the session it was born in.
            for c in kids:
                if born[c.pid] is not None and born[c.pid] == session[pid]:
                    steps.append(Fork(c.pid, pid))
                    session[c.pid], group[c.pid] = session[pid], group[pid]
                    forked.add(c.pid)
            steps.append(Setsid(pid))
            session[pid] = group[pid] = pid
        for c in kids:
            need = born[c.pid]
            if c.pid in forked:
                continue
            if need is None or need == session[pid]:
                steps.append(Fork(c.pid, pid))
                session[c.pid], group[c.pid] = session[pid], group[pid]
            else:
                steps += _through_helper(c, pid, need, pids, helper_of, session, group)
        todo += [c.pid for c in kids]

    # Groups: own ones, then joins (a group whose leader has exited made by a helper first).
    for m in new:
        if want[m.pid].pgid == m.pid and group[m.pid] != m.pid:
            steps.append(OwnGroup(m.pid))
            group[m.pid] = m.pid
    made: dict[int, int] = {}             # group helper's pid -> the member that forked it
    for m in new:
        pgid = want[m.pid].pgid
        if group[m.pid] == pgid:
            continue
        if pgid not in pids and pgid not in helper_of and pgid not in made:
            steps += [Helper(pgid, m.pid), OwnGroup(pgid)]
            made[pgid] = m.pid
        steps.append(Join(m.pid, pgid))
        group[m.pid] = pgid
    steps += [Reap(h, by) for h, by in helper_of.items()] + [Reap(h, by) for h, by in made.items()]
    return steps


def _through_helper(c: TreeMember, parent: int, need: int, pids: set[int], helper_of: dict[int, int],
                    session: dict[int, int], group: dict[int, int]) -> list[Step]:
    """``c`` forked into session ``need``, which its parent never had: by a helper in the place
    of that session's exited leader, a child of ``c``'s parent, with CLONE_PARENT."""
    if need in pids:
        raise UnsupportedResource(
            f"pid {c.pid} is in the session of pid {need}, but its parent {parent} never was (it was reparented "
            "there): kcr-migrate cannot make that tree again", pid=c.pid)
    steps: list[Step] = []
    if need not in helper_of:
        helper_of[need] = parent
        steps += [Helper(need, parent), Setsid(need)]
    elif helper_of[need] != parent:
        raise UnsupportedResource(
            f"the processes of session {need}, whose leader has exited, have different parents ({helper_of[need]} "
            f"and {parent}): kcr-migrate cannot make that tree again", pid=c.pid)
    steps.append(Fork(c.pid, need, sibling=True))
    session[c.pid] = group[c.pid] = need
    return steps


def check(members: Sequence[TreeMember]) -> None:
    """Refuse (UnsupportedResource) a tree whose sessions and groups no plan makes."""
    plan(members, members[1:])


def mismatch(members: Sequence[TreeMember], got: Mapping[int, Ids]) -> str:
    """What differs between where each process is (``got``) and where it must be, as a phrase
    ("" if nothing)."""
    want = targets(members)
    for pid, ids in got.items():
        if pid in want and ids != want[pid]:
            return (f"process {pid} came back in session {ids.sid} and group {ids.pgid}, not session "
                    f"{want[pid].sid} and group {want[pid].pgid}")
    return ""
