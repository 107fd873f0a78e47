"""Unix-domain sockets: what the kernel knows about them, and what is queued in them.

Three readers, none of which changes the socket:

- ``query`` asks NETLINK_SOCK_DIAG for every unix socket of the caller's network namespace
  (one dump) and returns a ``UnixSocketInfo`` per inode: type, state, bound name, the bound
  path's inode, the peer's inode, a listener's pending connections, queue sizes, shutdown.
- ``queued_messages`` / ``queued_data`` read what waits in a socket's receive queue with
  ``MSG_PEEK`` walked by ``SO_PEEK_OFF``, from a dup the agent took with ``pidfd_getfd``.
- ``socket_options`` reads the ``SOL_SOCKET`` options a restore sets again.

Kernel facts these rely on, checked on 6.18 (tests/test_unix_sockets.py checks them again):

- UNIX_DIAG_SHUTDOWN is always sent, whatever ``udiag_show`` asks for. UNIX_DIAG_VFS's device
  is the kernel's internal ``dev_t`` (major << 20 | minor), turned here into ``st_dev`` form.
- UNIX_DIAG_RQLEN (and ``FIONREAD``): for a listener, the number of pending connections and
  the backlog; for SOCK_STREAM and SOCK_SEQPACKET, the bytes of every queued message; for
  SOCK_DGRAM, the length of the first message only. ``wqueue`` is the send buffer memory in
  use (skb truesize), not bytes.
- A listener's UNIX_DIAG_ICONS are the inodes of the connecting clients. Until ``accept``, a
  client is ESTABLISHED with peer 0 (its peer is the embryo socket, which has no inode yet);
  after it, client and accepted socket name each other. When one end of a stream pair closes,
  the other reports peer 0 and shutdown 3 (both directions).
- ``query`` sees the sockets of the network namespace the netlink socket is made in, that of
  the calling thread: an agent outside the target's namespace does not find its sockets.
- ``SO_PEEK_OFF`` works on all three types. On datagrams it steps a message at a time. Its
  value belongs to the socket (so it is shared with the process's fd): it is read first and
  put back after. A zero-length datagram is marked "peeked" by the first ``MSG_PEEK`` that
  returns it, and a later walk with ``SO_PEEK_OFF`` skips a peeked zero-length datagram, so
  an empty datagram that is not first in the queue is invisible to a second walk (or to a
  walk after the process itself peeked it). The head is read with a plain ``MSG_PEEK``,
  which never skips, so only empty datagrams after the first are at risk.
- Peeking a message that carries ``SCM_RIGHTS`` (or ``SCM_PIDFD``) installs copies of those
  fds in the caller; they are closed here at once.
- A pending out-of-band byte (``send(MSG_OOB)`` on SOCK_STREAM) shows up inline in a peek
  walk although a plain ``recv`` skips it; it is found with ``MSG_OOB | MSG_PEEK`` and
  refused, because where it sat cannot be read back.

Unix sockets are charged to the *sender's* send buffer, so the receiver's ``SO_RCVBUF``
does not bound its queue; the default read bound allows for a sender whose ``SO_SNDBUF`` is
at ``net.core.wmem_max`` (doubled, as the kernel does).
"""
from __future__ import annotations

import array
import errno
import fcntl
import os
import select
import socket
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from transport.errors import KernelFeatureMissing, UnsupportedResource
from transport.frozen import frozen

# include/uapi/linux/netlink.h, sock_diag.h, unix_diag.h
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_DUMP = 0x300              # NLM_F_ROOT | NLM_F_MATCH
NLA_TYPE_MASK = 0x3FFF          # ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)

UDIAG_SHOW_NAME = 0x01
UDIAG_SHOW_VFS = 0x02
UDIAG_SHOW_PEER = 0x04
UDIAG_SHOW_ICONS = 0x08
UDIAG_SHOW_RQLEN = 0x10

