"""Helpers for the transport tests: an example of every record type, RPC peers on a socketpair,
images taken apart into frames and put back together (as anyone could: valid crc32s, no key)."""
from __future__ import annotations

import dataclasses
import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import trio

from transport.framing import HEADER, HEADER_SIZE, KIND_TAG, STREAM_MAGIC, encode_frame
from transport.local import socket_pair
from transport.pages import PageBatch
from transport.protocol import (
    ROLE_AGENT,
    ROLE_ORCHESTRATOR,
    Bye,
    Cancel,
    Credit,
    ErrorInfo,
    Hello,
    PagesBegin,
    PagesEnd,
    Progress,
    Request,
    Response,
    local_hello,
)
from transport.records import Record
from transport.rpc import Methods, RpcPeer, open_rpc
from transport.schema import (
    FORMAT_VERSION,
    PAGE_SIZE,
    Creds,
    EndOfImage,
    EpollWatch,
    EventFile,
    EventFiles,
    InetOption,
    InetSocket,
    InetSockets,
    FileContents,
    InotifyWatch,
    FileDesc,
    Files,
    GpRegs,
    ImageHeader,
    ITimer,
    Mappings,
    MappingsDelta,
    AddressRange,
    MmFields,
    PipeBuffer,
    Pipes,
    ParentPages,
    ProcessBegin,
    ProcessState,
    ProcessTree,
    Rlimit,
    SigAction,
    SocketOptions,
    ThreadState,
    TreeMember,
    UnixSocket,
    UnixSockets,
    Vma,
)


def example_records() -> dict[type[Record], Record]:
    """One valid, non-trivial instance of every record type (add one for each new type)."""
    regs = dataclasses.replace(GpRegs.from_tuple(tuple(range(1, 28))), cs=0x33, ss=0x2B, ds=0, es=0, fs=0, gs=0)
    mm = MmFields(0x400000, 0x401000, 0x600000, 0x601000, 0x602000, 0x603000, 0x7FFC0000_0000,
                  0x7FFC0000_1000, 0x7FFC0000_1100, 0x7FFC0000_1100, 0x7FFC0000_1200)
    records: list[Record] = [
        ImageHeader(format_version=FORMAT_VERSION, tool_version="0.1.0", kernel_release="6.18.0", arch="x86_64",
                    page_size=PAGE_SIZE, xsave_mask=0xE7, xsave_size=2696, hostname="hostA",
                    created_unix=1.5, pid=1234, kind="checkpoint"),
        ProcessState(pid=1234, exe="/usr/bin/python3", cwd="/srv", root="/", umask=0o22, personality=0,
                     dumpable=1, creds=Creds((0, 0, 0, 0), (0, 0, 0, 0), (0, 4, 24), 0, 0x1FF, 0x1FF,
                                             (1 << 41) - 1, 0, 0, False),
                     rlimits=(Rlimit(7, 1024, 4096),), mm=mm, auxv=bytes(32),
                     sigactions=(SigAction(2, 0x401234, 0x4000000, 0x401000, 0),),
                     itimers=(ITimer(0, 0, 1000),), shared_pending=((10).to_bytes(4, "little") + bytes(124),), child_subreaper=1),
        Mappings(vmas=(Vma(0x400000, 0x401000, 5, False, "file", "/usr/bin/python3", 0, file_size=4096),
                       Vma(0x7FFC0000_0000, 0x7FFC0002_0000, 3, False, "stack", growsdown=True))),
        MappingsDelta(cleared=(AddressRange(0x500000, 0x504000), AddressRange(0x600000, 0x601000)),
                      vmas=(Vma(0x500000, 0x502000, 3, False, "anon"), Vma(0x502000, 0x504000, 1, False, "anon"))),
        Files(fds=(FileDesc(0, "chr", "/dev/null", 0o2, 0), FileDesc(3, "file", "/srv/log", 0o2001, 77, 77, 5, desc=4),
                   FileDesc(4, "file", "/srv/log", 0o2002001, 77, 77, 5, desc=4),
                   FileDesc(5, "pipe", "", 0o4000, 0, obj=9001), FileDesc(6, "unix", "", 0o2, 0, obj=9002),
                   FileDesc(7, "unix", "", 0o2, 0, obj=9003), FileDesc(8, "redirect", "/srv/out", 0o1, 0))),
        Pipes(pipes=(PipeBuffer(9001, 65536, b"in flight"),)),
        UnixSockets(sockets=(
            UnixSocket(9002, 1, 9003, False, 2, SocketOptions(212992, 212992, peek_off=3), (b"queued",)),
            UnixSocket(9003, 1, 9002, False, 1, SocketOptions(212992, 212992), ()))),
        ThreadState(tid=1234, leader=True, comm="python3", regs=regs, xstate=bytes(range(256)) * 4,
                    sigmask=1 << 9, pending=(), tid_address=0x7F00_0000_0000, robust_list=0x7F00_0000_1000,
                    robust_list_len=24, rseq_addr=0x7F00_0000_2000, rseq_len=32, rseq_sig=0x53053053),
        EventFiles(files=(EventFile(1, "eventfd", count=5, semaphore=True),
                          EventFile(2, "timerfd", clockid=1, value_ns=7, interval_ns=20_000_000, ticks=2),
                          EventFile(3, "signalfd", sigmask=1 << 9),
                          EventFile(4, "epoll", watches=(EpollWatch(3, 0x80000001, 101),)),
                          EventFile(5, "inotify", inotify=(InotifyWatch(4, 0x80000100, "/srv"),), queued=32))),
        InetSockets(sockets=(InetSocket(9, 10, 1, 6, address=bytes(16), port=8080, backlog=128,
                                        options=(InetOption(41, 26, b"\1\0\0\0"), InetOption(6, 13, b"cubic"))),
                             InetSocket(10, 2, 2, 17, address=bytes(4), port=5353, peer_address=b"\x7f\0\0\1",
                                        peer_port=53))),
        FileContents(id=77, size=10, offset=0, data=b"0123456789", mode=0o640, uid=1000, gid=1000),
        FileContents(id=78, size=4400, offset=4096, data=b"tail", mode=0o777, memfd=True, seals=0x17),
        ProcessTree(members=(TreeMember(1234, 1, 1234, 1234, "sh"), TreeMember(1240, 1234, 1234, 1234, "sort"))),
        ProcessBegin(pid=1240),
        ParentPages(ranges=(AddressRange(0x500000, 0x540000), AddressRange(0x7F0000001000, 0x7F0000002000))),
        EndOfImage(page_batches=3, pages=77, records=6),
        local_hello(ROLE_AGENT, xsave_mask=0xE7),
        Request(7, "sink", {"n": 1, "nested": {"list": [1, "two", b"\x03", None, 1.5, True]}}, upload=True),
        Response(7, True, {"batches": 3, "host": "hostB"}),
        Response(8, False, error=ErrorInfo("no-such-process", 3, "no process 99", "preflight", 99, "hostA")),
        Cancel(7),
        Progress(7, {"round": 2, "pages_dirty": 1000}),
        PagesBegin(7),
        PagesEnd(7, 3, 1536, 1536 * PAGE_SIZE),
        Credit(4 << 20),
        Bye("done"),
    ]
    return {type(r): r for r in records}


