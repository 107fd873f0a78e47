"""Carrying out a rebalancing ``Plan``: its moves as live migrations, several at once.

``execute(plan, options)`` runs each move with the library's ``Migration``, as many at a time
as the plan's policy allows on any host (``max_per_host``, as source or destination; moves
start in the plan's order as their hosts have room). Their pre-copy rounds overlap, but a host
has one of its moves frozen at a time (``Migration``'s ``frozen_slot``): moves frozen together
shared its CPUs and link and each froze many times longer. A failed move rolls back as every
migration does (the process runs on where it was); then the rest of the plan goes on, or
(``on_failure="stop"``) no further move starts and those running finish. Events say when each
move starts and how it ended; the ``RebalanceReport`` lists what moved (downtime and bytes per
move), what failed or was not started and why, and what the plan refused.

``Rebalance.cancel()`` (Ctrl-C in the CLI) rolls back the moves under way and starts no more.
"""
from __future__ import annotations

import math
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, AsyncIterator, Callable, Literal, Union

import trio

from migrate.api import MigrationOptions
from migrate.orchestrator import Migration
from migrate.planner import Move, Plan
from transport._nursery import service_nursery
from transport.errors import MigrationError
from transport.frozen import frozen

OnFailure = Literal["continue", "stop"]


@frozen
class RebalanceOptions:
    migration: MigrationOptions = field(default_factory=MigrationOptions)   # for every move
    on_failure: OnFailure = "continue"

    def __post_init__(self) -> None:
        if self.on_failure not in ("continue", "stop"):
            raise ValueError("on_failure must be 'continue' or 'stop'")


@frozen
class MoveStarted:
    move: Move


@frozen
class MoveDone:
    """One move ended: ``result`` as in ``RebalanceReport.moves``."""

    move: Move
    result: dict[str, Any]


@frozen
class RebalanceFinished:
    report: "RebalanceReport"


RebalanceEvent = Union[MoveStarted, MoveDone, RebalanceFinished]


@dataclass
class RebalanceReport:
    """``moves``: one entry per move of the plan, in its order, with ``state`` done, rolled-back
    (it failed and was undone: the process runs on its source), failed (in preflight: nothing
    was touched), unsettled (see ``message``), not-started or
    dry-run (a moved one also says when it was frozen: ``frozen_s``, from its first thread
    stopped to its running on the destination, in seconds since the run started); ``rejected``:
    the plan's candidates that were not moved, and why."""

    moves: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    total_s: float = 0.0
    stopped: str = ""                   # why moves were left unstarted, if they were

    @property
    def moved(self) -> list[dict[str, Any]]:
        return [m for m in self.moves if m["state"] == "done"]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [m for m in self.moves if m["state"] in ("rolled-back", "unsettled", "failed")]

    def as_dict(self) -> dict[str, Any]:
        return {"moves": self.moves, "rejected": self.rejected, "total_s": self.total_s, "stopped": self.stopped,
                "moved": len(self.moved), "failed": len(self.failed)}


def _result(move: Move, state: str, report: Any = None, message: str = "", t0: float = 0.0) -> dict[str, Any]:
    out: dict[str, Any] = {"pid": move.pid, "source": move.source, "dest": move.dest, "comm": move.comm,
                           "state": state, "message": message, "est_downtime_ms": move.est_downtime_ms,
                           "est_time_s": move.est_time_s}
    if report is not None:
        out.update(new_pid=report.new_pid, downtime_ms=report.downtime_ms, total_ms=report.total_ms,
                   bytes_raw=report.bytes_raw, bytes_on_wire=report.bytes_on_wire, memory_bytes=report.memory_bytes,
                   rounds=report.rounds, stop_reason=report.stop_reason, warnings=list(report.warnings),
                   stand_in=dict(report.stand_in))
        out["message"] = message or report.message
        if report.running_at:
            out["frozen_s"] = [round(report.frozen_at - t0, 6), round(report.running_at - t0, 6)]
    return out


