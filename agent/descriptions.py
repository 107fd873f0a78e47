"""The open file descriptions a restore hands to the processes it rebuilds.

The restorer makes every description itself, in its own process: files opened with their
flags and offsets, pipes holding their bytes again, unix socketpairs holding their messages,
with their options and shutdown state; named unix sockets bound again at their names
(``agent.unix_names``), listening, connected to and accepted from, so that each end keeps
its addresses. A restored process then takes the descriptions its
fds refer to with injected ``pidfd_open`` + ``pidfd_getfd`` and ``dup3``s each into place
(``agent.restore``). One description serves every fd that shared it, in one process or in
several: one offset, one set of status flags, as before. Pipes and sockets whose ends are
in different processes are whole here before any process takes its end.

A FIFO's pipe is the FIFO at its path here (made if missing, with the source's permissions
and owner): opened without blocking, which makes its pipe, then filled; each description the
processes take is a new open of that FIFO with its own flags, so a program that opens the
path again later reaches the same pipe. Ours is read-write, so that no open waits, except
for a FIFO no fd of the job writes: there a reader only, so that each reader's POLLHUP is as
it was (a reader waiting for its first writer has none). From a host to itself, the FIFO is
the very pipe the frozen source holds: its bytes are there already, and are not written again.

An epoll instance is made here empty: its watches name fds of the process, so the process
registers them itself once its fds are in place (``take_watches``).

Made here rather than inside the restored process, the descriptions need no injected call
to create or fill, and no end has to be kept open in one process until another takes it.
The cost: a restored connection's SO_PEERCRED names the restorer; a socketpair is made in
the process that made it (``agent.peercred``) and taken from there, so that it names that
process with its ids as before.

Made here, but never with the restorer's rights (``agent.as_target``): each file an fd
names is opened as the process the fd belongs to, without following symbolic links; what the
job shares and this module makes at a path or by a path (FIFOs, socket names, deleted files
made again, inotify watches) is made as the job (``identity``: its first process), owned by it
unless the job may give it the owner the image records.
"""
from __future__ import annotations


import ctypes
import errno
import fcntl
import os
import socket
import stat
import struct
import tempfile
import time
from collections import Counter
from typing import TYPE_CHECKING, Sequence

from agent import fanotify, inet_sockets, inotify, socket_filter, unix_names
from agent.peercred import Sockets
from agent.as_target import Identity
from agent.carried_files import set_times, write_sparse
from agent.fdtable import peek_pipe
from transport.errors import RestoreError
from transport.schema import (
    EVENT_KINDS,
    EpollWatch,
    EventFile,
    EventFiles,
    InetSockets,
    FileContents,
    FileDesc,
    Files,
    PipeBuffer,
    Pipes,
    SocketOptions,
    UnixSocket,
    UnixSockets,
)

if TYPE_CHECKING:
    from agent.fdtable import FdState

O_ACCMODE = 3
O_TMPFILE = os.O_TMPFILE      # with O_DIRECTORY in it, as the kernel defines it
O_PATH = 0o10000000
O_PATH_FLAGS = O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW     # what O_PATH may come with (fs/open.c)
# Status flags F_SETFL sets: O_APPEND, O_ASYNC, O_DIRECT, O_NOATIME, O_NONBLOCK.
SETFL_FLAGS = os.O_APPEND | 0o20000 | os.O_DIRECT | os.O_NOATIME | os.O_NONBLOCK
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
SO_PASSSEC, SO_PEEK_OFF, SO_PASSPIDFD, SO_PASSRIGHTS = 34, 42, 76, 83
SO_RCVTIMEO_OLD, SO_SNDTIMEO_OLD = 20, 21
SHUTDOWN_HOW = {1: socket.SHUT_RD, 2: socket.SHUT_WR, 3: socket.SHUT_RDWR}
TFD_IOC_SET_TICKS = 0x40085400           # _IOW('T', 0, u64)
TFD_TIMER_ABSTIME = 1
EFD_SEMAPHORE = 1
_libc = ctypes.CDLL(None, use_errno=True)


class _timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _timespec), ("it_value", _timespec)]

Key = tuple[object, ...]


