"""Filesystem hooks: moving the files a process works on, beside its memory, in rounds.

A hook takes part in every phase of a migration:

    preflight      refuse what cannot work (a destination path that holds data, a tool
                   missing on a host); name the paths it brings (exempt from the file check)
    precopy_pass   copy while the process runs (called repeatedly: later passes send less)
    final_pass     with the process frozen: only what changed since the last pass
    before_resume  on the destination, after the final pass and before the process runs
    rollback       before GO, on failure: discard the destination's copy (the source's files
                   are never touched)
    commit         after the process runs on the destination (clean up)

Files under a hooked path are opened and mapped in the restored process only after the final
pass: the restore happens after it. Cluster managers pass their own ``FsHook`` objects in
``MigrationOptions.fs`` (or add a class taking the path to ``HOOK_KINDS``); the command line
builds hooks from ``--fs KIND:PATH``. Built in: ``none`` (shared storage), ``rsync``
(``migrate.fs_rsync``) and ``btrfs`` (``migrate.fs_btrfs``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from migrate.fs_btrfs import BtrfsHook
from migrate.fs_rsync import RsyncHook
from transport.errors import MigrationError
from transport.rpc import RpcPeer


@dataclass
class HookContext:
    """What a hook may use: both agents and what the orchestrator knows of the hosts."""

    source: RpcPeer
    dest: RpcPeer
    source_host: str
    dest_host: str
    ssh_config: str | None
    replace: bool = False


@runtime_checkable
class FsHook(Protocol):
    name: str

    def paths(self) -> list[str]:
        """The paths this hook brings to the destination (exempt from the file check)."""
        ...

    async def preflight(self, ctx: HookContext) -> None: ...

    async def precopy_pass(self, ctx: HookContext, round: int) -> dict[str, Any]: ...

    async def final_pass(self, ctx: HookContext) -> dict[str, Any]: ...

    async def before_resume(self, ctx: HookContext) -> None: ...

    async def rollback(self, ctx: HookContext) -> None: ...

    async def commit(self, ctx: HookContext) -> None: ...


class NoneHook:
    """A shared filesystem (NFS, Lustre, ...): the same files are already on both hosts."""

    name = "none"

    def __init__(self, path: str) -> None:
        self.path = path

    def paths(self) -> list[str]:
        return [self.path]

    async def preflight(self, ctx: HookContext) -> None:
        pass

    async def precopy_pass(self, ctx: HookContext, round: int) -> dict[str, Any]:
        return {}

    async def final_pass(self, ctx: HookContext) -> dict[str, Any]:
        return {}

    async def before_resume(self, ctx: HookContext) -> None:
        pass

    async def rollback(self, ctx: HookContext) -> None:
        pass

    async def commit(self, ctx: HookContext) -> None:
        pass


HOOK_KINDS: dict[str, Any] = {"none": NoneHook, "rsync": RsyncHook, "btrfs": BtrfsHook}


def parse_hook(spec: str) -> FsHook:
    """``KIND:PATH`` (e.g. ``rsync:/srv/job``) as a hook."""
    kind, sep, path = spec.partition(":")
    if not sep or not path.startswith("/"):
        raise MigrationError(f"--fs {spec!r}: write KIND:/absolute/path (kinds: {', '.join(sorted(HOOK_KINDS))})")
    cls = HOOK_KINDS.get(kind)
    if cls is None:
        raise MigrationError(f"--fs {spec!r}: unknown kind {kind!r} (kinds: {', '.join(sorted(HOOK_KINDS))})")
    return cls(path.rstrip("/") or "/")  # type: ignore[no-any-return]
