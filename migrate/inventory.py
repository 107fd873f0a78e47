"""The cluster as the rebalancer sees it: hosts, their measured load, and the processes that
could move.

``Host`` is what is known before measuring: a name kcr-migrate reaches it by (as in
``~/.ssh/config``, or ``localhost``), its CPUs and memory if the user or a scheduler says so,
its state (``up``; ``drained`` and ``down`` hosts are never a destination, a drained one may
still be a source) and labels. A host file lists them (``read_hosts_file``); a scheduler's
nodes become ``Host`` records the same way (``Host(name=..., cpus=..., memory_bytes=...,
state=...)``; ``slurm_hosts`` does it for Slurm's nodes with ``SlurmNode.host_state``).

``measure`` asks every host's agent at once (``agent.measure``: one sample interval on each)
and returns an ``Inventory``: per host a ``HostLoad`` (CPUs busy, memory free, its
``Candidate`` processes with their CPU share, resident memory, dirty rate and whether they can
move), and the link bandwidth for cost estimates: the user's ``--bandwidth``, or measured
from each host to the next one in the list with a short transfer over the direct data channel
(on a switched network a host's own link is what limits what it sends; a host whose link
cannot be measured counts as the slowest measured).

A scheduler adapter also fills ``Inventory.allocations`` (job id -> its nodes): a process whose
cgroup names a job (``/job_N/``) then moves only within that job's allocation.

Hosts that share one kernel (network namespaces or containers on one machine: the agents
report one ``boot_id``) share its CPU and memory counters, so there a host's load is the sum
of its own processes' CPU shares and its used memory the sum of their resident memory (told
from the hosts measured together: a host measured alone counts as the whole machine).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, field, replace
from typing import Any, Mapping, Sequence

import trio

from agent.measure import Rule
from transport._nursery import leaves, service_nursery
from transport.errors import MigrationError, TransportError
from transport.frozen import frozen
from transport.units import parse_size

HOST_STATES = ("up", "drained", "down")
GIGABIT = 125_000_000.0
LINK_SAMPLE_BYTES = 32 << 20
LINK_TIMEOUT_S = 60.0
MAX_HOSTS_FILE_BYTES = 4 << 20


class InventoryError(MigrationError):
    """A host file, host or measurement the rebalancer cannot use; the message says which."""

    code = "inventory"


@frozen
class Host:
    name: str
    cpus: int | None = None             # None: as the host reports
    memory_bytes: int | None = None     # None: as the host reports
    state: str = "up"                   # up, drained, down
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"{self.name!r} is not a host name")
        if self.state not in HOST_STATES:
            raise ValueError(f"host {self.name}: state {self.state!r} (use {', '.join(HOST_STATES)})")
        if self.cpus is not None and self.cpus < 1:
            raise ValueError(f"host {self.name}: cpus must be >= 1")
        if self.memory_bytes is not None and self.memory_bytes < 1:
            raise ValueError(f"host {self.name}: memory must be > 0")

    @property
    def usable(self) -> bool:
        """May processes move here?"""
        return self.state == "up"


@frozen
class Candidate:
    """A process (with its descendants, which move with it) that could move."""

    host: str
    pid: int
    comm: str
    cpu: float                      # CPUs it and its tree use (1.0: one CPU's worth)
    memory_bytes: int               # resident memory of the tree
    dirty_rate: float = -1.0        # bytes/s its root writes; -1: not measured
    movable: bool = True
    reason: str = ""                # why it cannot move, when it cannot
    uid: int = 0
    cmdline: str = ""
    cgroup: str = ""
    job_id: str = ""
    tree: tuple[int, ...] = ()      # its pids, itself first

    @property
    def key(self) -> str:
        return f"{self.pid}@{self.host}"

    @property
    def pids(self) -> tuple[int, ...]:
        return self.tree or (self.pid,)


@frozen
class HostLoad:
    """One host as measured."""

    host: Host
    cpus: int
    load: float                     # CPUs busy
    memory_bytes: int
    memory_free: int
    candidates: tuple[Candidate, ...] = ()
    shared_kernel: bool = False     # counted from its own processes (see the module's docstring)

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def load_per_cpu(self) -> float:
        return self.load / self.cpus

    @property
    def memory_fraction(self) -> float:
        """Memory in use, as a fraction of the host's."""
        return 1.0 - self.memory_free / self.memory_bytes if self.memory_bytes else 0.0


