"""The monotonic and boot-time clocks go on as the process saw them (agent/timens.py).

Test hosts share this machine's clocks, so the job runs in a time namespace a day ahead of
them (`unshare --time --monotonic 86400`), as a job seen from a host booted a day earlier
would: restored here without its clocks, it would see them go back a day; with them, it
sleeps (Python's time.sleep: an absolute monotonic deadline) and reads its clocks on."""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from agent import timens
from transport.errors import NoSuchProcess
from tests._migration import migrate_cli
from tests._workloads import STARTED, become_subreaper, kcr, reap, start_until_ready

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/timens_offsets") or shutil.which("unshare") is None,
                                reason="no time namespaces (Linux >= 5.6) or no unshare(1) (util-linux)")

AHEAD_S = 86400
# Reads both clocks every 20 ms; a step back, or one forward by more than 30 s, is a failure.
# Ends 10 steps after the file argv[2] exists, printing its verdict and how far ahead of the
# host's its monotonic clock was at the end.
JOB = r"""
import os, sys, time
ready, done, out = sys.argv[1:4]
last = None
bad = []
after = -1
open(ready, "w").close()
while after != 0:
    now = (time.monotonic_ns(), time.clock_gettime_ns(time.CLOCK_BOOTTIME))
    if last is not None:
        for name, a, b in zip(("monotonic", "boottime"), last, now):
            if b < a or b - a > 30_000_000_000:
                bad.append(f"{name} {a} -> {b}")
    last = now
    if after < 0 and os.path.exists(done):
        after = 10
    after -= after > 0
    time.sleep(0.02)
with open(out, "w") as f:
    f.write("PASS\n" if not bad else "FAIL " + "; ".join(bad[:3]) + "\n")
    f.write(f"{time.monotonic_ns()}\n")
"""


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    become_subreaper()


def start(tmp_path: Path) -> int:
    argv = ["unshare", "--time", "--monotonic", str(AHEAD_S), "--boottime", str(AHEAD_S),
            sys.executable, "-S", "-c", JOB, str(tmp_path / "ready"), str(tmp_path / "done"), str(tmp_path / "out")]
    proc = start_until_ready(argv, tmp_path / "ready", cwd=tmp_path, start_new_session=True)
    assert timens.offsets(proc.pid) == (AHEAD_S * 10**9, AHEAD_S * 10**9)
    return proc.pid


def finish(tmp_path: Path, pid: int) -> None:
    (tmp_path / "done").touch()
    assert os.WEXITSTATUS(reap(pid, timeout=60)) == 0
    verdict, mono = (tmp_path / "out").read_text().split("\n")[:2]
    assert verdict == "PASS"
    ahead = int(mono) - time.monotonic_ns()
    assert AHEAD_S - 60 < ahead / 1e9 < AHEAD_S + 1, ahead


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_a_job_keeps_its_clocks(tmp_path: Path, how: str) -> None:
    pid = start(tmp_path)
    if how == "checkpoint":
        res = kcr("checkpoint", str(pid), "-o", str(tmp_path / "img"))
        assert res.returncode == 0, res.stderr.decode()
        reap(pid)
        time.sleep(1.5)        # time passes while it is an image: its clocks count it, as the real time does
        res = kcr("restore", str(tmp_path / "img"))
        assert res.returncode == 0, res.stderr.decode()
        new = int(res.stdout.split()[-1])
        assert new == pid
    else:
        code, report, err = migrate_cli(f"{pid}@localhost", "localhost")
        assert code == 0, err
        reap(pid)
        new = report["new_pid"]
    mono, boot = timens.offsets(new)
    assert abs(mono / 1e9 - AHEAD_S) < 60 and abs(boot / 1e9 - AHEAD_S) < 60, (mono, boot)
    finish(tmp_path, new)


