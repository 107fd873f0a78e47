"""The cgroups a process is in: read on the source, joined again on the destination.

``/proc/PID/cgroup`` names one path per hierarchy (``0::/path`` for the unified cgroup v2
hierarchy, ``4:memory:/path`` for a v1 one, as on hybrid hosts). The restored process starts
in the restorer's cgroups; before it runs it is written into ``cgroup.procs`` of the same path
in the hierarchy with the same controllers here, which moves all its threads. A cgroup that
does not exist on the destination (another host's slices, a job's cgroup made by a scheduler
that has not made it here) is not made: the process runs where the restorer is, and the
report says so for each hierarchy.
"""
from __future__ import annotations

import os

from agent.procfs import mount_table
from transport.errors import ProtocolError

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


def place(pid: int, lines: tuple[str, ...], host: str) -> list[str]:
    """Move restored process ``pid`` into the cgroups ``lines`` name; a warning for each
    hierarchy where that is not possible here."""
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
        point, root = where.get(controllers, ("", ""))
        if not point or not (path + "/").startswith(root.rstrip("/") + "/"):
            warnings.append(f"pid {pid} was in the {name} cgroup {path}, which {host} does not show its agent: "
                            f"it runs in {here.get(controllers, 'the restorer’s')} instead")
            continue
        target = os.path.join(point, path[len(root.rstrip("/")):].lstrip("/"))
        if not os.path.isdir(target):
            warnings.append(f"pid {pid} was in the {name} cgroup {path}, which does not exist on {host}: it runs "
                            f"in {here.get(controllers, 'the restorer’s')} instead")
            continue
        try:
            with open(os.path.join(target, "cgroup.procs"), "w") as f:
                f.write(str(pid))
        except OSError as exc:
            warnings.append(f"pid {pid} could not join its {name} cgroup {path} on {host} ({exc.strerror}): it "
                            f"runs in {here.get(controllers, 'the restorer’s')} instead")
    return warnings
