"""The agent's ``measure`` method: what this host has and what runs on it, for the rebalancer.

Over one sample interval it reads, from /proc only: the host's CPUs, memory and busy CPU
time, and the CPU share and resident memory of every process that shares the agent's
namespaces (the ones a migration from here could move; the agent's own tree and its callers
are left out). Processes using at least ``min_cpu`` of a CPU, and those named in ``pids``,
become candidates: each with its tree (it moves with its descendants), whether it can move
(the checks ``kcr-migrate --dry-run`` runs on the source, ``agent.tree.check_tree`` and the
tracker's, all read-only: nothing is frozen), and its dirty rate from a short sample of the
tracker ``kcr-migrate wss`` uses (``agent.wss``: the process is held for two injected system
calls, and is otherwise undisturbed), summed over the tree's first ``TREE_SAMPLES`` processes.
``pids`` names processes that are candidates whatever CPU they use (a scheduler's job pids;
one that is gone, or not in this agent's namespaces, is left out); with ``only_named`` they
are the only candidates.

Hosts that are namespaces of one kernel (test hosts, containers) share /proc/stat and
/proc/meminfo: the result carries both the system's figures and the sums over this host's own
processes, and ``migrate.inventory`` chooses (it sees which hosts share a ``boot_id``).

The result is versioned (``v``, ``MEASURE_VERSION``): fields are only ever added.
"""
from __future__ import annotations

import fnmatch
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Sequence

import trio

from agent.procfs import namespace_ids, process_tree, read_stat, read_status
from agent.tree import check_tree
from agent.wss import WssMeter, WssOptions
from precopy.kernel import boot_id
from precopy.probe import CHOICES, choose_tracker
from transport.errors import MigrationError, NoSuchProcess, ProcessError, ProcessExited
from transport.frozen import frozen
from transport.rpc import CallContext

MEASURE_VERSION = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
MAX_SAMPLE_S = 60.0
MAX_CANDIDATES = 256            # the busiest first; a host with more reports these
DIRTY_SAMPLES_AT_ONCE = 4
TREE_SAMPLES = 16               # processes of a tree whose dirty rates are sampled (and summed)
_JOB = re.compile(r"/job_(\d+)(?:/|$)")


def _cpu_busy_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)      # idle + iowait
    total = sum(fields[:8])                                         # guest time is inside user time
    return total - idle, total


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])



@dataclass
class _Proc:
    pid: int
    ppid: int
    comm: str
    ticks: int
    rss: int
    uid: int


def _read_proc(pid: int) -> _Proc | None:
    try:
        stat = read_stat(pid)
        if stat[3] in ("Z", "X") or int(stat[9]) & 0x00200000:     # zombie, PF_KTHREAD
            return None
        status = read_status(pid)
    except (MigrationError, OSError, IndexError, ValueError):
        return None
    if status.get("Tgid") != str(pid) or "VmRSS" not in status:
        return None
    return _Proc(pid, int(stat[4]), stat[2], int(stat[14]) + int(stat[15]),
                 int(status["VmRSS"].split()[0]) * 1024, int(status["Uid"].split()[1]))


def _ancestors(pid: int) -> set[int]:
    out: set[int] = set()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            pid = int(read_stat(pid)[4])
        except (MigrationError, OSError, IndexError, ValueError):
            break
    return out


def _own_processes(skip: set[int]) -> dict[int, _Proc]:
    """Processes that share every namespace with this agent (those a migration from here can
    take), but ``skip``."""
    ours = namespace_ids("self")
    out: dict[int, _Proc] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip or name == "1":
            continue
        pid = int(name)
        try:
            if namespace_ids(pid) != ours:
                continue
        except (MigrationError, OSError):
            continue
        p = _read_proc(pid)
        if p is not None:
            out[pid] = p
    return out