def test_a_job_in_the_hosts_clocks_stays_in_them(tmp_path: Path) -> None:
    """From a host to itself, a job that reads the host's clocks gets no namespace."""
    argv = [sys.executable, "-S", "-c", JOB, str(tmp_path / "ready"), str(tmp_path / "done"), str(tmp_path / "out")]
    proc = start_until_ready(argv, tmp_path / "ready", cwd=tmp_path, start_new_session=True)
    res = kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img"))
    assert res.returncode == 0, res.stderr.decode()
    reap(proc.pid)
    res = kcr("restore", str(tmp_path / "img"))
    assert res.returncode == 0, res.stderr.decode()
    new = int(res.stdout.split()[-1])
    assert os.readlink(f"/proc/{new}/ns/time") == os.readlink("/proc/self/ns/time")
    (tmp_path / "done").touch()
    assert os.WEXITSTATUS(reap(new, timeout=60)) == 0
    assert (tmp_path / "out").read_text().startswith("PASS\n")


def test_a_tree_over_two_time_namespaces_is_refused(tmp_path: Path) -> None:
    script = ("import os, subprocess, sys\n"
              "subprocess.Popen(['unshare', '--time', '--monotonic', '5', 'sleep', '60'])\n"
              "open(sys.argv[1], 'w').close()\nos.wait()\n")
    proc = start_until_ready([sys.executable, "-S", "-c", script, str(tmp_path / "ready")], tmp_path / "ready",
                             cwd=tmp_path, start_new_session=True)
    for _ in range(200):           # its child has become sleep, in the other namespace
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        if kids and os.readlink(f"/proc/{kids[0]}/exe").endswith("sleep"):
            break
        time.sleep(0.05)
    res = kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img"))
    assert res.returncode == 1
    assert "is in another time namespace than pid" in res.stderr.decode()
    assert not (tmp_path / "img").exists()
    assert STARTED and proc.poll() is None


def test_a_child_that_exits_as_its_tree_is_checked_is_gone_not_in_another_namespace(tmp_path: Path) -> None:
    """A running tree is checked process by process; a child that exits meanwhile (a shell's
    or `subprocess.run`'s) has no namespaces left: it is gone (the check drops it), not a
    process in another time namespace than its root (it was refused so)."""
    script = ("import os, subprocess, sys\n"
              "kid = subprocess.Popen(['true'])\n"
              "os.waitid(os.P_PID, kid.pid, os.WEXITED | os.WNOWAIT)\n"   # exited, not reaped: a zombie
              "open(sys.argv[1] + '.tmp', 'w').write(str(kid.pid))\nos.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
              "os.read(os.open(sys.argv[2], os.O_RDONLY), 1)\nos.wait()\n")      # until the test opens the FIFO
    os.mkfifo(tmp_path / "go")
    proc = start_until_ready([sys.executable, "-S", "-c", script, str(tmp_path / "ready"), str(tmp_path / "go")],
                             tmp_path / "ready", cwd=tmp_path, start_new_session=True)
    kid = int((tmp_path / "ready").read_text())
    assert Path(f"/proc/{kid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    with pytest.raises(NoSuchProcess):
        timens.check(kid, proc.pid)          # as the tree's check reaches it: listed while it ran
    timens.check(proc.pid, proc.pid)
    os.close(os.open(tmp_path / "go", os.O_WRONLY))
    assert proc.wait(timeout=30) == 0


def test_on_the_boot_that_wrote_it_the_real_time_clock_is_not_asked() -> None:
    """A real-time clock stepped since the image was written (NTP, a resumed VM) made a
    process of the host's clocks look as if its clocks had jumped, on the very boot that
    wrote it: it got a needless time namespace (one a user's restore may not make). On that
    boot the offsets its namespace had are the answer."""
    now = timens.view(os.getpid())
    stepped = timens.Clocks(now.monotonic_ns, now.boottime_ns, now.realtime_ns - 3600 * 10**9)   # an hour back
    assert timens.needed(stepped) is not None                      # another boot: the real time decides
    assert timens.needed(stepped, same_boot=(0, 0)) is None
    assert timens.needed(stepped, same_boot=(AHEAD_S * 10**9, 5)) == (AHEAD_S * 10**9, 5)
