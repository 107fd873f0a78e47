"""The one schema, file and live: every record type round-trips; the handshake refuses mismatches."""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import msgpack
import pytest
import trio

from tests._transport import example_records, hello_with, image_frames, image_of, page_batch
from transport.errors import (
    IncompatibleImage,
    NoSuchProcess,
    PeerGone,
    ProtocolError,
    RemoteError,
    TransportTimeout,
    UntrustedImage,
    error_from_wire,
)
from transport.framing import KIND_PAGES, KIND_RECORD, STREAM_MAGIC, encode_frame
from transport.image import ImageReader, ImageWriter
from transport.pages import PageBatch
from transport.local import socket_pair
from transport.protocol import (
    PROTOCOL_VERSION,
    ROLE_AGENT,
    ROLE_DATA,
    ROLE_ORCHESTRATOR,
    ErrorInfo,
    Hello,
    Request,
    Response,
    handshake,
    local_hello,
)
from transport.records import Record
from transport.schema import (
    FORMAT_VERSION,
    RECORD_TYPES,
    EndOfImage,
    FileDesc,
    Files,
    ImageHeader,
    PipeBuffer,
    Pipes,
    ProcessBegin,
    ProcessTree,
    TreeMember,
    UnixSockets,
    check_objects_referenced,
    decode_record,
)
from transport.signing import NONCE_LEN, ImageKey, ImageVerifier
from transport.stream import FramedStream


def test_every_record_type_has_an_example() -> None:
    missing = set(RECORD_TYPES.values()) - set(example_records())
    assert not missing, f"add an example of {sorted(c.__name__ for c in missing)} to tests/_transport.py"


def test_live_records_take_ids_from_32_up_and_never_collide() -> None:
    ids = [cls.TYPE for cls in RECORD_TYPES.values()]
    assert len(ids) == len(set(ids))
    live = {cls for cls in example_records() if cls.__module__ == "transport.protocol"}
    assert live and all(cls.TYPE >= 32 for cls in live)


@pytest.mark.parametrize("rec", list(example_records().values()), ids=lambda r: type(r).__name__)
def test_record_round_trip_bytes(rec: Record) -> None:
    assert decode_record(rec.pack()) == rec


def test_every_record_round_trips_through_a_file() -> None:
    recs = example_records()
    header = recs.pop(ImageHeader)
    assert isinstance(header, ImageHeader)
    recs.pop(EndOfImage)
    buf = io.BytesIO()
    key = ImageKey("test key", bytes(range(32)))
    writer = ImageWriter(buf, level=1, key=key)
    writer.record(header)
    for rec in recs.values():
        writer.record(rec)
    writer.pages(page_batch(8))
    writer.finish()
    reader = ImageReader(io.BytesIO(buf.getvalue()), verifier=ImageVerifier(key))
    got = [item for item in reader if isinstance(item, Record)]
    # the header names the key, and holds the image's own nonce for its frames' keys (format 6)
    assert got[0] == dataclasses.replace(header, key_id=key.key_id, sign_nonce=got[0].sign_nonce)
    assert isinstance(got[0], ImageHeader) and len(got[0].sign_nonce) == NONCE_LEN
    assert got[1:-1] == list(recs.values()) and isinstance(got[-1], EndOfImage)
    assert reader.verifier.verified


async def test_every_record_round_trips_over_a_live_stream() -> None:
    a, b = socket_pair()
    recs = list(example_records().values())
    async with FramedStream(a) as fa, FramedStream(b) as fb:
        for rec in recs:
            await fa.send_record(rec)
        got = [await fb.receive() for _ in recs]
    assert got == recs


def test_a_newer_record_version_is_refused_with_advice() -> None:
    body = Request(1, "ping").to_wire() | {"v": 9}
    with pytest.raises(ProtocolError, match="upgrade kcr-migrate"):
        decode_record(msgpack.packb(body))


def test_unknown_fields_are_ignored_and_optional_ones_may_be_missing() -> None:
    body = Request(1, "ping").to_wire() | {"added_later": [1, 2]}
    del body["args"]
    assert decode_record(msgpack.packb(body)) == Request(1, "ping")