@frozen
class Inventory:
    hosts: tuple[HostLoad, ...]
    bandwidth: Mapping[str, float] = field(default_factory=dict)   # host -> bytes/s it can send
    default_bandwidth: float = GIGABIT
    bandwidth_source: str = "default"                              # user, measured or default
    measured_at: float = 0.0                                       # time.time()
    # job id -> the hosts of its allocation (a scheduler's): its processes move only among them
    allocations: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [h.name for h in self.hosts]
        if len(set(names)) != len(names):
            raise ValueError("a host is listed twice")
        if not self.default_bandwidth > 0:
            raise ValueError("the bandwidth must be > 0")

    def host(self, name: str) -> HostLoad:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def link_bandwidth(self, source: str, dest: str) -> float:
        return self.bandwidth.get(source, self.default_bandwidth)

    def candidates(self) -> list[Candidate]:
        return [c for h in self.hosts for c in h.candidates]

    def as_dict(self) -> dict[str, Any]:
        return {
            "measured_at": self.measured_at, "bandwidth_source": self.bandwidth_source,
            "default_bandwidth": self.default_bandwidth, "bandwidth": dict(self.bandwidth),
            "allocations": {job: sorted(hosts) for job, hosts in self.allocations.items()},
            "hosts": [{**asdict(h.host), "cpus_measured": h.cpus, "load": h.load, "load_per_cpu": h.load_per_cpu,
                       "memory_bytes_measured": h.memory_bytes, "memory_free": h.memory_free,
                       "shared_kernel": h.shared_kernel, "candidates": [asdict(c) for c in h.candidates]}
                      for h in self.hosts]}


# --- the host file -------------------------------------------------------------------------

HOSTS_FILE_HELP = ("one host a line: NAME [cpus=N] [mem=SIZE] [state=up|drained|down] [label=A,B]; "
                   "# starts a comment")


def parse_hosts(text: str, origin: str = "hosts file") -> list[Host]:
    """The hosts of a host file (see ``HOSTS_FILE_HELP``); ``InventoryError`` names the line."""
    hosts: list[Host] = []
    seen: set[str] = set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, *words = line.split()
        where = f"{origin}, line {n}"
        fields: dict[str, Any] = {}
        for word in words:
            key, sep, value = word.partition("=")
            if not sep or not value:
                raise InventoryError(f"{where}: {word!r} is not KEY=VALUE ({HOSTS_FILE_HELP})")
            if key in fields or (key == "label" and "labels" in fields):
                raise InventoryError(f"{where}: {key} is given twice")
            try:
                if key == "cpus":
                    if not value.isdigit():
                        raise ValueError(f"cpus={value}: a whole number of CPUs")
                    fields["cpus"] = int(value)
                elif key in ("mem", "memory"):
                    fields["memory_bytes"] = parse_size(value)
                elif key == "state":
                    fields["state"] = {"drain": "drained", "drng": "drained"}.get(value, value)
                elif key in ("label", "labels"):
                    fields["labels"] = tuple(v for v in value.split(",") if v)
                else:
                    raise ValueError(f"unknown key {key!r}")
            except ValueError as exc:
                raise InventoryError(f"{where}: {exc} ({HOSTS_FILE_HELP})") from None
        try:
            host = Host(name, **fields)
        except ValueError as exc:
            raise InventoryError(f"{where}: {exc}") from None
        if name in seen:
            raise InventoryError(f"{where}: host {name} is listed twice")
        seen.add(name)
        hosts.append(host)
    if not hosts:
        raise InventoryError(f"{origin} lists no hosts ({HOSTS_FILE_HELP})")
    return hosts


