"""agent/unix_names.py on real sockets and files: which names a restore may bind, what it
refuses (naming the path and who listens there), and that a rolled-back restore leaves the
source reachable at its path again."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from agent.as_target import Identity
from agent.unix_names import Bound, Names, check, reclaim
from tests._workloads import start_until_ready
from transport.errors import RestoreError

ROOT = Identity(0, 0, ())         # the restorer, root, restoring root's job


def bound(path: Path, kind: int = socket.SOCK_STREAM) -> Bound:
    st = os.lstat(path) if path.exists() else None
    return Bound(os.fsencode(path), kind, st.st_dev if st else 0, st.st_ino if st else 0)


def listener(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.listen(1)
    return s


def test_a_missing_path_is_free_and_a_missing_directory_is_refused(tmp_path: Path) -> None:
    assert check(bound(tmp_path / "free.sock"), "here") is False
    with pytest.raises(RestoreError, match=f"the directory {tmp_path}/gone of the unix socket .* is missing on here"):
        check(bound(tmp_path / "gone" / "x.sock"), "here")


def test_a_file_that_is_no_socket_is_refused(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    with pytest.raises(RestoreError, match=f"{tmp_path}/plain is not a socket on here"):
        check(Bound(os.fsencode(tmp_path / "plain"), socket.SOCK_STREAM), "here")


HOLD = ("import socket, sys, time\ns = socket.socket(socket.AF_UNIX)\n"
        "s.bind(sys.argv[2].replace('@', '\\0'))\ns.listen(1)\nopen(sys.argv[1], 'w').close()\ntime.sleep(60)\n")


def holding(tmp_path: Path, name: str) -> int:
    """A program holding a listener at ``name`` (@ for an abstract one): its pid."""
    return start_until_ready([sys.executable, "-c", HOLD, str(tmp_path / "ready"), name], tmp_path / "ready").pid


def test_a_path_another_program_listens_on_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "taken.sock"
    pid = holding(tmp_path, str(path))
    with pytest.raises(RestoreError, match=f"{path} on here is a unix socket pid {pid} \\(python"):
        check(Bound(os.fsencode(path), socket.SOCK_STREAM), "here")     # not the job's own file


def test_an_abstract_name_taken_here_is_refused_naming_its_holder(tmp_path: Path) -> None:
    name = f"@kcr-names-{os.getpid()}"
    pid = holding(tmp_path, name)
    with pytest.raises(RestoreError, match=f"{name} is taken on here by pid {pid} \\(python"):
        check(Bound(b"\0" + name[1:].encode(), socket.SOCK_STREAM), "here")
    # From a host to itself, the frozen source holds it: said so.
    with pytest.raises(RestoreError, match=f"{name} is held on here by the job itself .*checkpoint and restore"):
        check(Bound(b"\0" + name[1:].encode(), socket.SOCK_STREAM), "here", frozenset({pid}))


def test_a_dead_socket_file_is_replaced_keeping_mode_and_owner_and_commit_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    listener(path).close()                     # its file stays, nobody listens
    names = Names()
    with socket.socket(socket.AF_UNIX) as new:
        names.bind(new, Bound(os.fsencode(path), socket.SOCK_STREAM), 0o600, 1234, 5678, "here", ROOT)
        new.listen(1)
        st = os.stat(path)
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o600, 1234, 5678)
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))                # reaches the new socket
        names.commit()
        assert os.listdir(tmp_path) == ["dead.sock"]


def test_undo_puts_the_sources_own_socket_file_back(tmp_path: Path) -> None:
    """From a host to itself: the source's file (its listener frozen, not gone) is moved
    aside for the restored listener; undone, the source is reachable at its path again."""
    path = tmp_path / "own.sock"
    with listener(path) as source:
        names = Names()
        restored = socket.socket(socket.AF_UNIX)
        names.bind(restored, bound(path), 0o755, os.getuid(), os.getgid(), "here", ROOT)
        restored.listen(1)
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))
            restored.settimeout(5)
            restored.accept()[0].close()        # the restored listener had it
        restored.close()
        names.undo()
        assert os.listdir(tmp_path) == ["own.sock"]
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))
            source.settimeout(5)
            source.accept()[0].close()          # the source's listener has it again


def test_reclaim_puts_back_what_a_restore_left_aside(tmp_path: Path) -> None:
    """The destination's agent died after binding (its restored socket gone, its file left):
    on rollback the source's holder finds the job's own file aside by its inode and puts it
    back; a path that already holds the job's file, or a live socket, is left alone."""
    path = tmp_path / "own.sock"
    with listener(path) as source:
        st = os.lstat(path)
        names = Names()
        with socket.socket(socket.AF_UNIX) as restored:
            names.bind(restored, bound(path), 0o755, os.getuid(), os.getgid(), "here", ROOT)
        # no undo: the agent that would have done it is gone
        with socket.socket(socket.AF_UNIX) as c, pytest.raises(ConnectionRefusedError):
            c.connect(str(path))
        files = [(str(path), socket.SOCK_STREAM, st.st_dev, st.st_ino)]
        assert reclaim(files) == [str(path)]
        assert os.listdir(tmp_path) == ["own.sock"] and os.lstat(path).st_ino == st.st_ino
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))
            source.settimeout(5)
            source.accept()[0].close()
        assert reclaim(files) == []
