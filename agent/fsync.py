"""Filesystem hooks, the agent's side: probing paths and tools, and the destination's copy.

What the built-in hooks (``agent.fs_rsync``, ``agent.fs_btrfs``) share. Per connection an
``FsSession`` remembers what this agent made for kcr-migrate, by hook key:

    source       the ssh link to the destination (``agent.fs_ssh``), read-only snapshots
    destination  a ``DestCopy``: the path, where data found there waits (``aside``), the
                 btrfs staging directory, and whether the copy is kept

The destination's path is never written while it holds anything of its own: ``fs_dest_prepare``
moves what is there aside (an empty directory, or with --fs-replace the old data) within its
parent directory, so a rollback puts it back and only a commit deletes it. The source's files
are never written (btrfs snapshots go beside the subvolume, never into it).

Should kcr-migrate vanish (the connection ends before commit or rollback), a guard settles on
its own: ssh links and snapshots go; a copy not yet checked by ``fs_dest_keep`` (the process
never ran on it) is discarded and what was there put back; a kept copy stays (the process may
run on it), and so does what was set aside, which it names on stderr.

Methods: ``fs_probe``, ``fs_link``, ``fs_dest_prepare``, ``fs_dest_keep``, ``fs_dest_discard``,
``fs_dest_commit``, ``fs_source_cleanup``.
"""
from __future__ import annotations

import ctypes
import os
import re
import shlex
import shutil
import stat as stat_mod
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import trio

from agent.fs_ssh import SshLink
from agent.procfs import mounts
from transport.errors import FsHookError, os_error_message
from transport.rpc import CallContext, RpcPeer

BTRFS_MAGIC = 0x9123683E
BTRFS_SUBVOLUME_INO = 256            # the root directory of every btrfs subvolume
FS_NAMES = {BTRFS_MAGIC: "btrfs", 0xEF53: "ext4", 0x01021994: "tmpfs", 0x58465342: "xfs", 0x6969: "nfs",
            0x794C7630: "overlayfs", 0xFF534D42: "cifs", 0x65735546: "fuse", 0x2FC12FC1: "zfs"}
TOOL_TIMEOUT = 120.0
GUARD_DEADLINE = 60.0
ENTRIES_SHOWN = 3

_libc = ctypes.CDLL(None, use_errno=True)


# --- facts about paths -----------------------------------------------------------------------

def fs_magic(path: str) -> int:
    """statfs(2) f_type of the filesystem holding ``path``."""
    buf = ctypes.create_string_buffer(256)
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(struct.unpack_from("<q", buf.raw)[0])


def fs_name(path: str) -> str:
    magic = fs_magic(path)
    return FS_NAMES.get(magic, f"{magic:#x}")


def is_subvolume(path: str) -> bool:
    try:
        st = os.lstat(path)
        return stat_mod.S_ISDIR(st.st_mode) and st.st_ino == BTRFS_SUBVOLUME_INO and fs_magic(path) == BTRFS_MAGIC
    except OSError:
        return False


def is_mount_point(path: str) -> bool:
    """Is ``path`` where something is mounted? (``os.path.ismount`` compares devices, and every
    btrfs subvolume has a device number of its own.)"""
    real = os.path.realpath(path)
    try:
        return any(point == real for _, _, point in mounts())
    except OSError:
        return os.path.ismount(path)


def aside_path(path: str, key: str) -> str:
    return os.path.join(os.path.dirname(path), f".kcr-aside.{os.path.basename(path)}.{key}")


def staging_path(path: str, key: str) -> str:
    return os.path.join(os.path.dirname(path), f".kcr-recv.{os.path.basename(path)}.{key}")


