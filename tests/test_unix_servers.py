"""Servers on named unix sockets, moved with their clients: listeners bound to a path or an
abstract name, connections accepted from them, a client waiting in the accept queue, a bound
datagram socket with datagrams queued from named senders (tests/workloads/unix_server.c).

Each job is moved mid-conversation and must finish with the output of an unmoved run; a
client that connects after the move reaches the moved server at its name. What cannot move
is refused in one line, the job running on untouched."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests._migration import migrate_cli, moved, proc_state
from tests._workloads import Workload, become_subreaper, kcr, one_error_line, reap, start_until_ready
from tests.test_trees import checkpoint, image_restored, tree


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    become_subreaper()


def address(name: str) -> str | bytes:
    return b"\0" + name[1:].encode() if name.startswith("@") else name


def late_client(w: Workload, name: str) -> bytes:
    """Let the server go on (it waits mid-conversation), then connect to it as a client from
    outside once it serves one; its answer."""
    (w.dir / "go").touch()
    w.wait_file("serving", 60)
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(30)
        c.connect(address(name))
        c.sendall(b"late")
        return c.recv(100)


def carried_sockets(image: Path) -> list[dict]:
    doc = json.loads(kcr("show", str(image)).stdout)
    socks = list(doc["sockets"]["sockets"])
    for proc in doc.get("processes", {}).values():
        socks += proc.get("sockets", {}).get("sockets", [])
    return socks


def expected_output(scale: int = 1, early: bool = False) -> str:
    """What the workload writes, moved or not."""
    rounds = 60 * scale
    total = 2 * sum(range(rounds))
    return (f"worker 0: {rounds} rounds, 4 datagrams\nworker 1: {rounds} rounds, 4 datagrams\n"
            + ("waiter sent before it was accepted: early\n" if early else "")
            + f"waiter: waited\nlate client: late\ntotal {total}\n")


def names(tmp_path: Path, kind: str) -> tuple[str, str]:
    """The server's name for the reference run and for the moved one."""
    if kind == "abstract":
        return f"@kcr-ref-{os.getpid()}", f"@kcr-moved-{os.getpid()}"
    return str(tmp_path / "ref.sock"), str(tmp_path / "srv.sock")


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_a_server_and_its_clients_move_by_image(tmp_path: Path, kind: str) -> None:
    """The server, two workers mid-conversation, a client waiting in the accept queue (with
    bytes sent, for the path); the datagrams the workers sent from their named sockets wait
    unread. Restored, the workers go on, accept() returns the waiting client with its bytes,
    recvfrom names each sender, and a client that connects now reaches the server at its name."""
    ref_name, name = names(tmp_path, kind)
    early = ("early",) if kind == "path" else ()
    ref = Workload("unix_server", tmp_path / "reference", ref_name, *early)
    ref.start()
    assert late_client(ref, ref_name) == b"served 3540"
    assert ref.verdict() == "PASS"
    w = Workload("unix_server", tmp_path / "moved", name, *early)
    w.start()
    w.wait_ready()
    before = tree(w.pid)
    assert len(before) == 4
    mode = 0o640
    if kind == "path":
        os.chmod(name, mode)
    checkpoint(w.pid, tmp_path / "job.img", 4)
    assert w.reap_original() == -9
    # The job was caught mid-conversation: a client waiting, datagrams queued from named senders.
    socks = carried_sockets(tmp_path / "job.img")
    assert [len(s["pending"]) for s in socks if s["backlog"] == 4] == [1]
    assert len([s for s in socks if s["accepted"]]) == 2
    assert any(s["senders"] for s in socks) and any(s["target"] for s in socks)
    image_restored(tmp_path / "job.img", before)
    if kind == "path":
        assert os.stat(name).st_mode & 0o7777 == mode
        assert not [p for p in os.listdir(tmp_path) if ".kcr-" in p]      # the old socket file is gone
    assert late_client(w, name) == b"served 3540"
    assert w.verdict() == "PASS", (w.dir / "stderr").read_text()
    assert w.output() == ref.output() == expected_output(early=bool(early))
    assert "datagrams" in w.output() and "waiter: waited" in w.output()


