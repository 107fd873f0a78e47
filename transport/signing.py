"""Signed images: the key that signs them, and the MAC chained over their frames.

crc32s catch accidents, not edits: anyone who can read an image can change it (a process's
credentials, its memory) and recompute them. So a checkpoint signs its image with a key only
root can read, and restore refuses an image whose signature does not verify with it.

The key is 32 random bytes in a file: ``--image-key FILE``, else ``$KCR_IMAGE_KEY``, else
``/etc/kcr-migrate/image.key`` (configuration, like /etc/munge/munge.key: a cluster shares one
file, copied to every host). The first checkpoint on a host creates it: mode 0600 in a folder
of mode 0700, written whole under a temporary name and linked into place, so two first
checkpoints at once end with one key. A key file others may read or write, or that belongs to
another user, is refused (as ssh refuses such private keys).

The chain. Frame i of an image (header, payload) is followed by a TAG frame holding::

    d_0   = SHA-256(frame header_0 || payload_0)         (the image header; 12-byte frame header:
                                                          kind, flags, length, crc)
    d_i   = Poly1305(k_i, frame header_i || payload_i)   i > 0 (format 6; SHA-256 before)
    k_i   = HMAC-SHA256(key, FRAME_KEY || nonce || i)     nonce: 16 random bytes of this image,
                                                          in its header (``sign_nonce``)
    tag_i = HMAC-SHA256(key, tag_(i-1) || d_i)           tag_(-1) = HMAC-SHA256(key, START)

Each tag covers its frame and, through tag_(i-1), every frame before it: frames cannot be
edited, dropped, reordered or taken from another image, and the end record's tag covers the
whole stream, so an image cut short lacks it. It streams: the reader checks each frame as it
arrives, before decoding it. Checking frame i needs only tag_(i-1) and tag_i as stored, so page
frames are checked in the worker threads that decompress them (SHA-256 runs at ~2 GB/s per
core here; the chain step hashes 64 bytes); a frame is handed on only once it and every frame
before it have verified.

Why Poly1305: SHA-256 hashes ~1-2 GB/s per core here, as slow as reading and writing the
pages themselves; Poly1305 runs at 4-8 GB/s, in each worker at once (``transport.poly1305``).
A page frame whose tag verified has its crc32 left unchecked: the tag covers the same bytes
(``transport.image``). It is a one-time MAC: its key must be secret
and never used twice, which k_i is (drawn from the secret key, the image's own nonce and the
frame's place), and d_i is never seen outside the HMAC. The header frame keeps SHA-256: the
nonce is in it, so a reader checks it before it knows the nonce.
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import os
import secrets
import stat
import tempfile
import threading
from dataclasses import field
from typing import Iterable

from transport.errors import ImageKeyError, UntrustedImage
from transport.frozen import frozen

DEFAULT_KEY_PATH = "/etc/kcr-migrate/image.key"
KEY_ENV = "KCR_IMAGE_KEY"
KEY_LEN = 32
_START = b"kcr-migrate signed image, format 2"
_KEY_ID = b"kcr-migrate image key id"
_FRAME_KEY = b"kcr-migrate frame key, format 6"
NONCE_LEN = 16

# What ImageVerifier found (`kcr-migrate show` reports it as "signature"."status").
VERIFIED = "verified"      # every frame verified with this host's key
UNSIGNED = "unsigned"      # the image has no signature
NO_KEY = "no-key"          # signed, but this host has no usable key to check it with
MISMATCH = "mismatch"      # signed, and it does not verify with this host's key


def key_path(path: str | None = None) -> tuple[str, bool]:
    """The key file to use, and whether it was named (option, library, environment) rather
    than the default."""
    if path:
        return path, True
    env = os.environ.get(KEY_ENV)
    if env:
        return env, True
    return DEFAULT_KEY_PATH, False


@frozen
class ImageKey:
    path: str
    secret: bytes = field(repr=False)

    @property
    def key_id(self) -> str:
        """A name for the key that reveals nothing of it: tells keys apart in messages and headers."""
        return hmac.new(self.secret, _KEY_ID, "sha256").hexdigest()[:16]


def load_key(path: str) -> ImageKey:
    """Read a key file. OSErrors (missing, permission denied) come as they are; a file that is
    unsafe or not a key raises ImageKeyError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageKeyError(f"image key {path} is not a regular file")
        if st.st_uid not in (0, os.geteuid()):
            raise ImageKeyError(f"image key {path} belongs to uid {st.st_uid}, not root: whoever owns it can sign "
                                f"images; chown root {path} (and replace the key if it may have leaked)")
        if st.st_mode & 0o077:
            raise ImageKeyError(f"image key {path} can be read or written by others (mode "
                                f"{stat.S_IMODE(st.st_mode):04o}): whoever reads it can sign images; chmod 600 "
                                f"{path} (and replace the key if it may have leaked)")
        data = os.read(fd, KEY_LEN + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_LEN:
        raise ImageKeyError(f"image key {path} holds {len(data)} bytes, not {KEY_LEN}: not a kcr-migrate key "
                            f"(make one with `head -c {KEY_LEN} /dev/urandom > {path}; chmod 600 {path}`)")
    return ImageKey(path, data)


def create_key(path: str) -> ImageKey:
    """Make a new key at ``path`` (its folder, if missing, with mode 0700) unless one appears
    there meanwhile; return the key that is there."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".image-key-", dir=folder)       # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_LEN))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)           # whole or not there; never replaces a key made meanwhile
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return load_key(path)


def _why(exc: OSError) -> str:
    return exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))


def signing_key(path: str | None = None) -> tuple[ImageKey | None, str]:
    """The key a checkpoint signs with, created on first use. Where the default key can be
    neither read nor made by this user (only root can), (None, a warning): the image is
    written unsigned. A key named explicitly must work; an unsafe key file never does."""
    where, named = key_path(path)
    try:
        try:
            return load_key(where), ""
        except FileNotFoundError:
            return create_key(where), ""
    except OSError as exc:
        if named:
            raise ImageKeyError(f"cannot read or create the image key {where}: {_why(exc)}") from None
        who = " (only root can)" if os.geteuid() != 0 else ""
        return None, (f"the image is not signed: cannot read or create the image key {where}{who}: {_why(exc)}; "
                      "restoring it will need --trust-image")


def verifying_key(path: str | None = None) -> tuple[ImageKey | None, str]:
    """This host's key for checking images (never made here), or (None, why there is none)."""
    where, _ = key_path(path)
    try:
        return load_key(where), ""
    except FileNotFoundError:
        return None, (f"this host has no image key at {where} (a host's first checkpoint makes one; hosts of "
                      "a cluster share one file: copy it here, or name it with --image-key FILE)")
    except PermissionError:
        return None, f"cannot read the image key {where}: permission denied (only root can)"
    except OSError as exc:
        return None, f"cannot read the image key {where}: {_why(exc)}"
    except ImageKeyError as exc:
        return None, str(exc)


def frame_digest(header: bytes | bytearray | memoryview, parts: Iterable[bytes | bytearray | memoryview]) -> bytes:
    """SHA-256 of a frame as written: its header, then its payload (given in parts)."""
    h = hashlib.sha256(header)
    for part in parts:
        h.update(part)
    return h.digest()


Parts = Iterable[bytes | bytearray | memoryview]


def frame_mac(secret: bytes, nonce: bytes, index: int, header: bytes | bytearray | memoryview,
              parts: Parts) -> bytes:
    """Poly1305 of frame ``index`` (> 0) of the image with ``nonce``, under its own key."""
    from transport.poly1305 import poly1305       # (ctypes: only images need it, not every command)
    return poly1305(hmac.digest(secret, _FRAME_KEY + nonce + index.to_bytes(8, "little"), "sha256"),
                    (header, *parts))


def _digest(secret: bytes, nonce: bytes, index: int, header: bytes | bytearray | memoryview,
            parts: Parts) -> bytes:
    """d_i: what a frame's tag covers (SHA-256 for the header and for images without a nonce)."""
    if index == 0 or not nonce:
        return frame_digest(header, parts)
    return frame_mac(secret, nonce, index, header, parts)


def _chain(secret: bytes, prev: bytes, digest: bytes) -> bytes:
    return hmac.digest(secret, prev + digest, "sha256")


def _start(secret: bytes) -> bytes:
    return hmac.digest(secret, _START, "sha256")


class ImageSigner:
    """The tags of one image being written, frame after frame."""

    def __init__(self, key: ImageKey) -> None:
        self.key = key
        self.nonce = secrets.token_bytes(NONCE_LEN)      # goes in the header (``sign_nonce``)
        self._prev = _start(key.secret)

    def digest(self, index: int, header: bytes | bytearray | memoryview, parts: Parts) -> bytes:
        """d_i of frame ``index`` (0: the image header): safe in worker threads."""
        return _digest(self.key.secret, self.nonce, index, header, parts)

    def sign(self, digest: bytes) -> bytes:
        """The tag of the next frame, given its ``digest``."""
        self._prev = _chain(self.key.secret, self._prev, digest)
        return self._prev


TRUST_ADVICE = "restore it only if you trust where it came from, with --trust-image"


class ImageVerifier:
    """Checks one image's signature as ``ImageReader`` reads it.

    Unless ``trust_image``, an image that is unsigned, cannot be checked (no key here) or
    does not verify raises ``UntrustedImage`` before the frame concerned is decoded; with
    it, the outcome is only recorded. Either way ``status``, ``message`` and ``verified``
    tell it afterwards (``verified`` only once the whole image, end record included, has).
    ``check`` may run in several worker threads at once: each frame is checked on its own
    (against the tags stored beside it), and the reader raises the errors in frame order."""

    def __init__(self, key: ImageKey | None = None, *, trust_image: bool = False, key_path: str = "",
                 key_problem: str = "") -> None:
        self.key = key
        self.trust_image = trust_image
        self.key_path = key.path if key is not None else key_path
        self.key_problem = key_problem or "no image key was given"
        self.status = ""
        self.message = ""
        self.complete = False
        self._failed_at: int | None = None
        self._lock = threading.Lock()
        self._start = _start(key.secret) if key is not None else b""
        self._nonce = b""           # the image's, once its header verified (format 6)

    @classmethod
    def for_host(cls, path: str | None = None, *, trust_image: bool = False) -> ImageVerifier:
        """A verifier with this host's key (``--image-key`` / ``$KCR_IMAGE_KEY`` / the default)."""
        key, problem = verifying_key(path)
        return cls(key, trust_image=trust_image, key_path=key_path(path)[0], key_problem=problem)

    @property
    def verified(self) -> bool:
        return self.status == VERIFIED and self.complete

    def begin(self, signed: bool) -> bool:
        """Whether the image is signed (its first frame has a tag); returns whether tags are
        to be checked."""
        if not signed:
            self._refuse(UNSIGNED, 0, "the image is not signed (a kcr-migrate older than image signing wrote it, "
                                      "or a user who cannot read the image key, or its signatures were removed): "
                                      "anyone may have edited it")
            return False
        if self.key is None:
            self._refuse(NO_KEY, 0, f"the image is signed, but {self.key_problem}: it cannot be verified")
            return False
        self.status = VERIFIED
        return True

    def set_nonce(self, nonce: bytes) -> None:
        """The nonce the verified header holds: frames after it are hashed with Poly1305."""
        self._nonce = nonce

    def digest(self, index: int, header: bytes | bytearray | memoryview, parts: Parts) -> bytes:
        """d_i of frame ``index`` as this image's signer computed it (b"" without a key)."""
        if self.key is None:
            return b""
        return _digest(self.key.secret, self._nonce, index, header, parts)

    def check(self, index: int, prev: bytes | None, tag: bytes | None, digest: bytes) -> bool:
        """Frame ``index`` (0: the header) with ``digest``, between the stored tags ``prev``
        (None for the first frame) and ``tag`` (None: the image lacks it). Whether its tag
        verified (False without a key, or for a trusted image that does not verify)."""
        if self.key is None:
            return False
        failed_at = self._failed_at
        if self.trust_image and failed_at is not None and failed_at < index:
            return False              # trusted, and already unverified: the first failure is what there is to say
        if tag is None:
            self._refuse(MISMATCH, index, f"frame {index} of the signed image has no signature: it was edited "
                                          "(signatures removed)")
            return False
        expected = _chain(self.key.secret, self._start if index == 0 else prev or b"", digest)
        if hmac.compare_digest(expected, tag):
            return True
        if index == 0:
            self._refuse(MISMATCH, 0, f"the image's signature does not verify with this host's key {self.key_path}: "
                                      "it was signed with another key, or edited since",
                         "name the key it was signed with (--image-key FILE), or " + TRUST_ADVICE)
        else:
            self._refuse(MISMATCH, index, f"the image was edited after it was signed: frame {index} does not match "
                                          "its signature")
        return False

    def finish(self) -> None:
        """The end record and its tag were read and checked."""
        self.complete = True

    def _refuse(self, status: str, index: int, message: str, advice: str = TRUST_ADVICE) -> None:
        """Record why the image is not verified (the first frame's reason wins); raise unless trusted."""
        with self._lock:
            if self._failed_at is None or index < self._failed_at:
                self.status, self.message, self._failed_at = status, message, index
        if not self.trust_image:
            raise UntrustedImage(f"{message}; {advice}")

    def describe(self) -> str:
        """One line for people: verified with which key, or why not."""
        if self.verified:
            assert self.key is not None
            return f"signature verified with this host's key {self.key_path} (key id {self.key.key_id})"
        if not self.status:
            return "signature not checked: the image was not read"
        if self.status == VERIFIED:
            return "signature not verified: the image was not read to its end"
        return f"signature NOT verified: {self.message}"

    def as_dict(self) -> dict[str, object]:
        """For `kcr-migrate show`'s JSON."""
        return {"verified": self.verified, "status": self.status, "key_file": self.key_path,
                "key_id": self.key.key_id if self.key is not None else None, "message": self.describe()}


__all__ = ["DEFAULT_KEY_PATH", "KEY_ENV", "KEY_LEN", "NONCE_LEN", "ImageKey", "ImageSigner", "ImageVerifier",
           "MISMATCH", "NO_KEY", "UNSIGNED", "VERIFIED", "create_key", "frame_digest", "frame_mac", "key_path",
           "load_key", "signing_key", "verifying_key"]
