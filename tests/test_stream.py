"""FramedStream: order, compression on and off, big batches, bounded buffering, bad peers."""
from __future__ import annotations

import os
from typing import Any, Awaitable, Callable

import pytest
import trio
import trio.testing

from tests._transport import page_batch
from transport.errors import ChannelClosed, PeerGone, ProtocolError, TransportTimeout, TruncatedStream
from transport.framing import FRAME_MAGIC, HEADER, KIND_PAGES, KIND_RECORD, STREAM_MAGIC, encode_frame
from transport.local import socket_pair
from transport.pages import MAX_BATCH_RAW, PageBatch
from transport.protocol import Bye, Progress
from transport.schema import PAGE_SIZE
from transport.stream import FramedStream, RawBatch


def same(a: PageBatch, b: PageBatch) -> bool:
    return a.runs == b.runs and bytes(a.data) == bytes(b.data)


async def _exchange(fa: FramedStream, fb: FramedStream, sent: list[Any],
                    send_record: Callable[[Any], Awaitable[Any]]) -> list[Any]:
    """Send ``sent`` (page batches, and records through ``send_record``) on ``fa``; what ``fb`` got."""
    async def send() -> None:
        for item in sent:
            await (fa.send_batch(item) if isinstance(item, PageBatch) else send_record(item))
        await fa.flush()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        return [await fb.receive() for _ in sent]


def _assert_same(sent: list[Any], got: list[Any]) -> None:
    assert len(got) == len(sent)
    for want, have in zip(sent, got):
        assert same(want, have) if isinstance(want, PageBatch) and isinstance(have, PageBatch) else want == have


@pytest.mark.parametrize("level", [None, 1, "auto"])
async def test_records_and_batches_arrive_in_order(level: Any) -> None:
    a, b = socket_pair()
    sent: list[Any] = []
    for i in range(40):
        sent.append(page_batch(64 + i, seed=i, fill="mixed" if i % 2 else "random"))
        if i % 5 == 0:
            sent.append(Progress(i + 1, {"i": i}))   # request ids start at 1
    async with FramedStream(a, level=level) as fa, FramedStream(b) as fb:
        got = await _exchange(fa, fb, sent, fa.send_record)
    _assert_same(sent, got)
    assert fa.stats.sent.batches == fb.stats.received.batches == 40
    assert fa.stats.sent.bytes_raw == fb.stats.received.bytes_raw == sum(
        len(x.data) for x in sent if isinstance(x, PageBatch))
    assert fa.stats.sent.bytes_on_wire == fb.stats.received.bytes_on_wire


@pytest.mark.parametrize("level", [None, 1])
@pytest.mark.parametrize("fill", ["mixed", "random"])
async def test_largest_page_batches(level: int | None, fill: str) -> None:
    batch = page_batch(MAX_BATCH_RAW // PAGE_SIZE, seed=7, fill=fill)
    a, b = socket_pair()
    async with FramedStream(a, level=level) as fa, FramedStream(b) as fb:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fa.send_batch, batch)
            got = await fb.receive()
    assert isinstance(got, PageBatch) and same(got, batch)
    compressed = fa.stats.sent.bytes_on_wire < fa.stats.sent.bytes_raw
    assert compressed == (level is not None and fill == "mixed")
    assert fa.stats.batches_by_level == {"raw" if not compressed else "1": 1}


