"""The home link's messages and rule (agent.homelink), and how the deputy reads an exit
status (agent.deputy.exit_status) from real processes."""
from __future__ import annotations

import os
import select
import signal

import msgpack
import pytest

from agent.deputy import exit_status
from agent.homelink import (
    LINK_LOST_STATUS,
    MAX_MESSAGE,
    TYPES,
    Beat,
    Bye,
    Exited,
    Forward,
    Hello,
    HomeEnded,
    LostRule,
    MAX_OUTPUT,
    Output,
    decode,
    encode,
    parse_lost,
)
from transport.errors import ProtocolError


@pytest.mark.parametrize("msg", [Hello(1234), Beat(), Forward(15), Exited(7 << 8), Exited(-1), Exited(0), Exited(255 << 8),
                                 Exited(signal.SIGABRT | 0x80), Exited(signal.SIGRTMAX), HomeEnded(9), Bye(),
                                 Output(1, b"hello\n"), Output(2, b""), Output(7, bytes(MAX_OUTPUT))])
def test_messages_round_trip(msg: object) -> None:
    assert decode(encode(msg)) == msg     # type: ignore[arg-type]


def test_type_ids_are_unique() -> None:
    assert len(set(TYPES.values())) == len(TYPES)


@pytest.mark.parametrize("raw", [
    {"t": 3, "sig": 0}, {"t": 3, "sig": 65}, {"t": 3, "sig": "15"}, {"t": 3},
    {"t": 4, "status": 1 << 20}, {"t": 1, "pid": -5, "version": 1}, {"t": 99}, {"t": 3, "sig": True},
    {"t": 4, "status": 0x137F}, {"t": 4, "status": signal.SIGSTOP}, {"t": 4, "status": 0x0107},
    {"t": 5, "status": -1}, {"t": 5, "status": signal.SIGCHLD},
    {"t": 7, "fd": 1, "data": "text"}, {"t": 7, "fd": -1, "data": b""}, {"t": 7, "fd": 1},
])
def test_bad_fields_are_refused(raw: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        decode(msgpack.packb(raw))


def test_oversized_and_undecodable_messages_are_refused() -> None:
    with pytest.raises(ProtocolError):
        decode(b"\x81" + b"x" * MAX_MESSAGE)
    with pytest.raises(ProtocolError):
        decode(msgpack.packb({"t": 7, "fd": 1, "data": bytes(MAX_OUTPUT + 1)}))
    with pytest.raises(ProtocolError):
        decode(b"\xc1")
    with pytest.raises(ProtocolError):
        decode(msgpack.packb([1, 2]))


def test_lost_rules() -> None:
    assert parse_lost("kill") == LostRule(kill=True)
    assert parse_lost("exit") == LostRule(status=LINK_LOST_STATUS)
    assert parse_lost("exit:0") == LostRule(status=0)
    assert str(parse_lost("exit:42")) == "exit:42"
    for bad in ("exit:256", "exit:-1", "stop", "exit:", ""):
        with pytest.raises(ValueError):
            parse_lost(bad)


def _ended_child(how: str) -> tuple[int, int]:
    """A child of ours that ended (exit 7, or SIGTERM), not reaped yet, and its pidfd."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        if how == "signal":
            signal.signal(signal.SIGTERM, signal.SIG_DFL)    # the test session may handle it
            os.kill(os.getpid(), signal.SIGTERM)
        os._exit(7)
    os.close(r)
    pidfd = os.pidfd_open(pid)
    os.close(w)
    select.select([pidfd], [], [])
    return pid, pidfd


@pytest.mark.parametrize("how", ["exit", "signal"])
def test_exit_status_of_a_zombie_and_of_a_reaped_process(how: str) -> None:
    pid, pidfd = _ended_child(how)
    try:
        zombie = exit_status(pidfd, pid)            # its parent (we) has not reaped it
        _, status = os.waitpid(pid, 0)
        assert zombie == status
        reaped = exit_status(pidfd, pid)             # PIDFD_INFO_EXIT, where the kernel has it
        assert reaped in (status, -1)
        if how == "exit":
            assert os.WEXITSTATUS(status) == 7
        else:
            assert os.WTERMSIG(status) == signal.SIGTERM
    finally:
        os.close(pidfd)