class Descriptions:
    """Every open file description of an image, made on first use; ``close`` drops ours.
    ``made``: where the paths of files made here (FIFOs) are listed, for a restore that is
    abandoned to remove (``SharedObjects.made_files``). ``identity``: whom what the job shares
    is made and opened as (``agent.as_target``). ``deleted``: the deleted files (and memfds)
    the restore made as their contents arrived, its to close."""

    def __init__(self, names: unix_names.Names | None = None, made: list[str] | None = None, *,
                 identity: Identity, pairs: Sockets | None = None, deleted: "DeletedFiles | None" = None) -> None:
        self.identity = identity
        # The deleted files made as their slices arrived; else made here, from their slices.
        self.deleted = deleted if deleted is not None else DeletedFiles()
        self._own_deleted = deleted is None
        self.pairs = pairs          # sockets made as the processes that made them (``agent.peercred``)
        self.names = names if names is not None else unix_names.Names()   # the socket names bound
        self.made = made if made is not None else []
        self._fds: dict[Key, int] = {}
        self._pipes: dict[int, tuple[int, int]] = {}          # pipe id -> (read end, write end)
        self._unwritten: set[int] = set()                     # FIFOs held here by a reader only
        self._sockets: dict[int, socket.socket] = {}          # socket id -> its socket
        self._events: dict[int, int] = {}                     # event file id -> its fd
        self._watches: dict[int, tuple[EpollWatch, ...]] = {}   # epoll id -> watches not registered yet
        self._deleted: dict[int, int] = {}                    # deleted file id -> an fd of it made again
        self._memfd_own: set[int] = set()       # memfds whose first description is memfd_create's own
        self._seal_later: dict[int, tuple[int, str]] = {}     # an fd of a memfd -> (seals, its name)
        self._taken: set[int] = set()                         # object fds a description already is
        self._mine: list[int] = []                            # fds to close

    # -- the objects: pipes, sockets, event files, whole -------------------------------------

    def add(self, fds: FdState) -> None:
        written = {f.obj for f in fds.files.fds if f.kind == "fifo" and f.flags & O_ACCMODE != os.O_RDONLY}
        self.add_pipes(fds.pipes, written)
        with self.identity.acting():       # binds and connects to socket paths: the job's rights
            self.add_sockets(fds.sockets)
        self.add_inet(fds.inet)
        self.add_events(fds.events)
        self.add_deleted(fds.files, fds.contents)

    def add_deleted(self, files: Files, contents: Sequence[FileContents]) -> None:
        """Each deleted file made again, unlinked (``DeletedFiles``): those the restore wrote as
        their slices arrived (``deleted``), the others from their slices here; then a memfd's
        seals, once its contents are in."""
        made = self.deleted
        for c in sorted((c for c in contents if not c.path), key=lambda c: (c.id, c.offset)):
            if c.id in self._deleted:
                raise RestoreError(f"deleted file {c.id} appears twice in the image: corrupt image")
            if c.data or c.id not in made.fds:
                made.write(c, files, self.identity)
        for c in contents:
            if not c.path:
                self._deleted[c.id] = made.fds[c.id]
        for ino, wanted in made.seals.items():
            fd, name = made.fds[ino], made.names[ino]
            if fd in self._seal_later or not wanted:
                continue
            # F_SEAL_WRITE before the file is mapped (so read-only mappings of it may not be made
            # writable, as on the source); F_SEAL_FUTURE_WRITE, which leaves writable mappings
            # made before it, and F_SEAL_SEAL after (``seal``).
            _add_seals(fd, wanted & ~(F_SEAL_FUTURE_WRITE | F_SEAL_SEAL), name)
            if wanted & (F_SEAL_FUTURE_WRITE | F_SEAL_SEAL):
                self._seal_later[fd] = (wanted, name)

    def seal(self) -> None:
        """The memfds' last seals, once every process maps what it maps of them."""
        for fd, (wanted, name) in self._seal_later.items():
            _add_seals(fd, wanted, name)
        self._seal_later.clear()

    def deleted_file(self, ino: int) -> int | None:
        """An fd of the deleted file (memfd) ``ino`` made again, if the image carries it."""
        return self._deleted.get(ino)

    def add_inet(self, sockets: InetSockets) -> None:
        """TCP and UDP sockets, bound, listening or connected again (``agent.inet_sockets``): as
        root, which binds a port below 1024 the process bound before it dropped the right to."""
        ports = Counter((s.protocol, s.port) for s in sockets.sockets if s.address and not s.connection)
        # Listeners before connections: one accepted from a listener shares its port, which
        # the connection's bind in repair mode may take beside the listener, not before it.
        for s in sorted(sockets.sockets, key=lambda s: bool(s.connection)):
            if s.id in self._sockets:
                raise RestoreError(f"socket {s.id} appears twice in the image: corrupt image")
            self._sockets[s.id] = inet_sockets.make(s, shared_port=ports[s.protocol, s.port] > 1)
        for s in sockets.sockets:          # connections: both ends are there now
            inet_sockets.release(self._sockets[s.id], s)
        made = [self._sockets[s.id] for s in sockets.sockets]
        for s in sockets.sockets:          # and every UDP socket a queued datagram may come from
            inet_sockets.requeue(self._sockets[s.id], s, made)
        for s in sockets.sockets:          # once what they had accepted is back
            socket_filter.attach(self._sockets[s.id], s.bpf_filter, s.filter_locked)

    def add_events(self, events: EventFiles) -> None:
        for e in events.files:
            if e.id in self._events:
                raise RestoreError(f"event file {e.id} appears twice in the image: corrupt image")
            with self.identity.acting():         # inotify watches: paths the job may read
                fd = self._events[e.id] = _make_event_file(e)
            self._mine.append(fd)
            if e.watches:
                self._watches[e.id] = e.watches

    def take_watches(self, f: FileDesc) -> tuple[EpollWatch, ...]:
        """The watches of the epoll instance ``f`` refers to, once: the first process that
        takes it registers them."""
        return self._watches.pop(f.obj, ()) if f.kind == "epoll" else ()

    def add_pipes(self, pipes: Pipes, written: set[int] | None = None) -> None:
        """``written``: the FIFOs some fd of the job writes (None: all). One that none writes
        is held here by a reader only, so that its readers' POLLHUP is as it was (see
        ``_make``) and, from a host to itself, the source's pipe sees no writer come and go."""
        for p in pipes.pipes:
            if p.id in self._pipes:
                raise RestoreError(f"pipe {p.id} appears twice in the image: corrupt image")
            if p.path:
                unwritten = written is not None and p.id not in written
                r = w = _open_fifo(p, os.O_RDONLY if unwritten else os.O_RDWR, self.made, self.identity)
                self._mine.append(r)
                if unwritten:
                    self._unwritten.add(p.id)
            else:
                r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                self._mine += [r, w]
            self._pipes[p.id] = (r, w)
            data = p.data
            if p.path and peek_pipe(r)[0]:
                # Bytes in it already: on the source's host, the FIFO is the very pipe the
                # frozen source holds, bytes and all; anything else is another program's.
                if peek_pipe(r)[1] != p.data:
                    raise RestoreError(f"the FIFO {p.path} is open here with other bytes in it: a process on this "
                                       "host uses it; stop it, or restore where that path is free")
                data = b""
            try:
                if fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) != p.size:
                    fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, p.size)
                if data and p.id in self._unwritten:
                    w = os.open(f"/proc/self/fd/{r}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                    try:
                        _fill_pipe(w, data, p.packets)
                    finally:
                        os.close(w)
                elif data:
                    _fill_pipe(w, data, p.packets)
            except BlockingIOError:
                raise RestoreError("a pipe's bytes do not fit in its capacity: corrupt image") from None
            except OSError as exc:
                raise RestoreError(f"cannot make a pipe of {p.size} bytes here: {exc.strerror}") from None

    def add_sockets(self, sockets: UnixSockets) -> None:
        """A socket and its peer are one socketpair; a socket whose peer has closed, one end of
        a socketpair whose other end is closed once it has sent the queued messages; one never
        connected, a plain socket. Named ones are bound again (``agent.unix_names``) and
        listeners listen; a connection accepted from a listener is made by connecting to it
        and accepting, so that both ends have their names (one whose client has closed, from
        a client of ours closed once it has sent the queued bytes); the clients waiting in an accept
        queue connect last, in order. Then the queues (a named datagram socket's from each
        message's sender), the one-way datagram connections, the options, the shutdown state."""
        by_id = {s.id: s for s in sockets.sockets}
        senders: dict[int, socket.socket] = {}
        doomed: list[socket.socket] = []
        connections: list[UnixSocket] = []      # accepted ends whose client moves too
        orphans: list[UnixSocket] = []          # accepted ends whose client has closed
        made = self._pairs(sockets, by_id)
        for s in sockets.sockets:
            if s.id in self._sockets:
                continue
            if s.accepted and not s.peer:
                orphans.append(s)
                continue
            if s.accepted or (s.peer and by_id.get(s.peer, s).accepted):
                connections.append(s if s.accepted else by_id[s.peer])
                continue
            if s.peer or s.peer_closed:
                a, b = made[s.id] if s.id in made else socket.socketpair(socket.AF_UNIX, s.type)
                self._sockets[s.id], senders[s.id] = a, b
                if s.peer:
                    if s.peer not in by_id:
                        raise RestoreError(f"socket {s.id}'s peer {s.peer} is missing: corrupt image")
                    self._sockets[s.peer], senders[s.peer] = b, a
                else:
                    doomed.append(b)
            else:
                self._sockets[s.id] = socket.socket(socket.AF_UNIX, s.type)
        clients = {server.peer for server in connections}
        for s in sockets.sockets:
            if s.name and not s.accepted and s.id not in clients:
                self._bind(self._sockets[s.id], s)
            if s.backlog >= 0:
                if self.pairs is not None:
                    self.pairs.listen(self._sockets[s.id], s)
                else:
                    self._sockets[s.id].listen(s.backlog)
        for server in connections:
            client = by_id[server.peer]
            self._sockets[client.id] = sock = socket.socket(socket.AF_UNIX, client.type)
            if client.name:
                self._bind(sock, client)
            listener = self._sockets[server.listener]
            if self.pairs is not None:
                self.pairs.connect(sock, client, server, self.names.reach(server.listener, server.name))
            else:
                sock.connect(self.names.reach(server.listener, server.name))
            self._sockets[server.id], _ = listener.accept()
            senders[server.id], senders[client.id] = sock, self._sockets[server.id]
        for server in orphans:
            # Accepted from a client of ours that sends what was queued, then closes.
            gone = socket.socket(socket.AF_UNIX, server.type)
            doomed.append(gone)
            if self.pairs is not None:
                self.pairs.connect(gone, None, server, self.names.reach(server.listener, server.name))
            else:
                gone.connect(self.names.reach(server.listener, server.name))
            self._sockets[server.id], _ = self._sockets[server.listener].accept()
            senders[server.id] = gone
        for s in sockets.sockets:
            if s.queue and s.senders:
                _send_from(self._named(sockets), s, self.names.reach(s.id, s.name))
            elif s.queue:
                _send_queue(senders[s.id], s)
        for s in sockets.sockets:
            if s.target:
                self._sockets[s.id].connect(self.names.reach(s.target, by_id[s.target].name))
        for s in sockets.sockets:
            for waiting in s.pending:
                sock = self._sockets[waiting]
                sock.setblocking(False)
                try:
                    if self.pairs is not None:
                        self.pairs.wait(sock, by_id[waiting], self.names.reach(s.id, s.name))
                    else:
                        sock.connect(self.names.reach(s.id, s.name))
                except BlockingIOError:
                    raise RestoreError(f"the clients waiting in the accept queue of {unix_names.shown(s.name)} do "
                                       "not fit in its backlog here") from None
                _send_messages(sock, by_id[waiting].sent)
                sock.setblocking(True)
        for s in sockets.sockets:
            sock = self._sockets[s.id]
            _set_options(sock, s.options)
            if s.shutdown:
                sock.shutdown(SHUTDOWN_HOW[s.shutdown])
        for b in doomed:
            b.close()
        self.names.drop_gone()        # the connections are made: no file leads to those sockets

    def _pairs(self, sockets: UnixSockets, by_id: dict[int, UnixSocket]) -> dict[int, tuple[socket.socket,
                                                                                       socket.socket]]:
        """The socketpairs ``add_sockets`` makes (by the id of the end it meets first), made as
        the processes that made them (``agent.peercred``), all of one process's at once."""
        if self.pairs is None:
            return {}
        wanted: list[tuple[UnixSocket, UnixSocket | None]] = []
        claimed = set(self._sockets)
        for s in sockets.sockets:
            if s.id in claimed or s.accepted or (s.peer and by_id.get(s.peer, s).accepted):
                continue
            if s.peer or s.peer_closed:
                wanted.append((s, by_id.get(s.peer)))
                claimed |= {s.id, s.peer}
        return self.pairs.pairs(wanted)

    def _bind(self, sock: socket.socket, s: UnixSocket) -> None:
        if s.file_gone:
            self.names.bind_gone(sock, s.id, s.name, socket.gethostname(), self.identity)
            return
        self.names.bind(sock, unix_names.Bound(s.name, s.type, s.file_dev, s.file_ino),
                        s.file_mode, s.file_uid, s.file_gid, socket.gethostname(), self.identity)

    def _named(self, sockets: UnixSockets) -> dict[bytes, socket.socket]:
        return {s.name: self._sockets[s.id] for s in sockets.sockets
                if s.name and not s.accepted and s.type == socket.SOCK_DGRAM}

    # -- descriptions ------------------------------------------------------------------------

    def fd_for(self, pid: int, f: FileDesc, identity: Identity) -> int:
        """Our fd of the description ``f`` (of process ``pid``, as the image names it) refers to;
        a file at a path opened as ``identity``, the process's."""
        key: Key = ("desc", f.desc) if f.desc else ("fd", pid, f.fd)
        fd = self._fds.get(key)
        if fd is None:
            fd = self._fds[key] = self._make(f, identity)
        return fd

    def open_files(self, pid: int, fds: Sequence[FileDesc], identity: Identity) -> None:
        """Open every file at a path among ``fds`` (of process ``pid``) at once, as ``identity``:
        one switch of credentials for all of them, not one each (``fd_for`` finds them made)."""
        with identity.acting():
            for f in fds:
                if f.kind in _FILE_TYPES:
                    self.fd_for(pid, f, identity)

    def _make(self, f: FileDesc, identity: Identity) -> int:
        if f.kind in EVENT_KINDS:
            fd = self._events.get(f.obj, -1)
            if fd < 0 or fd in self._taken:
                raise RestoreError(f"fd {f.fd} refers to {f.kind} {f.obj}, which the image lacks or "
                                   "another description has: corrupt image")
            self._taken.add(fd)
            fcntl.fcntl(fd, fcntl.F_SETFL, f.flags & SETFL_FLAGS)
            return fd
        if f.kind == "fifo":
            if f.obj not in self._pipes or self._pipes[f.obj][0] != self._pipes[f.obj][1]:
                raise RestoreError(f"fd {f.fd} refers to FIFO {f.obj}, which the image lacks: corrupt image")
            # A new open of the FIFO, as the process made it; through our open of it, which
            # holds the pipe (a reader and a writer, so neither end waits here; a reader only
            # where no fd of the job writes it).
            ours = f"/proc/self/fd/{self._pipes[f.obj][0]}"
            writer = -1
            if f.obj in self._unwritten and not f.waiting:
                # Opened while a writer is there, it shows POLLHUP once none is, as on the
                # source; one ``waiting`` is opened without one, and shows none until a writer
                # has come and gone.
                writer = os.open(ours, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                fd = self._open(f, ours, f.flags & (O_ACCMODE | SETFL_FLAGS), identity, follow=True)
            finally:
                if writer >= 0:
                    os.close(writer)
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise RestoreError(f"fd {f.fd}: {f.path} is not a FIFO here: corrupt image")
            return fd
        if f.kind in ("pipe", "unix", "inet"):
            if f.kind in ("unix", "inet"):
                sock = self._sockets.get(f.obj)
                if sock is None:
                    raise RestoreError(f"fd {f.fd} refers to socket {f.obj}, which the image lacks: corrupt image")
                end = sock.fileno()
            else:
                if f.obj not in self._pipes:
                    raise RestoreError(f"fd {f.fd} refers to pipe {f.obj}, which the image lacks: corrupt image")
                r, w = self._pipes[f.obj]
                end = r if f.flags & O_ACCMODE == os.O_RDONLY else w
            if end not in self._taken and not (f.kind == "pipe" and f.flags & O_ACCMODE == os.O_RDWR):
                self._taken.add(end)
                fd = end
            elif f.kind == "pipe":
                # Another description of the same end (or a read-write one, as a FIFO would be
                # opened): a new open of the pipe, as the process made it.
                fd = self._open(f, f"/proc/self/fd/{end}", f.flags & (O_ACCMODE | SETFL_FLAGS), None)
            else:
                raise RestoreError(f"fd {f.fd}: a second open file of one socket: corrupt image")
            fcntl.fcntl(fd, fcntl.F_SETFL, f.flags & SETFL_FLAGS)
            return fd
        flags = f.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY | os.O_CLOEXEC)
        if f.kind == "deleted":
            if f.obj not in self._deleted:
                raise RestoreError(f"fd {f.fd} refers to deleted file {f.obj}, which the image lacks: corrupt image")
            if f.obj in self.deleted.memfds and f.flags & O_ACCMODE == os.O_RDWR and f.obj not in self._memfd_own:
                # memfd_create's own description, which the kernel does not count as a writer
                # (a process may exec its memfd: an open of it for writing makes that ETXTBSY).
                self._memfd_own.add(f.obj)
                fd = os.dup(self._deleted[f.obj])
                fcntl.fcntl(fd, fcntl.F_SETFL, f.flags & SETFL_FLAGS)
            else:
                # Each description its own open of the one file, as the process had them.
                fd = self._open(f, f"/proc/self/fd/{self._deleted[f.obj]}", flags & ~(O_TMPFILE | os.O_NOFOLLOW),
                                None)
            if f.pos:
                os.lseek(fd, f.pos, os.SEEK_SET)
            return fd
        if f.kind == "redirect":
            # A read end reads PATH; anything that wrote appends to it (created if need be).
            mode = f.flags & O_ACCMODE
            flags = mode | (f.flags & SETFL_FLAGS)
            if mode != os.O_RDONLY:
                flags |= os.O_APPEND | os.O_CREAT
        elif f.kind == "dir":
            flags |= os.O_DIRECTORY
        fd = self._open(f, f.path, flags, identity)
        mode = os.fstat(fd).st_mode
        if not _FILE_TYPES[f.kind](mode):
            raise RestoreError(f"fd {f.fd}: {f.path} is {_file_type(mode)} here, not what the image says it "
                               f"was ({f.kind}): copy the file to this host at the same path")
        if f.kind in ("file", "dir") and f.pos:
            os.lseek(fd, f.pos, os.SEEK_SET)
        return fd

    def _open(self, f: FileDesc, path: str, flags: int, identity: Identity | None, follow: bool = False) -> int:
        """Open without blocking (a FIFO at the path would wait for its other end), then with
        the status flags the description had. As ``identity`` (None: a pipe or deleted file
        this restore made, reopened by the restorer), following no symbolic link unless
        ``follow`` (our own /proc/self/fd links)."""
        how = flags | os.O_CLOEXEC | os.O_NONBLOCK
        if flags & O_PATH:
            # A handle on a place, not an open file (rsync's directories, fd-based path walks):
            # openat2 takes no other flag with it (EINVAL), and it has no status flags to set.
            how = flags & O_PATH_FLAGS | os.O_CLOEXEC
        try:
            if identity is None:
                fd = os.open(path, how, 0o666)
            else:
                fd = identity.open_path(path, how, 0o666, follow=follow)
        except OSError as exc:
            if identity is not None:
                raise identity.refusal(f"fd {f.fd}", f.path or f.kind, exc) from None
            raise RestoreError(f"cannot reopen fd {f.fd} ({f.path or f.kind}): {exc.strerror}") from None
        self._mine.append(fd)
        if not flags & (os.O_NONBLOCK | O_PATH):
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & SETFL_FLAGS)
        return fd

    def close(self) -> None:
        if self._own_deleted:
            self.deleted.close()
        for fd in self._mine:
            try:
                os.close(fd)
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise
        self._mine.clear()
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        self._fds.clear()
        self._pipes.clear()
        self._unwritten.clear()
        self._events.clear()
        self._watches.clear()
        self._deleted.clear()
        self._memfd_own.clear()
        self._seal_later.clear()
        self._taken.clear()