class Rebalance:
    """One run of a plan; ``await run()`` returns the report."""

    def __init__(self, plan: Plan, options: RebalanceOptions | None = None, *,
                 on_event: Callable[[RebalanceEvent], None] | None = None) -> None:
        self.plan = plan
        self.options = options or RebalanceOptions()
        self.report = RebalanceReport(rejected=[asdict(r) for r in plan.rejected])
        self._on_event = on_event
        self._running: dict[int, Migration] = {}
        self._stop = ""
        self._send, self._receive = trio.open_memory_channel[RebalanceEvent](math.inf)
        self._frozen: dict[str, trio.Semaphore] = {}     # host -> its one frozen move at a time
        self._t0 = 0.0

    def cancel(self) -> None:
        """Roll back the moves under way and start no more."""
        self._stop = self._stop or "interrupted"
        for m in list(self._running.values()):
            m.cancel()

    async def events(self) -> AsyncIterator[RebalanceEvent]:
        async with self._receive:
            async for ev in self._receive:
                yield ev
                if isinstance(ev, RebalanceFinished):
                    return

    def _emit(self, ev: RebalanceEvent) -> None:
        try:
            self._send.send_nowait(ev)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        if self._on_event is not None:
            self._on_event(ev)

    def _options(self, move: Move) -> MigrationOptions:
        o = self.options.migration
        budget = self.plan.policy.bandwidth_budget
        if budget is not None:
            limit = move.bandwidth if o.bandwidth_limit is None else min(o.bandwidth_limit, move.bandwidth)
            o = replace(o, bandwidth_limit=limit)
        return o

    @asynccontextmanager
    async def _frozen_on(self, move: Move) -> AsyncIterator[None]:
        """While ``move``'s process is frozen: its two hosts' frozen slots (in name order, so
        two moves never hold one each and wait for the other)."""
        hosts = sorted({move.source, move.dest})
        taken: list[trio.Semaphore] = []
        try:
            for h in hosts:
                slot = self._frozen.setdefault(h, trio.Semaphore(1))
                await slot.acquire()
                taken.append(slot)
            yield
        finally:
            for slot in taken:
                slot.release()

    async def run(self) -> RebalanceReport:
        t0 = self._t0 = time.monotonic()
        results: list[dict[str, Any] | None] = [None] * len(self.plan.moves)
        limit = self.plan.policy.max_per_host
        slots: dict[str, trio.Semaphore] = {}
        for m in self.plan.moves:
            for h in (m.source, m.dest):
                slots.setdefault(h, trio.Semaphore(limit))
        try:
            async with service_nursery() as nursery:
                for i, move in enumerate(self.plan.moves):
                    # in the plan's order: a move waits for room on both its hosts (taken in
                    # name order, so two moves never hold one each and wait for the other)
                    for h in sorted({move.source, move.dest}):
                        await slots[h].acquire()
                    if self._stop:
                        for h in {move.source, move.dest}:
                            slots[h].release()
                        break
                    nursery.start_soon(self._one, i, move, results, slots)
        finally:
            for i, move in enumerate(self.plan.moves):
                if results[i] is None:
                    results[i] = _result(move, "not-started", message=self._stop and f"not started: {self._stop}")
            self.report.moves = [r for r in results if r is not None]
            self.report.stopped = self._stop
            self.report.total_s = time.monotonic() - t0
            self._emit(RebalanceFinished(self.report))
            self._send.close()
        return self.report

    async def _one(self, i: int, move: Move, results: list[dict[str, Any] | None],
                   slots: dict[str, trio.Semaphore]) -> None:
        try:
            self._emit(MoveStarted(move))
            migration = Migration(move.pid, move.source, move.dest, self._options(move),
                                  frozen_slot=lambda: self._frozen_on(move))
            self._running[i] = migration
            try:
                report = await migration.run()
                results[i] = _result(move, report.state, report, t0=self._t0)
            except MigrationError as exc:
                state = migration.report.state
                results[i] = _result(move, {"preflight": "failed", "done": "rolled-back"}.get(state, state),
                                     migration.report, message=str(exc))
                if self.options.on_failure == "stop" and not self._stop:
                    self._stop = f"the move of {move.key} failed and --on-failure is stop"
            finally:
                self._running.pop(i, None)
            result = results[i]
            assert result is not None
            self._emit(MoveDone(move, result))
        finally:
            for h in {move.source, move.dest}:
                slots[h].release()


async def execute(plan: Plan, options: RebalanceOptions | None = None, *,
                  on_event: Callable[[RebalanceEvent], None] | None = None) -> RebalanceReport:
    """Carry out ``plan`` (see the module's docstring); the report, whatever failed."""
    return await Rebalance(plan, options, on_event=on_event).run()
