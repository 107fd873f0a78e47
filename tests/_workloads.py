"""Workload programs the tests compile (C, from tests/workloads/*.c) and helpers to run them.

``build("name")`` compiles tests/workloads/name.c once per source change into tests/_build/.
Workloads follow CRIU's zdtm pattern: they signal readiness, get checkpointed or migrated,
then check themselves and write their verdict to a file the test reads.
"""
from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

HERE = Path(__file__).parent
SOURCES = HERE / "workloads"
BUILD = HERE / "_build"
PR_SET_CHILD_SUBREAPER = 36


def build(name: str, *extra_flags: str) -> Path:
    """Compile tests/workloads/<name>.c (cached); skip the test where no C compiler exists."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (apt-get install gcc)")
    src = SOURCES / f"{name}.c"
    BUILD.mkdir(exist_ok=True)
    out = BUILD / name
    with open(BUILD / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        newest = max(path.stat().st_mtime for path in (src, *SOURCES.glob("*.h")))   # headers too
        if not out.exists() or out.stat().st_mtime < newest:
            tmp = BUILD / f".{name}.tmp"
            subprocess.run([cc, "-O2", "-g", "-pthread", "-o", str(tmp), str(src), *extra_flags],
                           check=True, capture_output=True, text=True)
            os.replace(tmp, out)
    return out


def node() -> str:
    """Node.js's ``node``; skip the test where this machine has none."""
    path = shutil.which("node") or shutil.which("nodejs")
    if path is None:
        pytest.skip("no Node.js on this machine (apt-get install nodejs)")
    return path


