"""Checkpoint images: one stream of frames written to, or read from, a file descriptor.

The stream can be a file, a pipe or stdout; the same records and page frames make up a live
stream between agents. ``ImageWriter`` compresses page batches in worker threads (zstd
releases the GIL) while keeping frame order, and signs every frame with the host's key
(``transport.signing``); ``ImageReader`` checks every frame's crc32 and signature before
decoding it (``ImageVerifier`` decides what an unsigned or foreign image gets) and ends only
at an ``EndOfImage`` record whose counts match what was read.
A restore hands page batches to a ``sink`` instead: each is checked, decompressed and
written by the worker that read it, on every core at once, in step with the records.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import platform
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Callable, Generator, Iterator, cast

from transport.errors import IncompatibleImage, ProtocolError, TruncatedStream, UntrustedImage
from transport.framing import (
    KIND_PAGES,
    KIND_RECORD,
    KIND_TAG,
    STREAM_MAGIC,
    MappedFile,
    check_payload,
    Frame,
    encode_frame,
    frame_header,
    header_of,
    read_frame,
    read_stream_magic,
)
from transport.pages import EncodedBatch, PageBatch, decode_batch, encode_batch
from transport.records import Record
from transport.schema import (
    FORMAT_VERSION,
    OLDEST_FORMAT_VERSION,
    PAGE_SIZE,
    EndOfImage,
    ImageHeader,
    Mappings,
    MappingsDelta,
    decode_record,
)
from transport.signing import ImageKey, ImageSigner, ImageVerifier


@dataclass
class StreamStats:
    records: int = 0
    page_batches: int = 0
    pages: int = 0
    bytes_raw: int = 0        # page bytes before compression
    bytes_on_wire: int = 0    # every byte written: headers, records, pages


def _encode(batch: PageBatch, level: int | None, signer: ImageSigner | None,
            index: int) -> tuple[EncodedBatch, bytes, bytes]:
    """A batch's payload parts, frame header and (to sign it) digest: in a worker thread."""
    enc = encode_batch(batch, level)
    header = frame_header(KIND_PAGES, enc.flags, enc.parts)
    return enc, header, signer.digest(index, header, enc.parts) if signer is not None else b""


