"""Requests, responses and page streams between kcr-migrate and its agents.

Either side of a connection may call methods the other serves (usually the orchestrator calls
and the agent serves). A call is a ``Request`` answered by one ``Response``; errors come back
as ``(code, errno, message, ...)`` and are raised again through ``error_from_wire``, so a
``NoSuchProcess`` on the agent is a ``NoSuchProcess`` here.

Page batches travel beside requests, in either direction, as page streams that belong to
one request each, under credit-based flow control (``transport.flow``): the reader task
never blocks on a slow consumer, so control records never wait behind bulk data, and what
either side holds stays bounded.

    async with open_rpc(stream, role=ROLE_ORCHESTRATOR, accept_roles=(ROLE_AGENT,)) as rpc:
        info = await rpc.call("info")
        async with rpc.open_call("sink", upload=True) as call:
            for batch in batches:
                await call.send_batch(batch)
            counts = await call.result()
"""
from __future__ import annotations

import inspect
import itertools
import re
import sys
import traceback
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import trio

from transport._nursery import service_nursery
from transport.errors import (
    Cancelled,
    ChannelClosed,
    MigrationError,
    PeerGone,
    ProtocolError,
    TransportError,
    TransportTimeout,
    error_from_wire,
)
from transport.flow import Flow, PageStreamIn, PageStreamOut, is_image_record
from transport.levels import Level
from transport.pages import PageBatch
from transport.protocol import (
    DEFAULT_WINDOW,
    Bye,
    Cancel,
    Credit,
    ErrorInfo,
    Hello,
    PagesBegin,
    PagesEnd,
    Progress,
    Request,
    Response,
    handshake,
    local_hello,
)
from transport.records import Record
from transport.stream import FramedStream, RawBatch

Handler = Callable[..., Awaitable[dict[str, Any] | None]]
ProgressCallback = Callable[[dict[str, Any]], None]
BYE_TIMEOUT = 5.0
SERVED, CALLED = True, False    # whose request an inbound page stream belongs to


class Methods:
    """Method name -> async handler ``handler(ctx: CallContext, **args) -> dict | None``."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, name: str, handler: Handler) -> Handler:
        if name in self._handlers:
            raise ValueError(f"method {name!r} is already registered")
        self._handlers[name] = handler
        return handler

    def method(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator: ``@methods.method("ping")``."""
        return lambda handler: self.register(name, handler)

    def lookup(self, name: str) -> Handler | None:
        return self._handlers.get(name)

    def names(self) -> list[str]:
        return sorted(self._handlers)


# --- the two ends of a call ---------------------------------------------------------------

class CallContext:
    """What a handler gets: the request, its uploaded pages, a way to send pages and progress."""

    def __init__(self, rpc: RpcPeer, req: Request) -> None:
        self.rpc = rpc
        self.id = req.id
        self.method = req.method
        self.pages = rpc._open_inbound(SERVED, req.id, ended=not req.upload)
        self._out = PageStreamOut(rpc.flow, req.id, reply=True)

    @property
    def remote(self) -> Hello:
        return self.rpc.remote

    @property
    def nursery(self) -> trio.Nursery:
        """Tasks started here live as long as the connection."""
        return self.rpc.nursery

    async def send_batch(self, batch: PageBatch | RawBatch) -> None:
        await self._out.send(batch)

    async def send_record(self, rec: Record) -> None:
        """An image record in this call's reply stream, in order with its batches."""
        await self._out.send_record(rec)

    def progress(self, **fields: Any) -> None:
        self.rpc.fs.post_record(Progress(self.id, fields))


class _Pending:
    def __init__(self, method: str, on_progress: ProgressCallback | None) -> None:
        self.method = method
        self.on_progress = on_progress
        self.done = trio.Event()
        self.response: Response | None = None
        self.error: MigrationError | None = None


