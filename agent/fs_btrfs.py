"""The btrfs hook, the agents' side: read-only snapshots sent incrementally to the destination.

Source, each round (``fs_btrfs_send``)::

    btrfs subvolume snapshot -r PATH PARENT/.kcr-snap.NAME.KEY.N
    btrfs send -q [-p PREVIOUS] SNAPSHOT | ssh ... DEST btrfs receive -q STAGING

The stream goes through this agent (``splice``, no copy into Python), which counts its bytes.
Only the latest snapshot that arrived is kept on either side (it is the next round's parent):
older ones are deleted after each pass before the final one, and the rest after the commit
or the rollback. Snapshots sit beside the subvolume, never inside it.

Destination: received snapshots land in ``STAGING`` (``PARENT/.kcr-recv.NAME.KEY``, made by
``fs_dest_prepare``); ``fs_btrfs_received`` drops the older ones, ``fs_btrfs_promote`` makes
the last one the writable subvolume at PATH (``btrfs subvolume snapshot STAGING/SNAP PATH``).
"""
from __future__ import annotations

import errno
import os
import shlex
import signal
import subprocess
import tempfile
import time
from typing import IO, Any

import trio

from agent.fsync import copy_of, remove_tree, run_tool, session
from transport.errors import FsHookError, os_error_message
from transport.rpc import CallContext

SPLICE_CHUNK = 1 << 20


def snapshot_path(path: str, key: str, n: int) -> str:
    return os.path.join(os.path.dirname(path), f".kcr-snap.{os.path.basename(path)}.{key}.{n}")


def _tail(f: IO[bytes]) -> str:
    f.seek(0)
    lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class Pipeline:
    """``producer | consumer``, with the bytes in between counted (blocking ``pump``)."""

    def __init__(self, producer: list[str], consumer: list[str], names: tuple[str, str]) -> None:
        self.names = names            # for messages
        self.errs = (tempfile.TemporaryFile(), tempfile.TemporaryFile())
        self.producer = subprocess.Popen(producer, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=self.errs[0])
        try:
            self.consumer = subprocess.Popen(consumer, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                             stderr=self.errs[1])
        except BaseException:
            self.producer.kill()
            self.producer.wait()
            raise
        self.bytes = 0

    def pump(self) -> int:
        """Move the stream until the producer ends; wait for both; the byte count."""
        assert self.producer.stdout is not None and self.consumer.stdin is not None
        src, dst = self.producer.stdout.fileno(), self.consumer.stdin.fileno()
        try:
            while True:
                try:
                    n = os.splice(src, dst, SPLICE_CHUNK)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    data = os.read(src, SPLICE_CHUNK)      # splice refused these fds
                    n = len(data)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(dst, view):]
                if n == 0:
                    break
                self.bytes += n
        except BrokenPipeError:
            pass          # the consumer died: its exit status and stderr say why
        finally:
            self.consumer.stdin.close()
            self.producer.stdout.close()
            self.producer.wait()
            self.consumer.wait()
        return self.bytes

    def kill(self) -> None:
        for proc in (self.producer, self.consumer):
            if proc.poll() is None:
                proc.kill()

    def failure(self) -> str | None:
        """Why the pipeline failed (the side that failed first), or None.

        A producer killed by SIGPIPE (or failing with EPIPE) only says the consumer went away:
        the consumer's own failure is the reason then."""
        sides = [(self.producer, self.errs[0], self.names[0]),
                 (self.consumer, self.errs[1], self.names[1])]
        if self.consumer.returncode != 0 and self._producer_lost_its_reader():
            sides.reverse()
        for proc, err, name in sides:
            if proc.returncode != 0:
                return f"{name} exited with {proc.returncode}: {_tail(err) or 'no message'}"
        return None

    def _producer_lost_its_reader(self) -> bool:
        if self.producer.returncode == -signal.SIGPIPE:
            return True
        return "broken pipe" in _tail(self.errs[0]).lower()

    def close(self) -> None:
        for f in self.errs:
            f.close()


