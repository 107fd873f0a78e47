"""Every value an image or a peer sends is range-checked while it is decoded: each field's type
bounds it (``transport.records``), a value just outside is refused with a ProtocolError naming
the record and the field, and msgpack refuses a claimed size before allocating for it."""
from __future__ import annotations

import dataclasses
import re
import struct
import tracemalloc
import types
import typing
from typing import Annotated, Any, Iterator, get_args, get_origin

import msgpack
import pytest

from tests._transport import example_records
from transport.errors import ProtocolError
from transport.records import Int, Record, unbounded_fields
from transport.schema import (
    RECORD_TYPES,
    TASK_SIZE,
    ImageHeader,
    Mappings,
    PosixTimer,
    ProcessState,
    ThreadState,
    Vma,
    check_threads,
    decode_record,
)

Path = tuple[Any, ...]


def test_every_field_of_every_record_type_is_bounded() -> None:
    """A new field must say what it may hold: integers their range, strings, bytes and lists
    their length (``transport.records``)."""
    missing = [f for cls in RECORD_TYPES.values() for f in unbounded_fields(cls)]
    assert not missing, f"bound these fields in their type: {missing}"


def _int_fields(tp: Any, value: Any, path: Path, name: str) -> Iterator[tuple[Path, str, Int]]:
    """(path in the wire body, dotted name, bound) of every bounded integer in ``value``."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *bounds = get_args(tp)
        for b in bounds:
            if isinstance(b, Int):
                yield path, name, b
        yield from _int_fields(base, value, path, name)
    elif origin in (typing.Union, types.UnionType):
        if value is not None:
            arg = next(a for a in get_args(tp) if a is not type(None))
            yield from _int_fields(arg, value, path, name)
    elif origin is tuple:
        args = get_args(tp)
        for i, item in enumerate(value):
            arg = args[0] if len(args) == 2 and args[1] is Ellipsis else args[i]
            yield from _int_fields(arg, item, path + (i,), f"{name}[{i}]")
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        for f in dataclasses.fields(tp):
            yield from _int_fields(hints[f.name], getattr(value, f.name), path + (f.name,), f"{name}.{f.name}")


def _edges() -> list[tuple[Record, Path, str, int]]:
    cases = []
    for rec in example_records().values():
        for path, name, bound in _int_fields(type(rec), rec, (), type(rec).__name__):
            for bad in (bound.lo - 1, bound.hi + 1):
                if -(1 << 63) <= bad < 1 << 64:         # what msgpack can carry
                    cases.append((rec, path, name, bad))
    return cases


EDGES = _edges()


@pytest.mark.parametrize("rec, path, name, bad", EDGES, ids=[f"{c[2]}={c[3]:#x}" for c in EDGES])
def test_every_integer_just_outside_its_range_is_refused_by_name(rec: Record, path: Path, name: str,
                                                                 bad: int) -> None:
    body = rec.to_wire()
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = bad
    with pytest.raises(ProtocolError, match=f"invalid record: {re.escape(name)}: "):
        decode_record(msgpack.packb(body))


def test_the_edges_cover_the_fields_the_tester_named() -> None:
    names = {c[2] for c in EDGES}
    for name in ("ThreadState.tid", "ThreadState.regs.gs_base", "ThreadState.regs.fs_base",
                 "ProcessState.creds.cap_effective", "ProcessState.creds.groups[0]", "ProcessState.creds.uids[0]",
                 "ProcessState.sigactions[0].handler", "ProcessState.sigactions[0].signo", "ProcessState.mm.brk",
                 "Files.fds[0].fd", "Mappings.vmas[0].start", "ImageHeader.pid", "Hello.pid", "Credit.bytes"):
        assert name in names


def _refused(rec: Record, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_record(rec.pack())


def test_values_that_mean_something_else_to_the_kernel_are_refused() -> None:
    records = example_records()
    proc = records[ProcessState]
    thread = records[ThreadState]
    assert isinstance(proc, ProcessState) and isinstance(thread, ThreadState)
    creds = proc.creds
    # -1 is "leave it as it is" to setresuid(): the process would keep the restorer's root.
    _refused(dataclasses.replace(proc, creds=dataclasses.replace(creds, uids=(0xFFFFFFFF,) * 4)), "uids")
    _refused(dataclasses.replace(proc, creds=dataclasses.replace(creds, cap_bounding=1 << 41)), "cap_bounding")
    _refused(dataclasses.replace(proc, creds=dataclasses.replace(creds, groups=(0,) * 70000)), "groups")
    _refused(dataclasses.replace(proc, exe="relative/exe"), "ProcessState.exe")
    _refused(dataclasses.replace(proc, cwd="/tmp/a\0b"), "ProcessState.cwd")
    _refused(dataclasses.replace(proc, cwd="/" + "a" * 5000), "PATH_MAX")
    _refused(dataclasses.replace(proc, mm=dataclasses.replace(proc.mm, arg_start=proc.mm.arg_end + 1)),
             "arg_start above arg_end")
    _refused(dataclasses.replace(proc, shared_pending=(bytes(128),)), "pending signal numbered 0")
    _refused(dataclasses.replace(thread, xstate=b""), r"ThreadState.xstate: 0 bytes")
    _refused(dataclasses.replace(thread, regs=dataclasses.replace(thread.regs, gs_base=TASK_SIZE)), "gs_base")
    _refused(dataclasses.replace(thread, regs=dataclasses.replace(thread.regs, cs=0)), "cs selector")
    _refused(dataclasses.replace(thread, regs=dataclasses.replace(thread.regs, ds=0x10)), "ds selector")
    _refused(dataclasses.replace(thread, robust_list_len=12), "robust list head")
    _refused(dataclasses.replace(thread, rseq_addr=0x1010), "32-byte aligned")


@pytest.mark.parametrize("vma, match", [
    (Vma(0x1000, 0x1000, 3, False, "anon"), "out of user space"),
    (Vma(0x1000, 0x2800, 3, False, "anon"), "unaligned"),
    (Vma(TASK_SIZE, TASK_SIZE + 0x1000, 3, False, "anon"), "out of user space"),
    (Vma(0x1000, 0x2000, 8, False, "anon"), "protection"),
    (Vma(0x1000, 0x2000, 1, False, "file", "lib.so"), "absolute path"),
    (Vma(0x1000, 0x2000, 1, False, "file", "/lib.so", pgoff=(1 << 63) - 4096), "file offset"),
    (Vma(0x1000, 0x2000, 1, False, "vsyscall"), r"\[vsyscall\] mapping at"),
])
def test_a_mapping_out_of_place_is_refused(vma: Vma, match: str) -> None:
    _refused(Mappings((vma,)), match)


def _threads() -> tuple[ProcessState, ThreadState, ImageHeader]:
    records = example_records()
    proc, thread, header = records[ProcessState], records[ThreadState], records[ImageHeader]
    assert isinstance(proc, ProcessState) and isinstance(thread, ThreadState) and isinstance(header, ImageHeader)
    thread = dataclasses.replace(thread, xstate=bytes(header.xsave_size))
    return proc, thread, header


@pytest.mark.parametrize("change, match", [
    (lambda t: [t, dataclasses.replace(t, tid=t.tid + 1)], "2 main threads"),
    (lambda t: [dataclasses.replace(t, leader=False)], "0 main threads"),
    (lambda t: [t, dataclasses.replace(t, leader=False)], "a thread id twice"),
    (lambda t: [dataclasses.replace(t, tid=t.tid + 1)], "main thread has tid"),
    (lambda t: [t, dataclasses.replace(t, tid=t.tid + 1, leader=False, xstate=bytes(1024))], "xstate of 1024 bytes"),
    (lambda t: [dataclasses.replace(t, xstate=bytes(512) + (1 << 9).to_bytes(8, "little") + t.xstate[520:])],
     "CPU state components 0x200"),
    (lambda t: [], "0 of them"),
])
def test_thread_records_that_disagree_are_refused(change: Any, match: str) -> None:
    proc, thread, header = _threads()
    check_threads(proc, [thread], header)
    with pytest.raises(ProtocolError, match=f"ThreadState records of process {proc.pid}: .*{match}"):
        check_threads(proc, change(thread), header)


def test_a_timer_signals_a_thread_of_its_process() -> None:
    proc, thread, header = _threads()
    timer = PosixTimer(id=0, clockid=1, signo=14, sigval=0, notify=4, tid=thread.tid, value_ns=0, interval_ns=0)
    check_threads(dataclasses.replace(proc, posix_timers=(timer,)), [thread], header)
    stray = dataclasses.replace(proc, posix_timers=(dataclasses.replace(timer, tid=thread.tid + 1),))
    with pytest.raises(ProtocolError, match=f"POSIX timer 0 signals thread {thread.tid + 1}"):
        check_threads(stray, [thread], header)


@pytest.mark.parametrize("claim", [
    b"\xdd\x7f\xff\xff\xff",                           # an array of 2**31 - 1 items
    b"\xdf\x7f\xff\xff\xff",                           # a map of as many pairs
    b"\xdb" + struct.pack(">I", 70000) + bytes(70000),     # a string longer than any field's
    b"\xc6" + struct.pack(">I", (1 << 20) + 1) + bytes((1 << 20) + 1),     # bytes, as long
    b"\xd4\x01\x00",                                     # an extension type: none is used
])
def test_a_claimed_size_is_refused_from_its_header(claim: bytes) -> None:
    with pytest.raises(ProtocolError, match="too long"):
        decode_record(b"\x82\xa1t\x05\xa1x" + claim)


def test_nested_claims_allocate_nothing() -> None:
    """A few kilobytes of nested list headers each claiming a million items: msgpack would set
    room aside for every claim before finding the input short."""
    payload = b"\x82\xa1t\x05\xa1x" + b"".join(b"\xdd" + struct.pack(">I", 1 << 20) for _ in range(1000))
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            decode_record(payload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
