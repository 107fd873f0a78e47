"""NUMA memory policies (agent/mempolicy.py): what a destination without a policy's nodes does.

Carrying itself is checked end to end by the ckpt_numa workload (tests/test_checkpoint.py,
tests/test_migrate.py): each thread and each mapping finds its own policy, and the state
checker compares every mapping's policy as numa_maps shows it from each thread.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from agent import mempolicy
from agent.sched import id_mask
from tests._migration import moved
from tests._workloads import become_subreaper, edit_records, kcr, one_error_line, reap, start_until_ready
from transport.errors import RestoreError
from transport.schema import ThreadState


def _absent() -> int:
    return max(mempolicy.memory_nodes()) + 1


def test_a_policy_naming_a_node_this_host_lacks_is_refused_or_kept_with_the_rest() -> None:
    missing = _absent()
    nodes = id_mask({0, missing})
    with pytest.raises(RestoreError, match=f"naming nodes {missing}, which hostB has no memory on"):
        mempolicy.usable(mempolicy.MPOL_BIND, 0, nodes, what="thread 7", pid=7, host="hostB", affinity="refuse")
    mode, flags, kept, said = mempolicy.usable(mempolicy.MPOL_BIND, 0, nodes, what="thread 7", pid=7, host="hostB",
                                               affinity="warn", here={0})
    assert (mode, flags, kept) == (mempolicy.MPOL_BIND, 0, b"\x01")
    assert said is not None and f"lacks nodes {missing}, so it runs under bind:0" in said
    # None of its nodes left: the default policy, said so.
    mode, _, kept, said = mempolicy.usable(mempolicy.MPOL_INTERLEAVE, 0, id_mask({missing}), what="x",
                                           pid=7, host="hostB", affinity="warn", here={0})
    assert (mode, kept) == (mempolicy.MPOL_DEFAULT, b"") and said is not None and "default policy" in said
    # MPOL_F_STATIC_NODES: the kernel uses those of its nodes it has, here as on the source.
    static = mempolicy.MPOL_F_STATIC_NODES
    assert mempolicy.usable(mempolicy.MPOL_BIND, static, nodes, what="x", pid=7, host="h", affinity="refuse",
                            here={0})[3] is None
    assert mempolicy.missing_nodes({0}, "hostB", 7, "refuse") is None
    with pytest.raises(RestoreError, match="--affinity warn"):
        mempolicy.missing_nodes({missing}, "hostB", 7, "refuse")
    assert "keep the nodes hostB has" in (mempolicy.missing_nodes({missing}, "hostB", 7, "warn") or "")


def test_policies_read_back_as_ranges_and_words() -> None:
    bind, pref = mempolicy.MPOL_BIND, mempolicy.MPOL_PREFERRED
    found = [(0x3000, 0x4000, bind, 0, b"\x01"), (0x1000, 0x2000, bind, 0, b"\x01"), (0x2000, 0x3000, bind, 0, b"\x01"),
             (0x5000, 0x6000, 0, 0, b""), (0x6000, 0x7000, pref, mempolicy.MPOL_F_RELATIVE_NODES, b"\x01")]
    got = mempolicy.ranges(found)
    assert [(p.start, p.end, p.mode) for p in got] == [(0x1000, 0x4000, bind), (0x6000, 0x7000, pref)]
    assert mempolicy.describe(bind, mempolicy.MPOL_F_STATIC_NODES, b"\x05") == "bind=static:0,2"
    assert mempolicy.split(mempolicy.MPOL_INTERLEAVE | mempolicy.MPOL_F_STATIC_NODES, b"\x03\0\0\0") == (
        mempolicy.MPOL_INTERLEAVE, mempolicy.MPOL_F_STATIC_NODES, b"\x03")
    with pytest.raises(ValueError, match="mode 9"):
        mempolicy.split(9, b"")


BOUND = ("import ctypes, sys, os, time\nlibc = ctypes.CDLL(None, use_errno=True)\nmask = ctypes.c_ulong(1)\n"
         "assert libc.syscall(238, 2, ctypes.byref(mask), 65) == 0\n"       # set_mempolicy(MPOL_BIND, {0})
         "open(sys.argv[1], 'w').close()\n"
         "while not os.path.exists(sys.argv[2]):\n    time.sleep(0.01)\n"
         "mode, got = ctypes.c_int(), (ctypes.c_ulong * 16)()\n"
         "assert libc.syscall(239, ctypes.byref(mode), got, 1024, 0, 0) == 0\n"
         "sys.exit(0 if (mode.value, got[0]) == (2, 1) else 1)\n")


def test_a_restore_where_a_policy_names_a_missing_node_refuses_or_warns(tmp_path: Path) -> None:
    """An image of a thread bound to node 0 and to one this host lacks (as another host's image
    would be): refused by default, naming the node; under --affinity warn it runs bound to
    node 0, and the report says which node it runs without."""
    become_subreaper()
    ready, go, image = tmp_path / "ready", tmp_path / "go", tmp_path / "img"
    proc = start_until_ready([sys.executable, "-S", "-c", BOUND, str(ready), str(go)], ready)
    res = kcr("checkpoint", str(proc.pid), "-o", str(image))
    assert res.returncode == 0, res.stderr.decode()
    assert proc.wait(timeout=30) == -9
    missing = _absent()
    image.write_bytes(edit_records(image.read_bytes(), ThreadState.TYPE, mempolicy_nodes=id_mask({0, missing})))
    line = one_error_line(kcr("restore", "-i", str(image), "--trust-image", "--new-pid").stderr)
    assert f"NUMA policy bind:0,{missing}, naming nodes {missing}," in line and "--affinity warn" in line, line
    res = kcr("restore", "-i", str(image), "--trust-image", "--new-pid", "--affinity", "warn", "--json")
    assert res.returncode == 0, res.stderr.decode()
    result = json.loads(res.stdout)
    assert any(f"lacks nodes {missing}, so it runs under bind:0" in w for w in result["warnings"]), result["warnings"]
    go.touch()
    status = reap(int(result["pid"]))
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


# A tree sharing MAP_SHARED|MAP_ANONYMOUS memory of 6 pages: the parent binds them all, then
# interleaves pages 2-3 (its own mapping splits; the child's stays one mapping, whose start and
# end show the bind policy only). After the move each process reads every page's policy.
SHARED_RANGES = """
import ctypes, mmap, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
P = mmap.PAGESIZE
m = mmap.mmap(-1, 6 * P, mmap.MAP_SHARED)
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
def mbind(page, pages, mode):
    mask = ctypes.c_ulong(1)
    assert libc.syscall(237, ctypes.c_void_p(base + page * P), ctypes.c_ulong(pages * P), mode,
                        ctypes.byref(mask), 65, 0) == 0, os.strerror(ctypes.get_errno())