def build_java(name: str) -> list[str]:
    """Compile tests/workloads/<Name>.java (cached, as ``build``); the ``java`` command line
    that runs it. Skip the test where this machine has no JDK."""
    java, javac = shutil.which("java"), shutil.which("javac")
    if java is None or javac is None:
        pytest.skip("no Java development kit on this machine (apt-get install default-jdk-headless)")
    src = SOURCES / f"{name}.java"
    classes = BUILD / "java"
    classes.mkdir(parents=True, exist_ok=True)
    out = classes / f"{name}.class"
    with open(BUILD / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
            with tempfile.TemporaryDirectory(dir=BUILD) as tmp:
                subprocess.run([javac, "-d", tmp, str(src)], check=True, capture_output=True, text=True)
                # The program's own class last: its time says the others are there and as new.
                for made in sorted(Path(tmp).glob("*.class"), key=lambda c: c.name == out.name):
                    os.replace(made, classes / made.name)
    return [java, "-cp", str(classes), name]


def become_subreaper() -> None:
    """Make this process adopt orphans, so restored processes (not our children) are reaped here."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


KCR_MIGRATE = [sys.executable, "-m", "migrate"]

# Workloads whose checkpoint/move phase is ckpt_common.h's linger(): held (``hold=True``), they
# wait there until the test lets them go, so they need no stretching (WORKLOAD_SCALE) to be caught.
LINGERING = frozenset({"ckpt_inet", "ckpt_sessions", "ckpt_filters", "ckpt_signals", "ckpt_files", "ckpt_pipes", "ckpt_sockets", "ckpt_attrs", "ckpt_events",
                       "ckpt_sched", "ckpt_locks", "ckpt_fifo", "ckpt_creds", "ckpt_numa", "ckpt_no_vdso"})

STARTED: list[subprocess.Popen[bytes]] = []     # ended after each test (``reap_started``)


@pytest.fixture(autouse=True)
def reap_started(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every process a test started (``Workload.start``, ``start_in``, or appended here) ends
    with its test, pass or fail: none outlives it, none is left for the garbage collector. So
    does every process working in the test's tmp_path: the copies a failed test's migrations
    or restores left, which are nobody's child here (a script in tmp_path run from elsewhere
    names it on its command line)."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    tmp = request.node.funcargs.get("tmp_path")
    if isinstance(tmp, Path):
        end_processes_in(tmp)


def end_processes_in(folder: Path) -> list[int]:
    """SIGKILL every process whose working directory is ``folder`` or under it, or whose
    command line names something there; their pids."""
    prefix = str(folder)
    ended = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if cwd == prefix or cwd.startswith(prefix + "/") or \
                any(arg == prefix or arg.startswith(prefix + "/") for arg in argv):
            try:
                os.kill(int(entry), 9)
                ended.append(int(entry))
            except ProcessLookupError:
                pass
    return ended


class Workload:
    """One run of a workload program in its own directory (zdtm style: ready, output, verdict)."""

    def __init__(self, name: str, base: Path, *args: str, user: int | None = None,
                 groups: list[int] | None = None, argv: list[str] | None = None, scale: int = 1,
                 hold: bool = False, env: dict[str, str] | None = None) -> None:
        self.name = name
        if user is None:
            self.dir = base / name
            self.dir.mkdir(parents=True, exist_ok=True)
        else:
            # pytest's tmp dirs are private to root: an unprivileged workload gets its own.
            self.dir = Path(tempfile.mkdtemp(prefix=f"kcr-{name}-"))
            os.chmod(self.dir, 0o755)
            os.chown(self.dir, user, user)
            weakref.finalize(self, shutil.rmtree, str(self.dir), True)
        self.argv = argv if argv is not None else [str(build(name)), str(self.dir), *args]
        self.user = user
        self.groups = groups
        self.env = {**os.environ, "WORKLOAD_SCALE": str(scale), **(env or {})}
        # hold: the workload waits before its verdict until ``release()`` (or ``verdict()``):
        # a job a test moves never ends before it was moved, however busy the machine.
        self.hold = self.dir / "go-on" if hold else None
        if self.hold is not None:
            self.env["WORKLOAD_HOLD"] = str(self.hold)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def start(self) -> int:
        with open(self.dir / "stdout", "wb") as out, open(self.dir / "stderr", "wb") as err:
            kwargs: dict[str, object] = {}
            if self.user is not None:
                kwargs.update(user=self.user, group=self.user, extra_groups=self.groups or [])
                for f in (out, err):       # its own output files, as a batch system makes them
                    os.fchown(f.fileno(), self.user, self.user)
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         start_new_session=True, close_fds=True, cwd=self.dir, env=self.env,
                                         **kwargs)
        STARTED.append(self.proc)
        self.pid = self.proc.pid
        return self.pid

    def wait_file(self, name: str, timeout: float, empty_ok: bool = True) -> str:
        """The contents of ``name`` once it exists (and, unless ``empty_ok``: a marker, holds
        something: ``open(...).write(...)`` makes the file before it writes it)."""
        path = self.dir / name
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ended = self.proc is not None and self.proc.poll() is not None
            if path.exists():
                text = path.read_text()
                if text or empty_ok or ended:
                    return text
            elif ended:
                assert self.proc is not None
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) without {name}: "
                                     f"{(self.dir / 'stderr').read_text()}")
            time.sleep(0.01)
        raise AssertionError(f"{self.name}: no {name} after {timeout} s")

    def wait_ready(self, timeout: float = 20) -> None:
        self.wait_file("ready", timeout)

    def release(self) -> None:
        """Let a held workload (``hold=True``) go on to its verdict."""
        if self.hold is not None:
            self.hold.touch()

    def verdict(self, timeout: float = 60) -> str:
        self.release()
        return self.wait_file("verdict", timeout, empty_ok=False).strip()

    def output(self) -> str:
        path = self.dir / "output"
        return path.read_text() if path.exists() else ""

    def reap_original(self) -> int | None:
        """Wait for the original process (killed by a checkpoint or finished)."""
        assert self.proc is not None
        code = self.proc.wait(timeout=30)
        self.proc = None     # whatever runs now (a restored copy) is not this Popen
        return code


def start_until_ready(argv: list[str], ready: Path, timeout: float = 60, **popen: Any) -> subprocess.Popen[bytes]:
    """Start ``argv`` (ended with its test, as every process a test starts) and wait until it
    has made the file ``ready``: the moment it may be moved."""
    options: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL,
                               "stderr": subprocess.DEVNULL, "close_fds": True, **popen}
    proc = subprocess.Popen(argv, **options)
    STARTED.append(proc)
    deadline = time.monotonic() + timeout
    while not ready.exists() or _holds(proc.pid, ready):
        # (the marker is there once opened; a job's open(...).close() may hold it an instant
        # longer, and what a test reads of the job next must be what it keeps)
        if proc.poll() is not None:
            raise AssertionError(f"{argv[0]} exited ({proc.returncode}) before it was ready")
        if time.monotonic() > deadline:
            raise AssertionError(f"{argv[0]}: no {ready} after {timeout} s")
        time.sleep(0.01)
    return proc


def _holds(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open."""
    target = str(path.resolve())
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except OSError:
            continue
    return False


def reap(pid: int, timeout: float = 60) -> int:
    """Wait for a process we adopted as subreaper; returns its wait status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return status
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError(f"process {pid} did not finish within {timeout} s")


class Reference:
    """An unmoved run of ``argv`` writing into ``outdir``, started now to run beside the moved
    one it is compared with; ``output()`` waits for it."""

    def __init__(self, argv: list[str], outdir: Path, **env: str) -> None:
        outdir.mkdir(parents=True, exist_ok=True)
        self.outdir = outdir
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     env={**os.environ, **env})
        STARTED.append(self.proc)

    def output(self, timeout: float = 120) -> str:
        assert self.proc.wait(timeout=timeout) == 0, f"the reference run failed ({self.proc.returncode})"
        return (self.outdir / "output").read_text()


def start_reference(name: str, base: Path, *args: str, **kw: object) -> Workload:
    """An uninterrupted run, for comparison, started (it runs beside what it is compared with;
    ``finished`` waits for it)."""
    w = Workload(name, base / "reference", *args, **kw)  # type: ignore[arg-type]
    w.start()
    return w


def finished(reference: Workload) -> Workload:
    """``reference`` once it has ended well."""
    assert reference.verdict() == "PASS", (reference.dir / "stderr").read_text()
    assert reference.reap_original() == 0
    return reference


def run_reference(name: str, base: Path, *args: str, **kw: object) -> Workload:
    """An uninterrupted run, for comparison."""
    return finished(start_reference(name, base, *args, **kw))


def edit_records(image: bytes, record_type: int, **fields: object) -> bytes:
    """``image`` with ``fields`` set in each of its records of type ``record_type`` (its
    signature no longer verifies: restore such an image with --trust-image to reach the checks
    that come after the signature's)."""
    import msgpack

    from transport.framing import HEADER, HEADER_SIZE, KIND_RECORD, STREAM_MAGIC, encode_frame
    out, off = [image[:len(STREAM_MAGIC)]], len(STREAM_MAGIC)
    while off < len(image):
        _, kind, flags, length, _ = HEADER.unpack_from(image, off)
        frame = image[off: off + HEADER_SIZE + length]
        if kind == KIND_RECORD:
            body = msgpack.unpackb(frame[HEADER_SIZE:])
            if body.get("t") == record_type:
                body.update(fields)
                frame = encode_frame(KIND_RECORD, flags, msgpack.packb(body))
        out.append(frame)
        off += HEADER_SIZE + length
    return b"".join(out)


def kcr(*args: str, input: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*KCR_MIGRATE, *args], input=input, capture_output=True, timeout=timeout)


def one_error_line(stderr: str | bytes) -> str:
    """The CLI's failure output: exactly one line, no traceback; returns it."""
    err = stderr.decode() if isinstance(stderr, bytes) else stderr
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("kcr-migrate: error: ")
    return lines[0]
