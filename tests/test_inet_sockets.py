"""TCP and UDP sockets (agent/inet_sockets.py): listeners, bound and connected UDP sockets and
unconnected TCP sockets move, through an image and live between the test hosts, with their
ports and options; connections, waiting clients and queued datagrams are refused before
anything is frozen, naming them, and the process runs on."""
from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import inet_sockets
from examples.testbed import Testbed
from migrate import Migration, MigrationError, MigrationOptions, PhaseChanged
from tests._hosts import start_in, verdict, wait_file
from tests._migration import migrate_cli, wait_gone
from tests._workloads import STARTED, Reference, become_subreaper, build, kcr, one_error_line, reap
from tests.test_checkpoint import migrate_once
from tests.test_live_trees import move_tree_to_host_c, tree
from transport.records import Invalid
from transport.schema import AF_INET, IPPROTO_TCP, SOCK_STREAM, InetOption, InetSocket, InetSockets


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    become_subreaper()


# --- the kernel facts the module relies on ------------------------------------------------

def _diag(sock: socket.socket) -> inet_sockets.DiagInfo:
    ino = os.fstat(sock.fileno()).st_ino
    family, _, protocol = inet_sockets.kind_of(sock.fileno())
    return inet_sockets.diag(family, protocol, [ino])[ino]


def test_sock_diag_shows_a_listeners_backlog_and_waiting_connections() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(5)
        info = _diag(server)
        assert (info.state, info.rqueue, info.wqueue) == (inet_sockets.TCP_LISTEN, 0, 5)
        with socket.create_connection(server.getsockname()):
            assert _diag(server).rqueue == 1          # connected, not accepted yet


def _shown(sock: socket.socket) -> bool:
    ino = os.fstat(sock.fileno()).st_ino
    return ino in inet_sockets.diag(sock.family, socket.IPPROTO_TCP, [ino])


def test_an_ended_connection_keeps_its_port_but_is_not_shown() -> None:
    """Never bound: not shown, port 0; bound: shown, CLOSE; ended: not shown, its port kept."""
    with socket.socket() as server, socket.socket() as fresh, socket.socket() as bound:
        assert not _shown(fresh) and fresh.getsockname()[1] == 0
        bound.bind(("127.0.0.1", 0))
        assert _diag(bound).state == inet_sockets.TCP_CLOSE
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        conn.close()                                    # a reset
        poll = select.poll()
        poll.register(client, select.POLLERR | select.POLLHUP)
        assert poll.poll(30_000), "the reset never arrived"
        try:
            assert not _shown(client) and client.getsockname()[1] != 0
        finally:
            client.close()


def test_an_image_naming_an_option_outside_the_list_is_refused() -> None:
    good = InetSocket(id=1, family=AF_INET, type=SOCK_STREAM, protocol=IPPROTO_TCP,
                      options=(InetOption(1, 2, b"\1\0\0\0"),))
    InetSockets((good,)).validate()
    bad = InetSocket(id=1, family=AF_INET, type=SOCK_STREAM, protocol=IPPROTO_TCP,
                     options=(InetOption(1, 50, b"\1\0\0\0"),))         # SO_ATTACH_BPF: not ours to set
    with pytest.raises(Invalid):
        InetSockets((bad,)).validate()
    with pytest.raises(Invalid):
        InetSockets((InetSocket(id=1, family=AF_INET, type=SOCK_STREAM, protocol=IPPROTO_TCP, address=b"\0" * 16),)
                    ).validate()


# --- moved --------------------------------------------------------------------------------

def test_listeners_and_udp_sockets_come_back_through_an_image(tmp_path: Path) -> None:
    ref, w, _ = migrate_once("ckpt_inet", tmp_path)
    assert w.output() == ref.output() == "inet: options kept, tcp talks, udp talks\n"


def _listening(bed: Testbed, host: str, port: int) -> bool:
    table = bed.exec(host, ["cat", "/proc/net/tcp"], check=True, capture_output=True).stdout.decode()
    return any(int(line.split()[1].rsplit(":", 1)[1], 16) == port and line.split()[3] == "0A"
               for line in table.splitlines()[1:])


