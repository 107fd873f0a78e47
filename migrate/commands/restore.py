"""`kcr-migrate restore FILE` (or `-i FILE`): bring an image back to life; prints the new pid."""
from __future__ import annotations

import argparse
import json
import sys

from migrate.cli import EXIT_USAGE, add_image_input, add_image_key, add_placement, command, image_input, settle


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_image_input(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--new-pid", action="store_true",
                   help="restore under a new pid (and thread ids) instead of the process's own")
    add_placement(p)
    add_image_key(p)
    p.add_argument("--trust-image", action="store_true",
                   help="restore an image that is not signed, or whose signature does not verify with the "
                        "image key: only one you trust (whoever can edit it chooses what runs, as whom)")


@command("restore", "restore a process from an image and let it run (it is not the tool's child)", add_arguments,
         teardown=False)
def run(args: argparse.Namespace) -> int:
    from migrate import image_restore
    from transport.image import open_input

    path = image_input(args, "restore")
    if path is None:
        return EXIT_USAGE
    with open_input(path) as src:
        result = image_restore.restore(src, new_pid=args.new_pid, trust_image=args.trust_image,
                                       image_key=args.image_key, on_running=settle, affinity=args.affinity,
                                       cgroup=args.cgroup)
    for w in result.warnings:
        print(f"kcr-migrate: warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(result.pid)
    return 0

