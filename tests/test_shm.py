"""Host-local shared memory a job uses, carried: SysV segments (by id, key, owner, permissions
and contents, attached again at their addresses with their protection, a removed one removed
again) and files of /dev/shm (made again at their path with their contents, or used as they
are where the destination sees the very file). A parent and child count in them before and
after the move (tests/workloads/shm_counter.c) and must end as an unmoved run does, every
segment under its id."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import Iterator

import pytest

from precopy import sysv
from tests._migration import copies, proc_state, wait_gone
from tests._workloads import Workload, become_subreaper, kcr, one_error_line, reap
from tests.test_trees import checkpoint, image_restored, tree

libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
IPC_PRIVATE, IPC_CREAT, IPC_RMID, SHM_HUGETLB = 0, 0o1000, 0, 0o4000

OUTPUT = ("child exit 0 ro-attachment 1 writes kept 1\n"
          "segment 0: counter 4000, same through its id 1, stat 0 size 8192 mode 600 uid 0 gid 0 nattch 3 key 0\n"
          "segment 1: counter 4000, same through its id 1, stat 0 size 5000 mode 640 uid 0 gid 0 nattch 2 key its own\n"
          "segment 2: counter 4000, same through its id 1, stat 0 size 8192 mode 1600 uid 0 gid 0 nattch 2 key 0\n"
          "key finds the same id: 1\nsplit attachment: writable again 1, detached whole 1\ndetach: 1\n"
          "file: counter 4000 through fd 4000 mode 640 size 8192 by name 1\n")


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    become_subreaper()


@pytest.fixture(autouse=True)
def no_segments_left(tmp_path: Path) -> Iterator[None]:
    """A failed test's processes (a child its dead parent left) are killed, and the segments
    they leave are removed."""
    before = set(sysv.read_table())
    yield
    for pid in copies(str(tmp_path)):
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
    while SHM_FILES:
        SHM_FILES.pop().unlink(missing_ok=True)
    for shmid, line in sysv.read_table().items():
        if shmid not in before and not line.nattch:
            libc.shmctl(shmid, IPC_RMID, None)


SHM_FILES: list[Path] = []        # the workloads' /dev/shm files, removed after each test


def workload(tmp_path: Path, where: str) -> Workload:
    """The workload with a key and a /dev/shm name of its own."""
    n = len(list(tmp_path.parent.iterdir())) + os.getpid() + len(where)
    w = Workload("shm_counter", tmp_path / where, hex(0x6B630000 | n & 0xFFFF), f"/kcr-test-{n}-{where}")
    w.shm_file = Path(f"/dev/shm/kcr-test-{n}-{where}")     # type: ignore[attr-defined]
    SHM_FILES.append(w.shm_file)                            # type: ignore[attr-defined]
    return w


def attachments(pid: int) -> list[tuple[int, int, str]]:
    """(start, id, protection) of each SysV attachment of ``pid``."""
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith("/SYSV"):
            out.append((int(fields[0].split("-")[0], 16), int(fields[4]), fields[1]))
    return out


def test_unmoved_run_reports_what_the_moved_ones_must(tmp_path: Path) -> None:
    w = workload(tmp_path, "reference")
    (w.dir / "go").touch()
    w.start()
    assert w.verdict() == "PASS", (w.dir / "stderr").read_text()
    w.reap_original()
    assert w.output() == OUTPUT


def test_checkpoint_and_restore_elsewhere_makes_segments_and_file_again(tmp_path: Path) -> None:
    """What the killed job leaves on this host (its segments not removed, its /dev/shm file)
    is removed after the checkpoint, as on another host: restore makes each segment again
    under its id and key, with its contents, the removed one removed again, and the file at
    its path with its mode and contents; every attachment at its address with its protection."""
    w = workload(tmp_path, "moved")
    w.start()
    w.wait_ready()
    before = tree(w.pid)
    child = next(p for p in before if p != w.pid)
    attached = {p: attachments(p) for p in before}
    assert len(attached[w.pid]) == 4 and len(attached[child]) == 5     # one attachment in two pieces
    assert [p for _, _, p in attached[child]].count("r--s") == 2
    ids = {i for a in attached.values() for _, i, _ in a}
    checkpoint(w.pid, tmp_path / "shm.img", 2)
    assert w.reap_original() == -9
    for shmid in ids:
        libc.shmctl(shmid, IPC_RMID, None)
    w.shm_file.unlink()                                     # type: ignore[attr-defined]
    image_restored(tmp_path / "shm.img", before)
    assert {p: attachments(p) for p in before} == attached
    assert oct(w.shm_file.stat().st_mode & 0o7777) == "0o640"     # type: ignore[attr-defined]
    (w.dir / "go").touch()
    assert w.verdict() == "PASS", (w.dir / "stderr").read_text()
    assert os.WEXITSTATUS(reap(w.pid)) == 0
    assert w.output() == OUTPUT


def test_restore_refuses_a_taken_id_and_another_file(tmp_path: Path) -> None:
    """Another segment under a segment's id, another file at the /dev/shm path: restore
    refuses in one line naming it, and leaves both alone (nothing of the job is made)."""
    w = workload(tmp_path, "moved")
    w.start()
    w.wait_ready()
    before = tree(w.pid)
    ids = sorted({i for p in before for _, i, _ in attachments(p)})
    table = sysv.read_table()
    removed = next(i for i in ids if table[i].segment.removed)
    kept = [i for i in ids if i != removed]
    checkpoint(w.pid, tmp_path / "shm.img", 2)
    assert w.reap_original() == -9
    from tests.test_trees import reap_orphans
    reap_orphans([p for p in before if before[p]])
    # Another program's file at the path.
    w.shm_file.unlink()                                     # type: ignore[attr-defined]
    w.shm_file.write_bytes(b"another program's")            # type: ignore[attr-defined]
    res = kcr("restore", "-i", str(tmp_path / "shm.img"))
    assert res.returncode != 0
    line = one_error_line(res.stderr)
    assert str(w.shm_file) in line and "does not overwrite" in line, line   # type: ignore[attr-defined]
    assert w.shm_file.read_bytes() == b"another program's"                  # type: ignore[attr-defined]
    for p in before:        # the half-restored processes were killed
        wait_gone(p)
    # The removed segment (gone with the killed job) was made again for the restore, and went
    # with it; the others, left by the killed job, were used as they are and stay.
    assert removed not in sysv.read_table() and set(kept) <= set(sysv.read_table())
    w.shm_file.unlink()                                     # type: ignore[attr-defined]
    # Another segment under a segment's id.
    libc.shmctl(kept[0], IPC_RMID, None)
    with open("/proc/sys/kernel/shm_next_id", "w") as f:
        f.write(str(kept[0]))
    other = libc.shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0o600)
    try:
        assert other == kept[0]
        res = kcr("restore", "-i", str(tmp_path / "shm.img"))
        assert res.returncode != 0
        line = one_error_line(res.stderr)
        assert f"SysV shared memory id {kept[0]} is taken" in line, line
        assert sysv.read_table()[other].segment.size == 4096
        assert not w.shm_file.exists()                      # type: ignore[attr-defined]
        for p in before:
            wait_gone(p)
    finally:
        libc.shmctl(other, IPC_RMID, None)
        for shmid in ids:
            libc.shmctl(shmid, IPC_RMID, None)


HUGE_SEGMENT = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
out = sys.argv[1]
shmid = libc.shmget(0, 2 << 20, 0o1000 | 0o4000 | 0o600)      # IPC_CREAT | SHM_HUGETLB
assert shmid >= 0, os.strerror(ctypes.get_errno())
addr = libc.shmat(shmid, None, 0)
libc.shmctl(shmid, 0, None)                                   # removed once it is detached
counter = ctypes.c_long.from_address(addr)
counter.value = 41
open(os.path.join(out, "ready"), "w").close()
while not os.path.exists(os.path.join(out, "go")):
    time.sleep(0.01)
counter.value += 1
with open(os.path.join(out, "output"), "w") as f:
    f.write(f"{counter.value}\n")
os.rename(os.path.join(out, "output"), os.path.join(out, "verdict"))
"""


