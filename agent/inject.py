"""Running system calls inside a stopped tracee: the one injector every part uses.

A thread that is ptrace-stopped gets its registers replaced by a system call's arguments,
its instruction pointer pointed at a ``syscall`` instruction (a *gadget*: any ``0f 05`` in
its vDSO, else in its code, or the stub's own page during restore), and is single-stepped
once: the stop after the step is right after the system call returned. Its signals are
blocked meanwhile so no signal is dequeued under us, and ``orig_rax = -1`` keeps the kernel
from treating the injected call as one to restart. ``close`` puts registers and mask back
exactly.

All but SIGTRAP: the step's trap is a forced SIGTRAP, and the kernel resets the handler of a
forced signal that is blocked (or ignored) to SIG_DFL, which lost the process's own SIGTRAP
handler (Go's runtime, debuggers' agents) at the first injected call. Unblocked, the trap
still only stops the thread for us (we discard it); a SIGTRAP someone sent the process and
that arrives meanwhile is told apart by its siginfo and sent again at ``close``. An ignored
SIGTRAP cannot be kept so: ``agent.procfs.check_supported`` refuses it.

Must be used on the tracer thread (``agent.tracer``).
"""
from __future__ import annotations

import array
import dataclasses
import errno
import os
import signal
import struct

from agent import ptrace
from precopy.kernel import tgkill
from precopy.layout import MapEntry, query_maps, read_maps, read_maps_naming
from transport.schema import PAGE_SIZE, TASK_SIZE, GpRegs

SYSCALL_INSN = b"\x0f\x05"
U64 = (1 << 64) - 1
SIGTRAP_BIT = 1 << (signal.SIGTRAP - 1)
ALL_SIGNALS = U64 & ~SIGTRAP_BIT      # see the module docstring
SI_CODE_OFFSET = 8                    # siginfo_t: si_signo, si_errno, si_code (int each)

# x86_64 system call numbers used by injection.
NR = dict(
    read=0, write=1, open=2, close=3, lseek=8, mmap=9, mprotect=10, munmap=11, brk=12,
    rt_sigaction=13, rt_sigprocmask=14, madvise=28, dup2=33, pause=34, getitimer=36, alarm=37,
    setitimer=38, getpid=39, fcntl=72, chdir=80, umask=95, prctl=157, arch_prctl=158,
    setrlimit=160, chroot=161, gettid=186, set_tid_address=218, restart_syscall=219,
    exit_group=231, rt_sigqueueinfo=129, sigaltstack=131, personality=135,
    setresuid=117, setresgid=119, setgroups=116, setfsuid=122, setfsgid=123, capget=125,
    capset=126, mremap=25, rt_tgsigqueueinfo=297, set_robust_list=273, dup3=292, openat=257,
    prlimit64=302, close_range=436, rseq=334, clone=56, userfaultfd=323, ioctl=16, setsid=112,
    getuid=102, setpgid=109, pipe2=293, clone3=435, pidfd_open=434, pidfd_getfd=438,
    mlock2=325, mlockall=151, epoll_ctl=233, epoll_wait=232, getpgid=121, wait4=61, timer_create=222,
    timer_settime=223, timer_gettime=224, timer_getoverrun=225, membarrier=324, flock=73, shmat=30, seccomp=317,
    mseal=462, openat2=437, mbind=237, set_mempolicy=238, get_mempolicy=239, socketpair=53, listen=50, connect=42,
)

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_DROPPABLE = 0x08          # a mapping type (Linux 6.11), in place of MAP_PRIVATE
MAP_GROWSDOWN, MAP_NORESERVE, MAP_FIXED_NOREPLACE = 0x100, 0x4000, 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2


class InjectionError(OSError):
    """An injected system call failed inside the tracee."""


def to_signed(value: int) -> int:
    value &= U64
    return value - (1 << 64) if value >> 63 else value


def find_gadget_in(data: bytes, base: int) -> int | None:
    i = data.find(SYSCALL_INSN)
    return None if i < 0 else base + i


