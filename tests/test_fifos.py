"""FIFOs (named pipes) held only by what moves: carried with their bytes in flight, each open
with its flags, all of one FIFO on one pipe, and the FIFO still at its path (made again where
it is missing), so a later open by path reaches the same pipe. A FIFO a process that stays
also holds is refused before anything is frozen.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests._migration import moved
from tests._workloads import (
    STARTED,
    Workload,
    become_subreaper,
    kcr,
    one_error_line,
    reap,
    start_until_ready,
)
from tests.test_checkpoint import migrate_once
from tests.test_migrate import migrate_workload
from tests.test_trees import checkpointed_and_restored


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    become_subreaper()


def test_a_fifo_the_process_holds_both_ends_of(tmp_path: Path) -> None:
    """A read-write open, a non-blocking reader and a writer of one FIFO, 47 bytes in it, the
    pipe resized: all as they were, and an open by path reaches the same pipe."""
    ref, w, _ = migrate_once("ckpt_fifo", tmp_path)
    assert w.output() == ref.output() == "fifo checked: all good\n"


def checkpointed(w: Workload, tmp_path: Path) -> Path:
    """Checkpoint ``w`` (killing it) to an image in ``tmp_path``; the image."""
    image = tmp_path / "img"
    res = kcr("checkpoint", str(w.pid), "-o", str(image))
    assert res.returncode == 0, res.stderr.decode()
    w.reap_original()
    return image

def test_the_fifo_is_made_again_where_its_path_is_missing(tmp_path: Path) -> None:
    w = Workload("ckpt_fifo", tmp_path, scale=3, hold=True)   # it waits for the test, however slow
    w.start()
    w.wait_ready()
    fifo = w.dir / "fifo"
    os.chown(fifo, 4242, 4343)
    image = checkpointed(w, tmp_path)
    fifo.unlink()
    res = kcr("restore", "-i", str(image), "--json")
    assert res.returncode == 0, res.stderr.decode()
    st = fifo.lstat()
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (4242, 4343)
    assert w.verdict() == "PASS", w.verdict()
    assert os.WEXITSTATUS(reap(w.pid)) == 0
    assert w.output() == "fifo checked: all good\n"


def test_a_fifo_made_by_a_restore_that_fails_is_removed(tmp_path: Path) -> None:
    """The FIFO is made again (its path was free), then the restore fails on a file the
    process had open that is gone: nothing of the restore is left, the FIFO neither."""
    w = Workload("ckpt_fifo", tmp_path, hold=True)
    w.start()
    w.wait_ready()
    image = checkpointed(w, tmp_path)
    fifo = w.dir / "fifo"
    fifo.unlink()
    (w.dir / "output").unlink()
    line = one_error_line(kcr("restore", "-i", str(image)).stderr)
    assert "output" in line and "must exist here" in line, line
    assert os.WIFSIGNALED(reap(w.pid, timeout=30))
    assert not fifo.exists() and not fifo.is_symlink(), "the FIFO the failed restore made is left"


def test_something_else_at_the_fifos_path_is_refused(tmp_path: Path) -> None:
    w = Workload("ckpt_fifo", tmp_path, scale=3, hold=True)   # it waits for the test, however slow
    w.start()
    w.wait_ready()
    image = checkpointed(w, tmp_path)
    fifo = w.dir / "fifo"
    fifo.unlink()
    fifo.write_text("a regular file now\n")
    line = one_error_line(kcr("restore", "-i", str(image)).stderr)
    assert f"{fifo} is a regular file here, where the process had a FIFO" in line, line
    # The half-built process was killed (adopted here, as subreaper): it did not run on.
    assert os.WIFSIGNALED(reap(w.pid, timeout=30))
    assert not (w.dir / "verdict").exists()
    assert fifo.read_text() == "a regular file now\n"


# A writer child and a reader parent over a FIFO: the child writes faster than the parent
# reads, so bytes are in flight when the tree is frozen. At the end the parent opens the FIFO
# again by path and reads what it wrote through that open.
STREAM = r"""
import os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
fifo = os.path.join(d, "fifo")
os.mkfifo(fifo, 0o600)
child = os.fork()
if child == 0:
    w = os.open(fifo, os.O_WRONLY)
    for i in range(n):
        os.write(w, b"line %d of the stream\n" % i)
        if i == n // 4:
            open(os.path.join(d, "ready"), "w").close()
        while i == n * 3 // 4 and not os.path.exists(os.path.join(d, "go-on")):
            time.sleep(0.01)        # held: a late checkpoint still finds the stream mid-way
        time.sleep(0.001)
    os._exit(7)
