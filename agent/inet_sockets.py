"""TCP and UDP sockets: which ones a job may take along, what they are, and making them again.

Carried: a TCP socket that has no connection (new, bound, or listening with nothing waiting
in its accept queue), an established TCP connection whose other end is a socket of the job
too (over loopback: a server and its workers, a program and the helper it talks to), and a
UDP socket with nothing queued, over IPv4 or IPv6: its address
and port, a listener's backlog, a UDP socket's peer, and each option of ``INET_OPTIONS`` the
program changed from what a new socket of its kind has here (only those: setting a buffer
size, for one, turns the kernel's tuning of it off). Made again on the destination in the
agent's network namespace (the job's: ``agent.procfs`` refuses others), bound to the same
address and port. Refused, before anything is frozen, with a line naming it: a TCP connection
to a peer that does not move (its address would not follow it) or in any state but
ESTABLISHED, a
listener with connections waiting to be accepted, a UDP socket with datagrams queued, a
socket with a BPF filter attached, any other protocol (raw, SCTP, MPTCP, ...).

Kernel facts relied on, checked on 6.18 (tests/test_inet_sockets.py):

- NETLINK_SOCK_DIAG answers an ``inet_diag_req_v2`` dump per family and protocol with an
  ``inet_diag_msg`` per socket: its state, inode and queues (for a TCP listener, ``rqueue``
  the connections waiting to be accepted and ``wqueue`` its backlog; for UDP, ``rqueue`` the
  memory its queued datagrams take), and always an INET_DIAG_SHUTDOWN attribute.
- A TCP socket never bound is in no table sock_diag reads: it is absent, and getsockname
  gives port 0. One bound and not listening is shown, in state CLOSE. One whose connection
  has ended (reset, or closed both ways) is absent too, but getsockname still gives its
  port, and it may hold an error for its next call (SO_ERROR, which a read would clear):
  refused as an ended connection.
- ``listen`` stores its backlog capped at ``net.core.somaxconn``; the dump shows the stored one.

A connection (``TCP_REPAIR``, as CRIU reads and makes them; CAP_NET_ADMIN): the kernel goes on
moving bytes between the two ends while their processes are frozen (a send queue drains into
the peer's receive queue, acknowledgements come back). Every connection of the job is put in
repair mode, then every send queue is read (from the first unacknowledged byte), then every
receive queue (from the first byte the program has not read). Read in that order, each
receive queue ends at or after the start of its peer's send queue, which ends where the
program stopped writing: restored, the overlap is sent again and the receiver drops it, and
no byte is lost. A receive queue is read until its length holds still around the read. The
sockets leave repair mode without a window probe (``TCP_REPAIR_OFF_NO_WP``) once read; where
the job then ends (a checkpoint), they are put back into it first, so that closing them sends
nothing (no FIN, no TIME_WAIT on the 4-tuple the restore makes again). Made again: bound in
repair mode (which lets it share its port with the listener it was accepted from), both
sequence numbers set, connected without a handshake, the options agreed at the handshake
(MSS, window scaling, SACK, timestamps with their clock), the queues (the part of the send
queue already sent goes in as sent, the rest is written once out of repair mode), the window.
"""
from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import struct
import time
from typing import Collection, Iterable

from agent import socket_filter
from transport.errors import RestoreError, UnsupportedResource
from transport.frozen import frozen
from transport.records import MAX_BYTES
from transport.schema import (AF_INET, AF_INET6, INET_OPTIONS, IPPROTO_TCP, IPPROTO_UDP, SOCK_DGRAM, SOCK_STREAM,
                              SOL_SOCKET, InetDatagram, InetOption, InetSocket, TcpConnection)

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x01, 0x300
INET_DIAG_SHUTDOWN = 8
_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")
_REQ = struct.Struct("=BBBBI48x")                 # inet_diag_req_v2, its sockid left zero
_MSG = struct.Struct("=BBBB48xIIIII")             # inet_diag_msg: family, state, timer, retrans, id,
                                                  # expires, rqueue, wqueue, uid, inode
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
              7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV"}
TCP_ESTABLISHED, TCP_CLOSE, TCP_LISTEN = 1, 7, 10
SO_DOMAIN, SO_PROTOCOL = 39, 38
SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE = 7, 8, 32, 33
SO_REUSEADDR, SO_REUSEPORT, SO_BINDTODEVICE, SO_BUF_LOCK = 2, 15, 25, 72
SOCK_SNDBUF_LOCK, SOCK_RCVBUF_LOCK = 1, 2
IP_FREEBIND, IPV6_FREEBIND = 15, 78
IPV6_V6ONLY = 26
# include/uapi/linux/tcp.h, sockios.h
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ, TCP_REPAIR_OPTIONS, TCP_TIMESTAMP, TCP_REPAIR_WINDOW = 19, 20, 21, 22, 24, 29
TCP_REPAIR_ON, TCP_REPAIR_OFF, TCP_REPAIR_OFF_NO_WP = 1, 0, -1
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
TCP_MAXSEG = 2
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B
_BEFORE_BIND = {(SOL_SOCKET, SO_REUSEADDR), (SOL_SOCKET, SO_REUSEPORT), (SOL_SOCKET, SO_BINDTODEVICE),
                (41, IPV6_V6ONLY), (0, 15), (0, 19), (0, 24), (41, 78), (41, 75)}   # and the free/transparent binds


