"""Checkpoint images: one stream of frames written to, or read from, a file descriptor.

The stream can be a file, a pipe or stdout; the same records and page frames make up a live
stream between agents. ``ImageWriter`` compresses page batches in worker threads (zstd
releases the GIL) while keeping frame order; ``ImageReader`` checks every frame and ends
only at an ``EndOfImage`` record whose counts match what was read.
"""
from __future__ import annotations

import collections
import os
import platform
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from transport.errors import IncompatibleImage, ProtocolError, TruncatedStream
from transport.framing import (
    KIND_PAGES,
    KIND_RECORD,
    STREAM_MAGIC,
    frame_header,
    read_frame,
    read_stream_magic,
)
from transport.pages import EncodedBatch, PageBatch, decode_batch, encode_batch
from transport.records import Record
from transport.schema import FORMAT_VERSION, PAGE_SIZE, EndOfImage, ImageHeader, decode_record


@dataclass
class StreamStats:
    records: int = 0
    page_batches: int = 0
    pages: int = 0
    bytes_raw: int = 0        # page bytes before compression
    bytes_on_wire: int = 0    # every byte written: headers, records, pages


class ImageWriter:
    """Write records and page batches as one stream; ``finish`` seals it."""

    def __init__(self, out: BinaryIO, *, level: int | None = 1, workers: int = 2, max_pending: int = 8) -> None:
        self._out = out
        self._level = level
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kcr-zstd") if level is not None else None
        self._pending: collections.deque[Future[EncodedBatch]] = collections.deque()
        self._max_pending = max_pending
        self.stats = StreamStats()
        self._write(STREAM_MAGIC)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        self._out.write(data)
        self.stats.bytes_on_wire += len(data)

    def _emit(self, enc: EncodedBatch) -> None:
        self._write(frame_header(KIND_PAGES, enc.flags, enc.parts))
        for part in enc.parts:
            self._write(part)
        self.stats.page_batches += 1
        self.stats.pages += enc.npages
        self.stats.bytes_raw += enc.bytes_raw

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            self._emit(self._pending.popleft().result())

    def record(self, rec: Record) -> None:
        self._drain(0)
        payload = rec.pack()
        self._write(frame_header(KIND_RECORD, 0, [payload]))
        self._write(payload)
        self.stats.records += 1

    def pages(self, batch: PageBatch) -> None:
        """Queue a batch; its buffer must stay untouched until the batch is written."""
        if self._pool is None:
            self._emit(encode_batch(batch, None))
            return
        self._pending.append(self._pool.submit(encode_batch, batch, self._level))
        self._drain(self._max_pending)

    def finish(self) -> StreamStats:
        self._drain(0)
        end = EndOfImage(page_batches=self.stats.page_batches, pages=self.stats.pages,
                         records=self.stats.records + 1)
        self.record(end)
        self._out.flush()
        self.close()
        return self.stats

    def close(self) -> None:
        if self._pool is not None:
            for fut in self._pending:
                fut.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True)
            self._pool = None


Item = Record | PageBatch


class ImageReader:
    """Iterate an image's records and page batches, verifying as it goes."""

    def __init__(self, src: BinaryIO, *, workers: int = 2, max_pending: int = 8) -> None:
        self._src = src
        self._workers = workers
        self._max_pending = max_pending
        self.stats = StreamStats()
        self.header: ImageHeader | None = None
        self.end: EndOfImage | None = None

    def __iter__(self) -> Iterator[Item]:
        read_stream_magic(self._src)
        pending: collections.deque[Future[PageBatch] | Record] = collections.deque()
        with ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="kcr-unzstd") as pool:
            try:
                while True:
                    frame = read_frame(self._src)
                    if frame is None:
                        raise TruncatedStream("the image ends before its end record: truncated")
                    if frame.kind == KIND_PAGES:
                        if self.header is None:
                            raise ProtocolError("page data before the image header")
                        self.stats.page_batches += 1
                        pending.append(pool.submit(decode_batch, frame.flags, frame.payload))
                    else:
                        rec = decode_record(bytes(frame.payload))
                        self.stats.records += 1
                        if self.header is None:
                            if not isinstance(rec, ImageHeader):
                                raise ProtocolError("the stream does not start with an image header")
                            check_format(rec)
                            self.header = rec
                        pending.append(rec)
                        if isinstance(rec, EndOfImage):
                            break
                    while len(pending) > self._max_pending or (pending and not isinstance(pending[0], Future)):
                        yield self._resolve(pending.popleft())
                while pending:
                    yield self._resolve(pending.popleft())
            finally:
                for item in pending:
                    if isinstance(item, Future):
                        item.cancel()
        assert self.end is not None
        if self._src.read(1):
            raise ProtocolError("data after the end of the image")

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


def check_format(header: ImageHeader) -> None:
    """Refuse images this reader cannot interpret at all (whatever the machine)."""
    if header.format_version != FORMAT_VERSION:
        newer = header.format_version > FORMAT_VERSION
        raise IncompatibleImage(
            f"image format version {header.format_version} was written by kcr-migrate "
            f"{header.tool_version}; this kcr-migrate reads version {FORMAT_VERSION} only: "
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
    if path == "-":
        return os.fdopen(os.dup(0), "rb", buffering=1 << 20)
    return open(path, "rb", buffering=1 << 20)