def test_listeners_and_udp_sockets_move_between_hosts(testbed: Testbed, tmp_path: Path) -> None:
    exe = str(build("ckpt_inet"))
    ref = Reference([exe, str(tmp_path / "ref")], tmp_path / "ref")
    out = tmp_path / "moved"
    pid = start_in(testbed, "hostA", [exe, str(out)], out, hold=True)
    tcp4 = int((out / "ports").read_text().split()[0])
    assert _listening(testbed, "hostA", tcp4)
    code, report, err = migrate_cli(f"{pid}@hostA", "hostB", "--ssh-config", str(testbed.ssh_config_path))
    assert code == 0, err
    assert _listening(testbed, "hostB", tcp4) and not _listening(testbed, "hostA", tcp4)
    assert verdict(out) == "PASS", (out / "stderr").read_text()
    assert (out / "output").read_text() == ref.output()
    wait_gone(report["new_pid"])


TCP_PAIR = Path(__file__).parent / "workloads" / "tcp_pair.py"


def _tcp_pair_here(tmp_path: Path) -> tuple[Reference, Path, subprocess.Popen[bytes]]:
    """tcp_pair.py unmoved (the reference) and held, on this host, once ready: (the reference,
    the held one's folder, the held one)."""
    ref = Reference([sys.executable, "-S", str(TCP_PAIR), str(tmp_path / "ref")], tmp_path / "ref")
    out = tmp_path / "job"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-S", str(TCP_PAIR), str(out)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, env={**os.environ, "WORKLOAD_HOLD": str(out / "go-on")})
    STARTED.append(proc)
    wait_file(out / "ready", empty_ok=True)
    return ref, out, proc


def test_a_connection_with_megabytes_in_flight_comes_back_through_an_image(tmp_path: Path) -> None:
    """Parent and child talk over loopback TCP; checkpointed while both queues are full (the
    child has read nothing yet), restored, every byte arrives once, in order."""
    ref, out, proc = _tcp_pair_here(tmp_path)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    res = kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img"))
    assert res.returncode == 0, res.stderr.decode()
    proc.wait()
    for child in map(int, children):
        reap(child)                  # ended with the tree; adopted by us (subreaper): its pid is free again
    res = kcr("restore", "-i", str(tmp_path / "img"))
    assert res.returncode == 0, res.stderr.decode()
    assert verdict(out) == "PASS", (out / "verdict").read_text()
    assert (out / "output").read_text() == ref.output()
    assert os.WEXITSTATUS(reap(proc.pid)) == 0          # restored under its pid, our child (subreaper)


def test_reading_connections_leaves_them_working(tmp_path: Path) -> None:
    """``checkpoint --leave-running`` reads both ends in repair mode, as a live move does before
    it may roll back: the job runs on, and every byte still arrives once."""
    ref, out, proc = _tcp_pair_here(tmp_path)
    res = kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img"), "--leave-running")
    assert res.returncode == 0, res.stderr.decode()
    assert verdict(out) == "PASS", (out / "verdict").read_text()
    assert proc.wait(timeout=60) == 0
    assert (out / "output").read_text() == ref.output()


def test_a_connection_with_megabytes_in_flight_moves_between_hosts(testbed: Testbed, tmp_path: Path) -> None:
    ref = Reference([sys.executable, "-S", str(TCP_PAIR), str(tmp_path / "ref")], tmp_path / "ref")
    out = tmp_path / "moved"
    pid = start_in(testbed, "hostA", [sys.executable, "-S", str(TCP_PAIR), str(out)], out, hold=True)
    deadline = time.monotonic() + 30
    while len(before := tree(pid)) < 2:
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.01)
    move_tree_to_host_c(testbed, before)           # the tree, with its pids, to hostC (pids of its own)
    assert verdict(out) == "PASS", (out / "verdict").read_text()
    assert (out / "output").read_text() == ref.output()


