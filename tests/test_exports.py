"""The public facade: what a cluster manager imports from `migrate` is there and nothing else leaks."""
from __future__ import annotations

import migrate


def test_every_exported_name_resolves() -> None:
    for name in migrate.__all__:
        assert getattr(migrate, name) is not None, name


def test_the_documented_api_is_exported() -> None:
    for name in ("migrate", "migrate_blocking", "Migration", "MigrationOptions", "MigrationReport", "MigrationError",
                 "PhaseChanged", "RoundDone", "Finished", "checkpoint", "restore", "MigrationUnsettled",
                 "Inventory", "Host", "measure", "plan", "Plan", "Policy", "execute", "Rebalance", "RebalanceReport",
                 "MoveStarted", "MoveDone", "RebalanceFinished"):
        assert name in migrate.__all__, name


def test_errors_form_one_tree() -> None:
    errors = [getattr(migrate, n) for n in migrate.__all__
              if isinstance(getattr(migrate, n), type) and issubclass(getattr(migrate, n), Exception)]
    assert len(errors) > 10
    assert all(issubclass(e, migrate.MigrationError) for e in errors)


def test_unknown_names_raise_attribute_error() -> None:
    try:
        migrate.no_such_thing  # type: ignore[attr-defined]
    except AttributeError:
        return
    raise AssertionError("an unknown name must raise AttributeError")
