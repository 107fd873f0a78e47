"""The one exception tree of kcr-migrate.

It lives here, in the lowest layer, because every layer raises it; `migrate` re-exports it.
Every error carries the phase, pid and host where known, and a message that tells the user
what to do next. Errors cross the wire as ``(code, errno, message)`` and map back to their
class through ``ERROR_CODES``.
"""
from __future__ import annotations

import errno as _errno


class MigrationError(Exception):
    """Root of every error kcr-migrate raises on purpose."""

    code = "error"

    def __init__(
        self,
        message: str,
        *,
        phase: str | None = None,
        pid: int | None = None,
        host: str | None = None,
        errno: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.phase = phase
        self.pid = pid
        self.host = host
        self.errno = errno

    def __str__(self) -> str:
        return f"{self.host}: {self.message}" if self.host else self.message

    def to_wire(self) -> dict[str, object]:
        return {
            "code": self.code,
            "errno": self.errno or 0,
            "message": self.message,
            "phase": self.phase or "",
            "pid": self.pid if self.pid is not None else -1,
            "host": self.host or "",
        }


# --- the process and the kernel ------------------------------------------------------------

class ProcessError(MigrationError):
    """Something about the target process stops the operation."""

    code = "process"


class NoSuchProcess(ProcessError):
    code = "no-such-process"


class PermissionDenied(ProcessError):
    code = "permission"


class UnsupportedResource(ProcessError):
    """The process uses something kcr-migrate cannot carry yet (pipes, sockets, ...)."""

    code = "unsupported"


class ProcessExited(ProcessError):
    """The process went away while we worked on it."""

    code = "process-exited"


class KernelFeatureMissing(MigrationError):
    code = "kernel-feature"


class RestoreError(MigrationError):
    """The destination could not rebuild the process; nothing of it is left running."""

    code = "restore"


class FsHookError(MigrationError):
    """A filesystem hook (rsync, btrfs, ...) refused in preflight or failed to move the files."""

    code = "fs-hook"


class Cancelled(MigrationError):
    """The user (or the caller) asked to stop; everything was rolled back."""

    code = "cancelled"


# --- images and streams -------------------------------------------------------------------

class TransportError(MigrationError):
    code = "transport"


class ProtocolError(TransportError):
    """The bytes from the other side are not a valid stream: corrupt, truncated or foreign."""

    code = "protocol"


class TruncatedStream(ProtocolError):
    code = "truncated"


class ChecksumError(ProtocolError):
    code = "checksum"


class IncompatibleImage(ProtocolError):
    """Valid, but from a format version, architecture or CPU this side cannot use."""

    code = "incompatible"


class UntrustedImage(ProtocolError):
    """An image whose signature does not verify with this host's key, or that is not signed:
    refused unless the caller trusts it (``--trust-image``)."""

    code = "untrusted-image"


class ImageKeyError(MigrationError):
    """The key that signs and verifies images cannot be used (unsafe mode, wrong size, ...)."""

    code = "image-key"


class ChannelClosed(TransportError):
    """We closed the channel ourselves (the operation was cancelled or finished)."""

    code = "closed"


class PeerGone(TransportError):
    """The other side broke the channel: it died, or the link was cut."""

    code = "peer-gone"


class TransportTimeout(TransportError):
    code = "timeout"


class RemoteError(MigrationError):
    """An error the other agent reported whose code this side does not know."""

    code = "remote"


ERROR_CODES: dict[str, type[MigrationError]] = {
    cls.code: cls
    for cls in (
        MigrationError,
        ProcessError,
        NoSuchProcess,
        PermissionDenied,
        UnsupportedResource,
        ProcessExited,
        KernelFeatureMissing,
        RestoreError,
        FsHookError,
        Cancelled,
        TransportError,
        ProtocolError,
        TruncatedStream,
        ChecksumError,
        IncompatibleImage,
        UntrustedImage,
        ImageKeyError,
        ChannelClosed,
        PeerGone,
        TransportTimeout,
        RemoteError,
    )
}


def error_from_wire(fields: dict[str, object]) -> MigrationError:
    """Rebuild an error the other side sent as ``(code, errno, message, ...)``."""
    code = str(fields.get("code", "remote"))
    cls = ERROR_CODES.get(code, RemoteError)
    pid = fields.get("pid")
    err = fields.get("errno")
    return cls(
        str(fields.get("message", "the remote agent failed without a message")),
        phase=str(fields.get("phase") or "") or None,
        pid=pid if isinstance(pid, int) and pid >= 0 else None,
        host=str(fields.get("host") or "") or None,
        errno=err if isinstance(err, int) and err else None,
    )


def os_error_message(exc: OSError) -> str:
    name = _errno.errorcode.get(exc.errno or 0, "E?")
    return f"{exc.strerror or exc} ({name})"
