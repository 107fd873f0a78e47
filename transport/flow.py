"""Page streams and their flow control: the bulk half of the RPC protocol (``transport.rpc``).

A page stream belongs to one request: ``PagesBegin(id)``, PAGES frames, ``PagesEnd(id,
counts)``; the receiver checks the counts. One page stream at a time goes each way (records
of other calls keep flowing between its frames). Image records (the schema's types below
``FIRST_PROTOCOL_TYPE``: a layout, process state, threads) may travel inside a page stream,
in order with its batches: a live migration's stream is the same sequence a checkpoint file
holds.

Flow control is credit-based, per direction, in raw (uncompressed) page bytes. Each side's
``Hello.window`` says how many bytes it buffers; the sender never has more than that
outstanding (one batch may exceed it when nothing is outstanding), and the receiver returns
``Credit`` as its consumer takes batches: every quarter window, and whenever it has caught up
(took a batch with nothing behind it, or waits for the next item), so a sender waiting for
credit always gets it once the consumer has drained everything. The connection's reader
therefore never blocks on a slow consumer, and a receiver holds at most its window; a sender
holds at most its ``FramedStream`` caps.
"""
from __future__ import annotations

import math

import trio

from transport.errors import ChannelClosed, MigrationError, ProtocolError, TransportError
from transport.pages import PageBatch
from transport.protocol import DEFAULT_WINDOW, Credit, PagesBegin, PagesEnd
from transport.records import Record
from transport.stream import FramedStream, RawBatch

FIRST_PROTOCOL_TYPE = 32


def is_image_record(item: object) -> bool:
    """A record of the image schema (as opposed to the RPC protocol's own)."""
    return isinstance(item, Record) and item.TYPE < FIRST_PROTOCOL_TYPE