@pytest.fixture
def a_huge_page() -> Iterator[None]:
    """One 2 MiB huge page reserved while the test runs (vm.nr_hugepages as it was after)."""
    knob = Path("/proc/sys/vm/nr_hugepages")
    before = int(knob.read_text())
    try:
        knob.write_text(str(before + 1))
    except OSError as exc:
        pytest.skip(f"cannot reserve a huge page (vm.nr_hugepages: {exc.strerror})")
    try:
        if int(knob.read_text()) <= before:
            pytest.skip("the kernel gave no huge page (vm.nr_hugepages did not grow): no SHM_HUGETLB segment")
        yield
    finally:
        knob.write_text(str(before))


def test_a_segment_of_huge_pages_is_refused_and_the_job_runs_on(tmp_path: Path, a_huge_page: None) -> None:
    script = tmp_path / "huge.py"
    script.write_text(HUGE_SEGMENT)
    w = Workload("huge", tmp_path, argv=[sys.executable, "-S", str(script), str(tmp_path / "huge")])
    w.start()
    w.wait_ready()
    res = kcr("checkpoint", str(w.pid), "-o", str(tmp_path / "huge.img"))
    assert res.returncode != 0
    line = one_error_line(res.stderr)
    assert "SysV shared memory segment of huge pages (SHM_HUGETLB" in line, line
    assert proc_state(w.pid) in ("S", "R")
    (w.dir / "go").touch()
    assert w.verdict() == "42"
    assert w.reap_original() == 0


