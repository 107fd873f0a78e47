"""The long call a migration session is running (pre-copy, freeze, receiving pages), if any.

Settling a session (release, hold, kill, abort) must not pull the process or the tracker
from under such a call: when the orchestrator gives up on it, the call's cancellation only
reaches it at its next checkpoint, and a worker thread it waits for may still be reading
the page tables or writing pages. ``stop()`` cancels the call and waits until it has unwound.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import trio

from transport.errors import Cancelled, ProtocolError


class InFlight:
    def __init__(self) -> None:
        self._scope: trio.CancelScope | None = None
        self._what = ""
        self._done = trio.Event()
        self._done.set()

    @contextmanager
    def run(self, what: str) -> Iterator[None]:
        """Run the body as the session's call ``what``; one at a time."""
        if self._scope is not None:
            raise ProtocolError(f"{what} was asked for while {self._what} is still running")
        self._what, self._done = what, trio.Event()
        with trio.CancelScope() as scope:
            self._scope = scope
            try:
                yield
            finally:
                self._scope = None
                self._done.set()
        if scope.cancelled_caught:
            raise Cancelled(f"{what} was stopped: the migration is being settled")

    async def stop(self) -> None:
        """Cancel the running call, if any, and wait until it has ended."""
        if self._scope is not None:
            self._scope.cancel()
        await self._done.wait()
