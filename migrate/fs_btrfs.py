"""The ``btrfs`` filesystem hook: read-only snapshots, sent incrementally with btrfs send/receive.

    --fs btrfs:/srv/job        (/srv/job a btrfs subvolume on the source, /srv on btrfs on the destination)

Each pass (``agent.fs_btrfs``): a read-only snapshot of the subvolume beside it on the source,
``btrfs send -p PREVIOUS SNAPSHOT | ssh DEST btrfs receive STAGING`` (the first one whole),
and the snapshots before it deleted on both sides. The final pass takes the last snapshot with
the process frozen, so it holds exactly what the process left; on the destination the
received snapshot becomes the writable subvolume at the same path. Snapshots left at the end
are deleted after the commit or the rollback (and by the agents themselves if kcr-migrate
goes away). Statistics per pass: ``bytes_sent`` (the send stream), ``snapshot_ms``,
``send_ms``, ``seconds`` (and ``promote_ms`` for the final pass).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from migrate.fs_copy import CopyHook
from transport.errors import FsHookError

if TYPE_CHECKING:
    from migrate.fshooks import HookContext


class BtrfsHook(CopyHook):
    """Move a btrfs subvolume with snapshots and incremental send/receive."""

    name = "btrfs"
    tool = "btrfs"

    def check_source(self, ctx: HookContext, facts: dict[str, Any]) -> None:
        super().check_source(ctx, facts)
        host, spec, path = ctx.source_host, self.spec(), self.path
        if facts["mount_point"]:
            raise FsHookError(f"--fs {spec}: {path} is the top of a mounted filesystem; its snapshots go beside "
                              f"it, so hook a subvolume below it (btrfs subvolume create {path}/job)", host=host)
        if not facts["subvolume"]:
            raise FsHookError(f"--fs {spec}: {path} is not a btrfs subvolume (a directory on "
                              f"{facts['fs_type']}): make it one (btrfs subvolume create, then move the files "
                              f"in) or use --fs rsync:{path}", host=host)
        if facts["nested_subvolumes"]:
            raise FsHookError(f"--fs {spec}: {path} holds other subvolumes "
                              f"({', '.join(facts['nested_subvolumes'][:3])}), which btrfs send leaves out: move "
                              f"them elsewhere or use --fs rsync:{path}", host=host)

    def check_dest(self, ctx: HookContext, facts: dict[str, Any]) -> None:
        super().check_dest(ctx, facts)
        if facts["parent_fs_type"] != "btrfs":
            raise FsHookError(f"--fs {self.spec()}: {os.path.dirname(self.path)} is on {facts['parent_fs_type']}, "
                              f"not btrfs (btrfs receive needs btrfs there): use --fs rsync:{self.path}",
                              host=ctx.dest_host)

    async def transfer(self, ctx: HookContext, final: bool) -> dict[str, Any]:
        sent = await ctx.source.call("fs_btrfs_send", key=self.key, path=self.path, dest=ctx.dest_host,
                                     staging=self.staging, final=final)
        if final:
            promoted = await ctx.dest.call("fs_btrfs_promote", key=self.key, name=sent["snapshot"])
            sent["promote_ms"] = float(promoted["seconds"]) * 1000
        else:
            await ctx.dest.call("fs_btrfs_received", key=self.key, name=sent["snapshot"])
        return sent
