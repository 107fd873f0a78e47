"""The live wire protocol between kcr-migrate and its agents: records 32 and up, and the handshake.

A live stream is an image stream (``transport.framing``): the stream magic, then frames. Each
side's first record is a ``Hello``; after both are exchanged and checked, the sides speak the
request/response protocol of ``transport.rpc``::

    32 Hello       protocol version, tool version, role, features, machine, page window
    33 Request     id, method, args (a map of plain values)
    34 Response    id, ok, result map, or error (code, errno, message, ...)
    35 Cancel      id: the caller gave up on a request
    36 Progress    id, fields: an event from a long-running request
    37 PagesBegin  id, reply: page batches that follow (PAGES frames) belong to request id
                   (reply: a request the receiver made, else one the sender made)
    38 PagesEnd    id, counts, reply: the page stream of id is complete (the receiver checks the
                   counts); an empty upload is a lone PagesEnd(id, 0, 0, 0), valid anywhere
    39 Credit      bytes: the receiver consumed that many raw page bytes (flow control)
    40 Bye         reason: the sender closes the stream on purpose

``Hello`` is frozen forever at record version 1 (new fields optional, at the end), as are the
stream magic and the frame header: whatever a future version changes, two versions can always
read each other's Hello and refuse each other with a message naming both versions.
"""
from __future__ import annotations

import os
import platform
import socket
from dataclasses import field
from typing import TYPE_CHECKING, Annotated, Any

from transport.errors import IncompatibleImage, MigrationError, PeerGone, ProtocolError, TransportTimeout
from transport.frozen import frozen
from transport.records import MAX_STR, U32, U64, Count, Int, NonNegI64, Record, Text, check
from transport.schema import FORMAT_VERSION, PID_MAX_LIMIT, Name, register
from transport.version import PROTOCOL_VERSION, tool_version  # noqa: F401  (defined there, used here and by callers)

if TYPE_CHECKING:
    from transport.stream import FramedStream

ROLE_ORCHESTRATOR = "orchestrator"   # kcr-migrate itself, driving agents
ROLE_AGENT = "agent"                 # kcr-agent serving requests
ROLE_DATA = "data"                   # an agent's end of a direct data channel (TCP)
ROLES = (ROLE_ORCHESTRATOR, ROLE_AGENT, ROLE_DATA)
# What starts an agent speaking this protocol on its stdin and stdout (run on other hosts over ssh).
AGENT_COMMAND = "kcr-agent serve --stdio"

FEATURE_ZSTD = "zstd"                # page batches may be zstd-compressed
FEATURE_CREDIT = "credit"            # page streams are flow-controlled with Credit records
FEATURES: tuple[str, ...] = (FEATURE_ZSTD, FEATURE_CREDIT)

DEFAULT_WINDOW = 16 << 20           # raw page bytes a receiver buffers before crediting
MIN_WINDOW = 1 << 20
MAX_WINDOW = 1 << 30


def _netns_inode() -> int:
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


_check = check

RequestId = Annotated[int, Int(1, (1 << 63) - 1, "a request id")]
Word = Annotated[str, Text(64)]        # roles, features, method names, error codes, phases


@frozen
class Hello(Record):
    """Each side's first record on a live stream."""

    TYPE = 32
    protocol_version: U32
    tool_version: Name
    role: Word
    features: Annotated[tuple[Word, ...], Count(64)]
    hostname: Name
    kernel_release: Name
    arch: Word
    format_version: U32 = FORMAT_VERSION
    xsave_mask: U64 = 0
    netns_inode: U64 = 0
    pid: Annotated[int, Int(0, PID_MAX_LIMIT - 1, "a pid")] = 0
    window: Annotated[int, Int(0, MAX_WINDOW, "a page window")] = DEFAULT_WINDOW   # raw page bytes this
                                     # side accepts before it credits them

    def validate(self) -> None:
        _check(self.window == 0 or MIN_WINDOW <= self.window, f"page window {self.window}")


@frozen
class ErrorInfo:
    """An error as it crosses the wire: ``MigrationError.to_wire()`` as a record field."""

    code: Word
    errno: Annotated[int, Int(0, 4095, "an errno")]
    message: Annotated[str, Text(MAX_STR)]
    phase: Word = ""
    pid: Annotated[int, Int(-1, PID_MAX_LIMIT - 1, "a pid or -1")] = -1
    host: Name = ""

    @classmethod
    def of(cls, exc: MigrationError) -> ErrorInfo:
        return cls(code=exc.code, errno=exc.errno or 0, message=exc.message, phase=exc.phase or "",
                   pid=exc.pid if exc.pid is not None else -1, host=exc.host or "")

    def as_dict(self) -> dict[str, object]:
        return {"code": self.code, "errno": self.errno, "message": self.message,
                "phase": self.phase, "pid": self.pid, "host": self.host}


