"""Calls, errors, page streams both ways, cancellation and credit-based flow control."""
from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

from agent import serve
from tests._transport import page_batch, rpc_pair
from transport.errors import (
    ChannelClosed,
    MigrationError,
    NoSuchProcess,
    PeerGone,
    ProtocolError,
    TransportTimeout,
)
from transport.framing import KIND_RECORD, STREAM_MAGIC, encode_frame
from transport.local import socket_pair
from transport.protocol import (
    MIN_WINDOW,
    ROLE_AGENT,
    ROLE_ORCHESTRATOR,
    PagesBegin,
    PagesEnd,
    Request,
    Response,
    local_hello,
)
from transport.rpc import CallContext, Methods, as_called, serve_rpc
from transport.records import Record
from transport.schema import EndOfImage, Mappings, Vma
from transport.stream import FramedStream

methods = Methods()
for _name in ("sink", "source_synthetic", "ping"):
    methods.register(_name, serve.METHODS.lookup(_name))  # type: ignore[arg-type]

state: dict[str, Any] = {}


@methods.method("boom")
async def boom(ctx: CallContext, *, pid: int) -> dict[str, Any]:
    raise NoSuchProcess(f"no process {pid}", pid=pid, errno=3)


@methods.method("bug")
async def bug(ctx: CallContext) -> dict[str, Any]:
    empty: dict[str, dict[str, Any]] = {}
    return empty["missing"]


@methods.method("odd_result")
async def odd_result(ctx: CallContext) -> dict[str, Any]:
    return {"a set": {1, 2}}


@methods.method("slow")
async def slow(ctx: CallContext) -> dict[str, Any]:
    state["slow_started"].set()
    try:
        await trio.sleep_forever()
    finally:
        state["slow_cancelled"] = True
    return {}


@methods.method("progress")
async def progress(ctx: CallContext, *, n: int) -> dict[str, Any]:
    for i in range(n):
        ctx.progress(round=i)
    return {"rounds": n}


@methods.method("stall")
async def stall(ctx: CallContext) -> dict[str, Any]:
    """Take no page until released: the destination that cannot keep up."""
    await state["release"].wait()
    n = 0
    async for batch in ctx.pages:
        n += len(batch.data)
    return {"bytes": n}


@pytest.fixture(autouse=True)
def fresh_state() -> None:
    state.clear()
    state.update(slow_started=trio.Event(), release=trio.Event(), slow_cancelled=False,
                 took_both=trio.Event())


async def test_call_and_result() -> None:
    async with rpc_pair(methods) as (client, server):
        assert await client.call("ping", x=[1, "a", b"b"]) == {"echo": {"x": [1, "a", b"b"]}}
        assert server.remote.role == ROLE_ORCHESTRATOR and client.remote.role == ROLE_AGENT


async def test_remote_errors_come_back_as_their_class() -> None:
    async with rpc_pair(methods) as (client, _):
        with pytest.raises(NoSuchProcess) as info:
            await client.call("boom", pid=42)
        assert info.value.pid == 42 and info.value.errno == 3 and info.value.host == "testhost"
        assert str(info.value) == "testhost: no process 42"


async def test_unknown_method_and_bad_arguments() -> None:
    async with rpc_pair(methods) as (client, _):
        with pytest.raises(ProtocolError, match="unknown method 'nope'.*ping"):
            await client.call("nope")
        with pytest.raises(ProtocolError, match="bad arguments for boom"):
            await client.call("boom", pdi=1)


async def test_a_bug_in_a_handler_is_reported_and_the_connection_lives_on(capsys: pytest.CaptureFixture[str]) -> None:
    async with rpc_pair(methods) as (client, _):
        with pytest.raises(MigrationError, match="internal error in bug: KeyError"):
            await client.call("bug")
        with pytest.raises(MigrationError, match="internal error in odd_result: its result is not plain data"):
            await client.call("odd_result")
        assert await client.call("ping") == {"echo": {}}
    assert "KeyError" in capsys.readouterr().err


