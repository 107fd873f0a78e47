"""Live migration between two test hosts: separate network and mount namespaces, each with its
own sshd; the orchestrator reaches both agents over SSH (asyncssh)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from examples.testbed import Testbed
from migrate import Migration, MigrationError, MigrationOptions, PhaseChanged
from tests._hosts import start_in, verdict, wait_file
from tests._migration import copies, migrate_cli, proc_state, running_copies, wait_gone
from tests._workloads import Reference, build, one_error_line


def netns_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


@pytest.mark.parametrize("workload,channel", [("ckpt_threads", "ssh"), ("mig_dirty", "ssh"), ("mig_dirty", "tcp")])
def test_c_workload_moves_from_host_a_to_host_b(testbed: Testbed, tmp_path: Path, workload: str,
                                                channel: str) -> None:
    """Over SSH (pages relayed through kcr-migrate) and over the direct, sealed TCP data channel."""
    exe = str(build(workload))
    args = ["64", "20", "200", "1"] if workload == "mig_dirty" else []
    ref = Reference([exe, str(tmp_path / "ref"), *args], tmp_path / "ref", WORKLOAD_SCALE="5")
    out = tmp_path / "moved"
    pid = start_in(testbed, "hostA", [exe, str(out), *args], out, hold=True, WORKLOAD_SCALE="5")
    code, report, err = migrate_cli(f"{pid}@hostA", "hostB", "--ssh-config", str(testbed.ssh_config_path),
                                    "--data-channel", channel)
    assert code == 0, err
    assert report["data_channel"] == channel
    new = report["new_pid"]
    assert netns_of(new) == os.stat(testbed.netns_path("hostB")).st_ino, "it must run inside hostB"
    assert verdict(out) == "PASS"
    assert (out / "output").read_text() == ref.output()
    wait_gone(new)
    if workload == "mig_dirty":
        gap_ms, jitter_ms = (int(x) / 1e6 for x in (out / "gap").read_text().split())
        assert report["downtime_ms"] >= gap_ms - jitter_ms, (report["downtime_ms"], gap_ms, jitter_ms)


def test_write_locks_move_with_the_files_they_lock(testbed: Testbed, tmp_path: Path) -> None:
    """Each host has its own /srv: the locked files go along (--fs rsync) and the locks are held
    on hostB's copies before the process runs there."""
    exe = str(build("ckpt_locks"))
    data = f"/srv/kcr-locks-{os.getpid()}-{time.monotonic_ns()}"
    testbed.exec("hostA", ["mkdir", data], check=True)
    ref = Reference([exe, str(tmp_path / "ref")], tmp_path / "ref", WORKLOAD_SCALE="5")
    out = tmp_path / "moved"
    pid = start_in(testbed, "hostA", [exe, str(out), "write", data], out, hold=True, WORKLOAD_SCALE="5")
    code, report, err = migrate_cli(f"{pid}@hostA", "hostB", "--ssh-config", str(testbed.ssh_config_path),
                                    "--fs", f"rsync:{data}")
    assert code == 0, err
    assert verdict(out) == "PASS", (out / "stderr").read_text()
    assert (out / "output").read_text() == ref.output() == "locks checked: all held (0)\n"
    wait_gone(report["new_pid"])


def test_cpython_moves_between_hosts(testbed: Testbed, tmp_path: Path) -> None:
    from tests.test_migrate import PY_JOB
    script = tmp_path / "job.py"
    script.write_text(PY_JOB)
    ref = Reference([sys.executable, "-S", str(script), str(tmp_path / "ref"), "200"], tmp_path / "ref")
    out = tmp_path / "moved"
    pid = start_in(testbed, "hostA", [sys.executable, "-S", str(script), str(out), "200"], out)
    code, report, err = migrate_cli(f"{pid}@hostA", "hostB", "--ssh-config", str(testbed.ssh_config_path))
    assert code == 0, err
    assert report["data_channel"] == "tcp", "by default pages go straight to hostB when hostA can reach it"
    assert testbed.address("hostB") in report["data_channel_note"]
    assert wait_file(out / "verdict").strip() == "PASS"
    assert (out / "output").read_text() == ref.output()
    wait_gone(report["new_pid"])