# What an fd of each kind that names a path must find there. A redirect is a file the user
# named (created if need be), a character device (/dev/null), or a FIFO that has a reader
# (opened without blocking: a FIFO nobody reads fails; ``--relay`` writes into the deputy's).
_FILE_TYPES = {"file": stat.S_ISREG, "dir": stat.S_ISDIR, "chr": stat.S_ISCHR,
               "redirect": lambda mode: stat.S_ISREG(mode) or stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)}


def _file_type(mode: int) -> str:
    for test, what in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "an unknown kind of file"


def _open_fifo(p: PipeBuffer, mode: int, made: list[str], identity: Identity) -> int:
    """The FIFO at ``p.path``, opened ``mode`` without blocking (which makes its pipe): made
    if missing (and listed in ``made``) by ``identity`` in its directory reached without
    symbolic links, with the source's permissions and owner (where ``identity`` may give it);
    used if it is a FIFO already, refused if something else is there."""
    directory, name = os.path.split(p.path)
    made_now = False
    try:
        where = identity.open_path(directory or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise identity.refusal("the directory of a FIFO", directory or "/", exc) from None
    try:
        with identity.acting():
            try:
                st = os.lstat(name, dir_fd=where)
            except FileNotFoundError:
                try:
                    os.mkfifo(name, 0o600, dir_fd=where)
                    made.append(p.path)
                    made_now = True
                except OSError as exc:
                    raise RestoreError(f"cannot make the FIFO {p.path} here as the process's {identity}: "
                                       f"{exc.strerror}; make its directory, or the FIFO itself, on this host") from None
            except OSError as exc:
                raise RestoreError(f"cannot look at the FIFO's path {p.path} here: {exc.strerror}") from None
            else:
                if not stat.S_ISFIFO(st.st_mode):
                    raise RestoreError(f"{p.path} is {_file_type(st.st_mode)} here, where the process had a FIFO: "
                                       "move it aside, or restore where that path is free")
            try:
                fd = os.open(name, mode | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=where)
            except OSError as exc:
                raise identity.refusal("a FIFO", p.path, exc) from None
    finally:
        os.close(where)
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise RestoreError(f"{p.path} changed while restore opened it: try again")
    if made_now:          # made just now: the source's owner and permissions
        identity.give(fd, p.uid, p.gid)
        with identity.acting():
            os.fchmod(fd, p.mode)
    return fd


class DeletedFiles:
    """The deleted files and memfds of a restore, each made again (unlinked: O_TMPFILE in the
    directory it was in where that exists here, else in /tmp; a memfd as a memfd of its name)
    at its first slice, with its owner and permissions, and written slice by slice as the
    slices arrive: a restore holds one slice at a time, not the files. ``close`` drops our fds
    (the processes hold theirs by then, or the restore is abandoned and they go)."""

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}          # file id -> our fd of it made again
        self.names: dict[int, str] = {}        # file id -> where it was (the path its fd showed)
        self.seals: dict[int, int] = {}        # file id -> a memfd's seals
        self.memfds: set[int] = set()          # the file ids that are memfds
        self.times: dict[int, tuple[int, int]] = {}    # file id -> (atime, mtime) ns, set at ``close``

    def write(self, c: FileContents, files: Files, identity: Identity) -> None:
        """One slice of ``c.id``; ``files``: the fds of the process the file comes with (where
        it was: the path its fd shows)."""
        fd = self.fds.get(c.id)
        if fd is None:
            where = next((f.path for f in files.fds if f.kind == "deleted" and f.obj == c.id), c.name or "/tmp/")
            fd = self.fds[c.id] = _make_unlinked(where, c, identity)
            self.names[c.id] = where
            self.seals[c.id] = c.seals if c.memfd else 0
            if c.memfd:
                self.memfds.add(c.id)
            if c.mtime_ns:
                self.times[c.id] = (c.atime_ns, c.mtime_ns)
        try:
            write_sparse(fd, c.data, c.offset)
        except OSError as exc:
            raise RestoreError(f"cannot write the deleted file {self.names[c.id]} again ({c.size >> 20} MiB): "
                               f"{exc.strerror}") from None

    def close(self) -> None:
        """Every file is complete (or the restore is abandoned): their times as they were, our
        fds closed."""
        for c_id, fd in self.fds.items():
            set_times(fd, self.times.get(c_id))
            os.close(fd)
        self.fds.clear()
        self.names.clear()
        self.seals.clear()
        self.memfds.clear()
        self.times.clear()