async def test_a_batch_over_the_limit_is_refused_at_once() -> None:
    a, b = socket_pair()
    async with b, FramedStream(a) as fa:
        with pytest.raises(ValueError, match="at most"):
            await fa.send_batch(PageBatch(((0x1000, MAX_BATCH_RAW // PAGE_SIZE + 1),),
                                          bytes(MAX_BATCH_RAW + PAGE_SIZE)))


async def forward(batch: PageBatch, crc_flip: int = 0) -> PageBatch:
    """Send ``batch`` over one stream, forward what arrives undecoded over a second (its crc
    xored with ``crc_flip``), and decode it at the end of that one."""
    a, b = socket_pair()
    c, d = socket_pair()
    async with FramedStream(a) as fa, FramedStream(b) as fb, FramedStream(c) as fc, FramedStream(d) as fd:
        await fa.send_batch(batch)
        raw = await fb.receive_item()
        assert isinstance(raw, RawBatch) and raw.npages == batch.npages and raw.crc is not None
        await fc.send_batch(RawBatch(raw.flags, raw.payload, raw.crc ^ crc_flip))
        return await fd.receive()   # type: ignore[return-value]


async def test_received_batches_can_be_forwarded_undecoded() -> None:
    batch = page_batch(300, seed=3)
    got = await forward(batch)
    assert isinstance(got, PageBatch) and same(got, batch)


async def test_a_forwarded_batch_keeps_its_checked_crc_and_the_next_receiver_checks_it() -> None:
    # The crc travels on unchanged (it is not computed again); a wrong one is caught downstream.
    with pytest.raises(ProtocolError, match="checksum"):
        await forward(page_batch(64, seed=4), crc_flip=1)


# --- backpressure -------------------------------------------------------------------------

async def _until_quiet(fs: FramedStream) -> None:
    """Until every task is blocked and no compression thread runs: the stall is complete."""
    while True:
        await trio.testing.wait_all_tasks_blocked(cushion=0.01)
        if fs._limiter.borrowed_tokens == 0:
            return
        await trio.sleep(0.01)


@pytest.mark.parametrize("level", [None, 1])
async def test_a_stalled_receiver_stops_the_sender_within_its_cap(level: int | None) -> None:
    a, b = socket_pair()
    cap = 12 << 20
    produced = 0
    total = 100
    with trio.CancelScope() as scope:
        async with b, FramedStream(a, level=level, max_bytes_held=cap, max_in_flight=4) as fa:
            async def produce() -> None:
                nonlocal produced
                for i in range(total):
                    await fa.send_batch(page_batch(512, seed=i, fill="random"))
                    produced += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                await _until_quiet(fa)          # nobody reads b: everything is stuck
                assert produced < total
                assert 0 < fa.stats.bytes_held <= fa.stats.peak_bytes_held <= cap
                scope.cancel()


async def test_queued_records_keep_their_order_among_batches_and_are_held_until_written() -> None:
    """``queue_record`` (a record between each process's pages in a tree's final round) keeps
    the stream's order, and counts in what the sender holds until it is written."""
    a, b = socket_pair()
    sent: list[Any] = []
    for i in range(12):
        sent.append(Progress(i + 1, {"i": i}))
        sent.append(page_batch(32 + i, seed=i, fill="mixed"))
    async with FramedStream(a, level=1) as fa, FramedStream(b) as fb:
        got = await _exchange(fa, fb, sent, fa.queue_record)
        assert fa.stats.bytes_held == 0
    _assert_same(sent, got)
    assert fa.stats.sent.records >= 12 and fa.stats.peak_bytes_held > 0


async def test_queued_records_stop_at_the_senders_cap() -> None:
    a, b = socket_pair()
    cap = 1 << 20
    queued = 0
    with trio.CancelScope() as scope:
        async with b, FramedStream(a, max_bytes_held=cap) as fa:
            async def produce() -> None:
                nonlocal queued
                for i in range(10_000):
                    await fa.queue_record(Bye("x" * 4000))
                    queued += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                await _until_quiet(fa)          # nobody reads b: the transport's buffers fill, then the cap
                assert queued < 10_000
                assert 0 < fa.stats.bytes_held <= cap
                scope.cancel()


# --- bad peers ----------------------------------------------------------------------------

async def test_clean_end_of_stream() -> None:
    a, b = socket_pair()
    async with a, FramedStream(b) as fb:
        await a.send_all(STREAM_MAGIC + encode_frame(KIND_RECORD, 0, Bye().pack()))
        await a.send_eof()
        assert await fb.receive() == Bye()
        assert await fb.receive() is None


async def test_peer_that_ends_inside_a_frame() -> None:
    a, b = socket_pair()
    frame = encode_frame(KIND_RECORD, 0, Bye("x" * 100).pack())
    async with a, FramedStream(b) as fb:
        await a.send_all(STREAM_MAGIC + frame[:-10])
        await a.send_eof()
        with pytest.raises(TruncatedStream, match="middle of a frame"):
            await fb.receive()


async def test_peer_that_stops_mid_frame_times_out() -> None:
    a, b = socket_pair()
    async with a, FramedStream(b, frame_timeout=0.2) as fb:
        await a.send_all(STREAM_MAGIC + encode_frame(KIND_RECORD, 0, Bye().pack())[:5])
        with pytest.raises(TransportTimeout, match="middle of a frame"):
            await fb.receive()


async def test_peer_that_never_answers_times_out() -> None:
    a, b = socket_pair()
    async with a, FramedStream(b) as fb:
        with pytest.raises(TransportTimeout, match="nothing for 0.1 s"):
            await fb.receive(timeout=0.1)


@pytest.mark.parametrize("junk,match", [
    (b"GET / HTTP/1.1\r\n\r\n", "bad magic"),
    (STREAM_MAGIC + b"\x00" * 12, "frame magic"),
    (STREAM_MAGIC + HEADER.pack(FRAME_MAGIC, KIND_PAGES, 0, (64 << 20) + 1, 0), "cap"),
    (STREAM_MAGIC + encode_frame(KIND_RECORD, 0, b"\xc1"), "not valid msgpack"),
    (STREAM_MAGIC + encode_frame(KIND_PAGES, 0, b"\x00" * 7), "shorter than its header"),
])
async def test_bad_input_raises_the_transports_own_error(junk: bytes, match: str) -> None:
    a, b = socket_pair()
    async with a, FramedStream(b) as fb:
        await a.send_all(junk)
        with pytest.raises(ProtocolError, match=match):
            await fb.receive(timeout=5)
        with pytest.raises(ProtocolError, match=match):  # and it stays broken
            await fb.receive(timeout=5)


async def test_an_oversized_length_is_refused_before_reading_its_payload() -> None:
    a, b = socket_pair()
    async with a, FramedStream(b, max_payload=1 << 20) as fb:
        await a.send_all(STREAM_MAGIC + HEADER.pack(FRAME_MAGIC, KIND_PAGES, 0, 2 << 20, 0) + os.urandom(4096))
        with pytest.raises(ProtocolError, match="cap of 1048576"):
            await fb.receive(timeout=5)
        assert fb.stats.received.bytes_on_wire < 64 << 10


async def test_bit_flip_is_caught_by_the_frame_checksum() -> None:
    a, b = socket_pair()
    data = bytearray(STREAM_MAGIC + encode_frame(KIND_PAGES, 0, bytes(page_batch(4).data)))
    data[-100] ^= 1
    async with a, FramedStream(b) as fb:
        await a.send_all(bytes(data))
        with pytest.raises(ProtocolError, match="checksum"):
            await fb.receive(timeout=5)


async def test_sending_to_a_peer_that_left_is_peer_gone() -> None:
    a, b = socket_pair()
    await b.aclose()
    async with FramedStream(a) as fa:
        with pytest.raises(PeerGone):
            for _ in range(10):
                await fa.send_record(Bye("x" * 10000))


async def test_sending_after_close_is_channel_closed() -> None:
    a, b = socket_pair()
    async with b:
        fa = FramedStream(a)
        async with fa:
            pass
        with pytest.raises(ChannelClosed):
            await fa.send_record(Bye())


async def test_a_frame_that_fails_with_others_queued_behind_it_wakes_its_sender() -> None:
    """The write of a record breaks while another record waits behind it: the record's
    sender gets PeerGone, never waits forever."""
    a, b = socket_pair()
    outcome: list[str] = []
    async with FramedStream(a) as fa:
        async def first() -> None:
            try:
                await fa.send_record(Bye("x" * (8 << 20)))     # more than the socket buffers hold
            except PeerGone:
                outcome.append("peer gone")

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first)
                await trio.testing.wait_all_tasks_blocked()   # the sender is stuck writing it
                fa.post_record(Bye("behind it"))
                await b.aclose()
    assert outcome == ["peer gone"]
