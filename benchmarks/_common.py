"""What the benchmark scripts share: running tools, describing the machine, tables, JSON.

Each script in benchmarks/ measures one capability; this module holds the parts they all need
the same way, so the scripts do not import each other:

* running: ``BenchError``, ``guarded`` (one-line errors, exit codes 1 and 130),
  ``stop_on_signals``, ``become_subreaper``, ``run_tool`` (a CLI run with Ctrl-C passed on),
  ``compile_c``, ``ensure_bytecode`` (the checkout's modules compiled, as an install has them);
* the machine: ``machine_info`` (the ``machine`` object of every JSON report),
  ``machine_summary`` (the start of the ``machine:`` line), ``probe_criu``;
* memory warm-up on VMs that are slow on first touch: ``fill_and_free``, ``reported_kib``;
* the raw TCP floor: ``raw_tcp``;
* output: ``table`` (aligned columns under a rule) and ``write_json``.
"""
from __future__ import annotations

import ctypes
import importlib
import json
import os
import platform
import signal
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from examples.testbed import Testbed

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
KCR = [sys.executable, "-m", "migrate"]
CLI_TIMEOUT = 900.0
PR_SET_CHILD_SUBREAPER = 36


class BenchError(Exception):
    """The benchmark cannot go on; the message says what failed."""


# -- running --------------------------------------------------------------------------------

def guarded(prog: str, body: Callable[[], int], *, interrupted: str = "interrupted",
            errors: tuple[type[Exception], ...] = (BenchError,)) -> int:
    """``body()``'s exit status; ``errors`` become one line on stderr and status 1, Ctrl-C (or a
    signal given to ``stop_on_signals``) the line ``PROG: INTERRUPTED`` and status 130."""
    try:
        return body()
    except errors as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop_on_signals(*signals: signal.Signals) -> None:
    """Let these signals stop the run as Ctrl-C does, so its cleanup runs."""
    for sig in signals:
        signal.signal(sig, _interrupt)


def become_subreaper() -> None:
    """Restored processes (not our children) are adopted, so they can be reaped here."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def run_tool(argv: list[str], timeout: float = CLI_TIMEOUT) -> tuple[float, int, str, str]:
    """Run a command; (wall seconds, exit status, stdout, stderr). Ctrl-C reaches it as SIGINT,
    so kcr-migrate rolls back, and it is killed if it does not finish soon after."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True, close_fds=True, cwd=REPO)
    try:
        out, err = p.communicate(timeout=timeout)
    except KeyboardInterrupt:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        raise
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise BenchError(f"`{' '.join(argv)}` took more than {timeout:.0f} s") from None
    return time.perf_counter() - t0, p.returncode, out, err


PACKAGES = ("agent", "migrate", "precopy", "transport")


def ensure_bytecode() -> str:
    """Compile this checkout's modules to bytecode (``__pycache__``, ignored by git), as
    installing a wheel does: with PYTHONDONTWRITEBYTECODE set (as in some containers) or a
    read-only checkout, every CLI run would otherwise compile each module it imports again,
    0.3-0.6 s of CPU here, which no installed kcr-migrate pays. Returns a note to print."""
    import compileall
    ok = all(compileall.compile_dir(str(REPO / pkg), quiet=2) for pkg in PACKAGES)
    if not ok:
        raise BenchError("could not compile this checkout's modules to bytecode (a syntax error?)")
    skip = " (PYTHONDONTWRITEBYTECODE is set here: without it every run would compile them)" \
        if os.environ.get("PYTHONDONTWRITEBYTECODE") else ""
    return f"bytecode: the checkout's modules were compiled before timing, as an install has them{skip}"


