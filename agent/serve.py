"""`kcr-agent serve`: the agent's request server and its generic methods.

The agent serves ``METHODS`` on stdin/stdout (``serve --stdio``: started by kcr-migrate over
SSH or a local socketpair), and ``DATA_METHODS`` (page sinks only: their peer proved the
migration key, it did not log in) on the direct data channels it is asked to listen on.
Adding a method is one registration::

    @method("name")
    async def name(ctx: CallContext, *, arg: int) -> dict[str, Any]: ...

Generic methods: ``hello``, ``info``, ``ping``, ``measure`` (``agent.measure``: the host and its
candidate processes, for the rebalancer), ``sink`` (receive page batches and count
them), ``source_synthetic`` (send realistic page batches: back to the caller, or to another
agent over a local, tcp or ssh channel), ``data_listen`` (accept direct TCP data channels).
The migration roles (source, destination) add their methods the same way.
"""
from __future__ import annotations

import os
import platform
import select
import socket
import sys
import time
from contextlib import AsyncExitStack
from typing import Any, Callable

import trio

from migrate.phases import Failure
from precopy.kernel import boot_id, xsave_supported_mask
from transport.errors import MigrationError, PeerGone, ProtocolError
from transport.levels import Level, check_level
from transport.local import open_local_agent, stdio_stream
from transport.pages import DEFAULT_BATCH_BYTES
from transport.protocol import PROTOCOL_VERSION, ROLE_AGENT, ROLE_DATA, ROLE_ORCHESTRATOR, tool_version
from transport.records import Record
from transport.rpc import CallContext, Methods, RpcPeer, open_rpc, serve_rpc
from transport.schema import prepare_codecs
from transport.synthetic import SyntheticPages
from transport.tcp import KEY_SIZE, DataListener, SealedStream, open_data_channel, open_data_listener

METHODS = Methods()
method = METHODS.method
# What a direct data channel may ask for: its peer proved the migration key, not a login.
DATA_METHODS = Methods()
SERVE_ROLES = (ROLE_ORCHESTRATOR, ROLE_AGENT)


def _xsave_mask() -> int:
    try:
        return xsave_supported_mask()
    except OSError:
        return 0


def _hello_map(rec: Record) -> dict[str, Any]:
    return {k: v for k, v in rec.to_wire().items() if k not in ("t", "v")}


def _ssh_address(field: int) -> str:
    """From SSH_CONNECTION: the address kcr-migrate's host connected from (0), or the one it
    reached this host on (2): where a data channel can connect to either."""
    fields = os.environ.get("SSH_CONNECTION", "").split()
    return fields[field] if len(fields) >= 4 else ""



@method("ping")
async def ping(ctx: CallContext, **echo: Any) -> dict[str, Any]:
    return {"echo": echo}


@method("hello")
async def hello(ctx: CallContext) -> dict[str, Any]:
    """Both Hellos of this connection, as this agent saw them."""
    return {"agent": _hello_map(ctx.rpc.local), "caller": _hello_map(ctx.remote)}