SEQPACKET = r"""
import os, socket, struct, sys, time
name = b"\0" + sys.argv[3].encode()
l = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
l.bind(name)
l.listen(2)
c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
c.connect(name)
s, _ = l.accept()
c.send(b"one"); c.send(b""); c.send(b"three")
s.send(b"reply")
waiting = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
waiting.connect(name)
waiting.send(b"before"); waiting.send(b"accept")
open(sys.argv[1], "w").close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
got = [s.recv(100) for _ in range(3)] + [c.recv(100)]
w, _ = l.accept()
got += [w.recv(100), w.recv(100)]
names = [s.getsockname() == name, c.getpeername() == name, w.getsockname() == name, l.getsockname() == name]
cred = struct.unpack("<iII", w.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
names.append(cred == (os.getpid(), os.geteuid(), os.getegid()))     # it connected to itself
print(got == [b"one", b"", b"three", b"reply", b"before", b"accept"] and all(names), got, names, flush=True)
"""


def test_seqpacket_messages_keep_their_boundaries_through_a_waiting_connection(tmp_path: Path) -> None:
    """A seqpacket listener on an abstract name in one process: an accepted pair with messages
    queued both ways (an empty one among them), a client waiting with two messages sent.
    Checkpointed and restored, each arrives as it was sent, and accept() returns the client,
    whose SO_PEERCRED names the process, which connected it."""
    ready, go, out = tmp_path / "ready", tmp_path / "go", tmp_path / "out"
    with open(out, "wb") as f:
        proc = start_until_ready([sys.executable, "-c", SEQPACKET, str(ready), str(go), f"kcr-seq-{os.getpid()}"],
                                 ready, stdout=f)
    pid = moved(proc, "checkpoint", tmp_path)
    go.touch()
    reap(pid)
    assert out.read_text().startswith("True"), out.read_text()