async def test_progress_events_reach_the_caller() -> None:
    seen: list[dict[str, Any]] = []
    async with rpc_pair(methods) as (client, _):
        assert await client.call("progress", n=3, on_progress=seen.append) == {"rounds": 3}
    assert seen == [{"round": 0}, {"round": 1}, {"round": 2}]


@pytest.mark.parametrize("level", [None, 1])
async def test_upload_and_download_at_once(level: int | None) -> None:
    batches = [page_batch(256, seed=i) for i in range(12)]
    async with rpc_pair(methods, client_options={"level": level}) as (client, _):
        async def upload() -> dict[str, Any]:
            async with client.open_call("sink", upload=True, expect_batches=12) as call:
                for b in batches:
                    await call.send_batch(b)
                return await call.result()

        async def download() -> int:
            n = 0
            async with client.open_call("source_synthetic", total_bytes=24 << 20, level=level) as call:
                async for b in call.pages:
                    n += len(b.data)
                await call.result()
            return n

        results: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:
            async def run(name: str, fn: Any) -> None:
                results[name] = await fn()
            nursery.start_soon(run, "up", upload)
            nursery.start_soon(run, "down", download)
            for _ in range(5):
                assert await client.call("ping", i=1) == {"echo": {"i": 1}}
    assert results["up"]["batches"] == 12 and results["up"]["bytes_raw"] == sum(len(b.data) for b in batches)
    assert results["down"] == 24 << 20


async def test_both_sides_call_each_other_with_pages() -> None:
    """Each side numbers its own requests from 1: page streams must not mix them up."""
    async with rpc_pair(methods, client_methods=methods) as (client, server):
        got: dict[str, Any] = {}

        async def download() -> None:
            n = 0
            async with client.open_call("source_synthetic", total_bytes=8 << 20, level=1) as call:
                async for batch in call.pages:
                    n += len(batch.data)
                await call.result()
            got["down"] = n

        async def upload() -> None:
            async with server.open_call("sink", upload=True) as call:
                for i in range(6):
                    await call.send_batch(page_batch(128, seed=i))
                got["up"] = await call.result()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(download)
            nursery.start_soon(upload)
    assert got["down"] == 8 << 20 and got["up"]["batches"] == 6


@methods.method("echo_stream")
async def echo_stream(ctx: CallContext) -> dict[str, Any]:
    """Send back every uploaded item (records and batches) in the order it came."""
    kinds = []
    while (item := await ctx.pages.receive_item()) is not None:
        if isinstance(item, Record):
            kinds.append(type(item).__name__)
            await ctx.send_record(item)
        else:
            kinds.append("pages")
            await ctx.send_batch(item)
    return {"kinds": kinds}


async def test_image_records_travel_inside_page_streams_in_order() -> None:
    """A live migration's stream interleaves layouts and pages: order is kept both ways."""
    layout = Mappings((Vma(0x10000, 0x20000, 3, False, "anon"),))
    sent: list[Any] = [layout, page_batch(16, seed=1), page_batch(16, seed=2),
                       EndOfImage(page_batches=2, pages=32, records=2), page_batch(8, seed=3)]
    async with rpc_pair(methods) as (client, _):
        back: list[Any] = []
        async with client.open_call("echo_stream", upload=True) as call:
            async def upload() -> None:
                for item in sent:
                    if isinstance(item, Record):
                        await call.send_record(item)
                    else:
                        await call.send_batch(item)
                call.end_pages()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload)
                while (item := await call.pages.receive_item()) is not None:
                    back.append(item)
            result = await call.result()
    assert result["kinds"] == ["Mappings", "pages", "pages", "EndOfImage", "pages"]
    assert back[0] == layout and back[3] == sent[3]
    assert [bytes(b.data) for b in back if not isinstance(b, Record)] == \
        [bytes(b.data) for b in sent if not isinstance(b, Record)]


