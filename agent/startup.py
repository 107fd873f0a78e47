"""What a process of ours does as it starts, for what it does later while a job is frozen."""
from __future__ import annotations

import fcntl
import os
import resource

M_TRIM_THRESHOLD = -1              # glibc's mallopt parameters
M_MMAP_THRESHOLD = -3
FD_TABLE = 1024                    # fds a process of ours may hold before its fd table grows


def keep_freed_memory() -> None:
    """Page batches are megabytes each, allocated and freed by the thousand. Left to glibc's
    defaults, freed ones go back to the kernel and each new one page-faults in afresh (on VMs
    that hand freed memory back to their host, several times slower again): that was the
    largest cost of receiving pages. An agent is short-lived: keep freed memory for reuse."""
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return                         # not glibc: its own defaults
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest; below it, blocks come from reusable heaps
    mallopt(M_TRIM_THRESHOLD, 1 << 30)


def grow_fd_table(size: int = FD_TABLE) -> None:
    """Grow this process's fd table to ``size`` fds (at most its RLIMIT_NOFILE) now, while it
    has one thread. The kernel grows a table that several threads share only after an RCU
    grace period (``expand_files`` -> ``synchronize_rcu``): an agent restoring a job with a
    few dozen pipes, sockets and event files crossed 64 fds while the job was frozen, and
    that one open() took 4-46 ms. A table never shrinks: this costs one fd for a moment."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = (size if soft == resource.RLIM_INFINITY else min(size, soft)) - 1
    try:
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.close(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top))
    except OSError:
        pass                 # the top fds are taken, or no room: the table grows when it must
    finally:
        os.close(fd)
