"""Where a Python buffer's bytes are, for foreign calls (syscalls, libcrypto) through ctypes.

``ctypes`` takes the address of a writable buffer (``from_buffer``) but not of a read-only
one (bytes, a view of a read-only mapping); CPython's ``PyObject_GetBuffer`` gives both.
"""
from __future__ import annotations

import ctypes
from ctypes import c_int, c_void_p


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", c_void_p), ("obj", c_void_p), ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                ("readonly", c_int), ("ndim", c_int), ("format", c_void_p), ("shape", c_void_p),
                ("strides", c_void_p), ("suboffsets", c_void_p), ("internal", c_void_p)]


PyBUF_SIMPLE = 0                 # contiguous bytes, or an error
PyBUF_WRITABLE = 1
_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), c_int]
_get_buffer.restype = c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def _address(buf: bytes | bytearray | memoryview, flags: int) -> int:
    view = _PyBuffer()
    _get_buffer(buf, ctypes.byref(view), flags)
    try:
        return int(view.buf or 0)
    finally:
        _release_buffer(ctypes.byref(view))


def buffer_address(buf: bytearray | memoryview) -> int:
    """Address of a writable Python buffer (kept alive by the caller); a read-only one is an error."""
    return _address(buf, PyBUF_WRITABLE)


def data_address(buf: bytes | bytearray | memoryview) -> int:
    """Address of a contiguous Python buffer, read-only ones (bytes) included; the caller
    keeps it alive while the address is used."""
    return _address(buf, PyBUF_SIMPLE)
