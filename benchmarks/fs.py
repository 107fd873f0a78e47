#!/usr/bin/env python3
"""Filesystem hooks: rsync against btrfs send/receive, moving a job's data directory with it.

    python3 benchmarks/fs.py [--quick] [--json FILE] [--mib N] [--rate MIB_S] [--reps N] [--no-warmup]

The data directory (/srv/data, a btrfs subvolume on hostA) holds N MiB (1024; 256 with
--quick) of random data in 16 MiB files. A job inside hostA rewrites R MiB/s of it (10), in
1 MiB chunks of fresh random data at random chunk-aligned places of random files, through
descriptors it keeps open. It is moved to hostB with

    kcr-migrate PID@hostA hostB --json --fs rsync:/srv/data
    kcr-migrate PID@hostA hostB --json --fs btrfs:/srv/data

and the report gives, per hook: the final pass (with the job frozen, so inside the
downtime), the bytes the hook sent over ssh in all passes and in the final one, the number
of passes, the job's downtime and the migration's total time. Each figure is the median of
--reps runs (3; 1 with --quick), the two hooks interleaved run by run. A run counts only if
the migration reports "done" and hostB's copy is identical to hostA's as the job left it
(sizes and sha256 of every file, checked after each run with the job stopped).

Warm-up (unless --no-warmup): the data set is read once on hostA (page cache), and one
untimed migration with each hook runs first (agents' imports, ssh, btrfs metadata); the
output says so. Both hooks write to btrfs on hostB, so they are compared on the same
filesystems. The test hosts come up under /run/kcr-testbed-fsbench (prefix kcrq-,
10.77.222.0/24, btrfs /srv on loop devices) and are torn down at the end, also on Ctrl-C or
SIGTERM, with every process the run started.
"""
from __future__ import annotations

import argparse
import json
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
sys.path.insert(0, str(REPO))      # this checkout's tool, whatever else is installed

from benchmarks._common import (  # noqa: E402
    CLI_TIMEOUT, MIB, BenchError, become_subreaper, guarded, machine_info, machine_summary, stop_on_signals,
    write_json)
from examples.testbed import Testbed, TestbedError  # noqa: E402

STATE_DIR = Path("/run/kcr-testbed-fsbench")
PREFIX = "kcrq-"
SUBNET = "10.77.222.0/24"
DATA = "/srv/data"
FILE_MIB = 16
CHUNK = 1 << 20
HOOKS = ("rsync", "btrfs")

WRITER = r"""
import os, random, sys, time
data, rate, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
names = sorted(os.listdir(data))
fds = [os.open(os.path.join(data, n), os.O_RDWR) for n in names]
chunks = [os.fstat(fd).st_size // (1 << 20) for fd in fds]
rng = random.Random(os.urandom(16))    # fresh data every run: never what an earlier run wrote
period = 1 / rate                      # one 1 MiB chunk per period
me = os.getpid()
open(os.path.join(out, "ready"), "w").close()
due = time.monotonic()
while True:
    i = rng.randrange(len(fds))
    chunk, at = rng.randbytes(1 << 20), rng.randrange(chunks[i]) << 20
    if os.getpid() != me:              # moved: stop writing, so the copies can be compared
        open(os.path.join(out, "moved"), "w").close()
        while True:
            time.sleep(3600)
    os.pwrite(fds[i], chunk, at)
    due += period
    time.sleep(max(0.0, due - time.monotonic()))
"""

FILL = r"""
import os, random, sys
data, mib, file_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(1)
for i in range(mib // file_mib):
    with open(os.path.join(data, f"f{i:03d}"), "wb") as f:
        for _ in range(file_mib):
            f.write(rng.randbytes(1 << 20))
"""

DIGEST = r"""
import hashlib, json, os, sys
out = {}
for name in sorted(os.listdir(sys.argv[1])):
    h = hashlib.sha256()
    with open(os.path.join(sys.argv[1], name), "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    out[name] = h.hexdigest()
print(json.dumps(out))
"""


def sh(bed: Testbed, host: str, script: str, timeout: float = 600) -> str:
    proc = bed.exec(host, ["sh", "-c", script], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise BenchError(f"{host}: `{script}` failed: {proc.stderr.strip()}")
    return str(proc.stdout)


def py(bed: Testbed, host: str, code: str, *args: str, timeout: float = 600) -> str:
    proc = bed.exec(host, [sys.executable, "-S", "-c", code, *args], capture_output=True, text=True,
                    timeout=timeout)
    if proc.returncode != 0:
        raise BenchError(f"{host}: a helper script failed: {proc.stderr.strip()[-300:]}")
    return str(proc.stdout)


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.02)
    raise BenchError(f"pid {pid} is still there after {timeout:g} s")


