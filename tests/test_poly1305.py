"""transport.poly1305: libcrypto's Poly1305 gives cryptography's tags, for every kind of buffer
a frame's parts come in (a read-only view of a mapped image among them)."""
from __future__ import annotations

import mmap
import os
import threading

import pytest
from cryptography.hazmat.primitives.poly1305 import Poly1305

from transport import poly1305 as poly


def reference(key: bytes, parts: list[bytes | bytearray | memoryview]) -> bytes:
    mac = Poly1305(key)
    for part in parts:
        mac.update(part)
    return mac.finalize()


def test_libcrypto_is_the_implementation_where_there_is_one() -> None:
    """Where libcrypto 3 loads (Python's hashlib loads it on Debian), the GIL-free binding is
    the one used."""
    import ctypes

    try:
        ctypes.CDLL("libcrypto.so.3")
    except OSError:
        pytest.skip("this machine has no libcrypto.so.3: cryptography's Poly1305 is used")
    assert poly.implementation() != poly._cryptography_poly1305


@pytest.mark.parametrize("sizes", [[0], [1], [12, 4096 * 3], [12, 0, 7, 1 << 20], [16] * 9])
def test_tags_match_cryptography(sizes: list[int]) -> None:
    key = os.urandom(32)
    parts: list[bytes | bytearray | memoryview] = []
    for i, n in enumerate(sizes):
        data = os.urandom(n)
        parts.append([data, bytearray(data), memoryview(data)[:], memoryview(bytearray(data))][i % 4])
    assert poly.poly1305(key, parts) == reference(key, parts)
    assert poly.poly1305(key, [b"".join(bytes(p) for p in parts)]) == reference(key, parts)


def test_a_read_only_mapping_is_hashed_in_place(tmp_path: object) -> None:
    data = os.urandom(3 * 4096 + 5)
    path = os.path.join(str(tmp_path), "image")
    with open(path, "wb") as f:
        f.write(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        m = mmap.mmap(fd, len(data), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    view = memoryview(m)
    key = os.urandom(32)
    try:
        assert view.readonly
        assert poly.poly1305(key, [b"header", view[100:]]) == reference(key, [b"header", data[100:]])
    finally:
        view.release()
        m.close()


def test_threads_hash_at_once_and_agree() -> None:
    """Several worker threads, each with its own keys, as an image's page frames are checked."""
    jobs = [(os.urandom(32), os.urandom(1 << 18)) for _ in range(16)]
    got: dict[int, bytes] = {}

    def work(i: int) -> None:
        key, data = jobs[i]
        got[i] = poly.poly1305(key, [data[:5], memoryview(data)[5:]])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {i: reference(k, [d]) for i, (k, d) in enumerate(jobs)}


def test_a_key_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        poly.poly1305(b"short", [b"x"])
