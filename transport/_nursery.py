"""A nursery for the background tasks of an async context manager.

trio groups every error that leaves a nursery; a context manager that runs helper tasks
would turn a caller's plain ``MigrationError`` into an ``ExceptionGroup``. This one hands a
lone error back as it was raised, so callers catch what they expect. One error raised by
several tasks counts once: a peer declared gone (``RpcPeer.abandon``) fails every call
waiting on it with the same exception object. And an error raised next to the ``Cancelled``
of a scope outside the nursery arrives alone too (it passes that scope either way).
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator, Iterator

import trio


def leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from leaves(e)
        else:
            yield e


@asynccontextmanager
async def service_nursery() -> AsyncIterator[trio.Nursery]:
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        distinct = list({id(e): e for e in leaves(group)}.values())
        errors = [e for e in distinct if not isinstance(e, trio.Cancelled)]
        # A lone error next to Cancelled of an outer scope passes that scope either way.
        lone = errors if errors else distinct
        if len(lone) == 1:
            raise lone[0] from lone[0].__cause__
        raise
