#!/usr/bin/env python3
"""Faults during a live migration: does the process survive, exactly once, whatever dies when?

    python3 benchmarks/faults.py [--quick] [--trials N] [--cells PARTY:PHASE,...] [--json FILE]

For each fault x phase a job (tests/workloads/mig_dirty.c: it dirties its memory, then prints a
checksum of it, which must equal an unmoved run's) is moved live from hostA to hostB (test hosts
of examples/testbed.py, under /run/kcr-testbed-faults, prefix kcrf-, 10.77.222.0/24), by the CLI
in a process of its own (`kcr-migrate ... --events`). When the CLI reports the phase, the fault is
injected from outside:

* kill-cli, kill-src-agent, kill-dst-agent, kill-holder: SIGKILL of that process (the agents and
  the holder are found by their command lines in the host's network namespace);
* blip-src, blip-dst: that host's link down for 1 s (`ip link set VETH down`, then up);
* cut-src, cut-dst: that host's link down until the trial has been judged.

The processes a fault kills are looked up as pre-copy begins, so that at its phase it strikes
within about a millisecond of the CLI's event (looked up then, the kill landed tens of ms late,
past the few ms the commit-asked window lasts).

Phases (the protocol core's, ``migrate.phases``): precopy (0.3 s into round 0), final (the job
frozen, the last pages on their way), restore (the state sent; the destination rebuilding the
process), commit-asked-restoring (the source asked to commit while the destination rebuilds),
commit-asked (the destination holds it ready; the source is asked to commit, or has), go (the
source committed: GO is on its way to the destination).

Each trial is then judged, --link-timeout (3 s) + 2 s after the fault and after the CLI has ended:

* ok: exactly one copy runs, and ends with the unmoved run's output;
* resolved: the source was left stopped past the point of no return and `kcr-migrate resolve`
  (--kill if the destination's copy runs, --resume if not) settled it, then as ok;
* lost: no copy runs (nor can resolve bring one back); doubled: two run; corrupt: one ran with a
  wrong output (or died); stuck: the source still frozen by a tracer (state t);
* leaks (counted beside the outcome): agents, holders or stopped copies still there;
* untrue: the CLI said the source runs on and it does not.

Needs root (namespaces, ptrace) and a C compiler. --quick runs 4 cells once, in under a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks._common import (  # noqa: E402
    KCR, BenchError, compile_c, guarded, machine_info, machine_summary, stop_on_signals, table, write_json)
from examples.testbed import Testbed, TestbedError  # noqa: E402

STATE_DIR = Path("/run/kcr-testbed-faults")
PREFIX = "kcrf-"
SUBNET = "10.77.222.0/24"
WORKLOAD_SRC = REPO / "tests" / "workloads" / "mig_dirty.c"
JOB = ("32", "40", "500")           # 32 MiB dirtied at 40 MiB/s for 500 steps (5 s and more)
BANDWIDTH = "24MiB"                 # round 0 takes ~1.3 s, the final round about as long
PARTIES = ("kill-cli", "kill-src-agent", "kill-dst-agent", "kill-holder", "blip-src", "blip-dst", "cut-src",
           "cut-dst")
PHASES = ("precopy", "final", "restore", "commit-asked-restoring", "commit-asked", "go")
QUICK = (("kill-holder", "final"), ("kill-src-agent", "final"), ("cut-src", "final"), ("kill-dst-agent", "go"))
OUTCOMES = ("ok", "resolved", "lost", "doubled", "corrupt", "stuck", "no-fault")
GRACE_S = 2.0
BLIP_S = 1.0


def log(msg: str) -> None:
    print(msg, flush=True)


# -- processes in the hosts -----------------------------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def state(pid: int) -> str | None:
    """The process's state letter; None once it is gone (a zombie is gone)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    s = stat.rsplit(")", 1)[1].split()[0]
    return None if s in ("Z", "X") else s