def _nested(depth: int) -> list[Any]:
    value: list[Any] = [1]
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("args,match", [
    ({1: "x"}, "key"),
    ({"x": {"y": {"z": _nested(20)}}}, "nested"),
    ({"x": "s" * 70000}, "too long"),
    ({"x": b"b" * ((1 << 20) + 1)}, "too long"),
])
def test_request_args_must_be_plain_and_bounded(args: dict[Any, Any], match: str) -> None:
    body = {"t": Request.TYPE, "v": 1, "id": 1, "method": "m", "args": args}
    with pytest.raises(ProtocolError, match=match):
        decode_record(msgpack.packb(body, strict_types=False))


def test_a_response_is_either_ok_or_an_error() -> None:
    body = Response(1, True).to_wire() | {"error": ErrorInfo("x", 0, "m").as_dict()}
    with pytest.raises(ProtocolError, match="either ok"):
        decode_record(msgpack.packb(body))


def test_errors_cross_the_wire_as_their_class() -> None:
    info = ErrorInfo.of(NoSuchProcess("no process 42", pid=42, errno=3, phase="preflight"))
    exc = error_from_wire(info.as_dict())
    assert type(exc) is NoSuchProcess and exc.pid == 42 and exc.errno == 3 and exc.phase == "preflight"
    assert type(error_from_wire({"code": "from-the-future", "message": "?"})) is RemoteError


# --- the handshake ------------------------------------------------------------------------

async def _handshake_against(theirs: bytes | None, *, accept: tuple[str, ...] = (ROLE_AGENT,),
                             timeout: float = 5.0) -> Hello:
    """Our side of a handshake against a peer that sends ``theirs`` raw (None: nothing, then EOF)."""
    a, b = socket_pair()
    async with b, FramedStream(a, peer="the fake agent") as fa:
        if theirs is not None:
            await b.send_all(theirs)
        else:
            await b.aclose()
        return await handshake(fa, local_hello(ROLE_ORCHESTRATOR), accept_roles=accept, timeout=timeout)


def _hello_bytes(hello: Record) -> bytes:
    return STREAM_MAGIC + encode_frame(KIND_RECORD, 0, hello.pack())


async def test_handshake_accepts_a_matching_peer() -> None:
    theirs = await _handshake_against(_hello_bytes(local_hello(ROLE_AGENT)))
    assert theirs.protocol_version == PROTOCOL_VERSION and theirs.role == ROLE_AGENT


async def test_handshake_refuses_another_protocol_version_naming_both() -> None:
    with pytest.raises(IncompatibleImage) as info:
        await _handshake_against(_hello_bytes(hello_with(protocol_version=PROTOCOL_VERSION + 1,
                                                         tool_version="9.9.9")))
    msg = str(info.value)
    assert f"version {PROTOCOL_VERSION + 1}" in msg and f"version {PROTOCOL_VERSION}" in msg
    assert "9.9.9" in msg and "pip install kcr-migrate" in msg


async def test_handshake_refuses_another_image_format() -> None:
    with pytest.raises(IncompatibleImage, match=f"image format version {FORMAT_VERSION + 1}"):
        await _handshake_against(_hello_bytes(hello_with(format_version=FORMAT_VERSION + 1)))


async def test_handshake_refuses_the_wrong_role() -> None:
    with pytest.raises(ProtocolError, match="'data'"):
        await _handshake_against(_hello_bytes(hello_with(role=ROLE_DATA)))


async def test_handshake_refuses_another_record_first() -> None:
    with pytest.raises(ProtocolError, match="sent Request before its Hello"):
        await _handshake_against(_hello_bytes(Request(1, "ping")))


async def test_handshake_with_a_peer_that_leaves() -> None:
    with pytest.raises(PeerGone, match="before the handshake"):
        await _handshake_against(None)


async def test_handshake_with_a_peer_that_never_answers() -> None:
    with pytest.raises(TransportTimeout, match="did not answer the handshake"):
        await _handshake_against(b"", timeout=0.2)


async def test_handshake_with_something_else_at_the_other_end() -> None:
    with pytest.raises(ProtocolError, match="bad magic"):
        await _handshake_against(b"SSH-2.0-OpenSSH_9.2\r\n")


def test_local_hello_describes_this_machine() -> None:
    hello = local_hello(ROLE_AGENT, xsave_mask=0x7)
    assert hello.arch and hello.kernel_release and hello.netns_inode > 0 and hello.xsave_mask == 7
    with pytest.raises(ValueError):
        local_hello("spy")


