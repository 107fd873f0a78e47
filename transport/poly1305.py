"""Poly1305 of a frame's parts, hashed with the GIL released.

An image's page frames are signed and checked in worker threads (``transport.image``), each
with Poly1305 under a key of its own (``transport.signing``). cryptography's ``Poly1305``
holds the GIL while it hashes, so those workers took turns: here, 128 MiB took 21 ms in one
thread and 41 ms for twice that in two, and a restore of 256 MiB spent 50 ms of its ~150 in
them. OpenSSL's libcrypto, which Python's own ``hashlib`` and ``hmac`` load, has the same
MAC behind ``EVP_MAC``; called through ctypes, which lets go of the GIL for a foreign call,
two threads hash at once (the same two runs: 20 and 24 ms).

Where libcrypto 3 cannot be loaded or lacks the MAC, cryptography's is used: the same tags,
one thread at a time.
"""
from __future__ import annotations

import ctypes
import threading
from typing import Callable, Iterable

from transport.buffers import data_address

Part = bytes | bytearray | memoryview
KEY_LEN = 32
TAG_LEN = 16


class _OpenSSL:
    def __init__(self) -> None:
        lib = ctypes.CDLL("libcrypto.so.3")
        lib.EVP_MAC_fetch.restype = ctypes.c_void_p
        lib.EVP_MAC_fetch.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
        lib.EVP_MAC_CTX_new.restype = ctypes.c_void_p
        lib.EVP_MAC_CTX_new.argtypes = [ctypes.c_void_p]
        lib.EVP_MAC_CTX_free.restype = None
        lib.EVP_MAC_CTX_free.argtypes = [ctypes.c_void_p]
        lib.EVP_MAC_init.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p]
        lib.EVP_MAC_update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        lib.EVP_MAC_final.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t),
                                      ctypes.c_size_t]
        mac = lib.EVP_MAC_fetch(None, b"POLY1305", None)
        if not mac:
            raise OSError("libcrypto has no POLY1305 MAC")
        self._lib, self._mac = lib, mac

    def poly1305(self, key: bytes, parts: Iterable[Part]) -> bytes:
        lib = self._lib
        ctx = lib.EVP_MAC_CTX_new(self._mac)
        if not ctx:
            raise MemoryError("EVP_MAC_CTX_new failed")
        try:
            if lib.EVP_MAC_init(ctx, key, len(key), None) != 1:
                raise ValueError("EVP_MAC_init failed (a Poly1305 key is 32 bytes)")
            for part in parts:
                if len(part) and lib.EVP_MAC_update(ctx, data_address(part), len(part)) != 1:
                    raise ValueError("EVP_MAC_update failed")
            out = ctypes.create_string_buffer(TAG_LEN)
            n = ctypes.c_size_t()
            if lib.EVP_MAC_final(ctx, out, ctypes.byref(n), TAG_LEN) != 1 or n.value != TAG_LEN:
                raise ValueError("EVP_MAC_final failed")
            return out.raw
        finally:
            lib.EVP_MAC_CTX_free(ctx)


def _cryptography_poly1305(key: bytes, parts: Iterable[Part]) -> bytes:
    from cryptography.hazmat.primitives.poly1305 import Poly1305
    mac = Poly1305(key)
    for part in parts:
        mac.update(part)
    return mac.finalize()


_impl: Callable[[bytes, Iterable[Part]], bytes] | None = None
_lock = threading.Lock()


def implementation() -> Callable[[bytes, Iterable[Part]], bytes]:
    """libcrypto's Poly1305 (GIL released), else cryptography's: chosen once a process."""
    global _impl
    with _lock:
        if _impl is None:
            try:
                _impl = _OpenSSL().poly1305
            except (OSError, AttributeError):       # no libcrypto.so.3, or one without EVP_MAC
                _impl = _cryptography_poly1305
        return _impl


def poly1305(key: bytes, parts: Iterable[Part]) -> bytes:
    """The 16-byte Poly1305 tag of the parts' bytes, one after another, under the one-time ``key``."""
    if len(key) != KEY_LEN:
        raise ValueError(f"a Poly1305 key is {KEY_LEN} bytes, not {len(key)}")
    return (_impl or implementation())(key, parts)