def netns(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def processes() -> list[tuple[int, list[str]]]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            cmd = _read(f"/proc/{entry}/cmdline")
            if cmd:
                out.append((int(entry), cmd.rstrip("\0").split("\0")))
    return out


def ours(bed: Testbed, host: str) -> dict[str, list[int]]:
    """The tool's processes in ``host``: agents and holders (by command line), live ones."""
    ns = os.stat(bed.netns_path(host)).st_ino
    found: dict[str, list[int]] = {"agent": [], "holder": [], "deputy": []}
    for pid, argv in processes():
        if "python" not in os.path.basename(argv[0]) or state(pid) is None or netns(pid) != ns:
            continue
        if any(a.endswith("kcr-agent") or a == "agent.serve" for a in argv[1:3]):
            found["agent"].append(pid)
        elif "agent.holder" in argv[1:3]:
            found["holder"].append(pid)
        elif "agent.deputy" in argv[1:3]:
            found["deputy"].append(pid)
    return found


def copies(marker: str) -> dict[int, str]:
    """Live processes whose command line names ``marker`` (a job's directory): pid -> state."""
    out = {}
    for pid, argv in processes():
        if any(marker in a for a in argv):
            s = state(pid)
            if s is not None:
                out[pid] = s
    return out


def kill(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


# -- one trial ------------------------------------------------------------------------------

@dataclass
class Trial:
    fault: str
    phase: str
    outcome: str = ""
    injected: bool = False
    cli_code: int | None = None
    cli_said: str = ""
    state_after: str | None = None      # the source's state when judged
    dest_after: dict[int, str] = field(default_factory=dict)
    leaks: list[str] = field(default_factory=list)
    untrue: bool = False
    resolve: str = ""
    seconds: float = 0.0


class Run:
    def __init__(self, bed: Testbed, tmp: Path, exe: Path, reference: str, link_timeout: float) -> None:
        self.bed = bed
        self.tmp = tmp
        self.exe = exe
        self.reference = reference
        self.link_timeout = link_timeout
        self.count = 0

    def kcr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*KCR, *args, "--ssh-config", str(self.bed.ssh_config_path)], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def link(self, host: str, up: bool) -> None:
        subprocess.run(["ip", "link", "set", self.bed.veth_name(host), "up" if up else "down"], check=True)

    def injector(self, fault: str, cli: subprocess.Popen[str]) -> Callable[[], None]:
        """The fault, ready to strike: the processes it kills are looked up now (a scan of
        /proc takes tens of ms), so that injecting it at its phase takes about a millisecond
        and lands inside short windows (commit-asked is a few ms)."""
        what, _, who = fault.partition("-")
        host = "hostB" if who.startswith("dst") else "hostA"
        if what == "kill":
            def lookup() -> list[int]:
                if fault == "kill-cli":
                    return [cli.pid]
                return ours(self.bed, "hostA")["holder"] if fault == "kill-holder" else ours(self.bed, host)["agent"]
            pids = lookup()
            return lambda: kill(pids or lookup())
        else:
            def link_down() -> None:
                self.link(host, False)
                if what == "blip":
                    threading.Timer(BLIP_S, self.link, (host, True)).start()
            return link_down

    def trial(self, fault: str, phase: str) -> Trial:
        self.count += 1
        t = Trial(fault, phase)
        t0 = time.monotonic()
        out = self.tmp / f"t{self.count}-{fault}-{phase}"
        out.mkdir()
        go_on = out / "go-on"
        job = self.bed.popen("hostA", [str(self.exe), str(out), *JOB],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, env={**os.environ, "WORKLOAD_HOLD": str(go_on)})
        try:
            self._run(t, job, out, go_on)
        finally:
            self.link("hostA", True)
            self.link("hostB", True)
            kill(list(copies(str(out))))
            for host in ("hostA", "hostB"):
                for pids in ours(self.bed, host).values():
                    kill(pids)
            job.kill()
            job.wait()
            t.seconds = time.monotonic() - t0
        return t

    def _run(self, t: Trial, job: subprocess.Popen[Any], out: Path, go_on: Path) -> None:
        deadline = time.monotonic() + 30
        while not (out / "ready").exists():
            if job.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the job did not start (status {job.poll()})")
            time.sleep(0.02)
        pid = job.pid
        cli = subprocess.Popen(
            [*KCR, "migrate", f"{pid}@hostA", "hostB", "--ssh-config", str(self.bed.ssh_config_path), "--new-pid",
             "--events", "--json", "--link-timeout", f"{self.link_timeout:g}", "--bandwidth", BANDWIDTH,
             "--max-rounds", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        fault_at: list[float] = []
        report: dict[str, Any] = {}

        def watch() -> None:
            assert cli.stdout is not None
            ready: Callable[[], None] | None = None
            for line in cli.stdout:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("event") == "phase-changed" and ev.get("phase") == t.phase and not fault_at:
                    if t.phase == "precopy":
                        time.sleep(0.3)
                    (ready if ready is not None and t.phase != "precopy" else self.injector(t.fault, cli))()
                    fault_at.append(time.monotonic())
                elif ev.get("event") == "phase-changed" and ev.get("phase") == "precopy" and not fault_at:
                    ready = self.injector(t.fault, cli)     # the agents and the holder are up
                elif "state" in ev and "pid" in ev:
                    report.update(ev)
        reader = threading.Thread(target=watch, daemon=True)
        reader.start()
        assert cli.stderr is not None
        try:
            err = cli.stderr.read()
            cli.wait(timeout=self.link_timeout * 4 + 120)
        except subprocess.TimeoutExpired:
            cli.kill()
            cli.wait()
            err = "(the CLI did not end: killed)"
        reader.join(timeout=10)
        t.cli_code = cli.returncode
        t.cli_said = err.strip().splitlines()[-1] if err.strip() else ""
        t.injected = bool(fault_at)
        judge_at = max(fault_at[0] if fault_at else 0.0, time.monotonic()) + self.link_timeout + GRACE_S
        while time.monotonic() < judge_at:
            time.sleep(0.1)
        marker = str(out)
        t.state_after = state(pid)
        found = copies(marker)
        t.dest_after = {p: s for p, s in found.items() if p != pid}
        for host in ("hostA", "hostB"):
            for kind, pids in ours(self.bed, host).items():
                t.leaks += [f"{kind}@{host}" for _ in pids]
        t.leaks += [f"stopped copy@hostB ({s})" for s in t.dest_after.values() if s in ("T", "t")]
        if t.fault.startswith("cut-"):
            self.link("hostA", True)
            self.link("hostB", True)
        t.untrue = ("source process runs on" in err or "runs on at hostA" in err) and t.state_after in (None, "T", "t")
        t.outcome = self._settle(t, pid, marker, go_on)

    def _settle(self, t: Trial, pid: int, marker: str, go_on: Path) -> str:
        src = t.state_after
        dest_running = [p for p, s in t.dest_after.items() if s not in ("T", "t")]
        src_running = src is not None and src not in ("T", "t")
        resolved = False
        if len(dest_running) + src_running > 1:
            return "doubled"
        if src == "t":
            return "stuck"
        if src == "T":                    # left stopped past the point of no return
            action = "--kill" if dest_running else "--resume"
            res = self.kcr("resolve", f"{pid}@hostA", action)
            t.resolve = f"{action}: " + ("ok" if res.returncode == 0 else res.stderr.strip()[-200:])
            if res.returncode != 0:
                return "lost" if not dest_running else "stuck"
            resolved = True
        running = dest_running or ([pid] if src_running or (src == "T" and not dest_running) else [])
        if not running:
            return "lost"
        go_on.touch()
        verdict = Path(marker) / "verdict"
        deadline = time.monotonic() + 60
        while not verdict.exists():
            if state(running[0]) is None or time.monotonic() > deadline:
                return "corrupt"          # it died (or hung) before its verdict
            time.sleep(0.05)
        time.sleep(0.05)
        good = verdict.read_text().strip() == "PASS" and (Path(marker) / "output").read_text() == self.reference
        if not good:
            return "corrupt"
        if not t.injected:
            return "no-fault"
        return "resolved" if resolved else "ok"


# -- the matrix -----------------------------------------------------------------------------

def reference(tmp: Path, exe: Path) -> str:
    out = tmp / "reference"
    out.mkdir()
    subprocess.run([str(exe), str(out), *JOB], check=True, timeout=300,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return (out / "output").read_text()


def parse_cells(text: str) -> list[tuple[str, str]]:
    cells = []
    for item in text.split(","):
        fault, _, phase = item.partition(":")
        if fault not in PARTIES or phase not in PHASES:
            raise BenchError(f"{item!r}: a cell is FAULT:PHASE, FAULT one of {', '.join(PARTIES)}, "
                             f"PHASE one of {', '.join(PHASES)}")
        cells.append((fault, phase))
    return cells


def summarize(trials: list[Trial]) -> list[dict[str, Any]]:
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for t in trials:
        row = rows.setdefault((t.fault, t.phase), {"fault": t.fault, "phase": t.phase, "trials": 0, "leaks": 0,
                                                   "untrue": 0, **{o: 0 for o in OUTCOMES}})
        row["trials"] += 1
        row[t.outcome] += 1
        row["leaks"] += bool(t.leaks)
        row["untrue"] += t.untrue
    return list(rows.values())


def main() -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/faults.py", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{len(QUICK)} cells once (under a minute)")
    parser.add_argument("--trials", type=int, default=1, metavar="N", help="trials per cell (default 1)")
    parser.add_argument("--cells", metavar="FAULT:PHASE,...", help="only these cells")
    parser.add_argument("--link-timeout", type=float, default=3.0, metavar="S")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise BenchError("run as root (the test hosts need namespaces, the agents ptrace)")
    if args.trials < 1 or not 0.5 <= args.link_timeout <= 60:
        raise BenchError("--trials is at least 1, --link-timeout between 0.5 and 60 s")
    cells = parse_cells(args.cells) if args.cells else list(QUICK) if args.quick else \
        [(f, p) for f in PARTIES for p in PHASES]
    stop_on_signals(signal.SIGTERM, signal.SIGHUP)
    machine = machine_info()
    log(f"machine: {machine_summary(machine)}")
    tmp = Path(tempfile.mkdtemp(prefix="kcr-bench-faults-", dir="/tmp"))     # every host sees /tmp
    bed = Testbed(STATE_DIR, hosts=("hostA", "hostB"), prefix=PREFIX, subnet=SUBNET)
    trials: list[Trial] = []
    t_start = time.monotonic()
    try:
        exe = tmp / "mig_dirty"
        compile_c(WORKLOAD_SRC, exe, ["-pthread"])
        ref = reference(tmp, exe)
        bed.down()
        bed.up()
        run = Run(bed, tmp, exe, ref, args.link_timeout)
        for fault, phase in cells:
            for _ in range(args.trials):
                t = run.trial(fault, phase)
                trials.append(t)
                log(f"{fault:15} {phase:8} {t.outcome:9} {t.seconds:5.1f} s"
                    + (f"  leaks: {', '.join(t.leaks)}" if t.leaks else "")
                    + ("  UNTRUE: " + t.cli_said if t.untrue else "")
                    + (f"  resolve {t.resolve}" if t.resolve else ""))
    finally:
        try:
            bed.down()
        except TestbedError as exc:
            print(f"benchmarks/faults.py: taking the test hosts down: {exc}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    rows = summarize(trials)
    head = ["fault", "phase", "trials", *OUTCOMES, "leaks", "untrue"]
    print(table([head] + [[r["fault"], r["phase"], str(r["trials"]), *(str(r[o]) for o in OUTCOMES),
                           str(r["leaks"]), str(r["untrue"])] for r in rows], left=(0, 1)))
    total = {k: sum(r[k] for r in rows) for k in ("trials", *OUTCOMES, "leaks", "untrue")}
    print(f"total: {total['trials']} trials, {total['ok']} ok, {total['resolved']} resolved, {total['lost']} lost, "
          f"{total['doubled']} doubled, {total['corrupt']} corrupt, {total['stuck']} stuck, {total['leaks']} with "
          f"leaks, {total['untrue']} untrue; {time.monotonic() - t_start:.0f} s")
    if args.json:
        write_json(args.json, {"benchmark": "faults", "machine": machine, "job": JOB, "bandwidth": BANDWIDTH,
                               "link_timeout_s": args.link_timeout, "rows": rows, "total": total,
                               "trials": [asdict(t) for t in trials]})
    return 0


if __name__ == "__main__":
    sys.exit(guarded("benchmarks/faults.py", main, errors=(BenchError, TestbedError)))
