"""A live process held for the dirty trackers: paused for an instant, or injected into.

Implements ``precopy.control.ProcessControl`` with the agent's freezer and injector. Every
ptrace request runs on the one tracer thread (``agent.tracer``), whichever thread asks.
Between requests the process is not traced at all: it is seized, interrupted, used, and
detached again, so a process being measured runs undisturbed, and nothing is left behind if
this process dies.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from agent import freeze as freezer
from agent.dump import abort_rseq_sections
from agent.inject import Injector, RemoteMemory, syscall_gadget
from agent.tracer import Tracer
from precopy.control import RemoteSyscalls


class _Syscalls:
    """RemoteSyscalls over an injector that lives on the tracer thread."""

    def __init__(self, tracer: Tracer, injector: Injector) -> None:
        self._tracer = tracer
        self._injector = injector

    def call(self, name: str, *args: int) -> int:
        return self._tracer.call(self._injector.call, name, *args)


def _hold(pid: int) -> freezer.Held:
    return freezer.seize(pid)


def _inject_begin(pid: int) -> tuple[freezer.Held, Injector]:
    held = _hold(pid)
    try:
        mem = RemoteMemory(pid, writable=False)
        try:
            gadget = syscall_gadget(pid, mem)
            abort_rseq_sections(pid, mem)    # as the kernel would on resuming it anyway
        finally:
            mem.close()
        return held, Injector(pid, gadget)
    except BaseException:
        freezer.let_go(held)
        raise


def _inject_end(held: freezer.Held, injector: Injector) -> None:
    try:
        injector.close()
    finally:
        freezer.let_go(held)


class TracedTarget:
    """``ProcessControl`` for one pid, through a tracer thread the caller owns."""

    def __init__(self, pid: int, tracer: Tracer) -> None:
        self.pid = pid
        self.tracer = tracer

    @contextmanager
    def paused(self) -> Iterator[None]:
        held = self.tracer.call(_hold, self.pid)
        try:
            yield
        finally:
            self.tracer.call(freezer.let_go, held)

    @contextmanager
    def injected(self) -> Iterator[RemoteSyscalls]:
        held, injector = self.tracer.call(_inject_begin, self.pid)
        try:
            yield _Syscalls(self.tracer, injector)
        finally:
            self.tracer.call(_inject_end, held, injector)
