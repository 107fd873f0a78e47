"""Random and mutated bytes into the decoder: only the transport's own errors, never a hang,
never more buffered than was fed (and never more than one frame past the cap)."""
from __future__ import annotations

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests._transport import example_records, page_batch
from transport.errors import MigrationError, ProtocolError
from transport.framing import (
    FRAME_MAGIC,
    HEADER,
    HEADER_SIZE,
    KIND_PAGES,
    KIND_RECORD,
    MAX_PAGES_LEN,
    STREAM_MAGIC,
    FrameDecoder,
    encode_frame,
)
from transport.local import socket_pair
from transport.pages import decode_batch, encode_batch
from transport.schema import decode_record
from transport.stream import FramedStream

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _valid_stream() -> bytes:
    out = bytearray(STREAM_MAGIC)
    for rec in list(example_records().values())[:6]:
        out += encode_frame(KIND_RECORD, 0, rec.pack())
    for level in (None, 1):
        enc = encode_batch(page_batch(6, seed=level or 0), level)
        out += encode_frame(KIND_PAGES, enc.flags, b"".join(bytes(p) for p in enc.parts))
    return bytes(out)


VALID = _valid_stream()


def decode_everything(data: bytes, chunks: list[int], *, magic: bool = True) -> int:
    """Feed ``data`` in ``chunks``; decode every frame fully. Returns frames decoded.
    Raises only ProtocolError (TruncatedStream, ChecksumError... are ProtocolErrors)."""
    dec = FrameDecoder(expect_stream_magic=magic)
    frames = 0
    pos = 0
    sizes = iter(chunks or [len(data) or 1])
    while pos < len(data):
        n = max(1, next(sizes, 4096))
        dec.feed(data[pos: pos + n])
        pos += n
        assert dec.buffered <= pos
        while (frame := dec.next_frame()) is not None:
            frames += 1
            if frame.kind == KIND_RECORD:
                decode_record(memoryview(frame.payload))
            else:
                decode_batch(frame.flags, frame.payload)
        assert dec.wanted() >= 0
    dec.close()
    return frames


@FUZZ
@given(st.binary(max_size=4096), st.lists(st.integers(1, 600), max_size=20), st.booleans())
def test_random_bytes(data: bytes, chunks: list[int], magic: bool) -> None:
    try:
        decode_everything(data, chunks, magic=magic)
    except ProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=2048), st.lists(st.integers(1, 600), max_size=20))
def test_random_frames_after_a_good_start(body: bytes, chunks: list[int]) -> None:
    try:
        decode_everything(STREAM_MAGIC + body, chunks)
    except ProtocolError:
        pass


@FUZZ
@given(st.integers(0, len(VALID) * 8 - 1), st.lists(st.integers(1, 5000), max_size=10))
def test_bit_flips_in_a_valid_stream(bit: int, chunks: list[int]) -> None:
    data = bytearray(VALID)
    data[bit // 8] ^= 1 << (bit % 8)
    try:
        decode_everything(bytes(data), chunks)
    except ProtocolError:
        pass


@FUZZ
@given(st.integers(0, len(VALID)), st.binary(max_size=64))
def test_truncation_and_insertion(cut: int, junk: bytes) -> None:
    for data in (VALID[:cut], VALID[:cut] + junk + VALID[cut:]):
        try:
            frames = decode_everything(data, [])
        except ProtocolError:
            continue
        assert data == VALID or frames <= 8


@FUZZ
@given(st.integers(1, 0xFFFFFFFF), st.sampled_from([KIND_RECORD, KIND_PAGES, 0, 3, 255]), st.integers(0, 255))
def test_any_header_is_checked_before_its_payload(length: int, kind: int, flags: int) -> None:
    dec = FrameDecoder()
    dec.feed(STREAM_MAGIC + HEADER.pack(FRAME_MAGIC, kind, flags, length, 0))
    try:
        assert dec.next_frame() is None
    except ProtocolError:
        return
    assert length <= MAX_PAGES_LEN and dec.wanted() == length and dec.buffered == 0


@settings(max_examples=40, deadline=None, database=None)
@given(st.binary(min_size=1, max_size=3000))
def test_a_live_stream_of_garbage_fails_cleanly(data: bytes) -> None:
    async def main() -> None:
        a, b = socket_pair()
        async with a, FramedStream(b, frame_timeout=0.05) as fb:
            await a.send_all(data)
            await a.send_eof()
            try:
                while await fb.receive(timeout=1) is not None:
                    pass
            except MigrationError:
                pass
    trio.run(main)


def test_the_valid_stream_decodes() -> None:
    assert decode_everything(VALID, [1, 5, 1000]) == 8
    assert HEADER_SIZE == 12
