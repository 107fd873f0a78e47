"""The rsync hook, the source agent's side: one rsync pass to the destination over ssh.

    rsync -aHS[X] --numeric-ids --stats --timeout=60 [--delete] \\
          -e "ssh -F CFG -o BatchMode=yes -o ControlPath=..." PATH/ DEST:PATH/

Archive mode keeps times, permissions, owners (by number), symlinks and devices; ``-H`` hard
links, ``-S`` holes (sparse files), ``-X`` extended attributes where both rsyncs support them.
Passes while the process runs leave files deleted on the source in place and accept files
that vanish or change while rsync reads them (exit 23/24: the next pass catches up), or that
stalls (no data for 60 s, exit 30); the final pass, with the process frozen, deletes what the
source no longer has and must succeed fully (a stalled one fails the move: the source runs on).
Unchanged files are recognised by size and modification time to the nanosecond
(``--modify-window=-1``; rsync by default compares whole seconds, and a file rewritten in
place within the same second would be missed). That is exact where every write after a look
gives a new time (multigrain timestamps, Linux >= 6.13 on ext4, xfs, btrfs, tmpfs); elsewhere
the final pass compares contents (``--checksum``), which reads every file on both sides.
Writes through a shared mapping keep the time until the page is written back, so the final
pass compares the contents of files mapped shared and writable (a second rsync, ``-I``).
"""
from __future__ import annotations

import os
import re
import time
from typing import Any

import trio

from agent.fsync import session
from transport.errors import FsHookError
from transport.rpc import CallContext

# Partial transfer, vanished files: normal while the process runs; and a timeout (30): a pass
# before the freeze that stalled leaves what it missed to the next.
SOFT_EXITS = (23, 24, 30)
# rsync --timeout: a pass in which no data moves for this long ends (exit 30), instead of
# waiting for ever (an rsync that hung with files changing under it did, with the migration).
# rsync keeps an idle but busy pass alive below it (keep-alive messages at half of it).
IO_TIMEOUT_S = 60
STATS = {
    "bytes_sent": "Total bytes sent",
    "bytes_received": "Total bytes received",
    "files_transferred": "Number of regular files transferred",
    "files_deleted": "Number of deleted files",
    "literal_bytes": "Literal data",
    "total_file_bytes": "Total file size",
}


def parse_stats(text: str) -> dict[str, int]:
    """The numbers of ``rsync --stats`` (with or without thousands separators)."""
    out: dict[str, int] = {}
    for key, label in STATS.items():
        m = re.search(rf"^{re.escape(label)}: ([0-9][0-9,.']*)", text, re.MULTILINE)
        if m:
            out[key] = int(re.sub(r"[^0-9]", "", m.group(1)))
    return out


def rsync_argv(path: str, dest: str, rsh: str, *, final: bool, xattrs: bool, exact_times: bool,
               checksum: bool, io_timeout: int = IO_TIMEOUT_S) -> list[str]:
    return ["rsync", "-aHS", *(["-X"] if xattrs else []), "--numeric-ids", "--stats", f"--timeout={io_timeout}",
            *(["--modify-window=-1"] if exact_times else []), *(["--checksum"] if checksum else []),
            *(["--delete"] if final else []), "-e", rsh, f"{path.rstrip('/')}/", f"{dest}:{path.rstrip('/')}/"]


def mapped_for_writing(root: str) -> list[str]:
    """Files under ``root`` (relative to it) that a process of this mount namespace maps shared
    and writable: a write through such a mapping changes the file without changing its
    modification time (only the first write after writeback does), so rsync must compare
    their contents."""
    try:
        ours = os.stat("/proc/self/ns/mnt")
    except OSError:
        return []
    prefix = root.rstrip("/") + "/"
    found: set[str] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry.name}/ns/mnt")
            if (ns.st_dev, ns.st_ino) != (ours.st_dev, ours.st_ino):
                continue
            with open(f"/proc/{entry.name}/maps", encoding="utf-8", errors="surrogateescape") as f:
                for line in f:
                    fields = line.rstrip("\n").split(None, 5)
                    if len(fields) == 6 and fields[1][1] == "w" and fields[1][3] == "s" \
                            and fields[5].startswith(prefix) and not fields[5].endswith(" (deleted)"):
                        found.add(fields[5][len(prefix):])
        except OSError:
            continue
    return sorted(name for name in found if os.path.isfile(prefix + name))


async def _rsync(argv: list[str], path: str, dest: str, soft: bool, stdin: bytes = b"") -> dict[str, Any]:
    """Run one rsync; its statistics (``warning`` for a soft failure), or FsHookError."""
    try:
        res = await trio.run_process(argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False)
    except FileNotFoundError:
        raise FsHookError("rsync is not installed here: install it (apt-get install rsync)") from None
    stats: dict[str, Any] = {**parse_stats(res.stdout.decode(errors="replace")), "exit": res.returncode}
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.decode(errors="replace").strip().splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit status {res.returncode}"
        if not soft or res.returncode not in SOFT_EXITS:
            first = next((ln for ln in lines if not ln.startswith("rsync error:")), detail)
            raise FsHookError(f"rsync of {path} to {dest} failed (exit {res.returncode}): {first}"
                              + (f" ({detail})" if first != detail else ""))
        stats["warning"] = detail
    return stats


async def fs_rsync_pass(ctx: CallContext, *, key: str, path: str, dest: str, final: bool = False,
                        xattrs: bool = True, exact_times: bool = True, checksum: bool = False) -> dict[str, Any]:
    """One pass from ``path`` here to ``dest``:``path``, over ``key``'s ssh link.
    ``exact_times``: compare modification times to the nanosecond (both rsyncs >= 3.1.3);
    ``checksum``: compare contents instead (where a write may keep the old time). The final
    pass compares the contents of files mapped shared and writable in any case."""
    link = session(ctx).links.get(key)
    if link is None:
        raise FsHookError(f"no ssh link {key} on this connection: call fs_link first")
    argv = rsync_argv(path, dest, link.rsh(), final=final, xattrs=xattrs, exact_times=exact_times,
                      checksum=checksum)
    t0 = time.monotonic()
    stats = await _rsync(argv, path, dest, soft=not final)
    mapped = await trio.to_thread.run_sync(mapped_for_writing, path) if final and not checksum else []
    if mapped:
        again = [*argv[:-2], "--ignore-times", "--from0", "--files-from=-", *argv[-2:]]
        more = await _rsync(again, path, dest, soft=False, stdin=b"\0".join(os.fsencode(m) for m in mapped) + b"\0")
        for k in ("bytes_sent", "bytes_received", "files_transferred", "literal_bytes"):
            stats[k] = stats.get(k, 0) + more.get(k, 0)
        stats["mapped_compared"] = len(mapped)
    stats["seconds"] = time.monotonic() - t0
    return stats


METHODS = {"fs_rsync_pass": fs_rsync_pass}
