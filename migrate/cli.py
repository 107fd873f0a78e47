"""`kcr-migrate`: the command line. It parses, calls the library, and renders results;
errors become one line on stderr and a non-zero exit, never a traceback.

Subcommands register themselves in ``COMMANDS`` (name -> (help, add_arguments, run)). Their
modules import the library inside ``run``, so that a command loads only what it uses (``show``
and ``checkpoint`` never load asyncssh or trio) and ``--help`` loads almost nothing.

Options go anywhere, as with ssh: before, between or after the positionals, and before the
subcommand's name; ``kcr-migrate --ssh-config F 1234@hostA hostB`` is the migrate form
(``command_first``). A flag means the same in every subcommand (``tests/test_cli.py``
checks), and every rate is read by ``transport.units.parse_rate``.

Exit statuses (``EXIT_STATUSES``, printed by ``--help`` and tabled in the README) say what
became of the job, whichever signal arrived when: a command calls ``settle()`` at its point of
no return (the image is whole, the process runs at the destination or from the image), after
which SIGINT, SIGTERM and SIGHUP change neither the outcome nor the status. Before it they
roll back: a synchronous command sees KeyboardInterrupt (the tracer turns it into a cancel),
a trio one runs under ``deferred_signals`` and ``watch_signals``, which hand each signal to
the operation's ``cancel``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import textwrap
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NoReturn, Sequence

from agent.startup import grow_fd_table
from transport.errors import MigrationError
from transport.units import parse_rate

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNSETTLED = 3
EXIT_INTERRUPTED = 130

EXIT_STATUSES = (
    (EXIT_OK, "done: the process moved or was restored, the image was written (also when a signal came "
              "after that point); any other command did what was asked"),
    (EXIT_ERROR, "refused or failed: nothing changed (the process runs on where it was)"),
    (EXIT_USAGE, "usage error: a bad option or argument"),
    (EXIT_UNSETTLED, "unsettled: the destination did not confirm the process runs (or, before GO, the source "
                     "was marked and then out of reach) and the source is stopped; settle it with "
                     "`kcr-migrate resolve PID@HOST --kill|--resume`"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C, SIGTERM, SIGHUP) before that point: rolled back, nothing "
                       "changed"),
)

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, AddArgs, Run]] = {}
NO_TEARDOWN: set[str] = set()       # the commands ``program`` ends without the interpreter's teardown


def command(name: str, help: str, add_arguments: AddArgs, *, teardown: bool = True) -> Callable[[Run], Run]:
    """Register ``run`` as the subcommand ``name``; ``add_arguments`` fills its parser.
    ``teardown=False``: once ``run`` has returned, the process has nothing left to do (every
    file it wrote is closed, every thread it started ended or a daemon, no atexit work, no
    temporary file left), so ``program`` ends it without the interpreter's teardown."""
    def wrap(run: Run) -> Run:
        COMMANDS[name] = (help, add_arguments, run)
        if not teardown:
            NO_TEARDOWN.add(name)
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


def add_image_input(p: argparse.ArgumentParser) -> None:
    """The image a command reads: ``FILE`` or ``-i FILE`` (``--input``), the same wherever one is read."""
    p.add_argument("image", nargs="?", metavar="FILE", help="image file, or - for stdin")
    p.add_argument("-i", "--input", metavar="FILE", help="the same, as an option")


def image_input(args: argparse.Namespace, command: str) -> str | None:
    """``add_image_input``'s path, checked (not a folder: MigrationError); None, said in one
    line, unless exactly one of the two was given (a usage error)."""
    if (args.image is None) == (args.input is None):
        error(f"{command} takes one image: kcr-migrate {command} FILE (or -i FILE; - for stdin)")
        return None
    path = str(args.image if args.input is None else args.input)
    check_input(path)
    return path


def check_input(path: str) -> None:
    """An image to read (``-i FILE``, ``show FILE``) that is a folder: say so, in one line."""
    if path != "-" and os.path.isdir(path):
        raise MigrationError(f"{path} is a directory: give an image file (or - for stdin)")


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


def add_placement(p: argparse.ArgumentParser) -> None:
    """``--affinity refuse|warn`` and ``--cgroup PATH``: where on its host a restored process
    runs, the same options wherever a process is restored."""
    p.add_argument("--affinity", choices=("refuse", "warn"), default="refuse",
                   help="a thread pinned (taskset) to CPUs the destination lacks: refuse the move (default), or "
                        "warn and pin it to those of its CPUs the destination has (to none if it has none)")
    p.add_argument("--cgroup", metavar="PATH", type=_cgroup_path,
                   help="put the process (every process of a tree) in this cgroup v2 on the destination, as "
                        "/proc/PID/cgroup names it (e.g. /system.slice/job.scope), instead of the one it was in; "
                        "it must exist there")


def _cgroup_path(text: str) -> str:
    from agent.cgroups import check_path
    try:
        return check_path(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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


class LazyChoices(Sequence[str]):
    """An option's ``choices`` that live in a module the command may never need: imported the
    first time argparse checks a value or help lists them, so that building the parser (every
    run) does not load the module (the trackers' ``precopy.probe`` brings the image schema)."""

    def __init__(self, module: str, name: str) -> None:
        self._where = (module, name)
        self._values: tuple[str, ...] | None = None

    def _load(self) -> tuple[str, ...]:
        if self._values is None:
            import importlib
            self._values = tuple(getattr(importlib.import_module(self._where[0]), self._where[1]))
        return self._values

    def __getitem__(self, index: Any) -> Any:
        return self._load()[index]

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, value: object) -> bool:
        return value in self._load()

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())