async def fs_btrfs_send(ctx: CallContext, *, key: str, path: str, dest: str, staging: str,
                        final: bool = False) -> dict[str, Any]:
    """Source: snapshot ``path`` read-only and send it (incrementally from the last snapshot
    that arrived) to ``dest``, received into ``staging``."""
    s = session(ctx)
    link = s.links.get(key)
    if link is None:
        raise FsHookError(f"no ssh link {key} on this connection: call fs_link first")
    snaps = s.snapshots.setdefault(key, [])
    s.taken[key] = s.taken.get(key, -1) + 1
    snap = snapshot_path(path, key, s.taken[key])
    if os.path.lexists(snap):
        raise FsHookError(f"{snap} already exists: another migration with the same key runs here")
    parent = s.sent.get(key)
    t0 = time.monotonic()
    snaps.append(snap)
    await trio.to_thread.run_sync(run_tool, ["btrfs", "subvolume", "snapshot", "-r", path, snap],
                                  f"taking a read-only snapshot of {path}")
    t1 = time.monotonic()
    send = ["btrfs", "send", "-q", *(["-p", parent] if parent else []), snap]
    receive = [*link.argv(), dest, f"btrfs receive -q {shlex.quote(staging)}"]
    try:
        pipe = Pipeline(send, receive, ("btrfs send", f"btrfs receive on {dest} (over ssh)"))
    except OSError as exc:
        raise FsHookError(f"cannot start btrfs send: {os_error_message(exc)}") from None
    try:
        nbytes = await trio.to_thread.run_sync(pipe.pump, abandon_on_cancel=True)
        failure = pipe.failure()
    except BaseException:
        pipe.kill()
        raise
    finally:
        pipe.close()
    if failure is not None:
        raise FsHookError(f"sending {path} to {dest} failed: {failure}")
    t2 = time.monotonic()
    s.sent[key] = snap
    if not final:     # the old snapshots are no longer needed; inside the downtime, later
        for old in [x for x in snaps if x != snap]:
            try:
                await trio.to_thread.run_sync(remove_tree, old)
                snaps.remove(old)
            except (FsHookError, OSError):
                pass      # still listed: the cleanup after the migration tries again
    return {"snapshot": os.path.basename(snap), "parent": os.path.basename(parent) if parent else "",
            "bytes_sent": nbytes, "snapshot_ms": (t1 - t0) * 1000, "send_ms": (t2 - t1) * 1000,
            "seconds": time.monotonic() - t0}


def _received(staging: str, name: str) -> None:
    if not os.path.isdir(os.path.join(staging, name)):
        raise FsHookError(f"the snapshot {name} did not arrive in {staging}")
    for other in os.listdir(staging):
        if other != name:
            try:
                remove_tree(os.path.join(staging, other))
            except (FsHookError, OSError):
                pass      # the staging area goes as a whole after the migration


async def fs_btrfs_received(ctx: CallContext, *, key: str, name: str) -> dict[str, Any]:
    """Destination: ``name`` arrived; delete the snapshots received before it."""
    copy = copy_of(session(ctx), key)
    assert copy.staging is not None
    await trio.to_thread.run_sync(_received, copy.staging, name)
    return {}


async def fs_btrfs_promote(ctx: CallContext, *, key: str, name: str) -> dict[str, Any]:
    """Destination, final pass: the received snapshot ``name`` becomes the writable subvolume
    at the hooked path."""
    copy = copy_of(session(ctx), key)
    assert copy.staging is not None
    received = os.path.join(copy.staging, name)
    if os.path.lexists(copy.path):
        raise FsHookError(f"{copy.path} appeared here during the migration: something else writes there")
    t0 = time.monotonic()
    await trio.to_thread.run_sync(run_tool, ["btrfs", "subvolume", "snapshot", received, copy.path],
                                  f"making {copy.path} from the received snapshot")
    return {"seconds": time.monotonic() - t0}


METHODS = {"fs_btrfs_send": fs_btrfs_send, "fs_btrfs_received": fs_btrfs_received,
           "fs_btrfs_promote": fs_btrfs_promote}
