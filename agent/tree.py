"""A job as a process tree: which processes move with a pid, whether they can, and what the
destination must know of each (pid, parent, session, group).

One set of checks for ``checkpoint`` and for live migration: the root and every descendant
is checked alone (``procfs.check_supported``), their fd tables together (what they share
with each other is carried, what they share with the outside is refused). Anonymous memory
they share stays shared (``agent.shared_memory``).
"""
from __future__ import annotations

import errno
import functools
import os
import time
from typing import Mapping

from agent import fdtable, sessions
from agent import freeze as freezer
from agent.procfs import check_supported, check_target, process_tree, read_stat
from precopy.kernel import KCMP_FILES, KCMP_FS, KCMP_VM, kcmp
from precopy.layout import FrozenFileMaps
from transport.errors import MigrationError, NoSuchProcess, ProcessError, ProcessExited, UnsupportedResource
from transport.schema import ProcessTree, TreeMember


RUNNING_TRIES = 20        # a running tree that changes on every look (make -j) is checked this often
VFORK_WAIT = 1.0          # seconds a running job's check waits for a vfork() to end before it refuses
# What two processes (not threads) can share since clone(): restore makes each its own.
SHARED_BY_CLONE = (
    (KCMP_VM, "its memory", "as a parent does in vfork() until the child execs or exits, or after clone(CLONE_VM)"),
    (KCMP_FILES, "one fd table", "clone(CLONE_FILES): an fd one opens or closes is the other's too"),
    (KCMP_FS, "one working directory, root and umask", "clone(CLONE_FS): a chdir or umask of one is the other's"),
)


def check_tree(pid: int, redirect: Mapping[int, str], frozen: list[int] | None = None, *,
               accept_waiting: bool = False, outside_watch: fdtable.OutsideWatch | None = None,
               maps: FrozenFileMaps | None = None) -> list[int]:
    """The processes of ``pid``'s tree that run (parents first; zombies, its children that
    exited and were not waited for yet, are carried by ``tree_record`` alone), each checked.
    ``frozen``: those processes, stopped already; their fd tables are then checked as they
    are read (``fdtable.collect_tree``) rather than here, and the tree must not have grown.
    ``redirect`` (fd -> path) is the root's. ``accept_waiting``: the source ends once dumped;
    ``outside_watch``: where the other processes' fds are read (``fdtable.describe_tree``);
    ``maps``: where the frozen processes' file mappings are read once for this check and their
    fd tables (``fdtable.collect_tree``). Refusals name what cannot be carried and what to do."""
    check_target(pid)
    every = process_tree(pid)
    if os.getpid() in every:
        raise ProcessError(f"pid {pid} is an ancestor of kcr-migrate itself (pid {os.getpid()}), which would have "
                           "to move with it: run kcr-migrate from outside that process's tree (another terminal, "
                           "or setsid)", pid=pid)
    if frozen is None:
        return _check_running(pid, redirect, accept_waiting, outside_watch)
    for p in every[1:]:
        if p not in frozen and not zombie(p):
            raise UnsupportedResource(f"pid {pid}'s process tree changed while it was being frozen (a fork): "
                                      "nothing was moved; try again", pid=p)
    for p in frozen[1:]:
        try:
            check_target(p)
        except NoSuchProcess:
            raise UnsupportedResource(f"pid {p} of pid {pid}'s tree exited while it was being checked: nothing "
                                      "was moved; try again", pid=p) from None
    for p in frozen:
        check_supported(p, redirect=redirect if p == pid else None, tree=frozen,
                        maps=maps.of(p) if maps is not None else None)
    check_nothing_shared_by_clone(frozen)
    return frozen


def check_nothing_shared_by_clone(pids: list[int], vfork_wait: float = 0.0) -> None:
    """Refuse processes of the job that share memory, an fd table or a working directory
    with each other or with the root's parent (``SHARED_BY_CLONE``): restored, each would
    have its own, and what one did the other would no longer see. kcmp orders the kernel's
    objects, so each kind is one sort of the job, not a comparison of every pair.

    ``vfork_wait`` (a job that runs): a parent sharing its memory with its child is most
    often a vfork() (posix_spawn, as make and shells start commands) whose child has not
    called exec or exit yet, a moment that passes: one that ends within that many seconds is
    no refusal. (Frozen, none is in progress: a parent in vfork() does not stop until it ends.)"""
    root = pids[0]
    try:
        parent = int(read_stat(root)[4])
    except NoSuchProcess:
        parent = 0
    members = list(pids)
    if parent > 1:
        try:
            kcmp(root, parent, KCMP_FILES, 0, 0)
            members.append(parent)
        except OSError:
            pass        # gone, or not ours to look at (another user's sshd, for a user's job)
    for kind, what, how in SHARED_BY_CLONE:
        def order(a: int, b: int) -> int:
            got = kcmp(a, b, kind, 0, 0)
            return 0 if got == 0 else -1 if got == 1 else 1
        try:
            ranked = sorted(members, key=functools.cmp_to_key(order))
        except OSError as exc:
            if exc.errno in (errno.ESRCH, errno.ENOSYS):
                return       # one gone (the caller looks again) / a kernel without kcmp (refused elsewhere)
            raise
        for a, b in zip(ranked, ranked[1:]):
            if order(a, b) != 0:
                continue
            a, b = sorted((a, b), key=lambda p: (p == parent, members.index(p)))
            if b == parent:
                whom = f"its parent {b}, which does not move with it"
            elif kind == KCMP_VM and int(read_stat(b)[4]) == a:
                if vfork_wait and vfork_ended(a, b, vfork_wait):
                    continue
                whom = f"its child {b},"
            else:
                whom = f"pid {b}"
            raise UnsupportedResource(f"pid {a} shares {what} with {whom} ({how}): restored, each would have its "
                                      "own; kcr-migrate cannot move it yet (see README, Limits)", pid=a)


