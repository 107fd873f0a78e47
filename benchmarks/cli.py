#!/usr/bin/env python3
"""Start-up of the command line: how long `kcr-migrate` takes to do its first thing.

    python3 benchmarks/cli.py [--quick] [--json FILE] [--reps N]

Each case runs this checkout's CLI (`python3 -m migrate ...`, as the tests do) in a fresh
process and times, from the spawn, its first byte on stdout ("first output", the moment a
user or a script sees it act) and its exit. The anchor is `python3 -c pass` in the same run:
the ratio columns divide each case's median by the anchor's median exit time, so they say
what kcr-migrate adds to starting Python on this machine, whatever its speed.

  anchor             python3 -c pass
  --version          kcr-migrate --version
  show (small)       kcr-migrate show IMAGE (a `sleep` process's image, ~30 KB, made here)
  restore (small)    kcr-migrate restore IMAGE --new-pid: first output is the restored process's
                     pid, printed once it runs (the restored copy is killed after each run)
  checkpoint --help  kcr-migrate checkpoint --help
  wss --help         kcr-migrate wss --help
  migrate --help     kcr-migrate migrate --help
  completion bash    kcr-migrate completion bash

Cases run in turn, round after round (20 rounds; 5 with --quick), after one untimed round, so
that a slow moment of the machine spreads over all of them. Every run must exit 0, or the
benchmark fails (exit 1). The image and its folder are removed at exit. The checkout's modules
are compiled to bytecode first (``ensure_bytecode``), as an installed kcr-migrate has them.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))      # this checkout's CLI, whatever else is installed

from benchmarks._common import (BenchError, ensure_bytecode, guarded, machine_info,  # noqa: E402
                                machine_summary, stop_on_signals, table, write_json)

KCR = [sys.executable, "-m", "migrate"]
ANCHOR = "anchor"
RESTORE = "restore (small)"


def cases(image: Path) -> dict[str, list[str]]:
    return {
        ANCHOR: [sys.executable, "-c", "pass"],
        "--version": [*KCR, "--version"],
        "show (small)": [*KCR, "show", str(image)],
        RESTORE: [*KCR, "restore", str(image), "--new-pid"],
        "checkpoint --help": [*KCR, "checkpoint", "--help"],
        "wss --help": [*KCR, "wss", "--help"],
        "migrate --help": [*KCR, "migrate", "--help"],
        "completion bash": [*KCR, "completion", "bash"],
    }


def env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


def timed(argv: list[str]) -> tuple[float, float, bytes]:
    """(seconds to the first byte on stdout, or to the exit if it prints none; seconds to the
    exit; what it printed)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=REPO, env=env(), close_fds=True)
    assert p.stdout is not None and p.stderr is not None
    first = p.stdout.read(1)
    t_first = time.perf_counter() - t0
    rest = p.stdout.read()
    err = p.stderr.read()
    p.wait()
    t_exit = time.perf_counter() - t0
    p.stdout.close()
    p.stderr.close()
    if p.returncode != 0:
        raise BenchError(f"`{' '.join(argv[1:])}` exited with {p.returncode}: {err.decode().strip()[-300:]}")
    return (t_first if first else t_exit), t_exit, first + rest


def end_restored(printed: bytes) -> None:
    """Kill the process a `restore` printed the pid of (it is not our child) and wait until it is gone."""
    try:
        pid = int(printed.split()[0])
    except (IndexError, ValueError):
        raise BenchError(f"restore printed no pid: {printed[:200]!r}") from None
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:   # reaped by init: no event to wait on
        time.sleep(0.01)


def small_image(folder: Path) -> Path:
    """The image of a `sleep` process (left running, then ended)."""
    sleeper = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    image = folder / "sleep.img"
    try:
        res = subprocess.run([*KCR, "checkpoint", str(sleeper.pid), "-o", str(image), "--leave-running"],
                             capture_output=True, cwd=REPO, env=env(), timeout=120)
        if res.returncode != 0:
            raise BenchError(f"could not checkpoint a sleep process: {res.stderr.decode().strip()}")
    finally:
        sleeper.kill()
        sleeper.wait()
    return image


def measure(reps: int, folder: Path) -> dict[str, Any]:
    image = small_image(folder)
    runs = cases(image)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for rnd in range(reps + 1):
        for name, argv in runs.items():
            first, exits, printed = timed(argv)
            if name == RESTORE:
                end_restored(printed)
            if rnd:                        # round 0 warms the page cache and is not counted
                samples[name].append((first, exits))
    anchor = statistics.median(e for _, e in samples[ANCHOR])
    out = []
    for name, argv in runs.items():
        first = [f for f, _ in samples[name]]
        exits = [e for _, e in samples[name]]
        out.append({"case": name, "argv": [os.path.basename(argv[0]), *argv[1:]],
                    "first_output_median_ms": statistics.median(first) * 1000,
                    "exit_median_ms": statistics.median(exits) * 1000, "exit_min_ms": min(exits) * 1000,
                    "first_output_ratio": statistics.median(first) / anchor,
                    "exit_ratio": statistics.median(exits) / anchor})
    return {"image_bytes": image.stat().st_size, "cases": out}


def render(result: dict[str, Any]) -> str:
    rows = [["case", "first output ms", "exit ms", "exit min ms", "first/anchor", "exit/anchor"]]
    for c in result["cases"]:
        rows.append([c["case"], f"{c['first_output_median_ms']:.1f}", f"{c['exit_median_ms']:.1f}",
                     f"{c['exit_min_ms']:.1f}", f"{c['first_output_ratio']:.2f}", f"{c['exit_ratio']:.2f}"])
    return table(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="5 rounds instead of 20 (a few seconds)")
    p.add_argument("--reps", type=int, help="timed rounds (default 20; 5 with --quick)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = p.parse_args(argv)
    reps = args.reps or (5 if args.quick else 20)
    if reps < 1:
        p.error("--reps must be at least 1")
    stop_on_signals(signal.SIGTERM, signal.SIGHUP)

    def body() -> int:
        print(ensure_bytecode(), flush=True)
        machine = machine_info()
        with tempfile.TemporaryDirectory(prefix="kcr-bench-cli-") as folder:
            result = measure(reps, Path(folder))
        result = {"benchmark": "cli", "machine": machine, "rounds": reps, **result}
        print(f"machine: {machine_summary(machine)}, Python {machine['python']}")
        print(f"kcr-migrate start-up, median of {reps} rounds; anchor: python3 -c pass "
              f"(show reads a {result['image_bytes'] / 1024:.0f} KiB image)")
        print(render(result))
        if args.json:
            write_json(args.json, result)
        return 0
    return guarded("benchmarks/cli.py", body)


if __name__ == "__main__":
    sys.exit(main())
