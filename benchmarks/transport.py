#!/usr/bin/env python3
"""Transport throughput: page batches over the local, tcp and ssh channels between test hosts.

    python3 benchmarks/transport.py [--quick] [--json FILE] [--mib N] [--reps N] [--testbed-dir DIR]

Each case sends N MiB (1024; 256 with --quick) of realistic page data, batches of 2 MiB
mixing runs of zero (30%), text-like (40%) and random (30%) pages, from a kcr-agent on
hostA to the ``sink`` method of a kcr-agent, which decompresses and checks every batch:

  local   hostA's agent starts a second agent on hostA (socketpair, no SSH)
  tcp     to hostB's agent over the direct data channel (AES-256-GCM or ChaCha20-Poly1305, per-run key)
  ssh     to hostB's agent over SSH (asyncssh on hostA -> sshd on hostB -> kcr-agent)

each with compression off and on ("auto": the zstd level follows the link). Times run
from the first batch to the sink's answer (connection setup is reported apart). The floor
is raw TCP over loopback, measured in the same run: one process writes N MiB from a reused
buffer into a socket, another reads and drops them. Raw TCP from hostA to hostB over the
testbed's veth link is shown too. "x raw" divides a case's page bytes per second by the
loopback floor's.

Memory on the VMs this runs on is several times slower on first touch than afterwards and
freed memory goes back to the host within seconds. So every case is run once untimed (a
quarter of N) right before it is timed, the page pool (32 MiB) is built and touched before
any timing, and the raw floors write from buffers touched beforehand; the output says so.

The test hosts are brought up under /run/kcr-testbed-bench-transport (prefix kcrtb-,
10.77.218.0/24) and torn down at the end, unless --testbed-dir names a testbed already up.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))      # this checkout, whatever else is installed

import trio  # noqa: E402

from benchmarks._common import (  # noqa: E402
    MIB, BenchError, guarded, machine_info, raw_tcp, table, write_json)
from examples.testbed import Testbed, TestbedError  # noqa: E402
from transport.errors import MigrationError  # noqa: E402
from transport.ssh import open_ssh_agent  # noqa: E402
from transport.tcp import new_key  # noqa: E402

STATE_DIR = Path("/run/kcr-testbed-bench-transport")
PREFIX = "kcrtb-"
SUBNET = "10.77.218.0/24"
CALL_TIMEOUT = 900.0


def bring_up(args: argparse.Namespace) -> tuple[Testbed, bool]:
    if args.testbed_dir:
        bed = Testbed.from_state(args.testbed_dir)
        if not bed.is_up():
            raise BenchError(f"the testbed in {args.testbed_dir} is not healthy: examples/testbed.py status")
        return bed, False
    bed = Testbed(STATE_DIR, prefix=PREFIX, subnet=SUBNET)
    bed.down()
    bed.up()
    return bed, True


async def run_cases(bed: Testbed, size: int, reps: int, log: Any) -> list[dict[str, Any]]:
    config = str(bed.ssh_config_path)
    key = new_key()
    cases: list[dict[str, Any]] = []
    async with open_ssh_agent("hostB", ssh_config=config) as b, open_ssh_agent("hostA", ssh_config=config) as a:
        port = (await b.call("data_listen", key=key, address=bed.address("hostB")))["port"]
        targets = {
            "local": {"kind": "local"},
            "tcp": {"kind": "tcp", "address": bed.address("hostB"), "port": port, "key": key},
            "ssh": {"kind": "ssh", "host": "hostB", "ssh_config": config},
        }
        # Builds and touches the agent's page pool before anything is timed.
        await a.call("source_synthetic", total_bytes=4 * MIB, level=None, to=targets["local"], timeout=CALL_TIMEOUT)
        for channel, target in targets.items():
            for compression, level in (("off", None), ("on", "auto")):
                await a.call("source_synthetic", total_bytes=max(size // 4, 16 * MIB), level=level, to=target,
                             timeout=CALL_TIMEOUT)           # warm-up, untimed
                runs = [await a.call("source_synthetic", total_bytes=size, level=level, to=target,
                                     timeout=CALL_TIMEOUT) for _ in range(reps)]
                secs = [r["seconds"] for r in runs]
                best = runs[secs.index(statistics.median_low(secs))]
                if best["sink"]["bytes_raw"] != size:
                    raise BenchError(f"{channel}: the sink counted {best['sink']['bytes_raw']} of {size} bytes")
                case = {"channel": channel, "compression": compression, "bytes_raw": size,
                        "bytes_on_wire": best["bytes_on_wire"], "seconds": statistics.median(secs),
                        "seconds_all": secs, "setup_seconds": best["setup_seconds"],
                        "levels": best["batches_by_level"], "peak_bytes_held": best["peak_bytes_held"],
                        "sink_host": best["sink"].get("hostname")}
                cases.append(case)
                log(f"  {channel:5} compression {compression:3}: {size / case['seconds'] / MIB:8.0f} MiB/s")
    return cases


def render(cases: list[dict[str, Any]], raw: dict[str, float], size: int) -> str:
    floor = size / raw["loopback"]
    rows = [("channel", "compression", "MiB/s", "wire MiB/s", "wire/raw", "x raw", "zstd levels (batches)")]
    rows.append(("raw tcp loopback", "-", f"{floor / MIB:.0f}", f"{floor / MIB:.0f}", "1.00", "1.00", "-"))
    hosts = size / raw["hostA->hostB"]
    rows.append(("raw tcp hostA->hostB", "-", f"{hosts / MIB:.0f}", f"{hosts / MIB:.0f}", "1.00",
                 f"{hosts / floor:.2f}", "-"))
    for c in cases:
        rate = c["bytes_raw"] / c["seconds"]
        levels = ", ".join(f"{k}:{v}" for k, v in sorted(c["levels"].items())) or "-"
        rows.append((c["channel"], c["compression"], f"{rate / MIB:.0f}",
                     f"{c['bytes_on_wire'] / c['seconds'] / MIB:.0f}",
                     f"{c['bytes_on_wire'] / c['bytes_raw']:.2f}", f"{rate / floor:.2f}", levels))
    return table(rows, left=(0, 1, 6))


def bench(args: argparse.Namespace) -> int:
    size = (args.mib or (256 if args.quick else 1024)) * MIB
    reps = args.reps or (1 if args.quick else 3)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    t_start = time.monotonic()
    log(f"bringing up the test hosts ({'reusing ' + args.testbed_dir if args.testbed_dir else STATE_DIR}) ...")
    bed, owned = bring_up(args)
    try:
        log("warm-up: every case runs once untimed before it is timed; buffers are touched first")
        raw = {"loopback": min(raw_tcp(size) for _ in range(2)),
               "hostA->hostB": min(raw_tcp(size, bed=bed, src="hostA", dst="hostB") for _ in range(2))}
        log(f"  raw tcp loopback: {size / raw['loopback'] / MIB:.0f} MiB/s")
        try:
            cases = trio.run(run_cases, bed, size, reps, log)
        except MigrationError as exc:
            raise BenchError(str(exc)) from None
    finally:
        if owned:
            bed.down()
    print(f"transport throughput: {size // MIB} MiB of mixed pages (30% zero, 40% text-like, 30% random) "
          f"per case, hostA -> hostB, median of {reps}; cores: {os.cpu_count()}")
    print("memory warmed first: each case ran once untimed right before its timed runs "
          "(first touch of memory is slow on this VM)")
    print(render(cases, raw, size))
    print(f"(total {time.monotonic() - t_start:.0f} s)")
    if args.json:
        data = {"size_bytes": size, "reps": reps, "warmup": "each case once untimed at a quarter size; "
                "page pool and raw buffers touched before timing",
                "machine": machine_info(modules=["trio", "asyncssh", "cryptography", "zstandard"]),
                "raw_tcp_seconds": raw, "cases": cases}
        write_json(args.json, data)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="256 MiB per case, one timed run: under a minute")
    p.add_argument("--json", metavar="FILE", help="write every number and the machine's description as JSON")
    p.add_argument("--mib", type=int, help="page data per case (default 1024, 256 with --quick)")
    p.add_argument("--reps", type=int, help="timed runs per case (default 3, 1 with --quick)")
    p.add_argument("--testbed-dir", metavar="DIR", help="use the testbed already up in DIR")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks/transport.py: run as root (the test hosts need namespaces and sshd)", file=sys.stderr)
        return 1
    return guarded("benchmarks/transport.py", lambda: bench(args), errors=(BenchError, TestbedError))


if __name__ == "__main__":
    sys.exit(main())