def run_tool(argv: list[str], what: str, timeout: float = TOOL_TIMEOUT) -> str:
    """Run a tool (blocking); its stdout, or FsHookError with its last line of stderr."""
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise FsHookError(f"{what}: {argv[0]} is not installed here") from None
    except subprocess.TimeoutExpired:
        raise FsHookError(f"{what}: `{shlex.join(argv)}` did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise FsHookError(f"{what}: {lines[-1] if lines else f'exit status {proc.returncode}'}")
    return proc.stdout


def delete_subvolume(path: str) -> None:
    run_tool(["btrfs", "subvolume", "delete", path], f"deleting the btrfs subvolume {path}")


def remove_tree(path: str) -> None:
    """Remove ``path`` whatever it is: a file, a directory tree, a btrfs subvolume (read-only
    snapshots and subvolumes nested in it included). Nothing if it is not there."""
    if not os.path.lexists(path):
        return
    if is_mount_point(path):
        raise FsHookError(f"{path} is a mount point: kcr-migrate does not remove it")
    if not os.path.isdir(path) or os.path.islink(path):
        os.unlink(path)
    elif is_subvolume(path):
        try:
            delete_subvolume(path)
        except FsHookError:          # subvolumes inside it: those first
            for sub in _subvolumes_below(path):
                delete_subvolume(sub)
            delete_subvolume(path)
    else:
        shutil.rmtree(path)


def _subvolumes_below(path: str) -> list[str]:
    """Subvolume roots inside ``path``, deepest first."""
    found: list[str] = []
    for root, dirs, _ in os.walk(path, topdown=False):
        found.extend(os.path.join(root, d) for d in dirs if is_subvolume(os.path.join(root, d)))
    return found


def nested_subvolumes(path: str) -> list[str]:
    """Subvolumes below the subvolume ``path``, as ``btrfs subvolume list -o`` names them."""
    out = run_tool(["btrfs", "subvolume", "list", "-o", path], f"listing the subvolumes below {path}")
    return [line.partition(" path ")[2].strip() for line in out.splitlines() if " path " in line]


def tool_facts(name: str) -> dict[str, Any]:
    path = shutil.which(name)
    facts: dict[str, Any] = {"path": path or ""}
    if path and name == "rsync":
        try:
            out = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        m = re.search(r"version\s+(\d+)\.(\d+)\.(\d+)", out)
        facts["version"] = [int(x) for x in m.groups()] if m else []
        facts["xattrs"] = " xattrs" in out and "no xattrs" not in out
    return facts


def fine_timestamps(path: str, trials: int = 5) -> bool:
    """Does every write to a file on ``path``'s filesystem give it a new modification time
    (multigrain timestamps, Linux >= 6.13), or can two writes share one clock tick? Probed
    with an unnamed O_TMPFILE file: nothing appears in the directory."""
    try:
        fd = os.open(path, os.O_TMPFILE | os.O_WRONLY, 0o600)
    except OSError:
        return False
    try:
        for _ in range(trials):
            os.write(fd, b"a")
            before = os.fstat(fd).st_mtime_ns
            os.write(fd, b"b")
            if os.fstat(fd).st_mtime_ns == before:
                return False
        return True
    finally:
        os.close(fd)


def probe(path: str, tools: list[str]) -> dict[str, Any]:
    """What the hooks must know about ``path`` on this host (blocking)."""
    parent = os.path.dirname(path) or "/"
    facts: dict[str, Any] = {
        "path": path, "exists": os.path.lexists(path), "is_dir": os.path.isdir(path) and not os.path.islink(path),
        "entries": 0, "some_entries": [], "mount_point": is_mount_point(path), "fs_type": "",
        "subvolume": False, "nested_subvolumes": [], "parent_exists": os.path.isdir(parent),
        "parent_fs_type": "", "tools": {t: tool_facts(t) for t in tools},
        "boot_id": _read("/proc/sys/kernel/random/boot_id"), "mntns": _ns_id("/proc/self/ns/mnt"),
        "fine_timestamps": False,
    }
    if facts["parent_exists"]:
        facts["parent_fs_type"] = fs_name(parent)
    if facts["exists"]:
        facts["fs_type"] = fs_name(path)
        if facts["is_dir"]:
            names = sorted(os.listdir(path))
            facts["entries"] = len(names)
            facts["some_entries"] = names[:ENTRIES_SHOWN]
            facts["subvolume"] = is_subvolume(path)
            if "rsync" in tools:
                facts["fine_timestamps"] = fine_timestamps(path)
            if facts["subvolume"] and facts["tools"].get("btrfs", {}).get("path"):
                facts["nested_subvolumes"] = nested_subvolumes(path)
    return facts


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _ns_id(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{st.st_dev}:{st.st_ino}"


# --- what this agent made, per connection ------------------------------------------------------

@dataclass
class DestCopy:
    """The destination's copy of one hooked path."""

    kind: str
    path: str
    aside: str | None = None      # what was at ``path`` before, moved out of the way
    staging: str | None = None    # btrfs: the directory snapshots are received into
    kept: bool = False            # checked after the final pass: the process may run on it

    def remove_staging(self) -> None:
        if self.staging is None or not os.path.isdir(self.staging):
            return
        for name in os.listdir(self.staging):
            remove_tree(os.path.join(self.staging, name))
        os.rmdir(self.staging)

    def discard(self) -> None:
        """Roll back (blocking): remove the copy, put back what was there."""
        self.remove_staging()
        remove_tree(self.path)
        if self.aside is not None and os.path.lexists(self.aside):
            os.rename(self.aside, self.path)

    def commit(self) -> None:
        """The process runs on the copy (blocking): delete what was set aside and the staging area."""
        self.remove_staging()
        if self.aside is not None:
            remove_tree(self.aside)


@dataclass
class FsSession:
    links: dict[str, SshLink] = field(default_factory=dict)         # source: key -> link
    snapshots: dict[str, list[str]] = field(default_factory=dict)   # source: key -> snapshots made
    sent: dict[str, str] = field(default_factory=dict)              # source: key -> last snapshot received there
    taken: dict[str, int] = field(default_factory=dict)             # source: key -> snapshots taken so far
    copies: dict[str, DestCopy] = field(default_factory=dict)       # destination: key -> its copy

    def cleanup_source(self, key: str) -> list[str]:
        """Delete ``key``'s snapshots and end its link (blocking); what failed, as messages."""
        errors: list[str] = []
        link = self.links.pop(key, None)
        if link is not None:
            link.close()
        self.sent.pop(key, None)
        self.taken.pop(key, None)
        snaps = self.snapshots.pop(key, [])
        for snap in snaps:
            try:
                remove_tree(snap)
            except (FsHookError, OSError) as exc:
                errors.append(f"{snap}: {exc}")
        return errors

    def settle(self) -> None:
        """The connection is over (blocking): clean up what kcr-migrate left."""
        for key in list(self.links) + list(self.snapshots):
            for problem in self.cleanup_source(key):
                print(f"kcr-agent: could not delete a snapshot: {problem}", file=sys.stderr)
        for key, copy in list(self.copies.items()):
            try:
                if copy.kept:
                    copy.remove_staging()
                    if copy.aside is not None and os.path.lexists(copy.aside):
                        print(f"kcr-agent: kcr-migrate left before committing: {copy.path} holds the migrated "
                              f"files; what was there before waits in {copy.aside} (delete it once the process "
                              "runs here)", file=sys.stderr)
                else:
                    copy.discard()
            except (FsHookError, OSError) as exc:
                print(f"kcr-agent: could not discard the copy at {copy.path}: {exc}", file=sys.stderr)
            self.copies.pop(key, None)


SESSIONS: dict[int, FsSession] = {}


def session(ctx: CallContext) -> FsSession:
    """This connection's session; the first call starts its guard."""
    s = SESSIONS.get(id(ctx.rpc))
    if s is None:
        s = SESSIONS[id(ctx.rpc)] = FsSession()
        ctx.nursery.start_soon(_guard, ctx.rpc, s)
    return s


async def _guard(rpc: RpcPeer, s: FsSession) -> None:
    """Settle what kcr-migrate left once the connection ends, however it ends."""
    try:
        await rpc.closed.wait()
    finally:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + GUARD_DEADLINE):
            await trio.to_thread.run_sync(s.settle)
        SESSIONS.pop(id(rpc), None)


def copy_of(s: FsSession, key: str) -> DestCopy:
    copy = s.copies.get(key)
    if copy is None:
        raise FsHookError(f"no destination copy {key} on this connection: call fs_dest_prepare first")
    return copy


def _oserror(what: str, exc: OSError) -> FsHookError:
    return FsHookError(f"{what}: {os_error_message(exc)}", errno=exc.errno)


# --- methods ---------------------------------------------------------------------------------

async def fs_probe(ctx: CallContext, *, path: str, tools: list[str]) -> dict[str, Any]:
    """Facts about ``path`` and the named tools on this host (changes nothing)."""
    if not os.path.isabs(path):
        raise FsHookError(f"{path!r} is not an absolute path")
    try:
        return await trio.to_thread.run_sync(probe, os.path.normpath(path), list(tools))
    except OSError as exc:
        raise _oserror(f"cannot examine {path}", exc) from None


async def fs_link(ctx: CallContext, *, key: str, dest: str, ssh_config: str | None, here: str) -> dict[str, Any]:
    """Source: open the shared ssh connection to ``dest`` that ``key``'s transfers use."""
    s = session(ctx)
    old = s.links.pop(key, None)
    if old is not None:
        await trio.to_thread.run_sync(old.close)
    link = SshLink(dest, ssh_config, here=here)
    s.links[key] = link
    try:
        seconds = await link.open()
    except BaseException:
        s.links.pop(key, None)
        await trio.to_thread.run_sync(link.close)
        raise
    return {"seconds": seconds}


def _prepare(kind: str, path: str, key: str, replace: bool) -> DestCopy:
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise FsHookError(f"{parent} does not exist here: create it (the copy goes to {path})")
    copy = DestCopy(kind, path)
    if os.path.lexists(path):
        if is_mount_point(path):
            raise FsHookError(f"{path} is a mount point here: mount it elsewhere or pick another path")
        holds_data = not os.path.isdir(path) or os.path.islink(path) or bool(os.listdir(path))
        if holds_data and not replace:
            raise FsHookError(f"{path} holds data here: kcr-migrate never overwrites files on the destination; "
                              "remove them, or pass --fs-replace")
        copy.aside = aside_path(path, key)
        os.rename(path, copy.aside)
    if kind == "btrfs":
        copy.staging = staging_path(path, key)
        try:
            os.mkdir(copy.staging, 0o700)
        except OSError:
            if copy.aside is not None:
                os.rename(copy.aside, path)
            raise
    return copy


async def fs_dest_prepare(ctx: CallContext, *, key: str, kind: str, path: str, replace: bool = False) -> dict[str, Any]:
    """Destination, before the first transfer: make room at ``path`` (moving what is there aside)."""
    s = session(ctx)
    if key in s.copies:
        copy = s.copies[key]
    else:
        try:
            copy = await trio.to_thread.run_sync(_prepare, kind, os.path.normpath(path), key, replace)
        except OSError as exc:
            raise _oserror(f"cannot make room for the copy at {path}", exc) from None
        s.copies[key] = copy
    return {"aside": copy.aside or "", "staging": copy.staging or ""}


async def fs_dest_keep(ctx: CallContext, *, key: str) -> dict[str, Any]:
    """Destination, after the final pass: check the copy is in place; from now on a lost
    connection keeps it (the process may run on it)."""
    copy = copy_of(session(ctx), key)
    if not os.path.isdir(copy.path) or os.path.islink(copy.path):
        raise FsHookError(f"{copy.path} is not a directory here after the final pass: the copy is incomplete")
    if copy.kind == "btrfs":
        ro = await trio.to_thread.run_sync(run_tool, ["btrfs", "property", "get", "-ts", copy.path, "ro"],
                                           f"checking that {copy.path} is writable")
        if "ro=false" not in ro:
            raise FsHookError(f"{copy.path} is a read-only subvolume here after the final pass")
    copy.kept = True
    return {}


async def fs_dest_discard(ctx: CallContext, *, key: str) -> dict[str, Any]:
    """Destination, rollback: remove the copy and put back what was there."""
    s = session(ctx)
    copy = s.copies.get(key)
    if copy is None:
        return {"discarded": False}
    try:
        await trio.to_thread.run_sync(copy.discard)
    except OSError as exc:
        raise _oserror(f"cannot discard the copy at {copy.path}", exc) from None
    s.copies.pop(key, None)
    return {"discarded": True, "restored": copy.aside or ""}


async def fs_dest_commit(ctx: CallContext, *, key: str) -> dict[str, Any]:
    """Destination, after the process runs here: delete what was set aside and the staging area."""
    s = session(ctx)
    copy = s.copies.get(key)
    if copy is None:
        return {}
    try:
        await trio.to_thread.run_sync(copy.commit)
    except OSError as exc:
        raise _oserror(f"cannot clean up after the copy at {copy.path}", exc) from None
    s.copies.pop(key, None)
    return {"deleted": copy.aside or ""}


async def fs_source_cleanup(ctx: CallContext, *, key: str) -> dict[str, Any]:
    """Source, commit or rollback: delete ``key``'s snapshots, end its ssh link. Never touches
    the files themselves."""
    s = SESSIONS.get(id(ctx.rpc))
    if s is None:
        return {}
    errors = await trio.to_thread.run_sync(s.cleanup_source, key)
    if errors:
        raise FsHookError(f"could not delete snapshots: {'; '.join(errors)}")
    return {}


METHODS = {"fs_probe": fs_probe, "fs_link": fs_link, "fs_dest_prepare": fs_dest_prepare,
           "fs_dest_keep": fs_dest_keep, "fs_dest_discard": fs_dest_discard, "fs_dest_commit": fs_dest_commit,
           "fs_source_cleanup": fs_source_cleanup}
