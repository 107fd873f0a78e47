"""Signed images (issue 13): a checkpoint signs its image with a key only root can read; restore
refuses an image that does not verify with it (edited, cut short, unsigned, signed with another
key) unless told to trust it, and leaves nothing running; `show` says which.

The first tests take signed streams apart frame by frame in memory; the rest checkpoint and
restore real processes with the CLI, as users do. The session's key is ``KCR_IMAGE_KEY``
(tests/conftest.py); tests that need their own name theirs with --image-key.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import stat
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import msgpack
import pytest

from tests._transport import ImageFrame, example_records, image_frames, image_of, page_batch
from tests._workloads import Workload, become_subreaper, kcr, one_error_line, reap
from transport.errors import ImageKeyError, MigrationError, ProtocolError, TruncatedStream, UntrustedImage
from transport.framing import KIND_PAGES, KIND_RECORD
from transport.image import ImageReader, ImageWriter, Item
from transport.schema import FORMAT_VERSION, PAGE_SIZE, EndOfImage, ImageHeader, Mappings, ProcessState, ThreadState
from transport.signing import (
    DEFAULT_KEY_PATH,
    KEY_ENV,
    MISMATCH,
    NO_KEY,
    UNSIGNED,
    VERIFIED,
    ImageKey,
    ImageVerifier,
    key_path,
    signing_key,
    verifying_key,
)

NOBODY = 65534
KEY = ImageKey("test key", bytes(range(32)))
OTHER_KEY = ImageKey("other key", bytes(range(100, 132)))


# --- the chain, in memory ---------------------------------------------------------------------

def signed_stream(key: ImageKey | None = KEY, *, seed: int = 0) -> bytes:
    """Header, process, layout, four page batches, a thread, the end: signed with ``key``."""
    recs = example_records()
    buf = io.BytesIO()
    writer = ImageWriter(buf, level=1, key=key)
    for rec in (recs[ImageHeader], recs[ProcessState], recs[Mappings]):
        writer.record(rec)
    for i in range(4):
        writer.pages(page_batch(8, seed=seed * 10 + i, addr=0x7F00_0000_0000 + i * 8 * PAGE_SIZE))
    writer.record(recs[ThreadState])
    writer.finish()
    return buf.getvalue()


def read(image: bytes, verifier: ImageVerifier) -> tuple[list[Item], MigrationError | None]:
    """What a reader hands on before it stops, and why it stopped (None: the image is whole)."""
    items: list[Item] = []
    try:
        for item in ImageReader(io.BytesIO(image), verifier=verifier):
            items.append(item)
    except MigrationError as exc:
        return items, exc
    return items, None


def test_a_signed_stream_verifies_frame_by_frame() -> None:
    items, error = read(signed_stream(), verifier := ImageVerifier(KEY))
    assert error is None and verifier.verified and verifier.status == VERIFIED
    assert [type(i).__name__ for i in items] == ["ImageHeader", "ProcessState", "Mappings", *["PageBatch"] * 4,
                                                 "ThreadState", "EndOfImage"]
    assert isinstance(items[0], ImageHeader) and items[0].key_id == KEY.key_id and items[0].format_version == FORMAT_VERSION


def test_a_format_5_image_still_verifies() -> None:
    """Format 5 hashed every frame with SHA-256 and its header had no nonce: such images,
    signed before the change to Poly1305, verify as they are."""
    recs = example_records()
    buf = io.BytesIO()
    writer = ImageWriter(buf, level=1, key=KEY)
    assert writer._signer is not None
    writer._signer.nonce = b""          # what a format 5 signer wrote: no nonce, SHA-256 throughout
    writer.record(dataclasses.replace(recs[ImageHeader], format_version=5))
    writer.pages(page_batch(8))
    writer.finish()
    items, error = read(buf.getvalue(), verifier := ImageVerifier(KEY))
    assert error is None and verifier.verified
    assert isinstance(items[0], ImageHeader) and items[0].sign_nonce == b"" and items[0].format_version == 5
    assert [type(i).__name__ for i in items] == ["ImageHeader", "PageBatch", "EndOfImage"]


def _flip(frame: ImageFrame) -> None:
    data = bytearray(frame.payload)
    data[len(data) // 2] ^= 0x01
    frame.payload = bytes(data)


def _other_image_frame(frames: list[ImageFrame]) -> None:
    frames[4] = image_frames(signed_stream(seed=1))[4]     # the same key, another image


def _strip_one_tag(frames: list[ImageFrame]) -> None:
    frames[2].tag = None


def _strip_every_tag(frames: list[ImageFrame]) -> None:
    for f in frames:
        f.tag = None


# Frames: 0 header, 1 process, 2 layout, 3-6 page batches, 7 thread, 8 end.
EDITS: dict[str, tuple[Callable[[list[ImageFrame]], Any], type[MigrationError], str, int]] = {
    # edit, error, words in it, the first frame that must not be handed on
    "a record's byte": (lambda f: _flip(f[1]), UntrustedImage, "frame 1 does not match its signature", 1),
    "a page batch's byte": (lambda f: _flip(f[4]), UntrustedImage, "frame 4 does not match", 4),
    "a frame dropped": (lambda f: f.pop(4), UntrustedImage, "frame 4 does not match", 4),
    "two frames swapped": (lambda f: f.insert(3, f.pop(4)), UntrustedImage, "frame 3 does not match", 3),
    "a frame from another image": (_other_image_frame, UntrustedImage, "frame 4 does not match", 4),
    "a signature removed": (_strip_one_tag, UntrustedImage, "frame 2 of the signed image has no signature", 2),
    "the end record cut off": (lambda f: f.pop(), TruncatedStream, "ends before its end record", 8),
    "every signature removed": (_strip_every_tag, UntrustedImage, "not signed", 0),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_stream_stops_before_the_edited_frame(edit: str) -> None:
    """Edits anyone can make (crc32s recomputed) are refused, and nothing from the edited frame
    on is handed on: what is, is the signed image's own beginning."""
    change, error, says, first_edited = EDITS[edit]
    image = signed_stream()
    genuine, _ = read(image, ImageVerifier(KEY))
    frames = image_frames(image)
    change(frames)
    items, exc = read(image_of(frames), verifier := ImageVerifier(KEY))
    assert isinstance(exc, error) and says in str(exc), exc
    assert len(items) <= first_edited and items == genuine[:len(items)]
    assert not verifier.verified


