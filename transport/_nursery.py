"""A nursery for the background tasks of an async context manager.

trio groups every error that leaves a nursery; a context manager that runs helper tasks
would turn a caller's plain ``MigrationError`` into an ``ExceptionGroup``. This one hands a
lone error back as it was raised, so callers catch what they expect.
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
        if len(group.exceptions) == 1:
            exc = group.exceptions[0]
            raise exc from exc.__cause__
        raise
