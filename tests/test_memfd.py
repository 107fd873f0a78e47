"""memfds and deleted files a process holds open and maps: after a checkpoint and restore the fd
and every shared mapping of it are one file again, with its contents, size, name and seals."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests._migration import migrate_cli
from tests._workloads import Workload, become_subreaper, kcr, one_error_line, reap
from tests._state import assert_same_state, snapshot
from tests.test_checkpoint import checkpoint_and_restore
from tests.test_trees import checkpoint, image_restored, tree


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    become_subreaper()


# Each process makes: a sealable memfd of 4400 bytes (seals: no grow, no shrink) mapped shared
# in part (its first page) and privately (its tail page, written to); a memfd made without
# MFD_ALLOW_SEALING (so F_SEAL_SEAL) mapped whole; an O_TMPFILE file mapped shared in part and
# privately whole (written to); memfds sealed F_SEAL_FUTURE_WRITE under a writable mapping and
# F_SEAL_WRITE before a read-only one. With "fork", a child made after the mappings
# shares them and the fds. After the restore (at "go") each writes through the fd and
# reads through the mapping, and the reverse, and reports what it sees.
# The end of both jobs: with mode "fork" a child (forked after the state was made, so sharing
# it) and the parent each report once the restore is done, the parent after what its
# ``after_child`` checks; then the verdict.
FORK_AND_REPORT = r"""
child = 0
if mode == "fork":
    child = os.fork()
with open(os.path.join(out_dir, "child" if child == 0 and mode == "fork" else "output"), "w") as out:
    if child or mode != "fork":
        open(os.path.join(out_dir, ".ready"), "w").close()     # closed before it shows: the state is read then
        os.rename(os.path.join(out_dir, ".ready"), os.path.join(out_dir, "ready"))
    while not os.path.exists(os.path.join(out_dir, "go")):     # made after the restore
        time.sleep(0.01)
    if mode == "fork" and child == 0:
        report("child", out)
        os._exit(0)
    if child:
        os.waitpid(child, 0)
        after_child(out)
    report("parent", out)
with open(os.path.join(out_dir, ".verdict"), "w") as v:
    v.write("PASS\n")
