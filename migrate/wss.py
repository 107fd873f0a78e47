"""`kcr-migrate wss`: the meter is ``agent.wss`` (the agent's ``measure`` samples dirty rates
for the rebalancer with it too); here its options default to the policy a migration runs with."""
from __future__ import annotations

from dataclasses import field

from agent.wss import WssMeter, WssSample, deferred_interrupts, measure_wss
from agent.wss import WssOptions as _AgentWssOptions
from migrate.api import MigrationOptions
from precopy.policy import PrecopyPolicy
from transport.frozen import frozen


@frozen
class WssOptions(_AgentWssOptions):
    # the policy `kcr-migrate PID@A B` runs with by default (30 ms target, its freeze overhead)
    policy: PrecopyPolicy = field(default_factory=lambda: MigrationOptions().policy())


__all__ = ["WssMeter", "WssOptions", "WssSample", "deferred_interrupts", "measure_wss"]
