"""`kcr-migrate rebalance --hosts FILE | --slurm PARTITION | --slurm-job JOBID`: measure the
hosts, plan moves, carry them out."""
from __future__ import annotations

import argparse
import json
import pwd
import re
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from migrate.cli import (EXIT_ERROR, EXIT_INTERRUPTED, EXIT_UNSETTLED, TRACKERS, command, deferred_signals, error,
                         exit_status, positive_float, rate, watch_signals)
from transport.errors import Cancelled, MigrationError

if TYPE_CHECKING:
    from migrate.inventory import Inventory
    from agent.measure import Rule
    from migrate.planner import Plan
    from migrate.rebalance import RebalanceEvent

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*(s|m|h|d)?\s*$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def duration(text: str) -> float:
    """``--every``: 90, 90s, 10m, 2h, 1d."""
    m = _DURATION.match(text)
    if not m or not float(m.group(1)) > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 30s, 10m, 2h)")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def fraction(text: str) -> float:
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction (e.g. 0.9 or 90%)") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be within (0, 1] (or 1%..100%)")
    return value


def count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count >= 1")
    return int(text)


def rule(text: str) -> "Rule":
    """``--include``/``--exclude KIND=PATTERN``; a user name becomes its uid here."""
    from agent.measure import Rule
    try:
        r = Rule.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if r.kind == "user" and not r.pattern.isdigit() and not any(ch in r.pattern for ch in "*?["):
        try:
            r = Rule("user", str(pwd.getpwnam(r.pattern).pw_uid))
        except KeyError:
            raise argparse.ArgumentTypeError(f"{text!r}: no user {r.pattern!r} here (give a uid)") from None
    return r


