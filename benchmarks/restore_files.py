#!/usr/bin/env python3
"""What opening files as the restored process costs (issue 13, ``agent.as_target``).

    python3 benchmarks/restore_files.py [--fds N] [--reps N] [--json FILE]

A job (benchmarks/workloads/bench_fds.c, compiled here) holds N open files (50 by default)
and maps four; it runs as root and as nobody. It is checkpointed once, then restored --reps
times under a new pid (each copy killed after): the table gives the engine's
``restore_time_ms`` (median, min). As root the restorer already is who the process is: no
switch; as nobody every open (and the checks of mapped files) runs as uid 65534. Beside it, a
floor: the same N files opened by plain os.open and by ``Identity.open_path`` as nobody, in
this process (the per-open price inside the frozen window).

Run it from two checkouts (``PYTHONPATH=CHECKOUT``) to compare before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._common import KCR, BenchError, become_subreaper, compile_c, guarded, run_tool, table, write_json  # noqa: E402

NOBODY = 65534


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fds", type=int, default=50)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", default="")
    args = p.parse_args()
    become_subreaper()
    rows, doc = [], {"fds": args.fds, "reps": args.reps, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="kcr-bench-fds-") as tmp:
        os.chmod(tmp, 0o755)
        exe = Path(tmp) / "bench_fds"
        compile_c(REPO / "benchmarks" / "workloads" / "bench_fds.c", exe)
        for who, uid in (("root", 0), ("nobody", NOBODY)):
            times = restore_times(Path(tmp) / who, exe, uid, args.fds, args.reps)
            doc["runs"][who] = times
            rows.append([f"restore, {args.fds} fds, as {who}", f"{statistics.median(times):.1f}", f"{min(times):.1f}"])
        try:
            plain, as_target, batched = open_floor(Path(tmp) / "nobody", args.fds)
        except ImportError:         # a checkout from before agent.as_target
            pass
        else:
            doc["open_us"] = {"plain": plain, "as_process": as_target, "as_process_one_switch": batched}
            rows.append(["one open, os.open (us)", f"{plain:.1f}", ""])
            rows.append(["one open as nobody, a switch each (us)", f"{as_target:.1f}", ""])
            rows.append([f"one open as nobody, one switch for {args.fds} (us)", f"{batched:.1f}", ""])
    print(table([["", "median ms", "min ms"], *rows]))
    if args.json:
        write_json(args.json, doc)
    return 0


def restore_times(work: Path, exe: Path, uid: int, fds: int, reps: int) -> list[float]:
    work.mkdir()
    os.chown(work, uid, uid)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 1024)
        os.execv(str(exe), [str(exe), str(work), str(fds)])
    deadline = time.monotonic() + 10
    while not (work / "ready").exists():
        if time.monotonic() > deadline:
            raise BenchError("the job did not get ready")
        time.sleep(0.01)
    image = work / "image"
    _, code, _, err = run_tool([*KCR, "checkpoint", str(pid), "-o", str(image)])
    if code:
        raise BenchError(f"checkpoint failed: {err.strip()}")
    os.waitpid(pid, 0)
    times = []
    for _ in range(reps):
        _, code, out, err = run_tool([*KCR, "restore", "-i", str(image), "--new-pid", "--json"])
        if code:
            raise BenchError(f"restore failed: {err.strip()}")
        result = json.loads(out)
        times.append(result["restore_time_ms"])
        os.kill(result["pid"], signal.SIGKILL)
        os.waitpid(result["pid"], 0)
    return times


def open_floor(work: Path, fds: int, rounds: int = 50) -> tuple[float, float, float]:
    """Microseconds per open (best of ``rounds``): plain, and as nobody."""
    from agent.as_target import Identity
    paths = [str(work / f"f{i:03d}") for i in range(fds)]
    nobody = Identity(NOBODY, NOBODY, ())

    def per_open(opener, once: bool = False) -> float:  # type: ignore[no-untyped-def]
        best = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            if once:
                with nobody.acting():
                    fds_ = [opener(path) for path in paths]
            else:
                fds_ = [opener(path) for path in paths]
            best = min(best, time.perf_counter() - t)
            for fd in fds_:
                os.close(fd)
        return best / fds * 1e6
    plain = per_open(lambda path: os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    as_target = per_open(lambda path: nobody.open_path(path, os.O_RDONLY | os.O_CLOEXEC))
    batched = per_open(lambda path: nobody.open_path(path, os.O_RDONLY | os.O_CLOEXEC), once=True)
    return plain, as_target, batched


if __name__ == "__main__":
    sys.exit(guarded("restore_files", main))