@frozen
class DiagInfo:
    """What sock_diag says of one TCP or UDP socket."""

    state: int
    rqueue: int
    wqueue: int
    shutdown: int


def diag(family: int, protocol: int, inodes: Iterable[int]) -> dict[int, DiagInfo]:
    """The TCP or UDP sockets of ``family`` in the calling thread's network namespace whose
    inodes are in ``inodes``, by inode (one no longer open is absent)."""
    wanted = set(inodes)
    out: dict[int, DiagInfo] = {}
    req = _REQ.pack(family, protocol, 0, 0, 0xFFFFFFFF)
    hdr = _NLMSGHDR.pack(_NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(10.0)           # the kernel answers at once; this only stops a hang
        nl.bind((0, 0))
        nl.sendto(hdr + req, (0, 0))
        while True:
            data = memoryview(nl.recv(1 << 16))
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, mtype, _f, seq, _p = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size or off + length > len(data):
                    raise OSError(errno.EBADMSG, f"sock_diag message length {length}")
                body = data[off + _NLMSGHDR.size: off + length]
                off += (length + 3) & ~3
                if seq != 1:
                    continue
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else errno.EBADMSG
                    if err:
                        raise OSError(err, f"sock_diag dump of {_proto(protocol)} sockets: {os.strerror(err)}")
                    continue
                if mtype != SOCK_DIAG_BY_FAMILY or len(body) < _MSG.size:
                    continue
                _fam, state, _t, _r, _exp, rqueue, wqueue, _uid, ino = _MSG.unpack_from(body)
                if ino not in wanted:
                    continue
                shutdown = 0
                a = _MSG.size
                while a + _NLATTR.size <= len(body):
                    alen, atype = _NLATTR.unpack_from(body, a)
                    if alen < _NLATTR.size:
                        break
                    if atype & 0x3FFF == INET_DIAG_SHUTDOWN and alen > _NLATTR.size:
                        shutdown = body[a + _NLATTR.size]
                    a += (alen + 3) & ~3
                out[ino] = DiagInfo(state, rqueue, wqueue, shutdown)


def _proto(protocol: int) -> str:
    return {IPPROTO_TCP: "TCP", IPPROTO_UDP: "UDP"}.get(protocol, f"protocol {protocol}")


def _family(family: int) -> str:
    return {AF_INET: "IPv4", AF_INET6: "IPv6"}.get(family, f"family {family}")


def kind_of(fd: int) -> tuple[int, int, int]:
    """(family, type, protocol) of the socket ``fd`` (a dup the agent holds)."""
    sock = socket.socket(fileno=fd)
    try:
        return (sock.getsockopt(SOL_SOCKET, SO_DOMAIN), sock.getsockopt(SOL_SOCKET, socket.SO_TYPE),
                sock.getsockopt(SOL_SOCKET, SO_PROTOCOL))
    finally:
        sock.detach()


def is_inet(kind: tuple[int, int, int]) -> bool:
    return kind in ((AF_INET, SOCK_STREAM, IPPROTO_TCP), (AF_INET, SOCK_DGRAM, IPPROTO_UDP),
                    (AF_INET6, SOCK_STREAM, IPPROTO_TCP), (AF_INET6, SOCK_DGRAM, IPPROTO_UDP))


def shown(family: int, address: bytes, port: int) -> str:
    """An address and port as users write them: 10.0.0.1:80, [::1]:80."""
    if not address:
        return "(unbound)"
    ip = ipaddress.ip_address(address)
    return f"[{ip}]:{port}" if family == AF_INET6 else f"{ip}:{port}"


def _unpack(family: int, addr: tuple) -> tuple[bytes, int, int]:
    """(address bytes, port, scope id) from a Python socket address tuple."""
    return socket.inet_pton(family, addr[0].split("%")[0]), int(addr[1]), int(addr[3]) if family == AF_INET6 else 0


Endpoint = tuple[bytes, int]          # an address and a port


V4_MAPPED = bytes(10) + b"\xff\xff"


def plain(end: Endpoint) -> Endpoint:
    """An endpoint as either end of a connection names it: an IPv6 socket's v4-mapped address
    (``::ffff:127.0.0.1``, a dual-stack server's view of an IPv4 client) as the IPv4 one."""
    address, port = end
    return (address[12:], port) if len(address) == 16 and address[:12] == V4_MAPPED else end


def endpoints(dup: int, family: int) -> tuple[Endpoint, Endpoint | None]:
    """The socket's own address and port, and its peer's (None: not connected), v4-mapped
    addresses as IPv4 ones (``plain``)."""
    sock = socket.socket(fileno=dup)
    try:
        local = plain(_unpack(family, sock.getsockname())[:2])
        try:
            peer: Endpoint | None = plain(_unpack(family, sock.getpeername())[:2])
        except OSError:
            peer = None
    finally:
        sock.detach()
    return local, peer


def check(pid: int, fd: int, dup: int, kind: tuple[int, int, int], info: DiagInfo | None,
          job_ends: Collection[tuple[Endpoint, Endpoint]] = ()) -> None:
    """Refuse what ``record`` could not carry, naming it: UnsupportedResource. ``job_ends``:
    (own, peer) endpoints of the job's connected sockets, where a connection's peer is found."""
    family, _type, protocol = kind
    what = f"pid {pid}'s fd {fd} is {'a TCP' if protocol == IPPROTO_TCP else 'a UDP'} socket ({_family(family)})"
    sock = socket.socket(fileno=dup)
    try:
        local = _unpack(family, sock.getsockname())
        try:
            peer: tuple[bytes, int, int] | None = _unpack(family, sock.getpeername())
        except OSError:
            peer = None
    finally:
        sock.detach()
    here = shown(family, *local[:2]) if local[1] or any(local[0]) else "(unbound)"
    socket_filter.read(dup, f"{what} on {here}", pid)        # refuses an eBPF program
    if info is None:
        if local[1] or any(local[0]):
            # sock_diag shows every socket with a port but one whose connection has ended
            raise UnsupportedResource(f"{what}: a connection from {here} that has ended (its next call may report "
                                      "why): kcr-migrate cannot move it; close it first", pid=pid)
        return                    # never bound: sock_diag shows none such
    if protocol == IPPROTO_TCP:
        if info.state == TCP_LISTEN and info.rqueue:
            raise UnsupportedResource(
                f"{what} listening on {here} has {info.rqueue} connection{'s' if info.rqueue > 1 else ''} waiting to "
                "be accepted, which cannot move: migrate once the server has accepted them", pid=pid)
        to = f" to {shown(family, *peer[:2])}" if peer else ""
        if info.state == TCP_ESTABLISHED and peer is not None and \
                (plain(peer[:2]), plain(local[:2])) not in job_ends:
            raise UnsupportedResource(
                f"{what}: a connection from {here}{to}, whose other end does not move with it (its address would "
                "not follow it): kcr-migrate moves connections between the job's own processes only; close it "
                "first", pid=pid)
        if info.state not in (TCP_CLOSE, TCP_LISTEN, TCP_ESTABLISHED):
            raise UnsupportedResource(
                f"{what}: a connection from {here}{to} ({TCP_STATES.get(info.state, info.state)}): kcr-migrate moves "
                "established connections only (not one closing or opening); close it first", pid=pid)
        if info.state == TCP_CLOSE and info.shutdown:
            raise UnsupportedResource(f"{what}: a connection from {here} that has ended (its next call may report "
                                      "why): kcr-migrate cannot move it; close it first", pid=pid)


def record(ino: int, dup: int, kind: tuple[int, int, int], info: DiagInfo | None,
           connection: TcpConnection | None = None) -> InetSocket:
    """The socket ``dup`` (checked by ``check``) as the image carries it; ``info`` None: one
    never bound (sock_diag shows none such). ``connection``: an established one's, as
    ``read_connections`` read it."""
    family, type_, protocol = kind
    sock = socket.socket(fileno=dup)
    try:
        address, port, scope = _unpack(family, sock.getsockname())
        if not port and not any(address):
            address = b""              # never bound
        peer, peer_port = b"", 0
        if connection is not None:
            peer, peer_port, _ = _unpack(family, sock.getpeername())
        elif type_ == SOCK_DGRAM:
            try:
                peer, peer_port, _ = _unpack(family, sock.getpeername())
            except OSError:
                pass
            else:
                # Where its address is the one the route to its peer gives (connect chose it,
                # or it was bound to that one), it is bound to its port on every address and
                # connected: the destination's route chooses again, as the source's did. One
                # bound to another address keeps it.
                if address == _routed(family, peer, peer_port, scope):
                    address = bytes(len(address))
        options = _changed_options(sock, kind, connected=connection is not None)
        program, locked = socket_filter.read(dup, f"socket {ino}", 0)
        datagrams = queued_datagrams(sock) if type_ == SOCK_DGRAM else ()
    finally:
        sock.detach()
    listening = protocol == IPPROTO_TCP and info is not None and info.state == TCP_LISTEN
    return InetSocket(id=ino, family=family, type=type_, protocol=protocol, address=address, port=port,
                      scope_id=scope, peer_address=peer, peer_port=peer_port,
                      backlog=info.wqueue if listening and info is not None else -1, options=options,
                      connection=(connection,) if connection is not None else (),
                      shutdown=info.shutdown if info is not None and type_ == SOCK_DGRAM else 0, datagrams=datagrams,
                      nonlocal_address=bool(address) and any(address) and not _local(family, address, scope),
                      bpf_filter=program, filter_locked=locked)


SO_PEEK_OFF = 42


def queued_datagrams(sock: socket.socket) -> tuple[InetDatagram, ...]:
    """The datagrams queued on a UDP socket, left there: MSG_PEEK walked by SO_PEEK_OFF (which
    steps a datagram at a time), the socket's own peek offset put back after."""
    out: list[InetDatagram] = []
    saved = sock.getsockopt(SOL_SOCKET, SO_PEEK_OFF)
    sock.setsockopt(SOL_SOCKET, SO_PEEK_OFF, 0)
    total = 0
    try:
        while True:
            try:
                data, addr = sock.recvfrom(65535, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return tuple(out)
            address, port, _ = _unpack(sock.family, addr)
            out.append(InetDatagram(address, port, data))
            total += len(data)
            if total > MAX_QUEUED:
                raise UnsupportedResource(f"more than {MAX_QUEUED >> 20} MiB of datagrams queued on a UDP socket")
    finally:
        sock.setsockopt(SOL_SOCKET, SO_PEEK_OFF, saved)


MAX_QUEUED = 64 << 20
IP_TRANSPARENT, IPV6_TRANSPARENT = 19, 75
REQUEUE_WAIT_S = 2.0


def requeue(sock: socket.socket, s: InetSocket, others: Collection[socket.socket]) -> None:
    """``s``'s queued datagrams sent to ``sock`` (made again) from their senders' addresses: from
    the job's own socket bound there if one is (``others``), else from a socket bound there
    with IP_TRANSPARENT (an address this host need not have), over loopback where ``sock`` is
    bound to every address. RestoreError if one cannot be, or has not arrived in 2 s."""
    if not s.datagrams:
        return
    family = s.family
    here = _unpack(family, sock.getsockname())
    ours = {plain(_unpack(family, o.getsockname())[:2]): o for o in others
            if o.type == socket.SOCK_DGRAM and o.family == family}
    for d in s.datagrams:
        to_addr = here[0]
        if not any(to_addr):            # bound to every address: over loopback, of the sender's kind
            to_addr = (bytes(10) + b"\xff\xff\x7f\0\0\1" if d.address[:12] == V4_MAPPED else socket.inet_pton(AF_INET6, "::1")) \
                if family == AF_INET6 else b"\x7f\0\0\1"
        to = _sockaddr(family, to_addr, here[1], here[2])
        sender = ours.get(plain((d.address, d.port)))
        try:
            if sender is not None:
                sender.sendto(d.data, to)
                continue
            with socket.socket(family, socket.SOCK_DGRAM) as spoof:
                spoof.setsockopt(*((0, IP_TRANSPARENT) if family == AF_INET else (41, IPV6_TRANSPARENT)), 1)
                spoof.setsockopt(SOL_SOCKET, SO_REUSEADDR, 1)
                try:
                    spoof.bind(_sockaddr(family, d.address, d.port, 0))
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE or family != AF_INET:
                        raise
                    # the sender still holds its port here (a host to itself): an IPv4
                    # packet written whole, which binds no port
                    _send_raw_udp(d.address, d.port, to_addr, here[1], d.data)
                    continue
                spoof.sendto(d.data, to)
        except OSError as exc:
            raise RestoreError(f"a datagram queued on UDP {shown(family, here[0], here[1])} from "
                               f"{shown(family, d.address, d.port)} cannot be queued again here: {exc.strerror}") from None
    deadline = time.monotonic() + REQUEUE_WAIT_S
    while len(queued_datagrams(sock)) < len(s.datagrams):      # loopback delivers in a softirq
        if time.monotonic() > deadline:
            raise RestoreError(f"datagrams queued again on UDP {shown(family, here[0], here[1])} did not arrive")
        time.sleep(0.001)


def _send_raw_udp(src: bytes, sport: int, dst: bytes, dport: int, data: bytes) -> None:
    """One UDP datagram from ``src``:``sport`` to ``dst``:``dport`` as an IPv4 packet written
    whole (IPPROTO_RAW: the kernel fills in the header checksum and id; the UDP checksum left 0,
    which IPv4 allows: none)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, IPPROTO_UDP, 0, src, dst)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(ip + udp, (socket.inet_ntop(AF_INET, dst), 0))


def _routed(family: int, peer: bytes, port: int, scope: int) -> bytes:
    """The local address this host's route to ``peer`` gives a UDP socket that connects to it."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(_sockaddr(family, peer, port, scope))
        except OSError:
            return b""
        return _unpack(family, probe.getsockname())[0]


def _local(family: int, address: bytes, scope: int) -> bool:
    """Is ``address`` one of this host's (a new socket binds to it without IP_FREEBIND)?"""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(_sockaddr(family, address, 0, scope))
        except OSError as exc:
            return exc.errno != errno.EADDRNOTAVAIL
    return True


# Multicast options mean nothing to TCP (setting them fails); on a connection, what the kernel
# tunes as it runs reads as changed though nobody set it: its buffer sizes, MSS and window
# clamp (``TcpConnection`` carries the MSS agreed; the buffers are the destination's to tune).
_NOT_TCP = {(0, 33), (0, 34), (0, 49), (41, 18), (41, 19)}
_TUNED = {(SOL_SOCKET, SO_SNDBUF), (SOL_SOCKET, SO_RCVBUF), (IPPROTO_TCP, TCP_MAXSEG), (IPPROTO_TCP, 10)}


def _options_for(kind: tuple[int, int, int], connected: bool) -> list[tuple[int, int]]:
    family, _type, protocol = kind
    level_ok = {SOL_SOCKET, protocol, 0 if family == AF_INET else 41}
    skip = (_NOT_TCP if protocol == IPPROTO_TCP else set()) | (_TUNED if connected else set())
    return [key for key in INET_OPTIONS if key[0] in level_ok and key not in skip]


def _read_option(sock: socket.socket, level: int, name: int) -> bytes | None:
    size = INET_OPTIONS[level, name] or 16
    try:
        value = sock.getsockopt(level, name, size)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOENT):
            return None                   # not one this kernel or this socket has
        raise
    if not INET_OPTIONS[level, name]:
        value = value.split(b"\0", 1)[0]
    return value


def _changed_options(sock: socket.socket, kind: tuple[int, int, int], connected: bool = False
                     ) -> tuple[InetOption, ...]:
    """The options whose values differ from a new socket's of the same kind, made here
    (``connected``: a TCP connection's, without those the kernel tunes)."""
    out: list[InetOption] = []
    try:        # which buffer sizes the program set (Linux 5.14): those a connection keeps
        locks = sock.getsockopt(SOL_SOCKET, SO_BUF_LOCK)
    except OSError:
        locks = 0
    keep = {(SOL_SOCKET, SO_SNDBUF)} if locks & SOCK_SNDBUF_LOCK else set()
    keep |= {(SOL_SOCKET, SO_RCVBUF)} if locks & SOCK_RCVBUF_LOCK else set()
    with socket.socket(*kind) as fresh:
        for level, name in _options_for(kind, connected) + sorted(keep if connected else set()):
            value = _read_option(sock, level, name)
            if value is not None and value != _read_option(fresh, level, name) and (value or INET_OPTIONS[level, name]):
                out.append(InetOption(level, name, value))
    return tuple(out)


def make(s: InetSocket, job: Collection[int] = (), *, shared_port: bool = False) -> socket.socket:
    """``s`` made again here: its options, its address, listening or connected. RestoreError
    naming the address where this host cannot give it (taken, or not one of its addresses;
    ``job``: the pids of the job, when it is still running here). A connection is left in
    repair mode: ``release`` it once its other end is made too (before that, a packet it sent
    would find no socket, and the reset would end it). ``shared_port``: other sockets of the
    job are bound to its port (a group under SO_REUSEPORT, which the program may have turned
    off on one since, as CRIU's tests do): bound with both reuse options on, then set back.
    An address that was not the source's own either (``nonlocal_address``) is bound with
    IP_FREEBIND on for the time of the bind, as it was."""
    sock = socket.socket(s.family, s.type, s.protocol)
    conn = s.connection[0] if s.connection else None
    try:
        if conn is not None:
            sock.setsockopt(IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)
        later = []
        for o in s.options:               # what changes how bind behaves, first
            if conn is not None and (o.level, o.name) == (SOL_SOCKET, SO_REUSEADDR):
                continue                  # (it would undo repair mode's own reuse: set on release)
            if (o.level, o.name) in _BEFORE_BIND:
                _set(sock, o)
            else:
                later.append(o)
        during = []                       # options on only while it binds
        if shared_port and s.address:
            during += [(SOL_SOCKET, SO_REUSEADDR), (SOL_SOCKET, SO_REUSEPORT)]
        if s.nonlocal_address:
            during.append((0, IP_FREEBIND) if s.family == AF_INET else (41, IPV6_FREEBIND))
        for level, name in during:
            sock.setsockopt(level, name, 1)
        if s.address:
            where = shown(s.family, s.address, s.port)
            try:
                sock.bind(_sockaddr(s.family, s.address, s.port, s.scope_id))
            except OSError as exc:
                raise RestoreError(_bind_error(s, where, exc, job)) from None
        if s.backlog >= 0:
            sock.listen(s.backlog)
        recorded = {(o.level, o.name): o.value for o in s.options}
        for level, name in during:
            sock.setsockopt(level, name, recorded.get((level, name), struct.pack("i", 0)))
        if conn is not None:
            _connect_repaired(sock, s, conn, later)
        else:
            if s.peer_address:
                sock.connect(_sockaddr(s.family, s.peer_address, s.peer_port, s.scope_id))
            for o in later:
                _set(sock, o)
            _buffer_locks(sock, s)
            if s.shutdown:
                try:
                    sock.shutdown(s.shutdown - 1)       # SHUT_RD 0, SHUT_WR 1, SHUT_RDWR 2
                except OSError as exc:
                    if exc.errno != errno.ENOTCONN:      # (an unconnected one is shut all the same)
                        raise
    except BaseException:
        if conn is not None:
            _repair(sock.fileno(), TCP_REPAIR_ON)        # a half-made connection goes without a word
        sock.close()
        raise
    return sock


def _buffer_locks(sock: socket.socket, s: InetSocket) -> None:
    """Which buffer sizes stay fixed (SO_BUF_LOCK), as on the source: setting a size fixes it,
    so this comes after them. A kernel without SO_BUF_LOCK (before 5.14) shows none."""
    value = next((o.value for o in s.options if (o.level, o.name) == (SOL_SOCKET, SO_BUF_LOCK)), struct.pack("i", 0))
    try:
        sock.setsockopt(SOL_SOCKET, SO_BUF_LOCK, value)
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            raise


def _connect_repaired(sock: socket.socket, s: InetSocket, c: TcpConnection, later: list[InetOption]) -> None:
    """The connection made again in repair mode (``sock`` is in it, bound): sequence numbers,
    connect (no handshake), options, queues, window; out of repair mode; the unsent bytes."""
    fd = sock.fileno()
    send_queue, recv_queue = b"".join(c.send_queue), b"".join(c.recv_queue)
    sent = len(send_queue) - c.unsent
    _queue(fd, TCP_SEND_QUEUE)
    sock.setsockopt(IPPROTO_TCP, TCP_QUEUE_SEQ, struct.pack("=I", c.send_seq))
    _queue(fd, TCP_RECV_QUEUE)
    sock.setsockopt(IPPROTO_TCP, TCP_QUEUE_SEQ, struct.pack("=I", c.recv_seq))
    _queue(fd, TCP_NO_QUEUE)
    where = f"{shown(s.family, s.address, s.port)} to {shown(s.family, s.peer_address, s.peer_port)}"
    try:
        sock.connect(_sockaddr(s.family, s.peer_address, s.peer_port, s.scope_id))
    except OSError as exc:
        raise RestoreError(f"the TCP connection from {where} cannot be made again here: {exc.strerror} (the "
                           "same connection is open on this host: source and destination share one network "
                           "namespace?)") from None
    opts = [(TCPOPT_MSS, c.mss)] if c.mss else []
    if c.options & TCPI_OPT_WSCALE:
        opts.append((TCPOPT_WINDOW, c.snd_wscale | c.rcv_wscale << 16))
    if c.options & TCPI_OPT_SACK:
        opts.append((TCPOPT_SACK_PERM, 0))
    if c.options & TCPI_OPT_TIMESTAMPS:
        opts.append((TCPOPT_TIMESTAMP, 0))
    if opts:
        sock.setsockopt(IPPROTO_TCP, TCP_REPAIR_OPTIONS, b"".join(struct.pack("=II", *o) for o in opts))
    if c.options & TCPI_OPT_TIMESTAMPS:
        sock.setsockopt(IPPROTO_TCP, TCP_TIMESTAMP, struct.pack("=I", c.timestamp))
    for o in later:
        _set(sock, o)
    # The queues go in whole, whatever buffer sizes the options set: made room for first
    # (which fixes the size, as setting it does), only where a new socket's is too small.
    for name, force, need in ((SO_SNDBUF, SO_SNDBUFFORCE, len(send_queue)), (SO_RCVBUF, SO_RCVBUFFORCE,
                                                                             len(recv_queue))):
        if need and sock.getsockopt(SOL_SOCKET, name) < 2 * need:
            sock.setsockopt(SOL_SOCKET, force, need + (need >> 1) + 65536)
    for queue, data in ((TCP_SEND_QUEUE, memoryview(send_queue)[:sent]), (TCP_RECV_QUEUE, memoryview(recv_queue))):
        _queue(fd, queue)
        while data:
            n = sock.send(data, socket.MSG_DONTWAIT)
            data = data[n:]
    _queue(fd, TCP_NO_QUEUE)
    try:
        sock.setsockopt(IPPROTO_TCP, TCP_REPAIR_WINDOW, struct.pack("=5I", c.snd_wl1, c.snd_wnd, c.max_window,
                                                                     c.rcv_wnd, c.rcv_wup))
    except OSError as exc:
        raise RestoreError(f"the TCP connection from {where} cannot be made again here: its window (last update "
                           f"{c.snd_wl1}, receive window {c.rcv_wnd} from {c.rcv_wup}) does not fit its receive "
                           f"queue, which ends at {(c.recv_seq + len(recv_queue)) & 0xFFFFFFFF}: "
                           f"{exc.strerror}; the image is inconsistent") from None


def release(sock: socket.socket, s: InetSocket) -> None:
    """A connection ``make`` made, out of repair mode, its bytes not sent yet written."""
    if not s.connection:
        return
    c = s.connection[0]
    _repair(sock.fileno(), TCP_REPAIR_OFF)
    _after_repair(sock.fileno(), any((o.level, o.name) == (SOL_SOCKET, SO_REUSEADDR) and o.value != bytes(4)
                                     for o in s.options))
    _buffer_locks(sock, s)
    where = f"{shown(s.family, s.address, s.port)} to {shown(s.family, s.peer_address, s.peer_port)}"
    send_queue = b"".join(c.send_queue)
    unsent = memoryview(send_queue)[len(send_queue) - c.unsent:]
    while unsent:
        try:
            n = sock.send(unsent, socket.MSG_DONTWAIT)
        except BlockingIOError:
            raise RestoreError(f"the TCP connection from {where}: its unsent bytes do not fit in its send buffer "
                               "here") from None
        unsent = unsent[n:]


def _after_repair(fd: int, reuse: bool) -> None:
    """Leaving repair mode clears SO_REUSEADDR (the kernel's sk_reuse serves repair mode too):
    set again where the program had it."""
    if reuse:
        _setsockopt_int(fd, SOL_SOCKET, SO_REUSEADDR, 1)


def _queue(fd: int, queue: int) -> None:
    _setsockopt_int(fd, IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)


def _repair(fd: int, how: int) -> None:
    _setsockopt_int(fd, IPPROTO_TCP, TCP_REPAIR, how)


def _setsockopt_int(fd: int, level: int, name: int, value: int) -> None:
    sock = socket.socket(fileno=fd)
    try:
        sock.setsockopt(level, name, struct.pack("=i", value))
    finally:
        sock.detach()


def _queue_seq(fd: int) -> int:
    """TCP_QUEUE_SEQ of the queue repair mode selected: the sequence number at its end."""
    return int(struct.unpack("=I", _getsockopt(fd, IPPROTO_TCP, TCP_QUEUE_SEQ, 4))[0])


def _repair_window(fd: int) -> tuple[int, ...]:
    """TCP_REPAIR_WINDOW: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup."""
    return tuple(struct.unpack("=5I", _getsockopt(fd, IPPROTO_TCP, TCP_REPAIR_WINDOW, 20)))


def _getsockopt(fd: int, level: int, name: int, size: int) -> bytes:
    sock = socket.socket(fileno=fd)
    try:
        return sock.getsockopt(level, name, size)
    finally:
        sock.detach()


def _ioctl_int(fd: int, request: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(fd, request, b"\0" * 4))[0])


