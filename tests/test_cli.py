"""The command line as users type it: options anywhere, one meaning per flag, one rate parser,
refusals before anything is frozen, --version, and start-up that loads only what it uses.

Every CLI run here is the real `python -m migrate` in a subprocess; every process a test
starts is in ``STARTED`` and ends with its test.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from migrate.cli import _load_commands, build_parser, command_first, subparsers
from tests._migration import NEW_PID
from tests._workloads import KCR_MIGRATE, STARTED, kcr, one_error_line
from transport.units import parse_rate

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
REPO = Path(__file__).resolve().parent.parent


def sleeper() -> subprocess.Popen[bytes]:
    """A process to point the CLI at: sleeping, with nothing open that would not move."""
    proc = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    STARTED.append(proc)
    return proc


def state(pid: int) -> str:
    """The process's state letter from /proc (S sleeping, T stopped, t traced, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


# --- rates ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, bytes_s", [
    ("12500000", 12_500_000),          # a bare number is bytes per second
    ("1.5", 1.5),
    ("500B", 500), ("500 B/s", 500),
    ("64K", 64 * KiB), ("64k", 64 * KiB), ("64KiB", 64 * KiB),
    ("100M", 100 * MiB), ("100MiB", 100 * MiB), ("100MiB/s", 100 * MiB), ("100m", 100 * MiB),
    ("2G", 2 * GiB), ("2GiB", 2 * GiB), ("1.5G", 1.5 * GiB), (".5G", GiB / 2),
    ("1T", TiB), ("1TiB", TiB),
    ("500kB", 500_000), ("500MB", 500_000_000), ("500MB/s", 500_000_000), ("2GB", 2e9), ("1TB", 1e12),
    ("8bit", 1),
    ("100kbit", 12_500), ("100Mbit", 12_500_000), ("100mbit/s", 12_500_000),
    ("1gbit", 125_000_000), ("10Gbit/s", 1_250_000_000), ("1GBIT", 125_000_000),
    (" 1gbit ", 125_000_000),
])
def test_rate_units(text: str, bytes_s: float) -> None:
    assert parse_rate(text) == pytest.approx(bytes_s)


@pytest.mark.parametrize("text, says", [
    ("", "is not a rate"), ("fast", "is not a rate"), ("-1", "is not a rate"), ("1e9", "is not a rate"),
    ("0", "above zero"), ("0M", "above zero"), ("0.0", "above zero"),
    ("1parsec", "unknown unit"), ("10Mbps", "unknown unit"), ("5X", "unknown unit"), ("1KiBs", "unknown unit"),
    ("1..5M", "is not a rate"), ("M", "is not a rate"),
    ("10Mb", "ambiguous"), ("10kb", "ambiguous"), ("1gb", "ambiguous"),
])
def test_rate_errors(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_rate(text)


def test_one_meaning_per_flag() -> None:
    """A flag two subcommands share takes the same values, read the same way, in both."""
    _load_commands()
    seen: dict[str, tuple[str, argparse.Action]] = {}
    for name, parser in subparsers(build_parser()).items():
        for action in parser._actions:
            for opt in action.option_strings:
                if opt in seen:
                    other_name, other = seen[opt]
                    where = f"{opt} in {other_name} and {name}"
                    assert type(action) is type(other), where
                    assert (action.nargs, action.type, action.choices) == (other.nargs, other.type, other.choices), where
                seen[opt] = (name, action)
    assert {"--bandwidth", "--tracker", "--json", "--downtime", "--ssh-config"} <= set(seen)


def test_bandwidth_reads_the_same_in_migrate_and_wss() -> None:
    _load_commands()
    parsers = subparsers(build_parser())
    for value, expected in (("100", 100.0), ("100M", 100 * MiB), ("1gbit", 125e6)):
        assert parsers["migrate"].parse_args(["1@a", "b", "--bandwidth", value]).bandwidth == expected
        assert parsers["wss"].parse_args(["1", "--bandwidth", value]).bandwidth == expected


# --- options anywhere ---------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["migrate", "SRC", "localhost", "--dry-run", "--json"],
    ["SRC", "localhost", "--dry-run", "--json"],
    ["--dry-run", "--json", "SRC", "localhost"],
    ["--ssh-config", "CONFIG", "--json", "SRC", "--dry-run", "localhost"],
    ["--ssh-config=CONFIG", "--bandwidth", "1gbit", "--dry-run", "--json", "SRC", "localhost"],
    ["--json", "migrate", "--dry-run", "SRC", "localhost"],
], ids=["explicit", "after", "before", "between", "values", "before-the-name"])
def test_migrate_form_takes_options_anywhere(tmp_path: Path, args: list[str]) -> None:
    """`--dry-run` runs the preflight and moves nothing; localhost needs no SSH."""
    proc = sleeper()
    config = tmp_path / "ssh_config"
    config.write_text("")
    args = [str(config) if a == "CONFIG" else f"{proc.pid}@localhost" if a == "SRC" else a for a in args]
    res = kcr(*args, *NEW_PID)
    assert res.returncode == 0, res.stderr.decode()
    report = json.loads(res.stdout.decode().strip().splitlines()[-1])
    assert report["state"] == "dry-run" and report["pid"] == proc.pid and report["new_pid"] == 0
    assert proc.poll() is None and state(proc.pid) == "S"


