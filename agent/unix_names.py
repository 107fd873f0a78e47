"""The names unix sockets of a job are bound to, on the destination: checked in preflight,
taken when the restore binds them, given back if the restore is undone.

A path: on a second host it does not exist, and bind makes its socket file. Where both hosts
see one filesystem (the source's host itself, test hosts), the job's own socket file is still
there, the very inode the source recorded (``UnixSocket.file_dev``/``file_ino``), its listener
frozen and about to end. Rule:

- no file at the path: bound there; a missing directory is refused;
- the job's own file, or a socket nobody listens on (connect gives ECONNREFUSED): it is
  renamed aside in its directory and the new socket bound at the path; the file aside is
  removed once the restored job runs (``commit``), or renamed back if the restore is undone
  (``undo``: the source, which runs on, is reachable at its path again);
- a socket something listens on (or is bound to, for datagrams), or a file that is not a
  socket: refused, naming the path and the process where this host's sockets show it.

Where the destination's agent dies before it can put a file back, the source's holder does
on rollback (``reclaim``): it finds the file aside by its inode.

The socket file gets the source's permissions and owner. An abstract name lives in the
network namespace: one taken here is refused, naming its holder.
"""
from __future__ import annotations

import errno
import os
import secrets
import socket
import stat
from typing import TYPE_CHECKING, Iterable

from agent import unix_sockets
from agent.as_target import Identity
if TYPE_CHECKING:
    from agent.fdtable import Peer
from transport.errors import RestoreError
from transport.frozen import frozen

SOCK_TYPES = (unix_sockets.SOCK_STREAM, unix_sockets.SOCK_DGRAM, unix_sockets.SOCK_SEQPACKET)


@frozen
class Bound:
    """A name the job binds, as preflight checks it on the destination."""

    name: bytes          # a path, or b"\0" + an abstract name
    type: int
    dev: int = 0         # the source's socket file (a path's)
    ino: int = 0

    def as_wire(self) -> dict[str, object]:
        return {"name": self.name, "type": self.type, "dev": self.dev, "ino": self.ino}

    @classmethod
    def from_wire(cls, d: object) -> "Bound":
        """From another host's summary: untrusted, checked."""
        from transport.schema import unix_name_ok
        if not isinstance(d, dict):
            raise RestoreError("a bound socket name in the summary is not a map: corrupt summary")
        name, kind, dev, ino = d.get("name"), d.get("type"), d.get("dev", 0), d.get("ino", 0)
        if not (isinstance(name, bytes) and name and unix_name_ok(name) and kind in SOCK_TYPES
                and isinstance(dev, int) and isinstance(ino, int) and 0 <= dev < 1 << 64 and 0 <= ino < 1 << 64):
            raise RestoreError("a bound socket name in the summary is malformed: corrupt summary")
        return cls(name, int(kind), dev, ino)


def shown(name: bytes) -> str:
    """A name as messages show it: a path, or @ and an abstract name."""
    return (b"@" + name[1:] if name[:1] == b"\0" else name).decode(errors="replace")


