"""The direct data channel: the right key works; a wrong key, tampering and garbage are dropped."""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest
import trio

from agent import serve
from tests._transport import page_batch
from transport.errors import MigrationError, PeerGone, ProtocolError, TransportError, TruncatedStream
from transport.cpu import cpu_has_aes
from transport.protocol import ROLE_AGENT, ROLE_DATA
from transport.rpc import open_rpc, serve_rpc
from transport.tcp import (
    DATA_MAGIC,
    LEN,
    MAX_OPENINGS,
    MAX_PLAIN,
    OFFER_AES_GCM,
    OFFER_CHACHA,
    RANDOM_SIZE,
    TAG_SIZE,
    DataListener,
    our_offer,
    SealedStream,
    _client_handshake,
    connect_data_channel,
    derive_keys,
    new_key,
    open_data_channel,
    open_data_listener,
)


class Server:
    """A data listener on loopback serving the agent's methods, recording how each connection ended."""

    def __init__(self, listener: DataListener) -> None:
        self.listener = listener
        self.port = listener.port
        self.served: list[Any] = []

    async def handle(self, stream: SealedStream, address: str) -> None:
        try:
            rpc = await serve_rpc(stream, serve.DATA_METHODS, role=ROLE_AGENT, accept_roles=(ROLE_DATA,))
            self.served.append(rpc.error)
        except MigrationError as exc:
            self.served.append(exc)


@asynccontextmanager
async def data_server(key: bytes) -> AsyncIterator[Server]:
    server = Server(await open_data_listener("127.0.0.1", key=key))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.listener.serve, server.handle)
        yield server
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("level", [None, 1])
async def test_the_right_key_carries_pages(level: int | None) -> None:
    key = new_key()
    batches = [page_batch(512, seed=i) for i in range(10)]
    async with data_server(key) as server:
        async with open_data_channel("127.0.0.1", server.port, key=key, level=level) as rpc:
            async with rpc.open_call("sink", upload=True, expect_batches=10) as call:
                for b in batches:
                    await call.send_batch(b)
                result = await call.result()
            assert rpc.remote.role == ROLE_AGENT
        await trio.testing.wait_all_tasks_blocked()
    assert result["bytes_raw"] == sum(len(b.data) for b in batches)
    assert server.served == [None] and server.listener.rejected == 0


@pytest.mark.parametrize("offer", [OFFER_CHACHA, OFFER_CHACHA | OFFER_AES_GCM], ids=["chacha-only", "both"])
async def test_pages_go_under_the_cipher_both_ends_offer(offer: int) -> None:
    key = new_key()
    batches = [page_batch(256, seed=i, fill="random") for i in range(4)]
    expected = "AES-256-GCM" if offer & OFFER_AES_GCM and cpu_has_aes() else "ChaCha20-Poly1305"
    async with data_server(key) as server:
        raw = await trio.open_tcp_stream("127.0.0.1", server.port)
        sealed = await _client_handshake(raw, key, "test", offer=offer)
        assert sealed.cipher == expected
        async with open_rpc(sealed, role=ROLE_DATA, accept_roles=(ROLE_AGENT,), level=None) as rpc:
            async with rpc.open_call("sink", upload=True, expect_batches=len(batches)) as call:
                for b in batches:
                    await call.send_batch(b)
                result = await call.result()
        await trio.testing.wait_all_tasks_blocked()
    assert result["bytes_raw"] == sum(len(b.data) for b in batches)
    assert server.served == [None]


async def test_a_data_channel_serves_page_sinks_only() -> None:
    key = new_key()
    async with data_server(key) as server:
        async with open_data_channel("127.0.0.1", server.port, key=key) as rpc:
            with pytest.raises(ProtocolError, match="unknown method 'data_listen'"):
                await rpc.call("data_listen", key=new_key())


async def test_a_wrong_key_is_refused_and_never_served() -> None:
    async with data_server(new_key()) as server:
        with pytest.raises(ProtocolError, match="instead of confirming this migration's key"):
            await connect_data_channel("127.0.0.1", server.port, key=new_key())
        await trio.testing.wait_all_tasks_blocked()
        assert server.served == []
        assert server.listener.rejected == 1
        assert "does not hold this migration's key" in server.listener.last_rejection


async def test_something_that_is_not_a_data_channel_is_dropped() -> None:
    async with data_server(new_key()) as server:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(40))
            with trio.fail_after(5):
                while await stream.receive_some():
                    pass
        assert server.listener.rejected == 1 and "bad opening" in server.listener.last_rejection


class TamperingProxy:
    """Forwards a TCP connection, flipping one bit of the client's bytes at ``offset``."""

    def __init__(self, target_port: int, offset: int) -> None:
        self.target_port = target_port
        self.offset = offset
        self.server_hung_up = trio.Event()
        self.port = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with listeners[0] as listener:
            self.port = listener.socket.getsockname()[1]
            task_status.started()
            client = await listener.accept()
        server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, server, True)
            await self._pump(server, client, False)
            self.server_hung_up.set()
            nursery.cancel_scope.cancel()

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, tamper: bool) -> None:
        seen = 0
        try:
            while data := await src.receive_some(65536):
                if tamper and seen <= self.offset < seen + len(data):
                    flipped = bytearray(data)
                    flipped[self.offset - seen] ^= 0x20
                    data = bytes(flipped)
                seen += len(data)
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def test_a_tampered_frame_drops_the_connection() -> None:
    key = new_key()
    async with data_server(key) as server, trio.open_nursery() as nursery:
        proxy = TamperingProxy(server.port, offset=200_000)
        await nursery.start(proxy.run)
        with pytest.raises((PeerGone, ProtocolError, TransportError)):
            async with open_data_channel("127.0.0.1", proxy.port, key=key, level=None) as rpc:
                async with rpc.open_call("sink", upload=True) as call:
                    for i in range(100):
                        await call.send_batch(page_batch(256, seed=i, fill="random"))
                    await call.result()
        with trio.fail_after(5):
            await proxy.server_hung_up.wait()
        await trio.testing.wait_all_tasks_blocked()
    assert len(server.served) == 1 and isinstance(server.served[0], ProtocolError)
    assert "failed authentication" in str(server.served[0])


