#!/usr/bin/env python3
"""Live migration between two test hosts: kcr-migrate against stop-and-copy and, where it works, CRIU.

    python3 benchmarks/migrate.py [--quick] [--json FILE] [--mib N] [--reps N] [--rates R,R,...]
                                  [--downtime MS] [--data-channel auto|ssh|tcp] [--cases C,C,...]

One job (tests/workloads/mig_dirty.c, compiled here with gcc -O2 -pthread into a temporary
directory) holds N MiB (1024; 256 with --quick) and writes R MiB/s of random pages in 10 ms
steps (R = 0, 50 and 200; 0 and 50 with --quick); a ticker thread reads the clock every 100 us and
getpid() to see the pid change, so the job writes down its own downtime ("gap"). The job starts inside hostA and is moved to hostB by:

  kcr pre-copy      `kcr-migrate PID@hostA hostB --json` (the CLI, as a user runs it)
  kcr +objects      the same job holding 53 kernel objects as well (tests/workloads/objects.h:
                    8 each of eventfd, timerfd, pipe and socketpair with bytes in flight, an
                    epoll set over them, a signalfd, an inotify watch, a flock, a POSIX timer),
                    checked by the job after the move: what carrying them adds to the downtime
  stop-and-copy     the same with --no-precopy: freeze first, then send everything
  criu              `criu page-server` on hostB, `criu dump --page-server` on hostA, then
                    `criu restore -d` on hostB, where `criu check` passes on this machine
                    (same pid after the move, so the job sees no gap; downtime and total
                    run from the dump's start to the restore's return)

Each row is the median of --reps runs (3; 1 with --quick), the cases interleaved run by run.
Downtime is the report's (first thread stopped on hostA to the process running on hostB);
gap is the job's own view of it. A run counts only if the moved job finishes with the same
output as an unmigrated reference run of the same parameters: the same source built with its
10 ms sleeps compiled out (its output is a function of size, rate and steps alone; that the
two builds agree is checked at the start of every run).

The link is measured in the same run, the job's size each time, untimed once first:
raw TCP from hostA to hostB (the link itself), the sealed TCP data channel from hostA's
kcr-agent to hostB's (the path a migration's pages take by default) and SSH relayed through
this machine (their path with --data-channel ssh: source agent -> orchestrator -> destination
agent), all with compression off, as the job's pages do not compress. The target "total within 1.5x of memory over link
throughput" is checked against each; the downtime targets are at most 10 ms at 50 MiB/s and at
most 20 ms at 200 MiB/s (medians), for the default 1 GiB job.

Memory on the VMs this runs on is several times slower on first touch than afterwards and
freed memory goes back to the host within seconds. So an untimed warm-up migration (kcr
pre-copy at the highest rate) runs first, and every timed migration starts right after a
/dev/shm buffer of twice the job's size was filled and freed; the output says so.

The test hosts are brought up under /run/kcr-testbed-bench (prefix kcrm-, 10.77.216.0/24)
and torn down at the end, also on Ctrl-C or SIGTERM, with every process the run started.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))      # this checkout's engine, whatever else is installed

import trio  # noqa: E402

from benchmarks._common import (  # noqa: E402
    CLI_TIMEOUT, KCR, MIB, BenchError, compile_c, fill_and_free, guarded, machine_info, machine_summary, probe_criu,
    raw_tcp, reported_kib, run_tool, stop_on_signals, table, write_json)
from examples.testbed import Testbed, TestbedError  # noqa: E402
from transport.errors import MigrationError  # noqa: E402
from transport.ssh import open_ssh_agent  # noqa: E402
from transport.stream import RawBatch  # noqa: E402
from transport.tcp import new_key  # noqa: E402

WORKLOAD_SRC = REPO / "tests" / "workloads" / "mig_dirty.c"
STATE_DIR = Path("/run/kcr-testbed-bench")
PREFIX = "kcrm-"
SUBNET = "10.77.216.0/24"
STEP_S = 0.010                     # the job's step: sleep 10 ms, then write
READY_TIMEOUT = 300.0
CALL_TIMEOUT = 900.0
CRIU_PORT = 27027
# The downtime targets (median, 1 GiB job): dirty rate in MiB/s -> at most this many ms.
DOWNTIME_TARGETS_MS = {50: 10.0, 200: 20.0}
TOTAL_TARGET_FACTOR = 1.5

# The reference build: nanosleep() returns at once, everything else is the job's own code.
NO_SLEEP_HEADER = "#include <time.h>\n#define nanosleep(req, rem) 0\n"

KCR_PRECOPY = "kcr pre-copy"
KCR_OBJECTS = "kcr +objects"       # the same job holding a few dozen kernel objects besides
OBJECTS = 8                        # of each kind in tests/workloads/objects.h: 53 objects
STOP_AND_COPY = "stop-and-copy"
CRIU = "criu"
CASE_NAMES = {"precopy": KCR_PRECOPY, "objects": KCR_OBJECTS, "stop-and-copy": STOP_AND_COPY, "criu": CRIU}


def log(msg: str) -> None:
    print(msg, flush=True)


# -- what the run owns ----------------------------------------------------------------------

class Session:
    """The temporary directory, the test hosts and every process started in them; ``close``
    ends the processes (the moved ones run under hostB's agent, not as our children) and
    takes the hosts down."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="kcr-bench-migrate-", dir="/tmp"))   # not /srv: every host sees it
        self.shm = Path(tempfile.mkdtemp(prefix="kcr-bench-migrate-", dir="/dev/shm"))
        self.bed: Testbed | None = None
        self.children: list[subprocess.Popen[Any]] = []
        self.pids: set[int] = set()          # processes that are not our children (moved jobs)

    def up(self) -> Testbed:
        bed = Testbed(STATE_DIR, prefix=PREFIX, subnet=SUBNET)
        self.bed = bed
        bed.down()        # whatever an interrupted run left
        bed.up()
        return bed

    def spawn(self, host: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        assert self.bed is not None
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        p = self.bed.popen(host, argv, start_new_session=True, close_fds=True, **kwargs)
        self.children.append(p)
        return p

    def end_child(self, p: subprocess.Popen[Any]) -> None:
        if p.poll() is None:
            p.kill()
        p.wait()
        if p in self.children:
            self.children.remove(p)

    def end_pid(self, pid: int, timeout: float = 30.0) -> None:
        """SIGKILL a process that is not our child and wait until /proc/PID is gone (its new
        parent, init here, reaps it; a zombie that lingers past ``timeout`` holds no memory)."""
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while os.path.exists(f"/proc/{pid}"):
            if time.monotonic() > deadline:
                if _alive(pid):
                    raise BenchError(f"process {pid} is still there {timeout:.0f} s after SIGKILL")
                break
            time.sleep(0.01)
        self.pids.discard(pid)

    def close(self) -> None:
        for p in list(self.children):
            try:
                self.end_child(p)
            except OSError:
                pass
        for pid in list(self.pids):
            try:
                self.end_pid(pid, timeout=10)
            except BenchError as exc:
                print(f"benchmarks/migrate.py: {exc}", file=sys.stderr)
        if self.bed is not None:
            try:
                self.bed.down()         # also kills whatever still runs inside the hosts
            except TestbedError as exc:
                print(f"benchmarks/migrate.py: taking the test hosts down: {exc}", file=sys.stderr)
        shutil.rmtree(self.shm, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    """True while /proc/PID exists and is not a zombie (the job we reap ourselves waits as one)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


# -- the job and its reference --------------------------------------------------------------

@dataclass(frozen=True)
class Binaries:
    job: Path
    reference: Path


def build(session: Session) -> Binaries:
    header = session.tmp / "no_sleep.h"
    header.write_text(NO_SLEEP_HEADER)
    out = Binaries(session.tmp / "mig_dirty", session.tmp / "mig_dirty_ref")
    for target, extra in ((out.job, []), (out.reference, ["-include", str(header)])):
        compile_c(WORKLOAD_SRC, target, ["-pthread", *extra])
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


class References:
    """Outputs of unmigrated runs of the reference build, by (MiB, rate, steps)."""

    def __init__(self, session: Session, binaries: Binaries) -> None:
        self.session = session
        self.binaries = binaries
        self.outputs: dict[tuple[int, int, int], str] = {}
        self.count = 0

    def output(self, mib: int, rate: int, iters: int) -> str:
        key = (mib, rate, iters)
        if key not in self.outputs:
            self.outputs[key] = self._run(self.binaries.reference, mib, rate, iters, ticker=False)
        return self.outputs[key]

    def _run(self, binary: Path, mib: int, rate: int, iters: int, *, ticker: bool) -> str:
        self.count += 1
        d = self.session.tmp / f"reference{self.count}"
        d.mkdir()
        argv = [str(binary), str(d), str(mib), str(rate), str(iters), *(["1"] if ticker else [])]
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CLI_TIMEOUT,
                             check=False)
        verdict = (_read(d / "verdict") or "").strip()
        output = _read(d / "output")
        shutil.rmtree(d, ignore_errors=True)
        if res.returncode != 0 or verdict != "PASS" or not output:
            raise BenchError(f"reference run {' '.join(argv[2:])} failed (exit {res.returncode}, verdict "
                             f"{verdict!r}): {res.stderr.strip()}")
        return output

    def check_builds_agree(self) -> dict[str, Any]:
        """The reference build must compute what the job computes: one small case run by both."""
        mib, rate, iters = 16, 200, 60
        real = self._run(self.binaries.job, mib, rate, iters, ticker=True)
        fast = self._run(self.binaries.reference, mib, rate, iters, ticker=False)
        if real != fast:
            raise BenchError(f"the reference build disagrees with the job ({fast.strip()!r} vs {real.strip()!r}): "
                             "mig_dirty.c's output no longer depends on size, rate and steps alone")
        return {"mib": mib, "rate": rate, "iters": iters, "output": real.strip(), "agree": True}


@dataclass
class Job:
    dir: Path
    proc: subprocess.Popen[Any]
    mib: int
    rate: int
    iters: int

    @property
    def pid(self) -> int:
        return self.proc.pid


def start_job(session: Session, binaries: Binaries, name: str, mib: int, rate: int, iters: int,
              objects: int = 0) -> Job:
    jdir = session.tmp / name
    jdir.mkdir()
    env = {**os.environ, "WORKLOAD_OBJECTS": str(objects)}
    # Its stdin, stdout and stderr are opened inside hostA (by the shell it replaces), as a job
    # started there has them: files opened out here lie on mounts hostA's mount table lacks,
    # which CRIU cannot dump ("Can't lookup mount=N for fd=0").
    argv = [str(binaries.job), str(jdir), str(mib), str(rate), str(iters), "1"]
    proc = session.spawn("hostA", ["sh", "-c", 'exec "$@" </dev/null >stdout 2>stderr', "job", *argv],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         cwd=str(jdir), env=env)
    job = Job(jdir, proc, mib, rate, iters)
    deadline = time.monotonic() + READY_TIMEOUT
    while not (jdir / "ready").exists():
        if proc.poll() is not None:
            raise BenchError(f"job {name} exited ({proc.returncode}): {(jdir / 'stderr').read_text().strip()}")
        if time.monotonic() > deadline:
            raise BenchError(f"job {name} not ready after {READY_TIMEOUT:.0f} s")
        time.sleep(0.01)
    return job


def wait_verdict(job: Job, pid: int, timeout: float) -> str:
    """Wait for the moved job (``pid`` on hostB) to finish and write its verdict."""
    deadline = time.monotonic() + timeout
    while True:
        verdict = _read(job.dir / "verdict")
        if verdict is not None:
            return verdict.strip()
        if not _alive(pid):
            time.sleep(0.05)       # it may have written the verdict just before exiting
            verdict = _read(job.dir / "verdict")
            return verdict.strip() if verdict is not None else f"died without a verdict (pid {pid})"
        if time.monotonic() > deadline:
            return f"no verdict within {timeout:.0f} s"
        time.sleep(0.02)


# -- the link -------------------------------------------------------------------------------

async def _agent_anchors(bed: Testbed, size: int, reps: int) -> dict[str, Any]:
    """hostA's agent -> hostB's agent over the sealed TCP data channel (a migration's page path
    by default) and over SSH relayed through this process (the path with --data-channel ssh).
    Raw pages: the job's do not compress."""
    config = str(bed.ssh_config_path)
    out: dict[str, Any] = {}
    async with open_ssh_agent("hostA", ssh_config=config, level=None, call_timeout=CALL_TIMEOUT) as a, \
            open_ssh_agent("hostB", ssh_config=config, level=None, call_timeout=CALL_TIMEOUT) as b:
        key = new_key()
        port = (await b.call("data_listen", key=key, address=bed.address("hostB")))["port"]
        target = {"kind": "tcp", "address": bed.address("hostB"), "port": port, "key": key}

        async def direct(total: int) -> float:
            r = await a.call("source_synthetic", total_bytes=total, level=None, to=target, timeout=CALL_TIMEOUT)
            if r["sink"]["bytes_raw"] != total:
                raise BenchError(f"tcp data channel: the sink counted {r['sink']['bytes_raw']} of {total} bytes")
            return float(r["seconds"])

        async def relayed(total: int) -> float:
            t0 = time.perf_counter()
            async with b.open_call("sink", upload=True) as upload, \
                    a.open_call("source_synthetic", total_bytes=total, level=None) as call:
                while (item := await call.pages.receive_raw()) is not None:
                    if isinstance(item, RawBatch):
                        await upload.send_batch(item)
                    else:
                        await upload.send_record(item)
                await call.result()
                sunk = await upload.result()
            if sunk["bytes_raw"] != total:
                raise BenchError(f"ssh relayed: the sink counted {sunk['bytes_raw']} of {total} bytes")
            return time.perf_counter() - t0

        for name, fn in (("tcp_data", direct), ("ssh_relayed", relayed)):
            await fn(max(size // 4, 16 * MIB))          # warm-up, untimed
            secs = [await fn(size) for _ in range(reps)]
            out[name] = {"seconds": secs, "bytes": size, "bytes_per_s": size / statistics.median(secs)}
    return out


def measure_link(bed: Testbed, size: int, reps: int) -> dict[str, Any]:
    raw_tcp(max(size // 4, 16 * MIB), bed=bed, src="hostA", dst="hostB")      # warm-up, untimed
    secs = [raw_tcp(size, bed=bed, src="hostA", dst="hostB") for _ in range(reps)]
    link: dict[str, Any] = {"raw_tcp": {"seconds": secs, "bytes": size, "bytes_per_s": size / statistics.median(secs)}}
    try:
        link.update(trio.run(_agent_anchors, bed, size, reps))
    except MigrationError as exc:
        raise BenchError(f"measuring the agents' channels: {exc}") from None
    return link


ANCHORS = (("raw_tcp", "raw TCP hostA->hostB (the link)"),
           ("tcp_data", "sealed TCP agent->agent (the page path by default)"),
           ("ssh_relayed", "SSH relayed via the orchestrator (the page path with --data-channel ssh)"))


# -- one migration --------------------------------------------------------------------------

@dataclass
class Run:
    case: str
    rate: int
    rep: int
    iters: int
    ok: bool = False                  # migrated, and the job finished with the reference output
    error: str = ""
    report: dict[str, Any] = field(default_factory=dict)
    cli_wall_s: float = 0.0
    gap_ms: float | None = None
    verdict: str = ""
    output: str = ""
    reference: str = ""
    retried: bool = False

    @property
    def output_ok(self) -> bool:
        return self.verdict == "PASS" and bool(self.output) and self.output == self.reference

    def as_dict(self) -> dict[str, Any]:
        return {"case": self.case, "rate_mib_s": self.rate, "rep": self.rep, "iters": self.iters, "ok": self.ok,
                "error": self.error, "cli_wall_s": self.cli_wall_s, "gap_ms": self.gap_ms, "verdict": self.verdict,
                "output": self.output.strip(), "reference_output": self.reference.strip(),
                "output_ok": self.output_ok, "retried_with_more_steps": self.retried, "report": self.report}


class TooShort(Exception):
    """The job finished its steps before the migration was done: it needs more steps."""


def kcr_migrate(session: Session, job: Job, args: argparse.Namespace, case: str, wait: bool) -> Run:
    assert session.bed is not None
    stop_and_copy = case == STOP_AND_COPY
    run = Run(case, job.rate, 0, job.iters)
    argv = [*KCR, f"{job.pid}@hostA", "hostB", "--ssh-config", str(session.bed.ssh_config_path), "--json",
            "--new-pid"]      # the test hosts share one pid namespace
    if stop_and_copy:
        argv.append("--no-precopy")
    if args.downtime is not None:
        argv += ["--downtime", f"{args.downtime:g}"]
    argv += ["--data-channel", args.data_channel]
    wall, status, out, err = run_tool(argv)
    run.cli_wall_s = wall
    lines = out.strip().splitlines()
    try:
        run.report = json.loads(lines[-1]) if lines else {}
    except ValueError:
        run.report = {}
    if status != 0 or run.report.get("state") != "done":
        if job.proc.poll() == 0:
            raise TooShort
        tail = err.strip().splitlines()[-1:] or ["no message"]
        run.error = (f"kcr-migrate exit {status}, state {run.report.get('state', '?')}: "
                     f"{run.report.get('message') or tail[0]}")[:600]
        return run
    job.proc.wait(30)                 # the source, ended by the migration's commit
    new_pid = int(run.report["new_pid"])
    session.pids.add(new_pid)
    finish(session, job, run, new_pid, wait)
    return run


def finish(session: Session, job: Job, run: Run, pid: int, wait: bool = True) -> None:
    """Wait for the moved job's verdict, read its output and gap, then end it (at once, unwaited,
    if not ``wait``)."""
    if not wait:
        session.end_pid(pid)
        return
    left = job.iters * STEP_S * 2 + 60
    run.verdict = wait_verdict(job, pid, left)
    run.output = _read(job.dir / "output") or ""
    gap = _read(job.dir / "gap")
    first = gap.split()[0] if gap is not None and gap.split() else ""
    if first.lstrip("-").isdigit() and int(first) >= 0:      # "gap jitter" in ns
        run.gap_ms = int(first) / 1e6
    session.end_pid(pid)


def criu_migrate(session: Session, job: Job, criu: str, wait: bool) -> Run:
    """CRIU's stop-and-copy: page server on hostB, dump on hostA, restore on hostB. Images other
    than pages land in a directory of /tmp, which both hosts see."""
    bed = session.bed
    assert bed is not None
    run = Run(CRIU, job.rate, 0, job.iters)
    images = job.dir / "criu"
    images.mkdir()
    address = bed.address("hostB")
    server = session.spawn("hostB", [criu, "page-server", "-D", str(images), "--address", address,
                                     "--port", str(CRIU_PORT), "-o", "page-server.log"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        # Not a test connection: the page server serves one connection and exits when it closes.
        while not _listening(bed, "hostB", CRIU_PORT):
            if server.poll() is not None or time.monotonic() > deadline:
                run.error = f"criu page-server did not listen: {_criu_log(images, 'page-server.log')}"
                return run
            time.sleep(0.01)
        t0 = time.perf_counter()
        # --shell-job: CRIU refuses a job whose session leader is not dumped with it (as when a
        # shell, or nsenter on a host with pids of its own, started it) unless told it is a shell job.
        dump = bed.exec("hostA", [criu, "dump", "-t", str(job.pid), "-D", str(images), "--page-server",
                                  "--address", address, "--port", str(CRIU_PORT), "--shell-job", "-o", "dump.log"],
                        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CLI_TIMEOUT)
        t_dump = time.perf_counter()
        if dump.returncode != 0:
            run.error = f"criu dump failed: {_criu_log(images, 'dump.log')}"
            return run
        job.proc.wait(30)             # dumped and killed: reap it, so CRIU can have the pid back
        server.wait(30)
        pidfile = images / "restored.pid"
        restore = bed.exec("hostB", [criu, "restore", "-D", str(images), "-d", "--shell-job", "--pidfile",
                                     str(pidfile), "-o", "restore.log"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CLI_TIMEOUT)
        t1 = time.perf_counter()
        if restore.returncode != 0:
            run.error = f"criu restore failed: {_criu_log(images, 'restore.log')}"
            return run
    finally:
        session.end_child(server)
    pages = sum(p.stat().st_size for p in images.glob("pages-*.img"))
    everything = sum(p.stat().st_size for p in images.glob("*.img"))
    ms = (t1 - t0) * 1000
    run.cli_wall_s = t1 - t0
    run.report = {"state": "done", "downtime_ms": ms, "total_ms": ms, "rounds": 0, "stop_reason": "criu dump",
                  "bytes_raw": pages, "bytes_on_wire": everything, "frozen_bytes_raw": pages,
                  "dump_ms": (t_dump - t0) * 1000, "restore_ms": (t1 - t_dump) * 1000,
                  "note": "downtime and total: from `criu dump` starting to `criu restore -d` returning"}
    pid = int(pidfile.read_text().strip())
    session.pids.add(pid)
    finish(session, job, run, pid, wait)    # same pid: the ticker cannot see the move, gap stays unknown
    return run


def _listening(bed: Testbed, host: str, port: int) -> bool:
    """Does a TCP socket listen on ``port`` in ``host`` (asked of ``ss``, without connecting)?"""
    res = bed.exec(host, ["ss", "-Hltn", f"sport = :{port}"], stdin=subprocess.DEVNULL, capture_output=True,
                   text=True, timeout=CLI_TIMEOUT)
    return res.returncode == 0 and bool(res.stdout.strip())


def _criu_log(directory: Path, name: str) -> str:
    """The log's first errors (the cause; not its harmless failure to raise its own fd limit,
    which root without CAP_SYS_RESOURCE gets on every run) and its last line."""
    text = _read(directory / name)
    if not text:
        return "no log"
    lines = text.strip().splitlines()
    errors = [ln for ln in lines if "Error" in ln and "RLIMIT_NOFILE for self" not in ln][:3]
    return " | ".join(dict.fromkeys(errors + lines[-1:]))


# -- how many steps a job needs -------------------------------------------------------------

class Planner:
    """Steps for a job: enough to outlast its migration with a margin, no more (after the move
    the run waits for the job to finish). The first guess models the transfer at the relayed
    SSH throughput; later runs of a case go by what its earlier runs took."""

    def __init__(self, mib: int, bandwidth: float) -> None:
        self.mib = mib
        self.bandwidth = bandwidth
        self.seen: dict[tuple[str, int], float] = {}

    def guess_s(self, case: str, rate: int) -> float:
        if (case, rate) in self.seen:
            return self.seen[(case, rate)]
        bw = 0.75 * self.bandwidth / MIB      # migrations move pages slower than synthetic ones
        if case in (KCR_PRECOPY, KCR_OBJECTS) and rate > 0:
            factor = 3.2 if rate >= 0.8 * bw else min(3.2, 1 / (1 - rate / bw) + 0.3)
        else:
            factor = 1.2
        return 1.2 + self.mib * factor / bw      # + connecting, preflight and commit

    def iters(self, case: str, rate: int) -> int:
        seconds = self.guess_s(case, rate) * 1.25 + 1.0     # + the CLI's start
        return int(-(-seconds / STEP_S // 100) * 100)     # rounded up to 100 steps: references repeat

    def saw(self, case: str, rate: int, total_s: float) -> None:
        self.seen[(case, rate)] = max(total_s, self.seen.get((case, rate), 0.0))

    def more(self, case: str, rate: int) -> None:
        self.seen[(case, rate)] = self.guess_s(case, rate) * 3


# -- reporting ------------------------------------------------------------------------------

def _med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[Run]) -> dict[tuple[str, int], dict[str, Any]]:
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for run in runs:
        out.setdefault((run.case, run.rate), {"runs": []})["runs"].append(run)
    for s in out.values():
        good = [r for r in s["runs"] if r.ok]
        rep = [r.report for r in good]
        s.update(
            n=len(s["runs"]), ok=len(good),
            downtime_ms=_med([x["downtime_ms"] for x in rep]),
            gap_ms=_med([r.gap_ms for r in good if r.gap_ms is not None]),
            total_s=_med([x["total_ms"] / 1000 for x in rep]),
            rounds=_med([x["rounds"] for x in rep]),
            stop_reason="/".join(k for k, _ in Counter(x["stop_reason"] for x in rep).most_common()) or "-",
            wire_mib=_med([x["bytes_on_wire"] / MIB for x in rep]),
            raw_mib=_med([x["bytes_raw"] / MIB for x in rep]),
            frozen_mib=_med([x["frozen_bytes_raw"] / MIB for x in rep]),
            memory_mib=_med([x["memory_bytes"] / MIB for x in rep if "memory_bytes" in x]),
            cli_wall_s=_med([r.cli_wall_s for r in good]))
    return out


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(summary: dict[tuple[str, int], dict[str, Any]], cases: list[str], rates: list[int]) -> str:
    rows: list[tuple[str, ...]] = [("case", "rate MiB/s", "downtime ms", "gap ms", "total s", "rounds", "stop reason", "MiB on wire",
             "MiB frozen", "output ok")]
    for rate in rates:
        for case in cases:
            s = summary.get((case, rate))
            if s is None:
                continue
            rows.append((case, str(rate), fmt(s["downtime_ms"], ".1f"), fmt(s["gap_ms"], ".1f"),
                         fmt(s["total_s"], ".2f"), fmt(s["rounds"], ".0f"), s["stop_reason"],
                         fmt(s["wire_mib"], ".0f"), fmt(s["frozen_mib"], ".1f"),
                         "yes" if s["ok"] == s["n"] else f"NO ({s['ok']}/{s['n']})"))
    return table(rows)


def render_downtime(summary: dict[tuple[str, int], dict[str, Any]], rates: list[int]) -> str:
    """Where kcr-migrate's downtime goes: the report's phases and its final round, medians."""
    rows: list[tuple[str, ...]] = [("downtime, medians (ms)", "rate MiB/s", "downtime", "final MiB", "final scan", "final send",
             "phase final", "phase restore", "phase commit", "phase go", "preflight", "precopy")]
    for rate in rates:
        for case in (KCR_PRECOPY, KCR_OBJECTS, STOP_AND_COPY):
            s = summary.get((case, rate))
            good = [r.report for r in s["runs"] if r.ok] if s else []
            if not good:
                continue

            def med(get: Any, good: list[dict[str, Any]] = good) -> str:
                return fmt(_med([get(x) for x in good]), ".1f")
            rows.append((case, str(rate), med(lambda x: x["downtime_ms"]),
                         med(lambda x: x["final_round"]["bytes_raw"] / MIB), med(lambda x: x["final_round"]["scan_ms"]),
                         med(lambda x: x["final_round"]["send_ms"]),
                         *(med(lambda x, ks=ks: sum(x["phase_ms"].get(k, 0.0) for k in ks))
                           for ks in PHASE_COLUMNS)))
    return table(rows)


# The report's phases in the columns above: the source asked to commit while the destination
# restores (commit-asked-restoring) counts as restore.
PHASE_COLUMNS = (("final",), ("restore", "commit-asked-restoring"), ("commit-asked", "source-committed"), ("go",),
                 ("preflight",), ("precopy",))


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}x"


def render_ratios(summary: dict[tuple[str, int], dict[str, Any]], cases: list[str], rates: list[int]) -> str:
    rows: list[tuple[str, ...]] = [("vs stop-and-copy, same rate", "rate MiB/s", "downtime", "gap", "total", "MiB on wire", "MiB frozen")]
    for rate in rates:
        anchor = summary.get((STOP_AND_COPY, rate))
        for case in cases:
            s = summary.get((case, rate))
            if s is None or anchor is None or case == STOP_AND_COPY:
                continue
            rows.append((case, str(rate), *(fmt_ratio(ratio(s[k], anchor[k]))
                                            for k in ("downtime_ms", "gap_ms", "total_s", "wire_mib", "frozen_mib"))))
    return table(rows) if len(rows) > 1 else "(no stop-and-copy anchor)"


def objects_cost(summary: dict[tuple[str, int], dict[str, Any]], rates: list[int]) -> dict[int, dict[str, Any]]:
    """Per rate: the downtime of the job holding the objects against the plain job's, same run."""
    out: dict[int, dict[str, Any]] = {}
    for rate in rates:
        plain, heavy = summary.get((KCR_PRECOPY, rate)), summary.get((KCR_OBJECTS, rate))
        if plain is None or heavy is None or plain["downtime_ms"] is None or heavy["downtime_ms"] is None:
            continue
        out[rate] = {"plain_ms": plain["downtime_ms"], "objects_ms": heavy["downtime_ms"],
                     "added_ms": heavy["downtime_ms"] - plain["downtime_ms"],
                     "ratio": ratio(heavy["downtime_ms"], plain["downtime_ms"])}
    return out


def render_objects(summary: dict[tuple[str, int], dict[str, Any]], rates: list[int]) -> str:
    rows: list[tuple[str, ...]] = [(f"{KCR_OBJECTS} vs {KCR_PRECOPY}", "rate MiB/s", "downtime plain ms",
                                    "with objects ms", "added ms", "ratio")]
    for rate, c in objects_cost(summary, rates).items():
        rows.append(("", str(rate), f"{c['plain_ms']:.1f}", f"{c['objects_ms']:.1f}", f"{c['added_ms']:+.1f}",
                     fmt_ratio(c["ratio"])))
    return table(rows) if len(rows) > 1 else "(objects case not measured)"


def targets(summary: dict[tuple[str, int], dict[str, Any]], rates: list[int], link: dict[str, Any],
            mib: int) -> tuple[list[str], dict[str, Any]]:
    lines: list[str] = []
    data: dict[str, Any] = {}
    data["downtime"] = {}
    for rate, limit in DOWNTIME_TARGETS_MS.items():
        s = summary.get((KCR_PRECOPY, rate))
        if s is None or s["downtime_ms"] is None:
            lines.append(f"target downtime <= {limit:g} ms at {rate} MiB/s: not measured")
            continue
        met = s["downtime_ms"] <= limit
        gap_met = s["gap_ms"] is not None and s["gap_ms"] <= limit
        lines.append(f"target downtime <= {limit:g} ms at {rate} MiB/s: "
                     f"{'met' if met else 'NOT met'} (kcr pre-copy median {s['downtime_ms']:.1f} ms by its report, "
                     f"{fmt(s['gap_ms'], '.1f')} ms as the job saw it{'' if gap_met == met else ', which ' + ('meets' if gap_met else 'misses') + ' it'})")
        data["downtime"][rate] = {"limit_ms": limit, "downtime_ms": s["downtime_ms"], "gap_ms": s["gap_ms"], "met": met}
    memory = _med([x["memory_mib"] for k, x in summary.items() if x["memory_mib"] is not None]) or float(mib)
    data["total"] = {"memory_mib": memory, "factor": TOTAL_TARGET_FACTOR, "by_anchor": {}}
    for key, label in ANCHORS:
        bw = link[key]["bytes_per_s"] / MIB
        limit = TOTAL_TARGET_FACTOR * memory / bw
        verdicts = []
        per_rate = {}
        for rate in rates:
            k = summary.get((KCR_PRECOPY, rate))
            if k is None or k["total_s"] is None:
                continue
            met = k["total_s"] <= limit
            per_rate[rate] = {"total_s": k["total_s"], "times_limit": k["total_s"] / limit, "met": met}
            verdicts.append(f"{rate} MiB/s {k['total_s']:.2f} s {'met' if met else 'NOT met'} "
                            f"({k['total_s'] / (memory / bw):.1f}x memory/link)")
        lines.append(f"target total <= {TOTAL_TARGET_FACTOR:g} x {memory:.0f} MiB / {label} {bw:.0f} MiB/s "
                     f"= {limit:.2f} s: kcr pre-copy " + ("; ".join(verdicts) or "not measured"))
        data["total"]["by_anchor"][key] = {"link_mib_s": bw, "limit_s": limit, "by_rate": per_rate}
    return lines, data


# -- the run --------------------------------------------------------------------------------

def bench(args: argparse.Namespace, session: Session) -> int:
    t_start = time.monotonic()
    mib = args.mib or (256 if args.quick else 1024)
    reps = args.reps or (1 if args.quick else 3)
    rates = [int(r) for r in args.rates.split(",")] if args.rates else ([0, 50] if args.quick else [0, 50, 200])
    machine = machine_info(memory=True, modules=["zstandard"])
    log(f"machine: {machine_summary(machine)}; Python {machine['python']}; kcr-migrate {machine['kcr_revision']}")
    criu_path, criu_note = probe_criu()
    log(f"criu: {criu_note}" if criu_path else f"criu: not available ({criu_note})")
    cases = [KCR_PRECOPY, KCR_OBJECTS, STOP_AND_COPY] + ([CRIU] if criu_path else [])
    if args.cases:
        wanted = [CASE_NAMES[c] for c in args.cases.split(",")]
        cases = [c for c in cases if c in wanted]

    binaries = build(session)
    refs = References(session, binaries)
    agree = refs.check_builds_agree()
    log(f"reference: the job's source built without its sleeps gives the job's own output "
        f"({agree['mib']} MiB, {agree['rate']} MiB/s, {agree['iters']} steps: {agree['output']})")

    log(f"bringing up the test hosts ({STATE_DIR}, {PREFIX}, {SUBNET}) ...")
    bed = session.up()

    size = mib * MIB
    link_reps = 1 if args.quick else 3
    log(f"measuring the link: {mib} MiB, median of {link_reps}, each once untimed first ...")
    link = measure_link(bed, size, link_reps)
    for key, label in ANCHORS:
        log(f"  {label}: {link[key]['bytes_per_s'] / MIB:.0f} MiB/s")
    planner = Planner(mib, link["ssh_relayed" if args.data_channel == "ssh" else "tcp_data"]["bytes_per_s"])

    reported_start = reported_kib()
    prewarm_mib = 2 * mib + 64
    warm: dict[str, Any] = {"prewarm_mib": prewarm_mib, "prewarm_s": []}

    def prewarm() -> None:
        warm["prewarm_s"].append(fill_and_free(session.shm / "prewarm", prewarm_mib))

    counter = [0]

    def one(case: str, rate: int, rep: int, check: bool = True) -> Run:
        """One migration; unless not ``check``, waits for the job to finish and compares outputs."""
        for attempt in range(2):
            iters = planner.iters(case, rate)
            reference = refs.output(mib, rate, iters) if check else ""     # untimed, before the job starts
            prewarm()
            counter[0] += 1
            job = start_job(session, binaries, f"job{counter[0]}", mib, rate, iters,
                            objects=OBJECTS if case == KCR_OBJECTS else 0)
            try:
                if case == CRIU:
                    assert criu_path is not None
                    run = criu_migrate(session, job, criu_path, wait=check)
                else:
                    run = kcr_migrate(session, job, args, case, wait=check)
            except TooShort:
                planner.more(case, rate)
                log(f"  {case} at {rate} MiB/s: the job finished its {iters} steps before the migration; "
                    f"again with more")
                continue
            finally:
                session.end_child(job.proc)
            run.rep, run.reference, run.retried = rep, reference, attempt > 0
            migrated = not run.error and run.report.get("state") == "done"
            run.ok = migrated and (run.output_ok or not check)
            if migrated and not run.ok:
                run.error = (f"the moved job's verdict is {run.verdict!r}, its output {run.output.strip()!r}, "
                             f"the reference's {reference.strip()!r}")
            if run.report.get("total_ms"):
                planner.saw(case, rate, run.report["total_ms"] / 1000)
            return run
        return Run(case, rate, rep, planner.iters(case, rate), error="the job kept finishing before the migration")

    top = max(rates)
    log(f"warm-up: one untimed kcr pre-copy migration at {top} MiB/s (memory here is slow on first touch), "
        f"then before each timed migration {prewarm_mib} MiB of /dev/shm filled and freed (this VM hands "
        f"freed memory back to its host within seconds)")
    w = one(KCR_PRECOPY, top, 0, check=False)
    warm["migration"] = w.as_dict()
    if w.ok:
        log(f"  warm-up: downtime {w.report['downtime_ms']:.1f} ms, total {w.report['total_ms'] / 1000:.2f} s "
            f"(job ended right after, unchecked)")
    else:
        log(f"  warm-up FAILED: {w.error}")

    runs: list[Run] = []
    for rep in range(1, reps + 1):
        for rate in rates:
            for case in cases:
                run = one(case, rate, rep)
                runs.append(run)
                r = run.report
                if run.ok:
                    log(f"  run {rep}/{reps} {case:13} {rate:3} MiB/s: downtime {r['downtime_ms']:7.1f} ms, gap "
                        f"{fmt(run.gap_ms, '7.1f')} ms, total {r['total_ms'] / 1000:6.2f} s, "
                        f"{r['rounds']} rounds ({r['stop_reason']}), output ok")
                else:
                    log(f"  run {rep}/{reps} {case:13} {rate:3} MiB/s: FAILED: {run.error}")
    reported_end = reported_kib()
    if reported_start is not None and reported_end is not None:
        warm["reported_to_host_during_run_mib"] = (reported_end - reported_start) // 1024

    summary = summarize(runs)
    print()
    print(f"{mib} MiB job, hostA -> hostB over the testbed's veth link, median of {reps} run(s) per row, cases "
          f"interleaved; after an untimed warm-up migration, each run after {prewarm_mib} MiB were filled and freed")
    print("downtime: the report's (first thread stopped to running on hostB); gap: the longest pause the job's "
          "ticker thread saw across the pid change; output ok: the moved job's output equals an unmigrated "
          "reference run's")
    print(f"kcr-migrate options: --data-channel {args.data_channel}"
          f"{'' if args.downtime is None else f', --downtime {args.downtime:g}'} "
          f"(compression auto); the job's ticker thread reads the clock every 100 us")
    print(render(summary, cases, rates))
    print()
    print(render_ratios(summary, cases, rates))
    print()
    print(render_objects(summary, rates))
    print()
    print(render_downtime(summary, rates))
    print("(phase final: from the freeze call to the source's state relayed; restore: the destination applying "
          "the rest and rebuilding, with the source asked to commit meanwhile where the job allows it; commit: "
          "what is left of commit-pending on the source once the destination is ready; go: GO on the destination)")
    print()
    print("link, same run: " + "; ".join(f"{label} {link[k]['bytes_per_s'] / MIB:.0f} MiB/s" for k, label in ANCHORS))
    target_lines, target_data = targets(summary, rates, link, mib)
    for line in target_lines:
        print(line)
    if not criu_path:
        print(f"criu: not available ({criu_note})")
    failed = [r for r in runs if not r.ok]
    if failed:
        for bad in failed:
            print(f"FAILED: {bad.case} at {bad.rate} MiB/s, run {bad.rep}: {bad.error}")
    else:
        print(f"verified: all {len(runs)} moved jobs finished with the reference output "
              f"({len(refs.outputs)} reference runs)")
    print(f"(total {time.monotonic() - t_start:.0f} s)")

    if args.json:
        doc = {"benchmark": "migrate", "version": 1, "machine": machine,
               "config": {"mib": mib, "rates_mib_s": rates, "reps": reps, "quick": args.quick, "cases": cases,
                          "downtime_option_ms": args.downtime, "data_channel": args.data_channel, "step_s": STEP_S, "testbed": {
                              "state_dir": str(STATE_DIR), "prefix": PREFIX, "subnet": SUBNET}},
               "criu": {"available": criu_path is not None, ("version" if criu_path else "reason"): criu_note},
               "reference_build_check": agree, "warmup": warm, "link": link,
               "summary": [{"case": c, "rate_mib_s": r, **{k: v for k, v in s.items() if k != "runs"}}
                           for (c, r), s in summary.items()],
               "ratios_vs_stop_and_copy": {f"{c}@{r}": {k: ratio(s[k], summary[(STOP_AND_COPY, r)][k])
                                                         for k in ("downtime_ms", "gap_ms", "total_s", "wire_mib",
                                                                   "frozen_mib")}
                                           for (c, r), s in summary.items()
                                           if c != STOP_AND_COPY and (STOP_AND_COPY, r) in summary},
               "objects_vs_plain": {str(r): c for r, c in objects_cost(summary, rates).items()},
               "targets": target_data, "runs": [r.as_dict() for r in runs], "verified": not failed,
               "elapsed_s": time.monotonic() - t_start}
        write_json(args.json, doc)
        print(f"wrote {args.json}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="256 MiB, rates 0 and 50, one run each: about a minute")
    p.add_argument("--json", metavar="FILE", help="write every number and the machine's description as JSON")
    p.add_argument("--mib", type=int, help="job size (default 1024, 256 with --quick)")
    p.add_argument("--reps", type=int, help="runs per case (default 3, 1 with --quick)")
    p.add_argument("--rates", metavar="R,R,...", help="dirty rates in MiB/s (default 0,50,200; 0,50 with --quick)")
    p.add_argument("--data-channel", choices=("auto", "ssh", "tcp"), default="auto",
                   help="how kcr-migrate sends pages (default auto, as the CLI does)")
    p.add_argument("--cases", metavar="C,C,...", help="only these cases: " + ",".join(CASE_NAMES) +
                   " (default: all; criu where it works)")
    p.add_argument("--downtime", type=float, metavar="MS", help="pass --downtime MS to kcr-migrate (default: "
                   "its own default)")
    args = p.parse_args(argv)
    unknown = [c for c in (args.cases or "").split(",") if c and c not in CASE_NAMES]
    if unknown or args.cases == "":
        p.error(f"--cases: {', '.join(unknown) or 'none given'}: choose among {', '.join(CASE_NAMES)}")
    if os.geteuid() != 0:
        print("benchmarks/migrate.py: run as root (the test hosts need namespaces and sshd)", file=sys.stderr)
        return 1
    stop_on_signals(signal.SIGTERM, signal.SIGHUP)
    session = Session()
    try:
        return guarded("benchmarks/migrate.py", lambda: bench(args, session),
                       interrupted="interrupted; processes ended and test hosts taken down",
                       errors=(BenchError, TestbedError))
    finally:
        session.close()


if __name__ == "__main__":
    sys.exit(main())
