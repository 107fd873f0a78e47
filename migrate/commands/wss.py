"""`kcr-migrate wss PID`: how much memory a process writes per interval, and what a migration would cost."""
from __future__ import annotations

import argparse
import json
import sys

from typing import TYPE_CHECKING

from migrate.cli import TRACKERS, command, parse_pid, positive_float, rate

if TYPE_CHECKING:
    from migrate.wss import WssMeter

MiB = 1 << 20


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pid", type=parse_pid, help="process to measure (it keeps running, undisturbed)")
    p.add_argument("--interval", type=positive_float, default=1.0, metavar="S",
                   help="seconds per measurement interval (default 1)")
    p.add_argument("--count", type=_count, default=0, metavar="N",
                   help="number of intervals (default 0: until Ctrl-C, SIGTERM or SIGHUP, which then end "
                        "it with status 0)")
    p.add_argument("--tracker", choices=TRACKERS, default="auto", metavar="TRACKER",
                   help="dirty-page tracker: %(choices)s (default auto: the best one this kernel supports)")
    p.add_argument("--bandwidth", type=rate, metavar="RATE",
                   help="link bandwidth for the downtime estimate: bytes/s, or 100M (MiB/s), 500MB, "
                        "1gbit ... (default 1gbit)")
    p.add_argument("--downtime", "--downtime-ms", dest="downtime_ms", type=positive_float, metavar="MS",
                   help="downtime target of the modelled migration (default: a migration's, 30)")
    p.add_argument("--json", action="store_true", help="print one JSON object per interval, one per line")


@command("wss", "measure a process's writable working set and dirty rate, and estimate migration downtime",
         add_arguments)
def run(args: argparse.Namespace) -> int:
    from migrate.api import MigrationOptions
    from migrate.wss import WssMeter, WssOptions

    migration = MigrationOptions() if args.downtime_ms is None else MigrationOptions(downtime_target_ms=args.downtime_ms)
    options = WssOptions(interval_s=args.interval, count=args.count, tracker=args.tracker,
                         policy=migration.policy(),
                         **({} if args.bandwidth is None else {"bandwidth_bytes_s": args.bandwidth}))
    meter = WssMeter(args.pid, options)
    print(f"kcr-migrate: tracking pid {args.pid} with {meter.choice.name}: {meter.choice.reason}", file=sys.stderr)
    bw = options.bandwidth_bytes_s / MiB
    try:
        _measure(args, meter, bw)
    except KeyboardInterrupt:
        if args.count:
            raise
        # without --count a signal is how the measurement ends: the meter has let the process go
    return 0


def _measure(args: argparse.Namespace, meter: "WssMeter", bw: float) -> None:
    with meter:
        if not args.json:
            print(f"{'interval':>8} {'seconds':>8} {'dirty pages':>11} {'dirty MiB/s':>11} {'wss MiB':>9} "
                  f"{'est. downtime @' + format(bw, '.0f') + ' MiB/s':>26} {'rounds':>6}  stop", flush=True)
        for s in meter.samples():
            if args.json:
                row = s.as_dict()
                row["bandwidth_mib_s"] = round(bw, 3)
                print(json.dumps(row), flush=True)
                continue
            print(f"{s.interval:>8} {s.interval_s:>8.2f} {s.pages_dirty:>11} {s.dirty_rate_mib_s:>11.2f} "
                  f"{s.wss_pages * 4096 / MiB:>9.1f} {s.estimate.downtime_ms:>23.1f} ms {s.estimate.rounds:>6}  "
                  f"{s.estimate.stop_reason}", flush=True)