def _damaged(image: bytes, frame: int) -> bytes:
    """``image`` with one byte of frame ``frame``'s payload (tags not counted) flipped, and
    its crc32 left as it was: damage by accident, not an edit."""
    from transport.framing import HEADER, HEADER_SIZE, KIND_TAG, STREAM_MAGIC
    off, index = len(STREAM_MAGIC), -1
    while True:
        _, kind, _, length, _ = HEADER.unpack_from(image, off)
        index += kind != KIND_TAG
        if index == frame:
            at = off + HEADER_SIZE + length // 2
            return image[:at] + bytes([image[at] ^ 0x01]) + image[at + 1:]
        off += HEADER_SIZE + length


@pytest.mark.parametrize("key, trust", [(KEY, False), (OTHER_KEY, True), (None, True)],
                         ids=["verified", "trusted, another key", "trusted, no key"])
def test_a_damaged_page_frame_is_called_corrupt(key: ImageKey | None, trust: bool) -> None:
    """A page frame whose tag verifies is not crc-checked again; one whose tag fails, or that is
    not checked by a tag at all (a trusted image), is: damage is named as such, and nothing of
    the frame is handed on."""
    image = _damaged(signed_stream(), 4)
    items, exc = read(image, ImageVerifier(key, trust_image=trust))
    assert isinstance(exc, ProtocolError) and "frame checksum mismatch: the stream is corrupt" in str(exc), exc
    assert len(items) <= 4


