"""`python -m migrate` is `kcr-migrate`."""
import sys

try:
    from migrate.cli import main
except KeyboardInterrupt:
    sys.exit(130)

sys.exit(main())