async def test_handshake_is_symmetric_over_one_connection() -> None:
    a, b = socket_pair()
    async with FramedStream(a) as fa, FramedStream(b) as fb:
        got: dict[str, Hello] = {}

        async def side(fs: FramedStream, role: str, accept: str) -> None:
            got[role] = await handshake(fs, local_hello(role), accept_roles=(accept,), timeout=5)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(side, fa, ROLE_ORCHESTRATOR, ROLE_AGENT)
            nursery.start_soon(side, fb, ROLE_AGENT, ROLE_ORCHESTRATOR)
    assert got[ROLE_ORCHESTRATOR].role == ROLE_AGENT and got[ROLE_AGENT].role == ROLE_ORCHESTRATOR


def _objects_example() -> tuple[Files, Pipes, UnixSockets]:
    records = example_records()
    return records[Files], records[Pipes], records[UnixSockets]  # type: ignore[return-value]


@pytest.mark.parametrize("change, match", [
    (lambda f, p, s: (dataclasses.replace(f, fds=f.fds + (FileDesc(9, "pipe", "", 0, 0),)), p, s), "object id"),
    (lambda f, p, s: (dataclasses.replace(f, fds=(dataclasses.replace(f.fds[1], pos=1), f.fds[2])), p, s),
     "shares a description"),
    (lambda f, p, s: (f, Pipes((PipeBuffer(1, 4096, bytes(4097)),)), s), "more bytes than it holds"),
    (lambda f, p, s: (f, p, UnixSockets((dataclasses.replace(s.sockets[0], peer=77), s.sockets[1]))),
     "names it back"),
    (lambda f, p, s: (f, p, UnixSockets((dataclasses.replace(s.sockets[0], queue=(b"a", b"b")), s.sockets[1]))),
     "one run of bytes"),
    (lambda f, p, s: (dataclasses.replace(f, fds=f.fds + (FileDesc(9, "unix", "", 0, 0, obj=12345),)), p, s),
     "lacks"),
])
def test_fd_objects_are_checked_before_use(change: Any, match: str) -> None:
    """A forged fd table, pipe or socket record is refused, naming what is wrong."""
    files, pipes, sockets = change(*_objects_example())
    with pytest.raises(ProtocolError, match=match):
        for rec in (files, pipes, sockets):
            decode_record(rec.pack())
        check_objects_referenced(files, pipes, sockets)


