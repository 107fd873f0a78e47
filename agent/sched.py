"""A thread's scheduling: nice, policy and real-time priority, CPU affinity, timer slack, I/O priority.

All but timer slack are read and set from outside, by tid, with the same calls ``renice``,
``chrt``, ``taskset`` and ``ionice`` use; timer slack only the thread itself can read or set, so dump and
restore inject ``prctl(PR_GET/SET_TIMERSLACK)`` into each thread. A job started under
``nice -n 10``, ``chrt -r 20``, ``taskset -c 1`` or ``ionice -c 3`` keeps that on the destination.

CPU affinity is carried as the set of CPUs when it restricts the thread (a subset of the
source's online CPUs) and not at all when it does not: an unrestricted thread runs anywhere
on the destination too. A restricted thread needs every one of its CPUs online at the
destination; when one is missing, preflight refuses (the pinning would be lost, or the
thread could not run at all), and so does restore if the pinning changed since; unless the
user chose ``affinity="warn"`` (``--affinity warn``): then the thread is pinned to those of
its CPUs the destination has (to none, if it has none of them: it runs anywhere) and the
report says what it runs without.

SCHED_DEADLINE's runtime, deadline and period need ``sched_getattr``, and its admission
control may refuse the thread on another host: refused before freezing.
"""
from __future__ import annotations

import ctypes
import os
from typing import Iterable

from transport.errors import RestoreError, UnsupportedResource
from transport.frozen import frozen
from transport.schema import ThreadState

SCHED_DEADLINE = 6
SCHED_RESET_ON_FORK = 0x40000000
POLICY_NAMES = {0: "SCHED_OTHER", 1: "SCHED_FIFO", 2: "SCHED_RR", 3: "SCHED_BATCH", 5: "SCHED_IDLE",
                SCHED_DEADLINE: "SCHED_DEADLINE"}
PR_SET_TIMERSLACK, PR_GET_TIMERSLACK = 29, 30
NR_IOPRIO_SET, NR_IOPRIO_GET, IOPRIO_WHO_PROCESS = 251, 252, 1
_libc = ctypes.CDLL(None, use_errno=True)