def _peek(fd: int, size: int) -> bytes:
    """The first ``size`` bytes of the queue repair mode selected (MSG_PEEK: left there)."""
    if size <= 0:
        return b""
    sock = socket.socket(fileno=fd)
    try:
        return sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    finally:
        sock.detach()


RECV_QUEUE_TRIES = 100


def _slices(data: bytes) -> tuple[bytes, ...]:
    return tuple(data[i:i + MAX_BYTES] for i in range(0, len(data), MAX_BYTES))


def read_connections(dups: dict[int, int]) -> dict[int, TcpConnection]:
    """Established connections between sockets of the job (inode -> a dup of the socket), read
    in repair mode in the order the module docstring gives; each socket leaves repair mode
    once all are read.

    What a send queue holds beyond what its peer's receive queue took (the peer's next
    expected byte, read after it) goes back as not sent: restored, it is written once the
    connection is out of repair mode, and goes at once. Restored as sent, it would wait for
    a retransmission timer that backs off from one second on (bytes sent while the peer's
    window is closed are dropped), and a full queue could take a minute to arrive."""
    fds = list(dups.values())
    entered: list[int] = []
    reuse = {fd: struct.unpack("=i", _getsockopt(fd, SOL_SOCKET, SO_REUSEADDR, 4))[0] != 0 for fd in fds}
    try:
        for fd in fds:
            _repair(fd, TCP_REPAIR_ON)
            entered.append(fd)
        sends: dict[int, tuple[int, bytes, int]] = {}
        for ino, fd in dups.items():
            not_sent = _ioctl_int(fd, SIOCOUTQNSD)       # before the queue: what was sent only grows
            _queue(fd, TCP_SEND_QUEUE)
            write_seq = _queue_seq(fd)
            data = _peek(fd, _ioctl_int(fd, SIOCOUTQ))
            sends[ino] = ((write_seq - len(data)) & 0xFFFFFFFF, data, min(len(data), not_sent))
        # The receive queue, its end and the window as one reading: a segment still arriving
        # moves all three (repair mode stops sending, not receiving), and a window read after
        # it against a queue read before can say a segment was taken that the queue lacks
        # (TCP_REPAIR_WINDOW then refuses the restore with EINVAL). Read until two agree.
        receives: dict[int, tuple[int, bytes, tuple[int, ...]]] = {}
        for ino, fd in dups.items():
            _queue(fd, TCP_RECV_QUEUE)
            for _ in range(RECV_QUEUE_TRIES):
                before = _ioctl_int(fd, SIOCINQ)
                window, rcv_nxt = _repair_window(fd), _queue_seq(fd)
                data = _peek(fd, before)
                if before == len(data) == _ioctl_int(fd, SIOCINQ) and (window, rcv_nxt) == (_repair_window(fd),
                                                                                         _queue_seq(fd)):
                    break
            else:
                raise UnsupportedResource("a TCP connection's receive queue kept growing while its process was "
                                          "frozen: try again")
            _queue(fd, TCP_NO_QUEUE)
            receives[ino] = (rcv_nxt, data, window)
        ends = {ino: endpoints(fd, kind_of(fd)[0]) for ino, fd in dups.items()}
        peer_of = {ino: other for ino, (local, peer) in ends.items()
                   for other, (o_local, o_peer) in ends.items() if (o_local, o_peer) == (peer, local)}
        out: dict[int, TcpConnection] = {}
        for ino, fd in dups.items():
            send_seq, send_data, unsent = sends[ino]
            rcv_nxt, data, window = receives[ino]
            if ino in peer_of:         # what the peer has not received (seq arithmetic mod 2**32)
                got = (receives[peer_of[ino]][0] - send_seq) & 0xFFFFFFFF
                unsent = len(send_data) - got if got <= len(send_data) else unsent
            info = _getsockopt(fd, IPPROTO_TCP, socket.TCP_INFO, 8)
            out[ino] = TcpConnection(
                send_seq=send_seq, recv_seq=(rcv_nxt - len(data)) & 0xFFFFFFFF, send_queue=_slices(send_data),
                unsent=unsent, recv_queue=_slices(data),
                mss=struct.unpack("=i", _getsockopt(fd, IPPROTO_TCP, TCP_MAXSEG, 4))[0],
                options=info[5] & 0xF, snd_wscale=info[6] & 0xF, rcv_wscale=info[6] >> 4,
                timestamp=struct.unpack("=I", _getsockopt(fd, IPPROTO_TCP, TCP_TIMESTAMP, 4))[0],
                snd_wl1=window[0], snd_wnd=window[1], max_window=window[2], rcv_wnd=window[3], rcv_wup=window[4])
        return out
    finally:
        for fd in entered:
            _queue(fd, TCP_NO_QUEUE)
            _repair(fd, TCP_REPAIR_OFF_NO_WP)
            _after_repair(fd, reuse[fd])