class Call:
    """The caller's side of a call opened with ``RpcPeer.open_call``."""

    def __init__(self, rpc: RpcPeer, id: int, method: str, pending: _Pending, timeout: float | None,
                 upload: bool) -> None:
        self.rpc = rpc
        self.id = id
        self.method = method
        self.pages = rpc._inbound[(CALLED, id)]   # pages the peer sends back
        self._pending = pending
        self._timeout = timeout
        self._upload = upload
        self._out = PageStreamOut(rpc.flow, id, reply=False, upload=upload)

    async def send_batch(self, batch: PageBatch | RawBatch) -> None:
        """Upload a batch with this call (open it with ``upload=True``)."""
        if not self._upload:
            raise ChannelClosed(f"call {self.method} was opened without upload=True")
        await self._out.send(batch)

    async def send_record(self, rec: Record) -> None:
        """Upload an image record with this call, in order with its batches."""
        if not self._upload:
            raise ChannelClosed(f"call {self.method} was opened without upload=True")
        await self._out.send_record(rec)

    def end_pages(self) -> None:
        """End the upload (``result`` does it too)."""
        self._out.end()

    async def result(self) -> dict[str, Any]:
        """End the upload, wait for the response; raise the remote error if it failed.

        Pages the peer sends back that were not read before this are dropped."""
        self.end_pages()
        self.pages.abandon()
        pending = self._pending
        if self._timeout is None:
            await pending.done.wait()
        else:
            with trio.move_on_after(self._timeout):
                await pending.done.wait()
            if not pending.done.is_set():
                raise TransportTimeout(f"{self.rpc.peer} did not answer {self.method} within {self._timeout:g} s")
        if pending.error is not None:
            raise pending.error
        resp = pending.response
        assert resp is not None
        if resp.error is not None:
            raise as_called(error_from_wire(resp.error.as_dict()), self.rpc.host)
        return resp.result


def as_called(exc: MigrationError, host: str | None) -> MigrationError:
    """``exc`` from the agent the caller knows as ``host``, which names itself by its own
    hostname: in the caller's words (``localhost``, an ssh alias), as the user typed them.
    Only where agents' messages put a host (first, or after "on " or "and "), so a host name
    that is also a word or part of a path is left alone elsewhere."""
    if host:
        if exc.host and exc.host != host:
            own = re.compile(rf"(?:^|(?<=\bon )|(?<=\band )){re.escape(exc.host)}(?![\w/-]|\.\w)")
            exc.message = own.sub(host, exc.message)
            exc.args = (exc.message,)
        exc.host = host
    return exc


# --- the peer -----------------------------------------------------------------------------