class RemoteMemory:
    """Reads and writes a process's memory through /proc/PID/mem (ignores page protection)."""

    def __init__(self, pid: int, *, writable: bool = True) -> None:
        self.pid = pid
        self.fd = os.open(f"/proc/{pid}/mem", (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)

    def read(self, addr: int, size: int) -> bytes:
        data = os.pread(self.fd, size, addr)
        if len(data) != size:
            raise OSError(errno.EIO, f"short read of {size} bytes at {addr:#x} in pid {self.pid}")
        return data

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            k = os.pwrite(self.fd, view[done:], addr + done)
            if k <= 0:
                raise OSError(errno.EIO, f"short write at {addr + done:#x} in pid {self.pid}")
            done += k

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


AT_SYSINFO_EHDR = 33


def _vdso(pid: int) -> list[MapEntry]:
    """The process's [vdso] mapping: asked of the kernel where the auxiliary vector says it
    was mapped (PROCMAP_QUERY: no listing of every mapping), else found in its maps."""
    try:
        with open(f"/proc/{pid}/auxv", "rb") as f:
            raw = f.read()
        auxv = dict(struct.iter_unpack("<QQ", raw[: len(raw) // 16 * 16]))
        at = auxv.get(AT_SYSINFO_EHDR, 0)
        found = query_maps(pid, start=at, end=at + 1) if at else None
    except OSError:
        found = None
    if found and found[0].name == "[vdso]" and found[0].start <= at:
        return found
    return read_maps_naming(pid, "[vdso]")


GADGET_CHUNK = 1 << 20          # bytes of an executable mapping read at a time, looking for a gadget


def syscall_gadget(pid: int, mem: RemoteMemory) -> int:
    """A ``syscall`` instruction inside the process's vDSO, else in any of its executable
    mappings (a process without a vDSO: one run under valgrind, or that unmapped it). The
    two bytes need not begin an instruction of that code: the CPU runs what ``rip`` points at."""
    for m in _vdso(pid):
        if m.name == "[vdso]":
            addr = find_gadget_in(mem.read(m.start, m.length), m.start)
            if addr is not None:
                return addr
    for m in read_maps(pid):
        if not m.prot & PROT_EXEC or m.name == "[vsyscall]":    # (the vsyscall page cannot be read)
            continue
        for at in range(m.start, m.end, GADGET_CHUNK):
            try:        # one byte more: an instruction across two chunks
                data = mem.read(at, min(GADGET_CHUNK + 1, m.end - at))
            except OSError:
                break          # (a mapping of a file truncated under it: beyond its end)
            addr = find_gadget_in(data, at)
            if addr is not None:
                return addr
    raise OSError(errno.ENOENT, f"pid {pid} has no syscall instruction in its vDSO or any executable mapping to "
                                "run system calls with")


def _batch_code() -> bytes:
    """x86-64 code that runs a table of system calls: rbx points at entries of eight u64
    (number, six arguments, result), r12 holds their count. Each result is stored in its
    entry; the loop stops at the first error (rbx then points at that entry, r12 counts it
    and those after) or at the end, on an int3.

    Having run them all, it asks get_mempolicy(MPOL_F_ADDR) at each of rbp addresses (u64 at
    r15; the nodemask r14 bits): the answers go r14 / 8 + 16 bytes apart from r13, each the
    call's result (u64), the mode (int, in eight bytes) and the nodemask. With rbp zero it
    asks nothing; rbp is zero at the int3 once every address was asked. One stop for the
    policies of thousands of mappings, without a table entry built for each."""
    top = bytes.fromhex("4d85e4")                       # test r12, r12
    body = bytes.fromhex(
        "488b03"          # mov rax, [rbx]
        "488b7b08"        # mov rdi, [rbx+8]
        "488b7310"        # mov rsi, [rbx+16]
        "488b5318"        # mov rdx, [rbx+24]
        "4c8b5320"        # mov r10, [rbx+32]
        "4c8b4328"        # mov r8, [rbx+40]
        "4c8b4b30"        # mov r9, [rbx+48]
        "0f05"            # syscall
        "48894338"        # mov [rbx+56], rax
        "483d01f0ffff")   # cmp rax, -4095
    step = bytes.fromhex("4883c340" "49ffcc")          # add rbx, 64; dec r12
    policies = bytes.fromhex(
        "4c89f3"          # mov rbx, r14          (the stride: nodemask bytes + 16)
        "48c1eb03"        # shr rbx, 3
        "4883c310")       # add rbx, 16
    ask_top = bytes.fromhex("4885ed")                   # test rbp, rbp
    ask = bytes.fromhex(
        "4d8b17"          # mov r10, [r15]        (addr)
        "49c7450800000000"  # mov qword [r13+8], 0  (the mode is an int: its slot whole)
        "498d7d08"        # lea rdi, [r13+8]      (int *mode)
        "498d7510"        # lea rsi, [r13+16]     (nodemask)
        "4c89f2"          # mov rdx, r14          (maxnode)
        "41b802000000"    # mov r8d, MPOL_F_ADDR
        f"b8{NR['get_mempolicy']:02x}000000"  # mov eax, get_mempolicy
        "0f05"            # syscall
        "49894500"        # mov [r13], rax
        "4983c708"        # add r15, 8
        "4901dd"          # add r13, rbx
        "48ffcd")         # dec rbp
    # top, jz policies, body, jae done, step, jmp top,
    # policies, ask_top, jz done, ask, jmp ask_top, done: int3
    jz_at = len(top)
    jae_at = jz_at + 2 + len(body)
    jmp_at = jae_at + 2 + len(step)
    policies_at = jmp_at + 2
    ask_top_at = policies_at + len(policies)
    ask_jz_at = ask_top_at + len(ask_top)
    ask_jmp_at = ask_jz_at + 2 + len(ask)
    done = ask_jmp_at + 2
    code = (top + bytes([0x74, policies_at - (jz_at + 2)]) + body + bytes([0x73, done - (jae_at + 2)]) + step
            + bytes([0xEB, (-(jmp_at + 2)) & 0xFF])
            + policies + ask_top + bytes([0x74, done - (ask_jz_at + 2)]) + ask
            + bytes([0xEB, (ask_top_at - (ask_jmp_at + 2)) & 0xFF]) + b"\xcc")
    assert len(code) == done + 1 and done < 128
    return code


BATCH_CODE = _batch_code()
BATCH_ENTRY = 64             # bytes of one entry of a batch's table


@dataclasses.dataclass
class PolicyAsk:
    """NUMA policies a batch asks after its calls (``BATCH_CODE``): get_mempolicy(MPOL_F_ADDR)
    at each of ``addrs`` (written at ``at``), answering ``answer_size(node_bits)`` bytes each
    from ``answers_at``: the result, the mode, the nodemask."""

    at: int
    addrs: list[int]
    answers_at: int
    node_bits: int

    @staticmethod
    def answer_size(node_bits: int) -> int:
        return 16 + node_bits // 8


class Injector:
    """Inject system calls into one stopped thread; ``close`` restores it exactly. With
    ``park``, ``close`` also leaves it in an interrupt stop (``_park``): for a tracer whose
    death must leave the process as it was (the holder)."""

    def __init__(self, tid: int, gadget: int, *, park: bool = False) -> None:
        self.tid = tid
        self.gadget = gadget
        self.park = park
        self.stepped = False
        self.saved_regs = ptrace.get_regs(tid)
        self.saved_mask = ptrace.get_sigmask(tid)
        self.suppressed_stops: list[int] = []
        # SIGTRAPs someone sent that arrived while we stepped (dequeued: no peek shows them),
        # each its siginfo: sent again at ``close``, and carried by a dump made meanwhile
        self.sent_traps: list[bytes] = []
        self.clones: list[int] = []
        ptrace.set_sigmask(tid, ALL_SIGNALS)
        self._closed = False

    def raw(self, nr: int, *args: int) -> int:
        """Run one system call; returns the kernel's raw (signed) result."""
        if len(args) > 6:
            raise ValueError("at most six system call arguments")
        a = list(args) + [0] * (6 - len(args))
        regs = dataclasses.replace(
            self.saved_regs, rax=nr, rdi=a[0] & U64, rsi=a[1] & U64, rdx=a[2] & U64,
            r10=a[3] & U64, r8=a[4] & U64, r9=a[5] & U64, rip=self.gadget, orig_rax=U64)
        ptrace.set_regs(self.tid, regs)
        self.stepped = True
        while True:
            ptrace.singlestep(self.tid)
            stop = ptrace.wait_stop(self.tid)
            if stop.event in (ptrace.PTRACE_EVENT_CLONE, ptrace.PTRACE_EVENT_FORK):
                self.clones.append(ptrace.event_msg(self.tid))
                continue          # one more step finishes the clone() itself
            if stop.event == 0 and stop.sig == signal.SIGTRAP:
                si_code = int.from_bytes(ptrace.get_siginfo(self.tid)[SI_CODE_OFFSET:SI_CODE_OFFSET + 4],
                                         "little", signed=True)
                if si_code > 0:
                    break           # the kernel's trap after our step
                # sent by someone (kill, tgkill): not our step; send it again later
                self.sent_traps.append(ptrace.get_siginfo(self.tid))
                continue
            if stop.event == 0:
                # A stop signal got past the blocked mask: hold it back, report it later.
                self.suppressed_stops.append(stop.sig)
            # Otherwise a group stop or interrupt: step again.
        return to_signed(ptrace.get_regs(self.tid).rax)

    def batch(self, code: int, table: int, mem: RemoteMemory, calls: list[tuple[str, tuple[int, ...]]],
              results: list[int] | None = None, policies: "PolicyAsk | None" = None) -> tuple[int, int]:
        """Run ``calls`` in one go through ``BATCH_CODE`` (copied to ``code``), their table
        written at ``table``: one stop for all of them instead of one each. Returns (how many
        succeeded, the result of the one that failed, or 0); ``results``, if given, gets the
        result of each call that succeeded appended (one read of the table). ``policies``: the
        addresses whose NUMA policies are asked in the same stop once every call succeeded
        (written where it says; the answers are the caller's to read)."""
        if not calls and policies is None:
            return 0, 0
        entries = b"".join(struct.pack("<8Q", NR[name], *[a & U64 for a in args], *[0] * (6 - len(args)), 0)
                           for name, args in calls)
        if entries:
            mem.write(table, entries)
        ask = policies or PolicyAsk(0, [], 0, 0)
        if ask.addrs:
            mem.write(ask.at, array.array("Q", ask.addrs).tobytes())
        regs = dataclasses.replace(self.saved_regs, rbx=table, r12=len(calls), rip=code, orig_rax=U64,
                                   rbp=len(ask.addrs), r15=ask.at, r13=ask.answers_at, r14=ask.node_bits)
        ptrace.set_regs(self.tid, regs)
        self.stepped = True          # it ends in our trap's stop, as a step does (``_park``)
        while True:
            ptrace.cont(self.tid)
            stop = ptrace.wait_stop(self.tid)
            if stop.event == 0 and stop.sig == signal.SIGTRAP:
                si_code = int.from_bytes(ptrace.get_siginfo(self.tid)[SI_CODE_OFFSET:SI_CODE_OFFSET + 4],
                                         "little", signed=True)
                if si_code > 0:
                    break           # our int3
                self.sent_traps.append(ptrace.get_siginfo(self.tid))
                continue
            if stop.event == 0:
                self.suppressed_stops.append(stop.sig)
            # A group stop or an interrupt: go on.
        now = ptrace.get_regs(self.tid)
        done = len(calls) - now.r12
        if results is not None and done:
            raw = mem.read(table, done * BATCH_ENTRY)
            results += [to_signed(r) for r in struct.unpack_from(f"<{done * 8}Q", raw)[7::8]]
        if done == len(calls):
            return done, 0
        return done, to_signed(struct.unpack("<Q", mem.read(now.rbx + 56, 8))[0])

    def batch_results(self, code: int, table: int, mem: RemoteMemory, calls: list[tuple[str, tuple[int, ...]]],
                      max_calls: int, policies: "PolicyAsk | None" = None) -> list[int]:
        """Run every one of ``calls`` through ``batch`` (``max_calls`` a table at a time), going
        on past a failure: each one's raw result (``-errno`` for a failure). ``policies`` are
        asked with the last table."""
        results: list[int] = []
        while True:
            chunk = calls[len(results): len(results) + max_calls]
            last = len(results) + len(chunk) == len(calls)
            if not chunk and (policies is None or not last):
                return results
            done, err = self.batch(code, table, mem, chunk, policies=policies if last else None)
            if done:
                raw = mem.read(table, done * BATCH_ENTRY)
                results += [to_signed(struct.unpack_from("<Q", raw, i * BATCH_ENTRY + 56)[0]) for i in range(done)]
            if done < len(chunk):
                results.append(err)
            elif last:
                return results

    def call(self, name: str, *args: int) -> int:
        """Run a named system call; raise InjectionError on failure."""
        ret = self.raw(NR[name], *args)
        if -4096 < ret < 0:
            raise InjectionError(-ret, f"{name}() in pid {self.tid}: {os.strerror(-ret)}")
        return ret

    def close(self, regs: GpRegs | None = None, sigmask: int | None = None) -> None:
        """Put the thread back as it was (or as given)."""
        if self._closed:
            return
        self._closed = True
        ptrace.set_regs(self.tid, regs if regs is not None else self.saved_regs)
        ptrace.set_sigmask(self.tid, sigmask if sigmask is not None else self.saved_mask)
        for _ in self.sent_traps:
            tgkill(_tgid(self.tid), self.tid, signal.SIGTRAP)
        self.sent_traps = []
        if self.park and self.stepped:
            self._park()

    def _park(self) -> None:
        """Leave the thread in an interrupt stop, not in the signal-delivery stop of our last
        step's SIGTRAP: a tracer that dies (SIGKILL) lets its tracees go on, and one left in a
        signal-delivery stop gets that signal, which killed the process (SIGTRAP's default
        action). Interrupted first, then continued without the signal, the thread stops again
        before it runs an instruction (the kernel looks at the interrupt before the signals).
        A signal of the process's own that stops it instead stays with it, to be delivered."""
        ptrace.interrupt(self.tid)
        ptrace.cont(self.tid, 0)
        while True:
            stop = ptrace.wait_stop(self.tid)
            if stop.event == 0 and stop.sig == signal.SIGTRAP and self._our_trap():
                ptrace.cont(self.tid, 0)     # a late trap of our own steps: drop it too
                continue
            return

    def _our_trap(self) -> bool:
        si_code = int.from_bytes(ptrace.get_siginfo(self.tid)[SI_CODE_OFFSET:SI_CODE_OFFSET + 4], "little",
                                 signed=True)
        return si_code > 0

    def __enter__(self) -> "Injector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tgid(tid: int) -> int:
    with open(f"/proc/{tid}/status") as f:
        return int(next(line for line in f if line.startswith("Tgid:")).split()[1])


class ScratchTaken(InjectionError):
    """The address asked for a scratch mapping cannot have it: the process mapped something
    there, or the kernel will not map there for it (EEXIST, ENOMEM, EINVAL)."""


SCRATCH_SIZE = 21 * PAGE_SIZE    # (a dump asks the NUMA policies of 2,000 mappings a stop in 16 of them)
LOWEST_SPARE = 1 << 32        # far above the mmap_min_addr of any kernel, and the executable and heap of most


def spare_address(spans: list[tuple[int, int]], size: int = SCRATCH_SIZE) -> int | None:
    """Where a scratch of ``size`` bytes can go in a process whose mappings were ``spans``
    (sorted): the middle of their largest gap, far from where the kernel places new mappings
    (top-down, right under the lowest library), so that the process, running on since the
    spans were read, has most likely mapped nothing there. None if no gap has room."""
    best, best_len = None, 0
    low = LOWEST_SPARE
    for start, end in [*(s for s in spans if s[0] < TASK_SIZE), (TASK_SIZE, TASK_SIZE)]:   # ([vsyscall] is above)
        if start - low > best_len:
            best, best_len = low, start - low
        low = max(low, end)
    if best is None or best_len < size + 2 * PAGE_SIZE:
        return None
    return (best + best_len // 2) // PAGE_SIZE * PAGE_SIZE


class Scratch:
    """An anonymous mapping inside the tracee, for system call arguments: private where the
    kernel chooses (``at=0``); else shared, at ``at``, which must be free (``ScratchTaken``).
    A shared anonymous mapping never merges with a neighbour, so a scratch put at a chosen
    address is exactly the mapping [at, at + size) for as long as it lives: a reader of the
    process's layout meanwhile can leave it out (``precopy.tracker.DirtyTracker.hidden``)."""

    def __init__(self, inj: Injector, mem: RemoteMemory, size: int = SCRATCH_SIZE, *,
                 prot: int = PROT_READ | PROT_WRITE, at: int = 0) -> None:
        self.inj = inj
        self.mem = mem
        self.size = size
        self.addr = 0
        if not at:
            self.addr = inj.call("mmap", 0, size, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            return
        try:
            got = inj.call("mmap", at, size, prot, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        except InjectionError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOMEM, errno.EINVAL):
                raise ScratchTaken(exc.errno, f"pid {inj.tid} cannot have a scratch at {at:#x}: {exc}") from None
            raise            # (EPERM, EACCES: no writable code there; the caller asks for less)
        if got != at:            # a kernel before 4.17 takes the address as a hint
            inj.call("munmap", got, size)
            raise ScratchTaken(errno.EEXIST, f"pid {inj.tid} has a mapping at {at:#x}")
        self.addr = got

    def put(self, offset: int, data: bytes) -> int:
        if offset + len(data) > self.size:
            raise ValueError("scratch area overflow")
        self.mem.write(self.addr + offset, data)
        return self.addr + offset

    def get(self, offset: int, size: int) -> bytes:
        return self.mem.read(self.addr + offset, size)

    def release(self) -> None:
        if self.addr:
            self.inj.call("munmap", self.addr, self.size)
            self.addr = 0
