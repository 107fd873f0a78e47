"""Restore grants nothing the restorer does not have (issue 13): what a restore opens for a
process it opens with the process's rights, following no symbolic link, and a user who is
not root restores their own processes with their own credentials only.

The images are real checkpoints, edited the way an attacker with the host's key (or a user
restoring with --trust-image) would, and signed again with the session's host key: the
signature verifies, and only the rule under test stands between the image and the file.
"""
from __future__ import annotations

import ctypes
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest

from tests._workloads import Workload, become_subreaper, kcr, one_error_line, reap
from transport.image import ImageReader, ImageWriter, Item
from transport.pages import PageBatch
from precopy import sysv
from transport.schema import VMA_MAYWRITE, EndOfImage, FileDesc, Files, Mappings, ProcessState, SysvSegment, Vma
from transport.signing import KEY_ENV, ImageVerifier, signing_key

NOBODY = 65534
USER = 1000          # an ordinary user, for the unprivileged restore


@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    become_subreaper()


def checkpointed(tmp_path: Path, user: int | None = None, name: str = "ckpt_array",
                 *args: str) -> tuple[Workload, Path]:
    """ckpt_array (or ``name``) run as ``user``, checkpointed into a signed image (and killed)."""
    w = Workload(name, tmp_path / "run", *(args or (("30",) if name == "ckpt_array" else ())), hold=True, scale=3,
                 user=user, groups=[user] if user is not None else None)
    w.start()
    w.wait_ready()
    image = w.dir / "image"           # where its user may read it
    res = kcr("checkpoint", str(w.pid), "-o", str(image))
    assert res.returncode == 0, res.stderr.decode()
    w.reap_original()
    return w, image


def resigned(image: Path, edit: Callable[[Item], Item]) -> bytes:
    """``image`` with each item passed through ``edit``, signed again with the host's key."""
    key = signing_key(os.environ[KEY_ENV])[0]
    assert key is not None
    out = io.BytesIO()
    writer = ImageWriter(out, key=key)
    with open(image, "rb") as src:
        for item in ImageReader(src, verifier=ImageVerifier(key)):
            item = edit(item)
            if isinstance(item, PageBatch):
                writer.pages(item)
            elif not isinstance(item, EndOfImage):
                writer.record(item)
    writer.finish()
    return out.getvalue()


def with_fd_on(path: str) -> Callable[[Item], Item]:
    def edit(item: Item) -> Item:
        if isinstance(item, Files):
            fd = max(f.fd for f in item.fds) + 1
            return replace(item, fds=(*item.fds, FileDesc(fd, "file", path, os.O_RDONLY, 0)))
        return item
    return edit


def with_cwd(path: str) -> Callable[[Item], Item]:
    return lambda item: replace(item, cwd=path) if isinstance(item, ProcessState) else item


def nothing_left(w: Workload) -> None:
    """The refused restore left no process under the pid (its half-built one, killed, is our
    child to reap: the tests are subreaper)."""
    try:
        os.waitpid(w.pid, 0)
    except ChildProcessError:
        pass
    assert not Path(f"/proc/{w.pid}").exists()


def restores_and_passes(w: Workload, image: Path | bytes, *extra: str) -> dict[str, Any]:
    if isinstance(image, bytes):
        res = kcr("restore", "-i", "-", "--json", *extra, input=image)
    else:
        res = kcr("restore", "-i", str(image), "--json", *extra)
    assert res.returncode == 0, res.stderr.decode()
    result: dict[str, Any] = json.loads(res.stdout)
    assert w.verdict() == "PASS", (w.dir / "stderr").read_text()
    assert os.WEXITSTATUS(reap(result["pid"])) == 0
    return result


