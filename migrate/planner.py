"""The rebalancing plan: which processes move where, as a pure function of an ``Inventory``.

``plan(inventory, policy)`` does no I/O. In the spirit of LSF's migration thresholds, a host
whose load per CPU is above ``policy.max_load``, or whose memory in use is above
``policy.max_memory`` of its memory, sheds processes until it is under both, to usable hosts
(state ``up``) that stay under both after taking them. Moves are chosen greedily by benefit per
cost, the most overloaded host first (one move that alone clears the excess is preferred when
it costs less than clearing it at the best ratio would):

* benefit: how much of the source's excess (load per CPU and memory fraction above the
  thresholds) the move removes (a process bigger than the excess helps no more than the excess);
* cost: the move's estimated total time plus its downtime, from its memory, its dirty rate and
  the link's bandwidth, by the convergence model of a real migration (``precopy.policy.estimate``
  replays the pre-copy policy the migration will run with);
* the destination: the least loaded usable host (per CPU) with room for it.

A process that writes memory as fast as the link carries it, or faster, would never converge:
it is not a candidate, nor is one whose estimated downtime is over ``policy.max_downtime_ms``.
A process of a job with an allocation (``Inventory.allocations``, from a scheduler) moves only
to a host of that allocation unless ``policy.any_host_for_jobs``. Each process moves at most
once (with its tree: a candidate whose pids overlap a moving one is
left), and include/exclude rules (user, job, cgroup, command; shell patterns) select what may
move. Every candidate that does not move keeps its reason.

The executor (``migrate.rebalance``) runs at most ``policy.max_per_host`` migrations at a time
on any host (as source or destination); moves sharing a source's link share its bandwidth (or
``policy.bandwidth_budget``), and the plan's times are estimated with that schedule.
"""
from __future__ import annotations

import heapq
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.measure import Rule, selection
from migrate.api import FREEZE_OVERHEAD_MS, MigrationOptions
from migrate.inventory import Candidate, HostLoad, Inventory
from precopy.policy import PrecopyPolicy, estimate
from transport.frozen import frozen

MiB = 1 << 20
DEST_TRIES = 16       # least loaded hosts looked at for each move


@frozen
class Policy:
    max_load: float = 0.9               # load per CPU above which a host sheds processes
    max_memory: float = 0.9             # fraction of memory in use above which it does
    max_per_host: int = 2               # migrations at a time on a host (as source or destination)
    max_moves: int | None = None        # moves per plan at most
    bandwidth_budget: float | None = None   # bytes/s the plan may use on any one link
    downtime_target_ms: float = MigrationOptions().downtime_target_ms
    max_downtime_ms: float = 2000.0     # a move estimated to freeze longer is not made
    any_host_for_jobs: bool = False     # let a job's processes leave its allocation (``Inventory.allocations``)
    include: tuple[Rule, ...] = ()      # if any: only processes matching one of them move (``agent.measure.Rule``)
    exclude: tuple[Rule, ...] = ()      # processes matching any of them never move

    def __post_init__(self) -> None:
        if not self.max_load > 0 or not 0 < self.max_memory <= 1:
            raise ValueError("max_load must be > 0 and max_memory within (0, 1]")
        if self.max_per_host < 1:
            raise ValueError("max_per_host must be >= 1")
        if self.max_moves is not None and self.max_moves < 0:
            raise ValueError("max_moves must be >= 0")
        if self.bandwidth_budget is not None and not self.bandwidth_budget > 0:
            raise ValueError("the bandwidth budget must be > 0")
        if not self.max_downtime_ms > 0:
            raise ValueError("max_downtime_ms must be > 0")

    def precopy(self) -> PrecopyPolicy:
        """The pre-copy policy the moves will run with (``MigrationOptions``' defaults)."""
        return MigrationOptions(downtime_target_ms=self.downtime_target_ms).policy()

    def selected(self, c: Candidate) -> str:
        """"" if the rules let ``c`` move, else why not."""
        return selection(self.include, self.exclude, uid=c.uid, job_id=c.job_id, cgroup=c.cgroup, pid=c.pid,
                         comm=c.comm, cmdline=c.cmdline)


@frozen
class Cost:
    bandwidth: float            # bytes/s the move was estimated at
    downtime_ms: float
    total_s: float
    bytes: int                  # page bytes it sends, all rounds
    rounds: int
    stop_reason: str


def move_cost(c: Candidate, bandwidth: float, policy: PrecopyPolicy) -> Cost:
    """A migration's cost from the convergence model (see the module's docstring)."""
    rate = max(0.0, c.dirty_rate)
    memory = max(c.memory_bytes, 4096)
    est = estimate(policy, memory_bytes=memory, dirty_rate_bytes_s=rate, bandwidth_bytes_s=bandwidth)
    sent = est.bytes_sent + est.final_bytes
    return Cost(bandwidth, est.downtime_ms, sent / bandwidth + FREEZE_OVERHEAD_MS / 1000, sent, est.rounds,
                str(est.stop_reason))