async def test_a_move_undone_after_the_connections_were_read_leaves_them_working(testbed: Testbed,
                                                                                 tmp_path: Path) -> None:
    """The listener's port is taken on hostC during pre-copy: the restore fails there after the
    source's connections were read in repair mode, the move is rolled back, and on hostA the
    job's connection carries every byte as if nothing happened."""
    ref = Reference([sys.executable, "-S", str(TCP_PAIR), str(tmp_path / "ref")], tmp_path / "ref")
    out = tmp_path / "job"
    pid = start_in(testbed, "hostA", [sys.executable, "-S", str(TCP_PAIR), str(out)], out, hold=True)
    port = int((out / "port").read_text())
    squatter: list[subprocess.Popen[bytes]] = []

    def take_the_port(ev: object) -> None:
        if isinstance(ev, PhaseChanged) and ev.phase == "precopy" and not squatter:
            taken = tmp_path / "taken"
            squatter.append(testbed.popen("hostC", [sys.executable, "-S", "-c",
                                                    "import socket, sys, time; s = socket.socket(); "
                                                    f"s.bind(('127.0.0.1', {port})); s.listen(1); "
                                                    f"open('{taken}', 'w').close(); time.sleep(120)"]))
            wait_file(taken, empty_ok=True)
            STARTED.append(squatter[0])
    m = Migration(pid, "hostA", "hostC", MigrationOptions(ssh_config=str(testbed.ssh_config_path)),
                  on_event=take_the_port)
    with pytest.raises(MigrationError) as info:
        await m.run()
    assert m.report.state == "rolled-back", m.report.state
    assert f"127.0.0.1:{port}" in str(info.value) and "in use" in str(info.value), str(info.value)
    assert verdict(out) == "PASS", (out / "verdict").read_text()
    assert (out / "output").read_text() == ref.output()


HTTP_SERVER = """
import http.server, os, sys
os.chdir(sys.argv[1])
open("index.html", "w").write("served by a moved process\\n")
server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), http.server.SimpleHTTPRequestHandler)
open("port", "w").write(str(server.server_address[1]))
open("ready", "w").close()
server.serve_forever()
"""


def _get(bed: Testbed, host: str, port: int) -> str:
    fetch = f"import urllib.request; print(urllib.request.urlopen('http://{bed.address(host)}:{port}/', timeout=10).read().decode(), end='')"
    res = bed.exec(host, [sys.executable, "-S", "-c", fetch], capture_output=True, text=True)
    return res.stdout if res.returncode == 0 else f"(failed: {res.stderr.strip().splitlines()[-1:]})"


def test_a_web_server_moves_and_serves_at_the_destination(testbed: Testbed, tmp_path: Path) -> None:
    """CPython's http.server, listening on every address: asked on hostA, moved to hostB, asked
    there at hostB's address; hostA no longer answers."""
    script = tmp_path / "serve.py"
    script.write_text(HTTP_SERVER)
    out = tmp_path / "www"
    pid = start_in(testbed, "hostA", [sys.executable, "-S", str(script), str(out)], out)
    port = int((out / "port").read_text())
    assert _get(testbed, "hostA", port) == "served by a moved process\n"
    code, report, err = migrate_cli(f"{pid}@hostA", "hostB", "--ssh-config", str(testbed.ssh_config_path))
    assert code == 0, err
    assert _get(testbed, "hostB", port) == "served by a moved process\n"
    assert _get(testbed, "hostA", port).startswith("(failed")
    os.kill(report["new_pid"], 9)
    wait_gone(report["new_pid"])


MANAGER = Path(__file__).parent / "workloads" / "mp_manager_tcp.py"


def test_a_multiprocessing_manager_over_tcp_moves_between_hosts(testbed: Testbed, tmp_path: Path) -> None:
    """CPython's SyncManager at 127.0.0.1: its server, a worker and the main process, each
    call a pickled message over a TCP connection of the job's own; moved live mid-run."""
    ref = Reference([sys.executable, "-S", str(MANAGER), str(tmp_path / "ref")], tmp_path / "ref")
    out = tmp_path / "moved"
    pid = start_in(testbed, "hostA", [sys.executable, "-S", str(MANAGER), str(out)], out, hold=True)
    before = tree(pid)
    assert len(before) == 3, before          # the main process, the manager's server, the worker
    move_tree_to_host_c(testbed, before)
    assert verdict(out) == "PASS", (out / "verdict").read_text()
    assert (out / "output").read_text() == ref.output()


