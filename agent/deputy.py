"""The deputy: on the destination, the moved process's link to its stand-in at home.

A process of its own (``python3 -m agent.deputy``), started by the destination agent in
preflight (a Python start-up is a quarter of a second: not inside the downtime), in a session
of its own so that it outlives the agent and its SSH session. It listens for the stand-in's
keeper on a sealed TCP channel (``agent.homelink``, ``agent.homechannel``) at once; once the
process is restored, still stopped, the agent hands it the process's pid and a pidfd over a
unix socket (``SCM_RIGHTS``), and then:

- sends the process every signal the stand-in received (``Forward``), through the pidfd, so
  never to a recycled pid;
- sends what the process writes to its relayed fds (``--relay``: on the destination they are
  FIFOs the deputy made and reads) as ``Output``, for the keeper to write to the pipes at home;
- when the process has ended, sends what it left in those FIFOs, then tells the keeper how
  (``Exited``), so the stand-in ends the same way;
- when the stand-in was killed by SIGKILL (``HomeEnded``), kills the process with SIGKILL;
- when the link is lost, follows the user's rule (``--stand-in-lost``): ``kill`` kills the
  process; ``exit:N`` (the default) lets it run on.

How the deputy learns the exit status, and why not as a parent. The restored process is not
its child (the restore stub forks so that it is not the agent's either), so ``waitpid`` is
not available; a subreaper ancestor would be, but the stub is spawned by the agent, which
exits after the migration. A pidfd turns readable the moment the process exits; then its
status is read, in this order: ``/proc/PID/stat``'s ``exit_code`` field while it is a zombie
(any kernel since 3.5), then ``PIDFD_GET_INFO`` with ``PIDFD_INFO_EXIT`` (Linux >= 6.15),
which holds it once the parent reaped it. The ioctl comes second: if it says the process was
not reaped yet, it was not when its stat was read either, so that stat was this process's,
not a recycled pid's. Only where the parent reaped it at once on a kernel without
PIDFD_INFO_EXIT is the status unknown (``Exited(-1)``): the stand-in then follows the
lost-link rule and says why.

If the agent's socket closes before the pidfd came (a rollback), the deputy exits. Its log is
``/run/kcr-migrate/deputy/SESSION.log`` (the report names it).
"""
from __future__ import annotations

import argparse
import fcntl
import os
import signal
import socket
import struct
import sys
import time

import trio

from agent.homechannel import Link, LinkLost
from agent.homelink import (
    Bye,
    Exited,
    Forward,
    Hello,
    HomeEnded,
    MAX_OUTPUT,
    Output,
    LostRule,
    describe_status,
    parse_lost,
)
from precopy.kernel import pidfd_send_signal
from transport.errors import MigrationError
from transport.tcp import KEY_SIZE, DataListener, open_data_listener

LOG_DIR = "/run/kcr-migrate/deputy"
PIDFS_IOCTL_MAGIC = 0xFF
PIDFD_INFO_SIZE_VER0 = 64
PIDFD_GET_INFO = (3 << 30) | (PIDFD_INFO_SIZE_VER0 << 16) | (PIDFS_IOCTL_MAGIC << 8) | 11
PIDFD_INFO_EXIT = 1 << 3
EXIT_CODE_OFFSET = 60           # struct pidfd_info: mask, cgroupid (u64), 11 u32 ids, exit_code
STAT_EXIT_CODE = 52             # /proc/PID/stat field (1-based) holding the zombie's wait status


def log(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} kcr-deputy[{os.getpid()}]: {text}", file=sys.stderr, flush=True)


