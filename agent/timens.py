"""A process's monotonic and boot-time clocks, kept across hosts with a time namespace.

CLOCK_MONOTONIC and CLOCK_BOOTTIME count from a host's boot, so each host has its own. A
program keeps deadlines in them (Python's ``time.sleep`` sleeps until an absolute monotonic
time; asyncio, libuv, Go and Java schedule their timers by them): moved as it is to a host
booted a day later, it would see its clock go back a day and wait a day for a timer due in a
second; to one booted earlier, every timeout would expire at once.

So the stream's header carries the process's view of both clocks (the host's plus its own
time namespace's offsets) and the real time at that moment. Where the restored process would
see its clocks jump (back at all, or forward by more than ``SLACK_NS`` beyond the real time
that passed, which NTP keeps alike across hosts), it is made in a new time namespace
(time_namespaces(7)) whose offsets continue its clocks from where it saw them, plus that real
time. From a host to itself, or to one whose clocks agree, nothing changes.

A process already in a time namespace of its own moves with its view of the clocks the same
way (its namespace is made again with the offsets this host needs); the processes of a tree
share one.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time
from typing import Callable, TypeVar

from transport.errors import NoSuchProcess, UnsupportedResource
from transport.frozen import frozen

CLONE_NEWTIME = 0x80
SLACK_NS = 1_000_000_000      # forward jumps up to this (beyond the real time that passed) are left be
T = TypeVar("T")


@frozen
class Clocks:
    """A process's view of its clocks at one moment, with the host's real time then (ns)."""
    monotonic_ns: int
    boottime_ns: int
    realtime_ns: int


def offsets(pid: int | str) -> tuple[int, int]:
    """The (monotonic, boottime) offsets of ``pid``'s time namespace, in ns (0, 0 in the
    host's own)."""
    out = {"monotonic": 0, "boottime": 0}
    try:
        with open(f"/proc/{pid}/timens_offsets") as f:
            for line in f:
                name, sec, nsec = line.split()
                out[name] = int(sec) * 1_000_000_000 + int(nsec)
    except FileNotFoundError:       # a kernel without time namespaces
        pass
    return out["monotonic"], out["boottime"]


def view(pid: int) -> Clocks:
    """``pid``'s clocks now, as it reads them."""
    mono_off, boot_off = offsets(pid)
    mono = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    boot = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    real = time.clock_gettime_ns(time.CLOCK_REALTIME)
    return Clocks(mono + mono_off, boot + boot_off, real)


def needed(seen: Clocks, same_boot: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """The (monotonic, boottime) offsets a process that saw ``seen`` needs here so that its
    clocks go on from there, the real time since included; None where this host's own
    clocks do that well enough (no step back, none forward beyond ``SLACK_NS``). On the boot
    that wrote the image (``same_boot``: the offsets its time namespace had) they are the
    host's clocks plus those offsets, exactly: the real-time clock, which NTP or a resumed
    VM may have stepped since, is not asked."""
    if same_boot is not None:
        return None if same_boot == (0, 0) else same_boot
    if not seen.realtime_ns:
        return None           # an image of kcr-migrate before clocks were carried
    passed = max(0, time.clock_gettime_ns(time.CLOCK_REALTIME) - seen.realtime_ns)
    wanted = []
    for was, clock in ((seen.monotonic_ns, time.CLOCK_MONOTONIC), (seen.boottime_ns, time.CLOCK_BOOTTIME)):
        here = time.clock_gettime_ns(clock)
        # never behind what it saw, whatever the two hosts' real-time clocks say
        wanted.append(max(was + passed, was + 1) - here)
    mono, boot = wanted
    if all(-SLACK_NS < off <= 0 for off in wanted):
        return None           # its clocks only move on here, by about the time that passed
    return mono, boot


def spawn_in(offs: tuple[int, int], spawn: Callable[[], T]) -> T:
    """Run ``spawn`` (which starts a process) in a thread of its own that first made a new time
    namespace with offsets ``offs`` for its children: the process started is in it, and the
    agent's other threads are not (a thread's namespaces end with it)."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWTIME) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"cannot make a time namespace to keep the process's clocks: "
                                   f"{os.strerror(err)}")
            text = "".join(f"{name} {off // 1_000_000_000} {off % 1_000_000_000}\n"
                           for name, off in zip(("monotonic", "boottime"), offs))
            # this thread's own (/proc/TID: /proc/thread-self/ has no such file)
            with open(f"/proc/{threading.get_native_id()}/timens_offsets", "w") as f:
                f.write(text)
            result.append(spawn())
        except BaseException as exc:      # handed to the caller's thread
            error.append(exc)

    t = threading.Thread(target=run, name="kcr-timens")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def check(pid: int, root: int | None = None) -> None:
    """A process in a time namespace of its own moves with it (made again on the destination);
    one caught between unshare() and its first child, or a tree spread over several (``root``:
    the tree's root, whose namespace every process of it must share), is refused. One that
    has exited (a zombie has no namespaces left) is NoSuchProcess: it left the job, it is in
    no other namespace (a running tree's check drops it)."""
    def ids(p: int) -> tuple[str, str]:
        try:
            return os.readlink(f"/proc/{p}/ns/time"), os.readlink(f"/proc/{p}/ns/time_for_children")
        except FileNotFoundError:
            if not os.path.exists("/proc/self/ns/time"):
                return "", ""             # a kernel without time namespaces (CONFIG_TIME_NS unset)
            raise NoSuchProcess(f"pid {p} has exited", pid=p) from None
    own, children = ids(pid)
    if own != children:
        raise UnsupportedResource(f"pid {pid} made a time namespace for its children (unshare -T) and is not in "
                                  "it: kcr-migrate cannot move it yet (see README, Limits)", pid=pid)
    if root is not None and root != pid and ids(root) != (own, children):
        raise UnsupportedResource(f"pid {pid} is in another time namespace than pid {root}, whose tree it moves "
                                  "with: kcr-migrate makes one for the whole tree; move them apart", pid=root)
