"""The ssh channel: kcr-agent on another host, started and spoken to over SSH.

``open_ssh_agent(host)`` connects with asyncssh, honouring an OpenSSH client config file as
far as asyncssh reads it (``ssh_config``, like ``ssh -F``; by default ``~/.ssh/config``):
HostName, Port, User, IdentityFile, IdentitiesOnly, UserKnownHostsFile, ConnectTimeout,
ProxyJump, ...; keys from the ssh-agent and ``~/.ssh``; host keys checked against
known_hosts, strictly. It runs ``kcr-agent serve --stdio`` on the host and speaks the
protocol over that exec channel. A missing agent, an agent of another protocol version, or
a shell that prints to stdout get errors that say what to do.

asyncssh is built on asyncio. This is the one module where asyncio appears: asyncssh runs on
an event loop of its own, in a thread owned by the connection (started and joined inside
``open_ssh_agent``), and trio talks to it through ``SshStream``, a trio ``Stream`` whose calls
cross over with ``run_coroutine_threadsafe``. SSH's own encryption then runs beside trio's
thread rather than in it.

``run_ssh_command(host, command)`` runs one short command the same way (same config, keys
and host-key checks) and returns its exit status and output, bounded in size: the inventory
uses it for a scheduler's node-local commands (``scontrol listpids`` on a Slurm node).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import warnings
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Coroutine, TypeVar, cast

import trio
from cryptography.utils import CryptographyDeprecationWarning

with warnings.catch_warnings():
    # cryptography 51 deprecates DSA, and asyncssh (2.24) names its DSA classes as it is
    # imported: a warning on every user's terminal (an error under the tests' -W error) about
    # keys kcr-migrate never offers. Only that warning, only during the import.
    warnings.filterwarnings("ignore", "DSA is deprecated", CryptographyDeprecationWarning)
    import asyncssh

from transport.cpu import cpu_has_aes
from transport.errors import IncompatibleImage, MigrationError, ProtocolError, TransportError, TransportTimeout
from transport.frozen import frozen
from transport.local import StderrTail
from transport.protocol import AGENT_COMMAND, ROLE_AGENT, ROLE_ORCHESTRATOR
from transport.rpc import Methods, RpcPeer, open_rpc

T = TypeVar("T")

CONNECT_TIMEOUT = 30.0
CLOSE_TIMEOUT = 5.0
EXIT_WAIT = 5.0
SSH_WINDOW = 8 << 20           # our receive window on the exec channel
SSH_PACKET = 128 << 10         # largest data packet we accept
RECEIVE_SIZE = 1 << 20
# Ciphers we put first when this CPU has AES instructions and the ssh config names none:
# AES-GCM is then several times cheaper per byte than chacha20-poly1305 (asyncssh's first
# choice), here and in the remote sshd. The rest of asyncssh's defaults follow, so a server
# without them still agrees on one.
AES_GCM_FIRST = "^aes128-gcm@openssh.com,aes256-gcm@openssh.com"
COMMAND_NOT_FOUND = 127


class AsyncioThread:
    """An asyncio event loop in a thread of its own, driven from trio."""

    def __init__(self, name: str = "kcr-asyncssh") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._started = False

    def _main(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            asyncio.set_event_loop(None)
            loop.close()

    def start(self) -> None:
        self._thread.start()
        self._started = True

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def wait(self, fut: concurrent.futures.Future[T]) -> T:
        """Await a future of this loop from trio; on cancellation the caller keeps ``fut``."""
        if not fut.done():
            token = trio.lowlevel.current_trio_token()
            done = trio.Event()

            def wake(_: object) -> None:
                try:
                    token.run_sync_soon(done.set)
                except trio.RunFinishedError:
                    pass

            fut.add_done_callback(wake)
            await done.wait()
        return fut.result()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the asyncio loop; cancelling the trio caller cancels it. Its failure
        comes back as a value, raised here: a task that failed just as its caller was
        cancelled (two hosts unreachable at once, one failing first) would otherwise end with
        an exception nobody retrieves, which asyncio prints as a traceback."""
        fut = self.submit(_outcome(coro))
        try:
            ok, value = await self.wait(fut)
        except trio.Cancelled:
            fut.cancel()
            raise
        if not ok:
            raise value
        return cast(T, value)

    async def stop(self) -> None:
        if not self._started:
            self.loop.close()
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._thread.join)


