"""Restore from an image stream: the engine under `kcr-migrate restore` (writing one is
``agent.checkpoint``, whose modules a restore does not load).

It runs on a tracer thread (``agent.tracer``); records and pages go to a ``RestoreSession``,
the one a live migration's destination uses.
"""
from __future__ import annotations

import threading
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

from agent.restore_session import RestoreSession
from agent.tracer import stop_signal_pending
from transport.errors import Cancelled, MigrationError, RestoreError
from transport.image import ImageReader
from transport.pages import PageBatch
from transport.signing import ImageVerifier


@dataclass
class RestoreResult:
    pid: int
    threads: int
    pages: int
    restore_time_ms: float
    pages_filled: int = 0      # of ``pages``, put in place by UFFDIO_COPY (the rest via /proc/PID/mem)
    warnings: list[str] = field(default_factory=list)
    processes: int = 1
    image_verified: bool = False     # its signature verified with this host's key (else --trust-image let it in)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def restore(src: BinaryIO, *, resume: bool = True, cancel: threading.Event | None = None,
            new_pid: bool = False, verifier: ImageVerifier | None = None,
            affinity: str = "refuse", cgroup: str | None = None) -> tuple[RestoreResult, RestoreSession]:
    """Rebuild the process an image describes (with its descendants, for a tree); it runs on
    return unless ``resume`` is False. It keeps its pid and thread ids unless ``new_pid``
    (refused for a tree). Setting ``cancel`` aborts at the next record or page batch:
    nothing of it is left. ``verifier`` checks the image's signature (without one, no key:
    every image is refused). ``affinity``: "refuse" or "warn" for a thread pinned to CPUs
    this host lacks (``agent.sched``). ``cgroup``: the unified cgroup to put it (every
    process of a tree) in instead of its own."""
    t0 = time.monotonic()
    # No prepare_codecs() here: nothing is frozen, and each record type's codec is worked
    # out at its first use (an image holds few of the types).
    session = RestoreSession(keep_ids=not new_pid, affinity=affinity, cgroup=cgroup)
    done = False

    def check() -> None:
        if cancel is not None and (cancel.is_set() or stop_signal_pending()):
            raise Cancelled("interrupted: the half-restored process was removed")

    def write(batch: PageBatch) -> None:
        check()
        session.write_pages(batch)

    try:
        # Page batches are checked, decompressed and written by the reader's workers, several
        # at once; records come here, in order, each once the pages before it are in.
        with closing(iter(ImageReader(src, verifier=verifier, sink=write))) as items:
            for item in items:
                check()
                session.take(item)
        session.finish()
        if resume:
            session.resume()
        done = True
    except MigrationError:
        raise
    except OSError as exc:
        raise RestoreError(f"restore failed: {exc}") from None
    finally:
        if not done:
            session.abort()
    procs = session.procs.values()
    result = RestoreResult(
        pid=session.root.pid, threads=session.threads,
        pages=sum(p.restorer.report.pages_written for p in procs),
        restore_time_ms=(time.monotonic() - t0) * 1000,
        pages_filled=sum(p.restorer.report.pages_filled for p in procs),
        warnings=session.warnings, processes=len(procs))
    return result, session
