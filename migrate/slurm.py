"""Slurm as the inventory: nodes, jobs and the processes of a job, read from Slurm's own commands.

What a rebalancer or a cluster manager asks Slurm, and where the answer comes from::

    slurm = Slurm(ssh_config="~/.ssh/config")        # SLURM_CONF, or /etc/slurm/slurm.conf
    nodes = await slurm.nodes(partition="batch")      # sinfo --json
    job = await slurm.job(1234)                        # squeue --json
    procs = await slurm.job_processes(1234, "node7")   # scontrol listpids, ps: on node7, over SSH

``SlurmNode`` carries a node's state as Slurm says it (base state and flags) and as the
inventory uses it (``host_state``: ``up``, ``drained`` or ``down``; only ``up`` nodes are
destinations), its CPUs, load and memory.  ``SlurmJob`` carries a job's state, the nodes of
its allocation, its batch host and exit code.  ``JobProcesses`` is a job's process tree on one
node: the pids ``scontrol listpids`` gives (those slurmstepd tracks: the batch shell, its
workload and everything they start), with parents and command names from ``ps`` run in the
same SSH command, so the pids are the node's own (its pid namespace's).

Everything here is read only, and everything Slurm or a node answers is checked before use:
JSON documents and listings of bounded size whose fields must have the expected types.  Errors
are ``SlurmError``s, one line each that says what to do: an unknown node (``UnknownNode``), a
node that is down or drained where a usable one is needed (``NodeUnusable``), a job Slurm does
not know (``NoSuchJob``), a Slurm that does not answer (``SlurmUnreachable``: commands missing,
``SLURM_CONF`` naming no file, slurmctld down).

Facts about Slurm 22.05 (Debian bookworm) this relies on: ``sinfo --json`` and
``squeue --json`` exist and ignore their filter options (every node, every job in slurmctld's
memory, finished ones for ``MinJobAge``); ``cpu_load`` is the load average times 100; memory
is in MiB; a job's ``exit_code`` is a wait status (``0:0`` is 0, exit 1 is 256, SIGKILL 9);
``scontrol listpids JOBID NODE`` must run on the node, and needs the node name there unless
the host name is the node's; on a node of the job's allocation where it has no step yet it
fails with "JobId=N does not exist on node NODE" (no processes there).  With slurmctld down, ``sinfo --json`` and ``squeue --json`` wait
about 9 s, then exit 0 with an empty list and an "Unspecified error", while ``scontrol ping``
answers DOWN at once: every query pings first.  With the config file missing, every command
retries for a minute: that is checked before any runs.
"""
from __future__ import annotations

import json
import os
import re
import shlex
from typing import Any

import trio

from transport.errors import MigrationError
from transport.frozen import frozen

DEFAULT_CONF = "/etc/slurm/slurm.conf"
COMMAND_TIMEOUT = 30.0
OUTPUT_MAX = 16 << 20
MIB = 1 << 20
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\Z")
# Base states and flags (sinfo --json) that make a node unusable as a destination.
DOWN_STATES = frozenset({"down", "error", "future", "unknown"})
DOWN_FLAGS = frozenset({"NOT_RESPONDING", "POWERED_DOWN", "POWERING_DOWN", "POWER_DOWN", "REBOOT_ISSUED"})
DRAIN_FLAGS = frozenset({"DRAIN", "FAIL", "MAINTENANCE", "RESERVED"})
LISTPIDS_MARK = "--- kcr: ps ---"
# What slurmd answers `scontrol listpids` for a job with no step on that node (a node of a
# multi-node allocation that the batch script has not used): no processes there, not an error.
NO_STEP_THERE = "does not exist on node"


class SlurmError(MigrationError):
    """Slurm, or what it says, cannot be used; the message says what to do."""

    code = "slurm"


class SlurmUnreachable(SlurmError):
    """Slurm's commands are missing, its config is missing, or slurmctld does not answer."""

    code = "slurm-unreachable"


class UnknownNode(SlurmError):
    code = "slurm-unknown-node"


class NodeUnusable(SlurmError):
    """A node that is down or drained where one that takes processes is needed."""

    code = "slurm-node-unusable"