async def _outcome(coro: Coroutine[Any, Any, Any]) -> tuple[bool, Any]:
    """(True, its result) or (False, the exception it raised): never a failed task."""
    try:
        return True, await coro
    except Exception as exc:
        return False, exc


_BROKEN = (asyncssh.Error, EOFError, OSError, concurrent.futures.CancelledError)


class SshStream(trio.abc.Stream):
    """A trio stream over the stdin/stdout of a process started with asyncssh."""

    def __init__(self, aio: AsyncioThread, process: asyncssh.SSHClientProcess[bytes], host: str) -> None:
        self._aio = aio
        self._process = process
        self._host = host
        self._pending_read: concurrent.futures.Future[bytes] | None = None
        self._closed = False

    async def _write(self, data: bytes | bytearray | memoryview) -> None:
        # asyncssh copies ``data`` into its send buffer here, before the trio caller resumes.
        self._process.stdin.write(data)  # type: ignore[arg-type]
        await self._process.stdin.drain()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the ssh stream is closed")
        try:
            await self._aio.run(self._write(data))
        except _BROKEN as exc:
            raise trio.BrokenResourceError(f"the SSH channel to {self._host} broke: {exc}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("the ssh stream is closed")
        fut = self._pending_read
        if fut is None:
            fut = self._aio.submit(self._process.stdout.read(max_bytes or RECEIVE_SIZE))
        # A cancelled receive leaves its read running; the next receive takes its data.
        self._pending_read = fut
        try:
            data = await self._aio.wait(fut)
        except _BROKEN as exc:
            raise trio.BrokenResourceError(f"the SSH channel to {self._host} broke: {exc}") from exc
        finally:
            if fut.done():
                self._pending_read = None
        return data

    async def _close(self) -> None:
        try:
            self._process.stdin.write_eof()
        except _BROKEN:
            pass
        self._process.close()
        await self._process.wait_closed()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pending_read is not None:
            self._pending_read.cancel()
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            try:
                await self._aio.run(self._close())
            except _BROKEN:
                pass


def _connect_error(host: str, exc: BaseException, config: str | None) -> TransportError:
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return TransportError(f"cannot connect to {host} over SSH: its host key is not in known_hosts or has "
                              f"changed ({exc.reason}): check it, then add it with `ssh {host}` once")
    if isinstance(exc, asyncssh.PermissionDenied):
        return TransportError(f"cannot log in to {host} over SSH: permission denied: load a key into ssh-agent "
                              "or name one with IdentityFile in the ssh config, and authorize it there")
    if isinstance(exc, asyncssh.ConfigParseError):
        return TransportError(f"cannot read the ssh config {config or '~/.ssh/config'}: {exc}")
    if isinstance(exc, asyncssh.Error):
        return TransportError(f"SSH to {host} failed: {exc.reason}")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return TransportTimeout(f"connecting to {host} over SSH timed out: is the host up and sshd running?")
    if isinstance(exc, OSError):
        return TransportError(f"cannot reach {host} over SSH: {exc.strerror or exc}: check the host name "
                              "and that sshd runs there")
    return TransportError(f"SSH to {host} failed: {exc}")


async def _cipher_options(host: str, options: dict[str, Any]) -> dict[str, Any]:
    """``AES_GCM_FIRST`` if this CPU has AES and the ssh config sets no Ciphers for ``host``."""
    if not cpu_has_aes():
        return {}
    parsed = await asyncssh.SSHClientConnectionOptions.construct(host=host, **options)
    if parsed.config.get("Ciphers") is not None:
        return {}
    return {"encryption_algs": AES_GCM_FIRST}


async def _connect(host: str, config: str | None, timeout: float) -> asyncssh.SSHClientConnection:
    options: dict[str, Any] = {}
    if config is not None:
        options["config"] = [config]

    async def connect() -> asyncssh.SSHClientConnection:
        return await asyncssh.connect(host, **options, **await _cipher_options(host, options))
    return await asyncio.wait_for(connect(), timeout)


async def _pump_stderr(process: asyncssh.SSHClientProcess[bytes], tail: StderrTail) -> None:
    try:
        while chunk := await process.stderr.read(4096):
            tail.add(chunk)
    except _BROKEN:
        pass


async def _exit_status(process: asyncssh.SSHClientProcess[bytes]) -> int | None:
    try:
        await asyncio.wait_for(process.wait_closed(), EXIT_WAIT)
    except (asyncio.TimeoutError, *_BROKEN):
        pass
    return process.exit_status


def _diagnose(exc: MigrationError, host: str, command: str, status: int | None, stderr: str) -> MigrationError:
    """Turn a failed handshake into an error that says what is wrong on the host."""
    said = f" (the remote side said: {stderr})" if stderr else ""
    program = command.split()[0] if command.split() else command
    if status == COMMAND_NOT_FOUND or "command not found" in stderr or f"{program}: not found" in stderr:
        return TransportError(f"{program} is not installed on {host}{said}: pip install kcr-migrate there")
    if isinstance(exc, IncompatibleImage):
        return exc
    if isinstance(exc, ProtocolError):
        return ProtocolError(f"`{command}` on {host} did not answer as kcr-agent ({exc.message}){said}: check "
                             "that it is kcr-migrate's agent and that the login shell prints nothing to stdout")
    if status is not None:
        return TransportError(f"{program} on {host} exited with status {status} before the handshake{said}")
    return exc


@asynccontextmanager
async def open_ssh_agent(host: str, *, ssh_config: str | None = None, command: str = AGENT_COMMAND,
                         methods: Methods | None = None, connect_timeout: float = CONNECT_TIMEOUT,
                         echo_stderr: bool = True, **rpc_options: Any) -> AsyncIterator[RpcPeer]:
    """Start ``command`` on ``host`` over SSH and yield the RPC peer talking to it.

    ``rpc_options`` go to ``open_rpc`` (level, window, timeouts, stream caps).
    """
    async with _ssh_connection(host, ssh_config, connect_timeout) as (aio, conn):
        async with _agent_process(aio, conn, host, command, methods, echo_stderr, rpc_options) as rpc:
            try:
                yield rpc
            finally:
                if rpc.abandoned:
                    # It stopped answering (a link gone down): closing the channel and then the
                    # connection politely would wait CLOSE_TIMEOUT twice for answers that cannot
                    # come. The connection is dropped; both closes then end at once.
                    await aio.run(_abort_connection(conn))


@asynccontextmanager
async def _ssh_connection(host: str, ssh_config: str | None, connect_timeout: float
                          ) -> AsyncIterator[tuple[AsyncioThread, asyncssh.SSHClientConnection]]:
    """An SSH connection to ``host`` on an asyncio thread of its own; closed (shielded, with a
    deadline) and the thread stopped on the way out."""
    aio = AsyncioThread()
    aio.start()
    try:
        try:
            conn = await aio.run(_connect(host, ssh_config, connect_timeout))
        except (asyncssh.Error, OSError, asyncio.TimeoutError, ValueError) as exc:
            raise _connect_error(host, exc, ssh_config) from None
        try:
            yield aio, conn
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                scope.shield = True
                await aio.run(_close_connection(conn))
    finally:
        await aio.stop()


async def _close_connection(conn: asyncssh.SSHClientConnection) -> None:
    conn.close()
    await conn.wait_closed()


async def _abort_connection(conn: asyncssh.SSHClientConnection) -> None:
    conn.abort()


@asynccontextmanager
async def _agent_process(aio: AsyncioThread, conn: asyncssh.SSHClientConnection, host: str, command: str,
                         methods: Methods | None, echo_stderr: bool,
                         rpc_options: dict[str, Any]) -> AsyncIterator[RpcPeer]:
    try:
        process = await aio.run(_create_process(conn, command))
    except (asyncssh.Error, OSError) as exc:
        raise TransportError(f"cannot start `{command}` on {host}: {exc}") from None
    tail = StderrTail()
    aio.submit(_pump_stderr(process, tail))
    stream = SshStream(aio, process, host)
    started = False
    try:
        async with open_rpc(stream, role=ROLE_ORCHESTRATOR, accept_roles=(ROLE_AGENT,), methods=methods,
                            peer=f"kcr-agent on {host}", host=host, **rpc_options) as rpc:
            started = True
            tail.echo = echo_stderr
            yield rpc
    except MigrationError as exc:
        if started:
            raise
        with trio.CancelScope(shield=True):
            status = await aio.run(_exit_status(process))
        raise _diagnose(exc, host, command, status, tail.text()) from None


async def _create_process(conn: asyncssh.SSHClientConnection, command: str) -> asyncssh.SSHClientProcess[bytes]:
    return await conn.create_process(command, encoding=None, window=SSH_WINDOW,  # type: ignore[return-value]
                                     max_pktsize=SSH_PACKET)


COMMAND_TIMEOUT = 60.0
COMMAND_OUTPUT_MAX = 4 << 20


@frozen
class CommandResult:
    """What one command run over SSH left: its exit status (None if it died of a signal) and output."""

    status: int | None
    stdout: bytes
    stderr: bytes


async def run_ssh_command(host: str, command: str, *, ssh_config: str | None = None,
                          connect_timeout: float = CONNECT_TIMEOUT, timeout: float = COMMAND_TIMEOUT,
                          max_output: int = COMMAND_OUTPUT_MAX) -> CommandResult:
    """Run ``command`` (a shell command line) on ``host`` over SSH and wait for it to end.

    More than ``max_output`` bytes on stdout or stderr, or no end within ``timeout``, is an
    error: the host is not trusted to bound its own answer.
    """
    async with _ssh_connection(host, ssh_config, connect_timeout) as (aio, conn):
        try:
            with trio.fail_after(timeout):
                status, out, err = await aio.run(_run_command(conn, command, max_output))
        except trio.TooSlowError:
            raise TransportTimeout(f"`{command}` on {host} did not finish in {timeout:g} s", host=host) from None
        except (asyncssh.Error, OSError) as exc:
            raise TransportError(f"cannot run `{command}` on {host}: {exc}", host=host) from None
    if out is None or err is None:
        raise ProtocolError(f"`{command}` on {host} wrote more than {max_output} bytes", host=host)
    return CommandResult(status, out, err)


async def _read_bounded(stream: asyncssh.SSHReader[bytes], limit: int) -> bytes | None:
    data = bytearray()
    while chunk := await stream.read(RECEIVE_SIZE):
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)


async def _run_command(conn: asyncssh.SSHClientConnection, command: str,
                       limit: int) -> tuple[int | None, bytes | None, bytes | None]:
    process = await conn.create_process(command, encoding=None, stdin=asyncssh.DEVNULL)
    out, err = await asyncio.gather(_read_bounded(process.stdout, limit),  # type: ignore[arg-type]
                                    _read_bounded(process.stderr, limit))  # type: ignore[arg-type]
    if out is None or err is None:
        process.close()
        return None, out, err
    await process.wait_closed()
    return process.exit_status, out, err