@pytest.mark.parametrize("args, expected", [
    (["checkpoint", "-o", "F", "42"], {"command": "checkpoint", "output": "F", "pid": 42}),
    (["checkpoint", "42", "-o", "F"], {"command": "checkpoint", "output": "F", "pid": 42}),
    (["-o", "F", "checkpoint", "42"], {"command": "checkpoint", "output": "F", "pid": 42}),
    (["restore", "-i", "F", "--json"], {"command": "restore", "input": "F", "json": True}),
    (["restore", "--json", "-i", "F"], {"command": "restore", "input": "F", "json": True}),
    (["wss", "--count", "2", "42"], {"command": "wss", "count": 2, "pid": 42}),
    (["wss", "42", "--count", "2"], {"command": "wss", "count": 2, "pid": 42}),
    (["show", "--", "-"], {"command": "show", "image": "-"}),
    (["show", "-i", "F"], {"command": "show", "image": None, "input": "F"}),
    (["-i", "F", "show"], {"command": "show", "image": None, "input": "F"}),
    (["restore", "img", "--json"], {"command": "restore", "image": "img", "input": None, "json": True}),
    (["--new-pid", "restore", "-i", "img"], {"command": "restore", "image": None, "input": "img", "new_pid": True}),
    (["resolve", "--kill", "7@h"], {"command": "resolve", "kill": True, "source": (7, "h")}),
    (["--kill", "resolve", "7@h"], {"command": "resolve", "kill": True, "source": (7, "h")}),
    (["--compress", "-7", "7@h", "b"], {"command": "migrate", "compress": -7, "source": (7, "h"), "dest": "b"}),
    (["--ssh", "F", "7@h", "b"], {"command": "migrate", "ssh_config": "F", "source": (7, "h")}),
    (["--", "7@h", "b"], {"command": "migrate", "source": (7, "h"), "dest": "b"}),
])
def test_subcommands_take_options_before_or_after_positionals(args: list[str], expected: dict[str, object]) -> None:
    _load_commands()
    parser = build_parser()
    ns = vars(parser.parse_args(command_first(list(args), parser)))
    assert {k: ns[k] for k in expected} == expected


def test_a_bad_first_argument_is_a_usage_error() -> None:
    res = kcr("--ssh-config", "/dev/null", "1234", "hostB")
    assert res.returncode == 2
    assert "error: '1234' is not a command (checkpoint, completion, migrate" in res.stderr.decode()
    assert "kcr-migrate PID@HOST_A HOST_B" in res.stderr.decode()


@pytest.mark.parametrize("args", [["restore"], ["restore", "a.img", "-i", "b.img"], ["show"],
                                  ["show", "a.img", "-i", "b.img"]])
def test_restore_and_show_take_one_image(args: list[str]) -> None:
    """`show` reads an image as `restore` does: FILE or -i FILE, one of them."""
    res = kcr(*args)
    assert res.returncode == 2
    assert one_error_line(res.stderr) == (f"kcr-migrate: error: {args[0]} takes one image: "
                                          f"kcr-migrate {args[0]} FILE (or -i FILE; - for stdin)")