def silence(fd: int) -> None:
    """Put a connection (of a job that is about to end) in repair mode: closed, it sends
    nothing, and leaves no TIME_WAIT behind on the 4-tuple a restore makes again."""
    _repair(fd, TCP_REPAIR_ON)


def _set(sock: socket.socket, o: InetOption) -> None:
    value = o.value
    name = o.name
    if o.level == SOL_SOCKET and name in (SO_SNDBUF, SO_RCVBUF):
        # getsockopt shows the size doubled; the *FORCE forms pass net.core.[rw]mem_max
        name = SO_SNDBUFFORCE if name == SO_SNDBUF else SO_RCVBUFFORCE
        value = struct.pack("i", struct.unpack("i", value)[0] // 2)
    try:
        sock.setsockopt(o.level, name, value)
    except OSError as exc:
        raise RestoreError(f"a {_proto(sock.proto)} socket's option {o.level}/{o.name} cannot be set here: "
                           f"{exc.strerror}") from None


def _sockaddr(family: int, address: bytes, port: int, scope: int) -> tuple:
    ip = socket.inet_ntop(family, address)
    return (ip, port, 0, scope) if family == AF_INET6 else (ip, port)


def _bind_error(s: InetSocket, where: str, exc: OSError, job: Collection[int] = ()) -> str:
    proto = _proto(s.protocol)
    if exc.errno == errno.EADDRINUSE:
        pid, comm = port_holder(s.family, s.protocol, s.port)
        if pid in job:
            return (f"{proto} {where} is held here by pid {pid} ({comm}), the job itself: source and destination "
                    "share one network namespace, so its sockets cannot be bound twice; move it to another host "
                    "or network namespace")
        by = f" by pid {pid} ({comm})" if pid else ""
        return f"{proto} {where} is in use on this host{by}: free it, or restore where the port is free"
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"{proto} {where}: this host has no such address; the job's socket was bound to it on the "
                "source (bind to 0.0.0.0 or :: to move freely)")
    return f"{proto} socket bound to {where}: {exc.strerror} here"