@frozen
class Move:
    pid: int
    source: str
    dest: str
    comm: str
    memory_bytes: int
    cpu: float
    dirty_rate: float
    est_downtime_ms: float
    est_time_s: float
    est_bytes: int
    est_start_s: float          # after the plan starts, by the schedule
    bandwidth: float            # bytes/s per the schedule (its share of the link)
    why: str
    tree: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.pid}@{self.source}"


@frozen
class Rejected:
    pid: int
    host: str
    comm: str
    reason: str

    @property
    def key(self) -> str:
        return f"{self.pid}@{self.host}"


@frozen
class HostSummary:
    name: str
    state: str
    load_per_cpu: float
    memory_fraction: float
    load_per_cpu_after: float
    memory_fraction_after: float
    over_before: bool
    over_after: bool


@frozen
class Plan:
    moves: tuple[Move, ...]
    rejected: tuple[Rejected, ...]
    hosts: tuple[HostSummary, ...]
    policy: Policy
    est_total_s: float = 0.0
    notes: tuple[str, ...] = ()     # hosts still over a threshold, and why

    @property
    def bytes_to_move(self) -> int:
        return sum(m.memory_bytes for m in self.moves)

    def imbalance(self, after: bool = False) -> float:
        """Spread of load per CPU over the usable hosts: max - min."""
        values = [h.load_per_cpu_after if after else h.load_per_cpu for h in self.hosts if h.state == "up"]
        return max(values) - min(values) if values else 0.0

    def as_dict(self) -> dict[str, Any]:
        policy = asdict(self.policy)
        policy["include"] = [str(r) for r in self.policy.include]
        policy["exclude"] = [str(r) for r in self.policy.exclude]
        return {"moves": [{**asdict(m), "tree": list(m.tree)} for m in self.moves],
                "rejected": [asdict(r) for r in self.rejected],
                "hosts": [asdict(h) for h in self.hosts], "policy": policy,
                "est_total_s": self.est_total_s, "bytes_to_move": self.bytes_to_move,
                "imbalance_before": self.imbalance(), "imbalance_after": self.imbalance(True),
                "notes": list(self.notes)}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def table(self) -> str:
        """The plan as a person reads it: the moves, then what stays and why."""
        lines = []
        if self.moves:
            rows = [("PROCESS", "FROM", "TO", "MEMORY", "DOWNTIME", "TIME", "WHY")]
            for m in self.moves:
                rows.append((f"{m.pid} ({m.comm})", m.source, m.dest, f"{m.memory_bytes / MiB:.0f} MiB",
                             f"~{m.est_downtime_ms:.0f} ms", f"~{m.est_time_s:.1f} s", m.why))
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
            lines += ["  ".join(v.ljust(w) for v, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
            lines.append(f"{len(self.moves)} move(s), {self.bytes_to_move / MiB:.0f} MiB, about "
                         f"{self.est_total_s:.1f} s; load per CPU spread {self.imbalance():.2f} -> "
                         f"{self.imbalance(True):.2f}")
        else:
            lines.append("no moves: " + ("; ".join(self.notes) if self.notes else "every host is under its thresholds"))
        if self.rejected:
            lines.append("")
            lines.append("not moved:")
            lines += [f"  {r.pid} ({r.comm}) on {r.host}: {r.reason}" for r in self.rejected]
        if self.moves and self.notes:
            lines += ["", *self.notes]
        return "\n".join(lines)


# --- planning ------------------------------------------------------------------------------

@dataclass
class _HostState:
    load: HostLoad
    load_now: float                     # CPUs busy as the plan goes
    free_now: int
    moves: int = 0
    taken: set[int] = field(default_factory=set)      # pids that move away

    @property
    def per_cpu(self) -> float:
        return self.load_now / self.load.cpus

    @property
    def mem_fraction(self) -> float:
        total = self.load.memory_bytes
        return 1.0 - self.free_now / total if total else 0.0


def _excess(h: _HostState, policy: Policy, cpu: float = 0.0, mem: int = 0) -> float:
    """How far ``h`` is over its thresholds, were ``cpu`` CPUs and ``mem`` bytes gone."""
    per_cpu = (h.load_now - cpu) / h.load.cpus
    total = h.load.memory_bytes
    frac = 1.0 - (h.free_now + mem) / total if total else 0.0
    return max(0.0, per_cpu - policy.max_load) + max(0.0, frac - policy.max_memory)


def _fits(d: _HostState, c: Candidate, policy: Policy) -> bool:
    total = d.load.memory_bytes
    return (d.load_now + c.cpu) / d.load.cpus <= policy.max_load and c.memory_bytes <= d.free_now and \
        (not total or 1.0 - (d.free_now - c.memory_bytes) / total <= policy.max_memory)


def _path_price(helps: list[tuple[float, float, float]], excess: float) -> float:
    """What clearing ``excess`` costs taking moves by gain per price, best first (their gains
    taken as adding up); infinite if they cannot clear it."""
    gained = price = 0.0
    for _, gain, cost in sorted(helps, reverse=True):
        gained += gain
        price += cost
        if gained >= excess - 1e-12:
            return price
    return float("inf")


def plan(inventory: Inventory, policy: Policy | None = None) -> Plan:
    """The moves that bring every host under the policy's thresholds (see the module's docstring)."""
    p = policy or Policy()
    pre = p.precopy()
    states = {h.name: _HostState(h, h.load, h.memory_free) for h in inventory.hosts}
    usable = [s for s in states.values() if s.load.host.usable]
    heap = [(s.per_cpu, s.load.name) for s in usable]
    heapq.heapify(heap)
    rejected: dict[str, Rejected] = {}
    moves: list[tuple[Candidate, str, Cost, str]] = []
    notes: list[str] = []

    def reject(c: Candidate, reason: str) -> None:
        rejected.setdefault(c.key, Rejected(c.pid, c.host, c.comm, reason))

    def least_loaded(source: str) -> list[_HostState]:
        """Up to DEST_TRIES usable hosts, least loaded per CPU first (not ``source``), and the
        usable hosts of the source's job allocations (few: a job's nodes)."""
        out: list[_HostState] = [states[h] for hosts in jobs_on.get(source, ()) for h in sorted(hosts)
                                 if h != source and h in states and states[h].load.host.usable]
        popped = []
        while heap and len(out) < DEST_TRIES:
            per_cpu, name = heapq.heappop(heap)
            s = states[name]
            if abs(per_cpu - s.per_cpu) > 1e-12:
                continue          # stale: pushed again when it changed
            popped.append((per_cpu, name))
            if name != source and all(o is not s for o in out):
                out.append(s)
        for item in popped:
            heapq.heappush(heap, item)
        return sorted(out, key=lambda s: s.per_cpu)

    jobs_on: dict[str, list[frozenset[str]]] = {}       # host -> allocations of the jobs it runs
    if not p.any_host_for_jobs:
        for c in inventory.candidates():
            if c.job_id in inventory.allocations:
                jobs_on.setdefault(c.host, []).append(inventory.allocations[c.job_id])

    # Candidates that may move at all, whatever the host.
    eligible: dict[str, list[tuple[Candidate, Cost]]] = {}
    for c in inventory.candidates():
        src = states.get(c.host)
        if src is None:
            continue
        if not c.movable:
            reject(c, c.reason or "it cannot move")
            continue
        why = p.selected(c)
        if why:
            reject(c, why)
            continue
        bw = inventory.link_bandwidth(c.host, "")
        if p.bandwidth_budget:
            bw = min(bw, p.bandwidth_budget)
        if c.dirty_rate >= bw:
            reject(c, f"it writes {c.dirty_rate / MiB:.0f} MiB/s, as fast as the link carries "
                      f"({bw / MiB:.0f} MiB/s) or faster: a live migration would never converge")
            continue
        cost = move_cost(c, bw, pre)
        if cost.downtime_ms > p.max_downtime_ms:
            reject(c, f"its estimated downtime, {cost.downtime_ms:.0f} ms ({cost.stop_reason}), is over "
                      f"{p.max_downtime_ms:.0f} ms")
            continue
        eligible.setdefault(c.host, []).append((c, cost))

    no_help: set[str] = set()        # candidates whose move would not bring their host closer
    over_before = {name for name, s in states.items() if _excess(s, p) > 0}
    order = sorted((states[n] for n in over_before), key=lambda s: -_excess(s, p))
    for src in order:
        pool = sorted(eligible.get(src.load.name, []), key=lambda cc: cc[0].pid)
        while _excess(src, p) > 0:
            if p.max_moves is not None and len(moves) >= p.max_moves:
                notes.append(f"{src.load.name} is still over its thresholds: the plan is limited to "
                             f"{p.max_moves} move(s)")
                break
            dests = least_loaded(src.load.name)
            excess = _excess(src, p)
            best: tuple[float, Candidate, Cost, _HostState] | None = None
            clears: tuple[float, Candidate, Cost, _HostState] | None = None    # the cheapest that alone suffices
            helps: list[tuple[float, float, float]] = []     # (gain per price, gain, price)
            for c, cost in pool:
                if c.key in rejected or any(q in src.taken for q in c.pids):
                    continue
                gain = excess - _excess(src, p, c.cpu, c.memory_bytes)
                if gain <= 0:
                    no_help.add(c.key)
                    continue
                no_help.discard(c.key)
                allowed = None if p.any_host_for_jobs else inventory.allocations.get(c.job_id)
                dest = next((d for d in dests if _fits(d, c, p) and (allowed is None or d.load.name in allowed)),
                            None)
                if dest is None:
                    continue
                price = cost.total_s + cost.downtime_ms / 1000
                helps.append((gain / price, gain, price))
                if best is None or gain / price > best[0]:
                    best = (gain / price, c, cost, dest)
                if gain >= excess - 1e-12 and (clears is None or price < clears[0]):
                    clears = (price, c, cost, dest)
            # One move that clears the excess beats the best ratio if going by ratio (the best
            # first, and so on) would cost more to clear it, or could not.
            if best is not None and clears is not None and clears[0] <= _path_price(helps, excess):
                best = clears
            if best is None:
                notes.append(f"{src.load.name} is still over its thresholds (load per CPU {src.per_cpu:.2f}, "
                             f"memory {src.mem_fraction:.0%}): no process that may move fits on a usable host "
                             "under the thresholds")
                break
            _, c, cost, dest = best
            why = (f"{src.load.name} load/CPU {src.per_cpu:.2f}, mem {src.mem_fraction:.0%} over "
                   f"{p.max_load:g}/{p.max_memory:.0%}; {dest.load.name} {dest.per_cpu:.2f} -> "
                   f"{(dest.load_now + c.cpu) / dest.load.cpus:.2f}")
            src.load_now = max(0.0, src.load_now - c.cpu)
            src.free_now += c.memory_bytes
            src.taken.update(c.pids)
            dest.load_now += c.cpu
            dest.free_now -= c.memory_bytes
            for s in (src, dest):
                if s.load.host.usable:
                    heapq.heappush(heap, (s.per_cpu, s.load.name))
            moves.append((c, dest.load.name, cost, why))
    moving = {c.key for c, _, _, _ in moves}
    for c in inventory.candidates():
        if c.key in moving or c.key in rejected:
            continue
        src = states.get(c.host)
        if src is not None and any(q in src.taken for q in c.pids):
            reject(c, "its processes move with another candidate's tree")
        elif src is not None and _excess(src, p) == 0 and c.host in over_before:
            reject(c, f"not needed: {c.host} is under its thresholds with the moves above")
        elif src is not None and c.host not in over_before:
            reject(c, f"{c.host} is under its thresholds")
        elif c.key in no_help:
            reject(c, f"moving it would not bring {c.host} closer to its thresholds")
        else:
            reject(c, "no usable host has room for it under the thresholds")
    scheduled, total = _schedule(moves, inventory, p, pre)
    summaries = tuple(HostSummary(s.load.name, s.load.host.state, s.load.load_per_cpu, s.load.memory_fraction,
                                  s.per_cpu, s.mem_fraction, s.load.name in over_before, _excess(s, p) > 0)
                      for s in states.values())
    return Plan(tuple(scheduled), tuple(rejected.values()), summaries, p, total, tuple(notes))


def _schedule(moves: list[tuple[Candidate, str, Cost, str]], inventory: Inventory, p: Policy,
              pre: PrecopyPolicy) -> tuple[list[Move], float]:
    """Start times with at most ``max_per_host`` moves at a time on any host; moves leaving one
    host at once share its link (re-estimated at their share)."""
    from_host: dict[str, int] = {}
    for c, _, _, _ in moves:
        from_host[c.host] = from_host.get(c.host, 0) + 1
    busy: dict[str, list[float]] = {}       # host -> end times of its running moves
    out: list[Move] = []
    total = 0.0
    for c, dest, cost, why in moves:
        sharing = min(p.max_per_host, from_host[c.host])
        bw = cost.bandwidth / sharing
        shared = move_cost(c, bw, pre) if sharing > 1 else cost
        start = 0.0
        for h in (c.host, dest):
            ends = sorted(busy.get(h, []))
            if len(ends) >= p.max_per_host:
                start = max(start, ends[len(ends) - p.max_per_host])
        end = start + shared.total_s
        for h in (c.host, dest):
            busy.setdefault(h, []).append(end)
        total = max(total, end)
        out.append(Move(c.pid, c.host, dest, c.comm, c.memory_bytes, c.cpu, c.dirty_rate, shared.downtime_ms,
                        shared.total_s, shared.bytes, start, bw, why, c.pids))
    return out, total