UNIX_DIAG_NAME = 0
UNIX_DIAG_VFS = 1
UNIX_DIAG_PEER = 2
UNIX_DIAG_ICONS = 3
UNIX_DIAG_RQLEN = 4
UNIX_DIAG_SHUTDOWN = 6

# include/net/tcp_states.h: the states unix sockets use
TCP_ESTABLISHED = 1
TCP_CLOSE = 7
TCP_LISTEN = 10

SOCK_STREAM = 1
SOCK_DGRAM = 2
SOCK_SEQPACKET = 5

# include/uapi/asm-generic/socket.h (x86_64); the newer ones are missing from older headers
SO_OOBINLINE = 10
SO_PASSCRED = 16
SO_RCVLOWAT = 18
SO_RCVTIMEO_OLD = 20
SO_SNDTIMEO_OLD = 21
SO_PASSSEC = 34
SO_PEEK_OFF = 42
SO_PASSPIDFD = 76               # Linux 6.5
SO_PASSRIGHTS = 83              # Linux 6.16
SCM_RIGHTS = 1
SCM_CREDENTIALS = 2
SCM_SECURITY = 3
SCM_PIDFD = 4
SCM_MAX_FD = 253
MSG_CMSG_CLOEXEC = 0x40000000
FIONREAD = 0x541B               # SIOCINQ
SIOCOUTQ = 0x5411

_NLMSGHDR = struct.Struct("=IHHII")          # len, type, flags, seq, pid
_UNIX_DIAG_REQ = struct.Struct("=BBHIII2I")  # family, protocol, pad, states, ino, show, cookie
_UNIX_DIAG_MSG = struct.Struct("=BBBBI2I")   # family, type, state, pad, ino, cookie
_NLATTR = struct.Struct("=HH")               # len, type
_U32 = struct.Struct("=I")
_TIMEVAL = struct.Struct("=qq")

_RECV_BUFFER = 1 << 18          # a dump part is at most 32 KiB, or one socket's record
_ANC_BUFFER = (socket.CMSG_SPACE(SCM_MAX_FD * 4) + socket.CMSG_SPACE(12)
               + socket.CMSG_SPACE(4) + socket.CMSG_SPACE(256))
_STREAM_CHUNK = 1 << 16
_PEEK = socket.MSG_PEEK | MSG_CMSG_CLOEXEC   # fds a peek installs here are close-on-exec


class InFlightAncillary(UnsupportedResource):
    """A queued message carries ancillary data (credentials, a pidfd, a security label)
    that a restore cannot send again as it was."""


class InFlightFds(InFlightAncillary):
    """A queued message carries file descriptors (SCM_RIGHTS): they are in flight, owned by
    no process, and kcr-migrate cannot carry them yet."""


class UnreadableQueue(UnsupportedResource):
    """The receive queue cannot be read back faithfully: an out-of-band byte, more bytes than
    the bound, or fewer bytes read than the kernel counts."""


@frozen
class UnixSocketInfo:
    inode: int
    type: int                   # SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET
    state: int                  # TCP_ESTABLISHED, TCP_CLOSE, TCP_LISTEN, ...
    name: bytes = b""           # the bound path (no trailing NUL), or b"\0" + an abstract name; b""
    vfs: tuple[int, int] | None = None   # (st_dev, st_ino) of the bound path's inode
    peer: int = 0               # the peer socket's inode; 0 if none, and 0 for a client whose
                                # connection is not accepted yet (its peer is an inode-less embryo)
    icons: tuple[int, ...] = ()  # a listener's pending connections: the connecting clients' inodes
    rqueue: int = 0             # see the module docstring for what these count per type
    wqueue: int = 0
    shutdown: int = 0           # sk_shutdown: 1 RCV_SHUTDOWN, 2 SEND_SHUTDOWN

    @property
    def abstract(self) -> bool:
        return self.name[:1] == b"\0"


@frozen
class QueuedMessage:
    data: bytes
    sender: bytes = b""         # the sender's bound name (datagrams); b"" if unbound or stream