# --- checkpoint -o ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["directory", "missing folder", "existing file"])
def test_checkpoint_refuses_an_output_it_cannot_write(tmp_path: Path, case: str) -> None:
    proc = sleeper()
    out = {"directory": tmp_path, "missing folder": tmp_path / "nowhere" / "img",
           "existing file": tmp_path / "img"}[case]
    if case == "existing file":
        out.write_bytes(b"keep me")
    line = one_error_line(kcr("checkpoint", str(proc.pid), "-o", str(out)).stderr)
    assert str(out) in line
    assert {"directory": "is a directory", "missing folder": f"folder {out.parent} does not exist",
            "existing file": "exists: remove it, or add --force"}[case] in line
    assert proc.poll() is None and state(proc.pid) == "S"         # never frozen, never killed
    if case == "existing file":
        assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == (["img"] if case == "existing file" else [])


@pytest.mark.parametrize("case", ["readable by others", "not in a folder that exists"])
def test_checkpoint_refuses_an_image_key_it_cannot_use(tmp_path: Path, case: str) -> None:
    """A key file others may read (anyone could sign with it), or one named where none can be
    made: one line, before anything is frozen; no image."""
    proc = sleeper()
    key = tmp_path / "image.key"
    if case == "readable by others":
        key.write_bytes(bytes(32))
        key.chmod(0o644)
    else:
        (tmp_path / "file").write_text("")
        key = tmp_path / "file" / "image.key"
    line = one_error_line(kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img"), "--image-key", str(key)).stderr)
    assert f"image key {key}" in line
    assert ("chmod 600" if case == "readable by others" else "cannot read or create") in line
    assert proc.poll() is None and state(proc.pid) == "S"
    assert not (tmp_path / "img").exists()


def test_checkpoint_force_replaces_a_file(tmp_path: Path) -> None:
    proc = sleeper()
    out = tmp_path / "img"
    out.write_bytes(b"old")
    res = kcr("checkpoint", "--force", "-o", str(out), str(proc.pid), "--leave-running")
    assert res.returncode == 0, res.stderr.decode()
    assert proc.poll() is None
    shown = kcr("show", str(out))
    assert shown.returncode == 0, shown.stderr.decode()
    assert json.loads(shown.stdout)["process"]


def test_checkpoint_relative_output_in_the_current_folder(tmp_path: Path) -> None:
    proc = sleeper()
    res = subprocess.run([*KCR_MIGRATE, "checkpoint", str(proc.pid), "-o", "img", "--leave-running"],
                         cwd=tmp_path, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    assert (tmp_path / "img").stat().st_size > 0


# --- version and start-up ------------------------------------------------------------------------

def test_version() -> None:
    import importlib.metadata
    res = kcr("--version")
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.decode().startswith(f"kcr-migrate {importlib.metadata.version('kcr-migrate')} (protocol ")
    assert kcr("--json", "--version").stdout == res.stdout

LOADED = """
import sys
from migrate.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(code, "asyncssh" in sys.modules, "trio" in sys.modules, file=sys.stderr)
"""


def loaded(*args: str) -> tuple[str, bool, bool]:
    """Run the CLI in a fresh Python; (exit code, asyncssh loaded, trio loaded)."""
    res = subprocess.run([sys.executable, "-c", LOADED, *args], capture_output=True, timeout=120, cwd=REPO)
    code, ssh, trio = res.stderr.decode().splitlines()[-1].split()
    return code, ssh == "True", trio == "True"


def test_local_commands_load_neither_asyncssh_nor_trio(tmp_path: Path) -> None:
    proc = sleeper()
    image = tmp_path / "img"
    assert loaded("checkpoint", str(proc.pid), "-o", str(image), "--leave-running") == ("0", False, False)
    assert loaded("show", str(image)) == ("0", False, False)
    assert loaded("wss", str(proc.pid), "--count", "1", "--interval", "0.05") == ("0", False, False)
    for command in ("restore", "checkpoint", "show", "wss", "migrate", "resolve", "completion"):
        assert loaded(command, "--help") == ("0", False, False), command
    assert loaded("--version") == ("0", False, False)
    assert loaded("completion", "bash") == ("0", False, False)
    assert proc.poll() is None


# --- exit statuses -------------------------------------------------------------------------------
# A signal is sent at a known point: the CLI is made to block writing to a pipe the test holds
# full (its stdout or stderr) at that point, seen in /proc/PID/task/*/syscall.

def full_pipe() -> tuple[int, int]:
    """A pipe whose write end is full: the next write to it blocks until the read end is read."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"\n" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    return r, w


def wait_writing(pid: int, fd: int, timeout: float = 60, syscall: int = 1) -> None:
    """Wait until a thread of ``pid`` is blocked in a write (``syscall`` 1; 0: a read) on its
    fd ``fd`` (or a dup of it)."""
    target = os.readlink(f"/proc/{pid}/fd/{fd}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                call = (task / "syscall").read_text().split()
                if call[0] == str(syscall) and os.readlink(f"/proc/{pid}/fd/{int(call[1], 16)}") == target:
                    return
            except (OSError, IndexError, ValueError):
                pass
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), f"kcr-migrate (pid {pid}) ended before blocking on fd {fd}"
        time.sleep(0.01)
    raise AssertionError(f"kcr-migrate (pid {pid}) did not block on fd {fd} in {timeout} s")


def drain(fd: int) -> bytes:
    """Everything left in the pipe until its last writer exits."""
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def holder(folder: Path, mib: int = 4) -> subprocess.Popen[bytes]:
    """A CPython process holding ``mib`` MiB of random bytes (an image too big for a pipe's
    buffer, compressed or not), started and ready."""
    ready = folder / "ready"
    proc = subprocess.Popen([sys.executable, "-c", "import os, sys, time\nb = os.urandom(int(sys.argv[1]) << 20)\n"
                             "open(sys.argv[2], 'w').close()\ntime.sleep(600)", str(mib), str(ready)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)
    STARTED.append(proc)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the holder did not start"
        time.sleep(0.01)
    return proc


def cli(*args: str, stdin: int = subprocess.DEVNULL, stdout: int = subprocess.PIPE,
        stderr: int = subprocess.PIPE) -> subprocess.Popen[bytes]:
    """kcr-migrate in a process group of its own, as a shell runs a job: ``os.killpg`` is a
    terminal's Ctrl-C."""
    proc = subprocess.Popen([*KCR_MIGRATE, *args], stdin=stdin, stdout=stdout, stderr=stderr,
                            start_new_session=True)
    STARTED.append(proc)
    return proc


def test_help_documents_the_exit_statuses() -> None:
    for args in (["--help"], ["checkpoint", "--help"], ["migrate", "--help"]):
        res = kcr(*args)
        assert res.returncode == 0
        out = res.stdout.decode()
        for code in ("0", "1", "2", "3", "130"):
            assert f"\n  {code:<4} " in out.split("exit status:")[1], (args, out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_checkpoint_interrupted_while_frozen_changes_nothing(tmp_path: Path, sig: int) -> None:
    """Stopped mid-image (its stdout, the image, not read): 130, the process runs on."""
    proc = holder(tmp_path)
    ckpt = cli("checkpoint", str(proc.pid), "-o", "-")
    wait_writing(ckpt.pid, 1)
    assert state(proc.pid) == "t"                      # frozen, being written
    ckpt.send_signal(sig)
    _, err = ckpt.communicate(timeout=60)
    assert ckpt.returncode == 130
    assert "interrupted: nothing was written and the process was left running" in one_error_line(err)
    assert proc.poll() is None and state(proc.pid) == "S"


@pytest.mark.parametrize("operation", ["checkpoint", "restore"])
def test_a_stop_signal_not_yet_handled_still_rolls_back(tmp_path: Path, operation: str) -> None:
    """A SIGTERM sent before the point of no return rolls back even when the main thread has
    not run its handler yet (a busy machine: the image could be finished meanwhile and the
    command report success). Here no thread may take it (this thread blocks it, the engine's
    threads always do), so it stays pending where only the engine's own check can see it."""
    import io

    from migrate import image_restore, images
    from transport.errors import Cancelled, MigrationError
    from transport.image import ImageReader
    from transport.signing import ImageVerifier

    proc = holder(tmp_path, mib=1)
    image = io.BytesIO()
    if operation == "restore":
        images.checkpoint(proc.pid, image, images.CheckpointOptions(leave_running=True))
        image.seek(0)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Cancelled, match="interrupted"):
            if operation == "checkpoint":
                images.checkpoint(proc.pid, image)
            else:
                image_restore.restore(image, new_pid=True)
    finally:
        taken = signal.sigtimedwait({signal.SIGTERM}, 0)        # still pending: taken here, not by pytest
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    assert taken is not None
    assert proc.poll() is None and state(proc.pid) == "S"                  # the job runs on, as it was
    if operation == "checkpoint":                                           # and no image is whole
        with pytest.raises(MigrationError, match="truncated"):
            list(ImageReader(io.BytesIO(image.getvalue()), verifier=ImageVerifier(trust_image=True)))


def test_only_the_main_thread_takes_a_signal_to_stop(tmp_path: Path) -> None:
    """The kernel gives a signal sent to the process to any thread that does not block it.
    Taken by the thread blocked writing the image, it would wait for that write (the whole
    image, once the pipe is read) before the main thread saw it: the checkpoint would finish,
    and kill the process, after a Ctrl-C. So while it writes, every other thread blocks
    SIGINT, SIGTERM and SIGHUP, and the main thread takes them."""
    proc = holder(tmp_path)
    ckpt = cli("checkpoint", str(proc.pid), "-o", "-")
    wait_writing(ckpt.pid, 1)
    stop = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGHUP - 1))
    blocked = {}
    for task in Path(f"/proc/{ckpt.pid}/task").iterdir():
        fields = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines())
        blocked[int(task.name)] = int(fields["SigBlk"], 16) & stop
    ckpt.send_signal(signal.SIGINT)
    _, err = ckpt.communicate(timeout=60)
    assert ckpt.returncode == 130, err.decode()
    assert len(blocked) > 1, "the checkpoint writes from a thread of its own"
    assert blocked.pop(ckpt.pid) == 0, "the main thread takes them"
    assert all(mask == stop for mask in blocked.values()), blocked


