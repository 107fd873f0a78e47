"""A socket's classic BPF filter (SO_ATTACH_FILTER), read on the source and attached again on
the destination, with its lock (SO_LOCK_FILTER).

The kernel keeps the program as it was given (``orig_prog``) and SO_GET_FILTER hands it back
instruction for instruction, so the filter attached again is the one the program attached. An
eBPF program (SO_ATTACH_BPF) has no such copy: SO_GET_FILTER fails with EACCES, and such a
socket is refused. A filter applies to what arrives after it is attached: the destination
attaches it once the socket's queue is filled again, so that what the source had accepted is
not judged twice.
"""
from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct

from transport.errors import RestoreError, UnsupportedResource

SO_GET_FILTER = 26            # SO_ATTACH_FILTER, read back
SO_ATTACH_FILTER = 26
SO_LOCK_FILTER = 44
INSTRUCTION = 8               # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
BPF_MAXINSNS = 4096

_libc = ctypes.CDLL(None, use_errno=True)


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def read(fd: int, what: str, pid: int) -> tuple[bytes, bool]:
    """The instructions of the filter attached to the socket ``fd`` (b"": none) and whether it
    is locked. ``what`` names the socket in a refusal (UnsupportedResource) of ``pid``'s."""
    count = ctypes.c_uint32(0)
    # SO_GET_FILTER counts instructions, not bytes: asked with a length of 0 it only counts
    # them (through libc: Python's getsockopt would pass a buffer's length in bytes).
    if _libc.getsockopt(fd, socket.SOL_SOCKET, SO_GET_FILTER, None, ctypes.byref(count)) != 0:
        err = ctypes.get_errno()
        if err == errno.EACCES:
            raise UnsupportedResource(f"{what} has an eBPF program attached (SO_ATTACH_BPF), which cannot be read "
                                      "back: kcr-migrate cannot move it", pid=pid)
        raise OSError(err, f"getsockopt(SO_GET_FILTER): {os.strerror(err)}")
    if not count.value:
        return b"", False
    buf = ctypes.create_string_buffer(count.value * INSTRUCTION)
    got = ctypes.c_uint32(count.value)
    if _libc.getsockopt(fd, socket.SOL_SOCKET, SO_GET_FILTER, buf, ctypes.byref(got)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"getsockopt(SO_GET_FILTER): {os.strerror(err)}")
    locked = struct.unpack("<i", _getsockopt_int(fd, SO_LOCK_FILTER))[0] != 0
    return buf.raw[:got.value * INSTRUCTION], locked


def _getsockopt_int(fd: int, opt: int) -> bytes:
    sock = socket.socket(fileno=fd)
    try:
        return sock.getsockopt(socket.SOL_SOCKET, opt, 4)
    finally:
        sock.detach()


def attach(sock: socket.socket, program: bytes, locked: bool) -> None:
    """Attach ``program`` (as ``read`` gave it; b"": none) to ``sock``, locked if it was."""
    if not program:
        return
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _Fprog(len(program) // INSTRUCTION, ctypes.cast(buf, ctypes.c_void_p))
    if _libc.setsockopt(sock.fileno(), socket.SOL_SOCKET, SO_ATTACH_FILTER, ctypes.byref(prog),
                        ctypes.sizeof(prog)) != 0:
        err = ctypes.get_errno()
        raise RestoreError(f"a socket's BPF filter was refused here (setsockopt(SO_ATTACH_FILTER): "
                           f"{os.strerror(err)}): the image is corrupt, or this kernel takes less than the source's")
    if locked:
        sock.setsockopt(socket.SOL_SOCKET, SO_LOCK_FILTER, 1)