def _cgroup(pid: int) -> str:
    """The process's cgroup path: the unified one, else the cpu controller's, else the first."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        return ""
    for ident, controllers, path in lines:
        if ident == "0" and controllers == "":
            return path
    for _, controllers, path in lines:
        if "cpu" in controllers.split(","):
            return path
    return lines[0][2] if lines else ""


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read(4096).replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


RULE_KINDS = ("user", "job", "cgroup", "command", "pid")


@frozen
class Rule:
    """``KIND=PATTERN`` of ``--include``/``--exclude``: user (a uid), job, cgroup, command (the
    command name, the command line or its program's name), pid; PATTERN a shell pattern. One
    matcher for the agent (what it examines) and the planner (what may move)."""

    kind: str
    pattern: str

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise ValueError(f"{self.kind}={self.pattern}: the kind must be one of {', '.join(RULE_KINDS)}")
        if not self.pattern:
            raise ValueError(f"{self.kind}=: give a pattern")

    @classmethod
    def parse(cls, text: str) -> "Rule":
        kind, sep, pattern = text.partition("=")
        if not sep:
            raise ValueError(f"{text!r}: write KIND=PATTERN, KIND one of {', '.join(RULE_KINDS)} "
                             "(e.g. user=1000, command=python*, job=42, cgroup=/slurm/*)")
        return cls(kind, pattern)

    def matches(self, *, uid: int, job_id: str, cgroup: str, pid: int, comm: str, cmdline: str) -> bool:
        values = {"user": [str(uid)], "job": [job_id], "cgroup": [cgroup], "pid": [str(pid)],
                  "command": [comm, cmdline, cmdline.split(" ", 1)[0].rsplit("/", 1)[-1]]}[self.kind]
        return any(v and fnmatch.fnmatchcase(v, self.pattern) for v in values)

    def __str__(self) -> str:
        return f"{self.kind}={self.pattern}"


def selection(include: Sequence[Rule], exclude: Sequence[Rule], **facts: Any) -> str:
    """"" if the rules let a process with these ``facts`` (as ``Rule.matches`` takes) move, else why not."""
    for rule in exclude:
        if rule.matches(**facts):
            return f"excluded by {rule}"
    if include and not any(rule.matches(**facts) for rule in include):
        return "matches no --include rule"
    return ""


def _rules(raw: Any) -> list[Rule]:
    if not isinstance(raw, list) or len(raw) > 256:
        raise ProcessError("measure: rules must be a list of [kind, pattern] pairs")
    try:
        return [Rule(str(kind), str(pattern)[:4096]) for kind, pattern in raw]
    except (TypeError, ValueError) as exc:
        raise ProcessError(f"measure: a bad rule: {exc}") from None


def _movable(pid: int, tracker: str) -> tuple[bool, str, str]:
    """(can move, why not, tracker): ``kcr-migrate --dry-run``'s source checks, read-only."""
    try:
        check_tree(pid, {})
        choice = choose_tracker(tracker, pid)
    except (NoSuchProcess, ProcessExited):
        raise                         # gone: not a candidate
    except MigrationError as exc:
        return False, exc.message, ""
    except OSError as exc:
        return False, f"cannot inspect pid {pid}: {exc.strerror or exc}", ""
    return True, "", choice.name


def _dirty_rate(pid: int, tracker: str, seconds: float) -> float:
    """Bytes per second the process wrote over one ``seconds`` interval."""
    with WssMeter(pid, WssOptions(interval_s=seconds, count=1, tracker=tracker)) as meter:
        for sample in meter.samples():
            return sample.dirty_rate_mib_s * (1 << 20)
    return 0.0


def _check_args(sample_s: float, dirty_s: float, min_cpu: float, pids: list[int], tracker: str) -> None:
    if not 0 < sample_s <= MAX_SAMPLE_S or not 0 <= dirty_s <= MAX_SAMPLE_S:
        raise ProcessError(f"measure: sample times must be within (0, {MAX_SAMPLE_S:g}] s")
    if not 0 <= min_cpu <= 4096:
        raise ProcessError(f"measure: min_cpu {min_cpu} is not a CPU share")
    if len(pids) > MAX_CANDIDATES or not all(isinstance(p, int) and p > 0 for p in pids):
        raise ProcessError(f"measure: pids must be at most {MAX_CANDIDATES} process ids")
    if tracker not in CHOICES:
        raise ProcessError(f"measure: unknown tracker {tracker!r}")


async def measure(ctx: CallContext, *, sample_s: float = 1.0, dirty_s: float = 0.5, min_cpu: float = 0.05,
                  pids: list[int] | None = None, tracker: str = "auto", include: list[Any] | None = None,
                  exclude: list[Any] | None = None, only_named: bool = False) -> dict[str, Any]:
    """This host and its candidate processes, measured over ``sample_s`` seconds (see the
    module's docstring); ``dirty_s`` 0 skips the dirty-rate samples. ``include``/``exclude``
    ([kind, pattern] pairs, ``Rule``): processes they rule out are reported, not examined."""
    named = [int(p) for p in pids or []]
    included, excluded = _rules(include or []), _rules(exclude or [])
    _check_args(sample_s, dirty_s, min_cpu, named, tracker)
    skip = _ancestors(os.getpid()) | set(process_tree(os.getpid()))
    busy0, total0 = _cpu_busy_ticks()
    t0 = time.monotonic()
    before = await trio.to_thread.run_sync(_own_processes, skip)
    await trio.sleep(sample_s)
    after = await trio.to_thread.run_sync(_own_processes, skip)
    busy1, total1 = _cpu_busy_ticks()
    seconds = time.monotonic() - t0
    cpus = os.cpu_count() or 1
    share = {pid: max(0, p.ticks - before[pid].ticks) / CLK_TCK / seconds
             for pid, p in after.items() if pid in before}
    mem = _meminfo()
    roots = sorted((pid for pid in after if pid in named or (not only_named and share.get(pid, 0.0) >= min_cpu)),
                   key=lambda pid: -share.get(pid, 0.0))[:MAX_CANDIDATES]
    candidates: list[dict[str, Any]] = []
    for pid in roots:
        try:
            tree = [q for q in process_tree(pid) if q in after] or [pid]
        except MigrationError:
            continue                  # it ended meanwhile
        p = after[pid]
        cgroup, cmdline = _cgroup(pid), _cmdline(pid)
        job = _JOB.search(cgroup)
        job_id = job.group(1) if job else ""
        why = selection(included, excluded, uid=p.uid, job_id=job_id, cgroup=cgroup, pid=pid, comm=p.comm,
                        cmdline=cmdline)
        ok, chosen = False, ""
        if not why:
            try:
                ok, why, chosen = await trio.to_thread.run_sync(_movable, pid, tracker)
            except (NoSuchProcess, ProcessExited):
                continue
        candidates.append({
            "pid": pid, "ppid": p.ppid, "comm": p.comm, "cmdline": cmdline, "uid": p.uid,
            "cgroup": cgroup, "job_id": job_id, "tree": tree,
            "cpu": round(sum(share.get(q, 0.0) for q in tree), 4), "rss_bytes": sum(after[q].rss for q in tree),
            "dirty_rate": -1.0, "movable": ok, "reason": why, "tracker": chosen})
    limiter = trio.CapacityLimiter(DIRTY_SAMPLES_AT_ONCE)

    async def sample(c: dict[str, Any]) -> None:
        """The dirty rate of the tree: its first TREE_SAMPLES processes, sampled at once."""
        rates: dict[int, float] = {}
        errors: list[str] = []

        async def one(pid: int) -> None:
            try:
                rates[pid] = await trio.to_thread.run_sync(_dirty_rate, pid, c["tracker"], dirty_s, limiter=limiter)
            except (ProcessExited, NoSuchProcess):
                if pid == c["pid"]:
                    gone.add(pid)      # it ended meanwhile: nothing to move
            except MigrationError as exc:
                errors.append(exc.message)

        async with trio.open_nursery() as nursery:
            for pid in c["tree"][:TREE_SAMPLES]:
                nursery.start_soon(one, pid)
        if errors:
            c["movable"], c["reason"] = False, f"its dirty rate could not be sampled: {errors[0]}"
        else:
            c["dirty_rate"] = round(sum(rates.values()), 1)

    gone: set[int] = set()

    if dirty_s > 0:
        async with trio.open_nursery() as nursery:
            for c in candidates:
                if c["movable"]:
                    nursery.start_soon(sample, c)
    candidates = [c for c in candidates if c["pid"] not in gone]
    return {
        "v": MEASURE_VERSION, "boot_id": boot_id(), "cpus": cpus, "seconds": round(seconds, 4),
        "mem_total": mem.get("MemTotal", 0), "mem_available": mem.get("MemAvailable", mem.get("MemFree", 0)),
        "cpu_busy": round(max(0, busy1 - busy0) / max(1, total1 - total0) * cpus, 4),
        "cpu_own": round(sum(share.values()), 4), "rss_own": sum(p.rss for p in after.values()),
        "loadavg": _loadavg(),
        "candidates": candidates,
    }


METHODS = {"measure": measure}
