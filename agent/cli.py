"""`kcr-agent`: the per-host agent that kcr-migrate starts (locally, or over SSH).

    kcr-agent serve --stdio     serve the protocol on stdin/stdout (what kcr-migrate runs)
    kcr-agent info              print what the agent reports about this host, as JSON
    kcr-agent --version

Errors become one line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import trio

from agent.startup import grow_fd_table, keep_freed_memory
from transport.errors import MigrationError
from transport.protocol import PROTOCOL_VERSION, tool_version

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kcr-agent", description="The kcr-migrate agent of one host.")
    parser.add_argument("--version", action="version",
                        version=f"kcr-agent {tool_version()} (protocol {PROTOCOL_VERSION})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="serve kcr-migrate's requests",
                           description="Serve kcr-migrate's requests until it disconnects.")
    serve.add_argument("--stdio", action="store_true", required=True,
                       help="on stdin/stdout (how kcr-migrate starts it, locally or over ssh)")
    sub.add_parser("info", help="print this host's agent information as JSON")
    return parser


async def _info() -> dict[str, object]:
    from agent import serve
    from transport.local import socket_pair
    from transport.protocol import ROLE_AGENT, ROLE_ORCHESTRATOR
    from transport.rpc import open_rpc, serve_rpc

    ours, theirs = socket_pair()
    result: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_rpc(theirs, serve.METHODS, role=ROLE_AGENT,
                                             accept_roles=(ROLE_ORCHESTRATOR,)))
        async with open_rpc(ours, role=ROLE_ORCHESTRATOR, accept_roles=(ROLE_AGENT,)) as rpc:
            result = await rpc.call("info")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "serve":
            from agent import zygote
            from agent.serve import serve_stdio
            zygote.start()         # loaded, one thread, nothing run yet: holders are forked from it
            keep_freed_memory()
            grow_fd_table()
            return trio.run(serve_stdio)
        json.dump(trio.run(_info), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    except MigrationError as exc:
        print(f"kcr-agent: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("kcr-agent: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