os.replace(os.path.join(out_dir, ".verdict"), os.path.join(out_dir, "verdict"))
"""

MEMFD_WORKLOAD = r"""
import fcntl, hashlib, mmap, os, sys, time
out_dir, mode = sys.argv[1], sys.argv[2]
tail = bytes(range(256)) * 17 + b"t" * 48           # 4400 bytes
fd = os.memfd_create("kcr-test", os.MFD_ALLOW_SEALING)
os.write(fd, tail)
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
os.lseek(fd, 1234, os.SEEK_SET)
m = mmap.mmap(fd, 4096)
plain = os.memfd_create("plain", 0)
os.write(plain, b"p" * 8192)
pm = mmap.mmap(plain, 8192)
tmp = os.open(out_dir, os.O_TMPFILE | os.O_RDWR, 0o640)
os.write(tmp, b"q" * 10000)
tm = mmap.mmap(tmp, 4096, offset=4096)
cm = mmap.mmap(fd, 304, offset=4096, access=mmap.ACCESS_COPY)    # private: the tail page
cm[0:3] = b"COW"
tc = mmap.mmap(tmp, 10000, access=mmap.ACCESS_COPY)              # private, the whole file
tc[4096:4099] = b"cow"
fw = os.memfd_create("future", os.MFD_ALLOW_SEALING)       # written through a mapping made before the seal
os.write(fw, b"f" * 4096)
fm = mmap.mmap(fw, 4096)
fcntl.fcntl(fw, fcntl.F_ADD_SEALS, 0x10 | fcntl.F_SEAL_SEAL)     # F_SEAL_FUTURE_WRITE
ro = os.memfd_create("ro", os.MFD_ALLOW_SEALING)           # sealed, then mapped read-only
os.write(ro, b"r" * 4096)
fcntl.fcntl(ro, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
rm = mmap.mmap(ro, 4096, access=mmap.ACCESS_READ)

def report(who, out):
    lines = []
    os.pwrite(fd, b"via-fd", 100)
    lines.append(bytes(m[100:106]))
    m[200:206] = b"via-mm"
    lines.append(os.pread(fd, 6, 200))
    lines.append(hashlib.sha256(os.pread(fd, 4400, 0)).hexdigest())
    lines.append(os.pread(fd, 304, 4096) == tail[4096:])
    lines.append((os.fstat(fd).st_size, os.lseek(fd, 0, os.SEEK_CUR)))
    lines.append(fcntl.fcntl(fd, fcntl.F_GET_SEALS))
    for grow in (lambda: os.ftruncate(fd, 8192), lambda: os.ftruncate(fd, 10), lambda: os.pwrite(fd, b"x", 4400)):
        try:
            grow()
            lines.append("not sealed")
        except OSError as exc:
            lines.append(exc.errno)
    lines.append(os.readlink(f"/proc/self/fd/{fd}"))
    lines.append(fcntl.fcntl(plain, fcntl.F_GET_SEALS))
    try:
        fcntl.fcntl(plain, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        lines.append("sealed anew")
    except OSError as exc:
        lines.append(exc.errno)
    os.pwrite(plain, b"P", 8000)
    pm[10:11] = b"Z"
    lines.append((bytes(pm[8000:8001]), os.pread(plain, 1, 10)))
    os.pwrite(tmp, b"T", 5000)
    tm[10:11] = b"U"
    lines.append((bytes(tm[5000 - 4096:5001 - 4096]), os.pread(tmp, 1, 4106), os.fstat(tmp).st_size,
                  os.pread(tmp, 4, 9996)))
    lines.append((bytes(cm[0:4]), bytes(cm[300:304]), os.pread(fd, 3, 4096)))
    lines.append((bytes(tc[4095:4100]), hashlib.sha256(tc[:]).hexdigest(), os.pread(tmp, 3, 4096)))
    fm[0:1] = who[0].encode()
    lines.append((bytes(fm[0:1]), os.pread(fw, 1, 0), fcntl.fcntl(fw, fcntl.F_GET_SEALS)))
    for write in (lambda: os.pwrite(fw, b"x", 1), lambda: mmap.mmap(fw, 4096), lambda: os.pwrite(ro, b"x", 1),
                  lambda: mmap.mmap(ro, 4096), lambda: fcntl.fcntl(fw, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)):
        try:
            write()
            lines.append("not sealed")
        except OSError as exc:
            lines.append(exc.errno)
    lines.append((bytes(rm[0:2]), fcntl.fcntl(ro, fcntl.F_GET_SEALS)))
    lines.append(sorted({line.split(None, 5)[5].strip() for line in open("/proc/self/maps")
                         if "memfd:" in line}))
    out.write("".join(f"{who} {x!r}\n" for x in lines))
    out.flush()


def after_child(out):
    # what the child wrote is in the one file and the one mapping
    out.write(f"after child {bytes(m[100:106])!r} {os.pread(fd, 6, 200)!r}\n")
    os.pwrite(fd, b"zzzzzz", 100)
    os.pwrite(fd, b"zzzzzz", 200)
""" + FORK_AND_REPORT


def _run(tmp_path: Path, where: str, mode: str, move: bool, live: bool = False, script: str | None = None) -> Workload:
    text = MEMFD_WORKLOAD if script is None else script
    script_path = tmp_path / f"memfd-{where}.py"
    script_path.write_text(text)
    w = Workload("memfd", tmp_path / where,
                 argv=[sys.executable, "-S", str(script_path), str(tmp_path / where / "memfd"), mode])
    if not move:
        (w.dir / "go").touch()
    w.start()
    if move and mode == "fork":
        w.wait_ready()
        before = tree(w.pid)
        checkpoint(w.pid, tmp_path / "tree.img", 2)
        assert w.reap_original() == -9
        new_pid = image_restored(tmp_path / "tree.img", before)
        (w.dir / "go").touch()
        assert w.verdict() == "PASS", (w.dir / "stderr").read_text()
        assert os.WEXITSTATUS(reap(new_pid)) == 0
    elif live:
        w.wait_ready()
        before = snapshot(w.pid)
        code, report, err = migrate_cli(f"{w.pid}@localhost", "localhost")
        assert code == 0, err
        assert w.reap_original() == -9
        assert_same_state(before, snapshot(report["new_pid"]))      # the whole state, the memfds' too
        (w.dir / "go").touch()
        assert w.verdict() == "PASS", (w.dir / "stderr").read_text()
        assert os.WEXITSTATUS(reap(report["new_pid"])) == 0
    elif move:
        w.wait_ready()
        before = snapshot(w.pid)
        new_pid, _ = checkpoint_and_restore(w, tmp_path)
        assert_same_state(before, snapshot(new_pid))
        (w.dir / "go").touch()
        assert w.verdict() == "PASS", (w.dir / "stderr").read_text()
        assert os.WEXITSTATUS(reap(new_pid)) == 0
    else:
        assert w.verdict() == "PASS"
        w.reap_original()
    return w


@pytest.mark.parametrize("mode,live", [("alone", False), ("fork", False), ("alone", True)],
                         ids=["checkpoint", "tree-checkpoint", "live"])
def test_memfd_held_and_mapped_stays_one_file(tmp_path: Path, mode: str, live: bool) -> None:
    """Through checkpoint and restore (one process; a parent and child sharing the mappings and
    fds), and live from a host to itself (under a new pid; carried while frozen)."""
    ref = _run(tmp_path, "reference", mode, move=False)
    w = _run(tmp_path, "restored", mode, move=True, live=live)
    out = w.output()
    assert out == ref.output()
    assert "parent b'via-fd'\nparent b'via-mm'\n" in out
    assert "parent True\nparent (4400, 1234)\nparent 6\nparent 1\nparent 1\nparent 1\n" in out
    assert "parent '/memfd:kcr-test (deleted)'\nparent 1\nparent 1\n" in out      # F_SEAL_SEAL kept
    assert "parent (b'P', b'Z')\n" in out
    assert "parent (b'T', b'U', 10000, b'qqqq')\n" in out
    assert "parent (b'p', b'p', 17)\nparent 1\nparent 1\nparent 1\nparent 1\nparent 1\n" in out
    assert "parent (b'rr', 8)\n" in out
    assert "parent (b'COW\\x03', b'tttt', b'\\x00\\x01\\x02')\n" in out
    assert "parent (b'qcowq', " in out
    assert ("parent ['/memfd:future (deleted)', '/memfd:kcr-test (deleted)', '/memfd:plain (deleted)', "
            "'/memfd:ro (deleted)']\n") in out
    if mode == "fork":
        child = (w.dir / "child").read_text()
        assert child == (ref.dir / "child").read_text()
        assert "child b'via-fd'\nchild b'via-mm'\n" in child
        assert "after child b'via-fd' b'via-mm'\n" in out


# Mapped with ctypes and the fds closed (Python's mmap would keep an fd): a sealable memfd of
# 4400 bytes (seals: no grow, no shrink) mapped shared in its first page only; a memfd mapped
# privately and written to (copy on write); an O_TMPFILE file mapped privately. With "fork", a
# child made after the mappings shares the shared one. After the move (at "go") each process
# writes through the shared mapping and reads what the other wrote; the file, opened again
# through /proc/self/map_files, shows its whole contents (the unmapped tail too), size and seals.
MAPPED_ONLY = r"""
import ctypes, fcntl, hashlib, os, sys, time
out_dir, mode = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]

def mapped(fd, size, flags):
    addr = libc.mmap(None, size, 3, flags, fd, 0)
    assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    os.close(fd)
    return (ctypes.c_char * size).from_address(addr), addr

fd = os.memfd_create("kcr-mapped", os.MFD_ALLOW_SEALING)
os.write(fd, bytes(range(256)) * 17 + b"t" * 48)                # 4400 bytes
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
shared, shared_at = mapped(fd, 4096, 1)                         # MAP_SHARED
fd = os.memfd_create("kcr-private", 0)
os.write(fd, b"p" * 8192)
private, _ = mapped(fd, 8192, 2)                                # MAP_PRIVATE
private[4096:4099] = b"COW"
fd = os.open(out_dir, os.O_TMPFILE | os.O_RDWR, 0o640)
os.write(fd, b"q" * 5000)
tmp, _ = mapped(fd, 5000, 2)

def report(who, out):
    lines = []
    at = 100 if who == "parent" else 200
    shared[at:at + 3] = who[:3].encode()
    lines.append(bytes(shared[0:4]))
    for name in sorted(os.listdir("/proc/self/map_files")):
        link = os.readlink(f"/proc/self/map_files/{name}")
        if "memfd:kcr" in link or link.startswith(out_dir):
            f = os.open(f"/proc/self/map_files/{name}", os.O_RDONLY)
            try:
                seals = fcntl.fcntl(f, fcntl.F_GET_SEALS) if "memfd:" in link else None
            except OSError as exc:
                seals = exc.errno
            data = os.pread(f, 1 << 16, 0)
            lines.append((link.replace(out_dir, "DIR").split("/#")[0], os.fstat(f).st_size, seals,
                          hashlib.sha256(data).hexdigest()[:16] if "kcr-mapped" not in link else data[4096:]))
            os.close(f)
    lines.append((bytes(private[4095:4100]), bytes(private[0:2]), bytes(tmp[4998:5000])))
    held = []
    for n in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{n}"))
        except OSError:
            pass                # listdir's own fd, closed by now
    lines.append([link for link in held if "(deleted)" in link])
    lines.append(sorted({line.split(None, 5)[5].strip().replace(out_dir, "DIR").split("/#")[0]
                         for line in open("/proc/self/maps") if "kcr-" in line or out_dir in line}))
    out.write("".join(f"{who} {x!r}\n" for x in lines))
    out.flush()


def after_child(out):
    out.write(f"after child {bytes(shared[200:203])!r}\n")  # the child's write, in the one mapping
""" + FORK_AND_REPORT


@pytest.mark.parametrize("mode,live", [("alone", False), ("fork", False), ("alone", True)],
                         ids=["checkpoint", "tree-checkpoint", "live"])
def test_memfd_mapped_but_not_held_is_carried(tmp_path: Path, mode: str, live: bool) -> None:
    """A memfd and a deleted file no fd holds, only mappings: made again whole (the part no
    mapping shows too) under their names, with their seals, each mapping mapped from them, and
    no fd left in the process."""
    ref = _run(tmp_path, "reference", mode, move=False, script=MAPPED_ONLY)
    w = _run(tmp_path, "restored", mode, move=True, live=live, script=MAPPED_ONLY)
    out = w.output()
    assert out == ref.output()
    assert "('/memfd:kcr-mapped (deleted)', 4400, 6, " in out            # F_SEAL_SHRINK|F_SEAL_GROW
    assert "t" * 48 + "')\n" in out                    # the tail no mapping shows
    assert "(b'pCOWp', b'pp', b'qq')" in out
    assert "'/memfd:kcr-private (deleted)', 8192, 1, " in out           # no MFD_ALLOW_SEALING: F_SEAL_SEAL
    assert "parent []\n" in out                        # no fd of them in the process
    if mode == "fork":
        child = (w.dir / "child").read_text()
        assert child == (ref.dir / "child").read_text()
        assert "after child b'chi'\n" in out


HUGE = r"""
import os, sys, time
fd = os.memfd_create("huge", os.MFD_HUGETLB)
open(os.path.join(sys.argv[1], ".ready"), "w").close()     # closed before it shows: the state is read then
os.rename(os.path.join(sys.argv[1], ".ready"), os.path.join(sys.argv[1], "ready"))
time.sleep(600)
"""


@pytest.mark.parametrize("script,expected", [
    (HUGE, "is the memfd /memfd:huge of huge pages (MFD_HUGETLB)"),
], ids=["huge-pages"])
def test_refused_in_one_line_and_the_process_runs_on(tmp_path: Path, script: str, expected: str) -> None:
    """A memfd of huge pages (made again, it would be of small pages). (Memfds of any size are
    carried: tests/test_trees.py's test_big_shared_memory_deleted_file_and_memfd.)"""
    try:
        os.close(os.memfd_create("probe", os.MFD_HUGETLB))
    except OSError:
        pytest.skip("this kernel makes no memfds of huge pages (no hugetlbfs)")
    path = tmp_path / "refused.py"
    path.write_text(script)
    w = Workload("refused", tmp_path, argv=[sys.executable, "-S", str(path), str(tmp_path / "refused")])
    w.start()
    w.wait_ready()
    try:
        res = kcr("checkpoint", str(w.pid), "-o", str(tmp_path / "x.img"))
        assert res.returncode != 0
        assert expected in one_error_line(res.stderr)
        os.kill(w.pid, 0)
        assert not (tmp_path / "x.img").exists()
    finally:
        os.kill(w.pid, signal.SIGKILL)
        w.reap_original()


# Two memfds mapped shared: 32 MiB with no fd left (mapped, then closed) and 16 MiB held by an
# fd too, of random bytes. At "go", each mapping and the fd must read as before.
MAPPED_ONCE = r"""
import hashlib, mmap, os, sys, time
out_dir = sys.argv[1]
os.makedirs(out_dir, exist_ok=True)
def memfd(name, size):
    fd = os.memfd_create(name, 0)
    os.write(fd, os.urandom(size))
    return fd, mmap.mmap(fd, size)
fd, only_mapped = memfd("only-mapped", 32 << 20)
os.close(fd)
held, mapped = memfd("held", 16 << 20)
before = (hashlib.sha256(only_mapped).hexdigest(), hashlib.sha256(mapped).hexdigest())
open(os.path.join(out_dir, "ready"), "w").close()
while not os.path.exists(os.path.join(out_dir, "go")):
    time.sleep(0.01)
after = (hashlib.sha256(only_mapped).hexdigest(), hashlib.sha256(mapped).hexdigest())
through_fd = hashlib.sha256(os.pread(held, 16 << 20, 0)).hexdigest()
ok = before == after and through_fd == before[1]
with open(os.path.join(out_dir, "verdict"), "w") as f:
    f.write("PASS" if ok else f"FAIL {before} {after} {through_fd}")
"""


@pytest.mark.parametrize("live", [False, True], ids=["checkpoint", "live"])
def test_a_memfd_mapped_shared_travels_once(tmp_path: Path, live: bool) -> None:
    """A memfd's shared mappings are made again from the memfd, which is carried whole: their
    pages are not sent besides (they were, doubling the image and the freeze)."""
    script = tmp_path / "mapped_once.py"
    script.write_text(MAPPED_ONCE)
    w = Workload("mapped-once", tmp_path, argv=[sys.executable, "-S", str(script), str(tmp_path / "mapped-once")])
    w.start()
    w.wait_ready()
    if live:
        code, report, err = migrate_cli(f"{w.pid}@localhost", "localhost")
        assert code == 0, err
        raw, new_pid = report["bytes_raw"], report["new_pid"]
    else:
        stats = tmp_path / "stats.json"
        res = kcr("checkpoint", str(w.pid), "-o", str(tmp_path / "x.img"), "--stats-json", str(stats))
        assert res.returncode == 0, res.stderr.decode()
        numbers = json.loads(stats.read_text())
        assert numbers["file_bytes"] == 48 << 20
        raw = numbers["bytes_raw"]
    assert raw < 16 << 20, f"{raw >> 20} MiB of pages sent: the memfds' mappings went as pages too"
    assert w.reap_original() == -9
    if not live:
        res = kcr("restore", "-i", str(tmp_path / "x.img"), "--json")
        assert res.returncode == 0, res.stderr.decode()
        new_pid = json.loads(res.stdout)["pid"]
    (w.dir / "go").touch()
    assert w.verdict() == "PASS"
    assert os.WEXITSTATUS(reap(new_pid)) == 0
