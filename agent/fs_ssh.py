"""An ssh link from the source host to the destination, for the filesystem hooks' transfers.

Every rsync pass and every ``btrfs send | ssh ... btrfs receive`` needs an ssh connection to
the destination; opening one costs 0.2-0.5 s (key exchange, authentication), which the final
pass would pay inside the downtime. So the source's agent opens one master connection in
preflight (OpenSSH connection sharing: ``ControlMaster``) and every transfer runs as a
session over it, in milliseconds. A transfer started while the master is gone simply opens a
connection of its own (``ControlMaster=no`` falls back to connecting).

The master runs ``cat >/dev/null`` on the destination, reading a pipe this agent holds: if
the agent dies, the pipe closes, the remote command ends and the master exits with it.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time

import trio

from transport.errors import FsHookError

OPEN_TIMEOUT = 20.0
CLOSE_TIMEOUT = 5.0


class SshLink:
    """A shared ssh connection to ``host`` (``ssh -F config``); ``argv()`` runs commands over it."""

    def __init__(self, host: str, config: str | None, *, here: str) -> None:
        self.host = host
        self.config = config
        self.here = here              # this host's name, for messages
        self._dir = tempfile.mkdtemp(prefix="kcr-ssh-")
        self.socket = os.path.join(self._dir, "m")
        self._master: subprocess.Popen[bytes] | None = None
        self._log = os.path.join(self._dir, "log")

    def base(self) -> list[str]:
        """``ssh`` and the options every connection to the destination uses."""
        cfg = ["-F", self.config] if self.config else []
        return ["ssh", *cfg, "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]

    def argv(self) -> list[str]:
        """``ssh ...`` for a session over the shared connection (without the host)."""
        return [*self.base(), "-o", f"ControlPath={self.socket}", "-o", "ControlMaster=no"]

    def rsh(self) -> str:
        """The same as one string, for ``rsync -e``."""
        return shlex.join(self.argv())

    def _advice(self) -> str:
        cfg = f" -F {self.config}" if self.config else ""
        return (f"make sure `ssh{cfg} {self.host} true` works on {self.here} without a password "
                f"(BatchMode), as the user the agent runs as")

    def _log_tail(self) -> str:
        try:
            with open(self._log, errors="replace") as f:
                lines = [line.strip() for line in f if line.strip()]
        except OSError:
            return ""
        return lines[-1] if lines else ""

    async def open(self) -> float:
        """Connect (the master), then run ``true`` over it; the seconds it took."""
        if self.config and not os.path.exists(self.config):
            raise FsHookError(f"the ssh config {self.config} does not exist on {self.here}: the source host "
                              f"connects to {self.host} with the same --ssh-config path; put the file there")
        t0 = time.monotonic()
        with open(self._log, "wb") as log:
            try:
                self._master = subprocess.Popen(
                    [*self.base(), "-o", "ControlMaster=yes", "-o", f"ControlPath={self.socket}",
                     "-o", "ControlPersist=no", "-o", "ServerAliveInterval=10", self.host, "cat >/dev/null"],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
            except FileNotFoundError:
                raise FsHookError(f"ssh is not installed on {self.here}: install it (apt-get install "
                                  "openssh-client)") from None
        deadline = t0 + OPEN_TIMEOUT
        while not os.path.exists(self.socket):
            code = self._master.poll()
            if code is not None:
                detail = self._log_tail() or f"ssh exited with status {code}"
                raise FsHookError(f"cannot ssh to {self.host} ({detail}): {self._advice()}")
            if time.monotonic() > deadline:
                self.close()
                raise FsHookError(f"could not ssh to {self.host} within {OPEN_TIMEOUT:g} s: "
                                  f"{self._advice()}")
            await trio.sleep(0.02)
        res = await trio.run_process([*self.argv(), self.host, "true"], capture_stdout=True, capture_stderr=True,
                                     check=False)
        if res.returncode != 0:
            lines = res.stderr.decode(errors="replace").strip().splitlines()
            detail = lines[-1] if lines else f"exit {res.returncode}"
            raise FsHookError(f"cannot run commands on {self.host} over ssh ({detail}): {self._advice()}")
        return time.monotonic() - t0

    def close(self) -> None:
        """End the master connection and remove its socket (blocking; safe to call twice)."""
        master, self._master = self._master, None
        if master is not None:
            if master.stdin is not None:
                try:
                    master.stdin.close()
                except OSError:
                    pass
            if master.poll() is None:
                master.terminate()
            try:
                master.wait(CLOSE_TIMEOUT)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
