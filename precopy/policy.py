"""When to stop pre-copying: the thresholds as data, the decision as a pure function.

Round 0 sends every populated page; each later round sends what was written meanwhile. After
each scan, ``decide`` looks at the rounds sent so far and the dirty set just found and says
whether to stop iterating (freeze and send the rest) and why:

- ``converged``: the remaining bytes can be sent within the downtime target at the measured
  bandwidth (QEMU's rule);
- ``few-pages``: fewer than ``min_pages`` dirty pages remain (P.Haul);
- ``dirty-growing``: the dirty set grew by more than ``growth_limit`` since the previous round:
  the process writes faster than we send (P.Haul's growth check);
- ``max-rounds`` and ``max-bytes``: the caps on rounds and on total bytes sent.

No I/O and no clock here: the loop (``precopy.rounds``) measures, this module decides, and
``estimate`` replays the same decision on a model for ``kcr-migrate wss``.
"""
from __future__ import annotations

import enum
from dataclasses import asdict
from typing import Sequence

from transport.frozen import frozen
from transport.schema import PAGE_SIZE

MiB = 1 << 20


class StopReason(enum.Enum):
    CONVERGED = "converged"
    FEW_PAGES = "few-pages"
    DIRTY_GROWING = "dirty-growing"
    MAX_ROUNDS = "max-rounds"
    MAX_BYTES = "max-bytes"

    def __str__(self) -> str:
        return self.value


@frozen
class PrecopyPolicy:
    downtime_target_ms: float = 300.0      # QEMU's default downtime-limit
    min_pages: int = 64                     # P.Haul: stop below this many dirty pages
    growth_limit: float = 0.10              # P.Haul: stop if the dirty set grows by more than 10%
    max_rounds: int = 10                    # rounds sent, round 0 included
    max_bytes_factor: float = 3.0           # cap on bytes sent, times the process's memory
    max_bytes: int | None = None            # absolute cap, overrides the factor
    bandwidth_bytes_s: float | None = None  # fixed bandwidth; None: measured by the loop
    # What a freeze costs besides sending the last pages (stopping threads, collecting and
    # restoring the state, letting it run): it comes out of the downtime budget, and so does
    # the last scan, which is repeated while frozen.
    freeze_overhead_ms: float = 0.0
    # Once converged, send that last dirty set while the process still runs, and freeze after
    # one more scan: the process dirties only about rate/bandwidth of it meanwhile, so the
    # frozen round has that much less to send (one more round, for a shorter downtime).
    closing_round: bool = True

    def __post_init__(self) -> None:
        if self.downtime_target_ms < 0:
            raise ValueError("downtime_target_ms must be >= 0")
        if self.min_pages < 0:
            raise ValueError("min_pages must be >= 0")
        if self.growth_limit < 0:
            raise ValueError("growth_limit must be >= 0")
        if self.max_rounds < 1:
            raise ValueError("max_rounds must be >= 1 (round 0 always runs)")
        if self.max_bytes_factor <= 0:
            raise ValueError("max_bytes_factor must be > 0")
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        if self.bandwidth_bytes_s is not None and self.bandwidth_bytes_s <= 0:
            raise ValueError("bandwidth_bytes_s must be > 0")
        if self.freeze_overhead_ms < 0:
            raise ValueError("freeze_overhead_ms must be >= 0")

    def byte_cap(self, memory_bytes: int) -> int:
        if self.max_bytes is not None:
            return self.max_bytes
        return int(self.max_bytes_factor * memory_bytes)


@frozen
class RoundStats:
    """One pre-copy round (names as in DESIGN.md and CRIU's stats-dump where they mean the same)."""

    round: int
    pages_scanned: int          # pages the tracker examined
    pages_dirty: int            # distinct pages found written (round 0: every populated page)
    pages_written: int          # pages sent
    pages_skipped_zero: int     # all-zero pages left out (round 0 only)
    bytes_raw: int              # page bytes sent, before compression
    bytes_on_wire: int          # what the sink reports it sent
    round_ms: float             # scan + read + send
    scan_ms: float
    send_ms: float              # reading and sending the pages
    dirty_rate_mib_s: float     # pages_dirty over the time since the previous scan
    bytes_read: int = 0         # page bytes the tracker read to find dirty pages (checksum)
    layout_changes: int = 0     # mappings added, removed, grown, shrunk or re-protected

    @property
    def bandwidth_bytes_s(self) -> float:
        return self.bytes_raw / (self.send_ms / 1000) if self.send_ms > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def measured_bandwidth(rounds: Sequence[RoundStats]) -> float:
    """Raw page bytes per second over every round sent so far (0 if nothing was timed)."""
    raw = sum(r.bytes_raw for r in rounds)
    secs = sum(r.send_ms for r in rounds) / 1000
    return raw / secs if secs > 0 and raw > 0 else 0.0