class NoSuchJob(SlurmError):
    code = "slurm-no-such-job"


@frozen
class SlurmNode:
    name: str
    address: str                  # NodeAddr
    state: str                    # Slurm's base state: idle, mixed, allocated, down, ...
    flags: tuple[str, ...]        # DRAIN, NOT_RESPONDING, ...
    cpus: int
    cpus_allocated: int
    load: float                   # load average, as slurmd reports it
    memory_bytes: int             # RealMemory
    free_memory_bytes: int | None  # FreeMem; None if the node has not reported it
    partitions: tuple[str, ...]
    reason: str = ""              # why it is down or drained, as the admin said

    @property
    def host_state(self) -> str:
        """``down``, ``drained`` or ``up``: the inventory's vocabulary (only ``up`` takes
        processes; a drained node's processes may still move away)."""
        if self.state in DOWN_STATES or DOWN_FLAGS.intersection(self.flags):
            return "down"
        if DRAIN_FLAGS.intersection(self.flags) or self.state in ("drained", "draining"):
            return "drained"
        return "up"

    @property
    def usable(self) -> bool:
        return self.host_state == "up"

    @property
    def describe(self) -> str:
        """``down``, ``drained``, ``idle``, ``mixed+DRAIN`` ...: what sinfo would say."""
        return "+".join((self.state, *self.flags))


@frozen
class SlurmJob:
    job_id: int
    name: str
    state: str                    # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...
    user: str
    partition: str
    nodes: tuple[str, ...]        # the allocation (empty while pending)
    batch_host: str               # the node running the batch shell ("" while pending)
    exit_status: int              # a wait status: exit code << 8 | signal

    @property
    def exit_code(self) -> str:
        """``CODE:SIGNAL`` as sacct and scontrol print it (``0:0``)."""
        return f"{(self.exit_status >> 8) & 0xFF}:{self.exit_status & 0x7F}"

    @property
    def running(self) -> bool:
        return self.state == "RUNNING"


@frozen
class SlurmProcess:
    pid: int                      # in the node's pid namespace
    ppid: int
    comm: str
    step: str                     # batch, extern, 0, 1, ...
    local_id: int | None          # the task's rank in its step; None for the processes it started


@frozen
class JobProcesses:
    """A job's processes on one node, as slurmstepd tracks them: a process tree."""

    job_id: int
    node: str
    processes: tuple[SlurmProcess, ...]

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self.processes)

    @property
    def roots(self) -> tuple[SlurmProcess, ...]:
        """Processes whose parent is not the job's: on a batch node, the batch shell."""
        pids = set(self.pids)
        return tuple(p for p in self.processes if p.ppid not in pids)

    def children(self, pid: int) -> tuple[SlurmProcess, ...]:
        return tuple(p for p in self.processes if p.ppid == pid)

    @property
    def batch_shell(self) -> SlurmProcess | None:
        """The batch script's shell (task 0 of the batch step), if it runs on this node."""
        return next((p for p in self.processes if p.step == "batch" and p.local_id == 0), None)

    @property
    def workload(self) -> tuple[SlurmProcess, ...]:
        """What the batch shell started (each with its own descendants): what moves."""
        shell = self.batch_shell
        return self.children(shell.pid) if shell is not None else self.roots