def test_checkpoint_interrupted_once_the_image_is_whole_succeeds(tmp_path: Path) -> None:
    """Ctrl-C while it reports (its stderr full): the image is written and the process ended,
    so the status is 0 all the same."""
    proc = sleeper()
    r, w = full_pipe()
    ckpt = cli("checkpoint", str(proc.pid), "-o", str(tmp_path / "img"), stderr=w)
    os.close(w)
    wait_writing(ckpt.pid, 2)
    os.killpg(ckpt.pid, signal.SIGINT)                 # Ctrl-C at a terminal
    ckpt.send_signal(signal.SIGTERM)
    err = drain(r).decode().strip()
    ckpt.communicate(timeout=60)
    assert ckpt.returncode == 0, err
    assert err.startswith(f"checkpointed pid {proc.pid}: 1 threads") and "process killed" in err, err
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert (tmp_path / "img").stat().st_size > 0


@pytest.mark.parametrize("group", [False, True], ids=["SIGTERM", "Ctrl-C at a terminal"])
def test_migrate_interrupted_in_preflight_changes_nothing(group: bool) -> None:
    """SIGTERM, or a terminal's Ctrl-C (SIGINT to the whole process group: the local agents
    have sessions of their own and are not hit), as preflight reports on the process (its
    stderr full): 130, rolled back through both agents, the source runs on, never moved."""
    proc = sleeper()
    r, w = full_pipe()
    mig = cli(f"{proc.pid}@localhost", "localhost", *NEW_PID, "--json", stderr=w)
    os.close(w)
    wait_writing(mig.pid, 2)
    if group:
        os.killpg(mig.pid, signal.SIGINT)
    else:
        mig.send_signal(signal.SIGTERM)
    err = drain(r).decode()
    out, _ = mig.communicate(timeout=60)
    assert mig.returncode == 130, err
    assert "Traceback" not in err and "interrupted: the migration was rolled back" in err, err
    report = json.loads(out.decode().splitlines()[-1])
    assert report["state"] == "rolled-back" and report["warnings"] == [], report
    assert proc.poll() is None and state(proc.pid) == "S"