@frozen
class Request(Record):
    TYPE = 33
    id: RequestId
    method: Word
    args: dict[str, Any] = field(default_factory=dict)
    upload: bool = False     # the caller sends a page stream with this request

    def validate(self) -> None:
        _check(bool(self.method), "no method name")


@frozen
class Response(Record):
    TYPE = 34
    id: RequestId
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error: ErrorInfo | None = None

    def validate(self) -> None:
        _check(self.ok == (self.error is None), "a response is either ok or carries an error")


@frozen
class Cancel(Record):
    TYPE = 35
    id: RequestId


@frozen
class Progress(Record):
    TYPE = 36
    id: RequestId
    fields: dict[str, Any] = field(default_factory=dict)


@frozen
class PagesBegin(Record):
    TYPE = 37
    id: RequestId
    reply: bool = False      # pages answering a request of the receiver (else: an upload)


@frozen
class PagesEnd(Record):
    TYPE = 38
    id: RequestId
    batches: NonNegI64
    pages: NonNegI64
    bytes_raw: NonNegI64
    reply: bool = False


@frozen
class Credit(Record):
    TYPE = 39
    bytes: Annotated[int, Int(1, 1 << 48, "a credit")]


@frozen
class Bye(Record):
    TYPE = 40
    reason: Annotated[str, Text(4096)] = ""


LIVE_RECORDS: tuple[type[Record], ...] = (Hello, Request, Response, Cancel, Progress, PagesBegin,
                                          PagesEnd, Credit, Bye)
for _cls in LIVE_RECORDS:
    register(_cls)


# --- the handshake ------------------------------------------------------------------------

def local_hello(role: str, *, window: int = DEFAULT_WINDOW, xsave_mask: int = 0,
                features: tuple[str, ...] = FEATURES) -> Hello:
    """This side's Hello. ``xsave_mask`` comes from the caller (transport does not probe CPUs)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    uname = os.uname()
    return Hello(protocol_version=PROTOCOL_VERSION, tool_version=tool_version(), role=role,
                 features=features, hostname=socket.gethostname(), kernel_release=uname.release,
                 arch=platform.machine(), xsave_mask=xsave_mask, netns_inode=_netns_inode(),
                 pid=os.getpid(), window=window)


def check_hello(ours: Hello, theirs: Hello, *, peer: str, accept_roles: tuple[str, ...]) -> None:
    """Refuse a peer this side cannot talk to; the message names both versions."""
    if theirs.protocol_version != ours.protocol_version:
        newer = "this side" if ours.protocol_version > theirs.protocol_version else peer
        raise IncompatibleImage(
            f"{peer} speaks kcr-migrate protocol version {theirs.protocol_version} "
            f"(kcr-migrate {theirs.tool_version}) but this side speaks version {ours.protocol_version} "
            f"(kcr-migrate {ours.tool_version}); {newer} is newer: install the same kcr-migrate "
            f"version on both hosts (pip install kcr-migrate=={ours.tool_version})")
    if theirs.format_version != ours.format_version:
        raise IncompatibleImage(
            f"{peer} writes image format version {theirs.format_version} (kcr-migrate {theirs.tool_version}), "
            f"this side version {ours.format_version} (kcr-migrate {ours.tool_version}): install the same "
            f"kcr-migrate version on both hosts (pip install kcr-migrate=={ours.tool_version})")
    if theirs.role not in accept_roles:
        raise ProtocolError(f"{peer} introduced itself as {theirs.role!r} but this side expects "
                            f"{' or '.join(repr(r) for r in accept_roles)}: wrong program at the other end")
    if FEATURE_CREDIT not in theirs.features:
        raise IncompatibleImage(f"{peer} (kcr-migrate {theirs.tool_version}) lacks page flow control: "
                                "install the same kcr-migrate version on both hosts")


async def handshake(fs: FramedStream, ours: Hello, *, accept_roles: tuple[str, ...],
                    timeout: float | None = 30.0) -> Hello:
    """Send our Hello, read the peer's and check it. Both sides send first, so neither waits."""
    try:
        await fs.send_record(ours)
    except PeerGone:
        raise PeerGone(f"{fs.peer} closed the connection before the handshake") from None
    try:
        item = await fs.receive_item(timeout=timeout)
    except TransportTimeout:
        raise TransportTimeout(f"{fs.peer} did not answer the handshake within {timeout:g} s: "
                               "is the agent at the other end stuck?") from None
    if item is None:
        raise PeerGone(f"{fs.peer} closed the connection before the handshake")
    if not isinstance(item, Hello):
        what = type(item).__name__ if isinstance(item, Record) else "page data"
        raise ProtocolError(f"{fs.peer} sent {what} before its Hello: not a kcr-migrate live stream")
    check_hello(ours, item, peer=fs.peer, accept_roles=accept_roles)
    return item
