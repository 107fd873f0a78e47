"""The subcommands of `kcr-migrate`; importing this package registers them all."""
from migrate.commands import checkpoint, migrate, rebalance, resolve, restore, show, wss  # noqa: F401