def _make_unlinked(path: str, c: FileContents, identity: Identity) -> int:
    """A new file with no name, sized as ``c`` says, made by ``identity`` (in a directory it
    may write) and owned as ``c`` says where ``identity`` may give it: made at ``path`` and
    unlinked at once where that name is free, so /proc/PID/fd shows the name it had ("PATH
    (deleted)", which programs print and compare); else O_TMPFILE in its directory or /tmp
    (where the filesystem lacks it, a name removed at once); a memfd of the name ``path``
    gives."""
    if c.memfd:
        name = path.removeprefix("/memfd:")
        try:
            with identity.acting():
                fd = os.memfd_create(name[:MEMFD_NAME_MAX], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            _size_and_own(fd, c, identity)
        except OSError as exc:
            raise RestoreError(f"cannot make the memfd {path} again: {exc.strerror}") from None
        return fd
    directory = os.path.dirname(path) or "/"
    if path.startswith("/"):
        try:
            fd = identity.open_path(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError:
            pass            # taken (another file has the name now), or not ours to make: no name
        else:
            try:
                with identity.acting():
                    os.unlink(path)
                _size_and_own(fd, c, identity)
            except OSError as exc:
                os.close(fd)
                raise RestoreError(f"cannot make the deleted file {path} again: {exc.strerror}") from None
            return fd
    for place in (directory, "/tmp"):
        try:
            fd = identity.open_path(place, os.O_RDWR | O_TMPFILE | os.O_CLOEXEC, 0o600)
        except OSError:
            try:
                with identity.acting():
                    fd, name = tempfile.mkstemp(prefix=".kcr-deleted-", dir=place)
                    os.unlink(name)
            except OSError:
                continue
        try:
            _size_and_own(fd, c, identity)
        except OSError as exc:
            os.close(fd)
            raise RestoreError(f"cannot make the deleted file {c.id} again in {place}: {exc.strerror}") from None
        return fd
    raise RestoreError(f"cannot make a deleted file again as the process's {identity}: neither {directory} nor "
                       "/tmp takes a new file of it here")


def _size_and_own(fd: int, c: FileContents, identity: Identity) -> None:
    os.ftruncate(fd, c.size)
    identity.give(fd, c.uid, c.gid)
    with identity.acting():
        os.fchmod(fd, c.mode)


F_ADD_SEALS, F_SEAL_SEAL, F_SEAL_FUTURE_WRITE = 1033, 0x1, 0x10


def _add_seals(fd: int, seals: int, name: str) -> None:
    if not seals:
        return
    try:
        fcntl.fcntl(fd, F_ADD_SEALS, seals)
    except OSError as exc:
        raise RestoreError(f"cannot seal the memfd {name} again: {exc.strerror}") from None


MEMFD_NAME_MAX = 249      # the kernel's limit (NAME_MAX less "memfd:")


def _fill_pipe(w: int, data: bytes, packets: Sequence[int]) -> None:
    """Write a pipe's bytes through our write end ``w``: at once, or one packet a write in
    packet mode (O_DIRECT, set for that and taken off again: the job's ends get their own
    flags later). BlockingIOError if they do not fit."""
    if not packets:
        if os.write(w, data) != len(data):
            raise BlockingIOError
        return
    flags = fcntl.fcntl(w, fcntl.F_GETFL)
    fcntl.fcntl(w, fcntl.F_SETFL, flags | os.O_DIRECT)
    try:
        at = 0
        for n in packets:
            if os.write(w, data[at:at + n]) != n:
                raise BlockingIOError
            at += n
    finally:
        fcntl.fcntl(w, fcntl.F_SETFL, flags)


def _make_event_file(e: EventFile) -> int:
    """An eventfd, timerfd, signalfd or (empty) epoll instance in the state ``e`` records."""
    if e.kind == "eventfd":
        fd = os.eventfd(0, os.EFD_CLOEXEC | (EFD_SEMAPHORE if e.semaphore else 0))
        if e.count:
            os.eventfd_write(fd, e.count)
        return fd
    if e.kind == "timerfd":
        fd = _check(_libc.timerfd_create(e.clockid, os.O_CLOEXEC), f"a timerfd on clock {e.clockid}")
        # A periodic timer that expired and was not read yet shows no time left: the kernel
        # re-arms it when it is read. Here it runs on, one period from now.
        value = e.value_ns or (e.interval_ns if e.ticks else 0)
        # An absolute timer is due where a relative one would be (the time left when it was
        # frozen, from now), set absolute: a later clock_settime moves it, or, with
        # TFD_TIMER_CANCEL_ON_SET, cancels it, as it did before.
        at = value + time.clock_gettime_ns(e.clockid) if value and e.settime_flags & TFD_TIMER_ABSTIME else value
        spec = _itimerspec(_timespec(*divmod(e.interval_ns, 1_000_000_000)),
                           _timespec(*divmod(at, 1_000_000_000)))
        try:
            if value or e.settime_flags:
                _check(_libc.timerfd_settime(fd, e.settime_flags, ctypes.byref(spec), None), "arming a timerfd")
            if e.ticks:
                # Expirations not read yet: only a kernel with CONFIG_CHECKPOINT_RESTORE takes them.
                fcntl.ioctl(fd, TFD_IOC_SET_TICKS, struct.pack("<Q", e.ticks))
        except OSError as exc:
            os.close(fd)
            raise RestoreError(f"cannot make a timerfd as it was ({exc.strerror})") from None
        return fd
    if e.kind == "signalfd":
        mask = ctypes.c_uint64(e.sigmask)
        return _check(_libc.signalfd(-1, ctypes.byref(mask), os.O_CLOEXEC), "a signalfd")
    if e.kind == "inotify":
        return inotify.make(e.inotify)
    if e.kind == "fanotify":
        return fanotify.make(e.init_flags, e.event_flags, e.marks)
    if e.kind == "pidfd":
        try:       # the process exists here by now, under its pid (a tree's processes come first)
            return os.pidfd_open(e.pid)
        except OSError as exc:
            raise RestoreError(f"cannot make a pidfd of process {e.pid} here: {exc.strerror}") from None
    return _check(_libc.epoll_create1(os.O_CLOEXEC), "an epoll instance")


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise RestoreError(f"cannot make {what} here: {os.strerror(err)}")
    return ret


def _send_queue(sender: socket.socket, s: UnixSocket) -> None:
    """Put ``s``'s queued messages back by sending them from its peer's end, in order."""
    _send_messages(sender, s.queue)


def _send_messages(sender: socket.socket, messages: Sequence[bytes]) -> None:
    if not messages:
        return
    total = sum(len(m) for m in messages)
    # Unix sockets charge queued bytes to the sender: room for all of them, for now
    # (``_set_options`` sets the real size afterwards).
    sender.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, max(total * 2 + (64 << 10) * len(messages), 1 << 16))
    sender.setblocking(False)
    try:
        for m in messages:
            if not m:
                sender.send(m)
                continue
            view = memoryview(m)
            while view:
                view = view[sender.send(view):]
    except BlockingIOError:
        raise RestoreError("the messages queued on a unix socket do not fit in it here: check "
                           "net.unix.max_dgram_qlen and net.core.wmem_max") from None


def _send_from(named: dict[bytes, socket.socket], s: UnixSocket, to: bytes) -> None:
    """Put a named datagram socket's queue back: each message sent to its name from the
    socket of the job named as its sender, or from an unbound one."""
    anonymous = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        room = max(sum(len(m) for m in s.queue) * 2 + (64 << 10) * len(s.queue), 1 << 16)
        for sender_name, m in zip(s.senders, s.queue):
            sender = named.get(sender_name) if sender_name else anonymous
            if sender is None:
                raise RestoreError(f"a datagram queued on {unix_names.shown(s.name)} names a sender the image lacks: "
                                   "corrupt image")
            # Queued datagrams are charged to their sender: room for all of them, for now
            # (``_set_options`` sets the real size afterwards).
            sender.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, room)
            try:
                sender.sendto(m, socket.MSG_DONTWAIT, to)
            except BlockingIOError:
                raise RestoreError("the datagrams queued on a unix socket do not fit in it here: check "
                                   "net.unix.max_dgram_qlen and net.core.wmem_max") from None
    finally:
        anonymous.close()


