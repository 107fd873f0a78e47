"""`kcr-migrate checkpoint PID -o FILE`: write a process's image, then kill it (or not)."""
from __future__ import annotations

import argparse
import os
import sys

from migrate.cli import REDIRECT_HELP, add_image_key, command, parse_pid, parse_redirect, settle, write_json
from transport.errors import MigrationError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pid", type=parse_pid, help="process to checkpoint")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="image file, or - for stdout")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists (once the new image is complete)")
    p.add_argument("--leave-running", action="store_true", help="let the process continue after the dump")
    p.add_argument("--redirect", type=parse_redirect, action="append", default=[], metavar="FD=PATH",
                   help=REDIRECT_HELP)
    p.add_argument("--stats-json", metavar="FILE", help="write the dump statistics as JSON")
    add_image_key(p)
    level = p.add_mutually_exclusive_group()
    level.add_argument("--compress-level", type=int, default=1, metavar="N", help="zstd level for pages (default 1)")
    level.add_argument("--no-compress", action="store_true", help="store pages uncompressed")


def check_output(path: str, force: bool) -> None:
    """Refuse, before anything is frozen, an image path that cannot be written as asked."""
    if path == "-":
        return
    if os.path.isdir(path):
        raise MigrationError(f"{path} is a directory: name a file in it (e.g. {os.path.join(path, 'image')})")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise MigrationError(f"{path}: folder {folder} does not exist (create it first)")
    if os.path.lexists(path) and not force:
        raise MigrationError(f"{path} exists: remove it, or add --force to replace it")


@command("checkpoint", "write a running process to an image (one stream: file, pipe or stdout)", add_arguments,
         teardown=False)
def run(args: argparse.Namespace) -> int:
    from migrate import images

    check_output(args.output, args.force)
    opts = images.CheckpointOptions(leave_running=args.leave_running, redirect=dict(args.redirect),
                                    compress_level=None if args.no_compress else args.compress_level,
                                    image_key=args.image_key)
    stats = images.checkpoint_to_path(args.pid, args.output, opts, on_complete=settle)   # the image is whole
    fate = "left running" if stats.left_running else "killed"
    if stats.processes > 1:
        what, fate = f"{stats.processes} processes, ", f"processes {fate}"
    else:
        what, fate = "", f"process {fate}"
    signed = f"; signed with {stats.signed_with}" if stats.signed_with else "; not signed"
    files = ""
    if stats.file_bytes:
        n = stats.file_bytes
        amount = f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} bytes"
        files = f", {amount} of files carried whole"
    print(f"checkpointed pid {stats.pid}: {what}{stats.threads} threads, {stats.pages_written} pages, "
          f"{stats.bytes_raw / 2**20:.1f} MiB raw{files}, {stats.bytes_on_wire / 2**20:.1f} MiB written, "
          f"frozen {stats.frozen_time_ms:.1f} ms; {fate}{signed}", file=sys.stderr)
    for w in stats.warnings:
        print(f"kcr-migrate: warning: {w}", file=sys.stderr)
    if args.stats_json:
        try:
            write_json(args.stats_json, stats.as_dict())
        except OSError as exc:     # the image is written all the same: still a success
            print(f"kcr-migrate: warning: could not write the statistics to {args.stats_json}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
    return 0
