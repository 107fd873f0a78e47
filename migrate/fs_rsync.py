"""The ``rsync`` filesystem hook: the real rsync, from the source host to the destination over ssh.

    --fs rsync:/srv/job

Each pass runs on the source host (``agent.fs_rsync``)::

    rsync -aHS[X] --numeric-ids --stats [--delete] -e "ssh -F CFG ..." /srv/job/ DEST:/srv/job/

Passes while the process runs copy what changed and leave deletions for later; the final
pass, with the process frozen, also deletes what the source no longer has, so the
destination holds exactly what the frozen process left: the sizes and offsets of the files
it has open match what the restored descriptors expect. rsync skips a file whose size and
modification time match its copy; the final pass compares contents instead (``--checksum``)
unless the source's filesystem gives every write a new nanosecond time (probed) and both
rsyncs compare nanoseconds. Extended attributes go along where
both rsyncs support them. Statistics per pass: ``bytes_sent`` (rsync's "Total bytes sent",
what crossed the link), ``files_transferred``, ``files_deleted``, ``seconds``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from migrate.fs_copy import CopyHook

if TYPE_CHECKING:
    from migrate.fshooks import HookContext

NSEC_COMPARE = (3, 1, 3)      # rsync compares nanoseconds with --modify-window=-1 from this version


class RsyncHook(CopyHook):
    """Copy PATH with rsync over ssh, in passes; the last one with ``--delete``."""

    name = "rsync"
    tool = "rsync"

    def _both(self, what: str) -> list[Any]:
        return [f["tools"]["rsync"].get(what) for f in (self.source_facts, self.dest_facts)]

    def exact_times(self) -> bool:
        """Can rsync compare modification times to the nanosecond (both >= 3.1.3)?"""
        return all(tuple(v or ()) >= NSEC_COMPARE for v in self._both("version"))

    def quick_check_exact(self) -> bool:
        """Is a file with the same size and mtime as its copy unchanged? Only where every write
        gives it a new nanosecond time, and rsync compares them."""
        return self.exact_times() and bool(self.source_facts.get("fine_timestamps"))

    async def transfer(self, ctx: HookContext, final: bool) -> dict[str, Any]:
        checksum = final and not self.quick_check_exact()
        stats = await ctx.source.call("fs_rsync_pass", key=self.key, path=self.path, dest=ctx.dest_host,
                                      final=final, xattrs=all(self._both("xattrs")),
                                      exact_times=self.exact_times(), checksum=checksum)
        return {**stats, "compare": "checksum" if checksum else "size+mtime"}
