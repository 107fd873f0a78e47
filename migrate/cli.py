"""`kcr-migrate`: the command line. It parses, calls the library, and renders results;
errors become one line on stderr and a non-zero exit, never a traceback.

Subcommands register themselves in ``COMMANDS`` (name -> (help, add_arguments, run)). Their
modules import the library inside ``run``, so that a command loads only what it uses (``show``
and ``checkpoint`` never load asyncssh or trio) and ``--help`` loads almost nothing.

Options go anywhere, as with ssh: before, between or after the positionals, and before the
subcommand's name; ``kcr-migrate --ssh-config F 1234@hostA hostB`` is the migrate form
(``command_first``). A flag means the same in every subcommand (``tests/test_cli.py``
checks), and every rate is read by ``transport.units.parse_rate``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any, Callable, Sequence

from transport.errors import MigrationError
from transport.units import parse_rate

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, AddArgs, Run]] = {}


def command(name: str, help: str, add_arguments: AddArgs) -> Callable[[Run], Run]:
    """Register ``run`` as the subcommand ``name``; ``add_arguments`` fills its parser."""
    def wrap(run: Run) -> Run:
        COMMANDS[name] = (help, add_arguments, run)
        return run
    return wrap


def error(message: str) -> None:
    print(f"kcr-migrate: error: {message}", file=sys.stderr)


def write_json(path: str, data: Any) -> None:
    if path == "-":
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def parse_pid(text: str) -> int:
    try:
        pid = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id") from None
    if pid <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id")
    return pid


def parse_redirect(text: str) -> tuple[int, str]:
    """``--redirect FD=PATH``: an fd number and an absolute path."""
    fd, sep, path = text.partition("=")
    if not sep or not fd.isdigit() or not path.startswith("/"):
        raise argparse.ArgumentTypeError(f"{text!r}: write FD=PATH with an absolute PATH (e.g. 1=/srv/job/out.log)")
    return int(fd), path


def add_image_key(p: argparse.ArgumentParser) -> None:
    """``--image-key FILE``: the same option, read the same way, wherever images are signed or checked."""
    p.add_argument("--image-key", metavar="FILE",
                   help="the key file that signs and verifies images (default: $KCR_IMAGE_KEY, else "
                        "/etc/kcr-migrate/image.key, made on first use; hosts of a cluster share one)")


def add_affinity(p: argparse.ArgumentParser) -> None:
    """``--affinity refuse|warn``: one option wherever a process is restored."""
    p.add_argument("--affinity", choices=("refuse", "warn"), default="refuse",
                   help="a thread pinned (taskset) to CPUs the destination lacks: refuse the move (default), or "
                        "warn and pin it to those of its CPUs the destination has (to none if it has none)")


REDIRECT_HELP = ("open PATH in place of fd FD where it is a pipe, socket or terminal whose other end "
                 "stays behind (a launcher, a terminal): from then on the process reads or appends to "
                 "PATH; repeatable")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def rate(text: str) -> float:
    """A ``--bandwidth``: bytes per second, units as in ``transport.units``."""
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Version(argparse.Action):
    """``--version``: looks the version up only when asked."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print kcr-migrate's version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        from transport.protocol import PROTOCOL_VERSION, tool_version
        print(f"kcr-migrate {tool_version()} (protocol {PROTOCOL_VERSION})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kcr-migrate",
        description="Live-migrate, checkpoint and restore Linux processes.",
        epilog="Live migration: kcr-migrate PID@HOST_A HOST_B [options] (see `kcr-migrate migrate --help`).")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands' parsers, by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> dict[str, bool]:
    """Every option string of the parser and its subcommands -> whether it takes a value."""
    takes_value: dict[str, bool] = {}
    for p in (parser, *subparsers(parser).values()):
        for action in p._actions:
            for opt in action.option_strings:
                takes_value[opt] = action.nargs != 0
    return takes_value


def command_first(args: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``args`` with the subcommand's name first, as argparse wants it.

    The first positional (skipping options and their values) decides: a subcommand's name is
    moved to the front (``kcr-migrate --json restore -i F``), an argument with "@" means the
    migrate form (``kcr-migrate --ssh-config F 1234@hostA hostB``), anything else is a usage
    error. An option only the top level has (``--version``) leaves ``args`` to the top-level
    parser."""
    takes_value = _options(parser)
    top_only = {opt for action in parser._actions for opt in action.option_strings}
    top_only -= {opt for p in subparsers(parser).values() for action in p._actions for opt in action.option_strings}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            if i < len(args) and "@" in args[i]:
                return ["migrate", *args]
            return args
        if not arg.startswith("-") or arg == "-":
            break
        name = arg.split("=", 1)[0] if arg.startswith("--") else arg[:2]
        # argparse takes unique prefixes of long options (--ssh for --ssh-config)
        known = [name] if name in takes_value else [opt for opt in takes_value if opt.startswith(name)]
        if any(opt in top_only for opt in known):
            return args
        attached = "=" in arg if arg.startswith("--") else len(arg) > 2
        valued = {takes_value[opt] for opt in known} == {True}
        i += 2 if valued and not attached else 1
    if i >= len(args):
        return args
    first = args[i]
    if first in COMMANDS:
        return [first, *args[:i], *args[i + 1:]]
    if "@" in first and "migrate" in COMMANDS:
        return ["migrate", *args]
    parser.error(f"{first!r} is not a command ({', '.join(COMMANDS)}); to move a process: "
                 f"kcr-migrate PID@HOST_A HOST_B")


def _load_commands() -> None:
    # Importing a module registers its subcommands.
    from migrate import commands  # noqa: F401


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _interrupt_on_termination() -> None:
    """SIGTERM and SIGHUP roll back like Ctrl-C instead of killing the tool mid-operation."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        error("interrupted")
        return EXIT_INTERRUPTED


def _main(args_list: list[str]) -> int:
    _load_commands()
    parser = build_parser()
    # `kcr-migrate PID@hostA hostB ...` is shorthand for `kcr-migrate migrate PID@hostA hostB ...`.
    args = parser.parse_args(command_first(args_list, parser))
    _interrupt_on_termination()
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.run(args) or 0)
    except MigrationError as exc:
        error(str(exc))
        return EXIT_ERROR
    except BrokenPipeError:
        error("the output pipe was closed")
        return EXIT_ERROR
    except OSError as exc:
        error(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}")
        return EXIT_ERROR

if __name__ == "__main__":
    sys.exit(main())