def _stat_exit(pid: int) -> int | None:
    """The zombie's wait status from /proc/PID/stat; None unless ``pid`` is a zombie now."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is field 3 (state)
    if not fields or fields[0] != "Z" or len(fields) < STAT_EXIT_CODE - 2:
        return None
    return int(fields[STAT_EXIT_CODE - 3])


def pidfd_exit_info(pidfd: int) -> int | None:
    """The exit status PIDFD_INFO_EXIT holds (once reaped); None if not (yet) known, or on a
    kernel without it."""
    buf = bytearray(PIDFD_INFO_SIZE_VER0)
    struct.pack_into("<Q", buf, 0, PIDFD_INFO_EXIT)
    try:
        fcntl.ioctl(pidfd, PIDFD_GET_INFO, buf)
    except OSError:
        return None
    (mask,) = struct.unpack_from("<Q", buf, 0)
    if not mask & PIDFD_INFO_EXIT:
        return None
    (code,) = struct.unpack_from("<i", buf, EXIT_CODE_OFFSET)
    return code & 0xFFFF


def exit_status(pidfd: int, pid: int) -> int:
    """How the process behind ``pidfd`` (which has exited) ended; -1 if that cannot be known."""
    from_stat = _stat_exit(pid)
    from_pidfd = pidfd_exit_info(pidfd)
    if from_pidfd is not None:
        return from_pidfd
    if from_stat is not None:
        return from_stat
    return -1


class Relay:
    """One relayed fd: the FIFO the moved process writes into (``--relay``), read here."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        os.mkfifo(path, 0o600)
        self.rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        # Our own writer until the process holds its end: a FIFO without writers reads as ended.
        self.guard = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.lock = trio.Lock()
        self.done = False

    def process_holds_it(self) -> None:
        if self.guard >= 0:
            os.close(self.guard)
            self.guard = -1
        try:
            os.unlink(self.path)
            os.rmdir(os.path.dirname(self.path))
        except OSError:
            pass

    def read(self) -> bytes | None:
        """What is there (b"" at the end); None if nothing is, yet."""
        try:
            return os.read(self.rfd, MAX_OUTPUT)
        except BlockingIOError:
            return None

    async def pump(self, link: Link) -> None:
        """Send what the process writes, as it comes, until the end."""
        while not self.done:
            await trio.lowlevel.wait_readable(self.rfd)
            async with self.lock:
                if self.done:
                    return
                data = self.read()
                if data is None:
                    continue
                await link.send(Output(self.fd, data))
                self.done = not data

    async def drain(self, link: Link) -> None:
        """The process has ended: send what it left in the FIFO (and the end, if every writer
        is gone); no more after that."""
        async with self.lock:
            while not self.done:
                data = self.read()
                if data is None:
                    break
                await link.send(Output(self.fd, data))
                self.done = not data
            self.done = True

    async def keep(self, path: str) -> None:
        """No stand-in to send it to: keep what comes in ``path`` until the end (the process
        would die of SIGPIPE if nobody read)."""
        with open(path, "ab") as out:
            while not self.done:
                await trio.lowlevel.wait_readable(self.rfd)
                data = self.read()
                if data is None:
                    continue
                out.write(data)
                out.flush()
                self.done = not data

    def close(self) -> None:
        self.process_holds_it()
        os.close(self.rfd)


