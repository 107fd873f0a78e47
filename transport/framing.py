"""Length-prefixed frames: the byte layer under images and live streams.

A stream starts with ``STREAM_MAGIC`` and is a sequence of frames. Each frame is a 12-byte
header and a payload::

    magic  b"KF"   2 bytes
    kind   u8      RECORD (a msgpack record), PAGES (a page batch) or TAG (a signature)
    flags  u8      kind-specific (PAGES: bit 0 = zstd-compressed)
    length u32     payload bytes, capped before anything is allocated
    crc32  u32     of the payload

A signed image (format version 2, ``transport.signing``) follows every RECORD and PAGES
frame with a TAG frame: 32 bytes of HMAC-SHA256 chained over the frames so far. crc32s
catch accidents; tags catch edits. Live streams carry no TAG frames (their channels are
authenticated instead).

The decoder is sans-IO (``FrameDecoder``) so channels, files and fuzz tests share it; a
blocking ``read_frame`` serves files and pipes, and a ``MappedFile`` (an image file mapped
into memory), whose payloads it hands on as views of the mapping, never copied.
"""
from __future__ import annotations

import collections
import mmap
import os
import stat
import struct
from typing import BinaryIO, Iterable

from zlib_ng import zlib_ng     # zlib's crc32, several times faster (it uses the CPU's carry-less multiply)

from transport.errors import ChecksumError, ProtocolError, TruncatedStream
from transport.frozen import frozen

STREAM_MAGIC = b"\x89KCR\r\n\x1a\n"
FRAME_MAGIC = b"KF"
HEADER = struct.Struct("<2sBBII")
HEADER_SIZE = HEADER.size

KIND_RECORD = 1
KIND_PAGES = 2
KIND_TAG = 3            # format version 2: an image's signature of the frame before it
KINDS = (KIND_RECORD, KIND_PAGES, KIND_TAG)

MAX_RECORD_LEN = 16 << 20
MAX_PAGES_LEN = 64 << 20
TAG_LEN = 32            # HMAC-SHA256


def max_len_for(kind: int) -> int:
    return MAX_RECORD_LEN if kind == KIND_RECORD else TAG_LEN if kind == KIND_TAG else MAX_PAGES_LEN


@frozen
class Frame:
    kind: int
    flags: int
    payload: bytes | bytearray | memoryview
    crc: int | None = None     # the payload's checksum, as checked on receipt


def crc32_of(parts: Iterable[bytes | bytearray | memoryview]) -> int:
    crc = 0
    for part in parts:
        crc = zlib_ng.crc32(part, crc)
    return crc


def frame_header(kind: int, flags: int, parts: Iterable[bytes | bytearray | memoryview], *,
                 crc: int | None = None) -> bytes:
    """The header for a payload given as one or more buffers (they are not copied). ``crc``:
    the payload's checksum if already known (a frame forwarded as it was received and checked)."""
    parts = list(parts)
    length = sum(len(p) for p in parts)
    if length > max_len_for(kind):
        raise ProtocolError(f"frame of {length} bytes exceeds the {max_len_for(kind)}-byte cap")
    return HEADER.pack(FRAME_MAGIC, kind, flags, length, crc32_of(parts) if crc is None else crc)


def encode_frame(kind: int, flags: int, payload: bytes) -> bytes:
    return frame_header(kind, flags, [payload]) + payload


def parse_header(header: bytes | bytearray | memoryview) -> tuple[int, int, int, int]:
    """Check a frame header and return (kind, flags, length, crc)."""
    magic, kind, flags, length, crc = HEADER.unpack(header)
    if magic != FRAME_MAGIC:
        raise ProtocolError(f"bad frame magic {bytes(magic)!r}: not a kcr-migrate stream, or corrupt")
    if kind not in KINDS:
        raise ProtocolError(f"unknown frame kind {kind}")
    if kind == KIND_TAG and length != TAG_LEN:
        raise ProtocolError(f"a signature frame of {length} bytes, not {TAG_LEN}: corrupt stream")
    if length > max_len_for(kind):
        raise ProtocolError(f"frame length {length} exceeds the cap of {max_len_for(kind)} bytes")
    return kind, flags, length, crc


def header_of(frame: Frame) -> bytes:
    """The 12 header bytes a frame was read with (it passed ``parse_header``)."""
    assert frame.crc is not None
    return HEADER.pack(FRAME_MAGIC, frame.kind, frame.flags, len(frame.payload), frame.crc)


def check_payload(payload: bytes | bytearray | memoryview, crc: int) -> None:
    if zlib_ng.crc32(payload) != crc:
        raise ChecksumError("frame checksum mismatch: the stream is corrupt")


def check_stream_magic(magic: bytes | bytearray) -> None:
    if len(magic) < len(STREAM_MAGIC):
        raise TruncatedStream("the stream ended before its first bytes: empty or truncated image")
    if bytes(magic) != STREAM_MAGIC:
        raise ProtocolError("not a kcr-migrate image or stream (bad magic)")


