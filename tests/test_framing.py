"""The frame layer: the incremental decoder, its caps and checks, and the file reader it shares."""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import pytest

from transport.errors import ChecksumError, ProtocolError, TruncatedStream
from transport.image import open_input
from transport.framing import (
    FRAME_MAGIC,
    HEADER,
    HEADER_SIZE,
    KIND_PAGES,
    KIND_RECORD,
    MAX_PAGES_LEN,
    MAX_RECORD_LEN,
    STREAM_MAGIC,
    FrameDecoder,
    MappedFile,
    encode_frame,
    frame_header,
    read_frame,
    read_stream_magic,
)


def stream_of(*payloads: bytes, kind: int = KIND_RECORD) -> bytes:
    return STREAM_MAGIC + b"".join(encode_frame(kind, 0, p) for p in payloads)


def decode_all(data: bytes, chunk: int) -> list[bytes]:
    dec = FrameDecoder()
    out = []
    for i in range(0, len(data), chunk):
        dec.feed(data[i: i + chunk])
        while (frame := dec.next_frame()) is not None:
            out.append(bytes(frame.payload))
    dec.close()
    return out


@pytest.mark.parametrize("chunk", [1, 7, 12, 4096, 1 << 20])
def test_frames_decode_whatever_the_chunking(chunk: int) -> None:
    big = 3 << 20 if chunk >= 4096 else 70000   # a frame spanning many chunks either way
    payloads = [b"", b"x", os.urandom(5000), os.urandom(big), b"last"]
    assert decode_all(stream_of(*payloads), chunk) == payloads


def test_a_payload_inside_one_chunk_is_not_copied() -> None:
    data = stream_of(b"a" * 1000)
    dec = FrameDecoder()
    dec.feed(data)
    frame = dec.next_frame()
    assert frame is not None and isinstance(frame.payload, memoryview)
    assert frame.payload.obj is data


def test_fed_buffers_are_copied_so_callers_may_reuse_them() -> None:
    buf = bytearray(stream_of(b"hello"))
    dec = FrameDecoder()
    dec.feed(buf)
    buf[:] = bytes(len(buf))
    frame = dec.next_frame()
    assert frame is not None and bytes(frame.payload) == b"hello"


def test_garbage_is_refused_at_the_first_wrong_byte() -> None:
    dec = FrameDecoder()
    dec.feed(b"\x89KCX")
    with pytest.raises(ProtocolError, match="bad magic"):
        dec.next_frame()


def test_wrong_frame_magic() -> None:
    dec = FrameDecoder()
    dec.feed(STREAM_MAGIC + b"XY")
    with pytest.raises(ProtocolError, match="frame magic"):
        dec.next_frame()


def test_unknown_frame_kind() -> None:
    dec = FrameDecoder()
    dec.feed(STREAM_MAGIC + HEADER.pack(FRAME_MAGIC, 9, 0, 0, 0))
    with pytest.raises(ProtocolError, match="kind 9"):
        dec.next_frame()


@pytest.mark.parametrize("kind,cap", [(KIND_RECORD, MAX_RECORD_LEN), (KIND_PAGES, MAX_PAGES_LEN)])
def test_oversized_length_is_refused_before_any_payload(kind: int, cap: int) -> None:
    dec = FrameDecoder()
    dec.feed(STREAM_MAGIC + HEADER.pack(FRAME_MAGIC, kind, 0, cap + 1, 0))
    with pytest.raises(ProtocolError, match="exceeds the cap"):
        dec.next_frame()
    assert dec.buffered == 0


def test_a_stream_cap_below_the_kind_cap() -> None:
    dec = FrameDecoder(max_payload=1000)
    dec.feed(STREAM_MAGIC + HEADER.pack(FRAME_MAGIC, KIND_RECORD, 0, 1001, 0))
    with pytest.raises(ProtocolError, match="cap of 1000"):
        dec.next_frame()


def test_bit_flip_in_a_payload_is_a_checksum_error() -> None:
    data = bytearray(stream_of(os.urandom(100)))
    data[len(STREAM_MAGIC) + HEADER_SIZE + 50] ^= 4
    dec = FrameDecoder()
    dec.feed(bytes(data))
    with pytest.raises(ChecksumError):
        dec.next_frame()


