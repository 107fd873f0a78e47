"""What the built-in filesystem hooks share: a copy of PATH made on the destination by the
source's agent over ssh, in passes.

``CopyHook`` holds the common phases; ``migrate.fs_rsync`` and ``migrate.fs_btrfs`` say how a
pass moves the files. The destination is reached from the source host by the name the
orchestrator uses for it (``HookContext.dest_host``) and the same ``--ssh-config`` path, over
one shared ssh connection opened in preflight (``agent.fs_ssh``).

Preflight changes nothing (a dry run leaves no trace). The destination's path must be absent
or an empty directory; with ``--fs-replace`` it may hold data. Whatever is there is moved
aside (``PARENT/.kcr-aside.NAME.KEY``) before the first pass: a rollback puts it back, only a
commit deletes it. The source's files are never written.
"""
from __future__ import annotations

import os
import secrets
import time
from typing import TYPE_CHECKING, Any

from transport.errors import FsHookError, MigrationError

if TYPE_CHECKING:
    from migrate.fshooks import HookContext

INSTALL = {"rsync": "apt-get install rsync", "btrfs": "apt-get install btrfs-progs"}


class CopyHook:
    """A hook that copies ``path`` to the destination (subclasses: how a pass copies)."""

    name = "copy"
    tool = ""            # the program both hosts need

    def __init__(self, path: str) -> None:
        if not os.path.isabs(path):
            raise FsHookError(f"--fs {self.name}:{path}: the path must be absolute")
        self.path = os.path.normpath(path)
        self._reset()

    def _reset(self) -> None:
        self.key = secrets.token_hex(4)
        self.linked = False           # the source's agent may hold an ssh link and snapshots for us
        self.prepared = False         # the destination's agent may hold a copy for us
        self.staging = ""
        self.source_facts: dict[str, Any] = {}
        self.dest_facts: dict[str, Any] = {}

    def paths(self) -> list[str]:
        return [self.path]

    def spec(self) -> str:
        return f"{self.name}:{self.path}"

    # --- preflight ---

    async def preflight(self, ctx: HookContext) -> None:
        self._reset()
        self.check_hosts(ctx)
        src = self.source_facts = await ctx.source.call("fs_probe", path=self.path, tools=[self.tool])
        dst = self.dest_facts = await ctx.dest.call("fs_probe", path=self.path, tools=[self.tool])
        if src["boot_id"] == dst["boot_id"] and src["mntns"] == dst["mntns"]:
            raise FsHookError(f"--fs {self.spec()}: {ctx.source_host} and {ctx.dest_host} see the same files "
                              f"(one machine, one mount namespace): there is nothing to move; use "
                              f"--fs none:{self.path}")
        self.check_tool(ctx.source_host, src)
        self.check_tool(ctx.dest_host, dst)
        self.check_source(ctx, src)
        self.check_dest(ctx, dst)
        self.linked = True
        config = os.path.abspath(ctx.ssh_config) if ctx.ssh_config else None
        await ctx.source.call("fs_link", key=self.key, dest=ctx.dest_host, ssh_config=config,
                              here=ctx.source_host)

    def check_hosts(self, ctx: HookContext) -> None:
        from migrate.orchestrator import is_local
        if is_local(ctx.source_host) and is_local(ctx.dest_host):
            raise FsHookError(f"--fs {self.spec()}: source and destination are both this host, so the files "
                              f"are already there: use --fs none:{self.path}")
        if is_local(ctx.dest_host):
            raise FsHookError(f"--fs {self.spec()}: the source host {ctx.source_host} copies the files to the "
                              f"destination over ssh and cannot reach it as {ctx.dest_host!r}: name the "
                              "destination by a host name the source can reach")

    def check_tool(self, host: str, facts: dict[str, Any]) -> None:
        if not facts["tools"].get(self.tool, {}).get("path"):
            raise FsHookError(f"--fs {self.spec()}: {self.tool} is not installed: install it there "
                              f"({INSTALL.get(self.tool, self.tool)}) or pick another --fs kind", host=host)

    def check_source(self, ctx: HookContext, facts: dict[str, Any]) -> None:
        host = ctx.source_host
        if not facts["exists"]:
            raise FsHookError(f"--fs {self.spec()}: {self.path} does not exist", host=host)
        if not facts["is_dir"]:
            raise FsHookError(f"--fs {self.spec()}: {self.path} is not a directory: hook the directory that "
                              "holds the files", host=host)

    def check_dest(self, ctx: HookContext, facts: dict[str, Any]) -> None:
        host, parent = ctx.dest_host, os.path.dirname(self.path)
        if not facts["parent_exists"]:
            raise FsHookError(f"--fs {self.spec()}: {parent} does not exist: create it there (the copy goes "
                              "into it)", host=host)
        if facts["exists"]:
            if facts["mount_point"]:
                raise FsHookError(f"--fs {self.spec()}: {self.path} is a mount point: kcr-migrate does not move "
                                  "it aside; unmount it there or pick another path", host=host)
            if (not facts["is_dir"] or facts["entries"]) and not ctx.replace:
                what = (f"{facts['entries']} entries ({', '.join(facts['some_entries'])}"
                        f"{', ...' if facts['entries'] > len(facts['some_entries']) else ''})"
                        if facts["is_dir"] else "a file")
                raise FsHookError(f"--fs {self.spec()}: {self.path} already holds {what}: kcr-migrate "
                                  "never overwrites files on the destination; remove them there, or pass "
                                  "--fs-replace (they are moved aside and deleted once the process runs "
                                  "there)", host=host)

    # --- passes ---

    async def _prepare(self, ctx: HookContext) -> None:
        if not self.prepared:
            self.prepared = True
            made = await ctx.dest.call("fs_dest_prepare", key=self.key, kind=self.name, path=self.path,
                                       replace=ctx.replace)
            self.staging = str(made.get("staging", ""))

    async def transfer(self, ctx: HookContext, final: bool) -> dict[str, Any]:
        """One pass (subclasses); its statistics (``bytes_sent`` at least)."""
        raise NotImplementedError

    async def _pass(self, ctx: HookContext, final: bool) -> dict[str, Any]:
        t0 = time.monotonic()
        await self._prepare(ctx)
        stats = await self.transfer(ctx, final)
        stats["seconds"] = time.monotonic() - t0
        return stats

    async def precopy_pass(self, ctx: HookContext, round: int) -> dict[str, Any]:
        return {"round": round, **await self._pass(ctx, final=False)}

    async def final_pass(self, ctx: HookContext) -> dict[str, Any]:
        return await self._pass(ctx, final=True)

    async def before_resume(self, ctx: HookContext) -> None:
        await ctx.dest.call("fs_dest_keep", key=self.key)

    # --- the end ---

    async def rollback(self, ctx: HookContext) -> None:
        """Discard the destination's copy (putting back what was there), delete snapshots."""
        await self._settle(ctx, "fs_dest_discard")

    async def commit(self, ctx: HookContext) -> None:
        """Delete what was set aside on the destination and the snapshots on both sides."""
        await self._settle(ctx, "fs_dest_commit")

    async def _settle(self, ctx: HookContext, dest_method: str) -> None:
        errors: list[MigrationError] = []
        if self.prepared:
            try:
                await ctx.dest.call(dest_method, key=self.key)
                self.prepared = False
            except MigrationError as exc:
                errors.append(exc)
        if self.linked:
            try:
                await ctx.source.call("fs_source_cleanup", key=self.key)
                self.linked = False
            except MigrationError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