def test_the_end_record_signature_is_needed() -> None:
    image = signed_stream()
    items, exc = read(image[:-44], ImageVerifier(KEY))          # the end record's tag frame: 12 + 32 bytes
    assert isinstance(exc, TruncatedStream) and "without its signature" in str(exc)
    assert not any(isinstance(i, EndOfImage) for i in items)
    items, exc = read(image + image[-44:], verifier := ImageVerifier(KEY))
    assert isinstance(exc, ProtocolError) and "after the end" in str(exc)
    assert not verifier.verified


def test_another_key_is_refused_before_anything_is_decoded() -> None:
    items, exc = read(signed_stream(OTHER_KEY), ImageVerifier(KEY))
    assert isinstance(exc, UntrustedImage) and "does not verify with this host's key test key" in str(exc)
    assert "--image-key FILE" in str(exc) and "--trust-image" in str(exc)
    assert items == []


@pytest.mark.parametrize("image, key, status", [
    (signed_stream(OTHER_KEY), KEY, MISMATCH),
    (signed_stream(None), KEY, UNSIGNED),
    (signed_stream(KEY), None, NO_KEY),
], ids=["another key", "unsigned", "no key here"])
def test_a_trusted_image_is_read_whole_and_says_why_it_did_not_verify(image: bytes, key: ImageKey | None,
                                                                       status: str) -> None:
    items, exc = read(image, verifier := ImageVerifier(key, trust_image=True, key_problem="no key file"))
    assert exc is None and len(items) == 9
    assert verifier.status == status and not verifier.verified
    assert verifier.describe().startswith("signature NOT verified: ")
    items, exc = read(image, ImageVerifier(key))                # not trusted: refused at once
    assert isinstance(exc, UntrustedImage) and items == []


async def test_a_live_stream_carries_no_signatures() -> None:
    """The live path is authenticated by its channel: a signature frame in it is refused."""
    from transport.local import socket_pair
    from transport.stream import FramedStream

    a, b = socket_pair()
    async with a, FramedStream(b, frame_timeout=1) as fb:
        await a.send_all(signed_stream())
        await a.send_eof()
        assert isinstance(await fb.receive(timeout=5), ImageHeader)
        with pytest.raises(ProtocolError, match="image signature in a live stream"):
            await fb.receive(timeout=5)


# --- the key file --------------------------------------------------------------------------------

