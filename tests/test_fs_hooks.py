"""Filesystem hooks: a job's files move with it (rsync and btrfs), between two test hosts.

Each host has its own mount namespace and its own /srv; the job (tests/workloads/fs_churn.py)
keeps writing, appending, truncating, renaming, deleting and hard-linking files in its data
directory, with files open and mapped, while it is migrated. It must finish with the same
files and output as an unmigrated run. A failure during the final pass rolls back: the
destination's copy and every snapshot are gone and the job finishes on the source as if
nothing happened. Bad input is refused in preflight with one line that says what to do.
The btrfs tests bring up a second pair of hosts whose /srv is btrfs on a loop device.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
import trio

from agent.fs_rsync import _rsync, mapped_for_writing, parse_stats, rsync_argv
from agent.fsync import fine_timestamps, is_mount_point, probe
from examples.testbed import Testbed, TestbedUnavailable, check_available
from migrate import Migration, MigrationError, MigrationOptions, PhaseChanged
from migrate.fs_btrfs import BtrfsHook
from migrate.fs_rsync import RsyncHook
from migrate.fshooks import HOOK_KINDS, parse_hook
from tests._hosts import start_in, verdict, wait_file
from tests._migration import migrate_cli, proc_state, running_copies, wait_gone
from tests._workloads import STARTED
from transport.errors import FsHookError

CHURN = Path(__file__).parent / "workloads" / "fs_churn.py"
STEPS = "600"
BTRFS_STATE_DIR = Path("/run/kcr-testbed-test-fshooks")
BTRFS_PREFIX = "kcrh-"
BTRFS_SUBNET = "10.77.219.0/24"
QUIET: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL,
                         "start_new_session": True}

TREE = r"""
import hashlib, json, os, sys
root = sys.argv[1]
out = {}
for d, _, files in os.walk(root):
    for f in files:
        p = os.path.join(d, f)
        st = os.lstat(p)
        with open(p, "rb") as fh:
            out[os.path.relpath(p, root)] = [st.st_size, hashlib.sha256(fh.read()).hexdigest(), st.st_mode & 0o7777,
                                             st.st_nlink]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def btrfs_bed(testbed: Testbed) -> Iterator[Testbed]:
    """hostA and hostB with btrfs /srv (``testbed`` holds the session's lock on the test hosts)."""
    try:
        check_available("btrfs")
    except TestbedUnavailable as exc:
        pytest.skip(f"btrfs test hosts unavailable: {exc}")
    bed = Testbed(BTRFS_STATE_DIR, prefix=BTRFS_PREFIX, subnet=BTRFS_SUBNET, srv_fs="btrfs", srv_size=512 << 20)
    try:
        bed.up()
        yield bed
    finally:
        bed.down()


# --- helpers -------------------------------------------------------------------------------