def compile_c(source: Path, output: Path, flags: Sequence[str] = ()) -> None:
    """``cc -O2 FLAGS -o OUTPUT SOURCE`` with gcc (or cc)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise BenchError("no C compiler: apt-get install gcc")
    res = subprocess.run([cc, "-O2", *flags, "-o", str(output), str(source)], check=False,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise BenchError(f"compiling {source} failed: {res.stderr.strip()}")


# -- the machine ----------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _memory_gib() -> float:
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return round(mem_kib / 2**20, 1)


def _thp() -> str:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unknown"


def _module_version(name: str) -> str:
    try:
        return str(importlib.import_module(name).__version__)
    except ImportError:
        return "missing"


def _tool_version(argv: Sequence[str]) -> str:
    """The first line a tool prints for its version (``ssh -V`` prints it on stderr), or ``?``."""
    try:
        res = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
        return (res.stdout or res.stderr).splitlines()[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def _kcr_revision() -> str:
    rev = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], check=False,
                         capture_output=True, text=True)
    return rev.stdout.strip() or "unknown"


def machine_info(*, memory: bool = False, modules: Sequence[str] = (),
                 tools: Sequence[Sequence[str]] = (), revision: bool = True) -> dict[str, Any]:
    """The machine a run measured: kernel, CPU model and cores; with ``memory`` its size and the
    THP mode; Python and the versions of ``modules`` (Python packages) and ``tools`` (argv
    that prints a version, keyed by the program's name); this checkout's git revision."""
    info: dict[str, Any] = {"kernel": platform.release(), "cpu_model": _cpu_model(), "cores": os.cpu_count()}
    if memory:
        info.update(memory_gib=_memory_gib(), thp=_thp())
    info["python"] = platform.python_version()
    info.update({name: _module_version(name) for name in modules})
    info.update({argv[0]: _tool_version(argv) for argv in tools})
    if revision:
        info["kcr_revision"] = _kcr_revision()
    return info


def machine_summary(m: dict[str, Any]) -> str:
    """``Linux KERNEL, CPU, N cores`` (``, M GiB, THP MODE`` where known) from ``machine_info``."""
    memory = f", {m['memory_gib']} GiB, THP {m['thp']}" if "memory_gib" in m else ""
    return f"Linux {m['kernel']}, {m['cpu_model']}, {m['cores']} cores{memory}"


def probe_criu() -> tuple[str | None, str]:
    """(path, version) where `criu check` passes on this machine, else (None, why not)."""
    path = shutil.which("criu")
    if path is None:
        return None, "no criu binary on PATH"
    try:
        ver = subprocess.run([path, "--version"], check=False, capture_output=True, text=True, timeout=30, close_fds=True)
        version = "criu " + (ver.stdout.split("\n")[0].replace("Version:", "").strip() or "(version unknown)")
        res = subprocess.run([path, "check"], check=False, capture_output=True, text=True, timeout=120, close_fds=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{path} could not run: {exc}"
    if res.returncode != 0:
        # "Error (criu/vdso.c:381): vdso: Unexpected ..." -> the messages, first (the cause) and last
        msgs = [ln.split("): ", 1)[-1].strip() for ln in (res.stdout + res.stderr).splitlines()]
        msgs = [m for m in msgs if m and not m.startswith("exited, status")]
        why = "no output" if not msgs else msgs[0] if len(msgs) == 1 else f"{msgs[0]} ... {msgs[-1]}"
        return None, f"{version} at {path}: `criu check` fails (exit {res.returncode}): {why}"
    return path, f"{version} at {path}"


# -- memory warm-up -------------------------------------------------------------------------

WARM_CHUNK = bytes(8 * MIB)
REPORTED_KIB = Path("/sys/module/page_reporting/parameters/reported_kib")


def write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


def fill_and_free(path: Path, mib: int) -> float:
    """Write ``mib`` MiB to a new file, then delete it: the freed pages are backed by the host
    for a while. Returns the seconds the writes took."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    t0 = time.perf_counter()
    try:
        for _ in range(-(-mib // 8)):
            write_all(fd, memoryview(WARM_CHUNK))
        took = time.perf_counter() - t0
    finally:
        os.close(fd)
        path.unlink()
    return took


def reported_kib() -> int | None:
    """Memory this VM has handed back to its host so far (free page reporting), where it says."""
    try:
        return int(REPORTED_KIB.read_text())
    except (OSError, ValueError):
        return None


# -- the raw TCP floor ----------------------------------------------------------------------

RAW_SINK = """
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
buf = bytearray(1 << 20)
n = 0
while k := c.recv_into(buf):
    n += k
c.close()
print(n, flush=True)
"""

RAW_SOURCE = """
import socket, sys, time
host, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
buf = bytearray(1 << 20)
for i in range(0, len(buf), 4096):
    buf[i] = 1
view = memoryview(buf)
s = socket.create_connection((host, port))
t0 = time.perf_counter()
sent = 0
while sent < total:
    n = min(len(buf), total - sent)
    s.sendall(view[:n])
    sent += n
s.shutdown(socket.SHUT_WR)
s.recv(1)                      # the sink closes once it has read everything
print(time.perf_counter() - t0, flush=True)
"""


def raw_tcp(total: int, *, bed: Testbed | None = None, src: str = "", dst: str = "") -> float:
    """Seconds to move ``total`` bytes over plain TCP (loopback here, or src -> dst hosts)."""
    def argv(script: str, *args: str) -> list[str]:
        return [sys.executable, "-c", script, *args]

    address = bed.address(dst) if bed is not None else "127.0.0.1"
    sink_argv = argv(RAW_SINK, address)
    sink = (bed.popen(dst, sink_argv, stdout=subprocess.PIPE, text=True) if bed is not None
            else subprocess.Popen(sink_argv, stdout=subprocess.PIPE, text=True))
    try:
        assert sink.stdout is not None
        port = sink.stdout.readline().strip()
        source_argv = argv(RAW_SOURCE, address, port, str(total))
        run = bed.exec(src, source_argv, capture_output=True, text=True, timeout=CLI_TIMEOUT) if bed \
            else subprocess.run(source_argv, capture_output=True, text=True, timeout=CLI_TIMEOUT)
        if run.returncode != 0:
            raise BenchError(f"raw tcp source failed: {run.stderr.strip()}")
        received = int(sink.stdout.readline().strip() or 0)
        if received != total:
            raise BenchError(f"raw tcp sink got {received} of {total} bytes")
        return float(run.stdout.strip())
    finally:
        sink.kill()
        sink.wait()
        if sink.stdout is not None:
            sink.stdout.close()


# -- output ---------------------------------------------------------------------------------

def table(rows: Sequence[Sequence[str]], left: Collection[int] = (0,), rule: bool = True) -> str:
    """Rows in columns two spaces apart, those in ``left`` left-aligned, the others right-aligned;
    with ``rule``, a line of dashes under the first row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | os.PathLike[str], doc: Any) -> None:
    """``doc`` as indented JSON at ``path``, replaced in one step (never left half written)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
