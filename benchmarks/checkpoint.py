#!/usr/bin/env python3
"""Checkpoint and restore speed: kcr-migrate against a raw floor and, where it works, CRIU.

    python3 benchmarks/checkpoint.py [--quick] [--json FILE] [--mib N] [--reps N] [--threads N] [--no-warmup]

One workload (benchmarks/workloads/bench_mem.c, compiled here with gcc into a temporary
directory) holds N MiB (1024; 256 with --quick) of realistic data, page by page 30% zero
(written, so populated), 40% text-like and 30% random; with --threads N it runs N threads
(N - 1 idle ones beside the main one). Every operation reads or writes that process and
keeps its files in /dev/shm:

  baseline         process_vm_readv of every populated page (the runs a checkpoint reads,
                   found once beforehand) into one reused buffer, written to a /dev/shm file
  raw write-back   the same floor for a restore: that file read back and process_vm_writev'd
                   into an untouched mapping of a fresh process
  kcr checkpoint   `kcr-migrate checkpoint PID -o IMAGE --leave-running`, zstd level 1 (the
                   default) and --no-compress: wall time of the command
  kcr restore      `kcr-migrate restore -i IMAGE --json --new-pid` of either image, until the
                   command exits (it prints the new pid once the process runs). CRIU's images
                   are uncompressed: the raw image is the same work, the zstd one adds
                   decompressing; both are signed and verified (Poly1305 a frame), CRIU's not
  criu dump/restore  `criu dump -t PID --leave-running` / `criu restore -d`, where `criu check`
                   passes (CRIU restores the same pid, so its restores run after the original
                   is killed)

Every restored copy is asked (SIGUSR1) to hash its memory; it must report the original's
checksum with no bad page, or the run fails (exit 1). The ratio columns divide medians:
above 1 is slower than the baseline, or than CRIU's matching operation. A second table
splits kcr-migrate's wall time into the engine's own (``total_time_ms`` or
``restore_time_ms``) and the rest (interpreter start, imports, fsync and exit), gives the CPU
time each kcr-migrate command used (user + system; on a busy machine a steadier measure of its
cost than wall time), and sets each checkpoint's frozen time beside CRIU's (``frozen_time`` of
its stats-dump file). The checkout's modules are compiled to bytecode first, as an install has
them (``ensure_bytecode``). The
target, as issue 15 puts it: checkpoint frozen time and restore wall time no slower than
CRIU's.

Memory on the VMs this runs on is several times slower on first touch than afterwards, and
they hand freed memory back to the host within seconds (free page reporting). Unless
--no-warmup is given, the benchmark first fills and frees a /dev/shm buffer of about the
run's peak memory and runs every operation once untimed, and each timed operation starts
right after a buffer of the workload's size was filled and freed; the output says so.

The benchmark is a child subreaper: restored processes (not its children) are reaped here.
At exit, also on Ctrl-C or SIGTERM, every process it started or adopted is killed and its
files in /dev/shm and the temporary directory are removed.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))      # this checkout's engine, whatever else is installed

from agent.dump import collect_layout
from benchmarks._common import (
    KCR, MIB, BenchError, become_subreaper, compile_c, ensure_bytecode, fill_and_free, guarded, machine_info,
    machine_summary, probe_criu, reported_kib, run_tool, stop_on_signals, table, write_all, write_json)
from precopy.kernel import IOV_MAX, process_vm_readv, process_vm_writev
from transport.buffers import buffer_address
from precopy.layout import PageFinder

PAGE = 4096
WORKLOAD_SRC = REPO / "benchmarks" / "workloads" / "bench_mem.c"
COPY_BUFFER = 8 * MIB             # the raw floors' reused buffer
READY_TIMEOUT = 300.0

Run = tuple[int, int]             # (address, length in bytes)


# -- processes and files the run owns -------------------------------------------------------

class Session:
    """Owns the temporary directories and every process started or adopted; ``close`` ends them."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="kcr-bench-"))
        self.shm = Path(tempfile.mkdtemp(prefix="kcr-bench-", dir="/dev/shm"))
        self.pids: set[int] = set()

    def adopt(self, pid: int) -> None:
        self.pids.add(pid)

    def end(self, pid: int) -> None:
        """Kill a process we started or adopted and reap it."""
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        self.pids.discard(pid)

    def close(self) -> None:
        for pid in sorted(self.pids | set(_children())):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                got, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if got == 0:
                time.sleep(0.01)
        self.pids.clear()
        shutil.rmtree(self.shm, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _children() -> Iterator[int]:
    """Our child processes, adopted ones included (a restore interrupted midway leaves one)."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
            yield int(entry)


def run_checked(argv: list[str]) -> tuple[float, str]:
    """``run_tool``, failing unless the command succeeds; returns (wall seconds, stdout)."""
    wall, _, out = run_counted(argv)
    return wall, out


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_counted(argv: list[str]) -> tuple[float, float, str]:
    """``run_checked``, and the CPU seconds (user + system) the command used: on a machine that
    other work keeps busy, wall times follow the CPU left over, CPU times much less. (Only the
    command's own: a process CRIU restores fills its memory itself, which this does not count.)"""
    cpu0 = _children_cpu()
    wall, status, out, err = run_tool(argv)
    cpu = _children_cpu() - cpu0
    if status != 0:
        raise BenchError(f"`{' '.join(argv)}` failed (exit {status}): {err.strip()[-2000:]}")
    return wall, cpu, out


# -- the workload ---------------------------------------------------------------------------

def build_workload(session: Session) -> Path:
    out = session.tmp / "bench_mem"
    compile_c(WORKLOAD_SRC, out, ["-pthread"])
    return out


@dataclass
class Workload:
    dir: Path
    proc: subprocess.Popen[bytes]
    info: dict[str, str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def checksum(self) -> str:
        return self.info["checksum"]


def start_workload(session: Session, binary: Path, name: str, mib: int, mode: str = "1",
                   threads: int = 1) -> Workload:
    wdir = session.tmp / name
    wdir.mkdir()
    env = {**os.environ, "BENCH_THREADS": str(threads)}
    with open(wdir / "stdout", "wb") as out, open(wdir / "stderr", "wb") as err:
        proc = subprocess.Popen([str(binary), str(wdir), str(mib), mode], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, start_new_session=True, close_fds=True, cwd=wdir, env=env)
    session.adopt(proc.pid)
    deadline = time.monotonic() + READY_TIMEOUT
    while not (wdir / "ready").exists():
        if proc.poll() is not None:
            raise BenchError(f"workload {name} exited ({proc.returncode}): {(wdir / 'stderr').read_text().strip()}")
        if time.monotonic() > deadline:
            raise BenchError(f"workload {name} not ready after {READY_TIMEOUT:.0f} s")
        time.sleep(0.02)
    info = dict(line.split(" ", 1) for line in (wdir / "info").read_text().splitlines())
    return Workload(wdir, proc, info)


@dataclass
class Verification:
    what: str
    pid: int
    checksum: str
    bad_pages: int
    ok: bool


def verify(w: Workload, pid: int, what: str, timeout: float = 300) -> Verification:
    """Have process ``pid`` (the workload or a restored copy) hash its memory and report."""
    path = w.dir / f"verify.{pid}"
    path.unlink(missing_ok=True)          # pids are reused: never read an old report
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if _has_ended(pid):
            raise BenchError(f"{what}: process {pid} died before checking its memory (restored badly?)")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: process {pid} did not check its memory within {timeout:.0f} s")
        time.sleep(0.005)
    fields = path.read_text().split()
    path.unlink()
    report = dict(zip(fields[::2], fields[1::2]))
    bad = int(report["bad_pages"])
    return Verification(what, pid, report["checksum"], bad, report["checksum"] == w.checksum and bad == 0)


def _has_ended(pid: int) -> bool:
    try:
        got, _ = os.waitpid(pid, os.WNOHANG)
        return got == pid
    except ChildProcessError:         # not ours after all: look it up
        return not os.path.exists(f"/proc/{pid}")


# -- the operations -------------------------------------------------------------------------

def populated_runs(pid: int) -> list[Run]:
    """The pages a checkpoint of ``pid`` reads, as the engine finds them."""
    runs: list[Run] = []
    with PageFinder(pid) as finder:
        for vma in collect_layout(pid).vmas:
            runs.extend((addr, n * PAGE) for addr, n in finder.populated(vma))
    return runs


def _chunks(runs: list[Run], cap: int) -> Iterator[list[Run]]:
    """Runs in groups of at most ``cap`` bytes and IOV_MAX pieces, long runs split."""
    group: list[Run] = []
    size = 0
    for addr, length in runs:
        while length:
            take = min(length, cap - size)
            group.append((addr, take))
            size += take
            addr += take
            length -= take
            if size == cap or len(group) == IOV_MAX:
                yield group
                group, size = [], 0
    if group:
        yield group


def raw_dump(pid: int, runs: list[Run], path: Path, buf: bytearray) -> int:
    """The checkpoint floor: process_vm_readv every run, write it to ``path``; returns bytes."""
    view = memoryview(buf)
    base = buffer_address(buf)
    total = 0
    mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for chunk in _chunks(runs, len(buf)):
            want = sum(n for _, n in chunk)
            try:
                got = process_vm_readv(pid, [(base, want)], chunk)
            except OSError as exc:
                if exc.errno not in (errno.EFAULT, errno.EPERM, errno.ENOMEM):
                    raise
                got = 0
            if got < want:      # a populated page without PROT_READ: /proc/PID/mem ignores that
                off = 0
                for addr, n in chunk:
                    if off + n > got:
                        skip = max(0, got - off)
                        os.preadv(mem, [view[off + skip: off + n]], addr + skip)
                    off += n
            write_all(fd, view[:want])
            total += want
    finally:
        os.close(fd)
        os.close(mem)
    return total


def raw_writeback(path: Path, pid: int, addr: int, nbytes: int, buf: bytearray) -> int:
    """The restore floor: read ``path`` and process_vm_writev it into ``pid`` at ``addr``."""
    view = memoryview(buf)
    base = buffer_address(buf)
    done = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while done < nbytes:
            n = os.readv(fd, [view[:min(len(buf), nbytes - done)]])
            if n <= 0:
                raise BenchError(f"{path} is shorter than {nbytes} bytes")
            wrote = 0
            while wrote < n:
                wrote += process_vm_writev(pid, [(base + wrote, n - wrote)], [(addr + done + wrote, n - wrote)])
            done += n
    finally:
        os.close(fd)
    return done


def kcr_checkpoint(session: Session, pid: int, image: Path, compress: bool) -> dict[str, Any]:
    stats_file = session.tmp / "stats.json"
    argv = [*KCR, "checkpoint", str(pid), "-o", str(image), "--force", "--leave-running",
            "--stats-json", str(stats_file)]
    if not compress:
        argv.append("--no-compress")
    wall, cpu, _ = run_counted(argv)
    stats = json.loads(stats_file.read_text())
    return {"wall_s": wall, "cpu_s": cpu, "image_bytes": image.stat().st_size, **stats}


def kcr_restore(session: Session, image: Path, w: Workload, what: str) -> dict[str, Any]:
    wall, cpu, out = run_counted([*KCR, "restore", "-i", str(image), "--json", "--new-pid"])
    result = json.loads(out.strip().splitlines()[-1])
    pid = int(result["pid"])
    session.adopt(pid)
    try:
        check = verify(w, pid, what)
    finally:
        session.end(pid)
    return {"wall_s": wall, "cpu_s": cpu, **result, "verification": check}


def _criu_log_tail(directory: Path, log: str) -> str:
    try:
        return " | ".join((directory / log).read_text().strip().splitlines()[-3:])
    except OSError:
        return "no log"


def criu_dump(criu: str, pid: int, directory: Path) -> dict[str, Any]:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    try:
        wall, _ = run_checked([criu, "dump", "-t", str(pid), "-D", str(directory), "--shell-job", "--leave-running",
                            "-o", "dump.log"])
    except BenchError as exc:
        raise BenchError(f"{exc}; dump.log: {_criu_log_tail(directory, 'dump.log')}") from None
    size = sum(p.stat().st_size for p in directory.iterdir() if p.name.endswith(".img"))
    return {"wall_s": wall, "image_bytes": size, "frozen_ms": criu_frozen_ms(directory)}


def _protobuf_fields(data: bytes) -> dict[int, int | bytes]:
    """The varint and length-delimited fields of one protobuf message (enough for CRIU's stats)."""
    fields: dict[int, int | bytes] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            b = data[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value

    while i < len(data):
        key = varint()
        if key & 7 == 0:
            fields[key >> 3] = varint()
        elif key & 7 == 2:
            n = varint()
            fields[key >> 3] = data[i: i + n]
            i += n
        else:
            raise BenchError(f"unexpected protobuf wire type {key & 7} in CRIU's stats")
    return fields


def criu_frozen_ms(directory: Path) -> float | None:
    """``frozen_time`` of CRIU's stats-dump (two magics, a u32 length, then a stats_entry whose
    field 1 is dump_stats_entry, field 2 of which is the frozen time in microseconds)."""
    try:
        data = (directory / "stats-dump").read_bytes()
        entry = _protobuf_fields(data[12: 12 + int.from_bytes(data[8:12], "little")])
        dump = entry[1]
        assert isinstance(dump, bytes)
        frozen = _protobuf_fields(dump)[2]
        assert isinstance(frozen, int)
    except (OSError, KeyError, IndexError, AssertionError):
        return None
    return frozen / 1000


def criu_restore(session: Session, criu: str, directory: Path, w: Workload) -> dict[str, Any]:
    pidfile = session.tmp / "criu-restored.pid"
    pidfile.unlink(missing_ok=True)
    try:
        wall, _ = run_checked([criu, "restore", "-D", str(directory), "-d", "--shell-job", "--pidfile", str(pidfile),
                            "-o", "restore.log"])
    except BenchError as exc:
        raise BenchError(f"{exc}; restore.log: {_criu_log_tail(directory, 'restore.log')}") from None
    pid = int(pidfile.read_text().strip())
    session.adopt(pid)
    try:
        check = verify(w, pid, "criu restore")
    finally:
        session.end(pid)
    return {"wall_s": wall, "pid": pid, "verification": check}


# -- measuring and reporting ----------------------------------------------------------------

@dataclass
class Op:
    key: str
    label: str
    peer: str | None = None           # the CRIU operation it compares with
    mib: float = 0.0
    samples: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)

    def add(self, seconds: float, **extra: float) -> None:
        self.samples.append(seconds)
        for k, v in extra.items():
            self.extra.setdefault(k, []).append(v)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def extra_median(self, name: str) -> float | None:
        values = self.extra.get(name)
        return statistics.median(values) if values else None


@dataclass(frozen=True)
class CpuSample:
    busy_s: float          # every CPU's non-idle time, all processes
    steal_s: float         # time the host ran something else instead of this VM
    ours_s: float          # this process, its reaped children and the live ``extra`` pids
    at: float


def cpu_sample(extra: list[int]) -> CpuSample:
    """CPU use so far, to tell how much of the machine other processes took during the rounds."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    ours = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        ours += ru.ru_utime + ru.ru_stime
    for pid in extra:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read().rsplit(")", 1)[1].split()
            ours += (int(stat[11]) + int(stat[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return CpuSample((user + nice + system + irq + softirq) / tick, steal / tick, ours, time.monotonic())


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def render(ops: list[Op], baseline: Op) -> tuple[str, dict[str, dict[str, Any]]]:
    by_key = {op.key: op for op in ops}
    rows = [("operation", "MiB", "median s", "min s", "GiB/s", "vs base", "vs CRIU")]
    data: dict[str, dict[str, Any]] = {}
    for op in ops:
        if not op.samples:
            continue
        peer = by_key.get(op.peer) if op.peer else None
        vs_base = op.median / baseline.median
        vs_criu = op.median / peer.median if peer is not None and peer.samples else None
        gibs = op.mib / 1024 / op.median
        rows.append((op.label, f"{op.mib:.0f}", f"{op.median:.3f}", f"{min(op.samples):.3f}", f"{gibs:.2f}",
                     fmt_ratio(vs_base), fmt_ratio(vs_criu)))
        data[op.key] = {"label": op.label, "mib": op.mib, "samples_s": op.samples, "median_s": op.median,
                        "min_s": min(op.samples), "gib_per_s": gibs, "ratio_vs_baseline": vs_base,
                        "ratio_vs_criu": vs_criu,
                        **{f"{k}_median": statistics.median(v) for k, v in op.extra.items()},
                        **{f"{k}_samples": v for k, v in op.extra.items()}}
    return table(rows), data


def render_details(ops: list[Op]) -> str:
    by_key = {op.key: op for op in ops}
    rows = [("medians", "image MiB", "frozen ms", "frozen vs CRIU", "engine s", "CLI overhead s", "CPU s")]
    for op in ops:
        if not op.samples or not (op.key.startswith("kcr_") or op.key == "criu_dump"):
            continue
        image = op.extra_median("image_mib")
        frozen = op.extra_median("frozen_ms")
        engine = op.extra_median("engine_s")
        peer = by_key.get(op.peer) if op.peer and op.key.startswith("kcr_ckpt") else None
        peer_frozen = peer.extra_median("frozen_ms") if peer is not None else None
        rows.append((op.label, "-" if image is None else f"{image:.1f}", "-" if frozen is None else f"{frozen:.0f}",
                     fmt_ratio(frozen / peer_frozen if frozen is not None and peer_frozen else None),
                     "-" if engine is None else f"{engine:.3f}",
                     "-" if engine is None else f"{op.median - engine:.3f}",
                     "-" if (cpu := op.extra_median("cpu_s")) is None else f"{cpu:.3f}"))
    return table(rows, rule=False)


def frozen_vs_criu(ops: dict[str, Op], key: str) -> float | None:
    """A checkpoint's median frozen time over CRIU's."""
    ours, theirs = ops[key].extra_median("frozen_ms"), ops["criu_dump"].extra_median("frozen_ms")
    return ours / theirs if ours is not None and theirs else None


# -- the run --------------------------------------------------------------------------------

def bench(args: argparse.Namespace, session: Session) -> int:
    mib = args.mib or (256 if args.quick else 1024)
    reps = args.reps or (3 if args.quick else 7)
    warm = not args.no_warmup
    machine = machine_info(memory=True, modules=["zstandard"])
    print(f"machine: {machine_summary(machine)}; Python {machine['python']}, "
          f"zstandard {machine['zstandard']}; kcr-migrate {machine['kcr_revision']}", flush=True)
    criu_path, criu_note = probe_criu()
    criu_state: dict[str, Any] = {"path": criu_path, "note": criu_note}
    print(f"criu: {criu_note}" if criu_path else f"criu: not available ({criu_note})", flush=True)
    print(ensure_bytecode(), flush=True)

    binary = build_workload(session)
    warm_info: dict[str, Any] = {"done": warm}
    reported_at_start = reported_kib()
    prewarm_mib = mib + 64            # what one operation allocates: a process or an image, and buffers
    prewarm_s: list[float] = []

    def prewarm() -> None:
        if warm:
            prewarm_s.append(fill_and_free(session.shm / "prewarm", prewarm_mib))

    if warm:
        size = min(6 * mib, _mem_available_mib() // 2) // 8 * 8
        first = size / 1024 / fill_and_free(session.shm / "warmup", size)
        second = size / 1024 / fill_and_free(session.shm / "warmup", size)
        warm_info.update(buffer_mib=size, first_fill_gib_s=first, second_fill_gib_s=second,
                         before_each_operation_mib=prewarm_mib)
        print(f"warm-up: memory here is slow on first touch: filled and freed {size} MiB of /dev/shm "
              f"({first:.2f} GiB/s first, {second:.2f} GiB/s again), then ran every operation once untimed; "
              f"this VM hands freed memory back to its host within seconds (free page reporting), so each "
              f"timed operation also starts right after {prewarm_mib} MiB were filled and freed (untimed)",
              flush=True)
    else:
        print("warm-up: NOT done (--no-warmup): first-touch costs of this VM's memory are in the times", flush=True)

    w = start_workload(session, binary, "workload", mib, threads=args.threads)
    zero, text, rnd = (int(w.info[k]) for k in ("zero_pages", "text_pages", "random_pages"))
    total = zero + text + rnd
    print(f"workload: pid {w.pid}, {args.threads} thread{'s' if args.threads > 1 else ''}, "
          f"{mib} MiB: {100 * zero / total:.0f}% zero pages (written), "
          f"{100 * text / total:.0f}% text-like, {100 * rnd / total:.0f}% random; checksum {w.checksum}", flush=True)
    checks = [verify(w, w.pid, "original, before")]

    runs = populated_runs(w.pid)
    raw_bytes = sum(n for _, n in runs)
    buf = bytearray(COPY_BUFFER)
    base_file = session.shm / "baseline.raw"
    img_z, img_raw = session.shm / "kcr-zstd.img", session.shm / "kcr-raw.img"
    criu_dir = session.shm / "criu"

    ops = {op.key: op for op in [
        Op("baseline", "baseline: process_vm_readv + write"),
        Op("kcr_ckpt_zstd", "kcr checkpoint (zstd 1)", "criu_dump"),
        Op("kcr_ckpt_raw", "kcr checkpoint (no compress)", "criu_dump"),
        Op("criu_dump", "criu dump"),
        Op("writeback", "raw write-back: read + process_vm_writev"),
        Op("kcr_restore_zstd", "kcr restore (zstd 1 image)", "criu_restore"),
        Op("kcr_restore_raw", "kcr restore (raw image)", "criu_restore"),
        Op("criu_restore", "criu restore"),
    ]}

    targets = [0]

    def one_round(timed: bool) -> None:
        prewarm()
        t0 = time.perf_counter()
        got = raw_dump(w.pid, runs, base_file, buf)
        if timed:
            ops["baseline"].add(time.perf_counter() - t0)
            ops["baseline"].mib = got / MIB
        for key, image, compress in (("kcr_ckpt_zstd", img_z, True), ("kcr_ckpt_raw", img_raw, False)):
            prewarm()
            r = kcr_checkpoint(session, w.pid, image, compress)
            if timed:
                ops[key].add(r["wall_s"], engine_s=r["total_time_ms"] / 1000, frozen_ms=r["frozen_time_ms"],
                             image_mib=r["image_bytes"] / MIB, cpu_s=r["cpu_s"])
                ops[key].mib = r["bytes_raw"] / MIB
        if criu_state["path"]:
            prewarm()
            try:
                r = criu_dump(criu_state["path"], w.pid, criu_dir)
            except BenchError as exc:      # CRIU failing is a finding, not the end of the run
                criu_state.update(path=None, note=f"criu dump failed: {exc}")
                print(f"criu: {criu_state['note']}", flush=True)
            else:
                if timed:
                    frozen = {} if r["frozen_ms"] is None else {"frozen_ms": r["frozen_ms"]}
                    ops["criu_dump"].add(r["wall_s"], image_mib=r["image_bytes"] / MIB, **frozen)
                    ops["criu_dump"].mib = raw_bytes / MIB
        targets[0] += 1
        target = start_workload(session, binary, f"target{targets[0]}", mib, "blank")
        prewarm()
        t0 = time.perf_counter()
        got = raw_writeback(base_file, target.pid, int(target.info["addr"], 16), mib * MIB, buf)
        if timed:
            ops["writeback"].add(time.perf_counter() - t0)
            ops["writeback"].mib = got / MIB
        session.end(target.pid)
        target.proc.wait()
        for key, image in (("kcr_restore_zstd", img_z), ("kcr_restore_raw", img_raw)):
            prewarm()
            r = kcr_restore(session, image, w, ops[key].label)
            checks.append(r["verification"])
            if timed:
                ops[key].add(r["wall_s"], engine_s=r["restore_time_ms"] / 1000, cpu_s=r["cpu_s"])
                ops[key].mib = r["pages"] * PAGE / MIB

    if warm:
        one_round(timed=False)
    cpu0 = cpu_sample([w.pid])
    for i in range(reps):
        print(f"round {i + 1}/{reps} ...", flush=True)
        one_round(timed=True)
    cpu1 = cpu_sample([w.pid])
    span = cpu1.at - cpu0.at
    cores = os.cpu_count() or 1
    others = max(0.0, (cpu1.busy_s - cpu0.busy_s) - (cpu1.ours_s - cpu0.ours_s)) / span
    load = {"timed_rounds_s": span, "other_processes_cpus": others, "steal_cpus": (cpu1.steal_s - cpu0.steal_s) / span,
            "cores": cores}
    checks.append(verify(w, w.pid, "original, after all checkpoints"))

    if criu_state["path"]:     # CRIU gives the restored process the original's pid: end the original first
        session.end(w.pid)
        w.proc.wait()
        try:
            for i in range(reps + (1 if warm else 0)):
                prewarm()
                r = criu_restore(session, criu_state["path"], criu_dir, w)
                checks.append(r["verification"])
                if i > 0 or not warm:
                    ops["criu_restore"].add(r["wall_s"])
                    ops["criu_restore"].mib = raw_bytes / MIB
        except BenchError as exc:
            criu_state.update(path=None, note=f"criu restore failed: {exc}")
            print(f"criu: {criu_state['note']}", flush=True)
    criu = criu_state["path"]
    reported_at_end = reported_kib()
    if warm:
        warm_info.update(before_each_operation_count=len(prewarm_s),
                         before_each_operation_median_s=statistics.median(prewarm_s))
    if reported_at_start is not None and reported_at_end is not None:
        warm_info["reported_to_host_during_run_mib"] = (reported_at_end - reported_at_start) // 1024
    criu_note = criu_state["note"]

    text, results = render(list(ops.values()), ops["baseline"])
    print()
    print(f"{mib} MiB workload, {args.threads} thread{'s' if args.threads > 1 else ''}, {reps} timed rounds"
          f"{' after an untimed warm-up round' if warm else ''}; files in /dev/shm; ratios are of medians "
          "(above 1x: slower)")
    print(text)
    print()
    print(render_details(list(ops.values())))
    floor = ops["writeback"].median
    print(f"restore vs raw write-back: zstd image {ops['kcr_restore_zstd'].median / floor:.2f}x, "
          f"raw image {ops['kcr_restore_raw'].median / floor:.2f}x")
    print("images: kcr-migrate writes zstd level 1 by default (--no-compress: raw); CRIU's are uncompressed, "
          "so the raw image is the equal-work comparison, and the zstd one adds its decompression")
    if criu and ops["criu_dump"].samples and ops["criu_restore"].samples:
        slower = [f"{op.label} (frozen {ratio:.2f}x)" for op in ops.values() if op.key.startswith("kcr_ckpt")
                  and (ratio := frozen_vs_criu(ops, op.key) or 0.0) > 1]
        slower += [f"{op.label} ({op.median / ops['criu_restore'].median:.2f}x)" for op in ops.values()
                   if op.key.startswith("kcr_restore") and op.samples and op.median > ops["criu_restore"].median]
        print("target (checkpoint frozen time and restore time no slower than CRIU's): "
              + ("met" if not slower else "NOT met by " + ", ".join(slower)))
    else:
        print(f"target (no slower than CRIU): not checked, criu not available ({criu_note})")

    busy = f"other processes and kernel threads kept {others:.2f} of the {cores} CPUs busy during the timed rounds"
    if others > 0.1 * cores:
        print(f"note: {busy}: CPU-bound rows (zstd) are slower and noisier than on a quiet machine; "
              "their min is the better guide")
    else:
        print(f"load: {busy}")

    bad = [c for c in checks if not c.ok]
    kcr_checks = [c for c in checks if c.what.startswith("kcr")]
    if bad:
        for c in bad:
            print(f"VERIFY FAILED: {c.what}, pid {c.pid}: checksum {c.checksum} (want {w.checksum}), "
                  f"{c.bad_pages} bad pages")
    else:
        criu_checks = [c for c in checks if c.what.startswith("criu")]
        print(f"verified: {len(kcr_checks)} kcr-restored copies"
              f"{f', {len(criu_checks)} criu-restored' if criu_checks else ''} and the original "
              f"(before and after) all report checksum {w.checksum} with 0 bad pages")

    if args.json:
        doc = {"benchmark": "checkpoint", "version": 1, "machine": machine,
               "config": {"mib": mib, "threads": args.threads, "rounds": reps, "quick": args.quick,
                          "storage": "/dev/shm",
                          "compress_level": 1},
               "warmup": warm_info, "load": load,
               "workload": {"pid": w.pid, **{k: (int(v) if v.isdigit() else v) for k, v in w.info.items()},
                            "populated_bytes": raw_bytes, "populated_runs": len(runs)},
               "criu": {"available": criu is not None, ("version" if criu else "reason"): criu_note,
                        "dumps_timed": len(ops["criu_dump"].samples),
                        "restores_timed": len(ops["criu_restore"].samples)},
               "results": results,
               "frozen_vs_criu": {k: frozen_vs_criu(ops, k) for k in ("kcr_ckpt_zstd", "kcr_ckpt_raw")}
               if criu and ops["criu_dump"].samples else None,
               "verification": [c.__dict__ for c in checks], "verified": not bad}
        write_json(args.json, doc)
        print(f"wrote {args.json}")
    return 1 if bad else 0


def _mem_available_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 4096


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="256 MiB and 3 rounds: under a minute")
    p.add_argument("--json", metavar="FILE", help="write every number and the machine's description as JSON")
    p.add_argument("--mib", type=int, help="workload size (default 1024, 256 with --quick)")
    p.add_argument("--reps", type=int, help="timed rounds (default 7, 3 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="threads in the workload (default 1)")
    p.add_argument("--no-warmup", action="store_true", help="time cold memory too (not representative here)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be at least 1")
    if os.geteuid() != 0:
        print("benchmarks/checkpoint.py: run as root (CRIU and tracing other users' processes need it)",
              file=sys.stderr)
    stop_on_signals(signal.SIGTERM, signal.SIGHUP)
    become_subreaper()
    session = Session()
    try:
        return guarded("benchmarks/checkpoint.py", lambda: bench(args, session),
                       interrupted="interrupted; processes ended and files removed")
    finally:
        session.close()


if __name__ == "__main__":
    sys.exit(main())
