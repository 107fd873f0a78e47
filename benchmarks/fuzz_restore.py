#!/usr/bin/env python3
"""Restore fuzzing: crafted images through `kcr-migrate restore`, counted by outcome.

    python3 benchmarks/fuzz_restore.py [--quick] [--cases N] [--seed S] [--json FILE]

A real image of a small process (tests/workloads/fuzz_target.c: two threads, a handler, a
timer, a pipe with bytes in it, an eventfd, a file, a private file mapping, shared anonymous
memory) is mutated at the field level, mostly one change per case (one case in seven: two or
three): a record's integer set to a boundary or out-of-range value, a string, list or byte
string changed, a record dropped, repeated or moved, thread records made to disagree, bytes
flipped; then sealed again, unsigned, with valid checksums and end counts (tests/_fuzz.py,
shared with tests/test_fuzz_restore.py, which runs 40 such cases in CI). Each case is restored
with --trust-image in a process of its own, with system files read-only, under a new pid
(every fourth case under the image's pids), with a timeout.

The table counts the outcomes: restored (the process was rebuilt, then killed), refused
(non-zero exit with one error line), hung, traceback (or more than one error line), crashed
(killed by a signal, or no result), and leaks (processes a case left alive). Every one but the
first two is a bug: the cases are listed, with what to run again, and the exit status is 1.
Seeds are deterministic: --seed S --cases N makes the same changes to the same fields on any
machine (the values they replace, addresses and pids, differ from run to run). --quick runs
100 cases (about 20 s); the default is 1000 (about 3 minutes). --engine DIR restores with
another checkout's kcr-migrate, to compare versions on the same cases.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))      # this checkout's engine, whatever else is installed

from benchmarks._common import (  # noqa: E402
    BenchError, become_subreaper, guarded, machine_info, machine_summary, table, write_json,
)
from tests._fuzz import OUTCOMES, CASE_TIMEOUT, Outcome, make_image, run_case  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="100 cases (about half a minute)")
    p.add_argument("--cases", type=int, help="how many cases (default 1000; 100 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="the first case's seed (default 0)")
    p.add_argument("--timeout", type=float, default=CASE_TIMEOUT,
                   help=f"seconds before a case counts as hung (default {CASE_TIMEOUT:g})")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--engine", metavar="DIR", type=Path, default=REPO,
                   help="the kcr-migrate checkout that restores (default this one; the image is always made "
                        "by this one): to compare another version on the same cases")
    p.add_argument("--keep", metavar="DIR", help="keep the images of failed cases in DIR (default: a "
                   "temporary directory, removed)")
    args = p.parse_args(argv)
    cases = args.cases if args.cases is not None else (100 if args.quick else 1000)
    if cases < 1:
        raise BenchError("--cases must be at least 1")
    become_subreaper()
    with tempfile.TemporaryDirectory(prefix="kcr-fuzz-") as tmpdir:
        work = Path(args.keep) if args.keep else Path(tmpdir)
        try:
            image = make_image(work)
        except RuntimeError as exc:
            raise BenchError(str(exc)) from None
        outcomes: list[Outcome] = []
        t0 = time.monotonic()
        for seed in range(args.seed, args.seed + cases):
            outcomes.append(run_case(image, seed, work, timeout=args.timeout, engine=args.engine))
            done = len(outcomes)
            if done % 50 == 0 or done == cases:
                print(f"  {done}/{cases} cases, {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        total_s = time.monotonic() - t0
    counts = collections.Counter(o.result for o in outcomes)
    leaks = sum(bool(o.leaked) for o in outcomes)
    failed = [o for o in outcomes if not o.ok]
    machine = machine_info()
    engine = "" if args.engine == REPO else f", restored by the kcr-migrate in {args.engine}"
    print(f"restore of mutated images, seeds {args.seed}..{args.seed + cases - 1}, image {len(image)} bytes{engine}; "
          f"{machine_summary(machine)}")
    print(f"a case counts as hung after {args.timeout:g} s; median case {statistics.median(o.seconds for o in outcomes):.2f} s, "
          f"{total_s:.0f} s in all\n")
    rows = [["cases", "restored", "refused", "hung", "tracebacks", "crashed", "leaks"]]
    rows.append([str(cases), *(str(counts[r]) for r in OUTCOMES), str(leaks)])
    print(table(rows))
    kinds = collections.Counter(o.mutation.split(":")[0] if ";" not in o.mutation else "several" for o in outcomes)
    print("\nmutations: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    slow = sorted(outcomes, key=lambda o: -o.seconds)[:3]
    print("slowest: " + "; ".join(f"seed {o.seed} {o.seconds:.1f} s ({o.result}: {o.mutation})" for o in slow))
    if failed:
        print(f"\n{len(failed)} cases failed (run one again: --seed SEED --cases 1 --keep DIR):")
        for o in failed:
            print(f"  seed {o.seed}: {o.result}{' + leak ' + str(o.leaked) if o.leaked else ''}: {o.mutation}")
            print(f"    {o.detail.splitlines()[-1] if o.detail else ''}")
    if args.json:
        write_json(args.json, {
            "machine": machine, "engine": str(args.engine), "first_seed": args.seed, "cases": cases, "timeout_s": args.timeout,
            "image_bytes": len(image), "total_s": total_s,
            "counts": {r: counts[r] for r in OUTCOMES} | {"leaks": leaks},
            "failed": [{"seed": o.seed, "mutation": o.mutation, "result": o.result, "leaked": o.leaked,
                        "detail": o.detail} for o in failed],
            "outcomes": [{"seed": o.seed, "result": o.result, "seconds": round(o.seconds, 3),
                          "mutation": o.mutation, "detail": o.detail[:300]} for o in outcomes]})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(guarded("fuzz_restore.py", main))
