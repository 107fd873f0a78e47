"""`kcr-migrate completion bash|zsh`: print a shell completion script (``migrate.completion``
writes it, loaded only here)."""
from __future__ import annotations

import argparse
import sys

from migrate.cli import command

SHELLS = ("bash", "zsh")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shell", choices=SHELLS, help="the shell to write the script for")


@command("completion", "print a shell completion script (bash or zsh): see the README to install it", add_arguments)
def run(args: argparse.Namespace) -> int:
    from migrate.completion import SCRIPTS, spec

    sys.stdout.write(SCRIPTS[args.shell](spec()))
    return 0