@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder every user may enter (pytest's own are root's alone): what keeps others from
    the key must be the key's own folder and mode."""
    path = Path(tempfile.mkdtemp(prefix="kcr-key-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def test_the_default_key_and_how_to_name_another(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert key_path() == (DEFAULT_KEY_PATH, False) == ("/etc/kcr-migrate/image.key", False)
    monkeypatch.setenv(KEY_ENV, "/srv/cluster/image.key")
    assert key_path() == ("/srv/cluster/image.key", True)
    assert key_path("/opt/k") == ("/opt/k", True)


def test_the_key_is_made_once_0600_in_a_0700_folder(tmp_path: Path) -> None:
    path = tmp_path / "kcr" / "image.key"
    with ThreadPoolExecutor(8) as pool:                       # eight first uses at once: one key
        keys = list(pool.map(lambda _: signing_key(str(path)), range(8)))
    assert keys[0][0] is not None and keys[0][1] == "" and all(k == keys[0] for k in keys)
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0 and st.st_size == 32
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert os.listdir(path.parent) == ["image.key"]            # no temporary file left
    assert verifying_key(str(path))[0] == keys[0][0]


@pytest.mark.parametrize("case, says", [
    ("readable by others", "chmod 600"),
    ("short", "holds 31 bytes, not 32"),
    ("another owner", "belongs to uid 65534, not root"),
    ("a directory", "not a regular file"),
])
def test_an_unsafe_key_file_is_refused(tmp_path: Path, case: str, says: str) -> None:
    path = tmp_path / "image.key"
    if case == "a directory":
        path.mkdir(mode=0o700)
    else:
        path.write_bytes(os.urandom(31 if case == "short" else 32))
        os.chmod(path, 0o644 if case == "readable by others" else 0o600)
        if case == "another owner":
            os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ImageKeyError, match=says):
        signing_key(str(path))
    key, problem = verifying_key(str(path))
    assert key is None and says in problem


def _as_nobody(fn: Callable[[], object]) -> Any:
    """``fn()`` in a child process running as nobody; its JSON-able result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(w, json.dumps(fn()).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    os.waitpid(pid, 0)
    return json.loads(out)


def cannot_read(path: Path) -> bool:
    res = subprocess.run(["cat", str(path)], user=NOBODY, capture_output=True)
    return res.returncode != 0 and b"Permission denied" in res.stderr and res.stdout == b""


def test_only_root_can_read_the_key(open_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user can neither read the key nor sign with it: their checkpoints are unsigned
    (with a warning), and restore cannot verify anything for them."""
    path = open_dir / "kcr" / "image.key"
    assert signing_key(str(path))[0] is not None
    assert cannot_read(path)
    os.chmod(path.parent, 0o755)                               # the file's own mode keeps them out too
    assert cannot_read(path)
    assert _as_nobody(lambda: verifying_key(str(path))[1]) == f"cannot read the image key {path}: permission " \
                                                              "denied (only root can)"
    monkeypatch.delenv(KEY_ENV)           # the default key, as an unprivileged user's checkpoint finds it
    no_key, warning = _as_nobody(lambda: [signing_key()[0] is None, signing_key()[1]])
    assert no_key and warning.startswith(f"the image is not signed: cannot read or create the image key "
                                              f"{DEFAULT_KEY_PATH} (only root can)")
    assert warning.endswith("restoring it will need --trust-image")


# --- real processes through the CLI -------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def subreaper() -> None:
    become_subreaper()


def checkpointed(tmp_path: Path, name: str = "ckpt_array", *args: str, key: Path | None = None,
                 **kw: Any) -> tuple[Workload, Path]:
    """Start ``name``, checkpoint it to a file (killing it), return it and the image."""
    kw.setdefault("scale", 3)
    w = Workload(name, tmp_path / "run", *args, hold=True, **kw)
    w.start()
    w.wait_ready()
    image = tmp_path / "img"
    res = kcr("checkpoint", str(w.pid), "-o", str(image), *(["--image-key", str(key)] if key else []))
    assert res.returncode == 0, res.stderr.decode()
    assert f"signed with {key or os.environ[KEY_ENV]}" in res.stderr.decode()
    w.reap_original()
    return w, image


def runs_and_passes(w: Workload, res: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    """A restore that worked: its JSON result, once the process has finished well."""
    assert res.returncode == 0, res.stderr.decode()
    result: dict[str, Any] = json.loads(res.stdout)
    assert w.verdict() == "PASS", (w.dir / "stderr").read_text()
    assert os.WEXITSTATUS(reap(result["pid"])) == 0
    return result


def left_running(names: set[str]) -> list[int]:
    """Live processes with one of these names (what a refused restore must not leave)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:     # we are subreaper: reap what was abandoned to us
            pass
    except ChildProcessError:
        pass
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            st = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if st[st.index("(") + 1: st.rindex(")")] in names and st[st.rindex(")") + 2] != "Z":
            alive.append(int(pid))
    return alive


def show(image: Path | bytes, *extra: str) -> tuple[dict[str, Any], str]:
    """`kcr-migrate show`: its JSON and its line on stderr."""
    if isinstance(image, bytes):
        res = kcr("show", "-", *extra, input=image)
    else:
        res = kcr("show", str(image), *extra)
    assert res.returncode == 0, res.stderr.decode()
    return json.loads(res.stdout), res.stderr.decode().strip()


def test_a_signed_image_restores_and_show_says_verified(tmp_path: Path, session_image_key: str) -> None:
    w, image = checkpointed(tmp_path, "ckpt_array", "30")
    doc, line = show(image)
    host_key_id = doc["signature"]["key_id"]
    assert doc["signature"] | {"message": ""} == {
        "verified": True, "status": "verified", "key_file": session_image_key, "key_id": host_key_id,
        "image_key_id": host_key_id, "message": ""}
    assert doc["header"]["key_id"] == host_key_id and doc["header"]["format_version"] == FORMAT_VERSION
    assert line == f"kcr-migrate: signature verified with this host's key {session_image_key} (key id {host_key_id})"
    res = kcr("restore", "-i", str(image), "--json")
    assert res.stderr == b""                                       # no warning
    result = runs_and_passes(w, res)
    assert result["pid"] == w.pid and result["image_verified"] is True


def _edit_page_batch(frames: list[ImageFrame]) -> None:
    pages = [f for f in frames if f.kind == KIND_PAGES]
    _flip(pages[len(pages) // 2])


def _edit_thread_record(frames: list[ImageFrame]) -> None:
    thread = next(f for f in frames if f.kind == KIND_RECORD and msgpack.unpackb(f.payload)["t"] == ThreadState.TYPE)
    body = msgpack.unpackb(thread.payload)
    body["regs"]["rip"] += 2                # the process would resume elsewhere
    thread.payload = msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize("edit, says", [
    (_edit_page_batch, "the image was edited after it was signed: frame"),
    (_edit_thread_record, "the image was edited after it was signed: frame"),
    (lambda frames: frames.pop(), "the image ends before its end record: truncated"),
], ids=["a page batch", "a thread record", "truncated"])
def test_an_edited_image_is_refused_and_nothing_is_left_running(tmp_path: Path, edit: Callable[..., None],
                                                                 says: str) -> None:
    """Each edit comes after the restore has begun (the process's memory map is built, pages
    are in): it is refused with one line, the half-built process is gone, and the image as
    signed restores afterwards under the same pid."""
    w, image = checkpointed(tmp_path, "ckpt_array", "30")
    frames = image_frames(image.read_bytes())
    edit(frames)
    line = one_error_line(kcr("restore", "-i", "-", input=image_of(frames)).stderr)
    assert says in line, line
    assert left_running({"kcr-stub", "ckpt_array"}) == []
    result = runs_and_passes(w, kcr("restore", "-i", str(image), "--json"))
    assert result["pid"] == w.pid


def test_an_image_signed_with_another_key(tmp_path: Path, session_image_key: str) -> None:
    """A host of another cluster (another key file): refused, unless its key is named or the
    image is trusted."""
    assert signing_key(session_image_key)[0] is not None         # this host has a key of its own
    other = tmp_path / "other-cluster" / "image.key"
    w, image = checkpointed(tmp_path, "ckpt_array", "30", key=other)
    line = one_error_line(kcr("restore", "-i", str(image)).stderr)
    assert "the image's signature does not verify with this host's key" in line
    assert "--image-key FILE" in line and "--trust-image" in line
    assert left_running({"kcr-stub", "ckpt_array"}) == []
    doc, line = show(image)
    assert doc["signature"]["verified"] is False and doc["signature"]["status"] == "mismatch"
    assert doc["signature"]["image_key_id"] == doc["header"]["key_id"] != doc["signature"]["key_id"]
    assert line.startswith("kcr-migrate: signature NOT verified: ") and "the image names key id" in line
    doc, line = show(image, "--image-key", str(other))           # with that cluster's key
    assert doc["signature"]["verified"] is True and str(other) in line
    res = kcr("restore", "-i", str(image), "--json", "--trust-image")
    assert one_error_line_or_warning(res.stderr).startswith(
        "kcr-migrate: warning: restored an image whose signature was not verified, as trusted: ")
    result = runs_and_passes(w, res)
    assert result["image_verified"] is False


def one_error_line_or_warning(stderr: bytes) -> str:
    """The one line a command printed on stderr (no traceback)."""
    err = stderr.decode()
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _forge_root(frames: list[ImageFrame]) -> None:
    """What the unprivileged user of issue 13 did: credentials of root, every capability root
    has here (one it lacks would make the restore fail anyway)."""
    record = next(f for f in frames if f.kind == KIND_RECORD and msgpack.unpackb(f.payload)["t"] == ProcessState.TYPE)
    body = msgpack.unpackb(record.payload)
    status = Path("/proc/self/status").read_text()
    every_cap = int(status.split("CapEff:")[1].split()[0], 16)
    body["creds"].update(uids=[0, 0, 0, 0], gids=[0, 0, 0, 0], groups=[0], cap_permitted=every_cap,
                         cap_effective=every_cap, cap_inheritable=every_cap, cap_bounding=every_cap)
    record.payload = msgpack.packb(body, use_bin_type=True)


def test_an_image_forged_to_run_as_root_is_refused(tmp_path: Path) -> None:
    """nobody's process, its image edited to claim uid 0 and every capability, crc32s made
    valid again: refused, with its signatures (edited) and without them (unsigned). The image as
    signed restores, and the process is still nobody's."""
    w, image = checkpointed(tmp_path, "ckpt_creds", user=NOBODY, groups=[NOBODY])
    frames = image_frames(image.read_bytes())
    _forge_root(frames)
    for forged, says in ((image_of(frames), "the image was edited after it was signed: frame 1 "),
                         (image_of(frames, tags=False), "the image is not signed")):
        doc, _ = show(forged)                   # a well-formed image that claims root...
        assert doc["process"]["creds"]["uids"] == [0, 0, 0, 0] and doc["signature"]["verified"] is False
        line = one_error_line(kcr("restore", "-i", "-", input=forged).stderr)
        assert says in line and "--trust-image" in line, line     # ...that is not restored
        assert left_running({"kcr-stub", "kcr-creds"}) == []
    runs_and_passes(w, kcr("restore", "-i", str(image), "--json"))
    assert w.output().startswith(f"uid {NOBODY}/{NOBODY}/{NOBODY} gid {NOBODY}/{NOBODY}/{NOBODY} groups 1 caps 0")


def test_an_image_of_the_older_format_restores_with_trust_image(tmp_path: Path) -> None:
    """Format 1 (before signing): no signatures, no key id in its header."""
    w, image = checkpointed(tmp_path, "ckpt_array", "30")
    frames = image_frames(image.read_bytes())
    header = msgpack.unpackb(frames[0].payload)
    del header["key_id"]
    frames[0].payload = msgpack.packb(header | {"format_version": 1}, use_bin_type=True)
    old = image_of(frames, tags=False)
    doc, line = show(old)
    assert doc["header"]["format_version"] == 1 and doc["signature"]["status"] == "unsigned"
    assert line.startswith("kcr-migrate: signature NOT verified: the image is not signed")
    line = one_error_line(kcr("restore", "-i", "-", input=old).stderr)
    assert "the image is not signed" in line and "--trust-image" in line
    res = kcr("restore", "-i", "-", "--trust-image", "--json", input=old)
    assert "as trusted: the image is not signed" in one_error_line_or_warning(res.stderr)
    assert runs_and_passes(w, res)["image_verified"] is False


def test_the_first_checkpoint_makes_the_key_only_root_can_read(tmp_path: Path, open_dir: Path) -> None:
    key = open_dir / "etc" / "kcr-migrate" / "image.key"
    w, image = checkpointed(tmp_path, "ckpt_array", "30", key=key)
    st = key.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_size) == (0o600, 0, 32)
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert cannot_read(key)
    runs_and_passes(w, kcr("restore", "-i", str(image), "--json", "--image-key", str(key)))