# --- query: NETLINK_SOCK_DIAG ------------------------------------------------------------

def query(inodes: Iterable[int] | None = None) -> dict[int, UnixSocketInfo]:
    """The unix sockets of the calling thread's network namespace, by inode; only those in
    ``inodes`` when given (an inode no longer open is simply absent)."""
    wanted = None if inodes is None else set(inodes)
    show = UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN
    seq = 1
    req = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, show, 0xFFFFFFFF, 0xFFFFFFFF)
    hdr = _NLMSGHDR.pack(_NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    out: dict[int, UnixSocketInfo] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(10.0)     # the kernel answers at once; this only stops a hang
        nl.bind((0, 0))
        nl.sendto(hdr + req, (0, 0))
        buf = bytearray(_RECV_BUFFER)
        while True:
            n, _, flags, _ = nl.recvmsg_into([buf])
            if flags & socket.MSG_TRUNC:
                raise OSError(errno.EMSGSIZE, f"sock_diag reply larger than {len(buf)} bytes")
            for info in _parse_part(memoryview(buf)[:n], seq, wanted):
                if info is None:
                    return out
                out[info.inode] = info


def _parse_part(data: memoryview, seq: int, wanted: set[int] | None = None) -> Iterator[UnixSocketInfo | None]:
    """The records in one datagram of the dump (of the sockets ``wanted`` only, when given:
    a host has many more than a job, and the others' attributes are not read); None once
    NLMSG_DONE is seen."""
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            raise OSError(errno.EBADMSG, f"sock_diag message length {length} at {off} of {len(data)}")
        body = data[off + _NLMSGHDR.size: off + length]
        off += _align4(length)
        if mseq != seq or mtype == NLMSG_NOOP:
            continue
        if mtype == NLMSG_DONE:
            yield None
            return
        if mtype == NLMSG_ERROR:
            err = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else errno.EBADMSG
            if err == 0:
                continue        # an ack
            if err in (errno.ENOENT, errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
                raise KernelFeatureMissing(
                    "the kernel cannot report unix sockets (sock_diag for AF_UNIX is missing): "
                    "load it with `modprobe unix_diag`", errno=err)
            raise OSError(err, f"sock_diag dump of unix sockets: {os.strerror(err)}")
        if mtype != SOCK_DIAG_BY_FAMILY:
            continue
        if wanted is not None and len(body) >= _UNIX_DIAG_MSG.size and \
                _UNIX_DIAG_MSG.unpack_from(body)[4] not in wanted:
            continue
        yield _parse_record(body)


def _parse_record(body: memoryview) -> UnixSocketInfo:
    if len(body) < _UNIX_DIAG_MSG.size:
        raise OSError(errno.EBADMSG, f"unix_diag_msg of {len(body)} bytes")
    _family, kind, state, _pad, ino, _c0, _c1 = _UNIX_DIAG_MSG.unpack_from(body)
    name = b""
    vfs: tuple[int, int] | None = None
    peer = rqueue = wqueue = shutdown = 0
    icons: tuple[int, ...] = ()
    off = _UNIX_DIAG_MSG.size
    while off + _NLATTR.size <= len(body):
        alen, atype = _NLATTR.unpack_from(body, off)
        if alen < _NLATTR.size or off + alen > len(body):
            raise OSError(errno.EBADMSG, f"unix_diag attribute length {alen} at {off} of {len(body)}")
        payload = bytes(body[off + _NLATTR.size: off + alen])
        off += _align4(alen)
        atype &= NLA_TYPE_MASK
        if atype == UNIX_DIAG_NAME:
            # a path is stored with its terminating NUL; an abstract name is exact bytes
            name = payload if payload[:1] == b"\0" else payload.split(b"\0", 1)[0]
        elif atype == UNIX_DIAG_VFS and len(payload) >= 8:
            vfs_ino, kdev = struct.unpack_from("=II", payload)     # kernel dev_t: major << 20 | minor
            vfs = (os.makedev(kdev >> 20, kdev & 0xFFFFF), vfs_ino)
        elif atype == UNIX_DIAG_PEER and len(payload) >= 4:
            (peer,) = _U32.unpack_from(payload)
        elif atype == UNIX_DIAG_ICONS:
            icons = tuple(x for (x,) in _U32.iter_unpack(payload[:len(payload) // 4 * 4]))
        elif atype == UNIX_DIAG_RQLEN and len(payload) >= 8:
            rqueue, wqueue = struct.unpack_from("=II", payload)
        elif atype == UNIX_DIAG_SHUTDOWN and len(payload) >= 1:
            shutdown = payload[0]
    return UnixSocketInfo(inode=ino, type=kind, state=state, name=name, vfs=vfs, peer=peer,
                          icons=icons, rqueue=rqueue, wqueue=wqueue, shutdown=shutdown)


def _align4(n: int) -> int:
    return (n + 3) & ~3


# --- queued_messages: the receive queue, without consuming it ---------------------------

def queued_messages(fd: int, kind: int, *, limit: int | None = None) -> list[QueuedMessage]:
    """Everything waiting in the receive queue of the unix socket ``fd``, in order, left in
    place. SOCK_STREAM gives one message holding all queued bytes (none if empty);
    SOCK_DGRAM and SOCK_SEQPACKET give one per message.

    The holders of both ends must be stopped while this runs. ``limit`` bounds the bytes
    read (each message counting at least one); past it, or on a pending out-of-band byte,
    ``UnreadableQueue``. A message with fds raises ``InFlightFds``, with other ancillary
    data (credentials when SO_PASSCRED is on, a pidfd, a label) ``InFlightAncillary``.
    """
    if kind not in (SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET):
        raise ValueError(f"not a unix socket type: {kind}")
    with _borrowed(fd) as sock:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return []           # a listener queues connections (``query``'s icons), not data
        if limit is None:
            limit = 2 * max(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), 2 * _wmem_max())
        saved = sock.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
        try:
            if kind == SOCK_STREAM:
                return _peek_stream(sock, limit)
            return _peek_messages(sock, limit)
        finally:
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, saved)


def queued_data(fd: int, kind: int, *, limit: int | None = None) -> list[bytes]:
    """``queued_messages`` without the senders: the bytes of each queued message."""
    return [m.data for m in queued_messages(fd, kind, limit=limit)]


def _peek_stream(sock: socket.socket, limit: int) -> list[QueuedMessage]:
    try:
        sock.recv(1, socket.MSG_OOB | socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EAGAIN, errno.EOPNOTSUPP, errno.ENOTCONN):
            raise
    else:
        raise UnreadableQueue("an out-of-band byte (MSG_OOB) is pending on a unix stream socket: "
                              "kcr-migrate cannot carry it yet; let the program read it first")
    expected = _inq(sock)
    if expected > limit:
        raise UnreadableQueue(f"{expected} bytes queued on a unix stream socket, more than the "
                              f"{limit}-byte bound: pass a larger limit if this is expected")
    sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    parts: list[bytes] = []
    got = 0
    buf = bytearray(max(1, min(expected, _STREAM_CHUNK)))
    while got < expected:
        try:
            n, anc, flags, _ = sock.recvmsg_into([buf], _ANC_BUFFER, _PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        _refuse_ancillary(anc, flags, len(parts))
        if n == 0:
            break
        parts.append(bytes(buf[:min(n, expected - got)]))
        got += n
    if got < expected:
        raise UnreadableQueue(f"read {got} of the {expected} bytes queued on a unix stream socket")
    data = b"".join(parts)
    return [QueuedMessage(data)] if data else []


def _peek_messages(sock: socket.socket, limit: int) -> list[QueuedMessage]:
    """One message per call: the head with a plain MSG_PEEK (it never skips an empty
    datagram), the rest with SO_PEEK_OFF at the bytes read so far."""
    out: list[QueuedMessage] = []
    offset = 0
    cost = 0
    buf = bytearray(max(1, min(_inq(sock), limit)))
    sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, -1)
    while True:
        try:
            n, anc, flags, addr = sock.recvmsg_into(
                [buf], _ANC_BUFFER, _PEEK | socket.MSG_DONTWAIT | socket.MSG_TRUNC)
        except BlockingIOError:
            return out
        _refuse_ancillary(anc, flags, len(out))
        if n == 0 and sock.type == SOCK_SEQPACKET and _shut_for_reading(sock):
            # Nothing left: a seqpacket socket shut for reading reports its end as a message of
            # no bytes, over and over. (An empty message queued before the shutdown looks the
            # same: where its sender moves too, ``check_hidden_messages`` sees it was missed.)
            return out
        cost += max(n, 1)
        if cost > limit:
            raise UnreadableQueue(f"more than {limit} bytes queued on a unix datagram socket: "
                                  "pass a larger limit if this is expected")
        if n > len(buf):        # MSG_TRUNC gave the real length: read it again, whole
            buf = bytearray(n)
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, offset if out else -1)
            cost -= n
            continue
        out.append(QueuedMessage(bytes(buf[:n]), _address(addr)))
        offset += n
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, offset)



def _shut_for_reading(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    return any(ev & select.POLLRDHUP for _, ev in poller.poll(0))


def _refuse_ancillary(anc: list[tuple[int, int, bytes]], flags: int, index: int) -> None:
    """Close any fd the peek installed here, then refuse a message that had ancillary data."""
    kinds: list[int] = []
    for level, ctype, data in anc:
        kinds.append(ctype)
        if level == socket.SOL_SOCKET and ctype in (SCM_RIGHTS, SCM_PIDFD):
            fds = array.array("i")
            fds.frombytes(data[:len(data) // fds.itemsize * fds.itemsize])
            for received in fds:
                os.close(received)
    if SCM_RIGHTS in kinds:
        raise InFlightFds(f"queued unix socket message {index} carries file descriptors (SCM_RIGHTS): "
                          "kcr-migrate cannot carry fds in flight yet; migrate once the program "
                          "has received them")
    if kinds or flags & socket.MSG_CTRUNC:
        names = {SCM_CREDENTIALS: "credentials (SO_PASSCRED)", SCM_SECURITY: "a security label",
                 SCM_PIDFD: "a pidfd (SO_PASSPIDFD)"}
        what = ", ".join(names.get(k, f"control message {k}") for k in kinds) or "truncated control data"
        raise InFlightAncillary(f"queued unix socket message {index} carries {what}: "
                                "kcr-migrate cannot carry it yet")


def _address(addr: object) -> bytes:
    if isinstance(addr, str):
        return os.fsencode(addr)
    if isinstance(addr, bytes):
        return addr
    return b""


_TRUESIZE: dict[tuple[int, int], int] = {}


def truesize(kind: int, length: int) -> int:
    """The memory a ``length``-byte message of socket type ``kind`` is charged to its sender
    (its skb's truesize, as SIOCOUTQ counts it), measured here once per (type, length)."""
    key = (kind, length)
    if key not in _TRUESIZE:
        a, b = socket.socketpair(socket.AF_UNIX, kind)
        with a, b:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(1 << 16, 2 * length + 4096))
            a.send(bytes(length))
            _TRUESIZE[key] = int(struct.unpack("i", fcntl.ioctl(a.fileno(), SIOCOUTQ, b"\0" * 4))[0])
    return _TRUESIZE[key]


def check_hidden_messages(fd: int, kind: int, queue: list[bytes], peer_wqueue: int) -> None:
    """Refuse a datagram or seqpacket queue that holds more than a peek shows: a zero-length
    message that a peek has seen already (the program's MSG_PEEK, or an earlier move that rolled
    back) is skipped by every later peek. Its sender (the peer, which moves too) is still
    charged for it: more memory charged than the visible messages take means one is hidden."""
    if kind == socket.SOCK_STREAM or not peer_wqueue:
        return
    if peer_wqueue > sum(truesize(kind, len(m)) for m in queue):
        raise UnreadableQueue(
            f"fd {fd} is a unix {'datagram' if kind == socket.SOCK_DGRAM else 'seqpacket'} socket with a message "
            "queued that no peek shows (an empty one, seen by a peek before): kcr-migrate cannot carry it; move "
            "the process when it has read its queue")


def _inq(sock: socket.socket) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), FIONREAD, b"\0" * 4))[0])


