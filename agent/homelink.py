"""The home link: what a stand-in's keeper (on the source) and its deputy (on the destination)
say to each other, and the rule both follow when it is lost.

The link is the direct data channel's sealed TCP stream (``transport.tcp``: the deputy
listens under a fresh key kcr-migrate sent to both agents over SSH; the keeper connects and
both prove the key before anything is read). Each sealed record holds one message, a msgpack
map with its type id in ``t``; every field is checked on decoding, and a record may be no
longer than ``MAX_MESSAGE``. Type ids are never reused.

Both sides send a ``Beat`` every ``beat_interval(timeout)`` seconds; a side that hears nothing
for ``timeout`` seconds, or sees the stream end without a ``Bye``, has lost the link
(``agent.homechannel``). This module imports neither trio nor the channel: the library's
options check a rule with it.
"""
from __future__ import annotations

import signal
from typing import Union

import msgpack

from transport.errors import ProtocolError
from transport.frozen import frozen

LINK_VERSION = 1
MAX_OUTPUT = 64 << 10            # bytes of relayed output in one message
MAX_MESSAGE = MAX_OUTPUT + 64
MAX_FD = (1 << 20) - 1
RELAY_DIR = "/run/kcr-migrate/relay"     # on the destination: the FIFOs relayed fds write into
# The stand-in's exit status when it loses its process (``--stand-in-lost`` not given):
# distinctive, outside the usual 0-2 and 126-165 (shell and signal) ranges.
LINK_LOST_STATUS = 240
SIGNALS = range(1, 65)


@frozen
class Hello:
    """The keeper's first message: the stand-in's pid on the source, and the link's version."""

    pid: int
    version: int = LINK_VERSION


@frozen
class Beat:
    """Still here."""


@frozen
class Forward:
    """The stand-in received ``sig``: the deputy sends it to the moved process."""

    sig: int


@frozen
class Exited:
    """The moved process ended: ``status`` as waitpid() reports it; -1 if it is not known
    (its parent here reaped it before the deputy could read it, on a kernel without
    PIDFD_INFO_EXIT)."""

    status: int


@frozen
class HomeEnded:
    """The stand-in ended of something it could not forward (SIGKILL): ``status`` as
    waitpid() reported it. The deputy ends the moved process the same way."""

    status: int


@frozen
class Bye:
    """A clean end: the sender is done and closes the link."""


@frozen
class Output:
    """Bytes the moved process wrote to its relayed fd ``fd`` (``--relay``), for the keeper to
    write to that fd's pipe at home; empty: every writer closed it (the parent gets EOF)."""

    fd: int
    data: bytes


Message = Union[Hello, Beat, Forward, Exited, HomeEnded, Bye, Output]
TYPES: dict[int, type] = {1: Hello, 2: Beat, 3: Forward, 4: Exited, 5: HomeEnded, 6: Bye, 7: Output}
IDS: dict[type, int] = {cls: t for t, cls in TYPES.items()}


def encode(msg: Message) -> bytes:
    fields = {k: getattr(msg, k) for k in msg.__dataclass_fields__}
    return msgpack.packb({"t": IDS[type(msg)], **fields}, use_bin_type=True)


def _int(fields: dict[object, object], name: str, low: int, high: int) -> int:
    value = fields.get(name)
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(f"home link: field {name} is {value!r}, not an integer in {low}..{high}")
    return value


# Signals no process dies of (their default action stops, continues or ignores).
NOT_FATAL = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCONT,
                       signal.SIGCHLD, signal.SIGURG, signal.SIGWINCH})


def _end_status(fields: dict[object, object], unknown_ok: bool) -> int:
    """A wait status a process can end with: exited (0..255), or killed by a fatal signal."""
    status = _int(fields, "status", -1 if unknown_ok else 0, 0xFFFF)
    term = status & 0x7F
    if status == -1 or status & 0xFF == 0 or (status >> 8 == 0 and 1 <= term <= 64 and term not in NOT_FATAL):
        return status
    raise ProtocolError(f"home link: {status:#x} is not a status a process ends with")


def decode(data: bytes | bytearray | memoryview) -> Message:
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"home link: a message of {len(data)} bytes")
    try:
        fields = msgpack.unpackb(bytes(data), raw=False, max_map_len=8, max_str_len=32, max_bin_len=MAX_OUTPUT,
                                 max_array_len=0)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"home link: an undecodable message ({exc})") from None
    if not isinstance(fields, dict):
        raise ProtocolError("home link: a message that is not a map")
    cls = TYPES.get(fields.get("t"))     # type: ignore[arg-type]
    if cls is None:
        raise ProtocolError(f"home link: unknown message type {fields.get('t')!r}")
    if cls is Hello:
        return Hello(_int(fields, "pid", 1, 2**31 - 1), _int(fields, "version", 1, 1 << 16))
    if cls is Forward:
        return Forward(_int(fields, "sig", 1, 64))
    if cls is Exited:
        return Exited(_end_status(fields, True))
    if cls is HomeEnded:
        return HomeEnded(_end_status(fields, False))
    if cls is Output:
        out = fields.get("data")
        if not isinstance(out, bytes):
            raise ProtocolError("home link: field data is not bytes")
        return Output(_int(fields, "fd", 0, MAX_FD), out)
    return cls()     # type: ignore[no-any-return]


# --- the rule when the link is lost ----------------------------------------------------------

@frozen
class LostRule:
    """``kill``: the stand-in dies of SIGKILL, and the deputy kills the moved process;
    ``exit:N``: the stand-in exits with status N, and the moved process runs on."""

    kill: bool = False
    status: int = LINK_LOST_STATUS

    def __str__(self) -> str:
        return "kill" if self.kill else f"exit:{self.status}"


def parse_lost(text: str) -> LostRule:
    """``kill`` or ``exit:N`` (N 0..255); ``exit`` alone means ``exit:240``."""
    if text == "kill":
        return LostRule(kill=True)
    if text == "exit":
        return LostRule()
    kind, _, n = text.partition(":")
    if kind == "exit" and n.isdigit() and 0 <= int(n) <= 255:
        return LostRule(status=int(n))
    raise ValueError(f"stand-in-lost {text!r}: use kill, or exit:N with N from 0 to 255")


def beat_interval(timeout: float) -> float:
    return max(0.05, timeout / 4)


def describe_status(status: int) -> str:
    """A wait status in words, for logs and messages."""
    if status < 0:
        return "an unknown status"
    if status & 0x7F == 0:
        return f"status {(status >> 8) & 0xFF}"
    try:
        name = signal.Signals(status & 0x7F).name
    except ValueError:
        name = f"signal {status & 0x7F}"
    return f"{name}"
