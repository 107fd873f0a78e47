"""What a process holds, and what kcr-migrate does with each kind of it: one table.

Every kind of fd, mapping, and process or thread attribute has one row:

- ``carried``: restored as it was (the record fields that carry it are named);
- ``warned``: carried, except where the destination does not allow it (a capability the
  restorer lacks), and then the report says what the process runs without;
- ``refused``: preflight says so in one line, naming it, before anything is frozen;
- ``lost``: not carried, and said so in the README's Limits (what a process cannot take to
  another host: its parent, cgroup and NUMA placement, ...).

``tests/test_inventory.py`` holds the dump's records, the preflight's refusals, the README
and the tests' state checker (``tests/_state.py``, which compares a moved process's state with
the source's, row by row) against this table: a record field without a row, a refusal the
table does not know, a refused or lost kind the README does not mention, or a carried row
the checker cannot see fails the tests. A new kernel object
therefore cannot be dropped without a row saying so. ``agent.procfs`` takes its fd refusals
from here.
"""
from __future__ import annotations

from transport.frozen import frozen


CARRIED, WARNED, REFUSED, LOST = "carried", "warned", "refused", "lost"


@frozen
class Row:
    area: str                     # "fd", "memory", "process", "thread"
    what: str                     # as messages and the README name it
    status: str                   # CARRIED, WARNED, REFUSED or LOST
    fields: tuple[str, ...] = ()  # "Record.field" names that carry it
    target: str = ""              # fd: the /proc/PID/fd link prefix preflight refuses it by
    readme: str = ""              # refused or lost: words the README's Limits use for it