def test_pages_of_a_segment_the_source_still_attaches_are_left_out() -> None:
    """A live migration onto the host of a segment (its source still running on it): the pages
    sent for it are dropped, the rest of each batch goes in as it was."""
    from agent.restore import _without
    from transport.pages import PageBatch
    page = 4096
    data = b"".join(bytes([i]) * page for i in range(6))
    batch = PageBatch(((0x10000, 3), (0x20000, 3)), data)
    out = _without(batch, [(0x11000, 0x12000), (0x20000, 0x22000)])
    assert out.runs == ((0x10000, 1), (0x12000, 1), (0x22000, 1))
    assert out.data == bytes([0]) * page + bytes([2]) * page + bytes([5]) * page


def test_the_pieces_of_one_attachment_are_attached_once() -> None:
    from agent.restore import _attachments
    from transport.schema import SysvSegment, Vma
    seg = SysvSegment(shmid=7, key=0, size=3 * 4096, mode=0o600, uid=0, gid=0)
    a = Vma(0x10000, 0x11000, 3, True, "anon", ino=7, shm=seg)
    b = Vma(0x11000, 0x13000, 1, True, "anon", pgoff=0x1000, ino=7, shm=seg)
    again = Vma(0x13000, 0x16000, 1, True, "anon", ino=7, shm=seg)    # a second shmat, right after
    heap = Vma(0x16000, 0x17000, 3, False, "heap")
    assert _attachments([a, b, again, heap]) == [[a, b], [again], [heap]]


@pytest.mark.parametrize("change,why", [
    (dict(end=0x14000), "past the end of SysV segment 7"),
    (dict(shared=False), "a SysV segment attached other than shared"),
    (dict(ino=8), "a SysV segment attached other than shared"),
])
def test_an_image_attaching_a_segment_wrongly_is_refused(change: dict, why: str) -> None:
    """Images are untrusted: an attachment past its segment's end, or not shared, is refused
    when the layout is decoded."""
    from dataclasses import replace

    from transport.errors import ProtocolError
    from transport.schema import Mappings, SysvSegment, Vma
    seg = SysvSegment(shmid=7, key=0, size=5000, mode=0o600, uid=0, gid=0)
    good = Vma(0x10000, 0x12000, 3, True, "anon", ino=7, shm=seg)
    Mappings.from_wire(Mappings((good,)).to_wire())
    with pytest.raises(ProtocolError, match=why):
        Mappings.from_wire(Mappings((replace(good, **change),)).to_wire())


@pytest.mark.parametrize("path", ["/etc/passwd", "/dev/shm/../etc/passwd", "/dev/shm/dir/file", "/dev/shm/", "/dev/shm/.."])
def test_an_image_naming_a_file_outside_dev_shm_is_refused(path: str) -> None:
    """A carried file is made only directly in /dev/shm (restore runs as root)."""
    from transport.errors import ProtocolError
    from transport.schema import FileContents
    ok = FileContents(id=5, size=3, offset=0, data=b"abc", path="/dev/shm/psm_1234")
    FileContents.from_wire(ok.to_wire())
    wire = {**ok.to_wire(), "path": path}
    with pytest.raises(ProtocolError, match="is not a file of /dev/shm/"):
        FileContents.from_wire(wire)