def check(b: Bound, host: str, job: frozenset[int] = frozenset()) -> bool:
    """Whether binding ``b`` here replaces a file at its path (True) or finds the name free
    (False); RestoreError, in one line, where it cannot be bound. ``job``: the moving
    processes' pids, as the source numbers them (named if they hold the name here)."""
    if b.name[:1] == b"\0":
        holders = [i for i in unix_sockets.query().values() if i.name == b.name]
        if holders:
            who = _who(holders[0].inode)
            if who.pid in job:
                raise RestoreError(f"the abstract unix socket name {shown(b.name)} is held on {host} by the job "
                                   "itself (source and destination share a network namespace, where the frozen "
                                   "source keeps it until it ends): move the job by checkpoint and restore, or "
                                   "to another host", host=host)
            raise RestoreError(f"the abstract unix socket name {shown(b.name)} is taken on {host} by "
                               f"{who}: end it, or move the job where that name is free", host=host)
        return False
    path = os.fsdecode(b.name)
    directory = os.path.dirname(path) or "/"
    if not os.path.isdir(directory):
        raise RestoreError(f"the directory {directory} of the unix socket {path} is missing on {host}: make it "
                           "there first", host=host)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise RestoreError(f"{path} is not a socket on {host}, where the job's unix socket is bound: move it "
                           "aside, or move the job where that path is free", host=host)
    if b.dev and (st.st_dev, st.st_ino) == (b.dev, b.ino):
        return True              # the job's own socket file: both hosts see one filesystem
    listener = next((i.inode for i in unix_sockets.query().values() if i.vfs == (st.st_dev, st.st_ino)), 0)
    if listener or _answers(path, b.type):
        holder = str(_who(listener)) if listener else "a program"
        raise RestoreError(f"{path} on {host} is a unix socket {holder} listens on: the job's socket cannot be "
                           "bound there; end it, or move the job where that path is free", host=host)
    return True


def _answers(path: str, kind: int) -> bool:
    """Whether something holds the socket at ``path`` (a connect is not refused)."""
    with socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EPROTOTYPE):
                return True       # a full backlog; a socket of another type bound there
            raise RestoreError(f"cannot tell whether anything listens on {path}: {exc.strerror}") from None
    return True


class _Nobody:
    pid = 0

    def __str__(self) -> str:
        return "a process"


def _who(inode: int) -> "Peer | _Nobody":
    from agent.fdtable import Outside, outside_fds
    found = Outside(outside_fds(set())).holders({("socket", inode)})
    return next(iter(found.values()))[0] if found else _Nobody()


