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
