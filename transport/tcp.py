"""The direct data channel: TCP between agents, every byte encrypted and authenticated.

Memory pages are secrets and a restored process may run as root, so nothing on this channel
is trusted or readable without the per-migration key (32 random bytes that kcr-migrate sends
to both agents over their SSH control channels).

Opening, in the clear: each side sends ``DATA_MAGIC``, 32 random bytes and one byte naming
the AEADs it offers (the client first). AES-256-GCM is used when both offer it (both CPUs
have AES instructions: it is then about three times cheaper per byte), ChaCha20-Poly1305
otherwise. Both derive two keys, one per direction, with HKDF-SHA256 from the migration key,
both random strings and both offers, so every connection has fresh keys, a key used for many
connections never repeats a nonce, and an offer changed on the way makes the keys differ.
Then each direction is a sequence of sealed records::

    length  u32 LE    bytes of ciphertext, tag included (capped before anything is read)
    sealed  bytes     AEAD(plaintext), nonce = 4 zero bytes + u64 LE record counter,
                      associated data = the length field

The first record each way is a fixed confirmation string: the listener drops a client that
does not prove the key before anything else is read, and the client refuses a listener that
does not. Any record that fails authentication closes the connection at once, nothing more is
read, and the reader gets a ``ProtocolError``.

Until the peer has proved the key, it is a stranger: what it may cost is bounded. The opening
and the confirmation are read in small pieces, the confirmation record may be no longer than
the string it must hold (a claimed length beyond that drops the connection before a byte of it
is read), the whole opening must end within ``HANDSHAKE_TIMEOUT``, and a listener opens at most
``MAX_OPENINGS`` connections at once: those beyond are closed at once, unread.
"""
from __future__ import annotations

import collections
import os
import struct
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, NoReturn, Sequence

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from transport.cpu import cpu_has_aes
from transport.errors import MigrationError, PeerGone, ProtocolError, TransportError, TransportTimeout, TruncatedStream
from transport.protocol import ROLE_AGENT, ROLE_DATA
from transport.rpc import Methods, RpcPeer, open_rpc

KEY_SIZE = 32
DATA_MAGIC = b"KCRDATA2"
RANDOM_SIZE = 32
OFFER_CHACHA = 1                     # the opening's last byte: the AEADs a side offers
OFFER_AES_GCM = 2
TAG_SIZE = 16
MAX_PLAIN = (4 << 20) + (64 << 10)   # plaintext bytes per sealed record: a 4 MiB page batch's whole frame
LEN = struct.Struct("<I")
HKDF_INFO = b"kcr-migrate data channel v2"
CLIENT_CONFIRM = b"kcr-migrate data channel: client holds the key"
SERVER_CONFIRM = b"kcr-migrate data channel: server holds the key"
HANDSHAKE_TIMEOUT = 10.0
MAX_OPENINGS = 8                     # connections a listener authenticates at once; more are closed
READ_SIZE = 1 << 20
OPENING_READ_SIZE = 512              # reads before the peer proved the key
DIRECT_READ = 256 << 10              # reads this large go straight from the socket into their buffer


def new_key() -> bytes:
    """A fresh per-migration key."""
    return os.urandom(KEY_SIZE)


def _nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + counter.to_bytes(8, "little")


def our_offer() -> int:
    """The AEADs this side offers: AES-GCM only where the CPU has AES instructions."""
    return OFFER_CHACHA | (OFFER_AES_GCM if cpu_has_aes() else 0)


def derive_keys(key: bytes, client_random: bytes, server_random: bytes, offers: bytes = b""
                ) -> tuple[bytes, bytes]:
    """(client-to-server key, server-to-client key) for one connection; ``offers`` is both
    sides' offer bytes, client's first."""
    if len(key) != KEY_SIZE:
        raise ValueError(f"the data channel key must be {KEY_SIZE} bytes")
    okm = HKDF(algorithm=hashes.SHA256(), length=2 * KEY_SIZE, salt=client_random + server_random,
               info=HKDF_INFO + offers).derive(key)
    return okm[:KEY_SIZE], okm[KEY_SIZE:]


Aead = AESGCM | ChaCha20Poly1305


def _aead(client_offer: int, server_offer: int) -> type[AESGCM] | type[ChaCha20Poly1305]:
    if client_offer & server_offer & OFFER_AES_GCM:
        return AESGCM
    if client_offer & server_offer & OFFER_CHACHA:
        return ChaCha20Poly1305
    raise ProtocolError("the data channel's two ends share no cipher")


