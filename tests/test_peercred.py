"""SO_PEERCRED of restored unix sockets (agent/peercred.py): each names whom it named before.

Single processes' socketpairs are compared by the state checker too (tests/_state.py, for
every lingering workload moved in tests/test_checkpoint.py).
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

from tests._workloads import Workload, become_subreaper, kcr, reap, start_until_ready
from tests.test_trees import checkpointed_and_restored

NOBODY = 65534


def test_a_socketpair_and_a_connection_across_a_tree_name_their_makers(tmp_path: Path) -> None:
    """A tree run as nobody: the parent makes a socketpair and listens, its child keeps one end
    and connects. Restored (pids kept), the pair names the parent, the child's connection the
    parent that listened, the parent's accepted end the child, all with nobody's ids, not root's."""
    become_subreaper()
    w = Workload("ckpt_peercred", tmp_path / "moved", user=NOBODY, hold=True)
    w.start()
    w.wait_ready()
    assert w.proc is not None and w.hold is not None
    checkpointed_and_restored(w.proc, tmp_path, 2, release=w.hold)     # its root exits with 0
    assert w.verdict() == "PASS", (w.dir / "stderr").read_text()
    assert w.output() == "peer credentials checked: all good\n"


HELD = ("import os, socket, struct, sys, time\n"
        "a, b = (socket.socket(fileno=int(fd)) for fd in sys.argv[3:5])\n"
        "open(sys.argv[1], 'w').close()\n"
        "while not os.path.exists(sys.argv[2]):\n    time.sleep(0.01)\n"
        "pid, uid, gid = struct.unpack('<iII', a.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))\n"
        "a.send(b'x')\n"
        "sys.exit(0 if (pid, uid, gid, b.recv(1)) == (os.getpid(), os.geteuid(), os.getegid(), b'x') else 1)\n")


def restored_naming_its_holder(proc: subprocess.Popen[bytes], image: Path, go: Path) -> None:
    """Checkpoint ``proc`` (killed), restore it: the report warns that a socket named this test,
    which does not move, and names ``proc``'s pid now; let it go on (``go``) and end with 0."""
    res = kcr("checkpoint", str(proc.pid), "-o", str(image))
    assert res.returncode == 0, res.stderr.decode()
    assert proc.wait(timeout=30) == -9
    res = kcr("restore", "-i", str(image), "--json")
    assert res.returncode == 0, res.stderr.decode()
    result = json.loads(res.stdout)
    assert any(f"named pid {os.getpid()}, which does not move with it" in w and f"names pid {proc.pid} now" in w
               for w in result["warnings"]), result["warnings"]
    go.touch()
    status = reap(int(result["pid"]))
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_a_socketpair_whose_maker_stays_behind_names_its_holder_and_says_so(tmp_path: Path) -> None:
    """A pair made by this test, both ends handed to a process that moves: the test stays, so
    the restored pair names the process holding it (with the ids recorded), and the report says so."""
    become_subreaper()
    ready, go, image = tmp_path / "ready", tmp_path / "go", tmp_path / "img"
    a, b = socket.socketpair()
    with a, b:
        fds = (a.fileno(), b.fileno())
        proc = start_until_ready([sys.executable, "-S", "-c", HELD, str(ready), str(go), *map(str, fds)], ready,
                                 pass_fds=fds)
        pid, _, _ = struct.unpack("<iII", a.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        assert pid == os.getpid()
    restored_naming_its_holder(proc, image, go)


WAITING = ("import os, socket, struct, sys, time\n"
           "listener, client = (socket.socket(fileno=int(fd)) for fd in sys.argv[3:5])\n"
           "open(sys.argv[1], 'w').close()\n"
           "while not os.path.exists(sys.argv[2]):\n    time.sleep(0.01)\n"
           "conn, _ = listener.accept()\n"
           "print(*struct.unpack('<iII', conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)))\n")


def test_a_connection_waiting_to_be_accepted_whose_connector_stays_behind_names_its_holder(tmp_path: Path) -> None:
    """This test connects to a listener and hands both the listener and its client to a process
    that moves, the connection not accepted yet: the test stays, so the server end the restored
    process accepts names the process holding the client, with the test's ids, as the report says."""
    become_subreaper()
    ready, go, image = tmp_path / "ready", tmp_path / "go", tmp_path / "img"
    name = f"\0kcr-waiting-{os.getpid()}".encode()
    with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as client, \
            open(tmp_path / "out", "wb") as out:
        listener.bind(name)
        listener.listen(1)
        client.connect(name)
        fds = (listener.fileno(), client.fileno())
        proc = start_until_ready([sys.executable, "-S", "-c", WAITING, str(ready), str(go), *map(str, fds)], ready,
                                 pass_fds=fds, stdout=out)
    restored_naming_its_holder(proc, image, go)
    assert (tmp_path / "out").read_text() == f"{proc.pid} {os.geteuid()} {os.getegid()}\n"
