"""Checkpoint to and restore from image streams: the library side of `checkpoint`/`restore`.

The engine (``agent.checkpoint``) runs on a dedicated tracer thread of this process, which
must be a process of its own (the CLI is): a ptrace tracer's wait queue belongs to its whole
process, so callers that reap children themselves must not host it.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import threading
import tempfile
from typing import BinaryIO, Callable

from agent.cgroups import check_chosen
from agent.checkpoint import CheckpointOptions, CheckpointStats, RestoreResult
from agent.checkpoint import checkpoint as _checkpoint
from agent.checkpoint import restore as _restore
from agent.procfs import check_restore_privileges
from agent.tracer import Tracer
from transport.image import open_output
from transport.signing import ImageVerifier


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


def restore(src: BinaryIO, new_pid: bool = False, *, trust_image: bool = False,
            image_key: str | None = None, on_running: Callable[[], None] | None = None,
            affinity: str = "refuse", cgroup: str | None = None) -> RestoreResult:
    """Restore the process an image describes and let it run, under its own pid and thread
    ids (refused where they are taken), or under new ones with ``new_pid``.

    The image must be signed with this host's key (``image_key``: a key file; None:
    ``$KCR_IMAGE_KEY``, else /etc/kcr-migrate/image.key): anything else raises
    ``UntrustedImage`` before the frame concerned is used, and nothing is left of the
    process. ``trust_image`` restores unsigned images and images that do not verify,
    with a warning in the result. ``on_running`` runs (on the tracer's thread) as soon as the
    process runs, the point after which an interrupt changes nothing. ``affinity`` "warn": a
    thread pinned to CPUs this host lacks is pinned to those it has (or none) and the result
    warns; "refuse" fails instead. ``cgroup``: the unified cgroup (as /proc/PID/cgroup names
    it) the process, and every process of a tree, joins instead of its own; it must exist."""
    check_restore_privileges()
    if cgroup is not None:
        check_chosen(cgroup, socket.gethostname())
    cancel = threading.Event()
    peek = getattr(src, "peek", None)
    if peek is not None:
        # The key is read once the image's first bytes are here: a checkpoint piped in
        # (`checkpoint -o - | restore -i -`) makes the host's key, on its first use, before them.
        peek(1)
    verifier = ImageVerifier.for_host(image_key, trust_image=trust_image)

    def restore_and_tell() -> tuple[RestoreResult, object]:
        done = _restore(src, cancel=cancel, new_pid=new_pid, verifier=verifier, affinity=affinity,
                        cgroup=cgroup)
        if on_running is not None:
            on_running()
        return done

    with Tracer() as tracer:
        result, _ = tracer.call(restore_and_tell, on_interrupt=cancel)
    result.image_verified = verifier.verified
    if not verifier.verified:
        result.warnings.insert(0, f"restored an image whose signature was not verified, as trusted: "
                                  f"{verifier.message}")
    return result


__all__ = ["CheckpointOptions", "CheckpointStats", "RestoreResult", "checkpoint", "checkpoint_to_path", "restore"]