@method("info")
async def info(ctx: CallContext) -> dict[str, Any]:
    return {
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "netns_inode": os.stat("/proc/self/ns/net").st_ino,
        "mntns_inode": os.stat("/proc/self/ns/mnt").st_ino,
        "kernel_release": platform.release(),
        "boot_id": boot_id(),
        "ssh_server_address": _ssh_address(2),
        "ssh_client_address": _ssh_address(0),
        "arch": platform.machine(),
        "xsave_mask": _xsave_mask(),
        "protocol_version": PROTOCOL_VERSION,
        "tool_version": tool_version(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count() or 1,
        "methods": METHODS.names(),
    }


@method("sink")
async def sink(ctx: CallContext, *, expect_batches: int | None = None,
               expect_bytes: int | None = None) -> dict[str, Any]:
    """Receive the uploaded page batches, check every one, and count them."""
    wire0 = ctx.rpc.fs.stats.received.bytes_on_wire
    t0 = time.monotonic()
    batches = pages = nbytes = 0
    async for batch in ctx.pages:
        batches += 1
        pages += batch.npages
        nbytes += len(batch.data)
    seconds = time.monotonic() - t0
    if expect_batches is not None and batches != expect_batches:
        raise ProtocolError(f"sink expected {expect_batches} page batches, got {batches}")
    if expect_bytes is not None and nbytes != expect_bytes:
        raise ProtocolError(f"sink expected {expect_bytes} page bytes, got {nbytes}")
    return {"batches": batches, "pages": pages, "bytes_raw": nbytes, "seconds": seconds,
            "bytes_on_wire": ctx.rpc.fs.stats.received.bytes_on_wire - wire0,
            "hostname": socket.gethostname(), "netns_inode": os.stat("/proc/self/ns/net").st_ino}


_POOLS: dict[tuple[int, int], SyntheticPages] = {}


async def _pool(batch_bytes: int, seed: int) -> SyntheticPages:
    pool = _POOLS.get((batch_bytes, seed))
    if pool is None:
        pool = await trio.to_thread.run_sync(lambda: SyntheticPages(batch_bytes=batch_bytes, seed=seed))
        _POOLS[(batch_bytes, seed)] = pool
    return pool


async def _open_target(stack: AsyncExitStack, to: dict[str, Any], level: Level) -> RpcPeer:
    """A connection to the agent named by ``to`` (see ``source_synthetic``)."""
    kind = to.get("kind")
    if kind == "local":
        return await stack.enter_async_context(open_local_agent(level=level))
    if kind == "tcp":
        key = to.get("key")
        if not isinstance(key, bytes) or len(key) != KEY_SIZE:
            raise ProtocolError(f"source_synthetic: a tcp target needs a {KEY_SIZE}-byte key")
        return await stack.enter_async_context(open_data_channel(str(to["address"]), int(to["port"]), key=key,
                                                                 level=level))
    if kind == "ssh":
        from transport.ssh import open_ssh_agent     # asyncssh: a fifth of an agent's start-up, only here
        return await stack.enter_async_context(open_ssh_agent(
            str(to["host"]), ssh_config=to.get("ssh_config"), level=level))
    raise ProtocolError(f"source_synthetic: unknown target kind {kind!r} (use local, tcp or ssh)")


DATA_METHODS.register("ping", ping)
DATA_METHODS.register("sink", sink)


@method("source_synthetic")
async def source_synthetic(ctx: CallContext, *, total_bytes: int, level: int | str | None = "auto",
                           batch_bytes: int = DEFAULT_BATCH_BYTES, seed: int = 0,
                           to: dict[str, Any] | None = None) -> dict[str, Any]:
    """Send ``total_bytes`` of realistic pages: back to the caller as this call's page stream,
    or (``to``) uploaded to the ``sink`` of another agent reached by
    ``{"kind": "local"}``, ``{"kind": "tcp", "address", "port", "key"}`` or
    ``{"kind": "ssh", "host", "ssh_config"}``. Times the transfer, not the connection setup."""
    try:
        check_level(level)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    pool = await _pool(batch_bytes, seed)
    async with AsyncExitStack() as stack:
        t_setup = time.monotonic()
        if to is None:
            fs = ctx.rpc.fs
            fs.set_level(level)  # type: ignore[arg-type]
            send = ctx.send_batch
            target = None
        else:
            target = await _open_target(stack, to, level)  # type: ignore[arg-type]
            fs = target.fs
        setup = time.monotonic() - t_setup
        stats0 = (fs.stats.sent.bytes_raw, fs.stats.sent.bytes_on_wire)
        t0 = time.monotonic()
        sink_result: dict[str, Any] = {}
        if target is None:
            for batch in pool.batches(total_bytes):
                await send(batch)
            await fs.flush()
        else:
            async with target.open_call("sink", upload=True) as call:
                for batch in pool.batches(total_bytes):
                    await call.send_batch(batch)
                sink_result = await call.result()
        seconds = time.monotonic() - t0
        return {"seconds": seconds, "setup_seconds": setup,
                "bytes_raw": fs.stats.sent.bytes_raw - stats0[0],
                "bytes_on_wire": fs.stats.sent.bytes_on_wire - stats0[1],
                "batches_by_level": dict(fs.stats.batches_by_level),
                "peak_bytes_held": fs.stats.peak_bytes_held, "sink": sink_result}


@method("data_listen")
async def data_listen(ctx: CallContext, *, key: bytes, address: str = "0.0.0.0", port: int = 0) -> dict[str, Any]:
    """Accept direct data channels (authenticated with ``key``) and serve DATA_METHODS on
    them, for as long as this connection lasts. Returns the port."""
    if len(key) != KEY_SIZE:
        raise ProtocolError(f"data_listen needs a {KEY_SIZE}-byte key")
    listener = await open_data_listener(address, port, key=key)
    await ctx.nursery.start(_serve_data, listener)
    return {"address": address, "port": listener.port}


async def _serve_data(listener: DataListener, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    await listener.serve(_serve_one_data_channel, task_status=task_status)


async def _serve_one_data_channel(stream: SealedStream, address: str) -> None:
    try:
        rpc = await serve_rpc(stream, DATA_METHODS, role=ROLE_AGENT, accept_roles=(ROLE_DATA,),
                              peer=f"the data channel from {address}", xsave_mask=_xsave_mask())
    except MigrationError as exc:
        print(f"kcr-agent: data channel from {address}: {exc}", file=sys.stderr)
        return
    if rpc.error is not None:
        print(f"kcr-agent: data channel from {address}: {rpc.error}", file=sys.stderr)


# --- the migration roles -------------------------------------------------------------------

from agent import destination, source  # noqa: E402  (they register below)

_ROLES: dict[str, Any] = {**source.METHODS, **destination.METHODS}
for _name, _handler in _ROLES.items():
    METHODS.register(_name, _handler)

from agent import fs_btrfs, fs_rsync, fsync, measure  # noqa: E402  (the filesystem hooks' methods, measure)

_FS_ROLES: dict[str, Any] = {**fsync.METHODS, **fs_rsync.METHODS, **fs_btrfs.METHODS, **measure.METHODS}
for _name, _handler in _FS_ROLES.items():
    METHODS.register(_name, _handler)

# A data channel may deliver a migration's stream to the session its token names.
DATA_METHODS.register("dest_receive", destination.dest_receive)

# Per connection: how long kcr-migrate may stay silent before the agent settles on its own.
INPUT_GRACE_S = 1.0
_LINKS: dict[int, dict[str, float]] = {}


@method("keepalive")
async def keepalive(ctx: CallContext, *, link_timeout: float) -> dict[str, Any]:
    """kcr-migrate is alive. If it then stays silent for ``link_timeout`` seconds (a cut link
    that never closes), this agent settles what it holds as the protocol core says for its
    state (``migrate.phases``): a copy not told to go is destroyed, a source process runs on
    (or, past the point of no return, stays stopped)."""
    if not isinstance(link_timeout, (int, float)) or not 0 < link_timeout <= 24 * 3600:
        raise ProtocolError(f"keepalive: a link timeout of {link_timeout!r} s")
    _LINKS[id(ctx.rpc)] = {"timeout": float(link_timeout), "last": time.monotonic()}
    return {"monotonic_ns": time.monotonic_ns()}


@method("clock")
async def clock(ctx: CallContext) -> dict[str, Any]:
    """This host's CLOCK_MONOTONIC, for kcr-migrate to relate the agents' timestamps."""
    return {"monotonic_ns": time.monotonic_ns()}


async def _watchdog(rpc: RpcPeer, serving: trio.CancelScope, waiting: Callable[[], bool]) -> None:
    """End the connection once kcr-migrate has been silent longer than it asked: a cut link
    keeps the connection open (ssh sees no end), so only the silence tells. The calls still
    running are cancelled and the connection is left at once, without waiting on the peer;
    then whatever it held is settled (``_settle``).

    Words that arrived but were not read yet (``waiting``: this agent was stopped or starved
    meanwhile) are not silence: they are read first (for up to a second), so a request that
    reached us, GO among them, is carried out or refused, never dropped unread.

    Returns once it ended the connection: the sessions then settle as for ``Failure.LINK_LOST``."""
    while not rpc.closed.is_set():
        await trio.sleep(0.25)
        link = _LINKS.get(id(rpc))
        now = time.monotonic()
        if link and now - link["last"] > link["timeout"]:
            if waiting() and now - link.setdefault("waiting_since", now) < INPUT_GRACE_S:
                continue
            print(f"kcr-agent: no word from kcr-migrate for {link['timeout']:g} s: settling and exiting",
                  file=sys.stderr)
            rpc.abandon(PeerGone(f"kcr-migrate was silent for {link['timeout']:g} s"))
            link["lost"] = True
            serving.cancel()
            return


def _settle(rpc: object) -> None:
    """The connection is over: settle whatever it left (blocking), each role by the protocol
    core's rule for its state and for how the connection ended (silent, or closed)."""
    link = _LINKS.pop(id(rpc), None)
    failure = Failure.LINK_LOST if link and link.get("lost") else Failure.PEER_DIED
    destination.close_sessions(rpc, failure)
    source.close_sessions(rpc, failure)


def _input_waiting(stream: trio.abc.Stream) -> Callable[[], bool]:
    """Whether input (or its end) waits to be read on ``stream`` (``stdio_stream``'s)."""
    if isinstance(stream, trio.StapledStream) and isinstance(stream.receive_stream, trio.lowlevel.FdStream):
        fd = stream.receive_stream.fileno()
    elif isinstance(stream, trio.SocketStream):
        fd = stream.socket.fileno()
    else:
        return lambda: False

    def waiting() -> bool:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return waiting


async def serve_stdio() -> int:
    """Serve METHODS on stdin/stdout until the caller leaves; the exit status."""
    stream = stdio_stream()
    rpc: RpcPeer | None = None
    prepare_codecs()          # every record type's encoder and decoder, long before any freeze
    try:
        async with open_rpc(stream, role=ROLE_AGENT, accept_roles=SERVE_ROLES, methods=METHODS,
                            peer="kcr-migrate (stdin/stdout)", xsave_mask=_xsave_mask()) as rpc:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watchdog, rpc, nursery.cancel_scope, _input_waiting(stream))
                await rpc.closed.wait()
                nursery.cancel_scope.cancel()
    except MigrationError as exc:
        print(f"kcr-agent: {exc}", file=sys.stderr)
        return 1
    finally:
        if rpc is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_settle, rpc)
    if rpc.error is not None:
        print(f"kcr-agent: {rpc.error}", file=sys.stderr)
        return 1
    return 0
