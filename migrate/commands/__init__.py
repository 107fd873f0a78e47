"""The subcommands of `kcr-migrate`; importing this package registers them all."""
from migrate.commands import checkpoint, completion, migrate, rebalance, resolve, restore, show, wss  # noqa: F401