def online_cpus() -> set[int]:
    """This host's online CPUs (/sys/devices/system/cpu/online: "0-3,6")."""
    try:
        with open("/sys/devices/system/cpu/online") as f:
            text = f.read().strip()
    except OSError:
        return set(range(os.cpu_count() or 1))
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def id_mask(ids: Iterable[int]) -> bytes:
    """A set of CPUs (or NUMA nodes, ``agent.mempolicy``) as the images hold it: a bitmask,
    id 0 in the low bit of byte 0, trailing zero bytes cut."""
    mask = 0
    for i in ids:
        mask |= 1 << i
    return mask.to_bytes((mask.bit_length() + 7) // 8, "little")


def mask_ids(mask: bytes) -> set[int]:
    """The ids set in an ``id_mask``."""
    value = int.from_bytes(mask, "little")
    return {i for i in range(len(mask) * 8) if value >> i & 1}


def cpu_list(cpus: Iterable[int]) -> str:
    """CPUs as taskset -c writes them: "0-3,6"."""
    out: list[str] = []
    run: list[int] = []
    for cpu in sorted(cpus):
        if run and cpu == run[-1] + 1:
            run.append(cpu)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [cpu]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


@frozen
class ThreadSched:
    """What ``read_thread`` finds; named as ThreadState's fields."""
    nice: int
    sched_policy: int
    sched_priority: int
    sched_reset_on_fork: int
    cpus: bytes
    ioprio: int


def read_thread(tid: int) -> ThreadSched:
    """The thread's scheduling (all but timer slack, which only the thread can read)."""
    policy = os.sched_getscheduler(tid)
    cpus = os.sched_getaffinity(tid)
    return ThreadSched(nice=os.getpriority(os.PRIO_PROCESS, tid), sched_policy=policy & ~SCHED_RESET_ON_FORK,
                       sched_priority=os.sched_getparam(tid).sched_priority,
                       sched_reset_on_fork=int(bool(policy & SCHED_RESET_ON_FORK)),
                       cpus=b"" if cpus >= online_cpus() else id_mask(cpus), ioprio=_ioprio_get(tid))


def _ioprio_get(tid: int) -> int:
    """The thread's I/O priority (ionice), 0 where it has none of its own."""
    ret = _libc.syscall(NR_IOPRIO_GET, IOPRIO_WHO_PROCESS, tid)
    return max(ret, 0)


def check_process(pid: int, tids: Iterable[int]) -> None:
    """Refuse, before anything is frozen, scheduling that cannot be carried."""
    for tid in tids:
        try:
            policy = os.sched_getscheduler(tid) & ~SCHED_RESET_ON_FORK
        except ProcessLookupError:
            continue                    # the thread exited; the freeze sees the rest
        if policy == SCHED_DEADLINE:
            raise UnsupportedResource(
                f"pid {pid}'s thread {tid} runs under SCHED_DEADLINE, whose reservation kcr-migrate cannot "
                f"carry yet: switch it to another policy (chrt -o -p 0 {tid}) before moving it", pid=pid)


def pinned_cpus(tids: Iterable[int]) -> set[int]:
    """The CPUs the threads that are pinned (not allowed on every online CPU) are pinned to."""
    online = online_cpus()
    pinned: set[int] = set()
    for tid in tids:
        try:
            cpus = os.sched_getaffinity(tid)
        except ProcessLookupError:
            continue
        if not cpus >= online:
            pinned |= cpus
    return pinned


def check_cpus(cpus: Iterable[int], host: str, pid: int | None = None) -> None:
    """Every CPU a thread is pinned to exists here, or one line that says which do not."""
    missing = set(cpus) - online_cpus()
    if missing:
        raise RestoreError(
            f"pid {pid} has threads pinned to CPUs {cpu_list(missing)}, which {host} does not have online "
            f"(it has {cpu_list(online_cpus())}): the pinning would be lost; pin them to CPUs both hosts have "
            f"(taskset -a -c LIST -p {pid}) before moving it", pid=pid, host=host)


AFFINITY = ("refuse", "warn")      # what to do with a thread pinned to CPUs the destination lacks


def check_affinity(affinity: str) -> None:
    if affinity not in AFFINITY:
        raise ValueError(f"affinity must be one of {', '.join(AFFINITY)}, not {affinity!r}")


def missing_cpus(cpus: Iterable[int], host: str, pid: int | None, affinity: str) -> str | None:
    """Preflight: under "refuse", ``check_cpus``; under "warn", what the job will run without
    (None: nothing)."""
    if affinity == "refuse":
        check_cpus(cpus, host, pid)
        return None
    missing = set(cpus) - online_cpus()
    if not missing:
        return None
    return (f"pid {pid} has threads pinned to CPUs {cpu_list(missing)}, which {host} does not have online: they "
            f"run pinned to the rest of their CPUs there, or anywhere if none is left (--affinity warn)")


def apply_thread(tid: int, t: ThreadState, *, pid: int, host: str, affinity: str = "refuse") -> str | None:
    """Give restored thread ``tid`` the scheduling ``t`` had (it has the restorer's until then).
    Under ``affinity`` "warn" a pinning to CPUs this host lacks is kept to those it has (to
    none if none is left), and what it runs without is returned, for the report."""
    warning = None
    try:
        if t.cpus:
            wanted = mask_ids(t.cpus)
            if affinity == "refuse":
                check_cpus(wanted, host, pid)
            usable = wanted & online_cpus()
            if usable != wanted:
                warning = (f"thread {tid} of pid {pid} was pinned to CPUs {cpu_list(wanted)}; {host} lacks "
                           f"{cpu_list(wanted - usable)}, so it runs on "
                           + (f"CPUs {cpu_list(usable)}" if usable else "any of its CPUs"))
            os.sched_setaffinity(tid, usable or online_cpus())
        # Set whatever it has now: a process made while the restorer ran at real-time
        # priority (``agent.urgency``) took that from it.
        policy_flags = t.sched_policy | (SCHED_RESET_ON_FORK if t.sched_reset_on_fork else 0)
        if os.sched_getscheduler(tid) != policy_flags or os.sched_getparam(tid).sched_priority != t.sched_priority:
            os.sched_setscheduler(tid, policy_flags, os.sched_param(t.sched_priority))
        if os.getpriority(os.PRIO_PROCESS, tid) != t.nice:
            os.setpriority(os.PRIO_PROCESS, tid, t.nice)
        if t.ioprio and _libc.syscall(NR_IOPRIO_SET, IOPRIO_WHO_PROCESS, tid, t.ioprio) < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except OSError as exc:
        policy = POLICY_NAMES.get(t.sched_policy, str(t.sched_policy))
        raise RestoreError(f"could not give thread {tid} its scheduling ({policy}, priority {t.sched_priority}, "
                           f"nice {t.nice}, I/O priority {t.ioprio:#x}): {exc.strerror}; restore as root",
                           pid=pid, host=host) from None
    return warning
