"""Restore from image streams: the library side of `restore` (of `checkpoint`:
``migrate.images``).

The engine (``agent.image_restore``) runs on a dedicated tracer thread of this process, which
must be a process of its own (the CLI is): a ptrace tracer's wait queue belongs to its whole
process, so callers that reap children themselves must not host it.
"""
from __future__ import annotations

import socket
import threading
from typing import BinaryIO, Callable

from agent.cgroups import check_chosen
from agent.image_restore import RestoreResult
from agent.image_restore import restore as _restore
from agent.procfs import check_restore_privileges
from agent.tracer import Tracer
from transport.signing import ImageVerifier


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


__all__ = ["RestoreResult", "restore"]
