"""The cgroups a process is in: read on the source, joined again on the destination.

``/proc/PID/cgroup`` names one path per hierarchy (``0::/path`` for the unified cgroup v2
hierarchy, ``4:memory:/path`` for a v1 one, as on hybrid hosts). The restored process starts
in the restorer's cgroups; before it runs it is written into ``cgroup.procs`` of the same path
in the hierarchy with the same controllers here, which moves all its threads. A cgroup that
does not exist on the destination (another host's slices, a job's cgroup made by a scheduler
that has not made it here) is not made: the process runs where the restorer is, and the
report says so for each hierarchy. The user may name another unified cgroup instead
(``--cgroup PATH``): that one must exist before anything is frozen, and a process that cannot
join it fails the restore.
"""
from __future__ import annotations

import os

from agent.procfs import mount_table
from transport.errors import ProtocolError, RestoreError

MAX_PATH = 4096
V1_CONTROLLERS = {"cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls", "blkio", "perf_event",
                  "net_prio", "hugetlb", "pids", "rdma", "misc"}


def read(pid: int) -> tuple[str, ...]:
    """The process's /proc/PID/cgroup lines ("id:controllers:path")."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return tuple(line.rstrip("\n") for line in f if line.strip())
    except OSError:
        return ()


def parse(line: str) -> tuple[str, str]:
    """(controllers, path) of one line; controllers "" for the unified hierarchy. Checked: it
    comes from an image or another host."""
    parts = line.split(":", 2)
    if len(parts) != 3 or not parts[0].isdigit():
        raise ProtocolError(f"cgroup line {line[:80]!r} is not id:controllers:path")
    controllers, path = parts[1], parts[2]
    if not path.startswith("/") or len(path) > MAX_PATH or ".." in path.split("/") or "\0" in path:
        raise ProtocolError(f"cgroup path {path[:80]!r} is not an absolute cgroup path")
    return ",".join(sorted(c for c in controllers.split(",") if c)), path


def mounts() -> dict[str, tuple[str, str]]:
    """Controllers (sorted, comma-joined; "" for cgroup2) -> (where this agent sees that
    hierarchy, which of its cgroups is mounted there)."""
    out: dict[str, tuple[str, str]] = {}
    for fstype, point, options, root in mount_table():
        if fstype == "cgroup2":
            out.setdefault("", (point, root))
        elif fstype == "cgroup":
            controllers = [o for o in options.split(",") if o in V1_CONTROLLERS or o.startswith("name=")]
            if controllers:
                out.setdefault(",".join(sorted(controllers)), (point, root))
    return out


def check_path(path: str) -> str:
    """A unified cgroup's path as the user gave it (``--cgroup``), checked: ValueError if it
    is not an absolute cgroup path."""
    try:
        return parse(f"0::{path}")[1]
    except ProtocolError:
        raise ValueError(f"--cgroup {path!r}: give an absolute cgroup path, as /proc/PID/cgroup shows it "
                         "(e.g. /system.slice/job.scope)") from None


def _folder(controllers: str, path: str, where: dict[str, tuple[str, str]]) -> str | None:
    """Where cgroup ``path`` of that hierarchy is in this agent's mounts; None if not shown."""
    point, root = where.get(controllers, ("", ""))
    if not point or not (path + "/").startswith(root.rstrip("/") + "/"):
        return None
    return os.path.join(point, path[len(root.rstrip("/")):].lstrip("/"))


def check_chosen(path: str, host: str) -> None:
    """Preflight for ``--cgroup PATH``: that unified cgroup exists here and takes processes;
    RestoreError naming it if not."""
    where = mounts()
    folder = _folder("", check_path(path), where)
    if folder is None:
        raise RestoreError(f"--cgroup {path}: {host} has no cgroup v2 hierarchy showing it to its agent", host=host)
    if not os.path.isdir(folder):
        raise RestoreError(f"--cgroup {path}: no such cgroup on {host} (make it first, e.g. mkdir {folder})",
                           host=host)
    try:
        with open(os.path.join(folder, "cgroup.subtree_control")) as f:
            delegated = f.read().split()
    except OSError:
        delegated = []
    if delegated and os.path.normpath(folder) != os.path.normpath(_folder("", "/", where) or ""):
        raise RestoreError(f"--cgroup {path} on {host} gives controllers to its children ({' '.join(delegated)}), "
                           "so it may hold no process of its own: name a leaf cgroup", host=host)
    if not os.access(os.path.join(folder, "cgroup.procs"), os.W_OK):
        raise RestoreError(f"--cgroup {path} on {host} takes no processes ({folder}/cgroup.procs is not writable)",
                           host=host)


def place(pid: int, lines: tuple[str, ...], host: str, chosen: str | None = None) -> list[str]:
    """Move restored process ``pid`` into the cgroups ``lines`` name, or for the unified
    hierarchy into ``chosen`` where the user chose one; a warning for each recorded cgroup
    that is not possible here, RestoreError if the chosen one is not."""
    if chosen is not None:
        lines = (*(line for line in lines if parse(line)[0] != ""), f"0::{check_path(chosen)}")
    if not lines:
        return []
    here = dict(parse(line) for line in read(pid))
    where: dict[str, tuple[str, str]] | None = None      # read only if it moves (the mount table is long)
    warnings = []
    for line in lines:
        controllers, path = parse(line)
        name = controllers or "unified (v2)"
        if here.get(controllers) == path:
            continue                      # there already (the restorer's own)
        if where is None:
            where = mounts()
        instead = f"it runs in {here.get(controllers, 'the restorer’s')} instead"
        folder = _folder(controllers, path, where)
        if folder is None:
            why = f"which {host} does not show its agent"
        elif not os.path.isdir(folder):
            why = f"which does not exist on {host}"
        else:
            try:
                with open(os.path.join(folder, "cgroup.procs"), "w") as f:
                    f.write(str(pid))
                continue
            except OSError as exc:
                why = f"which it could not join on {host} ({exc.strerror})"
        if chosen is not None and controllers == "":
            raise RestoreError(f"pid {pid} could not be put in the cgroup {path} (--cgroup), {why}", host=host)
        warnings.append(f"pid {pid} was in the {name} cgroup {path}, {why}: {instead}")
    return warnings