TRACKERS = LazyChoices("precopy.probe", "CHOICES")      # --tracker, wherever it is


class _Version(argparse.Action):
    """``--version``: looks the version up only when asked."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print kcr-migrate's version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        from transport.version import PROTOCOL_VERSION, tool_version
        print(f"kcr-migrate {tool_version()} (protocol {PROTOCOL_VERSION})")
        parser.exit()


def exit_epilog() -> str:
    """The exit statuses, as ``--help`` ends with them."""
    rows = [textwrap.fill(text, 78, initial_indent=f"  {code:<4} ", subsequent_indent=" " * 7)
            for code, text in EXIT_STATUSES]
    return "exit status:\n" + "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    epilog = exit_epilog()      # once: every run builds every subcommand's parser
    parser = argparse.ArgumentParser(
        prog="kcr-migrate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Live-migrate, checkpoint and restore Linux processes.",
        epilog="Live migration: kcr-migrate PID@HOST_A HOST_B [options] (see `kcr-migrate migrate --help`).\n"
               "Shell completion: kcr-migrate completion bash|zsh (see `kcr-migrate completion --help`).\n\n"
               + epilog)
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
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


class _Signals:
    """What SIGINT, SIGTERM and SIGHUP do now (``_on_signal``)."""
    settled = False       # past the command's point of no return: they change nothing
    deferred = False      # inside a trio run: noted in ``pending``, for ``watch_signals``
    pending = 0           # a signal no operation's ``cancel`` has been given yet
    received = False      # a signal came before the command settled


TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _on_signal(signum: int, frame: object) -> None:
    if _Signals.settled:
        return
    _Signals.received = True
    if _Signals.deferred:
        _Signals.pending = signum
        return
    raise KeyboardInterrupt


def _handle_signals() -> None:
    """SIGTERM and SIGHUP roll back like Ctrl-C instead of killing the tool mid-operation, and
    none of the three does anything once the command has settled."""
    for sig in TERMINATING:
        signal.signal(sig, _on_signal)


def settle() -> None:
    """The command's point of no return is behind it (the image is whole, the process runs
    where it was sent): from now on a signal changes neither the outcome nor the exit status.
    Safe to call from any thread."""
    _Signals.settled = True


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Around ``trio.run``: a signal that arrives while no ``watch_signals`` listens is kept for
    the next one to pass on, or raised as KeyboardInterrupt at the end if none did and the
    command did not settle."""
    _Signals.deferred, _Signals.pending = True, 0
    try:
        yield
    finally:
        _Signals.deferred = False
    if _Signals.pending and not _Signals.settled:
        raise KeyboardInterrupt


async def watch_signals(cancel: Callable[[], None], *, task_status: Any) -> None:
    """Under ``deferred_signals``: call ``cancel`` for every SIGINT, SIGTERM or SIGHUP, and at
    once for one that came before this started. Start it with ``nursery.start``."""
    import trio

    with trio.open_signal_receiver(*TERMINATING) as signals:
        task_status.started()
        if _Signals.pending:
            _Signals.pending = 0
            cancel()
        async for _ in signals:
            if not _Signals.settled:
                _Signals.received = True
                cancel()


def exit_status(exc: MigrationError) -> int:
    """The status of a command that failed with ``exc``: a failure that followed a signal
    (a rollback the signal asked for) is an interruption."""
    if exc.code == "unsettled":
        return EXIT_UNSETTLED
    if exc.code == "cancelled" or (_Signals.received and not _Signals.settled):
        return EXIT_INTERRUPTED
    return EXIT_ERROR


class _Ran:
    """The subcommand ``main`` ran last, for ``program``."""
    command: str | None = None


def program() -> NoReturn:
    """The `kcr-migrate` program (its console script, ``python -m migrate``): ``main()``, then
    exit with its status.

    After a command registered with ``teardown=False``, the process ends at once (``os._exit``)
    once stdout and stderr are flushed: the interpreter's teardown (freeing every module and
    object: 15 ms after a restore) has nothing to do for it. A flush that fails, or a thread
    other than a daemon still running, takes the ordinary exit, which reports or waits as it
    always did."""
    status = main()
    if _Ran.command in NO_TEARDOWN and all(t.daemon for t in threading.enumerate()
                                           if t is not threading.main_thread()):
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            sys.exit(status)
        os._exit(status)
    sys.exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    _handle_signals()
    grow_fd_table()           # a checkpoint takes the job's pipes and sockets in while it is frozen
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        error("interrupted: nothing was changed")
        return EXIT_INTERRUPTED


def _main(args_list: list[str]) -> int:
    _load_commands()
    parser = build_parser()
    # `kcr-migrate PID@hostA hostB ...` is shorthand for `kcr-migrate migrate PID@hostA hostB ...`.
    args = parser.parse_args(command_first(args_list, parser))
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    _Ran.command = args.command
    try:
        return int(args.run(args) or 0)
    except MigrationError as exc:
        error(str(exc))
        return exit_status(exc)
    except BrokenPipeError:
        error("the output pipe was closed")
        return EXIT_ERROR
    except OSError as exc:
        error(f"{f'{exc.filename}: ' if exc.filename else ''}{exc.strerror or exc}")
        return EXIT_ERROR


if __name__ == "__main__":
    program()