r = os.open(fifo, os.O_RDONLY)
with open(os.path.join(d, "output"), "wb") as out:
    while chunk := os.read(r, 50):
        out.write(chunk)
        time.sleep(0.003)
    _, status = os.waitpid(child, 0)
    w = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    os.write(w, b"again, by path\n")
    out.write(os.read(r, 100))
    out.write(b"child status %d\n" % os.waitstatus_to_exitcode(status))
"""


def test_a_parent_and_child_talking_over_a_fifo(tmp_path: Path) -> None:
    script = tmp_path / "stream.py"
    script.write_text(STREAM)

    def start(where: Path, held: bool) -> subprocess.Popen[bytes]:
        where.mkdir()
        if not held:
            (where / "go-on").touch()
        return start_until_ready([sys.executable, "-S", str(script), str(where), "2000"], where / "ready",
                                 start_new_session=True)
    ref = start(tmp_path / "reference", held=False)          # unmoved, beside the moved one
    proc = start(tmp_path / "moved", held=True)
    checkpointed_and_restored(proc, tmp_path, 2, release=tmp_path / "moved" / "go-on")
    assert ref.wait(timeout=120) == 0
    expected = b"".join(b"line %d of the stream\n" % i for i in range(2000)) + b"again, by path\nchild status 7\n"
    assert (tmp_path / "reference" / "output").read_bytes() == expected
    assert (tmp_path / "moved" / "output").read_bytes() == expected


# A FIFO deleted from its directory once opened: a pipe like any other now.
UNLINKED = r"""
import os, sys, time
d = sys.argv[1]
fifo = os.path.join(d, "fifo")
os.mkfifo(fifo)
rw = os.open(fifo, os.O_RDWR)
rd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
os.write(rw, b"kept across the move")
os.unlink(fifo)
open(os.path.join(d, "ready"), "w").close()
while not os.path.exists(os.path.join(d, "go")):
    time.sleep(0.01)
first = os.read(rd, 100)
os.write(rw, b"+after")
then = os.read(rw, 100)
try:
    os.read(rd, 1)
    empty = False
except BlockingIOError:
    empty = True
open(os.path.join(d, "output"), "w").write(f"{first!r} {then!r} {empty} {os.path.exists(fifo)}\n")
"""


def test_a_fifo_deleted_from_its_directory_moves_as_a_pipe(tmp_path: Path) -> None:
    script = tmp_path / "unlinked.py"
    script.write_text(UNLINKED)
    proc = start_until_ready([sys.executable, "-S", str(script), str(tmp_path)], tmp_path / "ready",
                             start_new_session=True)
    root = moved(proc, "checkpoint", tmp_path)
    (tmp_path / "go").touch()
    assert os.WEXITSTATUS(reap(root, timeout=60)) == 0
    assert (tmp_path / "output").read_text() == "b'kept across the move' b'+after' True False\n"


# Readers of FIFOs that nothing in the process writes: one waiting for its first writer (a
# server's command FIFO: poll shows nothing), one whose writer came and went (POLLHUP, with
# the writer's bytes still in it). After the move a client opens the first by path.
READERS = r"""
import os, select, sys, time
d = sys.argv[1]
os.mkfifo(os.path.join(d, "commands"))
os.mkfifo(os.path.join(d, "left"))
waiting = os.open(os.path.join(d, "commands"), os.O_RDONLY | os.O_NONBLOCK)
hung = os.open(os.path.join(d, "left"), os.O_RDONLY | os.O_NONBLOCK)
w = os.open(os.path.join(d, "left"), os.O_WRONLY)
os.write(w, b"bytes left by a writer")
os.close(w)
open(os.path.join(d, "ready"), "w").close()
while not os.path.exists(os.path.join(d, "go")):
    time.sleep(0.01)