@pytest.mark.parametrize("edit, path, says", [
    (with_fd_on("/etc/shadow"), "/etc/shadow", "cannot open /etc/shadow (fd "),
    (with_cwd("/root"), "/root", "cannot open /root (its working directory)"),
], ids=["an fd on /etc/shadow", "a working directory in /root"])
def test_a_signed_image_claiming_roots_files_for_nobody_is_refused(tmp_path: Path, edit: Callable[[Item], Item],
                                                                   path: str, says: str) -> None:
    """nobody's process, its image given an fd on /etc/shadow (or a working directory in
    /root) and signed again with the host's key: the signature verifies, and the restore
    still refuses in one line naming the path and the permission problem, leaving nothing."""
    w, image = checkpointed(tmp_path, user=NOBODY)
    forged = resigned(image, edit)
    res = kcr("restore", "-i", "-", input=forged)
    line = one_error_line(res.stderr)
    assert says in line and f"as the process's uid {NOBODY}" in line and "Permission denied" in line, line
    nothing_left(w)
    restores_and_passes(w, image)


def test_a_signed_image_attaching_roots_sysv_segment_for_nobody_is_refused(tmp_path: Path) -> None:
    """nobody's image given an attachment of root's private SysV segment (mode 600) on this
    host, signed again: the stub attached it as root, but the restore refuses before the
    process gets anything, and the segment is root's as before."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
    shmid = libc.shmget(0, 4096, 0o1600)             # IPC_PRIVATE, IPC_CREAT | 0600
    assert shmid >= 0, os.strerror(ctypes.get_errno())
    try:
        w, image = checkpointed(tmp_path, user=NOBODY)
        seg = SysvSegment(shmid=shmid, key=0, size=4096, mode=0o600, uid=0, gid=0, host=sysv.host_ipc())
        attach = Vma(0x6000_0000_0000, 0x6000_0000_1000, 3, True, "anon", ino=shmid, shm=seg, advice=VMA_MAYWRITE)
        forged = resigned(image, lambda item: replace(item, vmas=tuple(sorted((*item.vmas, attach), key=lambda v: v.start)))
                          if isinstance(item, Mappings) else item)
        line = one_error_line(kcr("restore", "-i", "-", input=forged).stderr)
        assert f"cannot attach SysV shared memory segment {shmid} (mode 600, owner 0:0) as the process's uid " \
               f"{NOBODY}" in line and "Permission denied" in line, line
        nothing_left(w)
        assert sysv.read_table()[shmid].nattch == 0
        restores_and_passes(w, image)
    finally:
        libc.shmctl(shmid, 0, None)                   # IPC_RMID


def test_a_symlink_swapped_in_after_the_checkpoint_is_not_followed(tmp_path: Path) -> None:
    """root's process writes its stdout to a file; after the checkpoint the file becomes a
    symbolic link to /etc/shadow (root could open that, so only the rule stops it): refused,
    naming the path; with the file back, the image restores."""
    w, image = checkpointed(tmp_path)
    out = w.dir / "stdout"
    aside = w.dir / "stdout.real"
    out.rename(aside)
    out.symlink_to("/etc/shadow")
    line = one_error_line(kcr("restore", "-i", str(image)).stderr)
    assert f"cannot open {out} (fd 1)" in line and "a symbolic link is in its path here" in line, line
    nothing_left(w)
    assert Path("/etc/shadow").stat().st_size > 0 and os.readlink(out) == "/etc/shadow"
    out.unlink()
    aside.rename(out)
    restores_and_passes(w, image)


def test_a_fifo_restore_makes_is_made_with_the_processs_rights_and_is_its_own(tmp_path: Path) -> None:
    """nobody's FIFO, gone after the checkpoint, is made again by nobody: not in a directory
    only root may write (refused in one line, nothing made), and in its own directory owned by
    nobody with its permissions."""
    w, image = checkpointed(tmp_path, NOBODY, "ckpt_fifo")
    fifo = w.dir / "fifo"
    fifo.unlink()
    os.chown(w.dir, 0, 0)                        # a directory nobody may not write in
    line = one_error_line(kcr("restore", "-i", str(image)).stderr)
    assert f"cannot make the FIFO {fifo} here as the process's uid {NOBODY}" in line and "Permission denied" in line
    nothing_left(w)
    assert not fifo.exists()
    os.chown(w.dir, NOBODY, NOBODY)
    restores_and_passes(w, image)
    st = fifo.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (NOBODY, NOBODY, 0o640)


# --- a user who is not root --------------------------------------------------------------------

def as_user(*argv: str, caps: bool, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """``kcr-migrate ARGV`` run by uid ``USER`` (with CAP_CHECKPOINT_RESTORE as an ambient
    capability if ``caps``), in a mount namespace where this Python is reachable by that user
    (the test's interpreter may live under /root, which is 0700)."""
    prefix = Path(sys.base_prefix)
    where = Path("/run/kcr-test-python")
    site = [p for p in sys.path if p.startswith(str(prefix)) and p.endswith("site-packages")]
    python = where / Path(sys.executable).relative_to(prefix)
    pythonpath = [os.getcwd(), *(str(where / Path(p).relative_to(prefix)) for p in site)]
    setpriv = ["setpriv", f"--reuid={USER}", f"--regid={USER}", f"--groups={USER}"]
    if caps:
        setpriv += ["--inh-caps", "+checkpoint_restore", "--ambient-caps", "+checkpoint_restore"]
    script = ('mkdir -p "$1" && mount --bind "$2" "$1" && shift 2 && exec "$@"')
    env = {**os.environ, "PYTHONPATH": ":".join(pythonpath), "HOME": "/tmp"}
    return subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", str(where), str(prefix), *setpriv,
                           str(python), "-m", "migrate", *argv], input=input, capture_output=True, env=env,
                          timeout=120, cwd="/")