def vfork_ended(parent: int, child: int, timeout: float) -> bool:
    """Has ``child`` stopped sharing ``parent``'s memory (it called exec or exit, or one of them
    is gone) within ``timeout`` seconds?"""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if kcmp(parent, child, KCMP_VM, 0, 0) != 0:
                return True
        except OSError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)


def _check_running(pid: int, redirect: Mapping[int, str], accept_waiting: bool,
                   outside_watch: fdtable.OutsideWatch | None) -> list[int]:
    """``check_tree`` of a tree that runs, and changes as it is read: a child exits between
    two reads of it (make's compilers, a shell script's commands; one on its way out has no
    memory left to look at, nor namespaces to read), one forks a child that shares its pipe
    and exits again, a process gone reads as one in another namespace. A check that fails is
    made again on the tree as it is then: one that found a process gone, always; one that
    refused, until the same refusal comes twice in a row (what changed in between was not the
    cause). At most ``RUNNING_TRIES`` checks. The root may not exit (NoSuchProcess)."""
    last = ""
    refused: BaseException | None = None
    for _ in range(RUNNING_TRIES):
        pids = [p for p in process_tree(pid) if not zombie(p)]
        try:
            for p in list(pids):
                try:
                    if p != pid:
                        check_target(p)
                    check_supported(p, redirect=redirect if p == pid else None, tree=pids)
                except (NoSuchProcess, ProcessLookupError, FileNotFoundError):
                    if p == pid:
                        raise
                    pids.remove(p)      # it left the job, as it would have a moment later
            check_nothing_shared_by_clone(pids, vfork_wait=VFORK_WAIT)
            if len(pids) > 1:
                sessions.check(tree_record(pid).members)     # that a restore can make them again
            while True:
                try:
                    fdtable.describe_tree(pids, {pid: redirect}, accept_waiting=accept_waiting,
                                          outside_watch=outside_watch)
                    return pids
                except (NoSuchProcess, ProcessLookupError, FileNotFoundError):
                    # One gone while its fds were read: the others are read again without it
                    # (a new look would likely find another on its way out, on a busy machine).
                    gone = [p for p in pids if p != pid and not _running(p)]
                    if not gone:
                        raise
                    pids = [p for p in pids if p not in gone]
        except (NoSuchProcess, ProcessLookupError, FileNotFoundError):
            check_target(pid)                # the root itself gone: that, not what its exit broke
            last, refused = "", None
        except (MigrationError, OSError) as exc:
            check_target(pid)
            why = f"{type(exc).__name__}: {exc}"
            if why == last:
                raise
            last, refused = why, exc
    if refused is not None:
        raise refused
    raise UnsupportedResource(f"pid {pid}'s process tree changed on each of {RUNNING_TRIES} looks (its processes "
                              "start and exit faster than they can be checked): nothing was moved; try again",
                              pid=pid)


def freeze_tree(root: int, helds: dict[int, freezer.Held]) -> tuple[list[int], list[int]]:
    """Freeze ``root``'s tree as one cut: every process in ``helds`` frozen, then the tree read
    again until none of it runs: one forked meanwhile is seized, frozen (it joins); one that
    exited is let go (it leaves). ``helds`` becomes the frozen tree, parents first. Returns
    (joined, left). The root may not exit (ProcessExited)."""
    joined: list[int] = []
    left: list[int] = []
    while True:
        for p, held in list(helds.items()):
            if held.frozen:
                continue
            try:
                if not freezer.alive(held):
                    raise ProcessExited(f"pid {p} exited before it was moved" + (
                        ": there is nothing left to move" if p == root else ""), pid=p)
                freezer.freeze(held)
            except ProcessExited:
                if p == root:
                    raise
                freezer.let_go(helds.pop(p))
                left.append(p)
        seized = 0
        for p in process_tree(root):
            if p in helds or zombie(p):
                continue
            try:
                check_target(p)
                helds[p] = freezer.seize(p)
            except (NoSuchProcess, ProcessExited):
                continue
            joined.append(p)
            seized += 1
        if not seized:
            break
    pids = [p for p in process_tree(root) if p in helds]
    for p in [p for p in helds if p not in pids]:
        freezer.let_go(helds.pop(p))
        left.append(p)
    frozen = {p: helds.pop(p) for p in pids}
    helds.update(frozen)
    return [p for p in joined if p in helds], [p for p in left if p not in joined]


def _running(pid: int) -> bool:
    """Is ``pid`` there, and not a zombie?"""
    try:
        return read_stat(pid)[3] not in ("Z", "X")
    except NoSuchProcess:
        return False


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
