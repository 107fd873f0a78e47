"""What dirty trackers need from the layer that owns ptrace, as protocols.

precopy never imports agent: a tracker that must run a system call inside the target
(uffd-wp creates its userfaultfd there) or hold the target still for an instant (soft-dirty
scans and clears in one step) asks a ``ProcessControl`` for it. ``agent.target`` provides
one over the agent's freezer and injector; tests may provide their own.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol


class RemoteSyscalls(Protocol):
    """System calls run by a stopped thread of the target, with the target's credentials."""

    def call(self, name: str, *args: int) -> int:
        """Run ``name`` (an x86_64 system call name) and return its result; raise OSError on failure."""
        ...


class ProcessControl(Protocol):
    def paused(self) -> AbstractContextManager[None]:
        """Every thread of the target is stopped inside the ``with`` block, and runs again after it."""
        ...

    def injected(self) -> AbstractContextManager[RemoteSyscalls]:
        """The target is stopped and system calls can be injected into its leader thread.

        On leaving the block the thread's registers and signal mask are exactly as before and
        the target runs again."""
        ...