p = select.poll()
p.register(waiting, select.POLLIN)
p.register(hung, select.POLLIN)
before = dict(p.poll(0))
client = os.open(os.path.join(d, "commands"), os.O_WRONLY | os.O_NONBLOCK)
os.write(client, b"a command")
after = dict(p.poll(0))
with open(os.path.join(d, "output"), "w") as out:
    out.write(f"{before.get(waiting, 0)} {before.get(hung, 0)} {after.get(waiting, 0)} "
              f"{os.read(waiting, 100)!r} {os.read(hung, 100)!r} {os.read(hung, 100)!r}\n")
"""


@pytest.mark.parametrize("how", ["image", "live"])
def test_readers_waiting_for_a_writer_still_wait(tmp_path: Path, how: str) -> None:
    """Through an image, and live from this host to itself (where the destination opens the
    very FIFOs the frozen source holds: no writer may come and go on them)."""
    script = tmp_path / "readers.py"
    script.write_text(READERS)

    def start(where: Path) -> subprocess.Popen[bytes]:
        where.mkdir()
        return start_until_ready([sys.executable, "-S", str(script), str(where)], where / "ready",
                                 start_new_session=True)
    ref = start(tmp_path / "reference")
    (tmp_path / "reference" / "go").touch()
    assert ref.wait(timeout=60) == 0
    proc = start(tmp_path / "moved")
    now = moved(proc, "checkpoint" if how == "image" else "live", tmp_path)
    (tmp_path / "moved" / "go").touch()
    assert os.WEXITSTATUS(reap(now, timeout=60)) == 0
    # POLLIN 1, POLLHUP 16: the waiting reader shows nothing until its client writes.
    expected = "0 17 1 b'a command' b'bytes left by a writer' b''\n"
    assert (tmp_path / "reference" / "output").read_text() == expected
    assert (tmp_path / "moved" / "output").read_text() == expected


@pytest.mark.parametrize("by", ["its path", "a hard link"])
def test_a_fifo_a_process_that_stays_holds_is_refused(tmp_path: Path, by: str) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    script = "import os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR)\nopen(sys.argv[2], 'w').close()\ntime.sleep(60)\n"
    proc = start_until_ready([sys.executable, "-S", "-c", script, str(fifo), str(tmp_path / "ready")],
                             tmp_path / "ready")
    other_path = fifo
    if by == "a hard link":
        other_path = tmp_path / "another name"
        os.link(fifo, other_path)
    fd = os.open(other_path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        other = subprocess.Popen(["sleep", "60"], pass_fds=[fd])
    finally:
        os.close(fd)
    STARTED.append(other)
    line = one_error_line(kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img")).stderr)
    assert f"is the FIFO {fifo} shared with pid {other.pid} (sleep)" in line, line
    assert "which does not move with it" in line and "--redirect" in line
    if by == "a hard link":
        assert f"(opened there as {other_path})" in line, line
    assert not (tmp_path / "img").exists() and proc.poll() is None


def test_live_migration_carries_a_fifo(tmp_path: Path) -> None:
    """From a host to itself: the destination opens the very FIFO the frozen source holds,
    whose bytes are already in it; they are not written twice."""
    ref, w, report = migrate_workload("ckpt_fifo", tmp_path)
    assert w.output() == ref.output() == "fifo checked: all good\n"
