"""Signals sent to a job while it is frozen for a move, after its state was read.

A frozen process (every thread in a ptrace stop) keeps each signal sent to it queued. What
was queued when the state was collected travels with the state. What arrives later, until
the source is ended or made a stand-in, is *late*: the holder finds it by comparing each
queue with what it collected (``LateSignals``), and the destination delivers it to the moved
process once that runs (``deliver``). A `kill` or `scancel` during a move is not lost.

A process of the job found dead (only SIGKILL ends a frozen process) reads as a late SIGKILL:
before the point of no return the migration is abandoned instead; after it, the moved copy is
killed too. Standard signals already pending are merged by the kernel as they would have been.

On the destination a signal whose siginfo came from ``sigqueue`` (a negative ``si_code``)
keeps it, value included; one from ``kill``/``tgkill`` or the kernel is sent again by
number (the kernel lets no other process forge such a siginfo), so the handler sees our
agent as the sender.
"""
from __future__ import annotations

import ctypes
import errno
import os
import signal
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent import ptrace
from precopy.kernel import syscall, tgkill
from transport.errors import ProtocolError

SIGINFO_SIZE = 128
SI_USER = 0
SI_TKILL = -6
SYS_rt_sigqueueinfo = 129
SYS_rt_tgsigqueueinfo = 297
SIGKILL = int(signal.SIGKILL)

# One late signal on the wire: [pid, tid (0: sent to the process), siginfo (128 bytes)].
Late = list[Any]


def is_guard(info: bytes, signo: int = 0) -> bool:
    """The siginfo is of the SIGSTOP this process (the holder, or the keeper it became) sent
    its job at the point of no return (``agent.holder``'s guard): not a signal of the job's."""
    sig = signo or int.from_bytes(info[:4], "little", signed=True)
    return sig == signal.SIGSTOP and int.from_bytes(info[8:12], "little", signed=True) == SI_USER \
        and int.from_bytes(info[16:20], "little", signed=True) == os.getpid()


def sigcont_unseen(stopped: bool, sigactions: Iterable[Any], sigmasks: Iterable[int]) -> bool:
    """Whether a SIGCONT sent to this frozen process would go unseen once it runs on: it was
    not in a job-control stop (SIGCONT would continue it), catches no SIGCONT (a handler would
    run) and no thread blocks it (a sigwait or signalfd could read it). Then the SIGCONT that
    discards the guard (``agent.holder``'s release after commit_pending) leaves no trace, and
    the source may be asked to commit before the destination is ready."""
    cont = int(signal.SIGCONT)
    if stopped or any(int(m) >> (cont - 1) & 1 for m in sigmasks):
        return False
    return not any(a.signo == cont and a.handler > 1 for a in sigactions)


def killed_info() -> bytes:
    """The siginfo of a SIGKILL we saw only by its effect."""
    return SIGKILL.to_bytes(4, "little") + bytes(4) + SI_USER.to_bytes(4, "little", signed=True) \
        + bytes(SIGINFO_SIZE - 12)


@dataclass
class LateSignals:
    """What was carried of each process's signal queues; ``take`` what arrived since."""

    carried: dict[int, Counter[tuple[int, bytes]]] = field(default_factory=dict)   # pid -> (tid|0, siginfo)
    killed: set[int] = field(default_factory=set)

    def carry(self, pid: int, shared: Iterable[bytes], threads: Mapping[int, Iterable[bytes]]) -> None:
        """The queues as collected: ``shared`` (the process's), ``threads`` (each thread's)."""
        got: Counter[tuple[int, bytes]] = Counter((0, bytes(i)) for i in shared)
        for tid, infos in threads.items():
            got.update((tid, bytes(i)) for i in infos)
        self.carried[pid] = got

    def take(self, helds: Iterable[Any], alive: Any) -> list[Late]:
        """Signals queued in the frozen ``helds`` (``agent.freeze.Held``) beyond what was
        carried, each once (they count as carried from now on); a held process that is dead
        gives one SIGKILL. ``alive(held)`` says whether it is still there."""
        out: list[Late] = []
        for held in helds:
            pid = held.pid
            if pid not in self.carried:
                continue                  # collected nothing of it: not this module's to say
            if not alive(held):
                if pid not in self.killed:
                    self.killed.add(pid)
                    out.append([pid, 0, killed_info()])
                continue
            now: Counter[tuple[int, bytes]] = Counter()
            try:
                now.update((0, i) for i in ptrace.peek_siginfo(pid, shared=True))
                for tid in sorted(held.stopped):
                    now.update((tid, i) for i in ptrace.peek_siginfo(tid, shared=False))
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise
                if pid not in self.killed:       # died as we looked
                    self.killed.add(pid)
                    out.append([pid, 0, killed_info()])
                continue
            new = Counter({k: n for k, n in (now - self.carried[pid]).items() if not is_guard(k[1])})
            for (tid, info), n in sorted(new.items()):
                out.extend([pid, tid, info] for _ in range(n))
            self.carried[pid] += new
        return out


def check(signals: Any) -> list[tuple[int, int, bytes]]:
    """Late signals from the other side, validated (untrusted input)."""
    if not isinstance(signals, (list, tuple)) or len(signals) > 4096:
        raise ProtocolError("late signals: not a list, or too long")
    out = []
    for s in signals:
        if not (isinstance(s, (list, tuple)) and len(s) == 3 and isinstance(s[0], int) and isinstance(s[1], int)
                and isinstance(s[2], bytes) and len(s[2]) == SIGINFO_SIZE):
            raise ProtocolError("late signals: each is [pid, tid, 128-byte siginfo]")
        pid, tid, info = s
        signo = int.from_bytes(info[:4], "little")
        if not (0 < pid < 1 << 22 and 0 <= tid < 1 << 22 and 1 <= signo <= 64):
            raise ProtocolError(f"late signals: pid {pid}, tid {tid} or signal {signo} out of range")
        out.append((pid, tid, info))
    return out


def deliver(pid: int, tid: int, info: bytes) -> bool:
    """Send one late signal to ``pid`` (to its thread ``tid`` if not 0). False if it is gone."""
    signo = int.from_bytes(info[:4], "little")
    code = int.from_bytes(info[8:12], "little", signed=True)
    try:
        if code < 0 and code != SI_TKILL:       # sigqueue and the like: keep the siginfo
            buf = ctypes.create_string_buffer(info, SIGINFO_SIZE)
            if tid:
                syscall(SYS_rt_tgsigqueueinfo, pid, tid, signo, buf)
            else:
                syscall(SYS_rt_sigqueueinfo, pid, signo, buf)
        elif tid:
            tgkill(pid, tid, signo)
        else:
            os.kill(pid, signo)
    except ProcessLookupError:
        return False
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return False
        raise
    return True


def names(signals: Sequence[Late]) -> str:
    """'SIGTERM, SIGUSR1 x2' for a report."""
    counts: Counter[str] = Counter()
    for _, _, info in signals:
        signo = int.from_bytes(bytes(info[:4]), "little")
        try:
            counts[signal.Signals(signo).name] += 1
        except ValueError:
            counts[f"signal {signo}"] += 1
    return ", ".join(f"{n} x{k}" if k > 1 else n for n, k in counts.items())