@pytest.mark.parametrize("members, match", [
    ((TreeMember(10, 1, 10, 10, "a"), TreeMember(12, 11, 10, 10, "b"), TreeMember(11, 10, 10, 10, "c")),
     "before its parent"),
    ((TreeMember(10, 1, 10, 10, "a"), TreeMember(10, 10, 10, 10, "b")), "process id 10"),
    ((TreeMember(0, 1, 10, 10, "a"),), r"members\[0\].pid: 0 is out of range for a pid"),
])
def test_a_forged_process_tree_is_refused(members: tuple[TreeMember, ...], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_record(ProcessTree(members).pack())


def _interleaved_image(key: ImageKey) -> tuple[bytes, list[Record | PageBatch]]:
    """An image whose records and page batches alternate in runs (as a tree's image has them:
    ProcessBegin, layout, pages, the next ProcessBegin...), and what it holds in order."""
    header = example_records()[ImageHeader]
    assert isinstance(header, ImageHeader)
    buf = io.BytesIO()
    writer = ImageWriter(buf, level=1, key=key)
    writer.record(header)
    items: list[Record | PageBatch] = []
    for i in range(4):
        rec = ProcessBegin(pid=100 + i)
        writer.record(rec)
        items.append(rec)
        for j in range(5):
            batch = page_batch(3, seed=10 * i + j, addr=0x7F00_0000_0000 + (10 * i + j) * 0x10000)
            writer.pages(batch)
            items.append(batch)
    writer.finish()
    return buf.getvalue(), items


def test_a_sink_gets_each_batch_between_the_records_around_it() -> None:
    """With a sink (as a restore writes pages), batches go to it from the workers, several at
    once, but never before a record that comes before them was taken, and every one of them
    before a record after them is handed on: the stream's order, as a restore needs it."""
    key = ImageKey("test key", bytes(range(32)))
    image, items = _interleaved_image(key)
    log: list[Record | PageBatch] = []
    taken = 0              # records the consumer took so far
    seen_at: list[tuple[int, PageBatch]] = []

    def sink(batch: PageBatch) -> None:
        seen_at.append((taken, batch))

    reader = ImageReader(io.BytesIO(image), verifier=ImageVerifier(key), sink=sink, workers=3)
    for item in reader:
        assert not isinstance(item, PageBatch)          # batches went to the sink
        if isinstance(item, ProcessBegin):
            log.append(item)
        taken += 1
    assert reader.verifier.verified
    assert reader.stats.page_batches == 20 and reader.stats.pages == 60
    # Each batch reached the sink after the records before it were taken (the header, then
    # its ProcessBegin), and its contents are as written.
    expect_taken = {}
    records_before = 1                                  # the header
    for item in items:
        if isinstance(item, PageBatch):
            expect_taken[item.runs] = records_before
        else:
            records_before += 1
    assert sorted(b.runs for _, b in seen_at) == sorted(expect_taken)
    for when, batch in seen_at:
        assert when == expect_taken[batch.runs], "a batch reached the sink before or after its turn"
        original = next(i for i in items if isinstance(i, PageBatch) and i.runs == batch.runs)
        assert bytes(batch.data) == bytes(original.data)
    assert log == [i for i in items if isinstance(i, ProcessBegin)]


def test_a_sink_failure_or_an_edited_batch_stops_the_stream_at_that_batch() -> None:
    """A batch whose signature fails is refused as that frame, and no record after it is
    handed on; a sink that raises stops the stream the same way."""
    key = ImageKey("test key", bytes(range(32)))
    image, items = _interleaved_image(key)
    second = items[8]           # a batch of the second process
    assert isinstance(second, PageBatch)
    frames = image_frames(image)
    pages = [f for f in frames if f.kind == KIND_PAGES]
    edited = pages[6]           # the same batch (frame 9: header, ProcessBegin, 5 batches, ProcessBegin, 2)
    data = bytearray(edited.payload)
    data[len(data) // 2] ^= 0x01
    edited.payload = bytes(data)        # a valid crc32 (image_of), a signature that no longer matches
    taken: list[object] = []
    with pytest.raises(UntrustedImage, match="frame 9 does not match"):
        for item in ImageReader(io.BytesIO(image_of(frames)), verifier=ImageVerifier(key), sink=lambda b: None):
            taken.append(item)
    assert [t.pid for t in taken if isinstance(t, ProcessBegin)] == [100, 101]

    def refuse(batch: PageBatch) -> None:
        if batch.runs == second.runs:
            raise OSError(5, "cannot write")
    taken.clear()
    with pytest.raises(OSError, match="cannot write"):
        for item in ImageReader(io.BytesIO(image), verifier=ImageVerifier(key), sink=refuse):
            taken.append(item)
    assert [t.pid for t in taken if isinstance(t, ProcessBegin)] == [100, 101]


@pytest.mark.parametrize("level", [1, None])
def test_batches_read_into_pooled_buffers_are_written_before_their_buffer_serves_again(level: int | None) -> None:
    """A checkpoint reads pages into buffers the image writer gives back once each batch is
    written (``precopy.reader.BufferPool``): with eight batches in flight in two workers, and
    four buffers to go round, every batch must still read back as it was read, and buffers
    must serve again (none is given out twice at once)."""
    from precopy.reader import BufferPool
    pool = BufferPool(size=64 * 4096, keep=4)
    buf = io.BytesIO()
    writer = ImageWriter(buf, level=level, key=ImageKey("test key", bytes(range(32))), recycle=pool.give_back)
    sent: list[bytes] = []
    in_use: set[int] = set()
    given_back = pool.give_back

    def give_back(data: bytes | bytearray | memoryview) -> None:
        in_use.discard(id(data.obj if isinstance(data, memoryview) else data))
        given_back(data)
    writer._recycle = give_back
    writer.record(example_records()[ImageHeader])
    for i in range(40):
        data = pool.take(64 * 4096) if i % 5 else pool.take(3 * 4096)     # whole, and a short batch
        if data is None:
            data = memoryview(bytearray(64 * 4096))
        assert id(data.obj) not in in_use, "a buffer still being written was handed out again"
        in_use.add(id(data.obj))
        pages = len(data) // 4096
        data[:] = bytes([i]) * len(data) if i % 2 else os.urandom(len(data))
        sent.append(bytes(data))
        writer.pages(PageBatch(((0x10000 + i * (1 << 20), pages),), data))
    writer.finish()
    got = [bytes(item.data) for item in ImageReader(io.BytesIO(buf.getvalue()),
                                                   verifier=ImageVerifier(trust_image=True))
           if isinstance(item, PageBatch)]
    assert got == sent
    assert len(pool._ours) == 4 and len(pool._free) == 4       # every pooled buffer came back, and served again