# --- refused, the process running on ----------------------------------------------------------

SERVER = """
import os, socket, sys, time
kind = sys.argv[1]
if kind == "connected":
    s = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
elif kind == "waiting":
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(4)
elif kind == "self":                   # both ends of a connection in one process
    listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(1)
    c = socket.create_connection(listener.getsockname()); s, _ = listener.accept(); listener.close()
elif kind == "datagram":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0))
elif kind == "ebpf":                   # an eBPF program attached (SO_ATTACH_BPF), its own fd closed
    import ctypes, struct
    libc = ctypes.CDLL(None, use_errno=True)
    code = ctypes.create_string_buffer(struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0))
    gpl = ctypes.create_string_buffer(b"GPL")        # r0 = 0; exit: a socket filter that drops all
    attr = ctypes.create_string_buffer(struct.pack("<IIQQ", 1, 2, ctypes.addressof(code), ctypes.addressof(gpl)), 128)
    prog = libc.syscall(321, 5, attr, 128)           # bpf(BPF_PROG_LOAD, BPF_PROG_TYPE_SOCKET_FILTER)
    assert prog >= 0, ctypes.get_errno()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0))
    s.setsockopt(socket.SOL_SOCKET, 50, prog); os.close(prog)      # SO_ATTACH_BPF
else:
    s = socket.socket(socket.AF_INET6); s.bind(("::", 0)); s.listen(4)
print(s.getsockname()[1], flush=True)
sys.stdin.read()                       # until the test closes it
print("still here", s.getsockname()[1], flush=True)
if kind == "datagram":                 # what waited in its queue, and from whom
    s.setblocking(False)
    with open(os.path.join(os.path.dirname(sys.argv[0]), "got"), "w") as got:
        while True:
            try:
                data, (host, port) = s.recvfrom(100)
            except BlockingIOError:
                break
            got.write(f"{data.decode()} {host} {port}\\n")
"""