class RpcPeer:
    """One end of an RPC connection; ``run`` is its reader task (``open_rpc`` starts it)."""

    def __init__(self, fs: FramedStream, *, local: Hello, remote: Hello, methods: Methods | None = None,
                 host: str | None = None, call_timeout: float | None = None) -> None:
        self.fs = fs
        self.local = local
        self.remote = remote
        self.methods = methods
        self.host = host
        self.peer = fs.peer
        self.call_timeout = call_timeout
        self.error: MigrationError | None = None    # why the connection ended, if not cleanly
        self.bye: Bye | None = None
        self.closed = trio.Event()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._running: dict[int, trio.CancelScope] = {}
        # Inbound page streams by (SERVED, id) for requests we serve, (CALLED, id) for our calls:
        # each side numbers its own requests.
        self._inbound: dict[tuple[bool, int], PageStreamIn] = {}
        self._current_in: PageStreamIn | None = None
        self._current_key = (SERVED, 0)
        self.flow = Flow(fs, send_window=remote.window, receive_window=local.window)
        self._nursery: trio.Nursery | None = None
        self.abandoned = False

    @property
    def nursery(self) -> trio.Nursery:
        assert self._nursery is not None, "RpcPeer.run is not running"
        return self._nursery

    # --- calling ---

    async def call(self, method: str, *, timeout: float | None = None,
                   on_progress: ProgressCallback | None = None, **args: Any) -> dict[str, Any]:
        """Call ``method`` on the peer and return its result map."""
        async with self.open_call(method, timeout=timeout, on_progress=on_progress, **args) as c:
            return await c.result()

    @asynccontextmanager
    async def open_call(self, method: str, *, upload: bool = False, timeout: float | None = None,
                        on_progress: ProgressCallback | None = None, **args: Any) -> AsyncIterator[Call]:
        """A call with page streams: ``send_batch`` uploads (``upload=True``), ``call.pages``
        downloads, ``result()`` ends the upload and waits for the response. Leaving the block
        early cancels the call on the peer."""
        if self.error is not None:
            raise self.error
        if self.closed.is_set():
            raise ChannelClosed(f"the connection to {self.peer} is closed")
        id = next(self._ids)
        pending = _Pending(method, on_progress)
        self._pending[id] = pending
        self._open_inbound(CALLED, id, ended=False)
        call = Call(self, id, method, pending, timeout if timeout is not None else self.call_timeout, upload)
        try:
            await self.fs.send_record(Request(id, method, args, upload))
            yield call
            if not pending.done.is_set():
                await call.result()
        finally:
            call.end_pages()
            if not pending.done.is_set() and not self.closed.is_set():
                try:
                    self.fs.post_record(Cancel(id))
                except TransportError:
                    pass  # the connection is gone; its reader reports why
            self._pending.pop(id, None)
            self._close_inbound(CALLED, id)

    # --- inbound page streams ---

    def _open_inbound(self, served: bool, id: int, *, ended: bool) -> PageStreamIn:
        inb = PageStreamIn(self.flow, id, ended=ended)
        self._inbound[(served, id)] = inb
        return inb

    def _close_inbound(self, served: bool, id: int) -> None:
        inb = self._inbound.pop((served, id), None)
        if inb is not None:
            inb.abandon()

    # --- the reader ---

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read and dispatch until the peer says Bye, the stream ends or breaks."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                try:
                    await self._read_loop()
                except MigrationError as exc:
                    self.error = exc
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._shutdown()

    async def _read_loop(self) -> None:
        while True:
            try:
                item = await self.fs.receive_item()
            except ChannelClosed:
                return  # we closed it
            if item is None:
                if self.bye is None:
                    raise PeerGone(f"{self.peer} closed the connection without saying goodbye")
                return
            if isinstance(item, RawBatch):
                self._on_batch(item)
            elif isinstance(item, Request):
                if (SERVED, item.id) in self._inbound:
                    raise ProtocolError(f"{self.peer} reused request id {item.id} while it was running")
                # The context (and its inbound page stream) exists before the next frame is read.
                self.nursery.start_soon(self._serve_call, item, CallContext(self, item))
            elif isinstance(item, Response):
                self._on_response(item)
            elif isinstance(item, Credit):
                self.flow.on_credit(item.bytes)
            elif isinstance(item, PagesBegin):
                if self._current_in is not None:
                    raise ProtocolError(f"{self.peer} began a page stream inside another one")
                key = (not item.reply, item.id)
                inb = self._inbound.get(key)
                if inb is None:  # a call that is over: drop its pages
                    inb = PageStreamIn(self.flow, item.id, ended=True)
                    inb.abandoned = True
                inb.begin()
                self._current_in, self._current_key = inb, key
            elif isinstance(item, PagesEnd):
                self._on_pages_end(item)
            elif isinstance(item, Progress):
                self._on_progress(item)
            elif isinstance(item, Cancel):
                scope = self._running.get(item.id)
                if scope is not None:
                    scope.cancel()
            elif isinstance(item, Bye):
                self.bye = item
                return
            elif is_image_record(item):
                if self._current_in is None:
                    raise ProtocolError(f"{self.peer} sent a {type(item).__name__} record outside a page stream")
                self._current_in.deliver(item)
            else:
                raise ProtocolError(f"{self.peer} sent an unexpected {type(item).__name__} record")

    def _on_batch(self, raw: RawBatch) -> None:
        inb = self._current_in
        if inb is None:
            raise ProtocolError(f"{self.peer} sent page data outside a page stream")
        self.flow.on_batch(raw.raw_len)
        inb.deliver(raw)

    def _on_pages_end(self, end: PagesEnd) -> None:
        current = self._current_in
        if current is not None and self._current_key == (not end.reply, end.id):
            current.deliver(end)
            self._current_in = None
            return
        if (end.batches, end.pages, end.bytes_raw) != (0, 0, 0):
            raise ProtocolError(f"{self.peer} ended page stream {end.id} that it had not begun")
        inb = self._inbound.get((SERVED, end.id))   # an empty upload: no PagesBegin needed
        if inb is not None and not inb.begun and not inb.ended:
            inb.begin()
            inb.deliver(end)

    def _on_progress(self, progress: Progress) -> None:
        pending = self._pending.get(progress.id)
        if pending is not None and pending.on_progress is not None:
            try:
                pending.on_progress(progress.fields)
            except Exception:  # a bug in the callback must not cut the connection
                traceback.print_exc(file=sys.stderr)

    def _on_response(self, resp: Response) -> None:
        pending = self._pending.get(resp.id)
        if pending is None:
            return  # a call we gave up on
        inb = self._inbound.get((CALLED, resp.id))
        if inb is not None and not inb.begun:
            inb.deliver(None)
        elif inb is not None and not inb.ended:
            raise ProtocolError(f"{self.peer} answered request {resp.id} inside its page stream")
        pending.response = resp
        pending.done.set()

    def _shutdown(self) -> None:
        """The reader stopped: fail every waiter with why."""
        if self.error is not None:
            err: MigrationError = self.error
        elif self.bye is not None:
            reason = f": {self.bye.reason}" if self.bye.reason else ""
            err = PeerGone(f"{self.peer} closed the connection{reason}")
        else:
            err = ChannelClosed(f"the connection to {self.peer} was closed on this side")
        for pending in self._pending.values():
            if not pending.done.is_set():
                pending.error = err if isinstance(err, ChannelClosed) else type(err)(
                    f"{err.message} (while {pending.method} was running)")
                pending.done.set()
        for inb in self._inbound.values():
            if not inb.ended:
                inb.deliver(err)
        self.closed.set()
        self.flow.close(err)

    # --- serving ---

    async def _serve_call(self, req: Request, ctx: CallContext) -> None:
        handler = self.methods.lookup(req.method) if self.methods is not None else None
        resp: Response
        with trio.CancelScope() as scope:
            self._running[req.id] = scope
            try:
                if handler is None:
                    known = ", ".join(self.methods.names()) if self.methods is not None else "none"
                    raise ProtocolError(f"unknown method {req.method!r} (this agent serves: {known}): "
                                        "install the same kcr-migrate version on both hosts")
                try:
                    inspect.signature(handler).bind(ctx, **req.args)
                except TypeError as exc:
                    raise ProtocolError(f"bad arguments for {req.method}: {exc}") from None
                result = await handler(ctx, **req.args)
                resp = Response(req.id, True, result or {})
            except MigrationError as exc:
                resp = Response(req.id, False, error=ErrorInfo.of(exc))
            except Exception as exc:  # a bug in a handler: report it, keep serving
                traceback.print_exc(file=sys.stderr)
                resp = Response(req.id, False, error=ErrorInfo.of(MigrationError(
                    f"internal error in {req.method}: {type(exc).__name__}: {exc} (a bug: please report it)")))
            finally:
                self._running.pop(req.id, None)
                ctx._out.end()
                self._close_inbound(SERVED, req.id)
        if scope.cancelled_caught:
            resp = Response(req.id, False, error=ErrorInfo.of(Cancelled(f"{req.method} was cancelled by the caller")))
        try:
            try:
                await self.fs.send_record(resp)
            except (TypeError, ValueError, OverflowError) as exc:  # msgpack: not plain data
                await self.fs.send_record(Response(req.id, False, error=ErrorInfo.of(MigrationError(
                    f"internal error in {req.method}: its result is not plain data ({exc}) (a bug: please report it)"))))
        except TransportError:
            pass  # the connection is gone; the reader reports why

    # --- closing ---

    def abandon(self, error: MigrationError) -> None:
        """The peer stopped answering: close without waiting for it (no Bye, no flush)."""
        self.abandoned = True
        if self.error is None:
            self.error = error
        self.fs.abandon()
        self.flow.close(error)

    async def aclose(self, reason: str = "") -> None:
        """Say Bye and flush (bounded); the stream itself is closed by its owner."""
        if (self.closed.is_set() and self.error is not None) or self.abandoned:
            return
        with trio.move_on_after(BYE_TIMEOUT) as scope:
            scope.shield = True
            try:
                await self.fs.send_record(Bye(reason))
            except TransportError:
                pass


