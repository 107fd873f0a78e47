"""pid 1 of a testbed host's own pid namespace: it reaps every process orphaned there, until killed.

    nsenter --net=NETNS --mount=MNTNS -- python3 -I examples/_pidns_init.py LABEL

makes a new pid namespace, forks its first process and prints that process's pid (in the caller's
pid namespace) on stdout, then exits.  The child is pid 1 of the new namespace: it leaves the
caller's session and stdio and reaps children forever.  The kernel gives pid 1 no signal it has no
handler for, from inside its namespace; SIGKILL from outside ends it, and with it every process
of the namespace.  LABEL is not read: it names the host in ``ps`` output.

Why not ``unshare --pid --fork``: its parent stays, waiting for pid 1, and the caller wants to
return once pid 1 runs; nor sshd as pid 1: that it reaps orphans is an accident of its version.
Only the standard library, run with ``-I``: this runs before anything else exists in the host.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

CLONE_NEWPID = 0x20000000


def reap_all() -> None:
    """Collect every child that has ended; return once none is left to collect."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWPID) != 0:
        print(f"unshare(CLONE_NEWPID): {os.strerror(ctypes.get_errno())}", file=sys.stderr)
        return 1
    # Blocked before fork, so a child that ends between two waits leaves SIGCHLD pending.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        return 0
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    while True:
        reap_all()
        signal.sigwait({signal.SIGCHLD})


if __name__ == "__main__":
    sys.exit(main())
