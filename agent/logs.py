"""The logs of the long-lived helpers a migration leaves behind (stand-ins, deputies).

Each one writes ``/run/kcr-migrate/KIND/NAME.log`` (the report names it). One host makes one
per moved job, for as long as it runs, so ``open_log`` keeps a folder to the newest
``KEEP`` logs: when it holds more, it removes the oldest that no process has open any more.
A log still open (its stand-in runs, for weeks perhaps) is never removed. /run is emptied
at boot as well.
"""
from __future__ import annotations

import os

ROOT = "/run/kcr-migrate"
KEEP = 256


def log_path(kind: str, name: str) -> str:
    return os.path.join(ROOT, kind, f"{name}.log")


def open_log(kind: str, name: str) -> int:
    """An fd appending to the log ``name`` of ``kind`` ("standin", "deputy"), made if need be
    (owner-only), after pruning the folder."""
    folder = os.path.join(ROOT, kind)
    os.makedirs(folder, exist_ok=True)
    prune(folder)
    return os.open(log_path(kind, name), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def prune(folder: str, keep: int = KEEP) -> list[str]:
    """Remove the oldest logs beyond ``keep`` that no process holds open; the paths removed."""
    try:
        names = [n for n in os.listdir(folder) if n.endswith(".log")]
    except OSError:
        return []
    if len(names) <= keep:
        return []
    dated = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            dated.append((os.stat(path).st_mtime, path))
        except OSError:
            continue
    dated.sort()
    excess = len(dated) - keep
    if excess <= 0:
        return []
    held = _open_under(folder)
    removed: list[str] = []
    for _, path in dated:
        if len(removed) >= excess:
            break
        if path in held:
            continue
        try:
            os.unlink(path)
        except OSError:
            continue
        removed.append(path)
    return removed


def _open_under(folder: str) -> set[str]:
    """The files under ``folder`` some process has open now."""
    prefix = folder.rstrip("/") + "/"
    held: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith(prefix):
                held.add(target)
    return held
