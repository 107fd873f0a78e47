"""Restore fuzzing: a real image, mutated at the field level, through `kcr-migrate restore`.

Shared by ``tests/test_fuzz_restore.py`` (a few dozen seeded cases in CI) and
``benchmarks/fuzz_restore.py`` (longer runs, a table). The decoder's own fuzzing (random and
flipped bytes into ``FrameDecoder`` and ``decode_record``) is ``tests/test_fuzz_decoder.py``;
this goes further: records are decoded to plain msgpack maps, one value (or record, or byte) is
changed, and the image is sealed again with valid checksums and end counts, so the change
reaches record validation and the restorer instead of stopping at a checksum.

``seal`` is the one place that turns frames into image bytes. Its images are unsigned (an
edit breaks the signature, and the fuzz holds no key to sign with): restore refuses them
before their first record unless told to trust them, so every case restores with ``TRUST``
(``--trust-image``) to reach what comes after the signature check. Frames are taken apart and
put together with ``tests._transport``'s ``image_frames`` and ``image_of``.

The image is of ``tests/workloads/fuzz_target.c`` (two threads, one on an alternate signal
stack, a handler, a timer, a pipe with bytes in it, an eventfd, a file, a private file mapping,
shared anonymous memory), run from a copy of its binary in the run's own directory: what a
mutated image makes restore open or map is that copy.

Every case ends in one of: ``restored`` (the process was rebuilt; it is killed), ``refused``
(non-zero exit with one error line), ``hung`` (no exit within the timeout), ``traceback`` (a
Python traceback, or output that is not one error line), ``crashed`` (a non-zero exit without
an error line, or a signal). A restored or refused case may also ``leak``: a process of it
still alive once the case has ended. The caller must be a child subreaper
(``tests._workloads.become_subreaper``): restored processes are not the tool's children.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack

from tests._transport import ImageFrame, image_frames, image_of
from transport.framing import KIND_PAGES, KIND_RECORD
from transport.schema import TASK_SIZE, EndOfImage

REPO = Path(__file__).resolve().parent.parent
KCR_MIGRATE = [sys.executable, "-m", "migrate"]
CASE_TIMEOUT = 20.0          # a restore of the fuzz image takes ~0.2 s; anything near this hangs
OUTCOMES = ("restored", "refused", "hung", "traceback", "crashed")


# -- the image as frames ---------------------------------------------------------------------

@dataclasses.dataclass
class Frame:
    kind: int
    flags: int
    payload: bytes = b""                   # pages (and records that are not valid msgpack maps)
    body: dict[str, Any] | None = None     # a record, decoded to plain values

    def raw(self) -> bytes:
        if self.body is not None:
            return msgpack.packb(self.body, use_bin_type=True)
        return self.payload


def split_image(image: bytes) -> list[Frame]:
    """A well-formed image's frames (signatures left out), records decoded to plain msgpack
    maps: no schema checks."""
    return [Frame(f.kind, f.flags, body=msgpack.unpackb(f.payload, raw=False, strict_map_key=False))
            if f.kind == KIND_RECORD else Frame(f.kind, f.flags, payload=f.payload)
            for f in image_frames(image)]


# Whoever edits an image cannot sign it: ``seal`` makes unsigned images, which restore takes
# only when told to trust them. Signature checks come first and refuse every edit; these
# options reach what comes after them (a mutated image could also be one a bug wrote, and
# signed).
TRUST = ["--trust-image"]


def seal(frames: list[Frame], *, fix_counts: bool = True) -> bytes:
    """The image of ``frames``, unsigned, every frame with its checksum and, with ``fix_counts``,
    the end record counting what is there (so a dropped or repeated record reaches the restorer
    instead of the reader's count check). The one place that makes a mutated image."""
    if fix_counts:
        records = sum(f.kind == KIND_RECORD for f in frames)
        batches = [f for f in frames if f.kind == KIND_PAGES]
        pages = 0
        for b in batches:
            nruns = int.from_bytes(b.payload[:4], "little") if len(b.payload) >= 8 else 0
            for i in range(min(nruns, (len(b.payload) - 8) // 12)):
                pages += int.from_bytes(b.payload[8 + 12 * i + 8: 8 + 12 * i + 12], "little")
        for f in frames:
            if f.body is not None and f.body.get("t") == EndOfImage.TYPE:
                f.body.update(records=records, page_batches=len(batches), pages=pages)
    return image_of([ImageFrame(f.kind, f.flags, f.raw(), None) for f in frames], tags=False)


# -- mutations ---------------------------------------------------------------------------------

Path_ = tuple[Any, ...]

INT_EDGES = (0, 1, -1, 2, 63, 64, 65, 4095, 4096, 1 << 15, 1 << 22, (1 << 31) - 1, 1 << 31, -(1 << 31),
             (1 << 32) - 1, 1 << 32, 1 << 41, TASK_SIZE, TASK_SIZE + 4096, 1 << 47, (1 << 63) - 1, 1 << 63,
             -(1 << 63), (1 << 64) - 1)
STR_EDGES = ("", "/", "relative/path", "/tmp/x\0y", "/" + "a" * 5000, "/proc/self/mem", "../../etc/shadow",
             "/\u00ff\u2028", "x" * 70)


def leaves(value: Any, path: Path_ = ()) -> Iterator[Path_]:
    """Paths to every value inside a decoded record (maps and lists included), but its type."""
    if path:
        yield path
    if isinstance(value, dict):
        for k, v in value.items():
            if not path and k in ("t", "v"):
                continue
            yield from leaves(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, path + (i,))


def get(body: Any, path: Path_) -> Any:
    for k in path:
        body = body[k]
    return body


def put(body: Any, path: Path_, value: Any) -> None:
    get(body, path[:-1])[path[-1]] = value


def edge_value(rng: random.Random, old: Any) -> Any:
    """A boundary or out-of-range value in place of ``old``: mostly of its own type."""
    if isinstance(old, bool):
        return not old if rng.random() < 0.8 else rng.choice((0, 2, "yes"))
    if isinstance(old, int):
        roll = rng.random()
        if roll < 0.6:
            return rng.choice(INT_EDGES)
        if roll < 0.85:
            return _fit(old + rng.choice((-4096, -1, 1, 4096, 1 << 32)))
        return _fit(old ^ (1 << rng.randrange(64)))
    if isinstance(old, str):
        return rng.choice(STR_EDGES) if rng.random() < 0.8 else old[: len(old) // 2]
    if isinstance(old, (bytes, bytearray)):
        return rng.choice((b"", bytes(old[: len(old) // 2]), bytes(old) * 2, bytes(rng.randrange(256)
                                                                                      for _ in range(64))))
    if isinstance(old, list):
        if not old:
            return [0] * rng.choice((1, 65, 70000))
        roll = rng.random()
        if roll < 0.3:
            return []
        if roll < 0.6:
            return old + [copy.deepcopy(rng.choice(old))]
        if roll < 0.8:
            return old[:-1]
        return old[: 1] * rng.choice((2, 1000))
    if isinstance(old, dict):
        return rng.choice(({}, [], None))
    return rng.choice((0, None, "x"))


def _fit(value: int) -> int:
    """``value`` where msgpack can carry it (-2**63 .. 2**64 - 1): wrapped around 2**64."""
    return value if -(1 << 63) <= value < 1 << 64 else value % (1 << 64)


def records_of(frames: list[Frame], type_id: int | None = None) -> list[int]:
    return [i for i, f in enumerate(frames) if f.body is not None and (type_id is None or f.body.get("t") == type_id)]


def mutate_field(rng: random.Random, frames: list[Frame]) -> str:
    i = rng.choice(records_of(frames))
    body = frames[i].body
    assert body is not None
    paths = list(leaves(body))
    if not paths:
        return "nothing to change"
    path = rng.choice(paths)
    old = get(body, path)
    new = edge_value(rng, old)
    put(body, path, new)
    return f"field: type {body.get('t')} {'.'.join(map(str, path))}: {_short(old)} -> {_short(new)}"


def mutate_record(rng: random.Random, frames: list[Frame]) -> str:
    """Drop, repeat or move one record (never the header: that is the reader's first check)."""
    idx = [i for i in records_of(frames) if i > 0]
    if not idx:
        return "record: none left to change"
    i = rng.choice(idx)
    what = rng.choice(("drop", "repeat", "move"))
    body = frames[i].body
    t = body.get("t") if body is not None else None
    if what == "drop":
        del frames[i]
    elif what == "repeat":
        frames.insert(i, copy.deepcopy(frames[i]))
    else:
        f = frames.pop(i)
        frames.insert(rng.randrange(1, len(frames)), f)
    return f"record: {what} the record of type {t}"


def mutate_threads(rng: random.Random, frames: list[Frame]) -> str:
    """What a field flip rarely finds: thread records that disagree with each other."""
    threads = records_of(frames, 5)
    if not threads:
        return "no threads"
    bodies = [frames[i].body for i in threads]
    what = rng.choice(("two leaders", "no leader", "same tid", "empty xstate", "gs_base", "fs_base", "leader tid"))
    if what == "two leaders":
        for b in bodies:
            b["leader"] = True   # type: ignore[index]
        if len(bodies) == 1:
            frames.insert(threads[0], copy.deepcopy(frames[threads[0]]))
    elif what == "no leader":
        for b in bodies:
            b["leader"] = False   # type: ignore[index]
    elif what == "same tid" and len(bodies) > 1:
        bodies[1]["tid"] = bodies[0]["tid"]   # type: ignore[index]
    elif what == "empty xstate":
        rng.choice(bodies)["xstate"] = b""   # type: ignore[index]
    elif what in ("gs_base", "fs_base"):
        rng.choice(bodies)["regs"][what] = rng.choice((TASK_SIZE + 4096, 1 << 63, (1 << 64) - 1))  # type: ignore[index]
    else:
        rng.choice(bodies)["tid"] = rng.choice((0, -1, 1 << 22, 1))   # type: ignore[index]
    return f"threads: {what}"


def mutate_bytes(rng: random.Random, frames: list[Frame]) -> str:
    """Flip bytes inside one frame's payload (checksums are made right again by ``seal``)."""
    if len(frames) < 2:
        return "bytes: no frame but the header"
    i = rng.randrange(1, len(frames))
    f = frames[i]
    raw = bytearray(f.raw())
    for _ in range(rng.randint(1, 3)):
        pos = rng.randrange(len(raw))
        raw[pos] ^= 1 << rng.randrange(8)
    if f.kind == KIND_RECORD:
        try:
            body = msgpack.unpackb(bytes(raw), raw=False, strict_map_key=False)
        except Exception:
            body = None
        frames[i] = Frame(f.kind, f.flags, payload=bytes(raw), body=body if isinstance(body, dict) else None)
    else:
        frames[i] = Frame(f.kind, f.flags, payload=bytes(raw))
    return f"bytes: flipped in frame {i} (kind {f.kind})"


MUTATORS: tuple[tuple[float, Callable[[random.Random, list[Frame]], str]], ...] = (
    (0.55, mutate_field), (0.15, mutate_record), (0.15, mutate_threads), (0.15, mutate_bytes))


def mutate(image: bytes, seed: int) -> tuple[bytes, str]:
    """A deterministic mutation of ``image`` (by ``seed``): the new image and what changed.
    Mostly one change; one case in seven makes two or three (what a single change rarely
    finds: a mapping made shared and writable, two fields that must agree)."""
    rng = random.Random(seed)
    frames = split_image(image)
    changes = []
    for _ in range(1 if rng.random() < 6 / 7 else rng.randint(2, 3)):
        roll = rng.random()
        for weight, mutator in MUTATORS:
            if roll < weight:
                break
            roll -= weight
        changes.append(mutator(rng, frames))
    return seal(frames, fix_counts=rng.random() < 0.95), "; ".join(changes)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- the image ---------------------------------------------------------------------------------

def _env(engine: Path, workdir: Path) -> dict[str, str]:
    """The environment kcr-migrate runs in: ``engine``'s code; the image key of the tests
    (``KCR_IMAGE_KEY``), or else one in ``workdir``, never this host's own."""
    key = os.environ.get("KCR_IMAGE_KEY") or str(workdir / "keys" / "image.key")
    return {**os.environ, "PYTHONPATH": str(engine), "KCR_IMAGE_KEY": key}


def make_image(workdir: Path, timeout: float = 60, *, mib: int = 0) -> bytes:
    """Checkpoint a fresh run of the fuzz target (its binary copied into ``workdir``, with
    ``mib`` MiB more memory): the image, signed with the key ``_env`` names."""
    from tests._workloads import build

    workdir.mkdir(parents=True, exist_ok=True)
    binary = workdir / "fuzz_target"
    if not binary.exists():        # once: images made before name it, with its size and time
        shutil.copy2(build("fuzz_target"), binary)
    run = workdir / f"run-{mib}"
    run.mkdir(exist_ok=True)
    (run / "ready").unlink(missing_ok=True)
    proc = subprocess.Popen([str(binary), str(run), str(mib)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, close_fds=True, cwd=run, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not (run / "ready").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fuzz target did not get ready (exit {proc.poll()})")
            time.sleep(0.01)
        image = workdir / f"base-{mib}.img"
        image.unlink(missing_ok=True)
        res = subprocess.run([*KCR_MIGRATE, "checkpoint", str(proc.pid), "-o", str(image)], capture_output=True,
                             timeout=timeout, cwd=REPO, env=_env(REPO, workdir))
        if res.returncode != 0:
            raise RuntimeError(f"checkpoint of the fuzz target failed: {res.stderr.decode().strip()}")
        return image.read_bytes()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# -- directed cases: what the tester of issue 13 found, and what fixing it found -----------

def _bodies(frames: list[Frame], type_id: int) -> list[dict[str, Any]]:
    return [f.body for f in frames if f.body is not None and f.body.get("t") == type_id]


def _set_mxcsr(thread: dict[str, Any]) -> None:
    """MXCSR with its reserved bits set: a valid record, but an xstate the kernel refuses, so
    restore fails after the threads exist (and then must still end, and end them)."""
    xstate = bytearray(thread["xstate"])
    xstate[24:28] = b"\xff\xff\xff\xff"
    thread["xstate"] = bytes(xstate)


def _fifo(frames: list[Frame], where: str, fifo: str) -> None:
    if where == "mapping":
        vma = [v for v in _bodies(frames, 3)[0]["vmas"] if v["kind"] == "file"][-1]
        vma.update(path=fifo, file_size=-1)
    elif where == "fd":
        fd = [f for f in _bodies(frames, 4)[0]["fds"] if f["kind"] == "file"][0]
        fd.update(path=fifo, flags=0)        # read-only: an open that waits for a writer
    else:
        _bodies(frames, 2)[0]["exe"] = fifo


def _share_private_file_pages(frames: list[Frame]) -> None:
    """The private file mapping that holds written pages, marked shared and writable: restore
    must not write those pages into the file (the binary)."""
    vmas = _bodies(frames, 3)[0]["vmas"]
    binary = next(v["path"] for v in vmas if v["kind"] == "file" and v["path"].endswith("/fuzz_target"))
    for v in vmas:
        if v["path"] == binary and v["prot"] & 2:
            v.update(shared=True)


Directed = Callable[[list[Frame], Path], object]
DIRECTED: dict[str, tuple[Directed, str]] = {
    # name: (mutation, what the one error line must say)
    "two leaders": (lambda fr, d: [t.update(leader=True) for t in _bodies(fr, 5)], "2 main threads"),
    "no leader": (lambda fr, d: [t.update(leader=False) for t in _bodies(fr, 5)], "0 main threads"),
    "same tid twice": (lambda fr, d: _bodies(fr, 5)[1].update(tid=_bodies(fr, 5)[0]["tid"]), "thread id twice"),
    "empty xstate": (lambda fr, d: _bodies(fr, 5)[1].update(xstate=b""), "ThreadState.xstate"),
    "gs_base above user space": (lambda fr, d: _bodies(fr, 5)[1]["regs"].update(gs_base=1 << 63), "gs_base"),
    "negative capability": (lambda fr, d: _bodies(fr, 2)[0]["creds"].update(cap_effective=-1), "cap_effective"),
    "negative group": (lambda fr, d: _bodies(fr, 2)[0]["creds"].update(groups=[-5]), "groups[0]"),
    "uid -1": (lambda fr, d: _bodies(fr, 2)[0]["creds"].update(uids=[0xFFFFFFFF] * 4), "uids[0]"),
    "negative handler": (lambda fr, d: _bodies(fr, 2)[0]["sigactions"][0].update(handler=-1), "handler"),
    "mm field": (lambda fr, d: _bodies(fr, 2)[0]["mm"].update(start_code=-1), "mm.start_code"),
    "kernel refuses a thread's xstate": (lambda fr, d: _set_mxcsr(_bodies(fr, 5)[1]), "Invalid argument"),
    "kernel refuses the leader's xstate": (lambda fr, d: _set_mxcsr(_bodies(fr, 5)[0]), "Invalid argument"),
    "a FIFO mapped": (lambda fr, d: _fifo(fr, "mapping", str(d / "fifo")), "not a regular file"),
    "a FIFO opened": (lambda fr, d: _fifo(fr, "fd", str(d / "fifo")), "FIFO"),
    "a FIFO as the executable": (lambda fr, d: _fifo(fr, "exe", str(d / "fifo")), "Permission denied"),
    "private file pages into a shared mapping": (lambda fr, d: _share_private_file_pages(fr), "mapped shared"),
    "seccomp filters in strict mode": (lambda fr, d: _bodies(fr, 5)[0].update(
        seccomp=1, seccomp_filters=[{"flags": 0, "program": bytes.fromhex("0600000000000000")}]),
        "seccomp mode 1 with 1 filters"),
    "a seccomp filter the kernel refuses": (lambda fr, d: _bodies(fr, 5)[0].update(   # an unknown opcode
        seccomp=2, seccomp_filters=[{"flags": 0, "program": bytes.fromhex("ffff000000000000")}]),
        "seccomp filter 1 of 1 could not be installed again: Invalid argument"),
}


def directed_image(image: bytes, name: str, workdir: Path) -> bytes:
    """``image`` with the directed mutation ``name`` (a FIFO it names is made in ``workdir``)."""
    fifo = workdir / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    frames = split_image(image)
    DIRECTED[name][0](frames, workdir)
    return seal(frames)


# -- running one case --------------------------------------------------------------------------

@dataclasses.dataclass
class Outcome:
    seed: int
    mutation: str
    result: str                 # one of OUTCOMES
    leaked: list[int]           # pids of the case still alive after it ended
    seconds: float
    detail: str = ""            # the error line, or what went wrong

    @property
    def ok(self) -> bool:
        return self.result in ("restored", "refused") and not self.leaked


def children() -> set[int]:
    """This process's children (as a subreaper: every orphan of what it ran), zombies included."""
    out: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            out.update(int(p) for p in Path(f"/proc/self/task/{tid}/children").read_text().split())
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _reap(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def end_strays(before: set[int], grace: float = 3.0) -> list[int]:
    """Processes that became our children since ``before`` and are still alive after ``grace``
    seconds (a killed one takes a moment, and its leader is not reaped before its threads):
    killed, reaped, and returned."""
    leaked: list[int] | None = None
    deadline = time.monotonic() + grace
    while True:
        _reap(children() - before)
        left = children() - before
        if not left:
            return leaked or []
        if time.monotonic() > deadline:
            if leaked is not None:
                raise RuntimeError(f"processes {sorted(left)} outlive SIGKILL")
            leaked = sorted(p for p in left if _alive(p))
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
        time.sleep(0.005)


def is_one_error_line(stderr: str) -> bool:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("kcr-migrate: error: ") and "Traceback" not in stderr


# Restore runs in a mount namespace of its own where the system's files are read-only: a
# mutated image that maps a library shared and writable, or names it as a file to append to,
# must not be able to change it for the rest of the machine (restore as root opens what the
# image says; only a signed image, not yet, is a reason to trust it).
READ_ONLY = ("/usr", "/etc", sys.prefix, str(REPO))
SANDBOX = ["unshare", "--mount", "--", "sh", "-c",
           'for d in "$1" "$2" "$3" "$4"; do mount --bind "$d" "$d" && mount -o remount,bind,ro "$d" || exit 97; '
           'done; shift 4; exec "$@"', "kcr-fuzz-sandbox", *READ_ONLY]
SANDBOX_FAILED = 97


def sandboxed(argv: list[str]) -> list[str]:
    if shutil.which("unshare") is None:
        raise RuntimeError("restore fuzzing needs unshare(1) (util-linux) to keep system files read-only")
    return [*SANDBOX, *argv]


def _knows_trust(engine: Path) -> bool:
    """Does ``engine``'s restore take --trust-image (a checkout from before image signing does not)?"""
    return "--trust-image" in (engine / "migrate" / "commands" / "restore.py").read_text()


def start_restore(image: Path, *, new_pid: bool = True, trust: bool = True,
                  engine: Path = REPO) -> subprocess.Popen[bytes]:
    """`kcr-migrate restore --json` of ``image``, sandboxed, started (its pid is the tool's).
    ``trust``: restore the image unsigned (``TRUST``); ``engine``: the checkout whose
    kcr-migrate restores (another one, to compare)."""
    argv = [*KCR_MIGRATE, "restore", "-i", str(image), "--json"] + (["--new-pid"] if new_pid else [])
    argv += TRUST if trust and _knows_trust(engine) else []
    return subprocess.Popen(sandboxed(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, close_fds=True, cwd=engine, env=_env(engine, image.parent),
                            start_new_session=True)


def run_restore(image: Path, *, new_pid: bool = True, trust: bool = True, timeout: float = CASE_TIMEOUT,
                engine: Path = REPO) -> tuple[str, str, int]:
    """`kcr-migrate restore` of ``image`` in a process of its own: (outcome, detail, restored pid).
    Ours must be a subreaper, so a restored process (not the tool's child) is adopted here."""
    proc = start_restore(image, new_pid=new_pid, trust=trust, engine=engine)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Hung: does Ctrl-C still stop it? Then make sure it is gone.
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=5)
            how = "hung; stopped by SIGINT"
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            how = "hung; SIGINT ignored"
        return "hung", f"{how}: {err.decode(errors='replace').strip()[-300:]}", 0
    return outcome_of(proc.returncode, out, err)


def outcome_of(returncode: int, out: bytes, err: bytes) -> tuple[str, str, int]:
    """What a restore that ended with ``returncode``, ``out`` and ``err`` came to: (outcome,
    detail, restored pid)."""
    stderr = err.decode(errors="replace")
    if returncode == SANDBOX_FAILED and not stderr.startswith("kcr-migrate"):
        raise RuntimeError(f"could not make {READ_ONLY} read-only for the restore: {stderr.strip()}")
    if "Traceback" in stderr or "Exception in thread" in stderr:
        return "traceback", stderr.strip()[-2000:], 0
    if returncode == 0:
        try:
            pid = int(json.loads(out.decode())["pid"])
        except (ValueError, KeyError, TypeError):
            return "crashed", f"exit 0 without a result: {out[:200]!r} {stderr[-300:]}", 0
        return "restored", "", pid
    if returncode > 0 and is_one_error_line(stderr):
        return "refused", stderr.strip(), 0
    if returncode > 0:
        return "traceback", f"exit {returncode}, not one error line: {stderr.strip()[-1000:]}", 0
    return "crashed", f"killed by signal {-returncode}: {stderr.strip()[-300:]}", 0


def new_pid_for(seed: int) -> bool:
    """Most cases restore under a new pid; every fourth keeps the image's pids (clone3 with
    set_tid, under the tids a mutation may have changed)."""
    return seed % 4 != 0


def run_case(image: bytes, seed: int, workdir: Path, *, timeout: float = CASE_TIMEOUT,
             engine: Path = REPO) -> Outcome:
    """Mutate ``image`` by ``seed``, restore it, end whatever it left: the outcome."""
    mutated, what = mutate(image, seed)
    return run_image(mutated, seed, what, workdir, new_pid=new_pid_for(seed), timeout=timeout, engine=engine)


def run_image(mutated: bytes, seed: int, what: str, workdir: Path, *, new_pid: bool = True, trust: bool = True,
              timeout: float = CASE_TIMEOUT, engine: Path = REPO) -> Outcome:
    """Restore ``mutated`` (saved in ``workdir`` while it runs), end whatever it left: the outcome."""
    path = workdir / f"case-{seed}.img"
    path.write_bytes(mutated)
    before = children()
    t0 = time.monotonic()
    result, detail, pid = run_restore(path, new_pid=new_pid, trust=trust, timeout=timeout, engine=engine)
    seconds = time.monotonic() - t0
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    leaked = [p for p in end_strays(before) if p != pid]
    if result in ("restored", "refused"):
        path.unlink()     # kept only where something went wrong, to run again by hand
    return Outcome(seed, what, result, leaked, seconds, detail)
