"""The pre-copy policy as pure logic: no processes, no clock."""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from precopy.policy import PrecopyPolicy, RoundStats, StopReason, decide, estimate, measured_bandwidth
from transport.schema import PAGE_SIZE

MiB = 1 << 20


def rnd(i: int, dirty: int, *, sent: int | None = None, send_ms: float = 100.0) -> RoundStats:
    sent = dirty if sent is None else sent
    return RoundStats(round=i, pages_scanned=1000, pages_dirty=dirty, pages_written=sent, pages_skipped_zero=0,
                      bytes_raw=sent * PAGE_SIZE, bytes_on_wire=sent * PAGE_SIZE // 2, round_ms=send_ms + 1,
                      scan_ms=1.0, send_ms=send_ms, dirty_rate_mib_s=0.0)


MEM = 25600 * PAGE_SIZE          # 100 MiB
BW = 100 * MiB                   # 100 MiB/s: 300 ms carry 30 MiB


def test_round_zero_always_runs() -> None:
    assert decide(PrecopyPolicy(), [], 0, memory_bytes=MEM, bandwidth_bytes_s=BW) is None


def test_converged_when_the_rest_fits_the_downtime_target() -> None:
    rounds = [rnd(0, 25600)]
    fits = int(BW * 0.3) // PAGE_SIZE
    assert decide(PrecopyPolicy(), rounds, fits, memory_bytes=MEM, bandwidth_bytes_s=BW) is StopReason.CONVERGED
    assert decide(PrecopyPolicy(), rounds, fits + 1, memory_bytes=MEM, bandwidth_bytes_s=BW) is None


def test_bandwidth_comes_from_the_policy_or_the_rounds() -> None:
    rounds = [rnd(0, 25600, send_ms=1000.0)]       # 100 MiB in 1 s
    assert measured_bandwidth(rounds) == pytest.approx(100 * MiB)
    fits = int(100 * MiB * 0.3) // PAGE_SIZE
    assert decide(PrecopyPolicy(), rounds, fits, memory_bytes=MEM) is StopReason.CONVERGED
    slow = PrecopyPolicy(bandwidth_bytes_s=1 * MiB)
    assert decide(slow, rounds, fits, memory_bytes=MEM) is None
    assert measured_bandwidth([]) == 0.0


def test_few_pages_left() -> None:
    policy = PrecopyPolicy(downtime_target_ms=0)
    assert decide(policy, [rnd(0, 25600)], 63, memory_bytes=MEM, bandwidth_bytes_s=BW) is StopReason.FEW_PAGES
    assert decide(policy, [rnd(0, 25600)], 64, memory_bytes=MEM, bandwidth_bytes_s=BW) is None


def test_growth_check_compares_delta_rounds_only() -> None:
    policy = PrecopyPolicy(downtime_target_ms=0)
    # Round 0 sent everything: a first delta bigger than nothing is no growth signal.
    assert decide(policy, [rnd(0, 100)], 5000, memory_bytes=MEM, bandwidth_bytes_s=BW) is None
    rounds = [rnd(0, 25600), rnd(1, 1000)]
    assert decide(policy, rounds, 1100, memory_bytes=MEM, bandwidth_bytes_s=BW) is None
    assert decide(policy, rounds, 1101, memory_bytes=MEM, bandwidth_bytes_s=BW) is StopReason.DIRTY_GROWING
    assert decide(policy, rounds, 900, memory_bytes=MEM, bandwidth_bytes_s=BW) is None


def test_max_rounds() -> None:
    policy = PrecopyPolicy(downtime_target_ms=0, max_rounds=3)
    rounds = [rnd(0, 25600), rnd(1, 1000)]
    assert decide(policy, rounds, 900, memory_bytes=MEM, bandwidth_bytes_s=BW) is None
    rounds.append(rnd(2, 900))
    assert decide(policy, rounds, 800, memory_bytes=MEM, bandwidth_bytes_s=BW) is StopReason.MAX_ROUNDS


def test_max_bytes_factor_and_absolute_cap() -> None:
    policy = PrecopyPolicy(downtime_target_ms=0, growth_limit=100.0, max_bytes_factor=1.5)
    rounds = [rnd(0, 25600), rnd(1, 10000)]                 # 35600 pages sent; cap 38400
    assert decide(policy, rounds, 2800, memory_bytes=MEM, bandwidth_bytes_s=BW) is None
    assert decide(policy, rounds, 2801, memory_bytes=MEM, bandwidth_bytes_s=BW) is StopReason.MAX_BYTES
    absolute = dataclasses.replace(policy, max_bytes=36000 * PAGE_SIZE)
    assert absolute.byte_cap(MEM) == 36000 * PAGE_SIZE
    assert decide(absolute, rounds, 401, memory_bytes=MEM, bandwidth_bytes_s=BW) is StopReason.MAX_BYTES


