"""The local channel: an agent on this host, over a socketpair (no SSH server needed).

``open_local_agent`` starts ``kcr-agent serve --stdio`` (by default with this Python, so the
agent is exactly this kcr-migrate) with one end of a socketpair as its stdin and stdout, and
speaks the protocol over the other end. ``stdio_stream`` is the agent's side: the protocol
on file descriptors 0 and 1, whatever they are (a socketpair here, pipes or sockets under
sshd), with fd 1 pointed at stderr so that a stray print cannot corrupt the stream.
"""
from __future__ import annotations

import fcntl
import os
import shlex
import socket
import stat
import subprocess
import sys
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Sequence

import trio

from transport._nursery import service_nursery
from transport.errors import IncompatibleImage, MigrationError, PeerGone, TransportError, TransportTimeout
from transport.protocol import ROLE_AGENT, ROLE_ORCHESTRATOR
from transport.rpc import Methods, RpcPeer, open_rpc

AGENT_ARGV: tuple[str, ...] = (sys.executable, "-m", "agent.cli", "serve", "--stdio")
STDERR_TAIL = 4096
PIPE_SIZE = 1 << 20     # asked of stdio pipes (sshd's): fewer, larger reads and writes on both ends
EXIT_TIMEOUT = 5.0


def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two connected trio streams within this process."""
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return trio.SocketStream(a), trio.SocketStream(b)


def stdio_stream() -> trio.abc.Stream:
    """This process's fds 0 and 1 as one trio stream; fd 0 becomes /dev/null, fd 1 stderr."""
    in_fd, out_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    st_in, st_out = os.fstat(in_fd), os.fstat(out_fd)
    if stat.S_ISSOCK(st_in.st_mode) and (st_in.st_dev, st_in.st_ino) == (st_out.st_dev, st_out.st_ino):
        os.close(out_fd)
        sock = socket.socket(fileno=in_fd)
        return trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    for fd, st in ((in_fd, st_in), (out_fd, st_out)):
        if stat.S_ISFIFO(st.st_mode):
            try:
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # above /proc/sys/fs/pipe-max-size for this user: the pipe keeps its size
    return trio.StapledStream(trio.lowlevel.FdStream(out_fd), trio.lowlevel.FdStream(in_fd))


class StderrTail:
    """Keeps the last bytes an agent wrote to stderr, for error messages; once ``echo`` is set
    (after the handshake: before it, whatever the agent says goes into the error) it also
    copies them to our stderr."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.echo = False

    def add(self, chunk: bytes | bytearray) -> None:
        if self.echo:
            sys.stderr.write(chunk.decode(errors="replace"))
            sys.stderr.flush()
        self.data += chunk
        del self.data[:-STDERR_TAIL]

    def text(self) -> str:
        return " / ".join(line.strip() for line in self.data.decode(errors="replace").splitlines() if line.strip())

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        async with stream:
            while chunk := await stream.receive_some():
                self.add(chunk)


LOCAL_HANDSHAKE_TIMEOUT = 180.0


async def _reap(proc: trio.Process, timeout: float = EXIT_TIMEOUT) -> None:
    """Wait for the agent to leave (it does once its stream is closed); kill it if it lingers."""
    with trio.move_on_after(timeout) as scope:
        scope.shield = True
        await proc.wait()
    if proc.returncode is None:
        proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()


@asynccontextmanager
async def open_local_agent(*, argv: Sequence[str] = AGENT_ARGV, methods: Methods | None = None,
                           echo_stderr: bool = True, **rpc_options: Any) -> AsyncIterator[RpcPeer]:
    """Start a local agent and yield the RPC peer talking to it; stop it on the way out.

    ``rpc_options`` go to ``open_rpc`` (level, window, timeouts, stream caps). Its handshake
    may take ``LOCAL_HANDSHAKE_TIMEOUT``: no link can be down to a process just started here,
    whose start-up (Python's imports) takes tens of seconds on a loaded or emulated machine;
    one that exits first is seen at once.
    """
    rpc_options.setdefault("handshake_timeout", LOCAL_HANDSHAKE_TIMEOUT)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # A session of its own: Ctrl-C at a terminal (SIGINT to the whole foreground group) reaches
        # only kcr-migrate, which rolls back or finishes through its agents; losing us, they settle.
        proc = await trio.lowlevel.open_process(list(argv), stdin=theirs.fileno(), stdout=theirs.fileno(),
                                                stderr=subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        ours.close()
        raise TransportError(f"cannot start the local agent {argv[0]}: {exc.strerror or exc}") from None
    finally:
        theirs.close()
    tail = StderrTail()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    started = False
    peer: RpcPeer | None = None
    try:
        async with service_nursery() as nursery:
            assert proc.stderr is not None
            nursery.start_soon(tail.pump, proc.stderr)
            try:
                async with open_rpc(stream, role=ROLE_ORCHESTRATOR, accept_roles=(ROLE_AGENT,),
                                    methods=methods, peer="the local kcr-agent", host="localhost",
                                    **rpc_options) as rpc:
                    started = True
                    peer = rpc
                    tail.echo = echo_stderr
                    yield rpc
            except MigrationError as exc:
                if started or isinstance(exc, (IncompatibleImage, TransportTimeout)):
                    raise
                await _reap(proc)
                said = f": {tail.text()}" if tail.text() else ""
                why = "" if isinstance(exc, PeerGone) else f" ({exc.message})"
                raise PeerGone(f"the local kcr-agent exited with status {proc.returncode} before the "
                               f"handshake{said}{why}; run `{shlex.join(argv)}` to see why") from None
            finally:
                # An agent that stopped answering will not leave by itself either.
                await _reap(proc, 0.5 if peer is not None and peer.abandoned else EXIT_TIMEOUT)
                nursery.cancel_scope.deadline = trio.current_time() + 1.0  # last words on stderr
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