def read_hosts_file(path: str) -> list[Host]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_HOSTS_FILE_BYTES + 1)
    except OSError as exc:
        raise InventoryError(f"cannot read the hosts file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_HOSTS_FILE_BYTES:
        raise InventoryError(f"the hosts file {path} is over {MAX_HOSTS_FILE_BYTES >> 20} MiB: is it the right file?")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise InventoryError(f"the hosts file {path} is not text (UTF-8)") from None
    return parse_hosts(text, path)


# --- measuring -----------------------------------------------------------------------------

@frozen
class MeasureOptions:
    sample_s: float = 2.0               # CPU shares over this interval
    dirty_s: float = 0.5                # dirty-rate sample per candidate; 0: none
    min_cpu: float = 0.05               # processes using less than this many CPUs are not candidates
    tracker: str = "auto"
    bandwidth: float | None = None      # bytes/s for every link; None: measured
    link_sample_bytes: int = LINK_SAMPLE_BYTES
    ssh_config: str | None = None
    agent_command: str | None = None
    pids: Mapping[str, tuple[int, ...]] = field(default_factory=dict)   # host -> processes that are
                                        # candidates whatever CPU they use (a scheduler's job pids)
    only_named: bool = False            # the processes in ``pids`` are the only candidates
    include: tuple[Rule, ...] = ()      # processes the agents examine (``agent.measure.Rule``); the
    exclude: tuple[Rule, ...] = ()      # others are reported as not selected, untouched

    def __post_init__(self) -> None:
        if not 0 < self.sample_s <= 60 or not 0 <= self.dirty_s <= 60:
            raise ValueError("sample times must be within (0, 60] seconds")
        if self.bandwidth is not None and not self.bandwidth > 0:
            raise ValueError("the bandwidth must be > 0")
        if self.link_sample_bytes < 1 << 20:
            raise ValueError("a link sample must be at least 1 MiB")


def _number(value: Any, what: str, host: str, lo: float = 0.0, hi: float = math.inf) -> float:
    """A measured number from an agent, range-checked: agents are other hosts."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise InventoryError(f"{host}'s agent reported {what} {value!r}: is it the same kcr-migrate version?",
                             host=host)
    return float(value)


def _candidate(host: str, c: Any) -> Candidate:
    if not isinstance(c, dict):
        raise InventoryError(f"{host}'s agent sent a candidate that is not a map", host=host)
    tree = c.get("tree") or []
    if not isinstance(tree, list) or len(tree) > 65536:
        raise InventoryError(f"{host}'s agent sent a process tree that is not a list of pids", host=host)
    try:
        return Candidate(
            host=host, pid=int(_number(c.get("pid"), "a pid", host, 1, 1 << 22)), comm=str(c.get("comm", ""))[:64],
            cpu=_number(c.get("cpu"), "a CPU share", host, 0, 1 << 16),
            memory_bytes=int(_number(c.get("rss_bytes"), "a memory size", host, 0, 1 << 60)),
            dirty_rate=_number(c.get("dirty_rate", -1.0), "a dirty rate", host, -1, 1 << 50),
            movable=bool(c.get("movable")), reason=str(c.get("reason", ""))[:1000],
            uid=int(_number(c.get("uid", 0), "a uid", host, 0, (1 << 32) - 1)),
            cmdline=str(c.get("cmdline", ""))[:4096], cgroup=str(c.get("cgroup", ""))[:4096],
            job_id=str(c.get("job_id", ""))[:64],
            tree=tuple(int(_number(p, "a pid", host, 1, 1 << 22)) for p in tree))
    except (TypeError, ValueError) as exc:
        raise InventoryError(f"{host}'s agent sent a bad candidate: {exc}", host=host) from None


def host_load(host: Host, m: Mapping[str, Any], shared_kernel: bool) -> HostLoad:
    """A ``HostLoad`` from one agent's ``measure`` result (checked: it comes from another host)."""
    name = host.name
    if m.get("v") != 1:
        raise InventoryError(f"{name}'s agent answers measure in version {m.get('v')!r}, this side reads 1: "
                             "install the same kcr-migrate version on every host", host=name)
    cpus = host.cpus or int(_number(m.get("cpus"), "a CPU count", name, 1, 1 << 20))
    mem_total = host.memory_bytes or int(_number(m.get("mem_total"), "a memory size", name, 1, 1 << 60))
    raw = m.get("candidates")
    if not isinstance(raw, list) or len(raw) > 4096:
        raise InventoryError(f"{name}'s agent sent no candidate list", host=name)
    candidates = tuple(_candidate(name, c) for c in raw)
    if shared_kernel:
        load = _number(m.get("cpu_own"), "a CPU load", name, 0, 1 << 20)
        free = mem_total - int(_number(m.get("rss_own"), "a memory size", name, 0, 1 << 60))
    else:
        load = _number(m.get("cpu_busy"), "a CPU load", name, 0, 1 << 20)
        free = int(_number(m.get("mem_available"), "a memory size", name, 0, 1 << 60))
        if host.memory_bytes:      # the user's capacity: what is used counts against it
            free = host.memory_bytes - (int(m.get("mem_total", 0)) - free)
    return HostLoad(host, cpus, load, mem_total, max(0, min(free, mem_total)), candidates, shared_kernel)


async def _link(src: Any, dst: Any, dest_info: Mapping[str, Any], nbytes: int) -> float:
    """Bytes/s from ``src``'s agent to ``dst``'s over a direct data channel."""
    from transport.tcp import new_key
    address = str(dest_info.get("ssh_server_address") or "127.0.0.1")
    key = new_key()
    listening = await dst.call("data_listen", key=key, address=address, port=0)
    sent = await src.call("source_synthetic", total_bytes=nbytes, level=None,
                          to={"kind": "tcp", "address": address, "port": int(listening["port"]), "key": key})
    seconds = float(sent["seconds"])
    return float(sent["bytes_raw"]) / seconds if seconds > 0 else 0.0


async def measure(hosts: Sequence[Host], options: MeasureOptions | None = None) -> Inventory:
    """Measure every host that is not down, all at once; see the module's docstring. A host
    that cannot be reached, or whose agent is too old, fails the measurement with one line."""
    from migrate.orchestrator import open_agent
    o = options or MeasureOptions()
    names = [h.name for h in hosts]
    if len(set(names)) != len(names):
        raise InventoryError("a host is listed twice")
    live = [h for h in hosts if h.state != "down"]
    results: dict[str, dict[str, Any]] = {}
    infos: dict[str, dict[str, Any]] = {}
    peers: dict[str, Any] = {}
    measured, leave = trio.Event(), trio.Event()

    async def one(host: Host) -> None:
        try:
            async with open_agent(host.name, ssh_config=o.ssh_config, command=o.agent_command) as rpc:
                with trio.fail_after(o.sample_s + 30 * max(1.0, o.dirty_s) + 60):
                    info = await rpc.call("info")
                    if "measure" not in info.get("methods", []):
                        raise InventoryError(
                            f"{host.name}'s agent (kcr-migrate {info.get('tool_version', '?')}) cannot measure: "
                            "install the same kcr-migrate version on every host", host=host.name)
                    infos[host.name] = info
                    results[host.name] = await rpc.call(
                        "measure", sample_s=o.sample_s, dirty_s=o.dirty_s, min_cpu=o.min_cpu, tracker=o.tracker,
                        pids=list(o.pids.get(host.name, ())), only_named=o.only_named,
                        include=[[r.kind, r.pattern] for r in o.include],
                        exclude=[[r.kind, r.pattern] for r in o.exclude])
                peers[host.name] = rpc
                if len(results) == len(live):
                    measured.set()
                await leave.wait()       # the links are measured over these connections
        except trio.TooSlowError:
            raise InventoryError(f"{host.name} did not answer the measurement in time", host=host.name) from None
        except MigrationError as exc:
            exc.host = exc.host or host.name
            raise

    bandwidth: dict[str, float] = {}
    try:
        async with service_nursery() as nursery:
            for h in live:
                nursery.start_soon(one, h)
            try:
                if live:
                    await measured.wait()
                if o.bandwidth is None and len(live) >= 2:
                    # one after another: they would share links and CPUs
                    for i, h in enumerate(live):
                        nxt = live[(i + 1) % len(live)]
                        try:
                            with trio.fail_after(LINK_TIMEOUT_S):
                                bandwidth[h.name] = await _link(peers[h.name], peers[nxt.name], infos[nxt.name],
                                                                o.link_sample_bytes)
                        except (trio.TooSlowError, TransportError):
                            pass       # no direct channel between them: this host's link counts as the slowest
            finally:
                leave.set()
    except BaseExceptionGroup as group:
        first = next((e for e in leaves(group) if isinstance(e, MigrationError)), None)
        if first is None:
            raise
        raise first from None
    boots = [str(results[h.name].get("boot_id", "")) for h in live]
    loads = [host_load(h, results[h.name], bool(boots[i]) and boots.count(boots[i]) > 1)
             for i, h in enumerate(live)]
    down = [HostLoad(h, h.cpus or 1, 0.0, h.memory_bytes or 0, 0) for h in hosts if h.state == "down"]
    by_name = {h.name: h for h in loads + down}
    if o.bandwidth is not None:
        return Inventory(tuple(by_name[n] for n in names), {}, o.bandwidth, "user", time.time())
    bandwidth = {k: v for k, v in bandwidth.items() if v > 0}
    default = min(bandwidth.values()) if bandwidth else GIGABIT
    return Inventory(tuple(by_name[n] for n in names), bandwidth, default,
                     "measured" if bandwidth else "default", time.time())


# --- Slurm as the inventory ------------------------------------------------------------------

@frozen
class SlurmInventory:
    """What Slurm says, as ``measure`` and ``plan`` take it: the hosts, the candidates (job
    pids per node) and the allocations (job id -> its nodes)."""

    hosts: tuple[Host, ...]
    pids: Mapping[str, tuple[int, ...]]
    jobs: Mapping[tuple[str, int], str]          # (node, pid) -> job id
    allocations: Mapping[str, frozenset[str]]


def host_of_node(node: Any) -> Host:
    """A ``migrate.slurm.SlurmNode`` as a ``Host`` (its name is how ssh reaches it)."""
    return Host(node.name, cpus=node.cpus or None, memory_bytes=node.memory_bytes or None, state=node.host_state,
                labels=tuple(node.partitions))


async def slurm_inventory(slurm: Any, *, partition: str | None = None, job_id: int | None = None,
                          any_node: bool = False) -> SlurmInventory:
    """The nodes of ``partition`` (with the workloads of its running jobs as candidates), or of
    job ``job_id``'s allocation (its workload the only candidate; with ``any_node``, every node of
    its partition may take it). A job's workload is what its batch shell started (on other nodes,
    the job's processes there): the shell stays, with its parent slurmstepd."""
    if (partition is None) == (job_id is None):
        raise ValueError("give a partition or a job id")
    if job_id is not None:
        job = await slurm.job(job_id)
        if not job.running:
            raise InventoryError(f"Slurm job {job_id} is {job.state}, not running: it has no processes to move")
        nodes = await (slurm.nodes(job.partition) if any_node else slurm.job_nodes(job_id))
        jobs = [job]
    else:
        nodes = await slurm.nodes(partition)
        names = {n.name for n in nodes}
        jobs = [j for j in await slurm.jobs() if j.running and names.intersection(j.nodes)]
    names = {n.name for n in nodes}
    pids: dict[str, list[int]] = {}
    owner: dict[tuple[str, int], str] = {}
    for job in jobs:
        for node in job.nodes:
            if node not in names:
                continue
            procs = await slurm.job_processes(job.job_id, node)
            for p in procs.workload:
                pids.setdefault(node, []).append(p.pid)
                owner[(node, p.pid)] = str(job.job_id)
    return SlurmInventory(tuple(host_of_node(n) for n in nodes), {k: tuple(v) for k, v in pids.items()}, owner,
                          {str(j.job_id): frozenset(j.nodes) for j in jobs})


def with_jobs(inventory: Inventory, jobs: Mapping[tuple[str, int], str],
              allocations: Mapping[str, frozenset[str]]) -> Inventory:
    """``inventory`` with the scheduler's job ids on its candidates and its allocations."""
    hosts = tuple(replace(h, candidates=tuple(replace(c, job_id=jobs.get((c.host, c.pid), c.job_id))
                                              for c in h.candidates)) for h in inventory.hosts)
    return replace(inventory, hosts=hosts, allocations=dict(allocations))