class Run:
    """One migration of the writer with one hook, and what it measured."""

    def __init__(self, bed: Testbed, hook: str, rate: float, work: Path) -> None:
        self.bed, self.hook, self.rate, self.work = bed, hook, rate, work

    def go(self) -> dict[str, Any]:
        bed = self.bed
        sh(bed, "hostB", f"btrfs subvolume delete {DATA} >/dev/null 2>&1 || rm -rf {DATA}; btrfs subvolume sync /srv")
        out = Path(tempfile.mkdtemp(prefix=f"{self.hook}-", dir=self.work))
        script = self.work / "writer.py"
        script.write_text(WRITER)
        writer = bed.popen("hostA", [sys.executable, "-S", str(script), DATA, str(self.rate), str(out)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
        new_pid = 0
        try:
            deadline = time.monotonic() + 30
            while not (out / "ready").exists():
                if writer.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("the writer did not start")
                time.sleep(0.02)
            time.sleep(1.0)             # writing at its rate
            t0 = time.monotonic()
            res = subprocess.run([sys.executable, "-m", "migrate", f"{writer.pid}@hostA", "hostB", "--json",
                                  "--new-pid", "--ssh-config", str(bed.ssh_config_path), "--fs", f"{self.hook}:{DATA}"],
                                 capture_output=True, text=True, timeout=CLI_TIMEOUT, cwd=REPO)
            wall = time.monotonic() - t0
            lines = res.stdout.strip().splitlines()
            report = json.loads(lines[-1]) if lines else {}
            if res.returncode != 0 or report.get("state") != "done":
                raise BenchError(f"{self.hook}: migration failed: {res.stderr.strip()[-400:]}")
            new_pid = int(report["new_pid"])
            writer.wait(timeout=30)          # ended by the migration
            deadline = time.monotonic() + 30
            while not (out / "moved").exists():     # it stops writing once it sees its new pid
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.hook}: the moved job does not run on hostB")
                time.sleep(0.02)
            if json.loads(py(bed, "hostB", DIGEST, DATA)) != json.loads(py(bed, "hostA", DIGEST, DATA)):
                raise BenchError(f"{self.hook}: hostB's copy differs from what the job left on hostA")
            return self.figures(report, wall)
        finally:
            if writer.poll() is None:
                writer.kill()
            writer.wait()
            if new_pid:
                try:
                    os.kill(new_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                wait_gone(new_pid)

    def figures(self, report: dict[str, Any], wall: float) -> dict[str, Any]:
        (fs,) = report["fs"]
        passes, final = fs["passes"], fs["final"]
        return {
            "final_pass_ms": float(final["seconds"]) * 1000,
            "final_bytes": int(final["bytes_sent"]),
            "total_bytes": sum(int(p["bytes_sent"]) for p in passes) + int(final["bytes_sent"]),
            "passes": len(passes),
            "first_pass_s": float(passes[0]["seconds"]) if passes else 0.0,
            "downtime_ms": float(report["downtime_ms"]),
            "migration_s": float(report["total_ms"]) / 1000,
            "wall_s": wall,
            "final": final,
            "pass_details": passes,
        }


# --- the table -----------------------------------------------------------------------------

ROWS = (
    ("final_pass_ms", "final pass, job frozen (ms)", "{:.0f}"),
    ("downtime_ms", "downtime of the job (ms)", "{:.0f}"),
    ("final_bytes", "sent in the final pass (MiB)", "mib"),
    ("total_bytes", "sent in all passes (MiB)", "mib"),
    ("passes", "passes before the final one", "{:.0f}"),
    ("first_pass_s", "first pass (s)", "{:.2f}"),
    ("migration_s", "migration, preflight to commit (s)", "{:.2f}"),
)


def median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(float(r[key]) for r in runs))


def render(results: dict[str, list[dict[str, Any]]]) -> tuple[str, dict[str, dict[str, float]]]:
    table: dict[str, dict[str, float]] = {}
    width = max(len(label) for _, label, _ in ROWS)
    lines = [f"{'':<{width}}  {'rsync':>10}  {'btrfs':>10}"]
    for key, label, fmt in ROWS:
        row = {hook: median(runs, key) for hook, runs in results.items()}
        table[key] = row
        cells = [(f"{row[h] / MIB:.1f}" if fmt == "mib" else fmt.format(row[h])) for h in HOOKS]
        lines.append(f"{label:<{width}}  {cells[0]:>10}  {cells[1]:>10}")
    return "\n".join(lines), table


# --- the run -------------------------------------------------------------------------------

def bench(args: argparse.Namespace, bed: Testbed, work: Path) -> int:
    mib = args.mib or (256 if args.quick else 1024)
    mib -= mib % FILE_MIB
    reps = args.reps or (1 if args.quick else 3)
    m = machine_info(tools=[["rsync", "--version"], ["btrfs", "--version"], ["ssh", "-V"]], revision=False)
    print(f"machine: {machine_summary(m)}; Python {m['python']}; {m['rsync']}; {m['btrfs']}; {m['ssh']}", flush=True)
    print(f"hosts: {bed.state_dir} (btrfs /srv on loop devices, ssh between them)", flush=True)
    sh(bed, "hostA", f"btrfs subvolume create {DATA} >/dev/null")
    t0 = time.monotonic()
    py(bed, "hostA", FILL, DATA, str(mib), str(FILE_MIB))
    sh(bed, "hostA", "sync")
    print(f"data: {mib} MiB in {mib // FILE_MIB} files of {FILE_MIB} MiB on hostA:{DATA} "
          f"(written in {time.monotonic() - t0:.1f} s); the job rewrites {args.rate:g} MiB/s of it in 1 MiB "
          "chunks of fresh random data", flush=True)
    if args.no_warmup:
        print("warm-up: NOT done (--no-warmup): cold caches and first connections are in the figures", flush=True)
    else:
        t0 = time.monotonic()
        sh(bed, "hostA", f"cat {DATA}/* > /dev/null")
        for hook in HOOKS:
            Run(bed, hook, args.rate, work).go()
        print(f"warm-up: read the data once and ran one untimed migration with each hook "
              f"({time.monotonic() - t0:.1f} s)", flush=True)
    results: dict[str, list[dict[str, Any]]] = {h: [] for h in HOOKS}
    for i in range(reps):
        for hook in HOOKS if i % 2 == 0 else tuple(reversed(HOOKS)):
            r = Run(bed, hook, args.rate, work).go()
            results[hook].append(r)
            print(f"run {i + 1}/{reps} {hook}: final pass {r['final_pass_ms']:.0f} ms, downtime "
                  f"{r['downtime_ms']:.0f} ms, sent {r['total_bytes'] / MIB:.1f} MiB in {r['passes']} passes + "
                  f"final ({r['final_bytes'] / MIB:.2f} MiB), migration {r['migration_s']:.1f} s", flush=True)
    text, table = render(results)
    print(f"\nfs hooks: {mib} MiB data directory, rewritten at {args.rate:g} MiB/s, hostA -> hostB; "
          f"median of {reps}")
    print(text, flush=True)
    if args.json:
        write_json(args.json, {
            "benchmark": "fs", "machine": m, "data_mib": mib, "file_mib": FILE_MIB, "rate_mib_s": args.rate,
            "reps": reps, "warmup": not args.no_warmup, "median": table, "runs": results})
        print(f"wrote {args.json}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="256 MiB, one run per hook (under a minute)")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.add_argument("--mib", type=int, help="size of the data directory (default 1024; 256 with --quick)")
    p.add_argument("--rate", type=float, default=10.0, metavar="MIB_S", help="rewrite rate (default 10)")
    p.add_argument("--reps", type=int, help="runs per hook (default 3; 1 with --quick)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("fs.py: must run as root (test hosts, ptrace)", file=sys.stderr)
        return 2
    stop_on_signals(signal.SIGTERM)
    become_subreaper()
    mib = args.mib or (256 if args.quick else 1024)
    bed = Testbed(STATE_DIR, prefix=PREFIX, subnet=SUBNET, srv_fs="btrfs", srv_size=max(2 << 30, mib * MIB * 5))

    def run() -> int:
        with tempfile.TemporaryDirectory(prefix="kcr-fsbench-") as work:
            try:
                bed.up()
                return bench(args, bed, Path(work))
            finally:
                bed.down()
    return guarded("fs.py", run, interrupted="interrupted; hosts torn down", errors=(BenchError, TestbedError))


if __name__ == "__main__":
    sys.exit(main())