class FrameDecoder:
    """Incremental decoder: ``feed`` bytes, take whole frames with ``next_frame``.

    Fed chunks are kept as they arrive (no growing buffer, no prefix deletions): a payload
    that lies within one chunk is returned as a view of it, one that spans chunks is joined
    once. Every length is checked against the cap (``max_payload`` if smaller than the
    kind's cap) as soon as its header is complete, before a byte of payload is buffered for
    it, so a reader that feeds at most ``wanted()`` bytes never holds more than one frame.
    """

    def __init__(self, *, expect_stream_magic: bool = True, max_payload: int | None = None) -> None:
        self._chunks: collections.deque[memoryview] = collections.deque()
        self._size = 0
        self._need_magic = expect_stream_magic
        self._header: tuple[int, int, int, int] | None = None
        self._max_payload = max_payload

    @property
    def buffered(self) -> int:
        return self._size

    @property
    def in_frame(self) -> bool:
        """True while part of a frame (or of the stream magic) has been received."""
        return self._header is not None or self._size > 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not len(data):
            return
        # Keep our own immutable copy of mutable buffers; bytes are kept as they are.
        view = memoryview(data if isinstance(data, bytes) else bytes(data)).cast("B")
        self._chunks.append(view)
        self._size += len(view)

    def _peek(self, n: int) -> bytes:
        out = bytearray()
        for chunk in self._chunks:
            out += chunk[: n - len(out)]
            if len(out) >= n:
                break
        return bytes(out)

    def _take(self, n: int) -> bytes | memoryview:
        """Remove and return the first ``n`` buffered bytes (n <= buffered)."""
        first = self._chunks[0]
        if len(first) >= n:
            if len(first) == n:
                self._chunks.popleft()
            else:
                self._chunks[0] = first[n:]
            self._size -= n
            return first[:n]
        parts: list[memoryview] = []
        need = n
        while need:
            chunk = self._chunks[0]
            if len(chunk) <= need:
                parts.append(self._chunks.popleft())
                need -= len(chunk)
            else:
                parts.append(chunk[:need])
                self._chunks[0] = chunk[need:]
                need = 0
        self._size -= n
        return b"".join(parts)

    def next_frame(self) -> Frame | None:
        if self._need_magic:
            if self._size < len(STREAM_MAGIC):
                # Reject garbage as soon as the first bytes disagree.
                if not STREAM_MAGIC.startswith(self._peek(self._size)):
                    raise ProtocolError("not a kcr-migrate image or stream (bad magic)")
                return None
            check_stream_magic(bytes(self._take(len(STREAM_MAGIC))))
            self._need_magic = False
        if self._header is None:
            if self._size < HEADER_SIZE:
                if self._size >= 2 and self._peek(2) != FRAME_MAGIC:
                    raise ProtocolError("bad frame magic: corrupt stream")
                return None
            header = parse_header(self._take(HEADER_SIZE))
            if self._max_payload is not None and header[2] > self._max_payload:
                raise ProtocolError(f"frame length {header[2]} exceeds this stream's cap of "
                                    f"{self._max_payload} bytes")
            self._header = header
        kind, flags, length, crc = self._header
        if self._size < length:
            return None
        payload = self._take(length) if length else b""
        self._header = None
        check_payload(payload, crc)
        return Frame(kind, flags, payload, crc)

    def wanted(self) -> int:
        """How many more bytes the frame in progress needs (a hint for readers)."""
        if self._need_magic:
            return len(STREAM_MAGIC) + HEADER_SIZE - self._size
        if self._header is not None:
            return max(0, self._header[2] - self._size)
        return max(1, HEADER_SIZE - self._size)

    def close(self) -> None:
        """The peer ended the stream: anything half-received is a truncation."""
        if self._header is not None or self._size:
            raise TruncatedStream("the stream ended in the middle of a frame: truncated")


class MappedFile:
    """A regular file read through a read-only mapping of it: ``take`` returns views of the
    mapping, so frame payloads are not copied. Only for files that nobody but this user can
    write: what is checked once must not change under the views afterwards."""

    def __init__(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        # Not MAP_POPULATE: mapping a 1 GiB image up front cost 200-400 ms here; faulted in as it
        # is read (many pages a fault), the same pages cost about as much as one pass of crc32.
        self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        self._map.madvise(mmap.MADV_SEQUENTIAL)
        self._view = memoryview(self._map)
        self._pos = 0

    @staticmethod
    def suits(fd: int) -> bool:
        """A non-empty regular file owned by this user, which no one else may write."""
        st = os.fstat(fd)
        return (stat.S_ISREG(st.st_mode) and st.st_size > 0 and st.st_uid == os.geteuid()
                and not st.st_mode & 0o022)

    def take(self, n: int) -> memoryview:
        """Up to ``n`` bytes from where reading is, as a view of the mapping."""
        out = self._view[self._pos: self._pos + n]
        self._pos += len(out)
        return out

    def read(self, n: int = -1) -> bytes:
        return bytes(self.take(len(self._view) if n < 0 else n))

    def readinto(self, buf: memoryview) -> int:
        data = self.take(len(buf))
        buf[:len(data)] = data
        return len(data)

    def close(self) -> None:
        """Reading ends here; the mapping goes with the last view of it."""
        self._view.release()

    def __enter__(self) -> "MappedFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_exact(f: BinaryIO, n: int, what: str) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not k:
            raise TruncatedStream(f"the stream ended in the middle of {what}: truncated image")
        got += k
    return buf


def read_stream_magic(f: BinaryIO) -> None:
    data = f.read(len(STREAM_MAGIC))
    check_stream_magic(data or b"")


def read_frame(f: BinaryIO, *, check_pages: bool = True) -> Frame | None:
    """Read one frame from a blocking binary file; None at a clean end of stream.
    ``check_pages=False``: a PAGES frame's crc32 is left for the caller to check
    (``check_payload``), in a worker thread beside the frame's other checks."""
    first = f.read(1)
    if not first:
        return None
    header = first + _read_exact(f, HEADER_SIZE - 1, "a frame header")
    kind, flags, length, crc = parse_header(header)
    if isinstance(f, MappedFile):
        payload: bytearray | memoryview = f.take(length)
        if len(payload) != length:
            raise TruncatedStream("the stream ended in the middle of a frame: truncated image")
    else:
        payload = _read_exact(f, length, "a frame")
    if check_pages or kind != KIND_PAGES:
        check_payload(payload, crc)
    return Frame(kind, flags, payload, crc)
