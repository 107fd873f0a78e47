"""The local channel: a real `kcr-agent serve --stdio` subprocess on a socketpair, and its CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests._transport import page_batch
from transport.errors import PeerGone, TransportError
from transport.local import AGENT_ARGV, PIPE_SIZE, open_local_agent
from transport.protocol import PROTOCOL_VERSION


async def test_local_agent_serves_info_and_pages() -> None:
    batches = [page_batch(256, seed=i) for i in range(8)]
    async with open_local_agent() as rpc:
        info = await rpc.call("info")
        assert info["pid"] != os.getpid() and info["protocol_version"] == PROTOCOL_VERSION
        assert info["netns_inode"] == os.stat("/proc/self/ns/net").st_ino
        assert {"sink", "source_synthetic", "ping", "info", "hello", "data_listen"} <= set(info["methods"])
        async with rpc.open_call("sink", upload=True) as call:
            for b in batches:
                await call.send_batch(b)
            assert (await call.result())["bytes_raw"] == sum(len(b.data) for b in batches)
        got = 0
        async with rpc.open_call("source_synthetic", total_bytes=8 << 20, level=1) as call:
            async for batch in call.pages:
                got += len(batch.data)
            assert (await call.result())["bytes_raw"] == 8 << 20
        assert got == 8 << 20


def _fd_table_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("FDSize:"))


async def test_an_agent_starts_with_room_for_a_jobs_fds() -> None:
    # A table shared by threads grows only after an RCU grace period: an agent restoring a job
    # of a few dozen pipes and sockets grew it while the job was frozen (one open() took up to
    # 46 ms). It starts with room for 1024 (without, its table held 256 here).
    async with open_local_agent() as rpc:
        pid = int((await rpc.call("info"))["pid"])
        assert _fd_table_size(pid) >= 1024
        assert len(os.listdir(f"/proc/{pid}/fd")) < 64       # the room is empty: only the table grew


SHOUTING_AGENT = """
import sys, trio
from agent import serve
@serve.method("shout")
async def shout(ctx, *, text):
    print(text)                      # stdout: must not reach the protocol stream
    sys.stdout.flush()
    return {"said": text}
sys.exit(trio.run(serve.serve_stdio))
"""


async def test_stray_prints_in_the_agent_do_not_corrupt_the_stream() -> None:
    async with open_local_agent(argv=[sys.executable, "-c", SHOUTING_AGENT]) as rpc:
        assert await rpc.call("shout", text="hello there") == {"said": "hello there"}
        assert await rpc.call("ping") == {"echo": {}}


async def test_a_missing_agent_program() -> None:
    with pytest.raises(TransportError, match="cannot start the local agent /nonexistent/kcr-agent"):
        async with open_local_agent(argv=["/nonexistent/kcr-agent", "serve", "--stdio"]):
            pass


async def test_an_agent_that_dies_at_once_says_why() -> None:
    argv = [sys.executable, "-c", "import sys; sys.stderr.write('agent: cannot start\\n'); sys.exit(3)"]
    with pytest.raises(PeerGone, match="exited with status 3 before the handshake: agent: cannot start"):
        async with open_local_agent(argv=argv):
            pass


def kcr_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT_ARGV[:3], *args], capture_output=True, text=True, timeout=60)


def test_agent_cli() -> None:
    version = kcr_agent("--version")
    assert version.returncode == 0 and f"protocol {PROTOCOL_VERSION}" in version.stdout
    info = kcr_agent("info")
    assert info.returncode == 0 and json.loads(info.stdout)["protocol_version"] == PROTOCOL_VERSION
    usage = kcr_agent("serve")
    assert usage.returncode == 2 and "--stdio" in usage.stderr


def test_the_agent_enlarges_its_stdio_pipes() -> None:
    """Under sshd the agent's stdin and stdout are pipes: it asks for PIPE_SIZE on each."""
    script = ("import fcntl, sys; from transport.local import stdio_stream; s = stdio_stream(); "
              "print(fcntl.fcntl(s.send_stream.fileno(), fcntl.F_GETPIPE_SZ), "
              "fcntl.fcntl(s.receive_stream.fileno(), fcntl.F_GETPIPE_SZ), file=sys.stderr)")
    run = subprocess.run([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr
    assert run.stderr.split() == [str(PIPE_SIZE), str(PIPE_SIZE)]


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{key}:"))


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for t in os.listdir(f"/proc/{p}/task"):
            with open(f"/proc/{p}/task/{t}/children") as f:
                kids = [int(p) for p in f.read().split()]
            out += kids
            todo += kids
    return out


def _running(pid: int) -> bool:
    """Not exited: a zombie, left for a subreaper that another test of this session made of
    this process, has."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _gone(pids: list[int], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(_running(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


async def test_holders_are_forked_by_a_zygote_that_ends_with_the_agent() -> None:
    """A source's holder (the job's tracer) is forked from the agent's zygote, loaded already,
    not started as a new interpreter in the preflight; the zygote ends with the agent and
    leaves no process. An agent whose zygote is gone starts its holders as new interpreters."""
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], stdin=subprocess.DEVNULL)
    try:
        async with open_local_agent() as rpc:
            agent = int((await rpc.call("info"))["pid"])
            zygotes = [p for p in _descendants(agent) if _comm(p) == "kcr-holder-fork"]
            assert len(zygotes) == 1 and _status(zygotes[0], "PPid") == agent
            await rpc.call("source_open", pid=job.pid)
            holders = [p for p in _descendants(agent) if p not in zygotes]
            assert len(holders) == 1 and _comm(holders[0]) == "kcr-holder"
            assert _status(holders[0], "PPid") == zygotes[0]
            await rpc.call("source_release")
        assert _gone([*zygotes, *holders])
        assert job.poll() is None and _status(job.pid, "TracerPid") == 0

        async with open_local_agent() as rpc:
            agent = int((await rpc.call("info"))["pid"])
            zygote = next(p for p in _descendants(agent) if _comm(p) == "kcr-holder-fork")
            os.kill(zygote, signal.SIGKILL)
            await rpc.call("source_open", pid=job.pid)
            assert _gone([zygote])          # (reaped by the agent, once it found it gone)
            holders = _descendants(agent)
            assert len(holders) == 1 and _comm(holders[0]) != "kcr-holder"
            assert _status(holders[0], "PPid") == agent
            await rpc.call("source_release")
        assert _gone(holders)
        assert job.poll() is None and _status(job.pid, "TracerPid") == 0
    finally:
        job.kill()
        job.wait()
