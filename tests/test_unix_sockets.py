"""agent/unix_sockets.py on real sockets: sock_diag facts, peeking queues without consuming them,
the options a restore sets again, and the kernel facts the module docstring relies on."""
from __future__ import annotations

import array
import errno
import struct
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.unix_sockets import (
    SO_PEEK_OFF,
    SOCK_DIAG_BY_FAMILY,
    TCP_ESTABLISHED,
    TCP_LISTEN,
    InFlightAncillary,
    InFlightFds,
    QueuedMessage,
    UnixSocketInfo,
    UnreadableQueue,
    _parse_part,
    query,
    queued_data,
    queued_messages,
    socket_options,
)
from precopy.kernel import pidfd_getfd, pidfd_open
from tests._workloads import STARTED
from transport.errors import UnsupportedResource

KINDS = [socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET]
KIND_IDS = ["stream", "dgram", "seqpacket"]


def ino(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def peek_off(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def drain(sock: socket.socket, kind: int) -> list[bytes]:
    """What a program reading the socket gets: all bytes (stream) or each message."""
    got: list[bytes] = []
    while True:
        try:
            got.append(sock.recv(1 << 20, socket.MSG_DONTWAIT))
        except BlockingIOError:
            break
    if kind == socket.SOCK_STREAM:
        return [b"".join(got)] if any(got) else []
    return got


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, request.param)
    with a, b:
        yield a, b


@pytest.mark.parametrize("pair", KINDS, ids=KIND_IDS, indirect=True)
def test_socketpair_facts_and_queues_read_in_place(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    kind = a.type
    to_b = [b"first", b"second message", b"3" * 5000]
    to_a = [b"reply"]
    for m in to_b:
        a.send(m)
    for m in to_a:
        b.send(m)
    b.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 3)     # the process's own peek offset: kept

    info = query([ino(a), ino(b), 1])
    assert set(info) == {ino(a), ino(b)}
    ia, ib = info[ino(a)], info[ino(b)]
    assert (ia.peer, ib.peer) == (ino(b), ino(a))
    assert ia.type == ib.type == kind and ia.state == ib.state == TCP_ESTABLISHED
    assert ia.name == ib.name == b"" and ia.vfs is None and ia.icons == () and ia.shutdown == 0
    if kind == socket.SOCK_DGRAM:       # the first message's length only
        assert (ib.rqueue, ia.rqueue) == (len(to_b[0]), len(to_a[0]))
    else:
        assert (ib.rqueue, ia.rqueue) == (sum(map(len, to_b)), len(to_a[0]))

    want_b = [b"".join(to_b)] if kind == socket.SOCK_STREAM else to_b
    for _ in range(2):                  # reading twice finds the same: nothing was consumed
        assert queued_data(b.fileno(), kind) == want_b
        assert queued_data(a.fileno(), kind) == to_a
    assert peek_off(b) == 3 and peek_off(a) == -1
    assert drain(b, kind) == want_b and drain(a, kind) == to_a
    assert queued_data(b.fileno(), kind) == []


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_fds_in_flight_refused_and_left_queued(kind: int) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    r, w = os.pipe()
    with a, b:
        a.send(b"before")
        a.sendmsg([b"with fd"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
        before = open_fds()
        with pytest.raises(InFlightFds, match="SCM_RIGHTS") as caught:
            queued_data(b.fileno(), kind)
        assert isinstance(caught.value, UnsupportedResource)
        assert open_fds() == before         # the fd the peek installed here was closed
        assert peek_off(b) == -1
        if kind != socket.SOCK_STREAM:
            assert b.recv(100) == b"before"
        msg, anc, _, _ = b.recvmsg(100, socket.CMSG_SPACE(4))   # still there, fd and all
        assert anc and anc[0][1] == socket.SCM_RIGHTS
        assert msg == (b"beforewith fd" if kind == socket.SOCK_STREAM else b"with fd")
        for _, _, data in anc:
            os.close(int.from_bytes(data[:4], sys.byteorder))
    os.close(r)
    os.close(w)


def test_credentials_refused() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        a.send(b"x")
        with pytest.raises(InFlightAncillary, match="credentials") as caught:
            queued_data(b.fileno(), socket.SOCK_DGRAM)
        assert not isinstance(caught.value, InFlightFds)
        assert b.recv(10) == b"x"


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_listener_name_state_and_pending_connection(tmp_path: Path, abstract: bool) -> None:
    name = b"\0kcr-test-%d" % os.getpid() if abstract else os.fsencode(tmp_path / "listen.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        listener.bind(name)
        listener.listen(4)
        client.connect(name)            # not accepted
        client.send(b"early")
        info = query([ino(listener), ino(client)])
        li, ci = info[ino(listener)], info[ino(client)]
        assert li.name == name and li.abstract == abstract and li.state == TCP_LISTEN
        assert li.icons == (ino(client),) and li.rqueue == 1 and li.wqueue == 4   # pending, backlog
        if abstract:
            assert li.vfs is None
        else:
            st = os.stat(name)
            assert li.vfs == (st.st_dev, st.st_ino)
        assert ci.state == TCP_ESTABLISHED and ci.peer == 0   # its peer is the embryo: no inode yet
        assert queued_data(listener.fileno(), socket.SOCK_STREAM) == []
        conn, _ = listener.accept()
        with conn:
            after = query([ino(conn), ino(client), ino(listener)])
            assert after[ino(client)].peer == ino(conn) and after[ino(conn)].peer == ino(client)
            assert after[ino(listener)].icons == ()
            assert queued_data(conn.fileno(), socket.SOCK_STREAM) == [b"early"]
            assert conn.recv(10) == b"early"


def test_closed_inode_is_absent() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    gone, kept = ino(a), ino(b)
    a.close()
    with b:
        info = query([gone, kept])
        assert gone not in info and info[kept].peer == 0 and info[kept].shutdown == 3
    assert kept not in query([kept])


def test_shutdown_reported_without_asking() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        a.shutdown(socket.SHUT_WR)
        info = query([ino(a), ino(b)])
        assert (info[ino(a)].shutdown, info[ino(b)].shutdown) == (2, 1)   # SEND, RCV_SHUTDOWN
        assert query()[ino(a)] == info[ino(a)] and isinstance(info[ino(a)], UnixSocketInfo)


def test_datagram_senders_and_large_messages(tmp_path: Path) -> None:
    rx_name = os.fsencode(tmp_path / "rx.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as named, \
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as anon:
        rx.bind(rx_name)
        named.bind(b"\0kcr-sender-%d" % os.getpid())
        big = os.urandom(150_000)       # larger than the first message: read again, whole
        named.sendto(b"a", rx_name)
        anon.sendto(big, rx_name)
        named.sendto(b"c", rx_name)
        assert queued_messages(rx.fileno(), socket.SOCK_DGRAM) == [
            QueuedMessage(b"a", b"\0kcr-sender-%d" % os.getpid()), QueuedMessage(big, b""),
            QueuedMessage(b"c", b"\0kcr-sender-%d" % os.getpid())]
        with pytest.raises(UnreadableQueue, match="limit"):
            queued_data(rx.fileno(), socket.SOCK_DGRAM, limit=100_000)
        assert peek_off(rx) == -1
        assert drain(rx, socket.SOCK_DGRAM) == [b"a", big, b"c"]


def test_stream_bound_and_out_of_band_byte() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        a.send(b"x" * 10_000)
        with pytest.raises(UnreadableQueue, match="limit"):
            queued_data(b.fileno(), socket.SOCK_STREAM, limit=4096)
        a.send(b"!", socket.MSG_OOB)
        with pytest.raises(UnreadableQueue, match="out-of-band"):
            queued_data(b.fileno(), socket.SOCK_STREAM)
        assert b.recv(1, socket.MSG_OOB) == b"!"
        assert queued_data(b.fileno(), socket.SOCK_STREAM) == [b"x" * 10_000]


def test_kernel_fact_empty_datagrams_hide_from_a_second_walk() -> None:
    """Pins the kernel behaviour the module docstring describes: a peeked zero-length datagram
    is skipped by SO_PEEK_OFF walks, except at the head (read with a plain MSG_PEEK)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        for m in (b"", b"one", b"", b"two"):
            a.send(m)
        assert queued_data(b.fileno(), socket.SOCK_DGRAM) == [b"", b"one", b"", b"two"]
        assert queued_data(b.fileno(), socket.SOCK_DGRAM) == [b"", b"one", b"two"]
        assert drain(b, socket.SOCK_DGRAM) == [b"", b"one", b"", b"two"]


def test_a_seqpacket_socket_shut_for_reading_ends_its_queue() -> None:
    """Shut for reading, a seqpacket socket reports its end as a message of no bytes, again and
    again (a kernel fact): the walk stops there, with what was queued before the shutdown, where
    it used to read empty messages until its byte bound (minutes: zdtm sockets01-seqpacket)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        a.send(b"before")
        a.send(b"the shutdown")
        b.shutdown(socket.SHUT_RD)
        assert queued_data(b.fileno(), socket.SOCK_SEQPACKET) == [b"before", b"the shutdown"]
        b.setblocking(False)
        assert [b.recv(100), b.recv(100)] == [b"before", b"the shutdown"]
        assert b.recv(10) == b"" and b.recv(10) == b""           # the end, not a message
        assert queued_data(b.fileno(), socket.SOCK_SEQPACKET) == []


def test_socket_options() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 20_000)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        b.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        b.settimeout(None)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("=qq", 2, 500_000))
        flags = os.get_blocking(b.fileno())
        opts = socket_options(b.fileno())
        assert opts["SO_RCVBUF"] == 40_000 and opts["SO_PASSCRED"] == 1 and opts["SO_PEEK_OFF"] == 0
        assert opts["SO_RCVTIMEO"] == 2_500_000 and opts["SO_SNDTIMEO"] == 0
        assert opts["SO_SNDBUF"] == a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert os.get_blocking(b.fileno()) == flags


CHILD = """
import os, socket, sys
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
a.send(b"to b 1"); a.send(b"to b 2"); b.send(b"to a")
print(a.fileno(), b.fileno(), os.fstat(a.fileno()).st_ino, os.fstat(b.fileno()).st_ino, flush=True)
sys.stdin.read()
print(b.recv(100), b.recv(100), a.recv(100), flush=True)
"""


def test_socket_of_another_process_through_pidfd_getfd() -> None:
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    STARTED.append(proc)
    assert proc.stdout is not None and proc.stdin is not None
    fd_a, fd_b, ino_a, ino_b = map(int, proc.stdout.readline().split())
    pidfd = pidfd_open(proc.pid)
    try:
        dup_a, dup_b = pidfd_getfd(pidfd, fd_a), pidfd_getfd(pidfd, fd_b)
    finally:
        os.close(pidfd)
    try:
        assert os.fstat(dup_b).st_ino == ino_b
        info = query([ino_a, ino_b])
        assert info[ino_a].peer == ino_b and info[ino_b].rqueue == 12
        assert queued_data(dup_b, socket.SOCK_SEQPACKET) == [b"to b 1", b"to b 2"]
        assert queued_data(dup_a, socket.SOCK_SEQPACKET) == [b"to a"]
        assert socket_options(dup_b)["SO_PEEK_OFF"] == -1
    finally:
        os.close(dup_a)
        os.close(dup_b)
    out, _ = proc.communicate(b"", timeout=10)      # the process still reads every message
    assert out.strip() == b"b'to b 1' b'to b 2' b'to a'"
    assert proc.returncode == 0
    assert not query([ino_a, ino_b])


def diag_message(record: bytes, seq: int = 7) -> bytes:
    return struct.pack("=IHHII", 16 + len(record), SOCK_DIAG_BY_FAMILY, 2, seq, 0) + record


def test_diag_reply_lengths_checked_before_use() -> None:
    record = struct.pack("=BBBBI2I", socket.AF_UNIX, 1, 1, 0, 42, 0, 0)
    good = diag_message(record)
    assert [i.inode for i in _parse_part(memoryview(good), 7) if i] == [42]
    assert list(_parse_part(memoryview(good), 8)) == []           # another request's answer
    bad = [good[:-1],                                              # message longer than the data
           diag_message(record[:4]),                               # record shorter than its struct
           diag_message(record + struct.pack("=HH", 40, 0))]       # attribute past its message
    for data in bad:
        with pytest.raises(OSError) as caught:
            list(_parse_part(memoryview(data), 7))
        assert caught.value.errno == errno.EBADMSG
