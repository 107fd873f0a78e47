"""Page batches: page contents with their addresses, zstd-compressed or raw.

A PAGES frame's payload is::

    nruns   u32
    raw_len u32                 bytes of page data once decompressed
    runs    nruns x (addr u64, npages u32)
    data    zstd frame, or raw pages (frame flag bit 0 says which)

Batches that do not compress (random data) go raw. The frame's crc32 covers the payload (and
an image's tag, or a live channel's seal, where there is one). zstd frames carry no content
checksum of their own: one over the decompressed pages would catch only a bug of the
decompressor's, at 20 ms of CPU per 256 MiB to write it and as much to check it (frames of
older images that have one are still checked). A zstd frame must say its decompressed size,
and is refused unless it is the batch's. Everything is bounds-checked before a single byte
is allocated for the data.
"""
from __future__ import annotations

import random
import struct
import threading
from typing import Sequence

import zstandard

from transport.errors import ProtocolError
from transport.framing import MAX_PAGES_LEN
from transport.frozen import frozen
from transport.schema import PAGE_SIZE, TASK_SIZE

FLAG_ZSTD = 1
BATCH_HEAD = struct.Struct("<II")
RUN = struct.Struct("<QI")
MAX_BATCH_RAW = 32 << 20
MAX_RUNS = MAX_BATCH_RAW // PAGE_SIZE
DEFAULT_BATCH_BYTES = 2 << 20
# A batch that does not shrink below this share of its size is sent raw.
RAW_THRESHOLD = 0.92
# Pages spread over a batch that are compressed first: the batch only if they shrank.
SAMPLE_PAGES = 16

Run = tuple[int, int]   # (address, number of pages)


@frozen
class PageBatch:
    runs: tuple[Run, ...]
    data: bytes | bytearray | memoryview

    @property
    def npages(self) -> int:
        return sum(n for _, n in self.runs)

    def pages(self) -> list[tuple[int, memoryview]]:
        """(address, bytes) for each run, viewing into ``data``."""
        out: list[tuple[int, memoryview]] = []
        view = memoryview(self.data)
        off = 0
        for addr, n in self.runs:
            out.append((addr, view[off: off + n * PAGE_SIZE]))
            off += n * PAGE_SIZE
        return out


@frozen
class EncodedBatch:
    """A batch ready for a PAGES frame: flags and payload parts (not concatenated)."""

    flags: int
    parts: tuple[bytes | bytearray | memoryview, ...]
    npages: int
    bytes_raw: int

    @property
    def bytes_on_wire(self) -> int:
        return sum(len(p) for p in self.parts)


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def run_table(runs: Sequence[Run], raw_len: int) -> bytes:
    table = bytearray(BATCH_HEAD.pack(len(runs), raw_len))
    for addr, n in runs:
        table += RUN.pack(addr, n)
    return bytes(table)


def encode_batch(batch: PageBatch, level: int | None) -> EncodedBatch:
    """Compress a batch (``level`` None = never compress). Safe to call from worker threads."""
    raw_len = len(batch.data)
    npages = batch.npages
    if npages * PAGE_SIZE != raw_len:
        raise ValueError("page batch data does not match its runs")
    if raw_len > MAX_BATCH_RAW:
        raise ValueError(f"page batch of {raw_len} bytes exceeds {MAX_BATCH_RAW}")
    table = run_table(batch.runs, raw_len)
    if level is not None and not _looks_incompressible(batch.data, level):
        packed = _compressor(level).compress(batch.data)
        if len(packed) < raw_len * RAW_THRESHOLD:
            return EncodedBatch(FLAG_ZSTD, (table, packed), npages, raw_len)
    return EncodedBatch(0, (table, batch.data), npages, raw_len)


def _looks_incompressible(data: bytes | bytearray | memoryview, level: int) -> bool:
    """Pages of random-looking data (encrypted, compressed, the benchmark's) do not shrink, and
    compressing a batch of them only to send it raw costs as much CPU as sealing it. A sample
    of pages spread over the batch tells: if even they do not shrink, neither will the rest."""
    npages = len(data) // PAGE_SIZE
    if npages < 4 * SAMPLE_PAGES:
        return False
    view = memoryview(data)
    # Pages at fixed pseudo-random places: evenly spaced ones could all fall on the same kind
    # of page in memory laid out with a period (every 4th page a random one, ...).
    picks = sorted(random.Random(npages).sample(range(npages), SAMPLE_PAGES))
    sample = b"".join(view[i * PAGE_SIZE: (i + 1) * PAGE_SIZE] for i in picks)
    return len(_compressor(level).compress(sample)) >= len(sample) * RAW_THRESHOLD


def decode_batch(flags: int, payload: bytes | bytearray | memoryview) -> PageBatch:
    """Validate and decode a PAGES frame payload. Safe to call from worker threads."""
    view = memoryview(payload)
    if len(view) < BATCH_HEAD.size:
        raise ProtocolError("page batch shorter than its header")
    nruns, raw_len = BATCH_HEAD.unpack_from(view)
    if nruns == 0 or nruns > MAX_RUNS:
        raise ProtocolError(f"page batch with {nruns} runs")
    if raw_len == 0 or raw_len > MAX_BATCH_RAW or raw_len % PAGE_SIZE:
        raise ProtocolError(f"page batch of {raw_len} bytes")
    table_end = BATCH_HEAD.size + nruns * RUN.size
    if len(view) < table_end:
        raise ProtocolError("page batch shorter than its run table")
    runs: list[Run] = []
    total = 0
    for i in range(nruns):
        addr, n = RUN.unpack_from(view, BATCH_HEAD.size + i * RUN.size)
        if n == 0 or addr % PAGE_SIZE or addr + n * PAGE_SIZE > TASK_SIZE:
            raise ProtocolError(f"page run {addr:#x}+{n} pages is outside user space or unaligned")
        runs.append((addr, n))
        total += n
    if total * PAGE_SIZE != raw_len:
        raise ProtocolError("page batch runs do not add up to its length")
    body = view[table_end:]
    if flags & FLAG_ZSTD:
        try:
            params = zstandard.get_frame_parameters(body)
        except zstandard.ZstdError as exc:
            raise ProtocolError(f"page batch: bad zstd frame ({exc})") from None
        if params.content_size != raw_len:
            raise ProtocolError("page batch: compressed size header disagrees with the batch")
        try:
            data: bytes | memoryview = _decompressor().decompress(body, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise ProtocolError(f"page batch: corrupt zstd data ({exc})") from None
        if len(data) != raw_len:
            raise ProtocolError("page batch: decompressed to the wrong size")
    else:
        if len(body) != raw_len:
            raise ProtocolError("page batch: raw data has the wrong size")
        data = body
    return PageBatch(tuple(runs), data)


assert MAX_BATCH_RAW + BATCH_HEAD.size + MAX_RUNS * RUN.size <= MAX_PAGES_LEN