class Deputy:
    def __init__(self, control: socket.socket, lost: LostRule, timeout: float,
                 relays: list[Relay] | None = None) -> None:
        self.control = control
        self.relays = relays or []
        self.pidfd = -1
        self.pid = 0
        self.lost = lost
        self.timeout = timeout
        self.status: int | None = None
        self.ended = trio.Event()

    def signal(self, sig: int) -> None:
        try:
            pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            pass           # ended meanwhile: its status is on its way

    async def receive_process(self) -> bool:
        """The restored process (its pid, and a pidfd opened while it was stopped) from the
        agent, once it is restored; False if the agent gave up first (a rollback)."""
        await trio.lowlevel.wait_readable(self.control)
        try:
            data, fds, _, _ = socket.recv_fds(self.control, 16, 1)
        except OSError:
            return False
        if len(data) != 4 or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return False
        (self.pid,) = struct.unpack("<i", data)
        self.pidfd = fds[0]
        for relay in self.relays:
            relay.process_holds_it()
        log(f"deputy of pid {self.pid}")
        return True

    async def watch(self) -> None:
        await trio.lowlevel.wait_readable(self.pidfd)
        self.status = exit_status(self.pidfd, self.pid)
        log(f"pid {self.pid} ended: {describe_status(self.status)}")
        self.ended.set()

    async def serve(self, listener: DataListener, connect_timeout: float) -> None:
        if not await self.receive_process():
            log("the migration ended before its process was restored: nothing to stand in for")
            await listener.aclose()
            return
        accepted = None
        with trio.move_on_after(connect_timeout):
            accepted = await listener.accept()
        await listener.aclose()
        if accepted is None:
            log(f"no stand-in connected within {connect_timeout:g} s: pid {self.pid} runs on without one")
            await self._keep_output()
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.watch)
            stream, address = accepted
            link = Link(stream, self.timeout)
            log(f"the stand-in's keeper connected from {address}")
            try:
                await self._talk(link, nursery)
            except LinkLost as exc:
                self._lost(str(exc))
            finally:
                await link.close()
                nursery.cancel_scope.cancel()
        await self._keep_output()

    async def _keep_output(self) -> None:
        """Without a stand-in (none came, or the link was lost) a process that runs on keeps
        writing to its relayed fds: into files beside the log, until it closes them."""
        live = [r for r in self.relays if not r.done]
        if not live:
            return
        async with trio.open_nursery() as nursery:
            for relay in live:
                path = os.path.join(LOG_DIR, f"pid{self.pid}.fd{relay.fd}")
                log(f"pid {self.pid}'s relayed fd {relay.fd} goes to {path} from now on")
                nursery.start_soon(relay.keep, path)

    async def _talk(self, link: Link, nursery: trio.Nursery) -> None:
        hello = await link.receive()
        if not isinstance(hello, Hello):
            raise LinkLost(f"the keeper began with {type(hello).__name__}, not Hello")
        log(f"standing in at home: pid {hello.pid}")
        nursery.start_soon(link.beats)

        async def report() -> None:
            await self.ended.wait()
            assert self.status is not None
            for relay in self.relays:
                await relay.drain(link)        # its output before its end, as at home
            await link.send(Exited(self.status))

        for relay in self.relays:
            nursery.start_soon(relay.pump, link)
        nursery.start_soon(report)
        while True:
            msg = await link.receive()
            if isinstance(msg, Forward):
                self.signal(msg.sig)
            elif isinstance(msg, HomeEnded):
                log(f"the stand-in ended of {describe_status(msg.status)}, which it could not pass on: "
                    f"killing pid {self.pid}")
                self.signal(signal.SIGKILL)
                return
            elif isinstance(msg, Bye):
                log("the stand-in is done")
                return

    def _lost(self, why: str) -> None:
        if self.ended.is_set():
            log(f"lost the stand-in ({why}) after pid {self.pid} ended")
        elif self.lost.kill:
            log(f"lost the stand-in ({why}): killing pid {self.pid} (--stand-in-lost kill)")
            self.signal(signal.SIGKILL)
        else:
            log(f"lost the stand-in ({why}): pid {self.pid} runs on (--stand-in-lost {self.lost})")


async def _main(args: argparse.Namespace, key: bytes) -> None:
    listener = await open_data_listener(args.address, 0, key=key)
    control = socket.socket(fileno=args.control_fd)
    relays: list[Relay] = []
    try:
        for spec in args.relay:
            fd, _, path = spec.partition("=")
            relays.append(Relay(int(fd), path))
        control.sendall(f"{listener.port}\n".encode())
        deputy = Deputy(control, parse_lost(args.lost), args.timeout, relays)
        await deputy.serve(listener, args.connect_timeout)
    finally:
        for relay in relays:
            relay.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="kcr-deputy")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--lost", default="exit")
    parser.add_argument("--relay", action="append", default=[], metavar="FD=PATH")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--connect-timeout", type=float, default=120.0)
    args = parser.parse_args()
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    key = sys.stdin.buffer.read(KEY_SIZE)      # never on the command line
    if len(key) != KEY_SIZE:
        log("no key on stdin")
        sys.exit(2)
    try:
        trio.run(_main, args, key)
    except MigrationError as exc:
        log(f"error: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