class Slurm:
    """One Slurm cluster, through its client commands here and on its nodes (over SSH)."""

    def __init__(self, conf: str | None = None, *, ssh_config: str | None = None,
                 timeout: float = COMMAND_TIMEOUT) -> None:
        self.conf = conf or os.environ.get("SLURM_CONF") or DEFAULT_CONF
        self.ssh_config = ssh_config
        self.timeout = timeout

    # --- nodes ---

    async def nodes(self, partition: str | None = None) -> tuple[SlurmNode, ...]:
        """Every node (of ``partition``), as sinfo reports it."""
        doc = await self._json(["sinfo", "--json"], "nodes")
        nodes = tuple(_node(raw) for raw in _list(doc, "nodes"))
        if partition is None:
            return nodes
        if partition not in {p for n in nodes for p in n.partitions}:
            known = sorted({p for n in nodes for p in n.partitions})
            raise SlurmError(f"Slurm has no partition {partition!r} (partitions: {', '.join(known) or 'none'}): "
                             "check the name with sinfo")
        return tuple(n for n in nodes if partition in n.partitions)

    async def node(self, name: str) -> SlurmNode:
        """Node ``name``; UnknownNode if Slurm has none of that name."""
        nodes = await self.nodes()
        for node in nodes:
            if node.name == name:
                return node
        raise UnknownNode(f"Slurm has no node {name!r} (nodes: {_names(nodes)}): check the name with sinfo -N",
                          host=None)

    async def usable_node(self, name: str) -> SlurmNode:
        """Node ``name`` if it may take processes; NodeUnusable if it is down or drained."""
        return require_usable(await self.node(name))

    # --- jobs ---

    async def jobs(self) -> tuple[SlurmJob, ...]:
        """Every job slurmctld knows: pending, running, and finished within MinJobAge."""
        doc = await self._json(["squeue", "--json"], "jobs")
        return tuple(_job(raw) for raw in _list(doc, "jobs"))

    async def job(self, job_id: int) -> SlurmJob:
        """Job ``job_id``; NoSuchJob if slurmctld does not know it (any more)."""
        if not isinstance(job_id, int) or isinstance(job_id, bool) or not 0 < job_id < 1 << 32:
            raise NoSuchJob(f"{job_id!r} is not a Slurm job id: give the number sbatch printed")
        for job in await self.jobs():
            if job.job_id == job_id:
                return job
        raise NoSuchJob(f"Slurm has no job {job_id} (it never existed, or ended longer ago than MinJobAge): "
                        "check the id with squeue")

    async def job_nodes(self, job_id: int) -> tuple[SlurmNode, ...]:
        """The nodes of a job's allocation; SlurmError if it has none (not running)."""
        job = await self.job(job_id)
        if not job.nodes:
            raise SlurmError(f"Slurm job {job_id} is {job.state} and has no nodes: only a running job's "
                             "processes can move")
        by_name = {n.name: n for n in await self.nodes()}
        return tuple(by_name[n] for n in job.nodes if n in by_name)

    async def job_processes(self, job_id: int, node: str | None = None) -> JobProcesses:
        """Job ``job_id``'s processes on ``node`` (default: its batch host), read on that node."""
        job = await self.job(job_id)
        if not job.running:
            raise SlurmError(f"Slurm job {job_id} is {job.state}, not running: it has no processes to move")
        node = node or job.batch_host
        if node not in job.nodes:
            raise UnknownNode(f"node {node!r} is not one of Slurm job {job_id}'s nodes ({', '.join(job.nodes)}): "
                              "pick one of them")
        command = (f"SLURM_CONF={shlex.quote(self.conf)} scontrol listpids {job_id} {shlex.quote(node)} "
                   f"&& echo {shlex.quote(LISTPIDS_MARK)} && ps -eo pid=,ppid=,comm=")
        status, out, err = await self._on_node(node, command)
        if status != 0 and NO_STEP_THERE in err:
            return JobProcesses(job_id, node, ())   # a node of its allocation it runs nothing on (yet)
        if status != 0 or LISTPIDS_MARK not in out:
            said = err.strip().splitlines()[-1:] or [f"exit status {status}"]
            raise SlurmError(f"`scontrol listpids {job_id} {node}` failed on {node}: {said[0]}", host=node)
        listing, ps = out.split(LISTPIDS_MARK, 1)
        return JobProcesses(job_id, node, _job_processes(job_id, listing, ps))

    # --- running commands ---

    async def _json(self, argv: list[str], key: str) -> dict[str, Any]:
        await self.ping()
        out = await self._local(argv)
        try:
            doc = json.loads(out)
        except ValueError:
            raise SlurmError(f"`{' '.join(argv)}` did not print JSON: is this Slurm 22.05 or later?") from None
        if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
            raise SlurmError(f"`{' '.join(argv)}` printed JSON without a list of {key}")
        errors = doc.get("errors")
        if isinstance(errors, list) and errors:
            raise SlurmError(f"`{' '.join(argv)}` reported: {_error_text(errors[0])}")
        return doc

    async def ping(self) -> None:
        """SlurmUnreachable unless slurmctld answers (``scontrol ping``: at once, where sinfo and
        squeue wait 9 s and then print an empty list with an unspecified error)."""
        try:
            await self._local(["scontrol", "ping"])
        except SlurmError as exc:
            if isinstance(exc, SlurmUnreachable):
                raise
            raise SlurmUnreachable("slurmctld does not answer (scontrol ping: DOWN): start it, or point "
                                   "SLURM_CONF at the cluster's slurm.conf") from None

    def _check_conf(self) -> None:
        if not os.path.isfile(self.conf):
            where = "SLURM_CONF names" if os.environ.get("SLURM_CONF") == self.conf else "the Slurm config"
            raise SlurmUnreachable(f"{where} {self.conf}, which does not exist: point SLURM_CONF at the "
                                   "cluster's slurm.conf")

    async def _local(self, argv: list[str]) -> str:
        self._check_conf()
        env = {**os.environ, "SLURM_CONF": self.conf}
        try:
            with trio.fail_after(self.timeout):
                proc = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False,
                                              stdin=b"", env=env)
        except FileNotFoundError:
            raise SlurmUnreachable(f"`{argv[0]}` is not installed here: install Slurm's client commands "
                                   "(Debian: apt-get install slurm-client)") from None
        except trio.TooSlowError:
            raise SlurmUnreachable(f"`{' '.join(argv)}` did not answer in {self.timeout:g} s: "
                                   "is slurmctld running?") from None
        if len(proc.stdout) > OUTPUT_MAX:
            raise SlurmError(f"`{' '.join(argv)}` printed more than {OUTPUT_MAX} bytes")
        if proc.returncode != 0:
            said = proc.stderr.decode(errors="replace").strip().splitlines()
            detail = said[-1] if said else f"exit status {proc.returncode}"
            if "nable to contact slurm controller" in detail or "Connection refused" in detail:
                raise SlurmUnreachable(f"slurmctld does not answer ({detail}): start it, or point SLURM_CONF "
                                       "at the cluster's slurm.conf")
            raise SlurmError(f"`{' '.join(argv)}` failed: {detail}")
        return proc.stdout.decode(errors="replace")

    async def _on_node(self, node: str, command: str) -> tuple[int | None, str, str]:
        if not NAME_RE.match(node):
            raise UnknownNode(f"{node!r} is not a node name")
        if node in ("localhost", "127.0.0.1", "::1"):
            with trio.fail_after(self.timeout):
                proc = await trio.run_process(["sh", "-c", command], capture_stdout=True, capture_stderr=True,
                                              check=False, stdin=b"")
            return proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        from transport.ssh import run_ssh_command   # asyncssh: only where a node is asked
        result = await run_ssh_command(node, command, ssh_config=self.ssh_config, timeout=self.timeout,
                                       max_output=OUTPUT_MAX)
        return result.status, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")