def _wmem_max() -> int:
    try:
        with open("/proc/sys/net/core/wmem_max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 212992           # the kernel's default


@contextmanager
def _borrowed(fd: int) -> Iterator[socket.socket]:
    """A socket object over ``fd`` that neither closes it nor changes its file status flags
    (they belong to the open file, shared with the process whose fd this is a dup of)."""
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()
        if fcntl.fcntl(fd, fcntl.F_GETFL) != fl:
            fcntl.fcntl(fd, fcntl.F_SETFL, fl)


def accept(fd: int) -> tuple[int, bytes]:
    """(an fd of the next connection waiting on the listener ``fd``, close-on-exec, its
    client's name), without changing the listener's file status flags. BlockingIOError when
    none waits."""
    with _borrowed(fd) as sock:
        conn, addr = sock._accept()      # type: ignore[attr-defined]   # the fd, not a socket object
    fcntl.fcntl(conn, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
    return conn, _address(addr)


# --- socket_options -------------------------------------------------------------------------

_INT_OPTIONS = {
    "SO_RCVBUF": socket.SO_RCVBUF,      # as getsockopt shows it: doubled; set half, or use *FORCE
    "SO_SNDBUF": socket.SO_SNDBUF,
    "SO_PASSCRED": SO_PASSCRED,
    "SO_PASSSEC": SO_PASSSEC,
    "SO_PASSPIDFD": SO_PASSPIDFD,
    "SO_PASSRIGHTS": SO_PASSRIGHTS,
    "SO_PEEK_OFF": SO_PEEK_OFF,         # -1: off
    "SO_RCVLOWAT": SO_RCVLOWAT,
    "SO_OOBINLINE": SO_OOBINLINE,
}


_UCRED = struct.Struct("<iII")


def peer_credentials(fd: int) -> tuple[int, int, int]:
    """SO_PEERCRED of a unix socket: (pid, effective uid, effective gid) of whoever made the
    pair or the other end of its connection, as this process's pid namespace numbers them;
    (0, 0, 0) for none (never connected)."""
    with _borrowed(fd) as sock:
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return (pid, uid, gid) if pid > 0 else (0, 0, 0)


def socket_options(fd: int) -> dict[str, int]:
    """The SOL_SOCKET options of a unix socket that a restore sets again, by name; timeouts
    in microseconds (0: none; the kernel keeps them in jiffies, so they read back rounded).
    An option this kernel does not know is left out. File status flags (O_NONBLOCK, ...)
    are not here: /proc/PID/fdinfo has them."""
    out: dict[str, int] = {}
    with _borrowed(fd) as sock:
        for name, opt in _INT_OPTIONS.items():
            try:
                out[name] = sock.getsockopt(socket.SOL_SOCKET, opt)
            except OSError as exc:
                if exc.errno != errno.ENOPROTOOPT:
                    raise
        for name, opt in (("SO_RCVTIMEO", SO_RCVTIMEO_OLD), ("SO_SNDTIMEO", SO_SNDTIMEO_OLD)):
            sec, usec = _TIMEVAL.unpack(sock.getsockopt(socket.SOL_SOCKET, opt, _TIMEVAL.size))
            out[name] = sec * 1_000_000 + usec
    return out
