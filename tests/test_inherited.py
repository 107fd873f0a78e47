"""Which pages a restored child must be written where it holds its parent's memory
(``agent.inherited.changed``), asked of a real forked process: the pages that differ, and
only those, come back, with their data; pages outside the inherited ranges always do. And the
source's side (``precopy.parent_frames``): which of a child's pages are its parent's."""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import signal
import subprocess
import sys
from typing import Iterator

import pytest

from agent.inherited import GROUP_PAGES, changed
from precopy.parent_frames import parent_frames, parent_pages_records, shared_with_parent
from transport.schema import MAX_PARENT_RANGES, PAGE_SIZE, ParentPages

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


@contextlib.contextmanager
def child_that_wrote(pages: set[int]) -> Iterator[tuple[int, int, mmap.mmap]]:
    """A region of ``PAGES`` random pages, and a child forked from this process that flipped
    the first byte of each of ``pages`` of it, stopped: (its pid, the region's address, the
    region). The child is killed and the region closed after."""
    region = mmap.mmap(-1, PAGES * PAGE_SIZE, flags=mmap.MAP_PRIVATE)
    region[:] = os.urandom(PAGES * PAGE_SIZE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        for page in pages:
            region[page * PAGE_SIZE] ^= 0xFF
        os.write(w, b"k")
        os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(0)
    try:
        assert os.read(r, 1) == b"k"
        os.waitpid(pid, os.WUNTRACED)
        yield pid, addr, region
    finally:
        os.close(r)
        os.close(w)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        region.close()


def test_a_childs_pages_that_are_its_parents_are_those_neither_wrote() -> None:
    """A child forked from this process writes two pages of a region they share; the rest is
    still one frame for both, and only where asked."""
    with child_that_wrote({3, 70}) as (pid, addr, _):
        got = parent_frames(pid, os.getpid(), [(addr, PAGES)], [(addr, addr + PAGES * PAGE_SIZE)])
        pages = {(a - addr) // PAGE_SIZE + k for a, n in got or [] for k in range(n)}
        assert pages == set(range(PAGES)) - {3, 70}
        assert parent_frames(pid, os.getpid(), [(addr, PAGES)], [(addr, addr + 8 * PAGE_SIZE)]) == \
            [(addr, 3), (addr + 4 * PAGE_SIZE, 4)]
        assert shared_with_parent(pid, os.getpid()) >= (PAGES - 2) * PAGE_SIZE


UNPRIVILEGED = """
import ctypes, mmap, os, signal, sys
from precopy.parent_frames import parent_frames, parent_pages_records, shared_with_parent
os.setgid(65534); os.setuid(65534)
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)          # dumpable again after the setuid
region = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE)
region[:] = os.urandom(64 * 4096)
addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
pid = os.fork()
if pid == 0:
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)
    if sys.argv[1] == "writes":
        region[::4096] = bytes(64)          # every page its own copy
    os.kill(os.getpid(), signal.SIGSTOP)
    os._exit(0)
os.waitpid(pid, os.WUNTRACED)
print(parent_frames(pid, os.getpid(), [(addr, 64)], [(addr, addr + 64 * 4096)]), shared_with_parent(pid, os.getpid()))
os.kill(pid, signal.SIGKILL)
"""


def test_without_the_right_to_read_frames_nothing_is_said_shared() -> None:
    """Frames read as 0 without CAP_SYS_ADMIN: every entry would look the same, so nothing is
    said (None: the restore compares). A child whose every page is mapped once (it wrote them
    all) holds none of its parent's, which pagemap says without frames: none, and that is
    known (the restore writes them without comparing)."""
    for child, said in (("reads", ["None", "0"]), ("writes", ["[]", "0"])):
        res = subprocess.run([sys.executable, "-c", UNPRIVILEGED, child], capture_output=True, text=True,
                             timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == said, child


def test_parent_pages_records_say_when_they_name_every_shared_page() -> None:
    """Where the source read the frames, its records say they are complete, one with no range
    if the child shares nothing with its parent: the restore then writes the child's other
    pages without reading what it holds. Where it could not tell, nothing is said."""
    assert parent_pages_records([], complete=True) == [ParentPages((), complete=1)]
    assert parent_pages_records([]) == []
    runs = [(0x10000 + 2 * i * PAGE_SIZE, 1) for i in range(MAX_PARENT_RANGES + 1)]
    records = parent_pages_records(runs, complete=True)
    assert [len(r.ranges) for r in records] == [MAX_PARENT_RANGES, 1] and all(r.complete for r in records)
    assert ParentPages.from_wire(records[1].to_wire()) == records[1]
    assert ParentPages.from_wire({k: v for k, v in records[1].to_wire().items() if k != "complete"}).complete == 0


def frames(pid: int, addr: int, pages: int) -> list[int]:
    """The page frame numbers pagemap gives for ``pages`` pages of ``pid`` at ``addr``."""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(addr // PAGE_SIZE * 8)
        data = f.read(pages * 8)
    return [int.from_bytes(data[i:i + 8], "little") & ((1 << 55) - 1) for i in range(0, len(data), 8)]


@pytest.mark.parametrize("pin", [False, True])
def test_reading_a_childs_pages_unpinned_leaves_what_it_shares_shared(pin: bool) -> None:
    """A tree's pages are read without pinning (``PageReader(pin=False)``): the pages a child
    wrote since its fork, its alone, are pinned (no copy comes of it), those it still shares
    with its parent are read through /proc/PID/mem, and stay one frame for both. Every page
    reads as the child holds it. Pinned, the shared ones would each become a copy (the
    contrast, so the test shows what it guards)."""
    from precopy.reader import PageReader
    written = set(range(0, PAGES, 3))
    with child_that_wrote(written) as (pid, addr, region):
        expected = bytearray(region[:])
        for page in written:
            expected[page * PAGE_SIZE] ^= 0xFF
        with PageReader(pid, pin=pin, batch_bytes=16 * PAGE_SIZE) as reader:
            data = b"".join(bytes(b.data) for b in reader.batches([(addr, PAGES)]))
        assert data == bytes(expected)
        mine, its = frames(pid, addr, PAGES), frames(os.getpid(), addr, PAGES)
        still = {p for p in range(PAGES) if mine[p] == its[p]}
        assert still == (set() if pin else set(range(PAGES)) - written)