def sh(bed: Testbed, host: str, script: str) -> str:
    proc = bed.exec(host, ["sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{host}: {script}: {proc.stderr}"
    return str(proc.stdout)


def tree(bed: Testbed | None, host: str, root: str) -> dict[str, list[Any]]:
    """name -> [size, sha256, mode, links] of every file under ``root`` (inside ``host``)."""
    argv = [sys.executable, "-S", "-c", TREE, root]
    proc = bed.exec(host, argv, capture_output=True, text=True) if bed else \
        subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def leftovers(bed: Testbed, host: str) -> list[str]:
    """What the hooks leave beside the data (snapshots, staging, set-aside copies)."""
    return sorted(n for n in sh(bed, host, "ls -a /srv").split() if n.startswith(".kcr-"))


def start_churn(bed: Testbed, host: str, out: Path, data: str) -> int:
    """fs_churn inside ``host``, working in ``data``; its pid once it is ready (held three
    quarters in until its test asks for the ``verdict``)."""
    return start_in(bed, host, [sys.executable, "-S", str(CHURN), str(out), data, STEPS, "10"], out, hold=True)


def start_reference(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """An unmigrated run on this machine, in a directory of its own (runs beside the test)."""
    out, data = tmp_path / "ref", tmp_path / "ref-data"
    out.mkdir()
    data.mkdir()
    proc = subprocess.Popen([sys.executable, "-S", str(CHURN), str(out), str(data), STEPS, "10"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    STARTED.append(proc)
    return proc, out, data


def finished_reference(ref: tuple[subprocess.Popen[bytes], Path, Path]) -> tuple[str, dict[str, list[Any]]]:
    proc, out, data = ref
    assert proc.wait(timeout=120) == 0
    assert (out / "verdict").read_text() == "PASS\n"
    return (out / "output").read_text(), tree(None, "", str(data))


def fresh_path(name: str) -> str:
    return f"/srv/kcr-{name}-{uuid.uuid4().hex[:6]}"


def no_ssh_masters(bed: Testbed) -> bool:
    """No shared ssh connection (agent.fs_ssh) to these hosts is left."""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return not any("ControlMaster=yes" in line and str(bed.ssh_config_path) in line for line in ps.splitlines())


async def migrate_failing(bed: Testbed, pid: int, spec: str, on_phase: dict[str, Callable[[], None]]) -> Migration:
    """Migrate with the library; callbacks at phase changes; the migration must fail."""
    opts = MigrationOptions(ssh_config=str(bed.ssh_config_path), link_timeout_s=10.0, fs=(spec,), new_pid=True)

    def on_event(ev: Any) -> None:
        if isinstance(ev, PhaseChanged) and ev.phase in on_phase:
            on_phase[ev.phase]()
    m = Migration(pid, "hostA", "hostB", opts, on_event=on_event)
    with pytest.raises(MigrationError) as info:
        await m.run()
    m.error = info.value  # type: ignore[attr-defined]
    return m


def bind_over(bed: Testbed, host: str, fake: Path, target: str) -> Callable[[], None]:
    """Bind-mount ``fake`` over ``target`` inside ``host`` only; returns the undo."""
    sh(bed, host, f"mount --bind {fake} {target}")

    def undo() -> None:
        sh(bed, host, f"umount {target}")
    return undo


# --- pieces, without hosts -----------------------------------------------------------------

def test_parse_hook_builds_the_built_in_kinds() -> None:
    assert set(HOOK_KINDS) >= {"none", "rsync", "btrfs"}
    hook = parse_hook("rsync:/srv/job/")
    assert isinstance(hook, RsyncHook) and hook.paths() == ["/srv/job"]
    assert isinstance(parse_hook("btrfs:/srv/job"), BtrfsHook)
    with pytest.raises(MigrationError, match="KIND:/absolute/path"):
        parse_hook("rsync:srv/job")
    with pytest.raises(MigrationError, match="kinds: btrfs, none, rsync"):
        parse_hook("zfs:/srv/job")


def test_rsync_command_and_statistics() -> None:
    argv = rsync_argv("/srv/job", "hostB", "ssh -F cfg", final=True, xattrs=True, exact_times=True, checksum=False)
    assert argv[:2] == ["rsync", "-aHS"] and "-X" in argv and "--numeric-ids" in argv and "--delete" in argv
    assert "--modify-window=-1" in argv and argv[-2:] == ["/srv/job/", "hostB:/srv/job/"]
    assert "--delete" not in rsync_argv("/srv/job", "b", "ssh", final=False, xattrs=False, exact_times=False,
                                        checksum=False)
    text = "Number of regular files transferred: 1\nTotal bytes sent: 10,485,987\nTotal bytes received: 51\n"
    assert parse_stats(text) == {"files_transferred": 1, "bytes_sent": 10485987, "bytes_received": 51}


def test_an_rsync_pass_that_stalls_ends(tmp_path: Path) -> None:
    """The other end never answers (a remote shell that only sleeps): the pass ends after its
    I/O timeout instead of waiting for ever; before the freeze that is a warning (the next
    pass catches up), the final pass fails (the migration rolls back)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("data")
    rsh = "sh -c 'exec sleep 30' stalled"
    argv = rsync_argv(str(tmp_path / "src"), "nowhere", rsh, final=False, xattrs=False, exact_times=True,
                      checksum=False, io_timeout=1)
    t0 = time.monotonic()
    stats = trio.run(partial(_rsync, argv, str(tmp_path / "src"), "nowhere", True))
    assert stats["exit"] == 30 and "timeout" in stats["warning"], stats
    assert time.monotonic() - t0 < 20
    with pytest.raises(FsHookError, match=r"failed \(exit 30\).*timeout"):
        trio.run(partial(_rsync, argv, str(tmp_path / "src"), "nowhere", False))


def test_probe_and_shared_writable_mappings(tmp_path: Path) -> None:
    facts = probe(str(tmp_path), ["rsync"])
    assert facts["exists"] and facts["is_dir"] and facts["entries"] == 0 and not facts["mount_point"]
    assert isinstance(facts["fine_timestamps"], bool) and facts["tools"]["rsync"]["path"]
    assert is_mount_point("/") and not is_mount_point(str(tmp_path))
    assert fine_timestamps(str(tmp_path)) == facts["fine_timestamps"] and os.listdir(tmp_path) == []
    target = tmp_path / "sub" / "m.bin"
    target.parent.mkdir()
    target.write_bytes(bytes(8192))
    with open(target, "r+b") as f, mmap.mmap(f.fileno(), 8192) as m:
        m[0:4] = b"kcr!"
        assert mapped_for_writing(str(tmp_path)) == ["sub/m.bin"]
    assert mapped_for_writing(str(tmp_path)) == []


def test_localhost_to_localhost_is_refused() -> None:
    proc = subprocess.Popen(["sleep", "30"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        code, report, err = migrate_cli(f"{proc.pid}@localhost", "localhost", "--fs", "rsync:/tmp/kcr-nothing")
        assert code != 0 and "use --fs none:/tmp/kcr-nothing" in err and "Traceback" not in err, err
        assert report["state"] == "rolled-back" and proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


# --- rsync between the test hosts ----------------------------------------------------------

def test_rsync_moves_a_job_that_keeps_changing_its_files(testbed: Testbed, tmp_path: Path) -> None:
    data = fresh_path("rsync")
    sh(testbed, "hostA", f"mkdir {data}")
    ref = start_reference(tmp_path)
    out = tmp_path / "moved"
    pid = start_churn(testbed, "hostA", out, data)
    code, report, err = migrate_cli(f"{pid}@hostA", "hostB", "--ssh-config", str(testbed.ssh_config_path),
                                    "--fs", f"rsync:{data}")
    assert code == 0, err
    assert verdict(out, timeout=90) == "PASS", (out / "stderr").read_text()
    wait_gone(report["new_pid"])
    output, files = finished_reference(ref)
    assert (out / "output").read_text() == output
    assert tree(testbed, "hostB", data) == files
    (fs,) = report["fs"]
    assert fs["hook"] == "rsync" and fs["passes"] and fs["passes"][0]["bytes_sent"] > 0
    assert fs["final"]["seconds"] > 0 and fs["final"]["mapped_compared"] >= 1   # shared.bin
    assert sh(testbed, "hostA", f"ls {data}")         # the source's copy is left as the process left it
    assert leftovers(testbed, "hostA") == leftovers(testbed, "hostB") == []
    assert no_ssh_masters(testbed)


def test_rsync_moves_a_tree_whose_processes_all_keep_changing_their_files(testbed: Testbed, tmp_path: Path) -> None:
    """Two churning processes, a parent and its child, each in a directory of its own under
    the hook: the destination restores a tree's processes as their states arrive, but with
    a hook none of them may open its files before the hook's final pass has brought them
    (the parent, whose state comes first, would find its log as the pass before left it)."""
    data = fresh_path("rsync-tree")
    sh(testbed, "hostA", f"mkdir -p {data}/child {data}/parent")
    out = tmp_path / "moved"
    child_out = out / "child"
    child_out.mkdir(parents=True)
    churn = f"{sys.executable} -S {CHURN}"
    pid = start_in(testbed, "hostA", ["sh", "-c", f"{churn} {child_out} {data}/child {STEPS} 10 & "
                                      f"exec {churn} {out} {data}/parent {STEPS} 10"], out, hold=True)
    while not (child_out / "ready").exists():
        time.sleep(0.02)
    code, report, err = migrate_cli(f"{pid}@hostA", "hostC", "--ssh-config", str(testbed.ssh_config_path),
                                    "--fs", f"rsync:{data}", keep_pid=True)
    assert code == 0, err
    assert len(report["processes"]) == 2
    assert verdict(out, timeout=90) == "PASS", (out / "stderr").read_text()      # (lets both go on)
    assert wait_file(child_out / "verdict", 90).strip() == "PASS"
    assert leftovers(testbed, "hostA") == leftovers(testbed, "hostC") == []


async def test_rsync_failing_in_the_final_pass_rolls_back(testbed: Testbed, tmp_path: Path) -> None:
    """The destination's rsync dies once the process is frozen: the copy is discarded and the
    job runs on at the source, its files as it left them."""
    data = fresh_path("rsync-fail")
    sh(testbed, "hostA", f"mkdir {data}")
    fake = tmp_path / "rsync-disk-full"
    fake.write_text("#!/bin/sh\necho 'rsync: write failed: No space left on device (28)' >&2\nexit 11\n")
    fake.chmod(0o755)
    ref = start_reference(tmp_path)
    out = tmp_path / "run"
    pid = start_churn(testbed, "hostA", out, data)
    undo: list[Callable[[], None]] = []
    try:
        m = await migrate_failing(testbed, pid, f"rsync:{data}", {
            "freeze": lambda: undo.append(bind_over(testbed, "hostB", fake, "/usr/bin/rsync"))})
    finally:
        for u in undo:
            u()
    assert m.report.state == "rolled-back" and undo, m.error  # type: ignore[attr-defined]
    assert "rsync" in str(m.error) and m.report.fs[0]["passes"]  # type: ignore[attr-defined]
    assert proc_state(pid) not in (None, "T", "t") and running_copies(str(out)) == [pid]
    assert sh(testbed, "hostB", f"ls -d {data} 2>/dev/null || true") == ""
    assert leftovers(testbed, "hostA") == leftovers(testbed, "hostB") == []
    assert verdict(out, timeout=90) == "PASS"
    output, files = finished_reference(ref)
    assert (out / "output").read_text() == output and tree(testbed, "hostA", data) == files
    assert no_ssh_masters(testbed)


def test_rsync_missing_on_the_destination_is_refused(testbed: Testbed, tmp_path: Path) -> None:
    data = fresh_path("norsync")
    sh(testbed, "hostA", f"mkdir {data} && echo x > {data}/f")
    empty = tmp_path / "not-a-program"
    empty.write_text("")
    proc = testbed.popen("hostA", ["sleep", "30"], **QUIET)
    STARTED.append(proc)
    undo = bind_over(testbed, "hostB", empty, "/usr/bin/rsync")
    try:
        code, report, err = migrate_cli(f"{proc.pid}@hostA", "hostB", "--ssh-config", str(testbed.ssh_config_path),
                                        "--fs", f"rsync:{data}")
    finally:
        undo()
    assert code != 0 and "Traceback" not in err, err
    assert f"hostB: --fs rsync:{data}: rsync is not installed: install it there (apt-get install rsync)" in err
    assert report["state"] == "rolled-back" and proc.poll() is None
    assert sh(testbed, "hostB", f"ls -d {data} 2>/dev/null || true") == ""


def test_destination_data_is_never_overwritten(testbed: Testbed, tmp_path: Path) -> None:
    data = fresh_path("taken")
    sh(testbed, "hostA", f"mkdir {data} && echo new > {data}/f")
    sh(testbed, "hostB", f"mkdir {data} && echo old > {data}/precious.txt")
    proc = testbed.popen("hostA", ["sleep", "30"], **QUIET)
    STARTED.append(proc)
    code, _, err = migrate_cli(f"{proc.pid}@hostA", "hostB", "--ssh-config", str(testbed.ssh_config_path),
                               "--fs", f"rsync:{data}")
    assert code != 0 and "already holds 1 entries (precious.txt)" in err and "--fs-replace" in err, err
    assert sh(testbed, "hostB", f"cat {data}/precious.txt") == "old\n"
    assert proc.poll() is None


# --- btrfs between the btrfs test hosts ----------------------------------------------------

def test_btrfs_moves_a_job_replacing_old_data(btrfs_bed: Testbed, tmp_path: Path) -> None:
    """Incremental snapshots while the job runs; with --fs-replace the old data found on the
    destination is set aside and deleted once the job runs there."""
    bed = btrfs_bed
    data = fresh_path("btrfs")
    sh(bed, "hostA", f"btrfs subvolume create {data} >/dev/null")
    sh(bed, "hostB", f"mkdir {data} && echo stale > {data}/old-result.txt")
    ref = start_reference(tmp_path)
    out = tmp_path / "moved"
    pid = start_churn(bed, "hostA", out, data)
    code, report, err = migrate_cli(f"{pid}@hostA", "hostB", "--ssh-config", str(bed.ssh_config_path),
                                    "--fs", f"btrfs:{data}", "--fs-replace")
    assert code == 0, err
    assert verdict(out, timeout=90) == "PASS", (out / "stderr").read_text()
    wait_gone(report["new_pid"])
    output, files = finished_reference(ref)
    assert (out / "output").read_text() == output
    assert tree(bed, "hostB", data) == files
    (fs,) = report["fs"]
    passes = fs["passes"]
    assert passes[0]["parent"] == "" and all(p["parent"] for p in passes[1:]) and fs["final"]["parent"]
    assert fs["final"]["bytes_sent"] < passes[0]["bytes_sent"]
    assert "ro=false" in sh(bed, "hostB", f"btrfs property get -ts {data} ro")     # writable subvolume
    assert leftovers(bed, "hostA") == leftovers(bed, "hostB") == []               # snapshots, old data
    assert "kcr-snap" not in sh(bed, "hostA", "btrfs subvolume list /srv") + sh(bed, "hostB", "btrfs subvolume list /srv")
    assert no_ssh_masters(bed)


async def test_btrfs_failing_in_the_final_pass_rolls_back(btrfs_bed: Testbed, tmp_path: Path) -> None:
    """btrfs receive fails on the destination once the process is frozen: the received
    snapshots go, the source's snapshots go, the job runs on at the source."""
    bed = btrfs_bed
    data = fresh_path("btrfs-fail")
    sh(bed, "hostA", f"btrfs subvolume create {data} >/dev/null")
    real = tmp_path / "btrfs.real"
    shutil.copy2("/usr/bin/btrfs", real)
    fake = tmp_path / "btrfs-receive-fails"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = receive ]; then echo "ERROR: short write: No space left on device" >&2; '
                    f'exit 1; fi\nexec {real} "$@"\n')
    fake.chmod(0o755)
    ref = start_reference(tmp_path)
    out = tmp_path / "run"
    pid = start_churn(bed, "hostA", out, data)
    undo: list[Callable[[], None]] = []
    try:
        m = await migrate_failing(bed, pid, f"btrfs:{data}", {
            "freeze": lambda: undo.append(bind_over(bed, "hostB", fake, "/usr/bin/btrfs"))})
        assert leftovers(bed, "hostA") == leftovers(bed, "hostB") == []
    finally:
        for u in undo:
            u()
    assert m.report.state == "rolled-back" and undo
    assert "No space left on device" in str(m.error)  # type: ignore[attr-defined]
    assert proc_state(pid) not in (None, "T", "t") and running_copies(str(out)) == [pid]
    assert sh(bed, "hostB", f"ls -d {data} 2>/dev/null || true") == ""
    assert verdict(out, timeout=90) == "PASS"
    output, files = finished_reference(ref)
    assert (out / "output").read_text() == output and tree(bed, "hostA", data) == files


def test_btrfs_refuses_a_directory_that_is_not_a_subvolume(btrfs_bed: Testbed) -> None:
    bed = btrfs_bed
    data = fresh_path("plain")
    sh(bed, "hostA", f"mkdir {data} && echo x > {data}/f")
    proc = bed.popen("hostA", ["sleep", "30"], **QUIET)
    STARTED.append(proc)
    code, report, err = migrate_cli(f"{proc.pid}@hostA", "hostB", "--ssh-config", str(bed.ssh_config_path),
                                    "--fs", f"btrfs:{data}")
    assert code != 0 and "Traceback" not in err, err
    assert f"hostA: --fs btrfs:{data}: {data} is not a btrfs subvolume (a directory on btrfs)" in err
    assert f"or use --fs rsync:{data}" in err and report["state"] == "rolled-back" and proc.poll() is None


def test_btrfs_agents_clean_up_when_kcr_migrate_dies(btrfs_bed: Testbed) -> None:
    """kcr-migrate is killed mid pre-copy: the agents delete the snapshots on both hosts and
    discard the destination's copy on their own; the process runs on at the source."""
    bed = btrfs_bed
    data = fresh_path("btrfs-orphan")
    sh(bed, "hostA", f"btrfs subvolume create {data} >/dev/null && head -c 16M /dev/urandom > {data}/big")
    proc = bed.popen("hostA", ["sleep", "60"], **QUIET)
    STARTED.append(proc)
    cli = subprocess.Popen([sys.executable, "-m", "migrate", f"{proc.pid}@hostA", "hostB", "--new-pid",
                            "--ssh-config", str(bed.ssh_config_path), "--fs", f"btrfs:{data}", "--bandwidth",
                            "64KiB"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    STARTED.append(cli)
    deadline = time.monotonic() + 30
    while not (leftovers(bed, "hostA") and leftovers(bed, "hostB")):     # a pass went through
        assert cli.poll() is None and time.monotonic() < deadline, "no snapshot appeared"
        time.sleep(0.05)
    cli.send_signal(signal.SIGKILL)
    cli.wait()
    deadline = time.monotonic() + 30
    while leftovers(bed, "hostA") or leftovers(bed, "hostB") or not no_ssh_masters(bed):
        assert time.monotonic() < deadline, (leftovers(bed, "hostA"), leftovers(bed, "hostB"))
        time.sleep(0.1)
    assert sh(bed, "hostB", f"ls -d {data} 2>/dev/null || true") == ""
    assert sh(bed, "hostA", f"ls {data}") == "big\n"
    deadline = time.monotonic() + 30
    while proc_state(proc.pid) in ("T", "t"):          # the holder lets it go once its agent is gone
        assert time.monotonic() < deadline, "the source process stays stopped"
        time.sleep(0.1)
    assert proc.poll() is None