def test_preflight_refuses_an_id_or_key_another_segment_holds_here() -> None:
    """The destination's preflight (``dest_check``) against segments of another host: one
    whose id, or key, a segment here holds is refused naming it; the very segment (this
    host's, a host to itself) passes."""
    from agent.shared_memory import check_segments
    from transport.errors import RestoreError
    from transport.schema import SysvSegment
    key = 0x6B620000 | os.getpid() & 0xFFFF
    here = libc.shmget(key, 4096, IPC_CREAT | 0o600)
    assert here >= 0
    try:
        mine = sysv.read_table()[here].segment
        check_segments([mine], "vm")                                  # this very segment
        elsewhere = SysvSegment(shmid=here, key=0, size=4096, mode=0o600, uid=0, gid=0, host="other-boot ipc:[1]")
        with pytest.raises(RestoreError, match=f"SysV shared memory id {here} is taken on vm by another segment"):
            check_segments([elsewhere], "vm")
        free = max(sysv.read_table()) + 1
        same_key = SysvSegment(shmid=free, key=key, size=4096, mode=0o600, uid=0, gid=0, host="other-boot ipc:[1]")
        with pytest.raises(RestoreError, match=f"SysV shared memory key {key:#x} is taken on vm by segment {here}"):
            check_segments([same_key], "vm")
    finally:
        libc.shmctl(here, IPC_RMID, None)


BIG_FILE = r"""
import mmap, os, sys, time
out, path = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
os.ftruncate(fd, 1 << 30)
m = mmap.mmap(fd, 1 << 30)
m[0:5] = b"hello"
m[-5:] = b"world"
open(os.path.join(out, "ready"), "w").close()
while not os.path.exists(os.path.join(out, "go")):
    time.sleep(0.01)
with open(os.path.join(out, "output"), "w") as f:
    f.write((m[0:5] + m[-5:]).decode())
os.unlink(path)
os.rename(os.path.join(out, "output"), os.path.join(out, "verdict"))
"""


def test_a_big_sparse_dev_shm_file_is_carried_in_slices(tmp_path: Path) -> None:
    """A 1 GiB file of /dev/shm (once refused: over 16 MiB) with a page written at each end goes
    in slices, those of zeros left out, and is made again at its path and size, the job's
    writes in it, once the source's is removed (as on another host)."""
    script = tmp_path / "big.py"
    script.write_text(BIG_FILE)
    path = Path(f"/dev/shm/kcr-test-big-{os.getpid()}")
    SHM_FILES.append(path)
    w = Workload("big", tmp_path, argv=[sys.executable, "-S", str(script), str(tmp_path / "big"), str(path)])
    w.start()
    w.wait_ready()
    res = kcr("checkpoint", str(w.pid), "-o", str(tmp_path / "big.img"))
    assert res.returncode == 0, res.stderr.decode()
    assert "1.0 MiB of files carried whole" in res.stderr.decode()      # the first slice, the last page
    assert w.reap_original() == -9
    path.unlink()
    res = kcr("restore", "-i", str(tmp_path / "big.img"))
    assert res.returncode == 0, res.stderr.decode()
    assert path.stat().st_size == 1 << 30
    (w.dir / "go").touch()
    assert w.verdict() == "helloworld"
    assert os.WEXITSTATUS(reap(w.pid)) == 0


UNLINKED = r"""
import os, sys, time
out, path = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
os.write(fd, b"kept unlinked")
os.unlink(path)
open(os.path.join(out, "ready"), "w").close()
while not os.path.exists(os.path.join(out, "go")):
    time.sleep(0.01)
with open(os.path.join(out, "output"), "w") as f:
    f.write(os.pread(fd, 13, 0).decode() + f" links {os.fstat(fd).st_nlink}")
os.rename(os.path.join(out, "output"), os.path.join(out, "verdict"))
"""


def test_a_dev_shm_file_held_after_unlink_comes_back_unlinked(tmp_path: Path) -> None:
    """An fd on a file of /dev/shm unlinked since (multiprocessing's heap arenas under spawn):
    /proc shows its old name with " (deleted)", and restore made a file of that very name in
    /dev/shm besides the unlinked copy the process got. It is a deleted file: made again
    unlinked, and nothing is left in /dev/shm."""
    script = tmp_path / "unlinked.py"
    script.write_text(UNLINKED)
    path = Path(f"/dev/shm/kcr-test-unlinked-{os.getpid()}")
    stray = Path(f"{path} (deleted)")
    SHM_FILES.extend([path, stray])
    w = Workload("unlinked", tmp_path, argv=[sys.executable, "-S", str(script), str(tmp_path / "unlinked"), str(path)])
    w.start()
    w.wait_ready()
    res = kcr("checkpoint", str(w.pid), "-o", str(tmp_path / "unlinked.img"))
    assert res.returncode == 0, res.stderr.decode()
    assert w.reap_original() == -9
    res = kcr("restore", "-i", str(tmp_path / "unlinked.img"))
    assert res.returncode == 0, res.stderr.decode()
    assert not stray.exists() and not path.exists()
    (w.dir / "go").touch()
    assert w.verdict() == "kept unlinked links 0"
    assert os.WEXITSTATUS(reap(w.pid)) == 0
