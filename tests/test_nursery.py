"""service_nursery: callers see the error a task raised, not a group of one."""
from __future__ import annotations

import pytest
import trio

from transport._nursery import service_nursery
from transport.errors import PeerGone, TransportError


async def test_one_error_raised_by_two_tasks_arrives_alone() -> None:
    # As when a peer is declared gone: every call waiting on it fails with that same object.
    gone = PeerGone("hostB stopped answering")

    async def fail() -> None:
        with trio.CancelScope(shield=True):     # it fails too, after the body did
            await trio.sleep(0.01)
        raise gone

    with pytest.raises(PeerGone) as info:
        async with service_nursery() as nursery:
            nursery.start_soon(fail)
            await trio.sleep(0)
            raise gone
    assert info.value is gone


async def test_different_errors_stay_grouped() -> None:
    async def fail() -> None:
        with trio.CancelScope(shield=True):
            await trio.sleep(0.01)
        raise TransportError("one")

    with pytest.raises(BaseExceptionGroup) as info:
        async with service_nursery() as nursery:
            nursery.start_soon(fail)
            await trio.sleep(0)
            raise PeerGone("two")
    assert {type(e) for e in info.value.exceptions} == {TransportError, PeerGone}


async def test_an_error_next_to_an_outer_cancellation_arrives_alone() -> None:
    # The caller's scope is cancelled while a task that was already running fails: as when a
    # sender trips over the connection the cancellation is closing.
    async def fail() -> None:
        with trio.CancelScope(shield=True):
            await trio.sleep(0.01)
        raise TransportError("closed on this side")

    async def serve() -> None:      # its Cancelled comes in a group of its own nursery
        async with trio.open_nursery() as inner:
            inner.start_soon(trio.sleep_forever)

    with trio.CancelScope() as outer:
        with pytest.raises(TransportError):
            async with service_nursery() as nursery:
                nursery.start_soon(fail)
                nursery.start_soon(serve)
                await trio.sleep(0)
                outer.cancel()
                await trio.sleep(1)