async def test_an_image_record_in_a_pages_only_stream_is_refused() -> None:
    async with rpc_pair(methods) as (client, _):
        with pytest.raises(ProtocolError):
            async with client.open_call("sink", upload=True) as call:
                await call.send_record(Mappings(()))
                await call.result()


async def test_an_empty_upload() -> None:
    async with rpc_pair(methods) as (client, _):
        async with client.open_call("sink", upload=True) as call:
            assert (await call.result())["batches"] == 0


async def test_cancelling_a_call_cancels_the_handler() -> None:
    async with rpc_pair(methods) as (client, _):
        with trio.move_on_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.call, "slow")
                await state["slow_started"].wait()
                nursery.cancel_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert state["slow_cancelled"]
        assert await client.call("ping") == {"echo": {}}


async def test_a_call_that_is_not_answered_in_time() -> None:
    async with rpc_pair(methods) as (client, _):
        with pytest.raises(TransportTimeout, match="did not answer slow within 0.1 s"):
            await client.call("slow", timeout=0.1)
        await trio.testing.wait_all_tasks_blocked()
        assert state["slow_cancelled"]


async def test_a_peer_that_dies_mid_call() -> None:
    async with rpc_pair(methods) as (client, server):
        async with trio.open_nursery() as nursery:
            async def kill() -> None:
                await state["slow_started"].wait()
                await server.fs.aclose_transport()
            nursery.start_soon(kill)
            with pytest.raises(PeerGone, match="while slow was running"):
                await client.call("slow")
        with pytest.raises((PeerGone, ChannelClosed)):
            await client.call("ping")


# --- flow control -------------------------------------------------------------------------

async def _quiet(*streams: FramedStream) -> None:
    while True:
        await trio.testing.wait_all_tasks_blocked(cushion=0.01)
        if all(fs._limiter.borrowed_tokens == 0 for fs in streams):
            return
        await trio.sleep(0.01)


async def test_a_stalled_destination_bounds_what_both_sides_hold() -> None:
    window, held_cap, total = 4 << 20, 8 << 20, 64
    produced = 0
    async with rpc_pair(methods, client_options={"max_bytes_held": held_cap},
                        server_options={"window": window}) as (client, server):
        async with client.open_call("stall", upload=True) as call:
            async def produce() -> None:
                nonlocal produced
                for i in range(total):
                    await call.send_batch(page_batch(512, seed=i, fill="random"))
                    produced += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                await _quiet(client.fs, server.fs)
                # Stuck: the source holds at most its cap, the destination at most its window.
                assert produced < total
                assert client.fs.stats.peak_bytes_held <= held_cap
                assert server.flow.peak_uncredited <= window
                assert client.flow.outstanding <= window
                state["release"].set()
            assert (await call.result())["bytes"] == total * 512 * 4096
        assert server.flow.peak_uncredited <= window


@methods.method("take_after_record")
async def take_after_record(ctx: CallContext) -> dict[str, Any]:
    """Wait until a batch and a record behind it have both arrived, take them, then wait for
    more, as the destination of a live migration does between two rounds."""
    while ctx.pages.records < 1:      # (the batch came before it)
        await trio.testing.wait_all_tasks_blocked(cushion=0.01)
    kinds = []
    while (item := await ctx.pages.receive_item()) is not None:
        kinds.append(type(item).__name__)
        if len(kinds) == 2:
            state["took_both"].set()
    return {"kinds": kinds}


async def test_credit_comes_back_when_the_consumer_waits_after_records() -> None:
    """A batch taken while a record waited behind it, then that record: the consumer has caught
    up and waits, so every page byte is credited back. (A sender waiting for all its credit
    before the next round, as a live migration's source does, hung here: 3 moves in 170.)"""
    async with rpc_pair(methods, server_options={"window": 64 << 20}) as (client, server):
        async with client.open_call("take_after_record", upload=True) as call:
            await call.send_batch(page_batch(16, seed=1))
            await call.send_record(Mappings((Vma(0x10000, 0x20000, 3, False, "anon"),)))
            await state["took_both"].wait()
            with trio.fail_after(20):       # (a bound for the failure, not a speed)
                await client.flow.wait_drained()
            call.end_pages()
            assert (await call.result())["kinds"] == ["PageBatch", "Mappings"]