def job_id(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 1 << 32:
        raise argparse.ArgumentTypeError(f"{text!r} is not a Slurm job id (the number sbatch printed)")
    return int(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--hosts", metavar="FILE",
                       help="the hosts: one a line, NAME [cpus=N] [mem=SIZE] [state=up|drained|down] [label=A,B]")
    where.add_argument("--slurm", metavar="PARTITION",
                       help="the nodes of a Slurm partition; candidates: its running jobs' workloads "
                            "(Slurm's config: $SLURM_CONF, else /etc/slurm/slurm.conf)")
    where.add_argument("--slurm-job", type=job_id, metavar="JOBID",
                       help="the nodes of a running Slurm job; candidates: its workload")
    p.add_argument("--any-node", action="store_true",
                   help="with Slurm: a job's processes may go to any node of its partition, not only its own")
    p.add_argument("--dry-run", action="store_true", help="measure and print the plan; move nothing")
    p.add_argument("--json", action="store_true", help="print the inventory, plan and report as one JSON object")
    p.add_argument("--max-load", type=positive_float, default=0.9, metavar="X",
                   help="load per CPU above which a host sheds processes (default 0.9)")
    p.add_argument("--max-mem", type=fraction, default=0.9, metavar="F",
                   help="fraction of memory in use above which a host sheds processes (default 0.9)")
    p.add_argument("--max-per-host", type=count, default=2, metavar="N",
                   help="migrations at a time on any host, as source or destination (default 2)")
    p.add_argument("--max-moves", type=count, metavar="N", help="moves per run at most")
    p.add_argument("--include", type=rule, action="append", default=[], metavar="KIND=PATTERN",
                   help="only processes matching: user=NAME|UID, job=ID, cgroup=PATH, command=NAME, pid=PID "
                        "(shell patterns); repeatable")
    p.add_argument("--exclude", type=rule, action="append", default=[], metavar="KIND=PATTERN",
                   help="never processes matching (as --include); repeatable")
    p.add_argument("--every", type=duration, metavar="DURATION",
                   help="run again every DURATION (30s, 10m, 2h), re-measuring, until interrupted")
    p.add_argument("--on-failure", choices=("continue", "stop"), default="continue",
                   help="after a failed move (rolled back): go on with the plan (default) or start no more")
    p.add_argument("--bandwidth", type=rate, metavar="RATE",
                   help="link bandwidth for cost estimates (default: measured between the hosts)")
    p.add_argument("--budget", type=rate, metavar="RATE",
                   help="bandwidth the plan may use on any one link (moves are limited to their share)")
    p.add_argument("--downtime", type=positive_float, default=30.0, metavar="MS",
                   help="the moves' downtime target (default 30)")
    p.add_argument("--max-downtime", type=positive_float, default=2000.0, metavar="MS",
                   help="do not move a process estimated to freeze longer (default 2000)")
    p.add_argument("--sample", type=positive_float, default=2.0, metavar="S",
                   help="seconds over which CPU shares are measured (default 2)")
    p.add_argument("--min-cpu", type=positive_float, default=0.05, metavar="CPUS",
                   help="processes using less CPU are not candidates (default 0.05)")
    p.add_argument("--tracker", default="auto", choices=TRACKERS, metavar="TRACKER",
                   help="dirty-page tracking: %(choices)s (default: the best)")
    p.add_argument("--ssh-config", metavar="FILE", help="ssh config to use (as ssh -F FILE)")
    p.add_argument("--new-pid", action="store_true",
                   help="moved processes run under new pids (needed where hosts share pids)")
    p.add_argument("--no-stand-in", action="store_true",
                   help="end a moved process's pid at home, even where its parent stays there (by default a "
                        "stand-in keeps it, as kcr-migrate --stand-in-auto does: a batch shell or slurmstepd "
                        "then sees the moved process's real exit status)")
    p.add_argument("--stand-in-lost", default="exit", metavar="kill|exit:N",
                   help="when a stand-in and its moved process lose each other (as for kcr-migrate)")


def _print_event(ev: "RebalanceEvent") -> None:
    from migrate.rebalance import MoveDone, MoveStarted
    if isinstance(ev, MoveStarted):
        print(f"moving {ev.move.pid} ({ev.move.comm}) from {ev.move.source} to {ev.move.dest} ...", file=sys.stderr)
    elif isinstance(ev, MoveDone):
        r = ev.result
        if r["state"] == "done":
            print(f"moved {r['pid']}@{r['source']} to {r['dest']} (now pid {r['new_pid']}): downtime "
                  f"{r['downtime_ms']:.1f} ms, {r['total_ms'] / 1000:.2f} s, {r['bytes_on_wire'] / 2**20:.1f} MiB "
                  "on the wire", file=sys.stderr)
        else:
            print(f"kcr-migrate: warning: {r['pid']}@{r['source']} -> {r['dest']}: {r['state']}: {r['message']}",
                  file=sys.stderr)


async def _once(args: argparse.Namespace, hosts: list[Any] | None) -> tuple["Inventory", "Plan", Any]:
    """Measure, plan, move. A signal while measuring or planning stops it (nothing moved); one
    during the moves cancels them (``Rebalance.cancel``: each rolled back, or finished if past
    its point of no return)."""
    import trio

    from transport._nursery import service_nursery
    moves: list[Any] = []
    with trio.CancelScope() as measuring:
        async with service_nursery() as nursery:
            await nursery.start(watch_signals, lambda: moves[0].cancel() if moves else measuring.cancel())
            try:
                return await _measure_and_move(args, hosts, moves)
            finally:
                nursery.cancel_scope.cancel()
    raise Cancelled("interrupted while measuring the hosts: nothing was moved")


async def _measure_and_move(args: argparse.Namespace, hosts: list[Any] | None,
                            moves: list[Any]) -> tuple["Inventory", "Plan", Any]:
    from migrate.api import MigrationOptions
    from migrate.inventory import MeasureOptions, measure, slurm_inventory, with_jobs
    from migrate.planner import Policy, plan
    from migrate.rebalance import Rebalance, RebalanceOptions
    try:
        mo = MeasureOptions(sample_s=args.sample, min_cpu=args.min_cpu, tracker=args.tracker,
                            bandwidth=args.bandwidth, ssh_config=args.ssh_config, include=tuple(args.include),
                            exclude=tuple(args.exclude))
        slurm = None
        if hosts is None:
            from migrate.slurm import Slurm
            slurm = await slurm_inventory(Slurm(ssh_config=args.ssh_config), partition=args.slurm,
                                          job_id=args.slurm_job, any_node=args.any_node)
            hosts = list(slurm.hosts)
            mo = replace(mo, pids=slurm.pids, only_named=True)
        policy = Policy(max_load=args.max_load, max_memory=args.max_mem, max_per_host=args.max_per_host,
                        max_moves=args.max_moves, bandwidth_budget=args.budget, downtime_target_ms=args.downtime,
                        max_downtime_ms=args.max_downtime, include=tuple(args.include), exclude=tuple(args.exclude),
                        any_host_for_jobs=args.any_node)
        migration = MigrationOptions(downtime_target_ms=args.downtime, tracker=args.tracker,
                                     ssh_config=args.ssh_config, new_pid=args.new_pid,
                                     stand_in=False if args.no_stand_in else "auto",
                                     stand_in_lost=args.stand_in_lost)
    except ValueError as exc:
        raise MigrationError(str(exc)) from None
    inventory = await measure(hosts, mo)
    if slurm is not None:
        inventory = with_jobs(inventory, slurm.jobs, slurm.allocations)
    the_plan = plan(inventory, policy)
    if args.dry_run or not the_plan.moves:
        return inventory, the_plan, None
    if not args.json:
        print(the_plan.table(), flush=True)
    run = Rebalance(the_plan, RebalanceOptions(migration, args.on_failure), on_event=_print_event)
    moves.append(run)
    return inventory, the_plan, await run.run()


def _show(args: argparse.Namespace, inventory: "Inventory", the_plan: "Plan", report: Any) -> int:
    if args.json:
        print(json.dumps({"inventory": inventory.as_dict(), "plan": the_plan.as_dict(),
                          "report": report.as_dict() if report is not None else None}), flush=True)
    elif report is None:
        print(the_plan.table(), flush=True)
    if report is None:
        return 0
    failed = report.failed
    print(f"rebalance: {len(report.moved)} of {len(report.moves)} move(s) done in {report.total_s:.1f} s"
          + (f"; {report.stopped}" if report.stopped else ""), file=sys.stderr)
    if failed:
        error(f"{len(failed)} move(s) failed (each process runs on where it was, but for any said unsettled): "
              + "; ".join(f"{m['pid']}@{m['source']}: {m['message']}" for m in failed))
    if any(m["state"] == "unsettled" for m in failed):
        return EXIT_UNSETTLED
    if report.stopped == "interrupted":
        error("interrupted: the moves under way were rolled back" + (", those done before stay done"
                                                                     if report.moved else ""))
        return EXIT_INTERRUPTED
    return EXIT_ERROR if failed else 0


@command("rebalance", "measure hosts and move processes off those over a load or memory threshold", add_arguments)
def run(args: argparse.Namespace) -> int:
    import time

    import trio

    from migrate.inventory import read_hosts_file

    hosts = read_hosts_file(args.hosts) if args.hosts else None     # Slurm is asked on every run
    if args.every is None:
        with deferred_signals():
            outcome = trio.run(_once, args, hosts)
        return _show(args, *outcome)
    while True:
        started = time.monotonic()
        try:
            with deferred_signals():
                outcome = trio.run(_once, args, hosts)
            status = _show(args, *outcome)
        except MigrationError as exc:
            error(str(exc))
            status = exit_status(exc)
        if status == EXIT_INTERRUPTED:
            return status
        print(f"rebalance: next run in {args.every:g} s (exit status of this one: {status})", file=sys.stderr)
        try:
            time.sleep(max(0.0, started + args.every - time.monotonic()))
        except KeyboardInterrupt:      # between runs: nothing under way
            error("interrupted between runs: no move was under way")
            return EXIT_INTERRUPTED