class ImageWriter:
    """Write records and page batches as one stream; ``finish`` seals it. With ``key``, every
    frame is followed by its tag and the header names the key (``ImageHeader.key_id``)."""

    def __init__(self, out: BinaryIO, *, level: int | None = 1, workers: int = 2, max_pending: int = 8,
                 key: ImageKey | None = None, recycle: Callable[[bytes | bytearray | memoryview], None] | None = None
                 ) -> None:
        """``recycle``: called with each page batch's data once it is written (and nothing
        of the writer's views it any more), for its buffer to serve again
        (``precopy.reader.BufferPool``)."""
        self._out = out
        self._recycle = recycle
        self._level = level
        self._signer = ImageSigner(key) if key is not None else None
        # Worker threads compress page batches and hash them for their tags (both release the GIL).
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kcr-zstd") \
            if level is not None or key is not None else None
        self._pending: collections.deque[tuple[PageBatch, Future[tuple[EncodedBatch, bytes, bytes]]]] = \
            collections.deque()
        self._max_pending = max_pending
        self._held: list[Record | PageBatch] | None = None
        self._index = 0                 # frames so far, tags aside: the next frame's place
        self.stats = StreamStats()
        self._write(STREAM_MAGIC)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        self._out.write(data)
        self.stats.bytes_on_wire += len(data)

    def _sign(self, digest: bytes) -> None:
        if self._signer is not None:
            self._write(encode_frame(KIND_TAG, 0, self._signer.sign(digest)))

    def _emit(self, encoded: tuple[EncodedBatch, bytes, bytes]) -> None:
        enc, header, digest = encoded
        self._write(header)
        for part in enc.parts:
            self._write(part)
        self._sign(digest)
        self.stats.page_batches += 1
        self.stats.pages += enc.npages
        self.stats.bytes_raw += enc.bytes_raw

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            batch, encoding = self._pending.popleft()
            self._emit(encoding.result())
            if self._recycle is not None:
                self._recycle(batch.data)

    def hold(self) -> None:
        """Keep what comes next (records and page batches, their buffers untouched) in order,
        unencoded and unwritten, until ``release``: a checkpoint reads a frozen process at
        memory speed and compresses and writes only once it runs again."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Encode and write what ``hold`` kept, in order, and stop holding."""
        held, self._held = self._held, None
        for item in held or ():
            if isinstance(item, PageBatch):
                self.pages(item)
            else:
                self.record(item)

    def record(self, rec: Record) -> None:
        if self._held is not None:
            self._held.append(rec)
            return
        self._drain(0)
        if isinstance(rec, ImageHeader) and self._signer is not None:
            rec = dataclasses.replace(rec, key_id=self._signer.key.key_id, sign_nonce=self._signer.nonce)
        payload = rec.pack()
        try:
            # What a restore would refuse, refused now, while the job can still run on: every
            # record but the memory layout, whose reading back grows with the mappings (0.7 s
            # for 30,000 of them, frozen) and whose fields come straight from /proc/PID/maps.
            if not isinstance(rec, (Mappings, MappingsDelta)):
                decode_record(payload)
        except ProtocolError as exc:
            raise ProtocolError(f"kcr-migrate made a record it cannot read back ({exc}), so the image would "
                                "not restore: nothing was kept (a bug: please report it)") from None
        header = frame_header(KIND_RECORD, 0, [payload])
        self._write(header)
        self._write(payload)
        if self._signer is not None:
            self._sign(self._signer.digest(self._index, header, [payload]))
        self._index += 1
        self.stats.records += 1

    def pages(self, batch: PageBatch) -> None:
        """Queue a batch; its buffer must stay untouched until the batch is written."""
        if self._held is not None:
            self._held.append(batch)
            return
        index, self._index = self._index, self._index + 1
        if self._pool is None:
            self._emit(_encode(batch, None, self._signer, index))
            if self._recycle is not None:
                self._recycle(batch.data)
            return
        self._pending.append((batch, self._pool.submit(_encode, batch, self._level, self._signer, index)))
        self._drain(self._max_pending)

    def finish(self, before_end: Callable[[], None] | None = None) -> StreamStats:
        """Write what is pending, then the end record that makes the image whole.
        ``before_end`` runs between the two: the last moment to give up (it raises) with an
        image that no reader takes for whole, however long the pending writes blocked."""
        self.release()
        self._drain(0)
        if before_end is not None:
            before_end()
        end = EndOfImage(page_batches=self.stats.page_batches, pages=self.stats.pages,
                         records=self.stats.records + 1)
        self.record(end)
        self._out.flush()
        self.close()
        return self.stats

    def close(self) -> None:
        self._held = None
        if self._pool is not None:
            for _, fut in self._pending:
                fut.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True)
            self._pool = None


Item = Record | PageBatch


def _check_and_decode(verifier: ImageVerifier | None, index: int, prev: bytes | None, tag: bytes | None,
                      frame: Frame) -> PageBatch:
    """A page frame's signature (``verifier``) or else its crc32, then its pages: in a worker
    thread. A tag that verified covers what the crc32 does (and restoring 256 MiB spent 15-20
    ms more on crc32s); a frame that fails its tag has its crc32 checked first, so a frame
    damaged by accident is called corrupt, not edited. The first read of a mapped image's
    pages is here too, beside the restore's writes."""
    assert frame.crc is not None
    verified = False
    if verifier is not None:
        try:
            verified = verifier.check(index, prev, tag, verifier.digest(index, header_of(frame), [frame.payload]))
        except UntrustedImage:
            check_payload(frame.payload, frame.crc)
            raise
    if not verified:
        check_payload(frame.payload, frame.crc)
    return decode_batch(frame.flags, frame.payload)


class _Turns:
    """How many records the reader's consumer has taken: a page batch handed to a ``sink``
    waits in its worker until every record before it was taken."""

    def __init__(self) -> None:
        self._taken = 0
        self._cond = threading.Condition()
        self._closed = False

    def taken(self) -> None:
        with self._cond:
            self._taken += 1
            self._cond.notify_all()

    def close(self) -> None:
        """No more records will be taken (the reader stopped): waiting batches give up."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait(self, records: int) -> bool:
        """Until ``records`` records were taken; False if the reader stopped first."""
        with self._cond:
            while self._taken < records and not self._closed:
                self._cond.wait()
            return self._taken >= records


def _check_decode_and_sink(verifier: ImageVerifier | None, index: int, prev: bytes | None, tag: bytes | None,
                           frame: Frame, turns: _Turns, records: int, sink: Callable[[PageBatch], None]) -> PageBatch:
    """``_check_and_decode``, then, once the ``records`` records before the batch were taken,
    ``sink`` it: in a worker thread, beside the other workers' batches."""
    batch = _check_and_decode(verifier, index, prev, tag, frame)
    if turns.wait(records):
        sink(batch)
    return batch