async def _rogue_client(frames: list[bytes], window: int = MIN_WINDOW) -> Any:
    """A client that sends ``frames`` (after the handshake) whatever the protocol says."""
    a, b = socket_pair()
    async with trio.open_nursery() as nursery:
        result: list[Any] = []

        async def serve_it() -> None:
            result.append(await serve_rpc(b, methods, role=ROLE_AGENT, accept_roles=(ROLE_ORCHESTRATOR,),
                                          window=window))
        nursery.start_soon(serve_it)
        async with a:
            try:
                await a.send_all(STREAM_MAGIC + encode_frame(KIND_RECORD, 0, local_hello(ROLE_ORCHESTRATOR).pack()))
                for frame in frames:
                    await a.send_all(frame)
                with trio.move_on_after(5):
                    while await a.receive_some():
                        pass
            except trio.BrokenResourceError:
                pass  # the server hung up on us: expected
    return result[0]


def _rec(rec: Any) -> bytes:
    return encode_frame(KIND_RECORD, 0, rec.pack())


def _pages(npages: int) -> bytes:
    from transport.framing import KIND_PAGES
    from transport.pages import encode_batch
    enc = encode_batch(page_batch(npages, fill="random"), None)
    return encode_frame(KIND_PAGES, enc.flags, b"".join(bytes(p) for p in enc.parts))


async def test_a_sender_that_ignores_credit_is_cut_off() -> None:
    frames = [_rec(Request(1, "stall", {}, upload=True)), _rec(PagesBegin(1))] + [_pages(256)] * 3
    server = await _rogue_client(frames)
    assert isinstance(server.error, ProtocolError) and "flow-control window" in str(server.error)


async def test_pages_outside_a_stream_are_refused() -> None:
    server = await _rogue_client([_pages(4)])
    assert isinstance(server.error, ProtocolError) and "outside a page stream" in str(server.error)


async def test_page_counts_that_do_not_add_up_fail_the_call() -> None:
    frames = [_rec(Request(1, "sink", {}, upload=True)), _rec(PagesBegin(1)), _pages(4),
              _rec(PagesEnd(1, 2, 8, 8 * 4096))]
    a, b = socket_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(serve_rpc, b, methods, role=ROLE_AGENT, accept_roles=(ROLE_ORCHESTRATOR,)))
        async with a, FramedStream(a) as fa:
            await fa.send_record(local_hello(ROLE_ORCHESTRATOR))
            for frame in frames:
                await a.send_all(frame)
            while not isinstance(item := await fa.receive(timeout=5), Response):
                pass
    assert item.error is not None and "data was lost" in item.error.message


@pytest.mark.parametrize("message, expected", [
    ("pid 5 taken on vm (sleep): end it", "pid 5 taken on localhost (sleep): end it"),
    ("vm has 5 MiB available", "localhost has 5 MiB available"),
    ("/srv/vm/data is missing on vm: copy it", "/srv/vm/data is missing on localhost: copy it"),
    ("a lock, and vm sees that same file", "a lock, and localhost sees that same file"),
    ("the vm image at vm.example names vm", "the vm image at vm.example names vm"),
])
def test_an_agents_error_names_its_host_as_the_caller_does(message: str, expected: str) -> None:
    """An agent names itself by its hostname; the caller, who reached it as "localhost" (or
    an ssh alias), sees that name where the agent put its own."""
    exc = as_called(MigrationError(message, host="vm"), "localhost")
    assert (exc.host, exc.message, str(exc)) == ("localhost", expected, f"localhost: {expected}")
    assert as_called(MigrationError(message), "hostB").host == "hostB"