class _Reader:
    """Exact-size reads over a trio stream, keeping what was read ahead (no copy when a read
    lies within one received chunk). A large read spanning chunks lands in one buffer: what was
    read ahead is copied in, the rest received straight into it from a socket."""

    def __init__(self, stream: trio.abc.Stream, read_size: int = READ_SIZE) -> None:
        self._stream = stream
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._chunks: collections.deque[memoryview] = collections.deque()
        self.buffered = 0
        self.read_size = read_size     # what one receive may take (and allocate)

    async def read_exact(self, n: int) -> bytes | bytearray | memoryview | None:
        """``n`` bytes, or None at an end of stream before the first of them."""
        if self.buffered < n and n >= DIRECT_READ and self._socket is not None:
            return await self._read_into(n)
        while self.buffered < n:
            chunk = await self._stream.receive_some(max(self.read_size, n - self.buffered))
            if not chunk:
                if self.buffered == 0:
                    return None
                raise TruncatedStream("the data channel ended in the middle of a record: truncated")
            self._chunks.append(memoryview(chunk).cast("B"))
            self.buffered += len(chunk)
        self.buffered -= n
        first = self._chunks[0]
        if len(first) >= n:
            if len(first) == n:
                self._chunks.popleft()
            else:
                self._chunks[0] = first[n:]
            return first[:n]
        parts: list[memoryview] = []
        while n:
            head = self._chunks[0]
            if len(head) <= n:
                parts.append(self._chunks.popleft())
                n -= len(head)
            else:
                parts.append(head[:n])
                self._chunks[0] = head[n:]
                n = 0
        return b"".join(parts)

    async def _read_into(self, n: int) -> bytearray | None:
        assert self._socket is not None
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while self._chunks:
            chunk = self._chunks.popleft()
            view[got: got + len(chunk)] = chunk
            got += len(chunk)
        self.buffered = 0
        while got < n:
            try:
                k = await self._socket.recv_into(view[got:])
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc
            if not k:
                if got == 0:
                    return None
                raise TruncatedStream("the data channel ended in the middle of a record: truncated")
            got += k
        return buf


