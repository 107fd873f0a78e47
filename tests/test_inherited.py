"""Which pages a restored child must be written where it holds its parent's memory
(``agent.inherited.changed``), asked of a real forked process: the pages that differ, and
only those, come back, with their data; pages outside the inherited ranges always do."""
from __future__ import annotations

import ctypes
import mmap
import os
import signal
from typing import Iterator

import pytest

from agent.inherited import GROUP_PAGES, changed
from transport.schema import PAGE_SIZE

PAGES = 4 * GROUP_PAGES


@pytest.fixture
def child() -> Iterator[tuple[int, int, bytearray]]:
    """A forked child holding PAGES pages of distinct bytes at an address (stopped); its
    /proc/PID/mem, the address, and the bytes."""
    region = mmap.mmap(-1, PAGES * PAGE_SIZE, flags=mmap.MAP_PRIVATE)
    data = bytearray(os.urandom(PAGES * PAGE_SIZE))
    region[:] = data
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(0)
    os.waitpid(pid, os.WUNTRACED)
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        yield fd, addr, data
    finally:
        os.close(fd)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        region.close()


def page(data: bytearray, i: int) -> bytes:
    return bytes(data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])


def test_only_the_pages_that_differ_are_written(child: tuple[int, int, bytearray]) -> None:
    fd, addr, held = child
    sent = bytearray(held)
    differ = {3, 4, 70, GROUP_PAGES * 2 - 1}
    for i in differ:
        sent[i * PAGE_SIZE] ^= 0xFF
    runs, data = changed(fd, ((addr, PAGES),), memoryview(bytes(sent)), [(addr, addr + PAGES * PAGE_SIZE)])
    got = [(a - addr) // PAGE_SIZE + k for a, n in runs for k in range(n)]
    assert got == sorted(differ)
    assert bytes(data) == b"".join(page(sent, i) for i in sorted(differ))


def test_pages_outside_the_inherited_ranges_are_all_written(child: tuple[int, int, bytearray]) -> None:
    """Runs that cross the inherited range's ends: what lies outside comes back as sent,
    the same bytes or not, in order with what differs inside."""
    fd, addr, held = child
    sent = bytearray(held)
    sent[10 * PAGE_SIZE] ^= 1
    inherited = [(addr + 8 * PAGE_SIZE, addr + 16 * PAGE_SIZE)]
    runs, data = changed(fd, ((addr + 4 * PAGE_SIZE, 6), (addr + 12 * PAGE_SIZE, 8)),
                         memoryview(bytes(sent[4 * PAGE_SIZE:10 * PAGE_SIZE] + sent[12 * PAGE_SIZE:20 * PAGE_SIZE])),
                         inherited)
    want = [4, 5, 6, 7, 16, 17, 18, 19]
    got = [(a - addr) // PAGE_SIZE + k for a, n in runs for k in range(n)]
    assert got == want
    assert bytes(data) == b"".join(page(sent, i) for i in want)


def test_a_group_whose_ends_differ_is_written_whole(child: tuple[int, int, bytearray]) -> None:
    """Memory of the child's own where its parent has other memory: the group's first and
    last pages differ, so all of it is written, unread (the pages between that are the same
    included); every other group as compared."""
    fd, addr, held = child
    sent = bytearray(held)
    sent[GROUP_PAGES * PAGE_SIZE] ^= 1
    sent[(2 * GROUP_PAGES - 1) * PAGE_SIZE] ^= 1
    runs, data = changed(fd, ((addr, PAGES),), memoryview(bytes(sent)), [(addr, addr + PAGES * PAGE_SIZE)])
    assert runs == ((addr + GROUP_PAGES * PAGE_SIZE, GROUP_PAGES),)
    assert bytes(data) == bytes(sent[GROUP_PAGES * PAGE_SIZE:2 * GROUP_PAGES * PAGE_SIZE])


def test_nothing_differs_nothing_is_written_and_nothing_inherited_all_is(child: tuple[int, int, bytearray]) -> None:
    fd, addr, held = child
    view = memoryview(bytes(held))
    runs, data = changed(fd, ((addr, PAGES),), view, [(addr, addr + PAGES * PAGE_SIZE)])
    assert runs == () and bytes(data) == b""
    assert changed(fd, ((addr, PAGES),), view, []) == (((addr, PAGES),), view)
