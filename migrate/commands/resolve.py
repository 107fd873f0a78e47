"""`kcr-migrate resolve PID@HOST --kill|--resume`: settle a source left stopped by a migration
whose destination did not confirm it runs the process."""
from __future__ import annotations

import argparse
import sys

from migrate.cli import command, deferred_signals, settle, watch_signals
from migrate.commands.migrate import parse_source


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=parse_source, metavar="PID@HOST", help="the stopped source process")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--kill", action="store_true", help="the destination runs it: end the source")
    what.add_argument("--resume", action="store_true", help="the destination does not run it: let the source go on")
    p.add_argument("--ssh-config", metavar="FILE", help="ssh config to use (as ssh -F FILE)")


async def _resolve(pid: int, host: str, action: str, ssh_config: str | None) -> dict[str, object]:
    """Ask the host's agent to settle the pid; a signal stops the asking (exit status unsettled:
    the agent may or may not have acted, and running this again is safe)."""
    import trio

    from migrate.orchestrator import MigrationUnsettled, is_local
    from transport._nursery import service_nursery
    from transport.local import open_local_agent
    from transport.ssh import open_ssh_agent

    with trio.CancelScope() as asking:
        async with service_nursery() as nursery:
            await nursery.start(watch_signals, asking.cancel)
            try:
                ctx = open_local_agent() if is_local(host) else open_ssh_agent(host, ssh_config=ssh_config)
                async with ctx as rpc:
                    return await rpc.call("resolve", pid=pid, action=action)
            finally:
                nursery.cancel_scope.cancel()
    raise MigrationUnsettled(f"interrupted: pid {pid}@{host} may still be stopped; run `kcr-migrate resolve "
                             f"{pid}@{host} --{action}` again", pid=pid)


@command("resolve", "settle a source process a migration left stopped (--kill or --resume)", add_arguments)
def run(args: argparse.Namespace) -> int:
    import trio

    pid, host = args.source
    action = "kill" if args.kill else "resume"
    with deferred_signals():
        trio.run(_resolve, pid, host, action, args.ssh_config)
        settle()          # done: a signal from now on changes nothing
    done = "ended" if action == "kill" else "running again"
    print(f"pid {pid}@{host} is {done}", file=sys.stderr)
    return 0
