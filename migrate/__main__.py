"""`python -m migrate` is `kcr-migrate`."""
import sys

from migrate.cli import main

sys.exit(main())
