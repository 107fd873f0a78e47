"""`python -m migrate` is `kcr-migrate`."""
import sys

try:
    from migrate.cli import program
except KeyboardInterrupt:
    sys.exit(130)

program()