# An sqlite database in WAL mode, written in write transactions that each hold the write lock
# (a POSIX lock on the -shm file) for 3 ms of every 6, until the test says go on; then the
# job checks every one of its commits is there and the database is sound.
SQLITE_JOB = r"""
import os, sqlite3, sys, time
db_path, out, least = sys.argv[1], sys.argv[2], int(sys.argv[3])
db = sqlite3.connect(db_path, timeout=60, isolation_level=None)
db.execute("pragma journal_mode=wal")
db.execute("create table if not exists t (who text, i integer)")
open(os.path.join(out, "ready"), "w").close()
i = 0
while i < least or not os.path.exists(os.path.join(out, "go-on")):
    db.execute("begin immediate")
    db.execute("insert into t values ('job', ?)", (i,))
    time.sleep(0.003)
    db.execute("commit")
    i += 1
    time.sleep(0.003)
rows, total = db.execute("select count(*), coalesce(sum(i), 0) from t where who = 'job'").fetchone()
sound = db.execute("pragma integrity_check").fetchone()[0]
with open(os.path.join(out, "output"), "w") as f:
    f.write(f"integrity {sound}; every commit kept: {rows == i and total == i * (i - 1) // 2}\n")
with open(os.path.join(out, "verdict"), "w") as f:
    f.write("PASS\n")
"""

# Another writer of the same database that stays on hostA, until told to stop: how many it committed.
SQLITE_OTHER = r"""
import os, sqlite3, sys, time
db_path, stop, out = sys.argv[1], sys.argv[2], sys.argv[3]
db = sqlite3.connect(db_path, timeout=60, isolation_level=None)
j = 0
while not os.path.exists(stop):
    db.execute("begin immediate")
    db.execute("insert into t values ('other', ?)", (j,))
    db.execute("commit")
    j += 1
    time.sleep(0.002)
with open(out, "w") as f:
    f.write(str(j))
"""