def test_migrate_interrupted_once_moved_succeeds() -> None:
    """Ctrl-C while the report is printed (its stdout full): the process runs at the
    destination and the source is gone, so the status is 0."""
    proc = sleeper()
    r, w = full_pipe()
    mig = cli(f"{proc.pid}@localhost", "localhost", *NEW_PID, "--json", stdout=w)
    os.close(w)
    wait_writing(mig.pid, 1)
    os.killpg(mig.pid, signal.SIGINT)                  # Ctrl-C at a terminal
    mig.send_signal(signal.SIGTERM)
    report = json.loads(drain(r).decode().strip().splitlines()[-1])
    _, err = mig.communicate(timeout=60)
    try:
        assert mig.returncode == 0, err.decode()
        assert report["state"] == "done" and report["new_pid"] not in (0, proc.pid)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert state(report["new_pid"]) == "S"
    finally:
        if report.get("new_pid"):
            os.kill(report["new_pid"], signal.SIGKILL)


def sleep_image(tmp_path: Path) -> tuple[Path, str]:
    """The image of a `sleep` (ended once written), and its unique argument."""
    arg = f"{600 + os.getpid() % 1000}.{time.monotonic_ns() % 1000:03d}"
    proc = subprocess.Popen(["sleep", arg], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    STARTED.append(proc)
    image = tmp_path / "img"
    res = kcr("checkpoint", str(proc.pid), "-o", str(image))
    assert res.returncode == 0, res.stderr.decode()
    proc.wait()
    return image, arg


def sleeps(arg: str) -> list[int]:
    """Live processes running `sleep ARG`."""
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes() == f"sleep\0{arg}\0".encode() \
                    and state(int(entry.name)) not in ("Z", "X"):
                out.append(int(entry.name))
        except OSError:
            pass
    return out


def test_restore_interrupted_before_it_runs_leaves_nothing(tmp_path: Path) -> None:
    """Ctrl-C while restore waits for the rest of the image (half of it piped in): 130, and
    no copy of the process runs."""
    image, arg = sleep_image(tmp_path)
    data = image.read_bytes()
    r, w = os.pipe()
    res = cli("restore", "-i", "-", "--new-pid", stdin=r)
    os.close(r)
    os.write(w, data[:len(data) // 2])
    wait_writing(res.pid, 0, syscall=0)
    os.killpg(res.pid, signal.SIGINT)
    os.close(w)
    out, err = res.communicate(timeout=60)
    assert res.returncode == 130, err.decode()
    assert "Traceback" not in err.decode() and out == b""
    assert sleeps(arg) == []


def test_restore_interrupted_once_it_runs_succeeds(tmp_path: Path) -> None:
    """Ctrl-C while it prints the new pid (its stdout full): the process runs, status 0."""
    image, arg = sleep_image(tmp_path)
    r, w = full_pipe()
    res = cli("restore", "-i", str(image), "--new-pid", stdout=w)
    os.close(w)
    wait_writing(res.pid, 1)
    os.killpg(res.pid, signal.SIGINT)
    printed = drain(r).split()
    _, err = res.communicate(timeout=60)
    running = sleeps(arg)
    for pid in running:
        os.kill(pid, signal.SIGKILL)
    assert res.returncode == 0, err.decode()
    assert running == [int(printed[-1])]          # and so it leads a session of its own, out of the Ctrl-C's reach


@pytest.mark.parametrize("count, status", [("0", 0), ("1000", 130)], ids=["until-interrupted", "count"])
def test_wss_ends_on_a_signal(count: str, status: int) -> None:
    """Without --count a signal is how `wss` ends (0: Ctrl-C at a terminal); with one, it cuts
    it short (130: SIGTERM). The process is let go either way."""
    proc = sleeper()
    wss = cli("wss", str(proc.pid), "--count", count, "--interval", "0.05")
    assert wss.stdout is not None
    assert wss.stdout.readline().split()[:2] == [b"interval", b"seconds"]     # measuring
    if count == "0":
        os.killpg(wss.pid, signal.SIGINT)
    else:
        wss.send_signal(signal.SIGTERM)
    _, err = wss.communicate(timeout=60)
    assert wss.returncode == status, err.decode()
    assert "Traceback" not in err.decode()
    assert proc.poll() is None and state(proc.pid) == "S"
    assert "TracerPid:\t0\n" in Path(f"/proc/{proc.pid}/status").read_text()


# --- shell completion ----------------------------------------------------------------------------

BASH_COMPLETE = """
source "$1"; shift
fn=$(complete -p kcr-migrate | sed -n 's/.*-F \\([^ ]*\\).*/\\1/p')
COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
"$fn"
printf '%s\\n' "${COMPREPLY[@]}"
"""

# A zsh at a terminal (zpty), completing the words it is given with TAB; compadd reports what
# the completion functions offered, each as ::WORD.
# The patterns read for match the shell's output, never its echo of what was typed (a loaded
# machine echoes late): READY is printed from two quoted halves, the report holds digits.
ZSH_COMPLETE = r"""
zmodload zsh/zpty
zpty z zsh -f -i
zpty -w z "PS1=''; fpath=($1 \$fpath); autoload -U compinit; compinit -u -D"
zpty -w z 'comppostfuncs=(__report); __report() { print -r -- "<<${compstate[nmatches]}>>"; }'
zpty -w z 'compadd() { local -a h; builtin compadd -O h "$@"; print -rl -- ${h[@]/#/::}; builtin compadd "$@"; }'
zpty -w z 'bindkey "^I" complete-word; print "RE""ADY"'
zpty -r z line '*READY*' || exit 3
zpty -n -w z "$2"$'\t'
zpty -r z out '*<<[0-9]*>>*' || exit 4
print -r -- "$out"
zpty -d z
"""

CASES = [                                   # (words typed, one of the completions expected)
    (["chec"], "checkpoint"),
    (["checkpoint", "--lea"], "--leave-running"),
    (["wss", "1", "--tracker", "uff"], "uffd-wp"),
    (["--ssh-c"], "--ssh-config"),                        # the migrate form, before PID@HOST
    (["1@localhost", "localhost", "--dry"], "--dry-run"),
    (["completion", "z"], "zsh"),
]


@pytest.fixture(scope="module")
def completions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`kcr-migrate completion bash` in kcr-migrate.bash, `... zsh` in _kcr-migrate (as zsh's fpath wants)."""
    folder = tmp_path_factory.mktemp("completion")
    for shell, name in (("bash", "kcr-migrate.bash"), ("zsh", "_kcr-migrate")):
        res = kcr("completion", shell)
        assert res.returncode == 0, res.stderr.decode()
        (folder / name).write_bytes(res.stdout)
    return folder


@pytest.mark.parametrize("words, expected", CASES, ids=[" ".join(w) for w, _ in CASES])
def test_bash_completion(completions: Path, words: list[str], expected: str) -> None:
    got = subprocess.run(["bash", "-c", BASH_COMPLETE, "bash", str(completions / "kcr-migrate.bash"), "kcr-migrate",
                          *words],
                         capture_output=True, timeout=30)
    assert got.returncode == 0, got.stderr.decode()
    offered = got.stdout.decode().split()
    assert expected in offered and all(w.startswith(words[-1]) for w in offered), offered


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed (scripts/setup installs it)")
@pytest.mark.parametrize("words, expected", CASES[:3], ids=[" ".join(w) for w, _ in CASES[:3]])
def test_zsh_completion(completions: Path, words: list[str], expected: str) -> None:
    got = subprocess.run(["zsh", "-f", "-c", ZSH_COMPLETE, "zsh", str(completions), " ".join(["kcr-migrate", *words])],
                         capture_output=True, timeout=30)
    assert got.returncode == 0, got.stderr.decode()
    offered = re.findall(r"::(\S+)", got.stdout.decode().replace("\r", ""))
    assert expected in offered, got.stdout.decode()


# --- one clear line for bad input ------------------------------------------------------------------

def kernel_thread() -> int | None:
    """A kernel thread's pid, where this pid namespace shows one."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[6]) & 0x00200000:   # PF_KTHREAD
                    return int(entry.name)
            except (OSError, IndexError, ValueError):
                continue
    return None


BAD_INPUT = {
    # case: (arguments, what the line must say)
    "pid 1": (["checkpoint", "1", "-o", "IMG"], "pid 1 ("),
    "pid 1, live": (["1@localhost", "localhost", "--dry-run"], "localhost: pid 1 ("),
    "kernel thread": (["checkpoint", "KTHREAD", "-o", "IMG"], "is a kernel thread: only user processes"),
    "its own pid": (["checkpoint", "SELF", "-o", "IMG"], "cannot checkpoint kcr-migrate's own process"),
    "an ancestor": (["checkpoint", "ANCESTOR", "-o", "IMG"], "is an ancestor of kcr-migrate itself"),
    "no such pid": (["checkpoint", "NOPID", "-o", "IMG"], "no process with pid"),
    "unreachable host": (["--ssh-config", "CONFIG", "1234@unreachable", "localhost"],
                         "unreachable: cannot reach unreachable over SSH"),
    "show a folder": (["show", "DIR"], "is a directory: give an image file"),
    "restore a folder": (["restore", "-i", "DIR"], "is a directory: give an image file"),
    "restore without root": (["restore", "-i", "IMG"], "restoring a process needs root, or the capability "
                                                       "CAP_CHECKPOINT_RESTORE"),
    # the destination's agent names itself by this machine's host name; the line says localhost, as typed
    "migrate without root": (["SLEEPER@localhost", "localhost", "--dry-run", "--new-pid"],
                             "localhost: restoring a process needs root, or the capability CAP_CHECKPOINT_RESTORE"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_clear_line(tmp_path: Path, case: str) -> None:
    args, says = BAD_INPUT[case]
    kthread = kernel_thread()
    if case == "kernel thread" and kthread is None:
        pytest.skip("this pid namespace shows no kernel thread")
    (tmp_path / "ssh_config").write_text("Host unreachable\n  HostName 127.0.0.1\n  Port 1\n")
    (tmp_path / "img").write_bytes(b"")
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    words = {"IMG": str(tmp_path / "img" if case.startswith("restore") else tmp_path / "new-img"),
             "KTHREAD": str(kthread), "ANCESTOR": str(os.getpid()), "NOPID": str(pid_max + 1),
             "CONFIG": str(tmp_path / "ssh_config"), "DIR": str(tmp_path)}
    if case == "migrate without root":
        words["SLEEPER"] = str(sleeper().pid)
    argv = [*KCR_MIGRATE, *(words.get(a, a.replace("SLEEPER", words.get("SLEEPER", ""))) for a in args)]
    if case == "its own pid":              # the shell execs the CLI: $$ is its pid
        argv = ["sh", "-c", 'exec "$@" "$$" -o "$0"', words["IMG"], *KCR_MIGRATE, "checkpoint"]
    elif case.endswith("without root"):    # root, less the capabilities a restore needs
        argv = ["setpriv", "--inh-caps=-all", "--bounding-set=-sys_admin,-checkpoint_restore", *argv]
    res = subprocess.run(argv, capture_output=True, timeout=120)
    assert res.returncode == 1
    if case == "migrate without root":    # after preflight's line on the process
        err = res.stderr.decode()
        line = err.strip().splitlines()[-1]
        assert "Traceback" not in err and says in line and line.endswith("run kcr-agent on localhost as root"), err
        assert socket.gethostname() == "localhost" or socket.gethostname() not in line, line
    else:
        assert says in one_error_line(res.stderr)
    assert not (tmp_path / "new-img").exists()


HUNG = {   # a command reaching a host that accepts the connection and never answers: (args, status, line)
    "migrate": (["PID@blackhole", "localhost"], 130,
                "interrupted: the migration was rolled back and the process runs on the source"),
    "resolve": (["resolve", "PID@blackhole", "--kill"], 3, "interrupted: pid PID@blackhole may still be stopped; "
                                                            "run `kcr-migrate resolve PID@blackhole --kill` again"),
    "rebalance": (["rebalance", "--hosts", "HOSTS", "--dry-run"], 130,
                  "interrupted while measuring the hosts: nothing was moved"),
}


@pytest.mark.parametrize("case", list(HUNG))
def test_ctrl_c_while_a_host_does_not_answer(tmp_path: Path, case: str) -> None:
    """Ctrl-C while connecting (the ssh server took the connection, says nothing): the
    command stops at once with its status, and the process was never touched."""
    proc = sleeper()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        config = tmp_path / "ssh_config"
        config.write_text(f"Host blackhole\n  HostName 127.0.0.1\n  Port {listener.getsockname()[1]}\n")
        (tmp_path / "hosts").write_text("blackhole\n")
        args, status, says = HUNG[case]
        words = {"HOSTS": str(tmp_path / "hosts")}
        run = cli("--ssh-config", str(config), *(words.get(a, a.replace("PID", str(proc.pid))) for a in args))
        listener.settimeout(60)
        conn, _ = listener.accept()         # it is connecting
        with conn:
            run.send_signal(signal.SIGINT)
            _, err = run.communicate(timeout=60)
    assert run.returncode == status, err.decode()
    assert "Traceback" not in err.decode()
    assert err.decode().strip().splitlines()[-1] == f"kcr-migrate: error: {says.replace('PID', str(proc.pid))}"
    assert proc.poll() is None and state(proc.pid) == "S"