@asynccontextmanager
async def open_rpc(stream: trio.abc.Stream, *, role: str, accept_roles: tuple[str, ...],
                   methods: Methods | None = None, peer: str = "the peer", host: str | None = None,
                   level: Level = 1, window: int = DEFAULT_WINDOW, xsave_mask: int = 0,
                   handshake_timeout: float | None = 30.0, call_timeout: float | None = None,
                   **stream_options: Any) -> AsyncIterator[RpcPeer]:
    """Frame ``stream``, exchange Hellos, run the reader; say Bye and close on the way out.

    ``stream_options`` go to ``FramedStream`` (max_in_flight, max_bytes_held, frame_timeout, ...).
    """
    async with FramedStream(stream, peer=peer, level=level, **stream_options) as fs:
        ours = local_hello(role, window=window, xsave_mask=xsave_mask)
        theirs = await handshake(fs, ours, accept_roles=accept_roles, timeout=handshake_timeout)
        rpc = RpcPeer(fs, local=ours, remote=theirs, methods=methods, host=host, call_timeout=call_timeout)
        async with service_nursery() as nursery:
            await nursery.start(rpc.run)
            try:
                yield rpc
            finally:
                if not rpc.closed.is_set():
                    await rpc.aclose()
                nursery.cancel_scope.cancel()


async def serve_rpc(stream: trio.abc.Stream, methods: Methods, *, role: str, accept_roles: tuple[str, ...],
                    peer: str = "the peer", **options: Any) -> RpcPeer:
    """Serve ``methods`` on ``stream`` until the peer leaves; returns the finished peer
    (``error`` says why it ended if not with a Bye)."""
    async with open_rpc(stream, role=role, accept_roles=accept_roles, methods=methods, peer=peer,
                        **options) as rpc:
        await rpc.closed.wait()
    return rpc