def test_a_datagram_queued_from_a_named_socket_outside_the_job_is_refused(tmp_path: Path) -> None:
    """A datagram from a named socket that does not move could not be sent again from its
    name: refused, naming that name; the process runs on and reads it."""
    script = ("import signal, socket, sys\nsignal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
              "d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\nd.bind(sys.argv[2])\n"
              "open(sys.argv[1], 'w').close()\nsignal.sigwait({signal.SIGUSR1})\n"
              "assert d.recv(100) == b'from outside'\n")
    inbox, outside = str(tmp_path / "inbox.sock"), str(tmp_path / "outside.sock")
    proc = start_until_ready([sys.executable, "-c", script, str(tmp_path / "ready"), inbox], tmp_path / "ready")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as d:
        d.bind(outside)
        d.sendto(b"from outside", inbox)
        line = one_error_line(kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img")).stderr)
        assert f"message queued from {outside}, a socket that does not move" in line, line
    os.kill(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=30) == 0


# Listens at a path; with "wait", accepts nothing until SIGUSR1.
SERVER = ("import signal, socket, sys\n"
          "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
          "l = socket.socket(socket.AF_UNIX)\nl.bind(sys.argv[2])\nl.listen(4)\n"
          "open(sys.argv[1], 'w').close()\n"
          "if sys.argv[3:] == ['wait']:\n    signal.sigwait({signal.SIGUSR1})\n"
          "while True:\n    c, _ = l.accept()\n    c.sendall(b'still here')\n    c.close()\n")


def server(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    path = str(tmp_path / "one.sock")
    argv = [sys.executable, "-c", SERVER, str(tmp_path / "ready"), path, *args]
    return start_until_ready(argv, tmp_path / "ready"), path


def still_serves(path: str) -> None:
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(30)
        c.connect(path)
        assert c.recv(100) == b"still here"


def test_a_listener_moves_live_and_serves_at_its_path(tmp_path: Path) -> None:
    """One process listening at a path, moved live from this host to itself: its own socket
    file is replaced, and a client that connects after the move is served by the moved one."""
    proc, path = server(tmp_path)
    code, report, err = migrate_cli(f"{proc.pid}@localhost", "localhost")
    assert code == 0, err
    assert proc.wait(timeout=30) == -9
    new = int(report["new_pid"])
    try:
        still_serves(path)
        assert Path(f"/proc/{new}/cmdline").read_bytes().startswith(sys.executable.encode())
    finally:
        os.kill(new, 9)
    assert not [p for p in os.listdir(tmp_path) if ".kcr-" in p]


def test_a_path_another_server_listens_on_is_refused(tmp_path: Path) -> None:
    """Someone else listens at the job's path now (its own socket file was moved aside): the
    destination refuses in preflight, naming the path and that listener; the job runs on."""
    proc, path = server(tmp_path)
    os.rename(path, path + ".aside")
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(path)
        other.listen(1)
        code, _, err = migrate_cli(f"{proc.pid}@localhost", "localhost")
        assert code != 0 and "Traceback" not in err
        line = err.splitlines()[-1]
        assert line.startswith("kcr-migrate: error: ") and f"{path} on " in line and f"pid {os.getpid()} (" in line, line
    os.unlink(path)
    os.rename(path + ".aside", path)
    assert proc_state(proc.pid) in ("S", "R")
    still_serves(path)


def test_a_waiting_connection_with_bytes_sent_is_refused_live(tmp_path: Path) -> None:
    """Live, the bytes a waiting client sent could be read only by accepting its connection,
    which the source would miss were the move rolled back: refused before anything is
    frozen; the job runs on and finishes as an unmoved one."""
    name = str(tmp_path / "srv.sock")
    w = Workload("unix_server", tmp_path / "job", name, "early")
    w.start()
    w.wait_ready()
    code, _, err = migrate_cli(f"{w.pid}@localhost", "localhost")
    assert code != 0 and "Traceback" not in err
    assert "waits in an accept queue with bytes already sent" in err.splitlines()[-1], err
    assert not (w.dir / "serving").exists()
    assert late_client(w, name) == b"served 3540"
    assert w.verdict() == "PASS" and w.output() == expected_output(early=True)


MADE_AS_NOBODY = ("import os, signal, socket, sys\nsignal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
                  "name = b'\\0' + sys.argv[2].encode()\nl = socket.socket(socket.AF_UNIX)\nl.bind(name)\nl.listen(1)\n"
                  "os.setegid(65534)\nos.seteuid(65534)\nc = socket.socket(socket.AF_UNIX)\nos.seteuid(0)\n"
                  "os.setegid(0)\nc.connect(name)\nopen(sys.argv[1], 'w').close()\nsignal.sigwait({signal.SIGUSR1})\n"
                  "l.accept()\n")


def test_a_waiting_connection_made_under_other_ids_is_refused_live(tmp_path: Path) -> None:
    """Live, the process that connected a waiting client cannot be asked (only accepting the
    connection shows it), so the client's holder stands for it: where the socket was made
    under other ids than the holder's, another process may have connected it: refused before
    anything is frozen, and the job runs on."""
    proc = start_until_ready([sys.executable, "-S", "-c", MADE_AS_NOBODY, str(tmp_path / "ready"),
                              f"kcr-made-as-{os.getpid()}"], tmp_path / "ready")
    code, _, err = migrate_cli(f"{proc.pid}@localhost", "localhost")
    assert code != 0 and "Traceback" not in err
    line = err.splitlines()[-1]
    assert f"made as uid 65534 gid 65534, not as pid {proc.pid} is now (uid 0 gid 0)" in line, line
    assert proc_state(proc.pid) in ("S", "R")
    os.kill(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=30) == 0


def test_a_connection_waiting_from_outside_the_job_is_refused(tmp_path: Path) -> None:
    """A client outside the job waits in the listener's accept queue: refused before anything
    is frozen, naming that client; the server runs on and accepts it."""
    proc, path = server(tmp_path, "wait")
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(path)
        line = one_error_line(kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img")).stderr)
        assert f"with a connection from pid {os.getpid()} (" in line, line
        assert not (tmp_path / "img").exists()
        os.kill(proc.pid, signal.SIGUSR1)
        c.settimeout(30)
        assert c.recv(100) == b"still here"