class Names:
    """The names a restore bound: socket files put aside are removed by ``commit`` or put
    back by ``undo``; the files it made are removed by ``undo``."""

    def __init__(self) -> None:
        self._made: list[tuple[str, str, tuple[int, int]]] = []     # (path, aside or "", our file)
        # names bound whose file had been removed: -> (our name of the file, directories made)
        self._gone: dict[int, tuple[str, list[str]]] = {}

    def bind(self, sock: socket.socket, b: Bound, mode: int, uid: int, gid: int, host: str,
             identity: Identity) -> None:
        """Bind ``sock`` to ``b``'s name as ``identity`` (the job's: its rights in the socket's
        directory, its file), owned ``uid:gid`` where ``identity`` may give it that owner."""
        replace = check(b, host)
        if b.name[:1] == b"\0":
            try:
                sock.bind(b.name)
            except OSError as exc:
                raise RestoreError(f"cannot bind the abstract unix socket name {shown(b.name)} here: "
                                   f"{exc.strerror}") from None
            return
        path = os.fsdecode(b.name)
        aside = ""
        with identity.acting():
            if replace:
                aside = _beside(path)
                try:
                    os.rename(path, aside)
                except FileNotFoundError:
                    aside = ""        # gone meanwhile: the path is free
                except OSError as exc:
                    raise RestoreError(f"cannot move the socket file {path} aside here as the process's {identity}: "
                                       f"{exc.strerror}") from None
            try:
                sock.bind(path)
                try:
                    os.chown(path, uid, gid, follow_symlinks=False)
                except PermissionError:
                    pass            # the job's own, as its own chown would leave it
                os.chmod(path, mode)
                st = os.lstat(path)
            except OSError as exc:
                if aside:
                    os.rename(aside, path)
                raise RestoreError(f"cannot bind the unix socket {path} here as the process's {identity}: "
                                   f"{exc.strerror}") from None
        self._made.append((path, aside, (st.st_dev, st.st_ino)))

    def bind_gone(self, sock: socket.socket, sid: int, name: bytes, host: str, identity: Identity) -> None:
        """Bind ``sock`` to the path ``name`` whose socket file the source had removed (or
        replaced) since: getsockname names the path again, and no file at it leads to the
        socket once the restore is done (``sid``: the socket's id in the image: several such
        sockets may share one name). What stands at the path here (another socket, a
        FIFO, a file) is renamed aside for the instant of the bind and put back; the new
        socket's file is renamed to a name of ours beside it, which the restore's own
        connections reach it by (``reach``) until ``drop_gone`` removes it; a missing
        directory is made for that while and removed with it."""
        path = os.fsdecode(name)
        made: list[str] = []
        with identity.acting():
            try:
                directory = os.path.dirname(path)
                while not os.path.isdir(directory):
                    made.append(directory)
                    directory = os.path.dirname(directory)
                for d in reversed(made):
                    os.mkdir(d, 0o700)
                ours = _beside(path)
                aside = ""
                if os.path.lexists(path):
                    aside = ours + "-aside"
                    os.rename(path, aside)
                try:
                    sock.bind(path)
                    os.chmod(path, 0o777)       # (the job's clients connect as themselves, for a moment)
                    os.rename(path, ours)
                finally:
                    if aside:
                        os.rename(aside, path)
            except OSError as exc:
                for d in made:
                    _rmdir(d)
                raise RestoreError(f"cannot bind the unix socket {path} again (its file had been removed) on {host} "
                                   f"as the process's {identity}: {exc.strerror}") from None
        self._gone[sid] = (ours, made)

    def reach(self, sid: int, name: bytes) -> bytes:
        """Where the restore connects to the socket ``sid`` bound to ``name``: the name itself,
        or for one whose file had been removed (``bind_gone``), the name of ours its file has."""
        gone = self._gone.get(sid)
        return os.fsencode(gone[0]) if gone is not None else name

    def drop_gone(self) -> None:
        """The restore's connections are made: the files of sockets whose file had been
        removed go (and the directories made for them)."""
        for ours, _ in self._gone.values():
            _unlink(ours)
        for _, made in reversed(list(self._gone.values())):   # (several may share a directory made)
            for d in made:
                _rmdir(d)
        self._gone.clear()

    def commit(self) -> None:
        """The restored job runs: the files put aside go."""
        for _, aside, _ in self._made:
            if aside:
                _unlink(aside)
        self._made.clear()

    def undo(self) -> None:
        """The restore is undone: our files go, those put aside come back."""
        self.drop_gone()
        for path, aside, ours in reversed(self._made):
            try:
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == ours:
                    os.unlink(path)
            except OSError:
                pass
            if aside:
                try:
                    os.rename(aside, path)
                except OSError:
                    pass
        self._made.clear()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _beside(path: str) -> str:
    """A new name of ours in ``path``'s directory (a file put aside, or one of ours)."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.kcr-{secrets.token_hex(4)}")


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass          # (something else was made in it meanwhile: it stays)


def reclaim(files: Iterable[tuple[str, int, int, int]]) -> list[str]:
    """On the source, when a move is rolled back: each socket file of the job (path, type,
    device, inode) that a restore on a host sharing the filesystem moved aside and did not put
    back (its agent died before it could) is renamed back into place, over the restored
    socket's file if nothing listens there, so that the job, running on, is reachable at its
    path again. The paths put back."""
    back: list[str] = []
    for path, kind, dev, ino in files:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        except OSError:
            continue
        if st is not None and ((st.st_dev, st.st_ino) == (dev, ino) or not stat.S_ISSOCK(st.st_mode)):
            continue
        if st is not None and _answers_quietly(path, kind):
            continue          # a live socket: not ours to replace
        prefix = f".{os.path.basename(path)}.kcr-"
        try:
            entries = list(os.scandir(os.path.dirname(path) or "/"))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(prefix) and entry.inode() == ino:
                try:
                    if os.lstat(entry.path).st_dev == dev:
                        os.rename(entry.path, path)
                        back.append(path)
                        break
                except OSError:
                    continue
    return back


def _answers_quietly(path: str, kind: int) -> bool:
    try:
        return _answers(path, kind)
    except RestoreError:
        return True           # cannot tell: leave it
