"""The planner on synthetic inventories: thresholds, benefit per cost, every constraint, and the
reasons it gives for what stays. No processes, no hosts: ``plan`` is a pure function."""
from __future__ import annotations

import json

import pytest

from migrate import Candidate, Host, HostLoad, Inventory, Policy, Rule, plan
from migrate.planner import move_cost

MiB = 1 << 20
GiB = 1 << 30


def host(name: str, load: float, *, cpus: int = 4, mem: int = 16 * GiB, free: int | None = None,
         state: str = "up", procs: tuple[Candidate, ...] = ()) -> HostLoad:
    return HostLoad(Host(name, state=state), cpus, load, mem, mem // 2 if free is None else free, procs)


def proc(h: str, pid: int, cpu: float, mem_mib: int = 100, dirty_mib_s: float = 1.0, **kw: object) -> Candidate:
    return Candidate(h, pid, kw.pop("comm", f"job{pid}"), cpu, mem_mib * MiB, dirty_mib_s * MiB, **kw)  # type: ignore[arg-type]


def inv(*hosts: HostLoad, bandwidth: float = 100 * MiB) -> Inventory:
    return Inventory(tuple(hosts), default_bandwidth=bandwidth)


def test_nothing_moves_when_every_host_is_under_the_thresholds() -> None:
    p = plan(inv(host("a", 3.0, procs=(proc("a", 1, 1.0),)), host("b", 0.0)), Policy(max_load=0.9))
    assert p.moves == ()
    assert p.rejected[0].reason == "a is under its thresholds"
    assert "no moves" in p.table()


def test_an_overloaded_host_sheds_to_the_least_loaded_host_until_under_the_threshold() -> None:
    a = host("a", 4.0, procs=(proc("a", 1, 1.0), proc("a", 2, 1.0), proc("a", 3, 1.0), proc("a", 4, 1.0)))
    p = plan(inv(a, host("b", 2.0), host("c", 0.0)), Policy(max_load=0.75))
    assert len(p.moves) == 1, p.table()
    assert p.moves[0].source == "a" and p.moves[0].dest == "c"
    after = {h.name: h for h in p.hosts}
    assert after["a"].over_before and not after["a"].over_after
    assert after["a"].load_per_cpu_after == pytest.approx(0.75)
    assert p.imbalance(after=True) < p.imbalance()
    assert {r.reason for r in p.rejected} == {"not needed: a is under its thresholds with the moves above"}


def test_the_destination_stays_under_the_thresholds() -> None:
    a = host("a", 4.0, procs=(proc("a", 1, 3.0),))
    p = plan(inv(a, host("b", 1.0)), Policy(max_load=0.75))
    assert p.moves == ()       # b would be at 1.0 per CPU
    assert "no usable host has room" in p.rejected[0].reason
    assert "still over" in p.notes[0]


def test_memory_threshold_moves_the_process_that_frees_enough_memory() -> None:
    a = host("a", 0.0, mem=16 * GiB, free=1 * GiB,
             procs=(proc("a", 1, 0.1, mem_mib=3000, dirty_mib_s=0), proc("a", 2, 0.1, mem_mib=200, dirty_mib_s=0)))
    p = plan(inv(a, host("b", 0.0, free=15 * GiB)), Policy(max_memory=0.8))
    assert [m.pid for m in p.moves] == [1]     # 200 MiB would not bring a under 80 %


def test_benefit_per_cost_prefers_the_cheaper_of_two_equal_helps() -> None:
    big = proc("a", 1, 1.0, mem_mib=4000)
    small = proc("a", 2, 1.0, mem_mib=100)
    p = plan(inv(host("a", 4.0, procs=(big, small)), host("b", 0.0)), Policy(max_load=0.8))
    assert [m.pid for m in p.moves] == [2]
    assert p.moves[0].est_time_s < move_cost(big, 100 * MiB, Policy().precopy()).total_s


def test_a_process_writing_faster_than_the_link_is_not_a_candidate() -> None:
    busy = proc("a", 1, 2.0, dirty_mib_s=200)
    calm = proc("a", 2, 1.0, dirty_mib_s=5)
    p = plan(inv(host("a", 4.0, procs=(busy, calm)), host("b", 0.0), bandwidth=100 * MiB), Policy(max_load=0.8))
    assert [m.pid for m in p.moves] == [2]
    (r,) = [r for r in p.rejected if r.pid == 1]
    assert "never converge" in r.reason and "200 MiB/s" in r.reason


def test_a_move_over_the_downtime_limit_is_not_made() -> None:
    heavy = proc("a", 1, 2.0, mem_mib=2000, dirty_mib_s=80)
    p = plan(inv(host("a", 4.0, procs=(heavy,)), host("b", 0.0)), Policy(max_load=0.8, max_downtime_ms=100))
    assert p.moves == ()
    assert "estimated downtime" in p.rejected[0].reason


@pytest.mark.parametrize("state", ["drained", "down"])
def test_drained_and_down_hosts_are_never_destinations(state: str) -> None:
    a = host("a", 4.0, procs=(proc("a", 1, 1.0),))
    p = plan(inv(a, host("b", 0.0, state=state)), Policy(max_load=0.8))
    assert p.moves == ()
    p = plan(inv(a, host("b", 0.0, state=state), host("c", 3.0)), Policy(max_load=0.8))
    assert all(m.dest != "b" for m in p.moves)


def test_a_drained_host_is_still_a_source() -> None:
    d = host("d", 4.0, state="drained", procs=(proc("d", 1, 1.0),))
    p = plan(inv(d, host("b", 0.0)), Policy(max_load=0.8))
    assert [(m.source, m.dest) for m in p.moves] == [("d", "b")]


def test_unmovable_candidates_keep_their_reason() -> None:
    stuck = proc("a", 1, 2.0, movable=False, reason="pid 1 has a socket")
    p = plan(inv(host("a", 4.0, procs=(stuck,)), host("b", 0.0)), Policy(max_load=0.8))
    assert p.moves == () and p.rejected[0].reason == "pid 1 has a socket"


def test_a_process_moves_at_most_once_and_a_tree_moves_whole() -> None:
    parent = proc("a", 10, 1.5, tree=(10, 11))
    child = proc("a", 11, 1.5, tree=(11,))
    p = plan(inv(host("a", 8.0, procs=(parent, child)), host("b", 0.0, cpus=8)), Policy(max_load=0.5))
    assert len(p.moves) == 1
    moved = p.moves[0].pid
    other = ({10, 11} - {moved}).pop()
    (r,) = [r for r in p.rejected if r.pid == other]
    assert "tree" in r.reason
    assert len({m.key for m in p.moves}) == len(p.moves)


def test_include_and_exclude_rules() -> None:
    procs = (proc("a", 1, 1.0, uid=1000, comm="sim"), proc("a", 2, 1.0, uid=0, comm="backup"),
             proc("a", 3, 1.0, uid=1000, comm="sim", job_id="42", cgroup="/slurm/uid_1000/job_42"))
    a = host("a", 4.0, procs=procs)
    p = plan(inv(a, host("b", 0.0), host("c", 0.0)), Policy(max_load=0.5, exclude=(Rule.parse("user=0"),)))
    assert 2 not in {m.pid for m in p.moves}
    assert any(r.pid == 2 and r.reason == "excluded by user=0" for r in p.rejected)
    p = plan(inv(a, host("b", 0.0), host("c", 0.0)), Policy(max_load=0.5, include=(Rule.parse("job=42"),)))
    assert [m.pid for m in p.moves] == [3]
    assert any(r.pid == 1 and r.reason == "matches no --include rule" for r in p.rejected)
    p = plan(inv(a, host("b", 0.0), host("c", 0.0)), Policy(max_load=0.5, include=(Rule.parse("cgroup=/slurm/*"),
                                                                                  Rule.parse("command=back*"))))
    assert {m.pid for m in p.moves} <= {2, 3} and p.moves
    with pytest.raises(ValueError):
        Rule.parse("colour=red")


def test_max_moves_and_max_per_host_schedule() -> None:
    procs = tuple(proc("a", i, 1.0, mem_mib=100, dirty_mib_s=0) for i in range(1, 7))
    hosts = (host("a", 6.0, cpus=6, procs=procs), host("b", 0.0, cpus=6), host("c", 0.0, cpus=6))
    p = plan(inv(*hosts), Policy(max_load=0.5, max_moves=2))
    assert len(p.moves) == 2 and any("limited to 2" in n for n in p.notes)
    one = plan(inv(*hosts), Policy(max_load=0.5, max_per_host=1))
    two = plan(inv(*hosts), Policy(max_load=0.5, max_per_host=2))
    assert len(one.moves) == len(two.moves) == 3
    assert {m.dest for m in one.moves} == {"b", "c"}
    # one at a time from a: each move starts when the one before ends
    starts = [m.est_start_s for m in one.moves]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    # two at a time: they share a's link, each at half its bandwidth
    assert {m.bandwidth for m in two.moves} == {50 * MiB}
    assert sum(1 for m in two.moves if m.est_start_s == 0) == 2


def test_a_bandwidth_budget_slows_the_estimates() -> None:
    hosts = (host("a", 4.0, procs=(proc("a", 1, 2.0, mem_mib=500, dirty_mib_s=0),)), host("b", 0.0))
    fast = plan(inv(*hosts), Policy(max_load=0.8))
    slow = plan(inv(*hosts), Policy(max_load=0.8, bandwidth_budget=10 * MiB))
    assert slow.moves[0].est_time_s > 5 * fast.moves[0].est_time_s
    assert slow.moves[0].bandwidth == 10 * MiB


def test_the_plan_renders_as_a_table_and_as_json() -> None:
    p = plan(inv(host("a", 4.0, procs=(proc("a", 7, 1.0, comm="sim"),)), host("b", 0.0)), Policy(max_load=0.8))
    table = p.table()
    assert table.splitlines()[0].split() == ["PROCESS", "FROM", "TO", "MEMORY", "DOWNTIME", "TIME", "WHY"]
    assert "7 (sim)" in table and " a " in table and " b " in table
    d = json.loads(p.to_json())
    assert d["moves"][0]["pid"] == 7 and d["moves"][0]["dest"] == "b"
    assert d["moves"][0]["est_downtime_ms"] > 0 and d["moves"][0]["est_time_s"] > 0
    assert d["bytes_to_move"] == 100 * MiB
    assert d["imbalance_after"] < d["imbalance_before"]


def test_a_job_moves_only_within_its_allocation() -> None:
    job = proc("a", 1, 2.0, job_id="42", cgroup="/slurm/uid_1000/job_42/step_0")
    hosts = (host("a", 4.0, procs=(job,)), host("b", 0.0), host("c", 1.0))
    inventory = Inventory(hosts, default_bandwidth=100 * MiB, allocations={"42": frozenset({"a", "c"})})
    p = plan(inventory, Policy(max_load=0.8))
    assert [(m.pid, m.dest) for m in p.moves] == [(1, "c")], p.table()     # b is less loaded, but not its node
    p = plan(inventory, Policy(max_load=0.8, any_host_for_jobs=True))
    assert [(m.pid, m.dest) for m in p.moves] == [(1, "b")]
    inventory = Inventory(hosts, default_bandwidth=100 * MiB, allocations={"42": frozenset({"a"})})
    p = plan(inventory, Policy(max_load=0.8))
    assert p.moves == () and "no usable host" in p.rejected[0].reason


def test_a_process_that_would_not_help_is_left_with_that_reason() -> None:
    idle = proc("a", 1, 0.0, mem_mib=10)
    p = plan(inv(host("a", 4.0, procs=(idle,)), host("b", 0.0)), Policy(max_load=0.8))
    assert p.moves == ()
    assert p.rejected[0].reason == "moving it would not bring a closer to its thresholds"
