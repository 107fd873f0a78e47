"""agent.procfs read from a process that runs on: what it lists is what the process holds."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from agent import procfs

CHURN = """
import os, sys
path = sys.argv[1]
open(path + ".ready", "w").close()
while True:                     # many fds, each closed soon after it was opened
    fds = [os.open(path, os.O_WRONLY | os.O_CREAT) for _ in range(32)]
    for fd in fds:
        os.close(fd)
"""


def test_an_fd_closed_while_listed_is_left_out_not_refused(tmp_path: Path) -> None:
    """A job in pre-copy opens and closes files as it runs: an fd closed between reading its
    link and its inode is one the process no longer holds, not "a file that cannot be
    inspected" (which refused a migration whose job wrote a pidfile as it was joined)."""
    target = tmp_path / "pidfile"
    job = subprocess.Popen([sys.executable, "-S", "-c", CHURN, str(target)])
    try:
        deadline = time.monotonic() + 30
        while not Path(f"{target}.ready").exists():
            assert job.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        seen = 0
        deadline = time.monotonic() + 10     # the old code failed within 0.1 s here
        while seen < 5000 and time.monotonic() < deadline:
            for info in procfs.list_fds(job.pid):
                if info.target == str(target):
                    seen += 1
                    kind, why = procfs.classify_fd(info)
                    assert kind == "file", why
        assert seen, "the job's file was never listed: the test did not race"
    finally:
        job.kill()
        job.wait()


def test_a_pid_a_zombie_holds_is_named_so() -> None:
    """Restore refuses a pid that is taken, naming what holds it: a checkpointed tree's child,
    killed and not yet waited for, is a zombie whose parent must wait for it (not a process
    to end, which the message said before)."""
    from agent.restore import _holder
    child = os.fork()
    if child == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert _holder(child).endswith(f", a zombie: pid {os.getpid()} has not waited for it"), _holder(child)
    finally:
        os.waitpid(child, 0)