def page_batch(npages: int, *, seed: int = 0, addr: int = 0x7F00_0000_0000, fill: str = "mixed") -> PageBatch:
    """A batch whose content says where it came from (so a mix-up shows)."""
    if fill == "random":
        data = os.urandom(npages * PAGE_SIZE)
    else:
        page = bytearray(PAGE_SIZE)
        out = bytearray()
        for i in range(npages):
            page[:16] = (seed.to_bytes(8, "little") + i.to_bytes(8, "little"))
            out += page if fill == "mixed" and i % 3 else bytes(page[:16]) + os.urandom(PAGE_SIZE - 16)
        data = bytes(out)
    return PageBatch(((addr, npages),), data)


@asynccontextmanager
async def rpc_pair(methods: Methods | None = None, *, client_methods: Methods | None = None,
                   client_options: dict[str, Any] | None = None,
                   server_options: dict[str, Any] | None = None) -> AsyncIterator[tuple[RpcPeer, RpcPeer]]:
    """(client, server) RPC peers connected by a socketpair, in this process."""
    a, b = socket_pair()
    server_ready: trio.Event = trio.Event()
    holder: list[RpcPeer] = []
    stop = trio.Event()

    async def serve() -> None:
        async with open_rpc(b, role=ROLE_AGENT, accept_roles=(ROLE_ORCHESTRATOR,), methods=methods,
                            peer="the test client", **(server_options or {})) as server:
            holder.append(server)
            server_ready.set()
            with trio.move_on_after(60):
                await stop.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        async with open_rpc(a, role=ROLE_ORCHESTRATOR, accept_roles=(ROLE_AGENT,), methods=client_methods,
                            peer="the test agent", host="testhost", **(client_options or {})) as client:
            await server_ready.wait()
            try:
                yield client, holder[0]
            finally:
                stop.set()


def hello_with(**changes: Any) -> Hello:
    return dataclasses.replace(local_hello(ROLE_AGENT), **changes)


@dataclasses.dataclass
class ImageFrame:
    kind: int
    flags: int
    payload: bytes
    tag: bytes | None          # the signature frame's payload that followed it, if any


def image_frames(image: bytes) -> list[ImageFrame]:
    """An image's frames, each with the tag that follows it."""
    assert image.startswith(STREAM_MAGIC)
    frames: list[ImageFrame] = []
    off = len(STREAM_MAGIC)
    while off < len(image):
        _, kind, flags, length, _ = HEADER.unpack_from(image, off)
        payload = image[off + HEADER_SIZE: off + HEADER_SIZE + length]
        off += HEADER_SIZE + length
        if kind == KIND_TAG:
            frames[-1].tag = payload
        else:
            frames.append(ImageFrame(kind, flags, payload, None))
    return frames


def image_of(frames: list[ImageFrame], *, tags: bool = True) -> bytes:
    """Frames back into an image with valid crc32s; their tags as they are, or none."""
    out = bytearray(STREAM_MAGIC)
    for f in frames:
        out += encode_frame(f.kind, f.flags, f.payload)
        if tags and f.tag is not None:
            out += encode_frame(KIND_TAG, 0, f.tag)
    return bytes(out)