def check_bindable(sockets: Iterable[InetSocket], job: Collection[int] = ()) -> None:
    """Preflight on the destination: each bound socket could be bound here now (a socket made
    and closed again), else RestoreError naming the address (``job``: the job's pids, which
    hold them where source and destination are one network namespace)."""
    for s in sockets:
        if s.connection:
            _check_connectable(s, job)
        elif s.address:
            make(InetSocket(id=s.id, family=s.family, type=s.type, protocol=s.protocol, address=s.address,
                            port=s.port, scope_id=s.scope_id,
                            options=tuple(o for o in s.options if (o.level, o.name) in _BEFORE_BIND)), job).close()


def _check_connectable(s: InetSocket, job: Collection[int]) -> None:
    """A connection's 4-tuple is free here: made in repair mode (no packet leaves), then
    closed in it (none either)."""
    sock = socket.socket(s.family, s.type, s.protocol)
    try:
        _repair(sock.fileno(), TCP_REPAIR_ON)
        where = f"{shown(s.family, s.address, s.port)} to {shown(s.family, s.peer_address, s.peer_port)}"
        try:
            sock.bind(_sockaddr(s.family, s.address, s.port, s.scope_id))
            sock.connect(_sockaddr(s.family, s.peer_address, s.peer_port, s.scope_id))
        except OSError as exc:
            pid, comm = port_holder(s.family, s.protocol, s.port)
            if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL) and pid in job:
                raise RestoreError(f"the TCP connection from {where} is held here by pid {pid} ({comm}), the job "
                                   "itself: source and destination share one network namespace, so it cannot be "
                                   "made twice; move it to another host or network namespace") from None
            raise RestoreError(f"the TCP connection from {where} cannot be made here: {exc.strerror}") from None
    finally:
        sock.close()


