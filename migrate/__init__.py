"""kcr-migrate: live migration, checkpoint and restore of Linux processes.

What a cluster manager calls::

    from migrate import migrate, Migration, MigrationOptions

    report = await migrate(pid, "hostA", "hostB", MigrationOptions(downtime_target_ms=20))
    report = migrate_blocking(pid, "hostA", "hostB")          # without trio

Rebalancing a cluster: ``Inventory`` (``read_hosts_file``, ``measure``), ``plan(inventory,
Policy(...)) -> Plan``, ``execute(plan)`` (or a ``Rebalance``) with its events and report.

Progress comes as events (``on_event=`` callback, or ``async for ev in m.events()`` on a
``Migration``); ``Migration.cancel()`` rolls back before the point of no return. Every error
is a ``MigrationError`` with the phase, pid and host and a message that says what to do.

Names are loaded on first use, so the command line does not pay for what it does not run.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "migrate.api": ("DataChannelChosen", "Event", "Finished", "MigrationOptions", "MigrationReport", "PhaseChanged",
                    "PreflightDone", "RoundDone", "WarningRaised"),
    "migrate.fshooks": ("FsHook", "HookContext"),
    "migrate.inventory": ("Candidate", "Host", "HostLoad", "Inventory", "InventoryError", "MeasureOptions",
                          "measure", "read_hosts_file"),
    "migrate.planner": ("Move", "Plan", "Policy", "Rejected", "Rule", "plan"),
    "migrate.rebalance": ("MoveDone", "MoveStarted", "Rebalance", "RebalanceEvent", "RebalanceFinished",
                          "RebalanceOptions", "RebalanceReport", "execute"),
    "migrate.images": ("CheckpointOptions", "CheckpointStats", "checkpoint", "checkpoint_to_path"),
    "migrate.image_restore": ("RestoreResult", "restore"),
    "migrate.orchestrator": ("Migration", "MigrationUnsettled", "migrate", "migrate_blocking"),
    "migrate.phases": ("Phase",),
    "transport.errors": ("Cancelled", "ChannelClosed", "FsHookError", "ImageKeyError", "IncompatibleImage",
                         "KernelFeatureMissing", "MigrationError",
                         "NoSuchProcess", "PeerGone", "PermissionDenied", "ProcessError", "ProcessExited",
                         "ProtocolError", "RestoreError", "TransportError", "TransportTimeout",
                         "UnsupportedResource", "UntrustedImage"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'migrate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from migrate.api import (DataChannelChosen, Event, Finished, MigrationOptions, MigrationReport, PhaseChanged,  # noqa: F401
                             PreflightDone, RoundDone, WarningRaised)
    from migrate.fshooks import FsHook, HookContext  # noqa: F401
    from migrate.inventory import (Candidate, Host, HostLoad, Inventory, InventoryError,  # noqa: F401
                                   MeasureOptions, measure, read_hosts_file)
    from migrate.planner import Move, Plan, Policy, Rejected, Rule, plan  # noqa: F401
    from migrate.rebalance import (MoveDone, MoveStarted, Rebalance, RebalanceEvent,  # noqa: F401
                                   RebalanceFinished, RebalanceOptions, RebalanceReport, execute)
    from migrate.images import CheckpointOptions, CheckpointStats, checkpoint, checkpoint_to_path  # noqa: F401
    from migrate.image_restore import RestoreResult, restore  # noqa: F401
    from migrate.orchestrator import Migration, MigrationUnsettled, migrate, migrate_blocking  # noqa: F401
    from migrate.phases import Phase  # noqa: F401
    from transport.errors import (Cancelled, ChannelClosed, FsHookError, ImageKeyError,  # noqa: F401
                                  IncompatibleImage, KernelFeatureMissing,
                                  MigrationError, NoSuchProcess, PeerGone, PermissionDenied, ProcessError,
                                  ProcessExited, ProtocolError, RestoreError, TransportError, TransportTimeout,
                                  UnsupportedResource, UntrustedImage)