def policies():
    out = []
    for i in range(6):
        mode, nodes = ctypes.c_int(), (ctypes.c_ulong * 16)()
        assert libc.syscall(239, ctypes.byref(mode), nodes, 1024, ctypes.c_void_p(base + i * P), 2) == 0
        out.append((mode.value, nodes[0]))
    return out
d, go = sys.argv[1], os.environ["WORKLOAD_HOLD"]
child = os.fork()
if child == 0:
    while not os.path.exists(go):
        time.sleep(0.01)
    with open(os.path.join(d, "child"), "w") as f:
        f.write(repr(policies()))
    os._exit(0)
mbind(0, 6, 2)
mbind(2, 2, 3)
m[:] = b"x" * len(m)
open(os.path.join(d, "ready"), "w").close()
while not os.path.exists(go):
    time.sleep(0.01)
_, status = os.waitpid(child, 0)
with open(os.path.join(d, "child")) as f:
    theirs = f.read()
mine = repr(policies())
with open(os.path.join(d, "output"), "w") as f:
    f.write(mine + " " + theirs + "\\n")
sys.exit(0 if status == 0 and mine == theirs == repr([(2, 1), (2, 1), (3, 1), (3, 1), (2, 1), (2, 1)]) else 1)
"""


def test_ranges_of_shared_memory_with_their_own_policies_keep_them(tmp_path: Path) -> None:
    """The policy of shared memory is the object's, per range: a checkpointed and restored tree
    finds each range's policy again at every address of it, in the process that set them and in
    the one whose single mapping spans them all."""
    from tests.test_trees import checkpointed_and_restored
    become_subreaper()
    script = tmp_path / "ranges.py"
    script.write_text(SHARED_RANGES)
    proc = start_until_ready([sys.executable, "-S", str(script), str(tmp_path)], tmp_path / "ready",
                             start_new_session=True, env={**os.environ, "WORKLOAD_HOLD": str(tmp_path / "go")})
    checkpointed_and_restored(proc, tmp_path, 2, release=tmp_path / "go")
    want = repr([(2, 1), (2, 1), (3, 1), (3, 1), (2, 1), (2, 1)])
    assert (tmp_path / "output").read_text() == f"{want} {want}\n"


MAPS_MEMFD = ("import ctypes, mmap, os, sys, time\nlibc = ctypes.CDLL(None, use_errno=True)\nP = mmap.PAGESIZE\n"
              "m = mmap.mmap(int(sys.argv[3]), 6 * P, mmap.MAP_SHARED)\n"
              "base = ctypes.addressof(ctypes.c_char.from_buffer(m))\n"
              "open(sys.argv[1], 'w').close()\n"
              "while not os.path.exists(sys.argv[2]):\n    time.sleep(0.01)\n"
              "out = []\n"
              "for i in range(6):\n"
              "    mode, nodes = ctypes.c_int(), (ctypes.c_ulong * 16)()\n"
              "    assert libc.syscall(239, ctypes.byref(mode), nodes, 1024, ctypes.c_void_p(base + i * P), 2) == 0\n"
              "    out.append((mode.value, nodes[0]))\n"
              "print(out)\n")


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_ranges_of_a_memfd_set_by_a_process_that_stays_are_found_and_kept(tmp_path: Path, how: str) -> None:
    """This test binds pages 0-1 of a memfd and interleaves pages 2-3 through a mapping of its
    own, unmapped again, then hands the memfd to a process that maps it whole: no mapping of the
    job begins or ends where the policies change, yet moved it finds each page's policy again."""
    import ctypes
    import mmap
    become_subreaper()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    page = mmap.PAGESIZE
    ready, go = tmp_path / "ready", tmp_path / "go"
    fd = os.memfd_create("kcr-policies")
    try:
        os.ftruncate(fd, 6 * page)
        at = libc.mmap(None, 6 * page, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        assert at not in (None, ctypes.c_void_p(-1).value)
        for first, mode in ((0, mempolicy.MPOL_BIND), (2, mempolicy.MPOL_INTERLEAVE)):
            mask = ctypes.c_ulong(1)
            assert libc.syscall(237, ctypes.c_void_p(at + first * page), ctypes.c_ulong(2 * page), mode,
                                ctypes.byref(mask), 65, 0) == 0, os.strerror(ctypes.get_errno())
        assert libc.munmap(ctypes.c_void_p(at), ctypes.c_size_t(6 * page)) == 0
        with open(tmp_path / "out", "wb") as out:
            proc = start_until_ready([sys.executable, "-S", "-c", MAPS_MEMFD, str(ready), str(go), str(fd)], ready,
                                     pass_fds=(fd,), stdout=out)
    finally:
        os.close(fd)
    pid = moved(proc, how, tmp_path)
    go.touch()
    status = reap(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert (tmp_path / "out").read_text() == f"{[(2, 1), (2, 1), (3, 1), (3, 1), (0, 0), (0, 0)]}\n"


MANY_MAPPINGS = 4500          # more than one stop of policy questions holds (2,048 with a 64-bit nodemask)
MANY_POLICIES = ("import ctypes, mmap, os, sys, time\nlibc = ctypes.CDLL(None, use_errno=True)\nP = mmap.PAGESIZE\n"
                 "libc.mmap.restype = ctypes.c_void_p\n"
                 "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,"
                 " ctypes.c_long]\n"
                 "n = int(sys.argv[3])\n"
                 "base = libc.mmap(None, 2 * n * P, 3, 0x22, -1, 0)\n"
                 # every other page mapped (unmapped gaps: no two merge), each written, every
                 # third default, bound or preferred, every seventh interleaved on top
                 "for i in range(n):\n"
                 "    at = base + 2 * i * P\n"
                 "    libc.munmap(ctypes.c_void_p(at + P), P)\n"
                 "    ctypes.memset(at, i % 251, 8)\n"
                 "    mode = 3 if i % 7 == 0 else (0, 2, 1)[i % 3]\n"
                 "    if mode:\n"
                 "        mask = ctypes.c_ulong(1)\n"
                 "        assert libc.syscall(237, ctypes.c_void_p(at), ctypes.c_ulong(P), mode, ctypes.byref(mask),"
                 " 65, 0) == 0, os.strerror(ctypes.get_errno())\n"
                 "open(sys.argv[1], 'w').close()\n"
                 "while not os.path.exists(sys.argv[2]):\n    time.sleep(0.01)\n"
                 "modes = []\n"
                 "for i in range(n):\n"
                 "    mode, nodes = ctypes.c_int(), (ctypes.c_ulong * 16)()\n"
                 "    at = base + 2 * i * P\n"
                 "    assert libc.syscall(239, ctypes.byref(mode), nodes, 1024, ctypes.c_void_p(at), 2) == 0\n"
                 "    assert ctypes.c_ubyte.from_address(at).value == i % 251\n"
                 "    modes.append(mode.value)\n"
                 "print(','.join(map(str, modes)))\n")


@pytest.mark.parametrize("how", ["checkpoint", "live"])
def test_thousands_of_mappings_keep_each_its_own_policy(tmp_path: Path, how: str) -> None:
    """A process of 4,500 one-page mappings, a third bound to node 0, a third preferring it,
    every seventh interleaved, the rest default: moved, each mapping has its own policy and
    contents still (the freeze asks them in a few stops of thousands, most answers alike)."""
    become_subreaper()
    ready, go = tmp_path / "ready", tmp_path / "go"
    with open(tmp_path / "out", "wb") as out:
        proc = start_until_ready([sys.executable, "-S", "-c", MANY_POLICIES, str(ready), str(go), str(MANY_MAPPINGS)],
                                 ready, stdout=out, timeout=120)
    pid = moved(proc, how, tmp_path)
    go.touch()
    status = reap(pid)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    want = [3 if i % 7 == 0 else (0, 2, 1)[i % 3] for i in range(MANY_MAPPINGS)]
    assert (tmp_path / "out").read_text() == ",".join(map(str, want)) + "\n"
