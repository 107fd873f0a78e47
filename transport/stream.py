"""FramedStream: records and page batches over any trio byte stream.

The bytes are an image stream (``transport.framing``): the stream magic, then frames, so a
file and a live stream are read by the same decoder.

Sending. ``send_record`` queues a record and returns once it is written; ``queue_record`` (a
record among page batches) returns once it fits in what the sender may hold. ``send_batch`` queues
a page batch and returns as soon as it is accepted: batches are compressed in worker threads,
several at a time (zstd releases the GIL), and written strictly in the order they were queued,
records included, by one sender task. So reading the next batch, compressing the ones before
and writing older ones overlap. What the sender holds is bounded: at most ``max_in_flight``
batches and ``max_bytes_held`` bytes (their raw buffers plus compressed output, counted in
``stats.bytes_held`` and ``stats.peak_bytes_held``); a caller that would exceed either waits.
A peer that stops reading fills the transport's buffers, writing stalls, then ``send_batch``
does: the source never buffers without bound.

Receiving. ``receive_item`` returns the next ``Record``, a ``RawBatch`` (a PAGES frame whose
checksum matched, not yet decompressed), or None at a clean end of stream; ``receive`` also
decompresses batches (in a worker thread). Frame lengths are capped before anything is
buffered for them; a frame begun must go on arriving (``frame_timeout`` of silence raises
``TransportTimeout``); an end of stream inside a frame is ``TruncatedStream``. Every failure is
an error from ``transport.errors``: ``PeerGone`` when the peer broke the connection,
``ChannelClosed`` when this side closed it.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator

import trio

from transport._nursery import service_nursery
from transport.errors import (
    ChannelClosed,
    MigrationError,
    PeerGone,
    ProtocolError,
    TransportError,
    TransportTimeout,
)
from transport.framing import KIND_PAGES, KIND_RECORD, KIND_TAG, STREAM_MAGIC, Frame, FrameDecoder, frame_header
from transport.frozen import frozen
from transport.levels import Level, LevelController
from transport.pages import (
    BATCH_HEAD,
    MAX_BATCH_RAW,
    RUN,
    EncodedBatch,
    PageBatch,
    decode_batch,
    encode_batch,
)
from transport.records import Record
from transport.schema import PAGE_SIZE, decode_record

RECEIVE_SIZE = 256 << 10      # bytes asked of the transport per read, at least
MAX_RECEIVE = 1 << 20         # and at most: the decoder holds at most one frame plus this (or one record)
DEFAULT_MAX_IN_FLIGHT = 4
DEFAULT_MAX_BYTES_HELD = 32 << 20
DEFAULT_FRAME_TIMEOUT = 60.0
CLOSE_TIMEOUT = 5.0


@dataclass
class Counters:
    records: int = 0
    batches: int = 0
    pages: int = 0
    bytes_raw: int = 0        # page bytes before compression
    bytes_on_wire: int = 0    # every byte: stream magic, headers, records, page frames


@dataclass
class StreamStats:
    sent: Counters = field(default_factory=Counters)
    received: Counters = field(default_factory=Counters)
    bytes_held: int = 0       # bytes queued to send in this process: batches (raw + compressed), ``queue_record``s
    peak_bytes_held: int = 0
    compress_wait_s: float = 0.0   # the sender waiting for compression
    write_s: float = 0.0           # the sender writing page frames
    batches_by_level: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@frozen
class RawBatch:
    """A received PAGES frame whose checksum matched; ``decode_batch`` does the rest."""

    flags: int
    payload: bytes | bytearray | memoryview
    crc: int | None = None     # the frame's checksum, checked on receipt: forwarding reuses it

    @property
    def raw_len(self) -> int:
        return int(BATCH_HEAD.unpack_from(self.payload)[1])

    @property
    def npages(self) -> int:
        return self.raw_len // PAGE_SIZE

    @classmethod
    def from_frame(cls, frame: Frame) -> RawBatch:
        if len(frame.payload) < BATCH_HEAD.size:
            raise ProtocolError("page batch shorter than its header")
        raw_len = BATCH_HEAD.unpack_from(frame.payload)[1]
        if raw_len == 0 or raw_len > MAX_BATCH_RAW or raw_len % PAGE_SIZE:
            raise ProtocolError(f"page batch of {raw_len} bytes")
        return cls(frame.flags, frame.payload, frame.crc)


Item = Record | RawBatch


class _Out:
    """One frame waiting in the send queue."""

    __slots__ = ("kind", "parts", "ready", "sent", "error", "batch_raw", "batch_pages", "held", "level",
                 "compress_s")

    def __init__(self, kind: str, parts: tuple[bytes | bytearray | memoryview, ...] = (), *,
                 ready: bool = True) -> None:
        self.kind = kind             # "magic", "record" or "batch"
        self.parts = parts
        self.ready = trio.Event()
        if ready:
            self.ready.set()
        self.sent = trio.Event()
        self.error: TransportError | None = None
        self.batch_raw = -1          # >= 0 for page batches
        self.batch_pages = 0
        self.held = 0
        self.level: str = "raw"
        self.compress_s = 0.0


def _encode_frame(batch: PageBatch, level: int | None) -> tuple[bytes, EncodedBatch, float]:
    """Compress a batch and make its frame header (worker thread: both release the GIL);
    also the thread time compression took."""
    t0 = time.perf_counter()
    enc = encode_batch(batch, level)
    took = time.perf_counter() - t0
    header = frame_header(KIND_PAGES, enc.flags, enc.parts)
    return header + enc.parts[0], enc, took


class FramedStream:
    """Records and page batches over a trio ``Stream``; ``async with`` runs its sender task."""

    def __init__(self, stream: trio.abc.Stream, *, peer: str = "the peer", level: Level = 1,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, max_bytes_held: int = DEFAULT_MAX_BYTES_HELD,
                 max_payload: int | None = None, frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT,
                 workers: int | None = None) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.peer = peer
        self.stats = StreamStats()
        self.max_in_flight = max_in_flight
        self.max_bytes_held = max_bytes_held
        self.frame_timeout = frame_timeout
        self._stream = stream
        # A stream of records (the sealed data channel) takes a frame's parts in one call and
        # hands back whole records: asked for a frame's length, it returns the frame uncopied.
        self._send_parts = getattr(stream, "send_parts", None)
        self._max_record = int(getattr(stream, "max_record", 0))
        self._decoder = FrameDecoder(max_payload=max_payload)
        self._limiter = trio.CapacityLimiter(workers or min(max_in_flight, os.cpu_count() or 1))
        self.levels: LevelController
        self.set_level(level)
        self._queue_tx, self._queue_rx = trio.open_memory_channel[_Out](math.inf)
        self._space = trio.lowlevel.ParkingLot()
        self._held_batches = 0
        self._last: _Out | None = None
        self._send_error: TransportError | None = None
        self._send_error_raised = False    # the caller has seen it (then closing does not repeat it)
        self._receive_error: MigrationError | None = None
        self._eof = False
        self._nursery: trio.Nursery | None = None
        self._cm: Any = None

    # --- lifetime ---------------------------------------------------------------------

    async def __aenter__(self) -> FramedStream:
        self._cm = self._lifetime()
        return await self._cm.__aenter__()  # type: ignore[no-any-return]

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._cm.__aexit__(*exc_info)  # type: ignore[no-any-return]

    @asynccontextmanager
    async def _lifetime(self) -> AsyncIterator[FramedStream]:
        try:
            async with service_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._sender)
                self._enqueue(_Out("magic", (STREAM_MAGIC,)))
                try:
                    yield self
                    await self._flush_before_close()
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._fail_sends(ChannelClosed(f"the stream to {self.peer} was closed on this side"))
            await self.aclose_transport()

    async def _flush_before_close(self) -> None:
        if self._send_error_raised:
            return
        with trio.move_on_after(self.frame_timeout if self.frame_timeout is not None else math.inf) as scope:
            await self.flush()
        if scope.cancelled_caught:
            raise TransportTimeout(f"{self.peer} read nothing of what was left to send for "
                                   f"{self.frame_timeout:g} s: closing")

    @property
    def transport(self) -> trio.abc.Stream:
        """The byte stream underneath."""
        return self._stream

    def abandon(self) -> None:
        """Closing will not wait for the peer to read what is left (it stopped reading)."""
        self._send_error_raised = True

    def set_level(self, level: Level) -> None:
        """Compression for batches queued from now on: None, a zstd level, or "auto"."""
        self.levels = LevelController(level, settle=self.max_in_flight)

    async def aclose_transport(self) -> None:
        """Close the underlying stream (bounded, shielded): the peer sees the end of the stream."""
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            await self._stream.aclose()

    # --- sending ----------------------------------------------------------------------

    def _check_send(self) -> None:
        if self._send_error is not None:
            self._send_error_raised = True
            raise self._send_error
        if self._nursery is None:
            raise ChannelClosed("the stream is not open: use `async with FramedStream(...)`")

    def _enqueue(self, out: _Out) -> None:
        self._check_send()
        self._queue_tx.send_nowait(out)
        self._last = out

    def _record_out(self, rec: Record) -> _Out:
        payload = rec.pack()
        return _Out("record", (frame_header(KIND_RECORD, 0, [payload]) + payload,))

    async def send_record(self, rec: Record) -> None:
        """Queue ``rec`` after everything queued before it; return once it is written."""
        out = self._record_out(rec)
        self._enqueue(out)
        await out.sent.wait()
        if out.error is not None:
            self._send_error_raised = True
            raise out.error

    def post_record(self, rec: Record) -> None:
        """Queue a (small) record without waiting: for control records sent by a reader task."""
        self._enqueue(self._record_out(rec))

    async def queue_record(self, rec: Record) -> None:
        """Queue ``rec`` after everything queued before it without waiting until those are
        written: its bytes count in ``bytes_held`` until it is, and it waits only for room
        there, as a batch does. For records among page batches (a page stream's layouts and
        process records: waiting for each to be written would drain the batches' pipeline
        before every one). A failure to write it is raised by a later send or ``flush``."""
        out = self._record_out(rec)
        size = len(out.parts[0])
        await self._reserve(size, batch=False)
        out.held = size
        try:
            self._enqueue(out)
        except TransportError:
            self._release(out)
            raise

    async def _reserve(self, nbytes: int, *, batch: bool = True) -> None:
        while True:
            self._check_send()
            held = self.stats.bytes_held
            if (not batch or self._held_batches < self.max_in_flight) and \
                    (held == 0 or held + nbytes <= self.max_bytes_held):
                break
            await self._space.park()
        if batch:
            self._held_batches += 1
        self._hold(nbytes)

    def _hold(self, delta: int) -> None:
        self.stats.bytes_held += delta
        self.stats.peak_bytes_held = max(self.stats.peak_bytes_held, self.stats.bytes_held)

    async def send_batch(self, batch: PageBatch | RawBatch) -> None:
        """Queue a page batch; its buffer must stay untouched until ``flush`` returns.

        A ``RawBatch`` (as received from another stream) is forwarded as it is.
        """
        if isinstance(batch, RawBatch):
            payload = batch.payload
            await self._reserve(len(payload))
            out = _Out("batch", (frame_header(KIND_PAGES, batch.flags, [payload], crc=batch.crc), payload))
            out.batch_raw, out.batch_pages, out.held = batch.raw_len, batch.npages, len(payload)
            out.level = "forwarded"
            self._enqueue(out)
            return
        raw = len(batch.data)
        if raw != batch.npages * PAGE_SIZE or not 0 < raw <= MAX_BATCH_RAW:
            raise ValueError(f"page batch of {raw} bytes for {batch.npages} pages (at most {MAX_BATCH_RAW} bytes)")
        worst = 2 * raw + BATCH_HEAD.size + RUN.size * len(batch.runs)
        await self._reserve(worst)
        out = _Out("batch", ready=False)
        out.batch_raw, out.held = raw, worst
        try:
            self._enqueue(out)
        except TransportError:
            self._release(out)
            raise
        assert self._nursery is not None
        self._nursery.start_soon(self._encode, out, batch, self.levels.level)

    async def _encode(self, out: _Out, batch: PageBatch, level: int | None) -> None:
        try:
            head, enc, out.compress_s = await trio.to_thread.run_sync(_encode_frame, batch, level,
                                                                      limiter=self._limiter)
        except (ValueError, ProtocolError) as exc:
            out.error = TransportError(f"cannot send a page batch: {exc}")
        else:
            out.parts = (head, *enc.parts[1:])
            out.batch_pages = enc.npages
            out.level = str(level) if enc.flags else "raw"
            actual = sum(len(p) for p in out.parts)   # what the queue holds until it is written
            if out.held >= 0:  # not yet released by a failure
                self._hold(actual - out.held)
                out.held = actual
        finally:
            out.ready.set()

    def _release(self, out: _Out) -> None:
        if out.kind == "batch" and out.held >= 0:
            self._held_batches -= 1
            self._hold(-out.held)
            out.held = -1
            self._space.unpark_all()
        elif out.kind == "record" and out.held > 0:      # queued by ``queue_record``
            self._hold(-out.held)
            out.held = 0
            self._space.unpark_all()

    async def flush(self) -> None:
        """Wait until everything queued so far is written."""
        last = self._last
        if last is not None:
            await last.sent.wait()
            if last.error is not None:
                self._send_error_raised = True
                raise last.error
        self._check_send()

    async def _send_frame(self, parts: tuple[bytes | bytearray | memoryview, ...]) -> None:
        """Write one frame's parts: in one call to streams that send them as one unit
        (``send_parts``), else one after the other."""
        try:
            if self._send_parts is not None:
                await self._send_parts(parts)
            else:
                for part in parts:
                    await self._stream.send_all(part)
        except trio.BrokenResourceError as exc:
            raise PeerGone(f"{self.peer} broke the connection ({exc.__cause__ or exc or 'connection lost'})") from None
        except trio.ClosedResourceError:
            raise ChannelClosed(f"the stream to {self.peer} was closed on this side") from None

    async def _sender(self) -> None:
        current: _Out | None = None      # taken from the queue, not yet written
        try:
            async for out in self._queue_rx:
                current = out
                wait = 0.0
                if not out.ready.is_set():
                    t0 = trio.current_time()
                    await out.ready.wait()
                    wait = trio.current_time() - t0
                if out.error is not None:
                    raise out.error
                t0 = trio.current_time()
                await self._send_frame(out.parts)
                write = trio.current_time() - t0
                nbytes = sum(len(p) for p in out.parts)
                sent = self.stats.sent
                sent.bytes_on_wire += nbytes
                if out.kind == "batch":
                    sent.batches += 1
                    sent.pages += out.batch_pages
                    sent.bytes_raw += out.batch_raw
                    self.stats.compress_wait_s += wait
                    self.stats.write_s += write
                    self.stats.batches_by_level[out.level] = self.stats.batches_by_level.get(out.level, 0) + 1
                    self.levels.observe(raw=out.batch_raw, now=trio.current_time())
                    self._release(out)
                elif out.kind == "record":
                    sent.records += 1
                    self._release(out)
                out.parts = ()
                out.sent.set()
                current = None
        except TransportError as exc:
            self._fail_sends(exc, current)
        except trio.Cancelled:
            self._fail_sends(ChannelClosed(f"the stream to {self.peer} was closed on this side"), current)
            raise

    def _fail_sends(self, exc: TransportError, current: _Out | None = None) -> None:
        """The sender stopped: wake everyone waiting on it with ``exc`` (``current``: the
        frame it was writing, whose waiter is neither in the queue nor, if frames were queued
        after it, the last one)."""
        if self._send_error is None:
            self._send_error = exc
        if current is not None and not current.sent.is_set():
            current.error = current.error or self._send_error
            self._release(current)
            current.sent.set()
        while True:
            try:
                out = self._queue_rx.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            out.error = out.error or self._send_error
            self._release(out)
            out.sent.set()
        if self._last is not None and not self._last.sent.is_set():
            self._last.error = self._send_error
            self._last.sent.set()
        self._space.unpark_all()

    # --- receiving --------------------------------------------------------------------

    async def receive_item(self, timeout: float | None = None) -> Item | None:
        """The next record or raw page batch; None at a clean end of stream."""
        if self._receive_error is not None:
            raise self._receive_error
        try:
            if timeout is None:
                return await self._receive_item()
            with trio.fail_after(timeout):
                return await self._receive_item()
        except trio.TooSlowError:
            raise TransportTimeout(f"{self.peer} sent nothing for {timeout:g} s") from None
        except ProtocolError as exc:
            self._receive_error = exc
            raise

    async def receive(self, timeout: float | None = None) -> Record | PageBatch | None:
        """Like ``receive_item``, with page batches decompressed and checked."""
        item = await self.receive_item(timeout)
        return await self.decode(item) if isinstance(item, RawBatch) else item

    async def decode(self, raw: RawBatch) -> PageBatch:
        """Decompress and validate a page batch in a worker thread."""
        return await trio.to_thread.run_sync(decode_batch, raw.flags, raw.payload, limiter=self._limiter)

    async def _receive_item(self) -> Item | None:
        while True:
            frame = self._decoder.next_frame()
            if frame is not None:
                return self._item(frame)
            if self._eof:
                try:
                    self._decoder.close()
                except ProtocolError as exc:
                    raise type(exc)(f"{self.peer} ended the stream in the middle of a frame: truncated") from None
                return None
            await self._fill()

    def _item(self, frame: Frame) -> Item:
        got = self.stats.received
        if frame.kind == KIND_RECORD:
            got.records += 1
            return decode_record(memoryview(frame.payload))
        if frame.kind == KIND_TAG:      # images are signed; live streams are authenticated by their channel
            raise ProtocolError(f"{self.peer} sent an image signature in a live stream")
        raw = RawBatch.from_frame(frame)
        got.batches += 1
        got.pages += raw.npages
        got.bytes_raw += raw.raw_len
        return raw

    async def _fill(self) -> None:
        decoder = self._decoder
        size = self._max_record or min(max(decoder.wanted(), RECEIVE_SIZE), MAX_RECEIVE)
        timeout = self.frame_timeout if decoder.in_frame else None
        try:
            if timeout is None:
                data = await self._stream.receive_some(size)
            else:
                with trio.fail_after(timeout):
                    data = await self._stream.receive_some(size)
        except trio.TooSlowError:
            raise TransportTimeout(f"{self.peer} stopped sending in the middle of a frame: nothing for "
                                   f"{timeout:g} s") from None
        except trio.BrokenResourceError as exc:
            raise PeerGone(f"{self.peer} broke the connection ({exc.__cause__ or exc or 'connection lost'})") from None
        except trio.ClosedResourceError:
            raise ChannelClosed(f"the stream from {self.peer} was closed on this side") from None
        if not data:
            self._eof = True
            return
        self.stats.received.bytes_on_wire += len(data)
        decoder.feed(data)
