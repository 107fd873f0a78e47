"""A nursery for the background tasks of an async context manager.

trio groups every error that leaves a nursery; a context manager that runs helper tasks
would turn a caller's plain ``MigrationError`` into an ``ExceptionGroup``. This one hands a
lone error back as it was raised, so callers catch what they expect. One error raised by
several tasks counts once: a peer declared gone (``RpcPeer.abandon``) fails every call
waiting on it with the same exception object.
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio


@asynccontextmanager
async def service_nursery() -> AsyncIterator[trio.Nursery]:
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        distinct = list({id(e): e for e in group.exceptions}.values())
        if len(distinct) == 1:
            exc = distinct[0]
            raise exc from exc.__cause__
        raise