def require_usable(node: SlurmNode) -> SlurmNode:
    """``node`` if it may take processes; NodeUnusable (down or drained, and why) if not."""
    state = node.host_state
    if state == "up":
        return node
    why = f" (reason: {node.reason})" if node.reason else ""
    raise NodeUnusable(f"node {node.name} is {state} in Slurm{why}: pick another node, or return it to "
                       f"service with `scontrol update nodename={node.name} state=resume`", host=node.name)


# --- decoding what Slurm says ------------------------------------------------------------------

def _list(doc: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = doc[key]
    if not all(isinstance(item, dict) for item in items):
        raise SlurmError(f"Slurm's list of {key} holds something that is not a record")
    return items


def _field(raw: dict[str, Any], key: str, kind: type, what: str) -> Any:
    value = raw.get(key)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise SlurmError(f"Slurm's record of {what} has no valid {key!r} ({value!r})")
    return value


def _strings(raw: dict[str, Any], key: str, what: str) -> tuple[str, ...]:
    value = raw.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SlurmError(f"Slurm's record of {what} has no valid {key!r}")
    return tuple(value)


def _count(raw: dict[str, Any], key: str, what: str) -> int:
    value = _field(raw, key, int, what)
    if not 0 <= value < 1 << 40:
        raise SlurmError(f"Slurm's record of {what} has {key} = {value}, out of range")
    return int(value)


def _node(raw: dict[str, Any]) -> SlurmNode:
    name = _field(raw, "name", str, "a node")
    if not NAME_RE.match(name):
        raise SlurmError(f"Slurm reports a node named {name!r}, which is not a host name")
    what = f"node {name}"
    free = raw.get("free_memory")
    # 22.05 says a huge number (NO_VAL) for a node that has not reported free memory.
    free_bytes = free * MIB if isinstance(free, int) and not isinstance(free, bool) and 0 <= free < 1 << 40 else None
    return SlurmNode(
        name=name,
        address=_field(raw, "address", str, what),
        state=_field(raw, "state", str, what).lower(),
        flags=tuple(f.upper() for f in _strings(raw, "state_flags", what)),
        cpus=_count(raw, "cpus", what),
        cpus_allocated=_count(raw, "alloc_cpus", what),
        load=_count(raw, "cpu_load", what) / 100,
        memory_bytes=_count(raw, "real_memory", what) * MIB,
        free_memory_bytes=free_bytes,
        partitions=_strings(raw, "partitions", what),
        reason=str(raw.get("reason") or ""),
    )


def _job(raw: dict[str, Any]) -> SlurmJob:
    job_id = _count(raw, "job_id", "a job")
    what = f"job {job_id}"
    resources = raw.get("job_resources")
    nodes: tuple[str, ...] = ()
    if isinstance(resources, dict) and isinstance(resources.get("allocated_nodes"), list):
        nodes = tuple(_field(n, "nodename", str, what) for n in resources["allocated_nodes"] if isinstance(n, dict))
    for node in nodes:
        if not NAME_RE.match(node):
            raise SlurmError(f"Slurm says {what} runs on {node!r}, which is not a host name")
    exit_status = raw.get("exit_code", 0)
    if not isinstance(exit_status, int) or isinstance(exit_status, bool) or not 0 <= exit_status < 1 << 16:
        exit_status = 0
    return SlurmJob(
        job_id=job_id,
        name=str(raw.get("name") or ""),
        state=_field(raw, "job_state", str, what),
        user=str(raw.get("user_name") or ""),
        partition=str(raw.get("partition") or ""),
        nodes=nodes,
        batch_host=str(raw.get("batch_host") or ""),
        exit_status=exit_status,
    )


def _job_processes(job_id: int, listing: str, ps: str) -> tuple[SlurmProcess, ...]:
    """Join ``scontrol listpids`` (PID JOBID STEPID LOCALID GLOBALID) with ``ps`` (pid ppid comm)."""
    tracked: dict[int, tuple[str, int | None]] = {}
    for line in listing.splitlines()[1:]:
        words = line.split()
        if len(words) != 5 or not words[0].isdigit() or words[1] != str(job_id):
            raise SlurmError(f"`scontrol listpids {job_id}` printed a line that is not a pid of the job: {line!r}")
        tracked[int(words[0])] = (words[2], int(words[3]) if words[3].isdigit() else None)
    processes = []
    for line in ps.splitlines():
        words = line.split(None, 2)
        if len(words) < 2 or not words[0].isdigit() or not words[1].isdigit():
            continue
        pid = int(words[0])
        if pid in tracked:   # a pid that ended between the two commands is simply not listed
            step, local_id = tracked[pid]
            processes.append(SlurmProcess(pid, int(words[1]), words[2].strip() if len(words) > 2 else "",
                                          step, local_id))
    return tuple(sorted(processes, key=lambda p: p.pid))


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("description") or error.get("error") or error)
    return str(error)


def _names(nodes: tuple[SlurmNode, ...]) -> str:
    return ", ".join(n.name for n in nodes) or "none"