def unprivileged_restore_works() -> str:
    """Why a user cannot restore here ("" where they can)."""
    if not shutil.which("setpriv") or not shutil.which("unshare"):
        return "setpriv or unshare is missing (util-linux)"
    res = as_user("--help", caps=True)
    if res.returncode != 0:
        return f"uid {USER} cannot run this Python with CAP_CHECKPOINT_RESTORE: {res.stderr.decode()[-200:]}"
    return ""


def test_a_user_restores_their_own_process_with_their_own_credentials_only(tmp_path: Path) -> None:
    """uid 1000 checkpointed their process (their image, signed by root's agent here): without
    CAP_CHECKPOINT_RESTORE one line says what is missing; with it (ambient, as a site would
    grant it to a restore tool) the process runs again as theirs. The same image edited to
    claim root and trusted is refused in one line: the user gives only what they have."""
    why = unprivileged_restore_works()
    if why:
        pytest.skip(why)
    w, image = checkpointed(tmp_path, user=USER)
    os.chown(image, USER, USER)
    line = one_error_line(as_user("restore", "-i", str(image), "--trust-image", caps=False).stderr)
    assert "restoring a process needs root, or the capability CAP_CHECKPOINT_RESTORE" in line, line
    root = resigned(image, lambda item: replace(item, creds=replace(item.creds, uids=(0, 0, 0, 0)))
                    if isinstance(item, ProcessState) else item)
    line = one_error_line(as_user("restore", "-i", "-", "--trust-image", caps=True, input=root).stderr)
    assert "the image's process runs as uid 0" in line and f"this restore runs as uid {USER}" in line, line
    nothing_left(w)
    res = as_user("restore", "-i", str(image), "--trust-image", "--json", caps=True)
    assert res.returncode == 0, res.stderr.decode()
    pid = json.loads(res.stdout)["pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    assert f"Uid:\t{USER}\t{USER}\t{USER}\t{USER}" in status
    assert w.verdict() == "PASS", (w.dir / "stderr").read_text()
    assert os.WEXITSTATUS(reap(pid)) == 0