def _f(record: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{record}.{n}" for n in names)


ROWS: tuple[Row, ...] = (
    # --- fds --------------------------------------------------------------------------------
    Row("fd", "a regular file", CARRIED, _f("FileDesc", "fd", "kind", "path", "flags", "pos", "size",
                                            "mtime_ns", "desc")),
    Row("fd", "a directory", CARRIED),
    Row("fd", "a directory watched with dnotify (fcntl F_NOTIFY)", REFUSED, readme="dnotify"),
    Row("fd", "/dev/null and similar", CARRIED),
    Row("fd", "a deleted file", CARRIED, _f("FileContents", "id", "size", "offset", "data", "mode", "uid", "gid",
                                            "atime_ns", "mtime_ns")),
    Row("fd", "a deleted file's name where another file has it now, and its open-only flags", LOST,
        readme="the name a deleted file had"),
    Row("fd", "a file lock", CARRIED, _f("FileDesc", "locks")),
    Row("fd", "a pipe", CARRIED, _f("FileDesc", "obj") + _f("PipeBuffer", "id", "size", "data", "packets")),
    Row("fd", "a unix socket", CARRIED, _f("UnixSocket", "id", "type", "peer", "peer_closed", "shutdown",
                                           "options", "queue")),
    Row("fd", "a zero-length datagram a peek has seen already", REFUSED, readme="a zero-length datagram"),
    Row("fd", "a unix socket bound to a path or an abstract name", CARRIED,
        _f("UnixSocket", "name", "accepted", "listener", "backlog", "pending", "target", "senders", "file_mode",
           "file_uid", "file_gid", "file_dev", "file_ino", "sent", "file_gone")),
    Row("fd", "who made a unix socketpair or listener, or connected to one (SO_PEERCRED)", CARRIED,
        _f("UnixSocket", "cred_pid", "cred_uid", "cred_gid")),
    # the process named stays behind: the socket's holder makes it, with the recorded ids (the report warns)
    Row("fd", "SO_PEERCRED naming a process that does not move", WARNED),
    Row("fd", "who connected a unix connection waiting in an accept queue (SO_PEERCRED once accepted)", CARRIED,
        _f("UnixSocket", "conn_pid", "conn_uid", "conn_gid")),
    # a live dump cannot accept the connection to ask: the process holding the client's end stands for it
    Row("fd", "who connected a connection waiting in an accept queue, in a live move", LOST,
        readme="connected a connection still waiting"),
    Row("fd", "a unix socket bound to a relative path", REFUSED, readme="unix sockets bound to a relative path"),
    Row("fd", "a unix connection waiting in an accept queue with bytes sent, or from outside the job", REFUSED,
        readme="a connection waiting in a listener's accept queue"),
    Row("fd", "a unix connection waiting in an accept queue, made under other ids than its holder's, in a live move",
        REFUSED, readme="was made under other ids than its holder's"),
    Row("fd", "a unix socket name taken on the destination", REFUSED,
        readme="a socket name the destination has in use"),
    Row("fd", "an eventfd", CARRIED, _f("EventFile", "id", "kind", "count", "semaphore")),
    Row("fd", "a timerfd", CARRIED, _f("EventFile", "clockid", "value_ns", "interval_ns", "ticks", "settime_flags")),
    Row("fd", "a signalfd", CARRIED, _f("EventFile", "sigmask")),
    Row("fd", "an epoll instance", CARRIED, _f("EventFile", "watches")),
    Row("fd", "a one-shot epoll watch that fired, its file not ready at restore", WARNED),
    Row("fd", "a pidfd", CARRIED, _f("EventFile", "pid")),
    Row("fd", "an inotify instance", CARRIED, _f("EventFile", "inotify")),
    Row("fd", "events queued on an inotify or fanotify instance", WARNED, _f("EventFile", "queued")),
    Row("fd", "a fanotify instance", CARRIED, _f("EventFile", "init_flags", "event_flags", "marks")),
    Row("fd", "a fanotify instance of a permission class", REFUSED, readme="fanotify instances of a permission class"),
    Row("fd", "a redirected fd", CARRIED),
    Row("fd", "a lease", CARRIED),
    Row("fd", "whom an O_ASYNC fd signals, and with what", CARRIED, _f("FileDesc", "owner", "owner_kind", "sig")),
    Row("fd", "an O_ASYNC fd that signals a process that does not move", REFUSED,
        readme="an fd whose I/O signals go to a process that does not move"),
    Row("fd", "a write lease on a file both hosts see", REFUSED, readme="a write lease on a file both hosts see"),
    Row("fd", "a lease being broken, a delegation", REFUSED, readme="a lease being broken"),
    Row("fd", "a write lock on a file both hosts see", REFUSED, readme="a write lock on a file"),
    Row("fd", "a socket", REFUSED, target="socket:", readme="sockets of other families"),
    Row("fd", "a TCP or UDP socket", CARRIED, _f("InetSocket", "family", "type", "protocol", "address", "port",
                                                  "scope_id", "peer_address", "peer_port", "backlog", "options",
                                                  "shutdown", "nonlocal_address", "datagrams")
        + _f("InetDatagram", "address", "port", "data")
        + _f("InetOption", "level", "name", "value")),
    Row("fd", "a TCP connection between processes of the job", CARRIED, _f("InetSocket", "connection")
        + _f("TcpConnection", "send_seq", "recv_seq", "send_queue", "unsent", "recv_queue", "mss", "options",
             "snd_wscale", "rcv_wscale", "timestamp", "snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup")),
    Row("fd", "a TCP connection to a peer that does not move, or one opening or closing", REFUSED,
        readme="a TCP connection whose other end does not move"),
    Row("fd", "a TCP connection's buffer sizes", LOST, readme="a TCP connection's buffer sizes"),
    Row("fd", "a TCP listener with connections waiting", REFUSED,
        readme="a TCP listener with connections waiting to be accepted"),
    Row("fd", "a socket's classic BPF filter (SO_ATTACH_FILTER) and its lock", CARRIED,
        _f("UnixSocket", "options") + _f("InetSocket", "bpf_filter", "filter_locked")),
    Row("fd", "a socket with an eBPF program attached (SO_ATTACH_BPF)", REFUSED, readme="an eBPF program attached"),
    Row("fd", "a UDP socket's multicast memberships", LOST, readme="multicast groups a UDP socket joined"),
    Row("fd", "an io_uring instance", REFUSED, target="anon_inode:[io_uring]", readme="io_uring"),
    Row("fd", "a userfaultfd", REFUSED, target="anon_inode:[userfaultfd]", readme="userfaultfd"),
    Row("fd", "a memfd", CARRIED, _f("FileContents", "memfd", "seals")),
    Row("fd", "a memfd of huge pages", REFUSED, readme="memfds of huge pages"),
    Row("fd", "an anonymous-inode file", REFUSED, target="anon_inode:", readme="anonymous-inode"),
    Row("fd", "a terminal", REFUSED, readme="terminals"),
    Row("fd", "a FIFO", CARRIED, _f("PipeBuffer", "path", "mode", "uid", "gid") + _f("FileDesc", "waiting")),
    Row("fd", "a FIFO held by a process that does not move", REFUSED,
        readme="a FIFO also open in a process that does not move"),
    Row("fd", "a FIFO deleted from its directory", CARRIED),
    Row("fd", "a device", REFUSED, readme="device files"),
    Row("fd", "a POSIX message queue (mq_open)", REFUSED, readme="POSIX message queues"),
    Row("fd", "a memfd_secret() area", REFUSED, readme="memfd_secret"),
    Row("fd", "a file of a process under /proc", REFUSED, readme="/proc/PID"),
    # --- memory -----------------------------------------------------------------------------
    Row("memory", "a mapping", CARRIED, _f("Vma", "start", "end", "prot", "shared", "kind", "path", "pgoff",
                                           "growsdown", "file_size", "file_mtime_ns", "ino")),
    Row("memory", "madvise state, mlock and MAP_DROPPABLE", CARRIED, _f("Vma", "advice")),
    Row("memory", "guard pages (MADV_GUARD_INSTALL)", CARRIED, _f("ProcessState", "guard_regions") +
        _f("GuardRegion", "start", "end")),
    Row("memory", "guard pages on Linux 6.13, which makes them but cannot report them", LOST,
        readme="guard pages on Linux 6.13"),
    Row("memory", "SysV shared memory", CARRIED, _f("Vma", "shm") + _f(
        "SysvSegment", "shmid", "key", "size", "mode", "uid", "gid", "removed", "host")),
    Row("memory", "a SysV segment's creator (cuid, cgid, cpid)", LOST, readme="creator (cuid, cgid, cpid)"),
    Row("memory", "a SysV segment of huge pages", REFUSED, readme="SysV segments of huge pages"),
    Row("memory", "a SysV segment the job knows by id only", LOST, readme="SysV segments the job does not attach"),
    Row("process", "SysV semaphore sets and message queues it uses (by id), SEM_UNDO adjustments", LOST,
        readme="SysV semaphore sets and message queues"),
    Row("memory", "another SysV segment under a segment's id or key on the destination", REFUSED,
        readme="a SysV segment whose id or key another segment holds on the destination"),
    Row("memory", "a file of /dev/shm, held open or mapped", CARRIED, _f("FileContents", "path", "dev", "boot")),
    Row("memory", "another file at a /dev/shm file's path on the destination", REFUSED,
        readme="another file at the path of a /dev/shm file"),
    Row("memory", "a file in a directory of /dev/shm, mapped", REFUSED, readme="files in a directory of /dev/shm"),
    Row("memory", "a device mapping", REFUSED, readme="device mappings"),
    Row("memory", "a Linux AIO context (io_setup)", REFUSED, readme="Linux AIO contexts"),
    Row("memory", "a deleted file or memfd mapped (shared or private) and held open", CARRIED),
    Row("memory", "a memfd mapped but not held open, or a deleted file mapped privately", CARRIED,
        _f("FileContents", "name")),
    Row("memory", "NUMA memory policies of ranges (mbind)", CARRIED, _f("ProcessState", "mempolicies") + _f(
        "MemPolicy", "start", "end", "mode", "flags", "nodes")),
    # refused unless the user chose --affinity warn: then kept with the nodes the destination has
    Row("memory", "a NUMA policy naming nodes the destination has no memory on", WARNED),
    Row("memory", "NUMA placement of pages no policy places", LOST, readme="NUMA placement"),
    # each range's policy is found at the job's mappings' bounds and by halving where it changes
    Row("memory", "a shared memory range's NUMA policy no mapping of the job shows", LOST,
        readme="the NUMA policy of a range of a shared memory object"),
    # --- the process ------------------------------------------------------------------------
    Row("process", "a main thread that has exited (pthread_exit) while other threads run", REFUSED,
        readme="main thread has exited"),
    Row("process", "its pid", CARRIED, _f("ProcessState", "pid")),
    Row("process", "its executable, working and root directory", CARRIED, _f("ProcessState", "exe", "cwd", "root")),
    Row("process", "umask, personality, dumpable", CARRIED, _f("ProcessState", "umask", "personality", "dumpable")),
    Row("process", "credentials", CARRIED, _f("ProcessState", "creds") + _f(
        "Creds", "uids", "gids", "groups", "cap_inheritable", "cap_permitted", "cap_effective", "cap_bounding",
        "cap_ambient", "securebits", "no_new_privs")),
    Row("process", "resource limits", WARNED, _f("ProcessState", "rlimits")),
    Row("process", "its memory layout fields and auxv", CARRIED, _f("ProcessState", "mm", "auxv") + _f(
        "MmFields", "start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
        "arg_start", "arg_end", "env_start", "env_end")),
    Row("process", "signal dispositions and pending signals", CARRIED, _f("ProcessState", "sigactions",
                                                                          "shared_pending")),
    Row("process", "interval timers", CARRIED, _f("ProcessState", "itimers")),
    Row("process", "POSIX timers", CARRIED, _f("ProcessState", "posix_timers") + _f(
        "PosixTimer", "id", "clockid", "signo", "sigval", "notify", "tid", "value_ns", "interval_ns")),
    Row("process", "a POSIX timer's overrun count", WARNED, _f("PosixTimer", "overrun")),
    Row("process", "child subreaper, THP disable, mlockall(MCL_FUTURE)", CARRIED,
        _f("ProcessState", "child_subreaper", "thp_disable", "lock_future")),
    Row("process", "oom_score_adj", WARNED, _f("ProcessState", "oom_score_adj")),
    Row("process", "coredump_filter", CARRIED, _f("ProcessState", "coredump_filter")),
    Row("process", "memory-deny-write-execute (PR_SET_MDWE)", CARRIED, _f("ProcessState", "mdwe")),
    Row("process", "speculation mitigations it asked for (PR_SET_SPECULATION_CTRL)", WARNED,
        _f("ProcessState", "spec_store_bypass", "spec_indirect_branch")),
    Row("process", "loginuid", WARNED, _f("ProcessState", "loginuid")),
    Row("process", "membarrier registrations", CARRIED, _f("ProcessState", "membarrier")),
    Row("process", "a job-control stop (SIGSTOP, Ctrl-Z, Slurm's suspend)", CARRIED,
        _f("ProcessState", "stopped", "stop_signal")),
    Row("process", "namespaces of its own", REFUSED, readme="namespaces"),
    Row("process", "memory, an fd table or a working directory shared with another process (clone())", REFUSED,
        readme="since clone() without CLONE_THREAD"),
    Row("process", "its parent", LOST, readme="its parent"),
    # the kernel's accounting of it, which nothing can set: times(), getrusage, CLOCK_*_CPUTIME_ID,
    # /proc/PID/stat's start time, /proc/PID/io
    Row("process", "the CPU time it used, its start time, its I/O and fault counts", LOST,
        readme="the CPU time it has used"),
    # keyctl(): the session, process and thread keyrings it holds and the keys in them (the
    # kernel shows a process's keyrings to that process alone)
    Row("process", "its kernel keyrings (keyctl) and their keys", LOST, readme="kernel keyrings"),
    Row("process", "its cgroups", WARNED, _f("ProcessState", "cgroups")),
    Row("process", "its monotonic and boot-time clocks (and time namespace)", CARRIED),  # ImageHeader's
    # --- threads ----------------------------------------------------------------------------
    Row("thread", "its tid, name and registers", CARRIED, _f("ThreadState", "tid", "leader", "comm", "regs",
                                                             "xstate")),
    Row("thread", "a system call the kernel continues after a stop (restart_syscall) that no code names", WARNED),
    Row("thread", "signal mask and pending signals", CARRIED, _f("ThreadState", "sigmask", "pending")),
    Row("thread", "clear_child_tid, robust futex list, rseq", CARRIED, _f(
        "ThreadState", "tid_address", "robust_list", "robust_list_len", "rseq_addr", "rseq_len", "rseq_sig")),
    Row("thread", "alternate signal stack", CARRIED, _f("ThreadState", "altstack_sp", "altstack_flags",
                                                        "altstack_size")),
    Row("thread", "scheduling", CARRIED, _f("ThreadState", "nice", "sched_policy", "sched_priority",
                                            "sched_reset_on_fork", "timer_slack_ns", "ioprio")),
    Row("thread", "CPU pinning", CARRIED, _f("ThreadState", "cpus")),
    Row("thread", "its parent-death signal (PR_SET_PDEATHSIG)", CARRIED, _f("ThreadState", "pdeathsig")),
    # the job's root: the parent whose death would send it stays behind
    Row("thread", "the parent-death signal of the job's root", LOST, readme="parent-death signal"),
    Row("thread", "NUMA memory policy (set_mempolicy)", CARRIED, _f("ThreadState", "mempolicy", "mempolicy_flags",
                                                                     "mempolicy_nodes")),
    # refused in preflight unless the user chose --affinity warn: then pinned to the CPUs it has
    Row("thread", "CPU pinning to CPUs the destination lacks", WARNED),
    Row("thread", "SCHED_DEADLINE", REFUSED, readme="SCHED_DEADLINE"),
    Row("thread", "credentials, an fd table or a working directory of its own", REFUSED,
        readme="a thread with credentials, an fd table or a working directory of its own"),
    Row("thread", "seccomp: strict mode, filters and their log flag", CARRIED,
        _f("ThreadState", "seccomp", "seccomp_filters") + _f("SeccompFilter", "flags", "program")),
    Row("thread", "a seccomp filter that hands calls to a supervisor (SECCOMP_RET_USER_NOTIF)", REFUSED,
        readme="seccomp filters that hand calls to a supervisor"),
    Row("thread", "seccomp filters installed with a capability dropped since, without no_new_privs", REFUSED,
        readme="seccomp filters installed with CAP_SYS_ADMIN"),
    Row("thread", "a seccomp filter's SECCOMP_FILTER_FLAG_SPEC_ALLOW", LOST, readme="SECCOMP_FILTER_FLAG_SPEC_ALLOW"),
)


def fd_refusals() -> tuple[tuple[str, str], ...]:
    """(link prefix, what) of fds preflight refuses by their /proc/PID/fd link, most specific
    first (``anon_inode:[io_uring]`` before ``anon_inode:``)."""
    rows = [r for r in ROWS if r.area == "fd" and r.target]
    return tuple((r.target, r.what) for r in sorted(rows, key=lambda r: -len(r.target)))