class ImageReader:
    """Iterate an image's records and page batches, verifying as it goes.

    ``verifier`` (``transport.signing``) holds the key to check signatures with and whether
    an image that does not verify is refused (the default: every unverified image is) or
    read anyway. Each frame is checked before it is decoded; an item is handed on only once
    it and everything before it verified.

    ``sink``: page batches are not yielded but handed to ``sink`` in the worker threads that
    check and decode them, several at once (a restore writes pages on every core): each
    once it verified and every record before it was taken (the consumer came back for the
    next item), and every one before the next record is yielded. A batch still verifies
    on its own before it is handed on, and a failure (its checks', or ``sink``'s) is
    raised in stream order, as without a sink; batches after a failure may have been
    handed on already (each verified). ``sink`` runs beside the other workers' calls of
    it, never beside the consumer's work on a record."""

    def __init__(self, src: BinaryIO, *, workers: int | None = None, max_pending: int | None = None,
                 verifier: ImageVerifier | None = None, sink: Callable[[PageBatch], None] | None = None) -> None:
        self._src = src
        self._workers = workers or default_workers()
        self._max_pending = max_pending or 4 * self._workers
        self._sink = sink
        self.verifier = verifier if verifier is not None else ImageVerifier()
        self.stats = StreamStats()
        self.header: ImageHeader | None = None
        self.end: EndOfImage | None = None
        self._signed = False           # the image has signatures (TAG frames)
        self._checking = False         # and they are checked (there is a key)
        self._peeked: Frame | None = None

    def _first(self) -> tuple[Frame, bytes | None]:
        """The header's frame, and its tag where the image is signed (which this tells)."""
        read_stream_magic(self._src)
        first = read_frame(self._src, check_pages=False)
        if first is None:
            raise TruncatedStream("the image ends before its header: truncated")
        if first.kind != KIND_RECORD:
            raise ProtocolError("the stream does not start with an image header")
        second = read_frame(self._src, check_pages=False)
        if second is None:
            raise TruncatedStream("the image ends after its header: truncated")
        self._signed = second.kind == KIND_TAG
        self._checking = self.verifier.begin(self._signed)
        if not self._signed:
            self._peeked = second
            return first, None
        return first, bytes(second.payload)

    def _next(self) -> tuple[Frame, bytes | None] | None:
        """The next frame and its tag (None: unsigned, or the tag is missing); None at the end."""
        frame, self._peeked = self._peeked or read_frame(self._src, check_pages=False), None
        if frame is None:
            return None
        if frame.kind == KIND_TAG:
            raise ProtocolError("a signature where a record or page batch belongs: corrupt image")
        if not self._signed:
            return frame, None
        tag = read_frame(self._src, check_pages=False)
        if tag is None:
            raise TruncatedStream("the image ends after a frame without its signature: truncated")
        if tag.kind != KIND_TAG:
            self._peeked = tag          # an unsigned frame: the verifier says what it makes of that
            return frame, None
        return frame, bytes(tag.payload)

    def __iter__(self) -> Generator[Item, None, None]:
        verifier = self.verifier
        frame, tag = self._first()
        prev: bytes | None = None
        index = 0
        pending: collections.deque[Future[PageBatch] | Record] = collections.deque()
        sink = self._sink
        turns = _Turns()
        records = 0         # records read so far
        with ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="kcr-unzstd") as pool:
            try:
                while True:
                    if frame.kind == KIND_PAGES:
                        if self.header is None:
                            raise ProtocolError("page data before the image header")
                        self.stats.page_batches += 1
                        checker = verifier if self._checking else None
                        pending.append(pool.submit(_check_and_decode, checker, index, prev, tag, frame)
                                       if sink is None else
                                       pool.submit(_check_decode_and_sink, checker, index, prev, tag, frame,
                                                   turns, records, sink))
                    else:
                        try:
                            if self._checking:
                                verifier.check(index, prev, tag,
                                               verifier.digest(index, header_of(frame), [frame.payload]))
                        except UntrustedImage:
                            turns.close()               # no batch waits for a record that will not come
                            for item in pending:        # an earlier frame's failure is the one to tell
                                if isinstance(item, Future):
                                    item.result()
                            raise
                        rec = decode_record(bytes(frame.payload))
                        self.stats.records += 1
                        records += 1
                        if self.header is None:
                            if not isinstance(rec, ImageHeader):
                                raise ProtocolError("the stream does not start with an image header")
                            check_format(rec)
                            self.header = rec
                            verifier.set_nonce(rec.sign_nonce)     # checked above, with the header's frame
                        pending.append(rec)
                        if isinstance(rec, EndOfImage):
                            break
                    while len(pending) > self._max_pending or (pending and not isinstance(pending[0], Future)):
                        yield from self._hand_on(pending.popleft(), turns)
                    following = self._next()
                    if following is None:
                        raise TruncatedStream("the image ends before its end record: truncated")
                    prev, index = tag, index + 1
                    frame, tag = following
                while pending:
                    yield from self._hand_on(pending.popleft(), turns)
            finally:
                turns.close()
                for item in pending:
                    if isinstance(item, Future):
                        item.cancel()
        assert self.end is not None
        if self._peeked is not None or self._src.read(1):
            raise ProtocolError("data after the end of the image")
        verifier.finish()

    def _hand_on(self, item: Future[PageBatch] | Record, turns: _Turns) -> Iterator[Item]:
        """Yield an item (a page batch only without a sink: with one, it was handed to it)."""
        done = self._resolve(item)
        if isinstance(done, PageBatch) and self._sink is not None:
            return
        yield done
        if not isinstance(done, PageBatch):
            turns.taken()

    def _resolve(self, item: Future[PageBatch] | Record) -> Item:
        if isinstance(item, Future):
            batch = item.result()
            self.stats.pages += batch.npages
            self.stats.bytes_raw += len(batch.data)
            return batch
        if isinstance(item, EndOfImage):
            if (item.page_batches, item.pages, item.records) != (
                    self.stats.page_batches, self.stats.pages, self.stats.records):
                raise ProtocolError(
                    f"the image's end record counts {item.page_batches} page batches, {item.pages} pages "
                    f"and {item.records} records, but {self.stats.page_batches}, {self.stats.pages} and "
                    f"{self.stats.records} were read: corrupt image")
            self.end = item
        return item