def _start(tmp_path: Path, kind: str, *args: str) -> tuple[subprocess.Popen[str], int]:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    proc = subprocess.Popen([sys.executable, "-S", str(script), kind, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def _runs_on(proc: subprocess.Popen[str], port: int) -> None:
    out, _ = proc.communicate("", timeout=60)
    assert proc.returncode == 0 and out == f"still here {port}\n"


def _refused(proc: subprocess.Popen[str], tmp_path: Path) -> str:
    res = kcr("checkpoint", str(proc.pid), "-o", str(tmp_path / "img"))
    assert res.returncode != 0 and b"Traceback" not in res.stderr
    assert not (tmp_path / "img").exists()
    return one_error_line(res.stderr)


def test_a_connection_to_a_peer_that_stays_is_refused_naming_it(tmp_path: Path) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        proc, local = _start(tmp_path, "connected", str(port))
        line = _refused(proc, tmp_path)
        assert f"127.0.0.1:{local} to 127.0.0.1:{port}, whose other end does not move with it" in line, line
        _runs_on(proc, local)


def test_a_socket_with_an_ebpf_filter_is_refused(tmp_path: Path) -> None:
    """A classic filter is read back and carried (``ckpt_filters``); an eBPF one has no copy to
    read: refused before anything is frozen, and the process runs on."""
    proc, port = _start(tmp_path, "ebpf")
    line = _refused(proc, tmp_path)
    assert f"UDP socket (IPv4) on 127.0.0.1:{port} has an eBPF program attached (SO_ATTACH_BPF)" in line, line
    _runs_on(proc, port)


def test_socket_filters_come_back_through_an_image(tmp_path: Path) -> None:
    ref, w, _ = migrate_once("ckpt_filters", tmp_path)
    assert w.output() == ref.output() == "filters checked: all good\n"


def test_socket_filters_move_between_hosts(testbed: Testbed, tmp_path: Path) -> None:
    exe = str(build("ckpt_filters"))
    ref = Reference([exe, str(tmp_path / "ref")], tmp_path / "ref")
    out = tmp_path / "moved"
    pid = start_in(testbed, "hostA", [exe, str(out)], out, hold=True)
    code, report, err = migrate_cli(f"{pid}@hostA", "hostB", "--ssh-config", str(testbed.ssh_config_path))
    assert code == 0, err
    assert verdict(out) == "PASS", (out / "stderr").read_text()
    assert (out / "output").read_text() == ref.output() == "filters checked: all good\n"
    wait_gone(report["new_pid"])


def test_a_listener_with_a_connection_waiting_is_refused(tmp_path: Path) -> None:
    proc, port = _start(tmp_path, "waiting")
    with socket.create_connection(("127.0.0.1", port)):
        line = _refused(proc, tmp_path)
    assert f"listening on 127.0.0.1:{port} has 1 connection waiting to be accepted" in line, line
    _runs_on(proc, port)


def test_a_listener_cannot_move_within_one_network_namespace(tmp_path: Path) -> None:
    """From a host to itself the job's own socket holds its port: refused in preflight, naming
    the job, and the process runs on."""
    proc, port = _start(tmp_path, "listener")
    code, report, err = migrate_cli(f"{proc.pid}@localhost", "localhost", "--new-pid", "--redirect", "0=/dev/null",
                                    "--redirect", f"1={tmp_path / 'out'}")
    assert code != 0 and "Traceback" not in err
    line = err.splitlines()[-1]           # (the line before says what was found: the job, its tracker)
    assert f"TCP [::]:{port} is held here by pid {proc.pid} (python3), the job itself" in line, line
    assert report.get("state") != "done"
    _runs_on(proc, port)


def test_datagrams_queued_from_a_sender_that_stays_come_back_from_it(tmp_path: Path) -> None:
    """Two datagrams from a socket of this test (still open, so its port is taken here) wait
    on the job's UDP socket: through an image, recvfrom names the same sender for each."""
    proc, port = _start(tmp_path, "datagram")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind(("127.0.0.1", 0))
        sender = client.getsockname()[1]
        for data in (b"first", b"second"):
            client.sendto(data, ("127.0.0.1", port))
        image = tmp_path / "img"
        res = kcr("checkpoint", str(proc.pid), "-o", str(image), "--redirect", "0=/dev/null",
                  "--redirect", f"1={tmp_path / 'out'}")
        assert res.returncode == 0, res.stderr.decode()
        proc.communicate()           # killed by the checkpoint; its pipes closed
        res = kcr("restore", "-i", str(image))
        assert res.returncode == 0, res.stderr.decode()
        assert os.WEXITSTATUS(reap(proc.pid)) == 0
    assert (tmp_path / "out").read_text() == f"still here {port}\n"
    got = (tmp_path / "got").read_text().splitlines()
    assert got == [f"first 127.0.0.1 {sender}", f"second 127.0.0.1 {sender}"], got


def test_a_connection_cannot_move_within_one_network_namespace(tmp_path: Path) -> None:
    """Both ends in the job, but the source's copy holds the 4-tuple where the destination
    would make it: refused in preflight, naming the job; it runs on."""
    proc, port = _start(tmp_path, "self")
    code, _, err = migrate_cli(f"{proc.pid}@localhost", "localhost", "--new-pid", "--redirect", "0=/dev/null",
                               "--redirect", f"1={tmp_path / 'out'}")
    assert code != 0 and "Traceback" not in err
    line = err.splitlines()[-1]
    assert "the TCP connection from 127.0.0.1:" in line and f"127.0.0.1:{port}" in line, line
    assert f"held here by pid {proc.pid} (python3), the job itself" in line, line
    _runs_on(proc, port)


def test_a_restore_where_the_port_is_taken_names_the_holder(tmp_path: Path) -> None:
    proc, port = _start(tmp_path, "listener")
    image = tmp_path / "img"
    res = kcr("checkpoint", str(proc.pid), "-o", str(image), "--leave-running", "--redirect", "0=/dev/null",
              "--redirect", f"1={tmp_path / 'out'}")
    assert res.returncode == 0, res.stderr.decode()
    res = kcr("restore", "-i", str(image), "--new-pid")
    assert res.returncode != 0 and b"Traceback" not in res.stderr
    line = one_error_line(res.stderr)
    assert f"TCP [::]:{port} is in use on this host by pid {proc.pid} (python3)" in line, line
    _runs_on(proc, port)
