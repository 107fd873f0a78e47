"""Requests, responses and page streams between kcr-migrate and its agents.

Either side of a connection may call methods the other serves (usually the orchestrator calls
and the agent serves). A call is a ``Request`` answered by one ``Response``; errors come back
as ``(code, errno, message, ...)`` and are raised again through ``error_from_wire``, so a
``NoSuchProcess`` on the agent is a ``NoSuchProcess`` here.

Page batches travel beside requests, in either direction. A page stream belongs to one
request: ``PagesBegin(id)``, PAGES frames, ``PagesEnd(id, counts)`` (the receiver checks the
counts). One page stream at a time goes each way; records of other calls keep flowing
between its frames, so control never waits behind bulk data.

Flow control is credit-based, per direction, in raw (uncompressed) page bytes. Each side's
``Hello.window`` says how many bytes it buffers; the sender never has more than that
outstanding (one batch may exceed it when nothing is outstanding), and the receiver returns
``Credit`` as its consumer takes batches: every quarter window, and whenever it has caught
up. The reader task therefore never blocks on a slow consumer, and what a receiver holds is
bounded by its window; what a sender holds is bounded by its ``FramedStream`` caps.

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
import math
import sys
import traceback
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import trio

from transport._nursery import service_nursery
from transport.errors import (
    ChannelClosed,
    MigrationError,
    PeerGone,
    ProtocolError,
    TransportError,
    TransportTimeout,
    error_from_wire,
)
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
from transport.stream import FramedStream, RawBatch

Handler = Callable[..., Awaitable[dict[str, Any] | None]]
ProgressCallback = Callable[[dict[str, Any]], None]
BYE_TIMEOUT = 5.0


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


# --- page streams -------------------------------------------------------------------------

class PageStreamIn:
    """Page batches arriving for one request; iterate it, or ``receive()`` until None."""

    def __init__(self, rpc: RpcPeer, id: int, *, expected: bool) -> None:
        self._rpc = rpc
        self.id = id
        self._tx, self._rx = trio.open_memory_channel[RawBatch | PagesEnd | None](math.inf)
        self.batches = self.pages = self.bytes_raw = 0   # received from the peer
        self.begun = False
        self.ended = not expected
        self.abandoned = False
        self._done = not expected

    # reader side
    def begin(self) -> None:
        if self.begun:
            raise ProtocolError(f"{self._rpc.peer} began the page stream of request {self.id} twice")
        self.begun = True
        self.ended = False
        self._done = False

    def deliver(self, item: RawBatch | PagesEnd | None) -> None:
        if isinstance(item, RawBatch):
            self.batches += 1
            self.pages += item.npages
            self.bytes_raw += item.raw_len
            if self.abandoned:
                self._rpc._credit(item.raw_len, flush=True)
                return
        else:
            self.ended = True
        self._tx.send_nowait(item)

    # consumer side
    async def receive_raw(self) -> RawBatch | None:
        """The next batch as received (to forward it undecoded); None at the end."""
        if self._done:
            return None
        item = await self._rx.receive()
        if isinstance(item, RawBatch):
            self._rpc._credit(item.raw_len, flush=self._rx.statistics().current_buffer_used == 0)
            return item
        self._done = True
        if isinstance(item, PagesEnd):
            if (item.batches, item.pages, item.bytes_raw) != (self.batches, self.pages, self.bytes_raw):
                raise ProtocolError(
                    f"{self._rpc.peer} ended the page stream of request {self.id} with {item.batches} batches, "
                    f"{item.pages} pages, {item.bytes_raw} bytes but {self.batches}, {self.pages}, "
                    f"{self.bytes_raw} arrived: data was lost")
        elif self._rpc.error is not None:
            raise self._rpc.error
        return None

    async def receive(self) -> PageBatch | None:
        """The next batch, decompressed and checked; None at the end of the stream."""
        raw = await self.receive_raw()
        return None if raw is None else await self._rpc.fs.decode(raw)

    def __aiter__(self) -> PageStreamIn:
        return self

    async def __anext__(self) -> PageBatch:
        batch = await self.receive()
        if batch is None:
            raise StopAsyncIteration
        return batch

    def abandon(self) -> None:
        """The consumer is done: credit what is buffered, drop (and credit) whatever still comes."""
        self.abandoned = True
        while True:
            try:
                item = self._rx.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if isinstance(item, RawBatch):
                self._rpc._credit(item.raw_len, flush=True)


class PageStreamOut:
    """The page stream this side sends for one request."""

    def __init__(self, rpc: RpcPeer, id: int) -> None:
        self._rpc = rpc
        self.id = id
        self.batches = self.pages = self.bytes_raw = 0
        self._state = "idle"    # idle -> open -> ended

    async def send(self, batch: PageBatch | RawBatch) -> None:
        rpc = self._rpc
        if self._state == "ended":
            raise ChannelClosed(f"the page stream of request {self.id} is already ended")
        if self._state == "idle":
            await rpc._out_pages.acquire()
            self._state = "open"
            try:
                rpc.fs.post_record(PagesBegin(self.id))
            except TransportError:
                self._release()
                raise
        raw, npages = (batch.raw_len, batch.npages) if isinstance(batch, RawBatch) else (len(batch.data), batch.npages)
        await rpc._acquire_credit(raw)
        try:
            await rpc.fs.send_batch(batch)
        except BaseException:
            rpc._out_outstanding -= raw   # not sent after all
            raise
        self.batches += 1
        self.pages += npages
        self.bytes_raw += raw

    def end(self) -> None:
        """Close the stream (queued; never waits). An unopened stream is opened empty."""
        if self._state == "open":
            try:
                self._rpc.fs.post_record(PagesEnd(self.id, self.batches, self.pages, self.bytes_raw))
            except TransportError:
                pass
            self._release()
        self._state = "ended"

    def _release(self) -> None:
        self._state = "ended"
        self._rpc._out_pages.release()


# --- the two ends of a call ---------------------------------------------------------------

class CallContext:
    """What a handler gets: the request, its uploaded pages, a way to send pages and progress."""

    def __init__(self, rpc: RpcPeer, req: Request) -> None:
        self.rpc = rpc
        self.id = req.id
        self.method = req.method
        self.pages = rpc._open_inbound(req.id, expected=req.upload)
        self._out = PageStreamOut(rpc, req.id)

    @property
    def remote(self) -> Hello:
        return self.rpc.remote

    @property
    def nursery(self) -> trio.Nursery:
        """Tasks started here live as long as the connection."""
        return self.rpc.nursery

    async def send_batch(self, batch: PageBatch | RawBatch) -> None:
        await self._out.send(batch)

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
        self.pages = rpc._inbound[id]           # pages the peer sends back
        self._pending = pending
        self._timeout = timeout
        self._upload = upload
        self._out = PageStreamOut(rpc, id)

    async def send_batch(self, batch: PageBatch | RawBatch) -> None:
        """Upload a batch with this call (open it with ``upload=True``)."""
        if not self._upload:
            raise ChannelClosed(f"call {self.method} was opened without upload=True")
        await self._out.send(batch)

    def end_pages(self) -> None:
        if self._upload and self._out._state == "idle":
            self._out._state = "ended"
            self.rpc.fs.post_record(PagesEnd(self.id, 0, 0, 0))
        self._out.end()

    async def result(self) -> dict[str, Any]:
        """End the upload, wait for the response; raise the remote error if it failed."""
        self.end_pages()
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
            exc = error_from_wire(resp.error.as_dict())
            exc.host = exc.host or self.rpc.host
            raise exc
        return resp.result


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
        self._inbound: dict[int, PageStreamIn] = {}
        self._current_in: PageStreamIn | None = None
        self._out_pages = trio.Semaphore(1)
        self._out_window = remote.window or DEFAULT_WINDOW
        self._out_outstanding = 0
        self._credit_lot = trio.lowlevel.ParkingLot()
        self._in_window = local.window or DEFAULT_WINDOW
        self._in_uncredited = 0
        self._in_consumed = 0
        self._nursery: trio.Nursery | None = None
        self.peak_in_uncredited = 0

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
        self._open_inbound(id, expected=False)
        call = Call(self, id, method, pending, timeout if timeout is not None else self.call_timeout, upload)
        try:
            await self.fs.send_record(Request(id, method, args, upload))
            yield call
            if not pending.done.is_set():
                await call.result()
        finally:
            if not pending.done.is_set() and not self.closed.is_set():
                call.end_pages()
                try:
                    self.fs.post_record(Cancel(id))
                except TransportError:
                    pass
            else:
                call._out.end()
            self._pending.pop(id, None)
            self._close_inbound(id)

    # --- flow control ---

    async def _acquire_credit(self, raw: int) -> None:
        while self._out_outstanding and self._out_outstanding + raw > self._out_window:
            if self.error is not None:
                raise self.error
            if self.closed.is_set():
                raise ChannelClosed(f"the connection to {self.peer} is closed")
            await self._credit_lot.park()
        self._out_outstanding += raw

    def _credit(self, raw: int, *, flush: bool) -> None:
        """The consumer took ``raw`` bytes: return credit in quarter windows, or now if ``flush``."""
        self._in_consumed += raw
        if self._in_consumed and (flush or self._in_consumed >= self._in_window // 4):
            n, self._in_consumed = self._in_consumed, 0
            self._in_uncredited -= n
            try:
                self.fs.post_record(Credit(n))
            except TransportError:
                pass

    # --- inbound page streams ---

    def _open_inbound(self, id: int, *, expected: bool) -> PageStreamIn:
        inb = PageStreamIn(self, id, expected=expected)
        self._inbound[id] = inb
        return inb

    def _close_inbound(self, id: int) -> None:
        inb = self._inbound.pop(id, None)
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
                self.nursery.start_soon(self._serve_call, item)
            elif isinstance(item, Response):
                self._on_response(item)
            elif isinstance(item, Credit):
                if item.bytes > self._out_outstanding:
                    raise ProtocolError(f"{self.peer} returned credit for more page bytes than were sent")
                self._out_outstanding -= item.bytes
                self._credit_lot.unpark_all()
            elif isinstance(item, PagesBegin):
                if self._current_in is not None:
                    raise ProtocolError(f"{self.peer} began a page stream inside another one")
                inb = self._inbound.get(item.id)
                if inb is None:  # a call that is over: drop its pages
                    inb = PageStreamIn(self, item.id, expected=False)
                    inb.abandoned = True
                inb.begin()
                self._current_in = inb
            elif isinstance(item, PagesEnd):
                self._on_pages_end(item)
            elif isinstance(item, Progress):
                pending = self._pending.get(item.id)
                if pending is not None and pending.on_progress is not None:
                    pending.on_progress(item.fields)
            elif isinstance(item, Cancel):
                scope = self._running.get(item.id)
                if scope is not None:
                    scope.cancel()
            elif isinstance(item, Bye):
                self.bye = item
                return
            else:
                raise ProtocolError(f"{self.peer} sent an unexpected {type(item).__name__} record")

    def _on_batch(self, raw: RawBatch) -> None:
        inb = self._current_in
        if inb is None:
            raise ProtocolError(f"{self.peer} sent page data outside a page stream")
        n = raw.raw_len
        if self._in_uncredited > 0 and self._in_uncredited + n > self._in_window:
            raise ProtocolError(f"{self.peer} sent more page data than the flow-control window of "
                                f"{self._in_window} bytes allows")
        self._in_uncredited += n
        self.peak_in_uncredited = max(self.peak_in_uncredited, self._in_uncredited)
        inb.deliver(raw)

    def _on_pages_end(self, end: PagesEnd) -> None:
        current = self._current_in
        if current is not None and current.id == end.id:
            current.deliver(end)
            self._current_in = None
            return
        if (end.batches, end.pages, end.bytes_raw) != (0, 0, 0):
            raise ProtocolError(f"{self.peer} ended page stream {end.id} that it had not begun")
        inb = self._inbound.get(end.id)   # an empty upload: no PagesBegin needed
        if inb is not None and not inb.begun and not inb.ended:
            inb.begin()
            inb.deliver(end)

    def _on_response(self, resp: Response) -> None:
        pending = self._pending.get(resp.id)
        if pending is None:
            return  # a call we gave up on
        inb = self._inbound.get(resp.id)
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
                inb.deliver(None)
        self.closed.set()
        self._credit_lot.unpark_all()

    # --- serving ---

    async def _serve_call(self, req: Request) -> None:
        ctx = CallContext(self, req)
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
                self._close_inbound(req.id)
        if scope.cancelled_caught:
            resp = Response(req.id, False, error=ErrorInfo.of(ChannelClosed(f"{req.method} was cancelled by the caller")))
        try:
            await self.fs.send_record(resp)
        except TransportError:
            pass  # the connection is gone; the reader reports why

    # --- closing ---

    async def aclose(self, reason: str = "") -> None:
        """Say Bye and flush (bounded); the stream itself is closed by its owner."""
        if self.closed.is_set() and self.error is not None:
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