def _set_options(sock: socket.socket, o: SocketOptions) -> None:
    """``o`` set on ``sock``, its queue filled already (its filter judges what comes after)."""
    sol = socket.SOL_SOCKET
    sock.setsockopt(sol, SO_RCVBUFFORCE, o.rcvbuf // 2)      # getsockopt showed them doubled
    sock.setsockopt(sol, SO_SNDBUFFORCE, o.sndbuf // 2)
    for opt, value, default in ((socket.SO_PASSCRED, o.passcred, 0), (SO_PASSSEC, o.passsec, 0),
                                (SO_PEEK_OFF, o.peek_off, -1), (socket.SO_RCVLOWAT, o.rcvlowat, 1),
                                (socket.SO_OOBINLINE, o.oobinline, 0), (SO_PASSPIDFD, o.passpidfd, 0),
                                (SO_PASSRIGHTS, o.passrights, 1)):
        if value != default:
            sock.setsockopt(sol, opt, value)
    for opt, us in ((SO_RCVTIMEO_OLD, o.rcvtimeo_us), (SO_SNDTIMEO_OLD, o.sndtimeo_us)):
        if us:
            sock.setsockopt(sol, opt, struct.pack("<qq", us // 1_000_000, us % 1_000_000))
    socket_filter.attach(sock, o.bpf_filter, bool(o.filter_locked))