def decide(policy: PrecopyPolicy, rounds: Sequence[RoundStats], pending_pages: int, *,
           memory_bytes: int, bandwidth_bytes_s: float | None = None) -> StopReason | None:
    """Stop now (and why), or None to send ``pending_pages`` in one more round.

    ``rounds`` are the rounds sent so far (round 0 first); ``pending_pages`` the dirty set the
    latest scan found. ``bandwidth_bytes_s`` defaults to the policy's, then to the measured one.
    """
    if not rounds:
        return None                       # round 0 always runs
    bandwidth = bandwidth_bytes_s or policy.bandwidth_bytes_s or measured_bandwidth(rounds)
    pending_bytes = pending_pages * PAGE_SIZE
    budget_ms = policy.downtime_target_ms
    if policy.freeze_overhead_ms:
        budget_ms = max(0.0, budget_ms - policy.freeze_overhead_ms - rounds[-1].scan_ms)
    if bandwidth > 0 and pending_bytes <= bandwidth * budget_ms / 1000:
        return StopReason.CONVERGED
    if pending_pages < policy.min_pages:
        return StopReason.FEW_PAGES
    if len(rounds) >= 2 and pending_pages > rounds[-1].pages_dirty * (1 + policy.growth_limit):
        return StopReason.DIRTY_GROWING
    if len(rounds) >= policy.max_rounds:
        return StopReason.MAX_ROUNDS
    if sum(r.bytes_raw for r in rounds) + pending_bytes > policy.byte_cap(memory_bytes):
        return StopReason.MAX_BYTES
    return None


def closes(policy: PrecopyPolicy, reason: StopReason, rounds: Sequence[RoundStats], pending_pages: int) -> bool:
    """Does pre-copy, stopping for ``reason``, send the pending set once more before freezing?"""
    return (policy.closing_round and reason is StopReason.CONVERGED and pending_pages >= policy.min_pages
            and len(rounds) < policy.max_rounds)


@frozen
class Estimate:
    """What a migration would do, modelled from a measured dirty rate."""

    rounds: int
    stop_reason: StopReason
    downtime_ms: float          # the freeze's fixed cost + sending the last dirty set at the given bandwidth
    bytes_sent: int             # before the final round
    final_bytes: int

    def as_dict(self) -> dict[str, object]:
        return {"rounds": self.rounds, "stop_reason": str(self.stop_reason), "downtime_ms": self.downtime_ms,
                "bytes_sent": self.bytes_sent, "final_bytes": self.final_bytes}


def estimate(policy: PrecopyPolicy, *, memory_bytes: int, dirty_rate_bytes_s: float, bandwidth_bytes_s: float,
             wss_bytes: int | None = None) -> Estimate:
    """Replay ``decide`` on a model: a round sending B bytes lasts B / bandwidth, during which the
    process dirties ``dirty_rate`` bytes per second, never more than its writable working set."""
    if bandwidth_bytes_s <= 0:
        raise ValueError("bandwidth must be > 0")
    cap = memory_bytes if wss_bytes is None else min(max(wss_bytes, 0), memory_bytes)
    rounds: list[RoundStats] = []
    pending = memory_bytes
    prev_dirty = memory_bytes // PAGE_SIZE
    for i in range(policy.max_rounds + 1):
        pages = -(-pending // PAGE_SIZE)
        if rounds:
            reason = decide(policy, rounds, pages, memory_bytes=memory_bytes, bandwidth_bytes_s=bandwidth_bytes_s)
            if reason is not None:
                if closes(policy, reason, rounds, pages):
                    secs = pending / bandwidth_bytes_s
                    rounds.append(RoundStats(i, pages, pages, pages, 0, pending, pending, secs * 1000, 0.0,
                                             secs * 1000, dirty_rate_bytes_s / MiB))
                    pending = int(min(dirty_rate_bytes_s * secs, cap, pending))
                return Estimate(len(rounds), reason, policy.freeze_overhead_ms + pending / bandwidth_bytes_s * 1000,
                                sum(r.bytes_raw for r in rounds), pending)
        secs = pending / bandwidth_bytes_s
        rounds.append(RoundStats(i, pages, pages if i else prev_dirty, pages, 0, pending, pending, secs * 1000, 0.0,
                                 secs * 1000, dirty_rate_bytes_s / MiB))
        pending = int(min(dirty_rate_bytes_s * secs, cap))
    raise AssertionError("decide() must stop by max_rounds")   # pragma: no cover