async def test_a_tampered_opening_is_refused() -> None:
    key = new_key()
    async with data_server(key) as server, trio.open_nursery() as nursery:
        proxy = TamperingProxy(server.port, offset=len(DATA_MAGIC) + 5)  # the client's random
        await nursery.start(proxy.run)
        with pytest.raises(ProtocolError):
            await connect_data_channel("127.0.0.1", proxy.port, key=key)
        await trio.testing.wait_all_tasks_blocked()
    assert server.listener.rejected == 1


async def test_a_tampered_cipher_offer_is_refused() -> None:
    key = new_key()
    async with data_server(key) as server, trio.open_nursery() as nursery:
        proxy = TamperingProxy(server.port, offset=len(DATA_MAGIC) + RANDOM_SIZE)  # the client's offer
        await nursery.start(proxy.run)
        with pytest.raises(ProtocolError):
            await connect_data_channel("127.0.0.1", proxy.port, key=key)
        await trio.testing.wait_all_tasks_blocked()
    assert server.listener.rejected == 1


async def test_an_oversized_record_length_is_dropped_unread() -> None:
    key = new_key()
    async with data_server(key) as server:
        raw = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with raw:
            await _client_handshake(raw, key, "test")
            await raw.send_all(LEN.pack(MAX_PLAIN + TAG_SIZE + 1))
            with trio.fail_after(5):
                while await raw.receive_some():
                    pass
            await trio.testing.wait_all_tasks_blocked()
    assert len(server.served) == 1 and "record length" in str(server.served[0])


async def _closed_by_peer(stream: trio.SocketStream, within: float = 5) -> None:
    with trio.fail_after(within):
        try:
            while await stream.receive_some():
                pass
        except trio.BrokenResourceError:
            pass


async def test_before_the_key_is_proved_a_long_record_is_dropped_unread() -> None:
    """A stranger's first record may be no longer than the confirmation it must hold: a claim of
    a megabyte closes the connection at once, before the listener reads (or allocates) it."""
    async with data_server(new_key()) as server:
        raw = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with raw:
            await raw.send_all(DATA_MAGIC + bytes(RANDOM_SIZE) + bytes([our_offer()]))
            await raw.send_all(LEN.pack(1 << 20) + bytes(100))
            await _closed_by_peer(raw)
        await trio.testing.wait_all_tasks_blocked()
    assert server.served == [] and server.listener.rejected == 1
    assert "does not hold this migration's key" in server.listener.last_rejection


async def test_openings_beyond_the_limit_are_closed_and_the_rest_still_served() -> None:
    key = new_key()
    async with data_server(key) as server:
        stalled = [await trio.open_tcp_stream("127.0.0.1", server.port) for _ in range(MAX_OPENINGS)]
        try:
            with trio.fail_after(5):
                while server.listener.opening < MAX_OPENINGS:
                    await trio.sleep(0.01)
            extra = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with extra:
                await _closed_by_peer(extra, within=2)      # well before HANDSHAKE_TIMEOUT
            assert "opening already" in server.listener.last_rejection
        finally:
            for stream in stalled:
                await stream.aclose()
        with trio.fail_after(5):
            while server.listener.opening:
                await trio.sleep(0.01)
        async with open_data_channel("127.0.0.1", server.port, key=key) as rpc:
            assert await rpc.call("ping") is not None
    assert server.listener.rejected == MAX_OPENINGS + 1


async def test_a_record_cut_short_is_truncation() -> None:
    key = new_key()
    listener = await open_data_listener("127.0.0.1", key=key)
    async with listener, trio.open_nursery() as nursery:
        got: list[BaseException] = []

        async def accept_and_read() -> None:
            stream, _ = await listener.accept()
            try:
                await stream.receive_some()
            except TruncatedStream as exc:
                got.append(exc)
            await stream.aclose()
        nursery.start_soon(accept_and_read)
        raw = await trio.open_tcp_stream("127.0.0.1", listener.port)
        async with raw:
            await _client_handshake(raw, key, "test")
            await raw.send_all(LEN.pack(1000) + bytes(10))
            await raw.send_eof()
    assert len(got) == 1


def test_every_connection_gets_its_own_keys() -> None:
    key = new_key()
    a = derive_keys(key, b"c" * 32, b"s" * 32)
    b = derive_keys(key, b"c" * 32, b"t" * 32)
    assert a[0] != a[1] and a[0] != b[0] and a[1] != b[1]
    offered = derive_keys(key, b"c" * 32, b"s" * 32, bytes([3, 3]))
    downgraded = derive_keys(key, b"c" * 32, b"s" * 32, bytes([1, 3]))
    assert offered[0] != downgraded[0] and offered[1] != downgraded[1]
    with pytest.raises(ValueError):
        derive_keys(b"short", b"c" * 32, b"s" * 32)
