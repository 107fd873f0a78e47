"""TCP and UDP sockets: which ones a job may take along, what they are, and making them again.

Carried: a TCP socket that has no connection (new, bound, or listening with nothing waiting
in its accept queue) and a UDP socket with nothing queued, over IPv4 or IPv6: its address
and port, a listener's backlog, a UDP socket's peer, and each option of ``INET_OPTIONS`` the
program changed from what a new socket of its kind has here (only those: setting a buffer
size, for one, turns the kernel's tuning of it off). Made again on the destination in the
agent's network namespace (the job's: ``agent.procfs`` refuses others), bound to the same
address and port. Refused, before anything is frozen, with a line naming it: a TCP connection
in any state (its sequence numbers, queues and peer are not carried; the peer is named), a
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
"""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Collection, Iterable

from transport.errors import RestoreError, UnsupportedResource
from transport.schema import (AF_INET, AF_INET6, INET_OPTIONS, IPPROTO_TCP, IPPROTO_UDP, SOCK_DGRAM, SOCK_STREAM,
                              SOL_SOCKET, InetOption, InetSocket)

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
TCP_CLOSE, TCP_LISTEN = 7, 10
SO_DOMAIN, SO_PROTOCOL, SO_GET_FILTER = 39, 38, 26
SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE = 7, 8, 32, 33
SO_REUSEADDR, SO_REUSEPORT, SO_BINDTODEVICE = 2, 15, 25
IPV6_V6ONLY = 26
_libc = ctypes.CDLL(None, use_errno=True)
_BEFORE_BIND = {(SOL_SOCKET, SO_REUSEADDR), (SOL_SOCKET, SO_REUSEPORT), (SOL_SOCKET, SO_BINDTODEVICE),
                (41, IPV6_V6ONLY), (0, 15), (0, 19), (0, 24), (41, 78), (41, 75)}   # and the free/transparent binds


@dataclass(frozen=True)
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


def check(pid: int, fd: int, dup: int, kind: tuple[int, int, int], info: DiagInfo | None) -> None:
    """Refuse what ``record`` could not carry, naming it: UnsupportedResource."""
    family, _type, protocol = kind
    what = f"pid {pid}'s fd {fd} is {'a TCP' if protocol == IPPROTO_TCP else 'a UDP'} socket ({_family(family)})"
    sock = socket.socket(fileno=dup)
    try:
        local = _unpack(family, sock.getsockname())
        try:
            peer: tuple[bytes, int, int] | None = _unpack(family, sock.getpeername())
        except OSError:
            peer = None
        filtered = filter_length(dup)
    finally:
        sock.detach()
    here = shown(family, *local[:2]) if local[1] or any(local[0]) else "(unbound)"
    if info is None:
        if local[1] or any(local[0]):
            # sock_diag shows every socket with a port but one whose connection has ended
            raise UnsupportedResource(f"{what}: a connection from {here} that has ended (its next call may report "
                                      "why): kcr-migrate cannot move it; close it first", pid=pid)
        return                    # never bound: sock_diag shows none such
    if filtered:
        raise UnsupportedResource(f"{what} on {here} has a BPF filter attached (SO_ATTACH_FILTER): "
                                  "kcr-migrate cannot move it", pid=pid)
    if protocol == IPPROTO_TCP:
        if info.state == TCP_LISTEN and info.rqueue:
            raise UnsupportedResource(
                f"{what} listening on {here} has {info.rqueue} connection{'s' if info.rqueue > 1 else ''} waiting to "
                "be accepted, which cannot move: migrate once the server has accepted them", pid=pid)
        if info.state not in (TCP_CLOSE, TCP_LISTEN):
            to = f" to {shown(family, *peer[:2])}" if peer else ""
            raise UnsupportedResource(
                f"{what}: a connection from {here}{to} ({TCP_STATES.get(info.state, info.state)}): kcr-migrate moves "
                "TCP listeners and unconnected sockets, not connections; close it first", pid=pid)
        if info.state == TCP_CLOSE and info.shutdown:
            raise UnsupportedResource(f"{what}: a connection from {here} that has ended (its next call may report "
                                      "why): kcr-migrate cannot move it; close it first", pid=pid)
    elif info.rqueue:
        raise UnsupportedResource(f"{what} on {here} has datagrams queued ({info.rqueue} bytes in the kernel): "
                                  "they cannot be queued again from their senders; migrate once the program "
                                  "has read them", pid=pid)


