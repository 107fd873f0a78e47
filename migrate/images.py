"""Checkpoint to image streams: the library side of `checkpoint` (of `restore`:
``migrate.image_restore``, which loads none of the checkpoint's modules).

The engine (``agent.checkpoint``) runs on a dedicated tracer thread of this process, which
must be a process of its own (the CLI is): a ptrace tracer's wait queue belongs to its whole
process, so callers that reap children themselves must not host it.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import tempfile
from typing import BinaryIO, Callable

from agent.checkpoint import CheckpointOptions, CheckpointStats
from agent.checkpoint import checkpoint as _checkpoint
from agent.tracer import Tracer
from transport.image import open_output


def checkpoint(pid: int, out: BinaryIO, options: CheckpointOptions | None = None,
               on_complete: Callable[[], None] | None = None) -> CheckpointStats:
    """Write an image of ``pid`` to ``out``; kill it afterwards unless ``leave_running``.

    ``on_complete`` runs when the image is whole and before the process is killed."""
    opts = options or CheckpointOptions()
    if opts.cancel is None:
        opts = dataclasses.replace(opts, cancel=threading.Event())
    with Tracer() as tracer:
        return tracer.call(_checkpoint, pid, out, opts, on_complete, on_interrupt=opts.cancel)


def checkpoint_to_path(pid: int, path: str, options: CheckpointOptions | None = None,
                       on_complete: Callable[[], None] | None = None) -> CheckpointStats:
    """Checkpoint into a file (or "-" for stdout). A file appears only once complete and synced;
    ``on_complete`` runs right after (on the tracer's thread), before the process is killed."""
    if path == "-":
        with open_output("-") as out:
            def flush() -> None:
                out.flush()
                if on_complete is not None:
                    on_complete()
            return checkpoint(pid, out, options, on_complete=flush)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".kcr-image-", dir=directory)
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as out:
            def commit() -> None:
                out.flush()
                os.fsync(out.fileno())
                os.replace(tmp, path)
                if on_complete is not None:
                    on_complete()
            return checkpoint(pid, out, options, on_complete=commit)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


__all__ = ["CheckpointOptions", "CheckpointStats", "checkpoint", "checkpoint_to_path"]