class SealedStream(trio.abc.Stream):
    """A trio stream whose bytes travel in authenticated, encrypted records."""

    def __init__(self, stream: trio.abc.Stream, reader: _Reader, *, send_key: bytes, receive_key: bytes,
                 peer: str, aead: type[AESGCM] | type[ChaCha20Poly1305] = ChaCha20Poly1305) -> None:
        self._stream = stream
        self._reader = reader
        self.cipher = "AES-256-GCM" if aead is AESGCM else "ChaCha20-Poly1305"
        self._send: Aead = aead(send_key)
        self._receive: Aead = aead(receive_key)
        # AES-GCM seals a frame's parts one after the other into this buffer (no joining,
        # no fresh memory per record); ChaCha20-Poly1305 here has no incremental form.
        self._send_key = send_key if aead is AESGCM else None
        self._out = bytearray(LEN.size + MAX_PLAIN + TAG_SIZE + 16) if aead is AESGCM else bytearray()
        self.max_record = MAX_PLAIN
        self._send_n = 0
        self._receive_n = 0
        self._plain = b""
        self._plain_off = 0
        self._broken: ProtocolError | None = None
        self.peer = peer

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        for off in range(0, len(view), MAX_PLAIN):
            await self.send_record(view[off: off + MAX_PLAIN])

    async def send_parts(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """Send the buffers as one record if they fit (a frame and its header: the peer then
        receives the frame whole), else one after the other."""
        total = sum(len(p) for p in parts)
        if total > MAX_PLAIN or not total:
            for part in parts:
                await self.send_all(part)
        elif self._send_key is None:
            await self.send_record(parts[0] if len(parts) == 1 else b"".join(parts))
        else:
            length = LEN.pack(total + TAG_SIZE)
            sealer = Cipher(algorithms.AES(self._send_key), modes.GCM(_nonce(self._send_n))).encryptor()
            sealer.authenticate_additional_data(length)
            out = memoryview(self._out)
            out[:LEN.size] = length
            end = LEN.size
            for part in parts:
                end += sealer.update_into(part, out[end:])
            sealer.finalize()
            out[end: end + TAG_SIZE] = sealer.tag
            self._send_n += 1
            await self._stream.send_all(out[: end + TAG_SIZE])

    async def send_record(self, plain: bytes | bytearray | memoryview) -> None:
        length = LEN.pack(len(plain) + TAG_SIZE)
        sealed = self._send.encrypt(_nonce(self._send_n), plain, length)   # 4-13 GB/s: inline
        self._send_n += 1
        await self._stream.send_all(length)
        await self._stream.send_all(sealed)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_record(self, max_plain: int = MAX_PLAIN) -> bytes | None:
        """One record's plaintext (at most ``max_plain`` bytes); None at a clean end of stream."""
        if self._broken is not None:
            raise self._broken
        head = await self._reader.read_exact(LEN.size)
        if head is None:
            return None
        (length,) = LEN.unpack(head)
        if not TAG_SIZE <= length <= max_plain + TAG_SIZE:
            await self._drop(f"a record length of {length} bytes")
        sealed = await self._reader.read_exact(length)
        if sealed is None:
            raise TruncatedStream(f"{self.peer} ended the data channel in the middle of a record: truncated")
        try:
            plain = self._receive.decrypt(_nonce(self._receive_n), sealed, head)
        except InvalidTag:
            await self._drop("a record that failed authentication (wrong key, or tampered with)")
        self._receive_n += 1
        return plain

    async def _drop(self, what: str) -> NoReturn:
        self._broken = ProtocolError(f"{self.peer} sent {what}: connection dropped")
        with trio.CancelScope(shield=True):
            await self._stream.aclose()
        raise self._broken

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._plain_off >= len(self._plain):
            plain = await self.receive_record()
            if plain is None:
                return b""
            self._plain, self._plain_off = plain, 0
        off = self._plain_off
        n = len(self._plain) - off if max_bytes is None else min(max_bytes, len(self._plain) - off)
        self._plain_off = off + n
        if off == 0 and n == len(self._plain):
            return self._plain   # the common case: a whole record, no copy
        return self._plain[off: off + n]

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _opening(stream: trio.abc.Stream, reader: _Reader, peer: str) -> tuple[bytes, int]:
    """The peer's random string and offer."""
    got = await reader.read_exact(len(DATA_MAGIC) + RANDOM_SIZE + 1)
    if got is None:
        raise PeerGone(f"{peer} closed the data channel during its opening")
    if bytes(got[: len(DATA_MAGIC)]) != DATA_MAGIC:
        raise ProtocolError(f"{peer} is not a kcr-migrate data channel of this version (bad opening)")
    return bytes(got[len(DATA_MAGIC): -1]), got[-1]


async def _confirm(sealed: SealedStream, expected: bytes) -> None:
    try:
        got = await sealed.receive_record(max_plain=len(expected))
    except ProtocolError:
        raise ProtocolError(f"{sealed.peer} does not hold this migration's key (its first record failed "
                            "authentication): connection dropped") from None
    if got is None:
        raise ProtocolError(f"{sealed.peer} closed the connection instead of confirming this migration's key: "
                            "it holds another key, or is not this migration's agent")
    if got != expected:
        raise ProtocolError(f"{sealed.peer} did not confirm the data channel key; connection dropped")
    sealed._reader.read_size = READ_SIZE      # the peer holds the key: full-size reads from now on


async def _client_handshake(stream: trio.abc.Stream, key: bytes, peer: str, offer: int | None = None
                            ) -> SealedStream:
    reader = _Reader(stream, OPENING_READ_SIZE)
    mine = os.urandom(RANDOM_SIZE)
    offer = our_offer() if offer is None else offer
    await stream.send_all(DATA_MAGIC + mine + bytes([offer]))
    theirs, their_offer = await _opening(stream, reader, peer)
    c2s, s2c = derive_keys(key, mine, theirs, bytes([offer, their_offer]))
    sealed = SealedStream(stream, reader, send_key=c2s, receive_key=s2c, peer=peer,
                          aead=_aead(offer, their_offer))
    await sealed.send_record(CLIENT_CONFIRM)
    await _confirm(sealed, SERVER_CONFIRM)
    return sealed


async def _server_handshake(stream: trio.abc.Stream, key: bytes, peer: str, offer: int | None = None
                            ) -> SealedStream:
    reader = _Reader(stream, OPENING_READ_SIZE)
    theirs, their_offer = await _opening(stream, reader, peer)
    mine = os.urandom(RANDOM_SIZE)
    offer = our_offer() if offer is None else offer
    await stream.send_all(DATA_MAGIC + mine + bytes([offer]))
    c2s, s2c = derive_keys(key, theirs, mine, bytes([their_offer, offer]))
    sealed = SealedStream(stream, reader, send_key=s2c, receive_key=c2s, peer=peer,
                          aead=_aead(their_offer, offer))
    await _confirm(sealed, CLIENT_CONFIRM)
    await sealed.send_record(SERVER_CONFIRM)
    return sealed


def _transport_error(exc: BaseException, peer: str) -> MigrationError:
    if isinstance(exc, MigrationError):
        return exc
    if isinstance(exc, trio.TooSlowError):
        return TransportTimeout(f"{peer} did not complete the data channel opening in time")
    return PeerGone(f"{peer} broke the data channel during its opening ({exc})")


async def connect_data_channel(address: str, port: int, *, key: bytes,
                               timeout: float = HANDSHAKE_TIMEOUT) -> SealedStream:
    """Connect to an agent's data listener and prove the key; the authenticated stream."""
    peer = f"the data channel at {address}:{port}"
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(address, port)
    except (OSError, trio.TooSlowError) as exc:
        raise TransportError(f"cannot connect to {address}:{port} ({exc or 'timed out'}): is the agent "
                             "listening there, and the port open in its firewall?") from None
    try:
        with trio.fail_after(timeout):
            return await _client_handshake(stream, key, peer)
    except (MigrationError, trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise _transport_error(exc, peer) from None


class DataListener:
    """A listening socket that yields authenticated data channels and drops everything else."""

    def __init__(self, listener: trio.SocketListener, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"the data channel key must be {KEY_SIZE} bytes")
        self._listener = listener
        self._key = key
        self.rejected = 0
        self.last_rejection = ""
        self.opening = 0          # connections being authenticated now

    @property
    def port(self) -> int:
        return int(self._listener.socket.getsockname()[1])

    async def _authenticate(self, stream: trio.SocketStream) -> tuple[SealedStream, str] | None:
        try:
            host, port = stream.socket.getpeername()[:2]
        except OSError:          # gone already
            host, port = "?", 0
        address = f"{host}:{port}"
        if self.opening >= MAX_OPENINGS:
            self._reject(f"{address}: {MAX_OPENINGS} connections were opening already; closed unread")
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return None
        self.opening += 1
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                return await _server_handshake(stream, self._key, f"the data channel from {address}"), address
        except (MigrationError, trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
            self._reject(str(_transport_error(exc, address)))
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return None
        finally:
            self.opening -= 1

    def _reject(self, why: str) -> None:
        self.rejected += 1
        self.last_rejection = why

    async def accept(self) -> tuple[SealedStream, str]:
        """The next authenticated connection and its address (one opening at a time)."""
        while True:
            got = await self._authenticate(await self._listener.accept())
            if got is not None:
                return got

    async def serve(self, handler: Callable[[SealedStream, str], Awaitable[None]], *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run ``handler(stream, address)`` for every authenticated connection, openings in
        parallel, until cancelled; then close the listener."""
        async with self, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                raw = await self._listener.accept()
                nursery.start_soon(self._serve_one, raw, handler)

    async def _serve_one(self, raw: trio.SocketStream, handler: Callable[[SealedStream, str], Awaitable[None]]) -> None:
        got = await self._authenticate(raw)
        if got is not None:
            async with got[0]:
                await handler(*got)

    async def aclose(self) -> None:
        await self._listener.aclose()

    async def __aenter__(self) -> DataListener:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def open_data_listener(address: str = "0.0.0.0", port: int = 0, *, key: bytes) -> DataListener:
    try:
        listeners = await trio.open_tcp_listeners(port, host=address)
    except OSError as exc:
        raise TransportError(f"cannot listen for data channels on {address}:{port}: {exc.strerror or exc}") from None
    for extra in listeners[1:]:
        await extra.aclose()
    return DataListener(listeners[0], key)


@asynccontextmanager
async def open_data_channel(address: str, port: int, *, key: bytes, methods: Methods | None = None,
                            connect_timeout: float = HANDSHAKE_TIMEOUT, **rpc_options: Any) -> AsyncIterator[RpcPeer]:
    """Connect to an agent's data listener and speak the RPC protocol over it."""
    stream = await connect_data_channel(address, port, key=key, timeout=connect_timeout)
    async with open_rpc(stream, role=ROLE_DATA, accept_roles=(ROLE_AGENT,), methods=methods,
                        peer=f"the data channel to {address}:{port}", host=address, **rpc_options) as rpc:
        yield rpc