def filter_length(fd: int) -> int:
    """The instructions of the classic BPF filter attached to the socket ``fd`` (0: none).
    SO_GET_FILTER takes its length in instructions, not bytes, so it is asked with a length
    of 0 (which only counts them): through libc, since Python's getsockopt sends a buffer."""
    length = ctypes.c_uint32(0)
    if _libc.getsockopt(fd, SOL_SOCKET, SO_GET_FILTER, None, ctypes.byref(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"getsockopt(SO_GET_FILTER): {os.strerror(err)}")
    return length.value


def record(ino: int, dup: int, kind: tuple[int, int, int], info: DiagInfo | None) -> InetSocket:
    """The socket ``dup`` (checked by ``check``) as the image carries it; ``info`` None: one
    never bound (sock_diag shows none such)."""
    family, type_, protocol = kind
    sock = socket.socket(fileno=dup)
    try:
        address, port, scope = _unpack(family, sock.getsockname())
        if not port and not any(address):
            address = b""              # never bound
        peer, peer_port = b"", 0
        if type_ == SOCK_DGRAM:
            try:
                peer, peer_port, _ = _unpack(family, sock.getpeername())
            except OSError:
                pass
            else:
                # connect gave it the local address its route chose (or the one it was bound
                # to): bound to its port on every address, then connected, the destination's
                # route chooses again, as the source's did
                address = bytes(len(address))
        options = _changed_options(sock, kind)
    finally:
        sock.detach()
    listening = protocol == IPPROTO_TCP and info is not None and info.state == TCP_LISTEN
    return InetSocket(id=ino, family=family, type=type_, protocol=protocol, address=address, port=port,
                      scope_id=scope, peer_address=peer, peer_port=peer_port,
                      backlog=info.wqueue if listening and info is not None else -1, options=options)


def _options_for(kind: tuple[int, int, int]) -> list[tuple[int, int]]:
    family, _type, protocol = kind
    level_ok = {SOL_SOCKET, protocol, 0 if family == AF_INET else 41}
    return [key for key in INET_OPTIONS if key[0] in level_ok]


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


def _changed_options(sock: socket.socket, kind: tuple[int, int, int]) -> tuple[InetOption, ...]:
    """The options whose values differ from a new socket's of the same kind, made here."""
    out: list[InetOption] = []
    with socket.socket(*kind) as fresh:
        for level, name in _options_for(kind):
            value = _read_option(sock, level, name)
            if value is not None and value != _read_option(fresh, level, name) and (value or INET_OPTIONS[level, name]):
                out.append(InetOption(level, name, value))
    return tuple(out)


def make(s: InetSocket, job: Collection[int] = ()) -> socket.socket:
    """``s`` made again here: its options, its address, listening or connected. RestoreError
    naming the address where this host cannot give it (taken, or not one of its addresses;
    ``job``: the pids of the job, when it is still running here)."""
    sock = socket.socket(s.family, s.type, s.protocol)
    try:
        later = []
        for o in s.options:               # what changes how bind behaves, first
            if (o.level, o.name) in _BEFORE_BIND:
                _set(sock, o)
            else:
                later.append(o)
        if s.address:
            where = shown(s.family, s.address, s.port)
            try:
                sock.bind(_sockaddr(s.family, s.address, s.port, s.scope_id))
            except OSError as exc:
                raise RestoreError(_bind_error(s, where, exc, job)) from None
        if s.backlog >= 0:
            sock.listen(s.backlog)
        if s.peer_address:
            sock.connect(_sockaddr(s.family, s.peer_address, s.peer_port, s.scope_id))
        for o in later:
            _set(sock, o)
    except BaseException:
        sock.close()
        raise
    return sock


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
        if s.address:
            make(InetSocket(id=s.id, family=s.family, type=s.type, protocol=s.protocol, address=s.address,
                            port=s.port, scope_id=s.scope_id,
                            options=tuple(o for o in s.options if (o.level, o.name) in _BEFORE_BIND)), job).close()


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
