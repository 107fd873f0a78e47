"""`kcr-migrate PID@HOST_A HOST_B`: move a running process (same as `kcr-migrate migrate ...`)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from migrate.cli import (REDIRECT_HELP, TRACKERS, add_placement, command, deferred_signals, parse_redirect,
                         positive_float, rate, settle, watch_signals)
from transport.errors import MigrationError

if TYPE_CHECKING:
    from migrate.api import Event
    from migrate.orchestrator import Migration


def parse_source(text: str) -> tuple[int, str]:
    pid, sep, host = text.partition("@")
    if not sep or not pid.isdigit() or int(pid) <= 0 or not host:
        raise argparse.ArgumentTypeError(f"{text!r}: write the source as PID@HOST (e.g. 1234@localhost)")
    return int(pid), host


def parse_level(text: str) -> int | str | None:
    if text == "auto":
        return "auto"
    if text in ("none", "off", "raw"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use auto, none or a zstd level (-7..19)") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=parse_source, metavar="PID@HOST", help="the process and the host it runs on")
    p.add_argument("dest", metavar="HOST", help="where it should run (localhost needs no SSH server)")
    p.add_argument("--downtime", type=positive_float, default=30.0, metavar="MS",
                   help="stop pre-copying when the rest can be sent in this many ms (default 30)")
    p.add_argument("--bandwidth", type=rate, metavar="RATE",
                   help="limit the page stream: bytes/s, or 100M (MiB/s), 500MB, 1gbit ...")
    p.add_argument("--max-rounds", type=int, default=10, metavar="N", help="pre-copy rounds at most (default 10)")
    p.add_argument("--no-precopy", action="store_true", help="stop-and-copy: freeze first, then send everything")
    p.add_argument("--tracker", default="auto", choices=TRACKERS, metavar="TRACKER",
                   help="dirty-page tracking: %(choices)s (default: the best this kernel has)")
    p.add_argument("--compress", type=parse_level, default="auto", metavar="LEVEL",
                   help="zstd level for pages: auto (default), none, or -7..19")
    p.add_argument("--data-channel", choices=("auto", "ssh", "tcp"), default="auto",
                   help="how pages travel: tcp straight from the source's agent to the destination's "
                        "(encrypted), ssh relayed through kcr-migrate, or auto (default): tcp when the "
                        "source can connect to the destination, else ssh")
    p.add_argument("--ssh-config", metavar="FILE", help="ssh config to use (as ssh -F FILE)")
    p.add_argument("--link-timeout", type=float, default=30.0, metavar="S",
                   help="seconds of silence after which an agent settles on its own (default 30)")
    p.add_argument("--fs", action="append", default=[], metavar="KIND:PATH",
                   help="move the files under PATH too: rsync:PATH, btrfs:PATH (a subvolume), or none:PATH "
                        "(shared storage); repeatable")
    p.add_argument("--fs-replace", action="store_true",
                   help="let --fs replace data already at the destination path (refused otherwise): it is "
                        "moved aside, put back on a rollback and deleted once the process runs there")
    p.add_argument("--redirect", type=parse_redirect, action="append", default=[], metavar="FD=PATH",
                   help=REDIRECT_HELP + " (PATH is on the destination)")
    p.add_argument("--new-pid", action="store_true",
                   help="run under a new pid (and thread ids) on the destination instead of the process's own: "
                        "needed where they are taken there, as from localhost to localhost")
    p.add_argument("--stand-in", action="store_true",
                   help="leave a stand-in at home: the source pid stays, holding none of the job's memory, "
                        "forwards the signals it gets to the moved process and exits as it does, so its parent "
                        "(a batch shell, slurmstepd) sees the real exit status")
    p.add_argument("--stand-in-auto", action="store_true",
                   help="--stand-in only when the process's parent is not the init of its pid namespace")
    p.add_argument("--relay", type=int, action="append", default=[], metavar="FD",
                   help="with --stand-in: fd FD of the process (a pipe to its parent, say its stdout) stays "
                        "connected: what the moved process writes to it comes back through the stand-in; "
                        "repeatable")
    p.add_argument("--stand-in-lost", default="exit", metavar="kill|exit:N",
                   help="when the stand-in and the moved process lose each other: kill (both end), or exit:N "
                        "(the stand-in exits with N, the moved process runs on); default exit:240")
    add_placement(p)
    p.add_argument("--dry-run", action="store_true", help="preflight only: check everything, move nothing")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    p.add_argument("--events", action="store_true",
                   help="print each event (phase changed, round done, warning ...) as it happens, one JSON "
                        "object a line on stdout, for a program watching the move")


class Progress:
    """A status line on a terminal (stderr); nothing when stderr is not one."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.line = ""

    def show(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K" + text)
            sys.stderr.flush()
            self.line = text

    def say(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")
        print(text, file=sys.stderr)
        if self.enabled and self.line:
            sys.stderr.write(self.line)
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.line:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()

    def __call__(self, ev: "Event") -> None:
        from migrate.api import DataChannelChosen, PhaseChanged, PreflightDone, RoundDone, WarningRaised
        if isinstance(ev, PreflightDone):
            self.say(f"pid {ev.pid} ({ev.comm}): {ev.threads} threads, {ev.memory_bytes / 2**20:.0f} MiB; "
                     f"tracker {ev.tracker} ({ev.tracker_reason})")
        elif isinstance(ev, DataChannelChosen):
            self.say(f"pages: {ev.detail}")
        elif isinstance(ev, PhaseChanged):
            self.show(f"{ev.phase} ...")
        elif isinstance(ev, RoundDone):
            s = ev.stats
            bw = s["bytes_raw"] / (s["send_ms"] / 1000) / 2**20 if s.get("send_ms") else 0.0
            self.show(f"round {ev.round}: {s['pages_written']} pages, {s['bytes_raw'] / 2**20:.1f} MiB "
                      f"({s['bytes_on_wire'] / 2**20:.1f} on the wire), dirty {s['dirty_rate_mib_s']:.1f} MiB/s, "
                      f"{bw:.0f} MiB/s")
        elif isinstance(ev, WarningRaised):
            self.say(f"kcr-migrate: warning: {ev.message}")


def event_line(ev: "Event") -> str | None:
    """``--events``: the event as one JSON line (its kind and its fields); None for ``Finished``,
    whose report ``--json`` prints."""
    from dataclasses import asdict

    from migrate.api import Finished
    if isinstance(ev, Finished):
        return None
    kind = "".join("-" + c.lower() if c.isupper() else c for c in type(ev).__name__).lstrip("-")
    return json.dumps({"event": kind, **asdict(ev)})


def summary_line(report: Any) -> str:
    return (f"pid {report.pid}@{report.source_host} now runs as pid {report.new_pid}@{report.dest_host}: "
            f"{report.rounds} pre-copy rounds ({report.stop_reason}), downtime {report.downtime_ms:.1f} ms, "
            f"total {report.total_ms / 1000:.2f} s, {report.bytes_raw / 2**20:.1f} MiB raw, "
            f"{report.bytes_on_wire / 2**20:.1f} MiB on the wire"
            + (f"; signals sent to it during the move, delivered there: {', '.join(report.late_signals)}"
               if report.late_signals else ""))


async def run_cancellable(migration: "Migration") -> Any:
    """Run the migration under ``deferred_signals``; Ctrl-C, SIGTERM or SIGHUP cancel it (rolled
    back before the point of no return, finished cleanly after it) instead of killing the
    orchestrator mid-step."""
    from transport._nursery import service_nursery
    async with service_nursery() as nursery:
        await nursery.start(watch_signals, migration.cancel)
        try:
            return await migration.run()
        finally:
            nursery.cancel_scope.cancel()


@command("migrate", "live-migrate a process: kcr-migrate PID@HOST_A HOST_B", add_arguments)
def run(args: argparse.Namespace) -> int:
    import trio

    from migrate.api import MigrationOptions
    from migrate.fshooks import parse_hook
    from migrate.orchestrator import Migration

    pid, source = args.source
    try:
        options = MigrationOptions(
            downtime_target_ms=args.downtime, bandwidth_limit=args.bandwidth, max_rounds=args.max_rounds,
            tracker=args.tracker, compress_level=args.compress, data_channel=args.data_channel,
            ssh_config=args.ssh_config, precopy=not args.no_precopy, dry_run=args.dry_run,
            link_timeout_s=args.link_timeout, fs=tuple(parse_hook(spec) for spec in args.fs),
            fs_replace=args.fs_replace, redirect=dict(args.redirect), new_pid=args.new_pid, affinity=args.affinity,
            cgroup=args.cgroup,
            stand_in=True if args.stand_in else "auto" if args.stand_in_auto else False,
            stand_in_lost=args.stand_in_lost, relay=tuple(args.relay))
    except ValueError as exc:
        raise MigrationError(str(exc)) from None
    progress = Progress(sys.stderr.isatty() and not args.json and not args.events)

    def on_event(ev: "Event") -> None:
        progress(ev)
        line = event_line(ev) if args.events else None
        if line is not None:
            print(line, flush=True)
    migration = Migration(pid, source, args.dest, options, on_event=on_event)
    try:
        with deferred_signals():
            try:
                report = trio.run(run_cancellable, migration)
            finally:
                if migration.report.state in ("done", "unsettled"):
                    settle()     # past the point of no return: the status says what became of it
    except MigrationError:
        progress.done()
        if args.json:
            print(json.dumps(migration.report.as_dict()))
        raise
    progress.done()
    if args.json:
        print(json.dumps(report.as_dict()))
    elif report.state == "dry-run":
        print(f"preflight passed: pid {pid}@{source} can move to {args.dest} (tracker {report.tracker})",
              file=sys.stderr)
    else:
        print(summary_line(report), file=sys.stderr)
    return 0