class Flow:
    """Credit accounting for the page bytes of one connection, both ways."""

    def __init__(self, fs: FramedStream, *, send_window: int, receive_window: int) -> None:
        self.fs = fs
        self.peer = fs.peer
        self.send_window = send_window or DEFAULT_WINDOW
        self.receive_window = receive_window or DEFAULT_WINDOW
        self.outstanding = 0          # sent, not yet credited by the peer
        self.uncredited = 0           # received, not yet credited back
        self.peak_uncredited = 0
        self.sending = trio.Semaphore(1)   # one outbound page stream at a time
        self.error: MigrationError | None = None   # set when the connection is over
        self._consumed = 0
        self._lot = trio.lowlevel.ParkingLot()

    # sending
    async def acquire(self, raw: int) -> None:
        """Wait until ``raw`` more bytes fit in the peer's window."""
        while self.outstanding and self.outstanding + raw > self.send_window:
            if self.error is not None:
                raise self.error
            await self._lot.park()
        self.outstanding += raw

    async def wait_drained(self) -> None:
        """Until the peer has consumed every page byte sent (all credit returned)."""
        while self.outstanding:
            if self.error is not None:
                raise self.error
            await self._lot.park()

    def unsend(self, raw: int) -> None:
        """A batch that acquired credit was not sent after all."""
        self.outstanding -= raw
        self._lot.unpark_all()

    def on_credit(self, n: int) -> None:
        if n > self.outstanding:
            raise ProtocolError(f"{self.peer} returned credit for more page bytes than were sent")
        self.outstanding -= n
        self._lot.unpark_all()

    # receiving
    def on_batch(self, raw: int) -> None:
        """A batch arrived: refuse it if the peer ignored our window."""
        if self.uncredited > 0 and self.uncredited + raw > self.receive_window:
            raise ProtocolError(f"{self.peer} sent more page data than the flow-control window of "
                                f"{self.receive_window} bytes allows")
        self.uncredited += raw
        self.peak_uncredited = max(self.peak_uncredited, self.uncredited)

    def consumed(self, raw: int, *, flush: bool) -> None:
        """The consumer took ``raw`` bytes: credit in quarter windows, or now if ``flush``."""
        self._consumed += raw
        if self._consumed and (flush or self._consumed >= self.receive_window // 4):
            n, self._consumed = self._consumed, 0
            self.uncredited -= n
            try:
                self.fs.post_record(Credit(n))
            except TransportError:
                pass  # the connection is gone; its reader reports why

    def close(self, error: MigrationError) -> None:
        """The connection is over: wake every sender waiting for credit with ``error``."""
        self.error = error
        self._lot.unpark_all()


class _Nothing:
    """No item held (None is an item: the end of a stream no pages came in)."""


_NOTHING = _Nothing()


class PageStreamIn:
    """Page batches arriving for one request; iterate it, or ``receive()`` until None.

    On the serving side it ends at once unless the request said ``upload``; on the calling
    side it ends with the peer's PagesEnd, or with the response if no pages came.
    """

    def __init__(self, flow: Flow, id: int, *, ended: bool) -> None:
        self._flow = flow
        self.id = id
        # A batch, an image record, the end of the stream, None (no pages came) or why the
        # connection ended.
        self._tx, self._rx = trio.open_memory_channel[RawBatch | Record | PagesEnd | MigrationError | None](math.inf)
        self.records = 0
        self.batches = self.pages = self.bytes_raw = 0   # received from the peer
        self.begun = False
        self.ended = ended
        self.abandoned = False
        self._done = ended
        # Taken by ``ready_records`` and not a record: the next item out.
        self._held: RawBatch | Record | PagesEnd | MigrationError | None | _Nothing = _NOTHING

    # reader side
    def begin(self) -> None:
        if self.begun:
            raise ProtocolError(f"{self._flow.peer} began the page stream of request {self.id} twice")
        self.begun = True
        self.ended = False
        self._done = False

    def deliver(self, item: RawBatch | Record | PagesEnd | MigrationError | None) -> None:
        if is_image_record(item):
            self.records += 1
            if not self.abandoned:
                self._tx.send_nowait(item)
            return
        if isinstance(item, RawBatch):
            self.batches += 1
            self.pages += item.npages
            self.bytes_raw += item.raw_len
            if self.abandoned:
                self._flow.consumed(item.raw_len, flush=True)
                return
        else:
            self.ended = True
        self._tx.send_nowait(item)

    # consumer side
    async def receive_raw(self) -> RawBatch | Record | None:
        """The next batch as received (to forward it undecoded) or image record; None at the end."""
        if self._done:
            return None
        item: RawBatch | Record | PagesEnd | MigrationError | None
        if isinstance(self._held, _Nothing):
            if self._rx.statistics().current_buffer_used == 0:
                # Caught up: what was taken is credited before waiting. (A batch taken with a
                # record behind it was not, and the sender may be waiting for all its credit.)
                self._flow.consumed(0, flush=True)
            item = await self._rx.receive()
        else:
            item, self._held = self._held, _NOTHING
        if is_image_record(item):
            assert isinstance(item, Record)
            return item
        if isinstance(item, RawBatch):
            self._flow.consumed(item.raw_len, flush=self._rx.statistics().current_buffer_used == 0)
            return item
        self._done = True
        self._flow.consumed(0, flush=True)
        if isinstance(item, PagesEnd):
            if (item.batches, item.pages, item.bytes_raw) != (self.batches, self.pages, self.bytes_raw):
                raise ProtocolError(
                    f"{self._flow.peer} ended the page stream of request {self.id} with {item.batches} batches, "
                    f"{item.pages} pages, {item.bytes_raw} bytes but {self.batches}, {self.pages}, "
                    f"{self.bytes_raw} arrived: data was lost")
        elif isinstance(item, MigrationError):
            raise item
        return None

    async def receive(self) -> PageBatch | None:
        """The next batch, decompressed and checked; None at the end of the stream. Image
        records in the stream are an error here: use ``receive_item`` for mixed streams."""
        item = await self.receive_item()
        if isinstance(item, Record):
            raise ProtocolError(f"{self._flow.peer} sent a {type(item).__name__} record inside a pages-only stream")
        return item

    def ready_records(self) -> list[Record]:
        """The image records that have arrived already, in order, up to the first item that
        is not one (the next ``receive_item`` returns that): a consumer applies them together."""
        out: list[Record] = []
        while isinstance(self._held, _Nothing) and not self._done:
            try:
                item = self._rx.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if isinstance(item, Record) and is_image_record(item):
                out.append(item)
            else:
                self._held = item
        return out

    async def receive_item(self) -> PageBatch | Record | None:
        """The next batch (decompressed and checked) or image record; None at the end."""
        raw = await self.receive_raw()
        if raw is None or isinstance(raw, Record):
            return raw
        return await self._flow.fs.decode(raw)

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
        held, self._held = self._held, _NOTHING
        if isinstance(held, RawBatch):
            self._flow.consumed(held.raw_len, flush=True)
        while True:
            try:
                item = self._rx.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if isinstance(item, RawBatch):
                self._flow.consumed(item.raw_len, flush=True)


class PageStreamOut:
    """The page stream this side sends for one request."""

    def __init__(self, flow: Flow, id: int, *, reply: bool, upload: bool = False) -> None:
        self._flow = flow
        self.id = id
        self.reply = reply       # answering the peer's request (else: uploading with ours)
        self.batches = self.pages = self.bytes_raw = 0
        self._state = "idle"    # idle -> open -> ended
        self._must_end = upload  # an upload announced in its request is ended even if empty

    async def _open(self) -> None:
        flow = self._flow
        if self._state == "ended":
            raise ChannelClosed(f"the page stream of request {self.id} is already ended")
        if self._state == "idle":
            await flow.sending.acquire()
            self._state = "open"
            try:
                flow.fs.post_record(PagesBegin(self.id, self.reply))
            except TransportError:
                self._release()
                raise

    async def send_record(self, rec: Record) -> None:
        """An image record, in order with the batches around it (queued as they are: the
        stream's end, or a flush, reports a failure to write it)."""
        if not is_image_record(rec):
            raise ValueError(f"{type(rec).__name__} is not an image record")
        await self._open()
        await self._flow.fs.queue_record(rec)

    async def send(self, batch: PageBatch | RawBatch) -> None:
        flow = self._flow
        await self._open()
        raw, npages = (batch.raw_len, batch.npages) if isinstance(batch, RawBatch) else (len(batch.data), batch.npages)
        await flow.acquire(raw)
        try:
            await flow.fs.send_batch(batch)
        except BaseException:
            flow.unsend(raw)
            raise
        self.batches += 1
        self.pages += npages
        self.bytes_raw += raw

    def end(self) -> None:
        """Close the stream (queued; never waits). An announced upload that sent nothing is
        ended with a lone ``PagesEnd(id, 0, 0, 0)``."""
        try:
            if self._state == "open" or (self._state == "idle" and self._must_end):
                self._flow.fs.post_record(PagesEnd(self.id, self.batches, self.pages, self.bytes_raw, self.reply))
        except TransportError:
            pass  # the connection is gone; its reader reports why
        if self._state == "open":
            self._release()
        self._state = "ended"

    def _release(self) -> None:
        self._state = "ended"
        self._flow.sending.release()