@pytest.mark.parametrize("cut", [3, len(STREAM_MAGIC) + 5, len(STREAM_MAGIC) + HEADER_SIZE + 10])
def test_end_inside_a_frame_is_truncation(cut: int) -> None:
    data = stream_of(os.urandom(100))[:cut]
    dec = FrameDecoder()
    dec.feed(data)
    assert dec.next_frame() is None
    with pytest.raises(TruncatedStream):
        dec.close()


def test_end_between_frames_is_clean() -> None:
    dec = FrameDecoder()
    dec.feed(stream_of(b"one"))
    assert dec.next_frame() is not None
    assert not dec.in_frame
    dec.close()


def test_wanted_says_how_much_the_frame_in_progress_needs() -> None:
    data = stream_of(b"z" * 1000)
    dec = FrameDecoder()
    assert dec.wanted() == len(STREAM_MAGIC) + HEADER_SIZE
    dec.feed(data[: len(STREAM_MAGIC) + HEADER_SIZE])
    assert dec.next_frame() is None
    assert dec.wanted() == 1000
    dec.feed(data[len(STREAM_MAGIC) + HEADER_SIZE:])
    assert dec.next_frame() is not None and dec.wanted() == HEADER_SIZE


def test_file_reader_shares_the_checks() -> None:
    payloads = [b"abc", os.urandom(70000)]
    f = io.BytesIO(stream_of(*payloads))
    read_stream_magic(f)
    assert [bytes(fr.payload) for fr in iter(lambda: read_frame(f), None)] == payloads
    bad = io.BytesIO(stream_of(b"abc")[: len(STREAM_MAGIC) + HEADER_SIZE + 1])
    read_stream_magic(bad)
    with pytest.raises(TruncatedStream):
        read_frame(bad)


def test_an_image_file_only_we_can_write_is_mapped_and_read_without_copies(tmp_path: Path) -> None:
    """Frames of a mapped file are the same frames, their payloads views of the mapping; a
    file cut short is truncation; a file others may write is read, not mapped (what was
    checked must not change under the views afterwards)."""
    payloads = [b"abc", os.urandom(70000), b""]
    path = tmp_path / "img"
    path.write_bytes(stream_of(*payloads))
    os.chmod(path, 0o644)
    with open_input(str(path)) as f:
        assert isinstance(f, MappedFile)
        read_stream_magic(f)
        frames = list(iter(lambda: read_frame(f), None))
        assert [bytes(fr.payload) for fr in frames] == payloads
        assert isinstance(frames[1].payload, memoryview)
    assert bytes(frames[1].payload) == payloads[1]          # still readable once the file is closed
    path.write_bytes(stream_of(*payloads)[:-100])
    with open_input(str(path)) as f:
        read_stream_magic(f)
        assert read_frame(f) is not None
        with pytest.raises(TruncatedStream):
            read_frame(f)
    os.chmod(path, 0o666)
    with open_input(str(path)) as f:
        assert not isinstance(f, MappedFile)


def test_header_layout_is_stable() -> None:
    """Magic, kind, flags, length, crc32: 12 bytes, little-endian (other versions read this)."""
    assert HEADER_SIZE == 12
    assert HEADER.format == "<2sBBII"
    assert struct.unpack("<2sBBII", encode_frame(KIND_RECORD, 0, b"")[:12])[0] == b"KF"


def test_a_decoded_frame_carries_its_checked_crc_and_a_known_crc_is_not_recomputed() -> None:
    payload = os.urandom(5000)
    dec = FrameDecoder()
    dec.feed(stream_of(payload, kind=KIND_PAGES))
    frame = dec.next_frame()
    assert frame is not None and frame.crc == zlib.crc32(payload)
    assert frame_header(KIND_PAGES, 0, [payload], crc=frame.crc) == frame_header(KIND_PAGES, 0, [payload])
    assert HEADER.unpack(frame_header(KIND_PAGES, 0, [payload], crc=7))[4] == 7