def default_workers() -> int:
    """Threads that check, decompress and (restoring) write page batches: one a CPU, 2 to 8."""
    return max(2, min(8, len(os.sched_getaffinity(0))))


def check_format(header: ImageHeader) -> None:
    """Refuse images this reader cannot interpret at all (whatever the machine)."""
    if not OLDEST_FORMAT_VERSION <= header.format_version <= FORMAT_VERSION:
        newer = header.format_version > FORMAT_VERSION
        raise IncompatibleImage(
            f"image format version {header.format_version} was written by kcr-migrate "
            f"{header.tool_version}; this kcr-migrate reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}: "
            + ("upgrade kcr-migrate here" if newer else "convert it with the kcr-migrate that wrote it"))
    if header.page_size != PAGE_SIZE:
        raise IncompatibleImage(f"image page size {header.page_size} differs from this machine's {PAGE_SIZE}")


def check_machine(header: ImageHeader, xsave_mask: int) -> None:
    """Refuse an image whose process could not run on this machine."""
    arch = platform.machine()
    if header.arch != arch:
        raise IncompatibleImage(f"image is for {header.arch}, this machine is {arch}: restore it on a {header.arch} host")
    missing = header.xsave_mask & ~xsave_mask
    if missing:
        raise IncompatibleImage(
            f"the image's process uses CPU state components {missing:#x} (XSAVE) that this CPU lacks "
            f"(image {header.xsave_mask:#x}, here {xsave_mask:#x}): restore it on a host with the same CPU features")


def open_output(path: str) -> BinaryIO:
    if path == "-":
        return os.fdopen(os.dup(1), "wb", buffering=1 << 20)
    return open(path, "wb", buffering=1 << 20)


def open_input(path: str) -> BinaryIO:
    """The image at ``path`` ("-": stdin) to read; a file only this user can write is mapped
    (``MappedFile``): its page data goes on without a copy."""
    if path == "-":
        return os.fdopen(os.dup(0), "rb", buffering=1 << 20)
    f = open(path, "rb", buffering=1 << 20)
    try:
        if MappedFile.suits(f.fileno()):
            mapped = MappedFile(f.fileno())      # holds a descriptor of its own
            f.close()
            return cast(BinaryIO, mapped)
    except (OSError, ValueError):               # a file system that cannot map it: read it
        pass
    return f