# What a preflight summary says of a connection: that it is one (its queues stay home).
SUMMARY_CONNECTION = TcpConnection(send_seq=0, recv_seq=0, send_queue=(), unsent=0, recv_queue=(), mss=0,
                                   options=0, snd_wscale=0, rcv_wscale=0, timestamp=0, snd_wl1=0, snd_wnd=0,
                                   max_window=0, rcv_wnd=0, rcv_wup=0)


def port_holder(family: int, protocol: int, port: int) -> tuple[int, str]:
    """Who holds a socket bound to ``port`` here (pid, command), read from /proc/net and every
    process's fds; (0, "") if none is found (a socket in the kernel's hands only)."""
    table = {(AF_INET, IPPROTO_TCP): "tcp", (AF_INET, IPPROTO_UDP): "udp",
             (AF_INET6, IPPROTO_TCP): "tcp6", (AF_INET6, IPPROTO_UDP): "udp6"}[family, protocol]
    inodes: set[str] = set()
    try:
        with open(f"/proc/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and int(fields[1].rsplit(":", 1)[1], 16) == port and fields[9] != "0":
                    inodes.add(f"socket:[{fields[9]}]")
    except (OSError, ValueError):
        return 0, ""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                if os.readlink(fd.path) in inodes:
                    with open(f"/proc/{entry.name}/comm") as c:
                        return int(entry.name), c.read().strip()
        except OSError:
            continue
    return 0, ""
