"""SO_PEERCRED of restored unix sockets: who made the pair, or who is at the connection's other end.

The kernel stamps each end of a socketpair with the pid (the thread group's), effective uid
and effective gid of the process that called ``socketpair``; a listener with those of whoever
called ``listen``, which its clients then report; a connection accepted from it with those of
the process that called ``connect`` (stamped at ``connect``, while the connection still waits
in the accept queue: a checkpoint's dump reads it by accepting the connection; a live one, which
may not, records the client's holder, ``agent.fdtable``: ``UnixSocket.conn_pid``). Nothing
changes them later. Made by the restorer, every one would name the restorer (root) to a
program that asks its peer who it is (a server that checks ``SO_PEERCRED`` before it trusts a
request, D-Bus, ``multiprocessing``'s authkey-less checks). So the dump records what each socket said (``UnixSocket.cred_pid``, ``cred_uid``,
``cred_gid``) and restore has each of those calls made by the process that made it, a process
restored in the same session under that pid (a tree keeps its pids; ``--new-pid``: the one
process, under its new pid), its effective ids switched to the recorded ones for the call and
back (``Restorer.socketpairs_as``, ``listen_as``, ``connect_as``; a client waiting in an accept
queue connects again as the process that connected it: ``wait``). The restorer still holds
every socket (lent to the process for the call), fills the queues and hands them out as before.

Where the process named does not move with the job (a parent left behind, a launcher that
exited, a client from outside that has closed), no process here has its pid: the call is made
by the process that holds the socket, with the recorded ids, and the report says which pid
it names instead. The two ends of one pair that recorded different makers (a connection
whose listener had closed, made again as a pair) can name only one: the first end's, said so.
"""
from __future__ import annotations

import socket
from typing import Mapping, Protocol, Sequence

from transport.schema import UnixSocket

Creds = tuple[int, int, int]                      # pid, effective uid, effective gid


class Maker(Protocol):
    """What a process being restored does for its sockets (``agent.restore.Restorer``)."""

    def socketpairs_as(self, wanted: Sequence[tuple[int, int, int]]) -> list[tuple[socket.socket, socket.socket]]: ...

    def listen_as(self, sock: socket.socket, backlog: int, uid: int, gid: int) -> None: ...

    def connect_as(self, sock: socket.socket, name: bytes, uid: int, gid: int) -> None: ...


def of(s: UnixSocket | None) -> Creds | None:
    return (s.cred_pid, s.cred_uid, s.cred_gid) if s is not None and s.cred_pid else None


def of_connector(s: UnixSocket) -> Creds | None:
    """Who connected ``s``, a client waiting in an accept queue (None: not recorded)."""
    return (s.conn_pid, s.conn_uid, s.conn_gid) if s.conn_pid else None


class Sockets:
    """Makes the sockets of one restore (``Descriptions.add_sockets``) as the processes that
    made them: ``makers`` by image pid, ``holders`` the image pid of a process holding each
    socket (by socket id); ``warnings`` gets what could not be kept."""

    def __init__(self, makers: Mapping[int, Maker], holders: Mapping[int, int], warnings: list[str]) -> None:
        self.makers = makers
        self.holders = holders
        self.warnings = warnings

    def _maker(self, want: Creds, s: UnixSocket, what: str) -> Maker | None:
        pid = want[0]
        if pid in self.makers:
            return self.makers[pid]
        holder = self.holders.get(s.id)
        if holder is None or holder not in self.makers:
            return None
        self.warnings.append(f"{what} held by pid {holder} named pid {pid}, which does not move with it, to "
                             f"SO_PEERCRED: it names pid {holder} now (uid {want[1]}, gid {want[2]} as before)")
        return self.makers[holder]

    def pairs(self, wanted: Sequence[tuple[UnixSocket, UnixSocket | None]]) -> dict[int, tuple[socket.socket,
                                                                                              socket.socket]]:
        """A pair for each (socket, its other end: None if closed or not moving), by the first's
        id; those of one maker made together."""
        out: dict[int, tuple[socket.socket, socket.socket]] = {}
        by_maker: dict[int, tuple[Maker, list[tuple[UnixSocket, Creds]]]] = {}
        for s, peer in wanted:
            want = of(s) or of(peer)
            if want is not None and of(peer) not in (None, want):
                assert peer is not None
                self.warnings.append(f"the unix socketpair {s.id}/{peer.id} had ends naming different processes to "
                                     f"SO_PEERCRED (pid {want[0]} and pid {peer.cred_pid}): both name pid {want[0]} "
                                     "now")
            maker = self._maker(want, s, "a unix socketpair") if want is not None else None
            if maker is None or want is None:
                out[s.id] = socket.socketpair(socket.AF_UNIX, s.type)
            else:
                by_maker.setdefault(id(maker), (maker, []))[1].append((s, want))
        for maker, group in by_maker.values():
            for (s, _), pair in zip(group, maker.socketpairs_as([(s.type, w[1], w[2]) for s, w in group])):
                out[s.id] = pair
        return out

    def listen(self, sock: socket.socket, s: UnixSocket) -> None:
        """``s``, a listener: listening again, as the process that listened."""
        want = of(s)
        maker = self._maker(want, s, "a unix listener") if want is not None else None
        if maker is None or want is None:
            sock.listen(s.backlog)
        else:
            maker.listen_as(sock, s.backlog, want[1], want[2])

    def wait(self, sock: socket.socket, client: UnixSocket, name: bytes) -> None:
        """``sock`` (``client``'s, not blocking) connected to the listener at ``name``, to wait
        in its accept queue, as the process that connected it: the server end the server then
        accepts names it. BlockingIOError if the backlog is full."""
        want = of_connector(client)
        maker = self._maker(want, client, "a unix connection waiting to be accepted") if want is not None else None
        if maker is None or want is None:
            sock.connect(name)
        else:
            maker.connect_as(sock, name, want[1], want[2])

    def connect(self, sock: socket.socket, client: UnixSocket | None, server: UnixSocket, name: bytes) -> None:
        """``sock`` (``client``'s, None: a client that has closed) connected to ``server``'s
        listener, as the process ``server`` names: the one that connected."""
        want = of(server)
        maker = self._maker(want, client or server, "a unix connection") if want is not None else None
        if maker is None or want is None:
            sock.connect(name)
        else:
            maker.connect_as(sock, name, want[1], want[2])
