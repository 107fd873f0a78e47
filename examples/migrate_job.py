#!/usr/bin/env python3
"""Move a running job with the library API, as a cluster manager would.

    sudo python3 examples/migrate_job.py PID [SOURCE] [DEST] [--ssh-config FILE] [--new-pid]

SOURCE and DEST default to localhost. The job keeps its pid unless --new-pid (which moving
from a host to itself needs: the source holds the pid until the copy runs). Shows the events
as they come, then the report; on failure the job runs on at the source and the error says
what to do.
"""
from __future__ import annotations

import argparse
import sys

import trio

from migrate import Finished, Migration, MigrationError, MigrationOptions, PhaseChanged, RoundDone


async def main(pid: int, source: str, dest: str, ssh_config: str | None, new_pid: bool) -> int:
    options = MigrationOptions(downtime_target_ms=20, ssh_config=ssh_config, new_pid=new_pid)
    migration = Migration(pid, source, dest, options)
    async with trio.open_nursery() as nursery:
        outcome: dict[str, object] = {}

        async def run() -> None:
            try:
                outcome["report"] = await migration.run()
            except MigrationError as exc:
                outcome["error"] = exc

        nursery.start_soon(run)
        async for event in migration.events():
            if isinstance(event, PhaseChanged):
                print(f"phase: {event.phase}")
            elif isinstance(event, RoundDone):
                s = event.stats
                print(f"  round {event.round}: {s['pages_written']} pages, {s['dirty_rate_mib_s']:.1f} MiB/s dirtied")
            elif isinstance(event, Finished):
                break
    if "error" in outcome:
        print(f"migration failed ({migration.report.state}): {outcome['error']}", file=sys.stderr)
        return 1
    r = migration.report
    print(f"pid {pid}@{source} runs as pid {r.new_pid}@{dest}: {r.rounds} rounds ({r.stop_reason}), "
          f"downtime {r.downtime_ms:.1f} ms, {r.bytes_on_wire / 2**20:.1f} MiB sent")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pid", type=int)
    parser.add_argument("source", nargs="?", default="localhost")
    parser.add_argument("dest", nargs="?", default="localhost")
    parser.add_argument("--ssh-config")
    parser.add_argument("--new-pid", action="store_true")
    args = parser.parse_args()
    sys.exit(trio.run(main, args.pid, args.source, args.dest, args.ssh_config, args.new_pid))