def test_an_sqlite_database_being_written_on_storage_both_hosts_share_moves(testbed: Testbed,
                                                                             tmp_path: Path) -> None:
    """The job commits to an sqlite database in WAL mode (its write lock held half the time)
    that both hosts see, while another writer on hostA commits to it too. Preflight hashed the
    files being written and found them "different"; a write lock seen in preflight refused the
    move; one held at the freeze failed the restore. The job now moves, frozen at a moment it
    holds no write lock (its read locks held on hostC before it runs); none of its commits or
    the other writer's is lost, and the database is sound."""
    db = tmp_path / "jobs.db"
    script, other = tmp_path / "job.py", tmp_path / "other.py"
    script.write_text(SQLITE_JOB)
    other.write_text(SQLITE_OTHER)
    out = tmp_path / "moved"
    pid = start_in(testbed, "hostA", [sys.executable, "-S", str(script), str(db), str(out), "200"], out)
    stop, counted = tmp_path / "stop", tmp_path / "other-count"
    writer = testbed.popen("hostA", [sys.executable, "-S", str(other), str(db), str(stop), str(counted)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        code, report, err = migrate_cli(f"{pid}@hostA", "hostC", "--ssh-config", str(testbed.ssh_config_path),
                                        keep_pid=True)
        assert code == 0, err
        assert [p["pid"] for p in report["processes"]] == [pid]
        assert proc_state(pid) in (None, "Z", "X"), "the job still runs on hostA"
        assert verdict(out) == "PASS", (out / "stderr").read_text()
    finally:
        stop.touch()
        _, werr = writer.communicate(timeout=60)
    assert writer.returncode == 0, werr
    assert (out / "output").read_text() == "integrity ok; every commit kept: True\n"
    import sqlite3
    with sqlite3.connect(db) as check:
        assert check.execute("select count(*) from t where who = 'other'").fetchone()[0] == int(counted.read_text())
        assert check.execute("pragma integrity_check").fetchone()[0] == "ok"


@contextmanager
def unreachable(testbed: Testbed, host: str, target: str) -> Iterator[None]:
    """``host`` cannot connect to ``target`` (an unreachable route) while kcr-migrate reaches both."""
    route = ["ip", "route", "add", "unreachable", f"{testbed.address(target)}/32"]
    testbed.exec(host, route, check=True)
    try:
        yield
    finally:
        testbed.exec(host, ["ip", "route", "del", "unreachable", f"{testbed.address(target)}/32"], check=True)


def test_pages_are_relayed_when_the_source_cannot_reach_the_destination(testbed: Testbed, tmp_path: Path) -> None:
    exe = str(build("mig_dirty"))
    args = ["32", "10", "100", "0"]
    ref = Reference([exe, str(tmp_path / "ref"), *args], tmp_path / "ref")
    out = tmp_path / "moved"
    pid = start_in(testbed, "hostA", [exe, str(out), *args], out, hold=True)   # it ends once moved
    with unreachable(testbed, "hostA", "hostB"):
        code, report, err = migrate_cli(f"{pid}@hostA", "hostB", "--ssh-config", str(testbed.ssh_config_path))
    assert code == 0, err
    assert report["data_channel"] == "ssh"
    assert report["data_channel_note"].startswith("relayed over ssh") and testbed.address("hostB") in \
        report["data_channel_note"], report["data_channel_note"]
    assert "pages: relayed over ssh" in err
    assert verdict(out) == "PASS"
    assert (out / "output").read_text() == ref.output()
    wait_gone(report["new_pid"])


def test_data_channel_tcp_that_cannot_connect_fails_in_preflight(testbed: Testbed, tmp_path: Path) -> None:
    exe = str(build("mig_dirty"))
    out = tmp_path / "job"
    pid = start_in(testbed, "hostA", [exe, str(out), "16", "0", "100000", "0"], out)
    with unreachable(testbed, "hostA", "hostB"):
        code, report, err = migrate_cli(f"{pid}@hostA", "hostB", "--ssh-config", str(testbed.ssh_config_path),
                                        "--data-channel", "tcp")
    assert code != 0
    progress = [line for line in err.splitlines() if not line.startswith(f"pid {pid} ")]   # the preflight line
    line = one_error_line("\n".join(progress))
    assert "data channel" in line and testbed.address("hostB") in line and "--data-channel ssh" in line, line
    assert report["state"] != "done" and not report.get("new_pid")
    assert proc_state(pid) in ("S", "R"), "the process runs on, untouched, on hostA"


# Reads a line each 20 ms until the test lets it go (``verdict``), then the rest at once; it
# ends only once let go: the file stays open through whatever the test does to the migration.
PY_READER = r"""
import os, sys, time
out_dir, data = sys.argv[1], sys.argv[2]
go_on = os.path.join(out_dir, "go-on")
f = open(data)
with open(os.path.join(out_dir, "output"), "w") as out:
    for i in range(600):
        line = f.readline() or "eof\n"
        out.write(f"{i} {line}")
        out.flush()
        if i == 5:
            open(os.path.join(out_dir, "ready"), "w").close()
        if not os.path.exists(go_on):
            time.sleep(0.02)
while not os.path.exists(go_on):
    time.sleep(0.01)
open(os.path.join(out_dir, "verdict"), "w").write("PASS\n")
"""


async def _migrate_with(testbed: Testbed, pid: int, on_phase: dict[str, Any], **options: Any) -> Migration:
    opts = MigrationOptions(ssh_config=str(testbed.ssh_config_path), link_timeout_s=3.0, new_pid=True,
                            **options)
    m: Migration

    def on_event(ev: Any) -> None:
        if isinstance(ev, PhaseChanged) and ev.phase in on_phase:
            on_phase[ev.phase](m)
    m = Migration(pid, "hostA", "hostB", opts, on_event=on_event)
    with pytest.raises(MigrationError) as info:
        await m.run()
    m.error = info.value  # type: ignore[attr-defined]
    return m


def _data_on_both(testbed: Testbed, name: str) -> str:
    path = f"/srv/{name}"
    text = "".join(f"line {i}\n" for i in range(1000))
    for host in ("hostA", "hostB"):
        testbed.exec(host, ["sh", "-c", f"cat > {path}"], input=text.encode(), check=True)
    return path


async def test_restore_failing_on_the_destination_rolls_back(testbed: Testbed, tmp_path: Path) -> None:
    """A file the process has open disappears from the destination after preflight: restore
    fails there, the half-built copy is destroyed, and the source runs on."""
    data = _data_on_both(testbed, "kcr-reader.txt")
    script = tmp_path / "reader.py"
    script.write_text(PY_READER)
    out = tmp_path / "run"
    pid = start_in(testbed, "hostA", [sys.executable, "-S", str(script), str(out), data], out)

    def remove(m: Migration) -> None:
        testbed.exec("hostB", ["rm", "-f", data], check=True)
    m = await _migrate_with(testbed, pid, {"precopy": remove})
    assert m.report.state == "rolled-back"
    assert data in str(m.error) and "hostB" in str(m.error)       # type: ignore[attr-defined]
    assert proc_state(pid) not in (None, "T", "t")
    assert running_copies(str(out)) == [pid]
    assert verdict(out) == "PASS"
    assert "599 line 599" in (out / "output").read_text()


async def test_connection_cut_during_final_rolls_back(testbed: Testbed, tmp_path: Path) -> None:
    """The destination's link goes down while the process is frozen: the orchestrator notices,
    the source runs on, and the destination agent destroys its copy on its own."""
    exe = str(build("mig_dirty"))
    out = tmp_path / "run"
    pid = start_in(testbed, "hostA", [exe, str(out), "64", "40", "100"], out, hold=True)
    veth = testbed.veth_name("hostB")

    def cut(m: Migration) -> None:
        subprocess.run(["ip", "link", "set", veth, "down"], check=True)
    try:
        m = await _migrate_with(testbed, pid, {"final": cut}, bandwidth_limit=24 << 20, max_rounds=1)
    finally:
        subprocess.run(["ip", "link", "set", veth, "up"], check=True)
    assert m.report.state == "rolled-back"
    assert proc_state(pid) not in (None, "T", "t"), "the source must run on"
    # The destination agent destroys its stopped copy on its own (its link timeout is 3 s).
    deadline = time.monotonic() + 60
    while copies(str(out)) != [pid]:
        assert time.monotonic() < deadline, f"copies left besides the source: {copies(str(out))}"
        time.sleep(0.05)
    assert running_copies(str(out)) == [pid], "exactly one running copy"
    assert verdict(out, timeout=90) == "PASS"


def test_preflight_refuses_a_missing_file_on_the_destination(testbed: Testbed, tmp_path: Path) -> None:
    testbed.exec("hostA", ["sh", "-c", "seq 1000 > /srv/kcr-only-here.txt"], check=True)
    testbed.exec("hostB", ["rm", "-f", "/srv/kcr-only-here.txt"], check=True)
    script = tmp_path / "reader.py"
    script.write_text(PY_READER)
    out = tmp_path / "run"
    pid = start_in(testbed, "hostA", [sys.executable, "-S", str(script), str(out), "/srv/kcr-only-here.txt"], out)
    code, _, err = migrate_cli(f"{pid}@hostA", "hostB", "--ssh-config", str(testbed.ssh_config_path))
    assert code != 0 and "kcr-only-here.txt is missing on" in err and "Traceback" not in err
    assert running_copies(str(out)) == [pid]
    assert verdict(out) == "PASS"