def test_the_first_reason_in_order_wins() -> None:
    policy = PrecopyPolicy(max_rounds=1)
    # Fits the downtime target and also hits max_rounds: converged is the news.
    assert decide(policy, [rnd(0, 25600)], 10, memory_bytes=MEM, bandwidth_bytes_s=BW) is StopReason.CONVERGED


@pytest.mark.parametrize("field,value", [("downtime_target_ms", -1), ("min_pages", -1), ("growth_limit", -0.1),
                                         ("max_rounds", 0), ("max_bytes_factor", 0), ("max_bytes", -1),
                                         ("bandwidth_bytes_s", 0)])
def test_nonsense_thresholds_are_refused(field: str, value: float) -> None:
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=field):
        PrecopyPolicy(**kwargs)


def test_policy_and_stats_are_data() -> None:
    policy = PrecopyPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_rounds = 3  # type: ignore[misc]
    stats = rnd(1, 10)
    d = stats.as_dict()
    for name in ("pages_scanned", "pages_dirty", "pages_written", "pages_skipped_zero", "bytes_raw",
                 "bytes_on_wire", "dirty_rate_mib_s", "round_ms"):
        assert name in d
    assert stats.bandwidth_bytes_s == pytest.approx(10 * PAGE_SIZE / 0.1)
    assert str(StopReason.DIRTY_GROWING) == "dirty-growing"


def test_estimate_of_an_idle_process_is_one_round() -> None:
    est = estimate(PrecopyPolicy(), memory_bytes=MEM, dirty_rate_bytes_s=0.0, bandwidth_bytes_s=BW)
    assert est.rounds == 1 and est.stop_reason is StopReason.CONVERGED and est.downtime_ms == 0.0
    assert est.bytes_sent == MEM


def test_estimate_converges_geometrically_on_a_slow_writer() -> None:
    # Writes 10 MiB/s over a 100 MiB/s link: each round carries a tenth of the one before.
    plain = PrecopyPolicy(min_pages=0, closing_round=False)
    est = estimate(plain, memory_bytes=MEM, dirty_rate_bytes_s=10 * MiB, bandwidth_bytes_s=BW)
    assert est.stop_reason is StopReason.CONVERGED
    assert est.rounds == 1 and est.downtime_ms == pytest.approx(100.0)     # 100 MiB in 1 s, then 10 MiB
    tight = PrecopyPolicy(min_pages=0, downtime_target_ms=50, closing_round=False)
    est = estimate(tight, memory_bytes=MEM, dirty_rate_bytes_s=10 * MiB, bandwidth_bytes_s=BW)
    assert est.rounds == 2 and est.downtime_ms == pytest.approx(10.0, rel=0.01)   # ... then 1 MiB
    # The closing round: the 10 MiB found converged go while the process runs, and the frozen
    # round sends only what it dirtied meanwhile.
    est = estimate(PrecopyPolicy(min_pages=0), memory_bytes=MEM, dirty_rate_bytes_s=10 * MiB, bandwidth_bytes_s=BW)
    assert est.stop_reason is StopReason.CONVERGED
    assert est.rounds == 2 and est.downtime_ms == pytest.approx(10.0, rel=0.01)


def test_estimate_gives_up_on_a_writer_faster_than_the_link() -> None:
    est = estimate(PrecopyPolicy(), memory_bytes=MEM, dirty_rate_bytes_s=400 * MiB, bandwidth_bytes_s=BW,
                   wss_bytes=MEM // 2)
    assert est.stop_reason in (StopReason.MAX_ROUNDS, StopReason.MAX_BYTES, StopReason.DIRTY_GROWING)
    assert est.final_bytes == MEM // 2                      # capped by the working set
    assert est.downtime_ms == pytest.approx(500.0)
    with pytest.raises(ValueError):
        estimate(PrecopyPolicy(), memory_bytes=MEM, dirty_rate_bytes_s=1.0, bandwidth_bytes_s=0)
    assert est.as_dict()["stop_reason"] == str(est.stop_reason)


def test_the_freeze_overhead_and_last_scan_come_out_of_the_downtime_budget() -> None:
    rounds = [rnd(0, 25600)]          # scan_ms = 1.0
    budget_pages = int(BW * 0.030 / PAGE_SIZE)     # what fits in 30 ms at BW
    plain = PrecopyPolicy(downtime_target_ms=30)
    costly = PrecopyPolicy(downtime_target_ms=30, freeze_overhead_ms=20, min_pages=0)
    assert decide(plain, rounds, budget_pages, memory_bytes=MEM, bandwidth_bytes_s=BW) is StopReason.CONVERGED
    assert decide(costly, rounds, budget_pages, memory_bytes=MEM, bandwidth_bytes_s=BW) is None
    fits = int(BW * 0.009 / PAGE_SIZE)             # 30 - 20 - 1 ms left for pages
    assert decide(costly, rounds, fits, memory_bytes=MEM, bandwidth_bytes_s=BW) is StopReason.CONVERGED
