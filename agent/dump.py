"""Dumping a frozen process: threads, process-wide state, files, layout and pages.

What /proc and ptrace show directly is read from there; what only the process itself can
tell (signal handlers, timers, tid addresses, alternate signal stacks, brk, dumpable) is
asked by injected system calls, answering into a scratch mapping that is removed again.
A process left running afterwards sees no difference.

Everything here runs on the tracer thread, with the process frozen (``agent.freeze``).
"""
from __future__ import annotations

import errno
import os
import platform
import socket
import struct
import time
from dataclasses import dataclass, replace
from typing import Callable, Mapping

from agent import cgroups, fdtable, mempolicy, ptrace, sched, seccomp, timens
from agent.freeze import NR_RESTART_SYSCALL, Held
from agent.inject import (
    BATCH_CODE,
    BATCH_ENTRY,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    InjectionError,
    Injector,
    PolicyAsk,
    RemoteMemory,
    Scratch,
    ScratchTaken,
    U64,
    to_signed,
    syscall_gadget,
)
from agent.procfs import read_limits, read_stat, read_status, read_text, thread_comm
from precopy.kernel import boot_id, get_robust_list, xsave_supported_mask
from precopy.layout import LayoutCache, MapEntry, MapsCache, PageFinder, read_maps, read_smaps_flags, to_vma
from precopy.pagemap import PAGE_IS_GUARD, PagemapScanner, pagemap_scan_works
from transport.errors import UnsupportedResource
from transport.schema import (
    AUDIT_UID_UNSET,
    MEMBARRIER_REGISTER_COMMANDS,
    MEMBARRIER_REGISTRATIONS,
    FORMAT_VERSION,
    MAX_GUARD_REGIONS,
    PAGE_SIZE,
    TASK_SIZE,
    Creds,
    GpRegs,
    GuardRegion,
    ImageHeader,
    ITimer,
    Mappings,
    MemPolicy,
    MmFields,
    PosixTimer,
    ProcessState,
    Rlimit,
    SigAction,
    ThreadState,
)

TOOL_VERSION = "0.1.0"
SIGKILL, SIGSTOP, SIGALRM = 9, 19, 14
PR_GET_DUMPABLE, PR_GET_SECUREBITS, PR_GET_CHILD_SUBREAPER, PR_GET_TID_ADDRESS = 3, 27, 37, 40
PR_GET_THP_DISABLE = 42
PR_GET_MDWE = 66
PR_GET_PDEATHSIG = 2
MEMBARRIER_CMD_GET_REGISTRATIONS = 1 << 9
ERESTART_CODES = (-512, -513, -514, -516)


def image_header(pid: int, kind: str, xstate: bytes) -> ImageHeader:
    clocks = timens.view(pid)
    mono_off, boot_off = timens.offsets(pid)
    return ImageHeader(
        format_version=FORMAT_VERSION, tool_version=TOOL_VERSION, kernel_release=platform.release(),
        arch=platform.machine(), page_size=PAGE_SIZE, xsave_mask=xsave_supported_mask(),
        xsave_size=len(xstate), hostname=socket.gethostname(), created_unix=time.time(), pid=pid, kind=kind,
        monotonic_ns=clocks.monotonic_ns, boottime_ns=clocks.boottime_ns, realtime_ns=clocks.realtime_ns,
        boot_id=boot_id(), timens_monotonic_ns=mono_off, timens_boottime_ns=boot_off)


def _u64(data: bytes, off: int) -> int:
    return int.from_bytes(data[off: off + 8], "little")


def _rseq_fixup(mem: RemoteMemory, regs: GpRegs, rseq_addr: int) -> GpRegs:
    """A thread inside an rseq critical section resumes at its abort handler (as the kernel would)."""
    if not rseq_addr:
        return regs
    try:
        cs_ptr = _u64(mem.read(rseq_addr + 8, 8), 0)
        if not cs_ptr:
            return regs
        cs = mem.read(cs_ptr, 32)
    except OSError:
        return regs
    start_ip, post_commit_offset, abort_ip = _u64(cs, 8), _u64(cs, 16), _u64(cs, 24)
    if start_ip <= regs.rip < start_ip + post_commit_offset:
        return replace(regs, rip=abort_ip)
    return regs


@dataclass
class Collected:
    process: ProcessState
    threads: list[ThreadState]
    fds: fdtable.FdState
    xstate_size: int


# The scratch mapping a dump borrows: answers at the start, then the batch code and its table,
# then the addresses whose NUMA policies a batch asks, and their answers, to its end.
SIGACTIONS_AT, ITIMERS_AT, SUBREAPER_AT, PDEATHSIG_AT, THREAD_AT = 0, 2112, 2240, 2296, 2304
POLICY_AT = THREAD_AT + 32      # a thread's get_mempolicy: mode (8 bytes), then its nodemask
RANGES_AT = PAGE_SIZE           # each mapping's get_mempolicy, one call each: mode and nodemask
CODE_AT, TABLE_AT = 2 * PAGE_SIZE, 3 * PAGE_SIZE
TABLE_CALLS = PAGE_SIZE // BATCH_ENTRY
TIMERS_AT = 4 * PAGE_SIZE       # each POSIX timer's timer_gettime (32 bytes), for the first BATCHED_TIMERS
BATCHED_TIMERS = PAGE_SIZE // 32
ASKED_AT = 5 * PAGE_SIZE


class Calls:
    """System calls in the frozen process's threads, answering into the scratch: all of a
    list in one stop each (``Injector.batch``, its code in the scratch) where the scratch may
    hold code, else one stop per call. Results are raw: ``-errno`` for a failure."""

    def __init__(self, leader: Injector, mem: RemoteMemory, at: int = 0) -> None:
        try:
            self.scratch = Scratch(leader, mem, prot=PROT_READ | PROT_WRITE | PROT_EXEC, at=at)
            self.scratch.put(CODE_AT, BATCH_CODE)
            self.batched = True
        except ScratchTaken:
            raise
        except InjectionError:            # no writable code here (memory-deny-write-execute)
            self.scratch = Scratch(leader, mem, at=at)
            self.batched = False

    def run_asking(self, inj: Injector, calls: list[tuple[str, tuple[int, ...]]], addrs: list[int],
                   bits: int) -> tuple[list[int], bytes]:
        """``run`` ``calls``, then get_mempolicy(MPOL_F_ADDR) at each of ``addrs`` (nodemasks of
        ``bits``): the calls' results, and an answer per address, ``PolicyAsk.answer_size``
        bytes each (its raw result, the mode in eight bytes, the nodemask). Batched, they are
        asked in the stop of the calls' last table, and as many more as the scratch holds in
        each stop after it (``BATCH_CODE``); else one call each."""
        size = PolicyAsk.answer_size(bits)
        if not self.batched:
            results = self.run(inj, calls)
            answers = bytearray()
            entry = size - 8
            base = self.scratch.addr + RANGES_AT
            for first in range(0, len(addrs), PAGE_SIZE // entry):
                chunk = addrs[first:first + PAGE_SIZE // entry]
                got = self.run(inj, [mempolicy.query_call(base + i * entry, base + i * entry + 8, bits, at)
                                     for i, at in enumerate(chunk)])
                raw = self.scratch.get(RANGES_AT, len(chunk) * entry)
                for i, result in enumerate(got):
                    answers += (result & U64).to_bytes(8, "little") + raw[i * entry:(i + 1) * entry]
            return results, bytes(answers)
        per_stop = (self.scratch.size - ASKED_AT) // (8 + size)
        results, parts = [], []
        for first in range(0, max(len(addrs), 1), per_stop):      # once at least: the calls
            chunk = addrs[first:first + per_stop]
            at = self.scratch.addr + ASKED_AT
            asked = PolicyAsk(at, chunk, at + 8 * len(chunk), bits) if chunk else None
            results += inj.batch_results(self.scratch.addr + CODE_AT, self.scratch.addr + TABLE_AT, self.scratch.mem,
                                         calls if first == 0 else [], TABLE_CALLS, asked)
            if chunk:
                parts.append(self.scratch.get(ASKED_AT + 8 * len(chunk), len(chunk) * size))
        return results, b"".join(parts)

    def run(self, inj: Injector, calls: list[tuple[str, tuple[int, ...]]]) -> list[int]:
        if self.batched:
            return inj.batch_results(self.scratch.addr + CODE_AT, self.scratch.addr + TABLE_AT, self.scratch.mem,
                                     calls, TABLE_CALLS)
        out = []
        for name, args in calls:
            try:
                out.append(inj.call(name, *args))
            except InjectionError as exc:
                out.append(-(exc.errno or 1))
        return out


def _ok(result: int, name: str, pid: int) -> int:
    if -4096 < result < 0:
        raise InjectionError(-result, f"{name}() in pid {pid}: {os.strerror(-result)}")
    return result


def collect(held: Held, mem: RemoteMemory, redirect: Mapping[int, str] | None = None,
            fds: fdtable.FdState | None = None, job: mempolicy.JobBounds | None = None,
            scratch_at: int = 0, layout: MapsCache | None = None) -> Collected:
    """Everything but memory, from a frozen process. Leaves the process exactly as it was.
    ``redirect`` (fd -> path) says what fds to the outside become on the destination;
    ``fds``: its fd table, if the caller read it already (with the rest of a tree's); ``job``:
    the bounds of the tree's mappings, where the policies of shared memory change (``agent.mempolicy``);
    ``scratch_at``: where the scratch it borrows for the calls' answers goes, if the caller
    chose (``inject.Scratch``; ``ScratchTaken`` if it is not free), else where the kernel puts it;
    ``layout``: the process's maps as last read (``read_maps``' cache), if the caller keeps them."""
    pid = held.pid
    gadget = syscall_gadget(pid, mem)
    tids = sorted(held.stopped, key=lambda t: t != pid)     # leader first
    maps = read_maps(pid, layout)                             # before the scratch is mapped
    rseq = {tid: abort_rseq_sections(tid, mem) for tid in tids}
    injectors = {tid: Injector(tid, gadget, park=tid not in held.inflight) for tid in tids}
    leader = injectors[pid]
    calls: Calls | None = None
    own = RemoteMemory(pid)       # writes the scratch (``mem`` may be read-only)
    try:
        locked_before = _locked_kb(read_status(pid))
        calls = Calls(leader, own, scratch_at)
        # mlockall(MCL_FUTURE) shows nowhere in /proc, but a new mapping is locked under it.
        # (Nothing else the process's state takes from its status changes with a mapping.)
        status = read_status(pid)
        lock_future = _locked_kb(status) > locked_before
        # The leader's calls for itself, for the process and for the NUMA policies at its
        # mappings' starts go in one batch (one stop); each other thread's in one of its own.
        policies = _Policies(pid, calls)
        starts = [m.start for m in maps if m.end <= TASK_SIZE]
        timers = _timer_lines(pid)
        thread_calls, process_calls = _thread_calls(calls), _process_calls(status, calls.scratch, timers)
        got, answers = calls.run_asking(leader, thread_calls + process_calls, starts, policies.bits)
        threads = [_collect_thread(held, pid, leader, calls, rseq[pid], got[:len(thread_calls)])]
        policies.take(starts, answers)
        threads += [_collect_thread(held, tid, injectors[tid], calls, rseq[tid]) for tid in tids[1:]]
        process = _collect_process(held, leader, calls, status, timers, process_calls,
                                   got[len(thread_calls):len(thread_calls) + len(process_calls)])
        group_stop = ptrace.is_group_stop(held.stopped[pid])
        process = replace(process, lock_future=int(lock_future),
                          mempolicies=_mempolicies(pid, leader, policies, maps, job),
                          stopped=int(group_stop),              # seized in its group stop
                          stop_signal=held.stopped[pid].sig if group_stop else 0)
        fds = fds if fds is not None else fdtable.collect(pid, redirect)
    finally:
        try:
            if calls is not None:
                calls.scratch.release()
        finally:
            own.close()
            for inj in injectors.values():
                inj.close()
    return Collected(process, threads, fds, len(threads[0].xstate))


def abort_rseq_sections(tid: int, mem: RemoteMemory) -> tuple[int, int, int]:
    """Move a thread frozen inside an rseq critical section to its abort handler, as the
    kernel does when it resumes a preempted thread (our injections would otherwise let the
    kernel clear ``rseq_cs`` with the thread still mid-section). Returns its rseq config.
    Must run before anything is injected into the thread."""
    rseq_addr, rseq_len, rseq_sig = ptrace.get_rseq(tid)
    regs = ptrace.get_regs(tid)
    fixed = _rseq_fixup(mem, regs, rseq_addr)
    if fixed != regs:
        ptrace.set_regs(tid, fixed)
    return rseq_addr, rseq_len, rseq_sig


def _thread_calls(calls: Calls) -> list[tuple[str, tuple[int, ...]]]:
    """What a thread is asked of itself, answering into the scratch (``_collect_thread``)."""
    at = calls.scratch.addr + THREAD_AT
    policy_at = calls.scratch.addr + POLICY_AT
    return [("prctl", (PR_GET_TID_ADDRESS, at)), ("sigaltstack", (0, at + 8)), ("prctl", (sched.PR_GET_TIMERSLACK,)),
            mempolicy.query_call(policy_at, policy_at + 8, mempolicy.node_bits()),
            ("prctl", (PR_GET_PDEATHSIG, calls.scratch.addr + PDEATHSIG_AT))]


def _collect_thread(held: Held, tid: int, inj: Injector, calls: Calls,
                    rseq: tuple[int, int, int], got: list[int] | None = None) -> ThreadState:
    """A thread's state; ``got``: the results of its ``_thread_calls``, if they ran already
    (with others, in one batch), else they run now."""
    regs = inj.saved_regs
    if to_signed(regs.rax) == -516 and regs.orig_rax == NR_RESTART_SYSCALL:
        # Thawed by us earlier mid-call: the call to issue again is the one we saw then (its
        # arguments are still in the registers; only rax was replaced by restart_syscall).
        # Else the kernel was continuing it after a stop (SIGSTOP and SIGCONT, a debugger):
        # the code that made it says which (restore turns what stays restart_syscall into EINTR).
        nr = held.restart_nr.get(tid) or restarted_call(calls.scratch.mem, regs)
        if nr is not None:
            regs = replace(regs, orig_rax=nr)
    rseq_addr, rseq_len, rseq_sig = rseq
    bits = mempolicy.node_bits()
    if got is None:
        got = calls.run(inj, _thread_calls(calls))
    for name, result in zip(("prctl", "sigaltstack", "prctl", "", "prctl"), got):
        if name:
            _ok(result, name, tid)
    mode, mode_flags, nodes = 0, 0, b""
    if got[3] != -errno.ENOSYS:             # a kernel without NUMA: every policy is the default
        _ok(got[3], "get_mempolicy", tid)
        mode, mode_flags, nodes = _policy(calls.scratch.get(POLICY_AT, 8 + bits // 8), tid)
    answers = calls.scratch.get(THREAD_AT, 32)
    pdeathsig = int.from_bytes(calls.scratch.get(PDEATHSIG_AT, 4), "little", signed=True)
    tid_address = _u64(answers, 0)
    ss = answers[8:32]
    head, head_len = get_robust_list(tid)
    # (a SIGTRAP the process had pending is dequeued by our steps: the injector holds it)
    pending = ptrace.peek_siginfo(tid, shared=False) + inj.sent_traps
    timer_slack = got[2]
    sch = sched.read_thread(tid)
    if tid in held.inflight:
        pending.insert(0, held.inflight[tid])
    seccomp_mode, filters = seccomp.collect(held.pid, tid)
    return ThreadState(
        tid=tid, leader=tid == held.pid, comm=thread_comm(held.pid, tid), regs=regs,
        xstate=ptrace.get_xstate(tid), sigmask=inj.saved_mask, pending=tuple(pending),
        tid_address=tid_address, robust_list=head, robust_list_len=head_len,
        rseq_addr=rseq_addr, rseq_len=rseq_len, rseq_sig=rseq_sig,
        altstack_sp=_u64(ss, 0), altstack_flags=int.from_bytes(ss[8:12], "little"), altstack_size=_u64(ss, 16),
        timer_slack_ns=timer_slack, nice=sch.nice, sched_policy=sch.sched_policy,
        sched_priority=sch.sched_priority, sched_reset_on_fork=sch.sched_reset_on_fork, cpus=sch.cpus,
        ioprio=sch.ioprio, seccomp=seccomp_mode, seccomp_filters=filters, mempolicy=mode,
        mempolicy_flags=mode_flags, mempolicy_nodes=nodes, pdeathsig=pdeathsig)


# The calls the kernel continues with restart_syscall (ERESTART_RESTARTBLOCK), by number, and
# what their arguments (still in the registers: rdi, rsi, rdx, r10) must look like.
RESTARTABLE: dict[int, Callable[[GpRegs], bool]] = {
    35: lambda r: r.rdi != 0,                                              # nanosleep(req, rem)
    230: lambda r: r.rdi < 16 and r.rsi in (0, 1) and r.rdx != 0,          # clock_nanosleep(clock, flags, req, rem)
    7: lambda r: r.rsi < 1 << 20,                                          # poll(fds, nfds, timeout)
    202: lambda r: r.rdi != 0 and r.rsi & 0x7F in (0, 9) and r.r10 != 0,   # futex(WAIT or WAIT_BITSET, timeout)
}


def restarted_call(mem: RemoteMemory, regs: GpRegs) -> int | None:
    """The system call a thread in restart_syscall had made, from the code before its
    ``syscall`` instruction (which ``rip`` is just past): ``mov $NR, %eax`` (b8 imm32) or
    ``mov $NR, %rax`` (48 c7 c0 imm32) right before it, as glibc up to 2.40 issues a call,
    naming one of ``RESTARTABLE`` with arguments of its shape. None where the code says
    nothing sure (the number came from a register, as glibc 2.41's cancellable calls pass it)."""
    try:
        code = mem.read(regs.rip - 9, 9)
    except OSError:
        return None
    if code[7:] != b"\x0f\x05":
        return None
    for at, prefix in ((2, b"\xb8"), (0, b"\x48\xc7\xc0")):
        if code[at:at + len(prefix)] == prefix:
            nr = int.from_bytes(code[3:7], "little")
            check = RESTARTABLE.get(nr)
            if check is not None and check(regs):
                return nr
    return None


def _policy(answer: bytes, pid: int) -> tuple[int, int, bytes]:
    """get_mempolicy's mode (an int) and nodemask, as (mode, flags, nodes)."""
    try:
        return mempolicy.split(int.from_bytes(answer[:4], "little"), answer[8:])
    except ValueError as exc:
        raise UnsupportedResource(f"pid {pid} has a {exc} this kcr-migrate does not know: it cannot be carried",
                                  pid=pid) from None


class _Policies:
    """get_mempolicy(MPOL_F_ADDR) at addresses of the process (``Calls.run_asking``): ``take``
    keeps what they answered, ``ask`` asks what is not known yet."""

    def __init__(self, pid: int, calls: Calls) -> None:
        self.pid = pid
        self.calls = calls
        self.bits = mempolicy.node_bits()
        self.known: dict[int, mempolicy.Policy | None] = {}
        self.numa = True               # False: a kernel without NUMA (no policies)
        self._parsed: dict[bytes, mempolicy.Policy] = {}      # answers repeat: most are the default

    def take(self, addrs: list[int], answers: bytes) -> None:
        """What ``Calls.run_asking`` answered at ``addrs``."""
        size = PolicyAsk.answer_size(self.bits)
        if addrs and answers == answers[:size] * len(addrs):
            # Most often every mapping answers alike (the default policy): taken once.
            self._take(addrs[:1], answers[:size])
            if self.numa:
                self.known.update(dict.fromkeys(addrs, self.known[addrs[0]]))
            return
        self._take(addrs, answers)

    def _take(self, addrs: list[int], answers: bytes) -> None:
        size = PolicyAsk.answer_size(self.bits)
        parsed = self._parsed
        for i, at in enumerate(addrs):
            result = to_signed(int.from_bytes(answers[i * size:i * size + 8], "little"))
            if result == -errno.ENOSYS:
                self.numa = False
                return
            if result == -errno.EFAULT:
                self.known[at] = None      # not a mapping of the process's own (a gate area)
                continue
            _ok(result, "get_mempolicy", self.pid)
            raw = answers[i * size + 8:(i + 1) * size]
            policy = parsed.get(raw)
            if policy is None:
                policy = parsed[raw] = _policy(raw, self.pid)
            self.known[at] = policy

    def ask(self, inj: Injector, addrs: list[int]) -> list[mempolicy.Policy | None] | None:
        missing = [a for a in addrs if a not in self.known]
        if missing and self.numa:
            self.take(missing, self.calls.run_asking(inj, [], missing, self.bits)[1])
        return [self.known[a] for a in addrs] if self.numa else None


def _mempolicies(pid: int, inj: Injector, policies: _Policies, maps: list[MapEntry],
                 job: mempolicy.JobBounds | None) -> tuple[MemPolicy, ...]:
    """The NUMA policy of each mapping, and of each range of a shmem object's (``agent.mempolicy``):
    get_mempolicy(MPOL_F_ADDR) at the addresses ``mempolicy.probe`` asks (``policies``: those
    known already are not asked again)."""
    if not policies.numa:
        return ()
    found = mempolicy.probe(maps, mempolicy.ShmemDevices(pid), lambda addrs: policies.ask(inj, addrs), job)
    return mempolicy.ranges(found) if found is not None else ()


def _parse_creds(status: Mapping[str, str], securebits: int) -> Creds:
    uids = tuple(int(x) for x in status["Uid"].split())
    gids = tuple(int(x) for x in status["Gid"].split())
    groups = tuple(int(x) for x in status.get("Groups", "").split())
    return Creds(
        uids=uids, gids=gids, groups=groups,  # type: ignore[arg-type]
        cap_inheritable=int(status["CapInh"], 16), cap_permitted=int(status["CapPrm"], 16),
        cap_effective=int(status["CapEff"], 16), cap_bounding=int(status["CapBnd"], 16),
        cap_ambient=int(status.get("CapAmb", "0"), 16), securebits=securebits,
        no_new_privs=status.get("NoNewPrivs", "0") == "1")


def _locked_kb(status: Mapping[str, str]) -> int:
    return int(status.get("VmLck", "0 kB").split()[0])


def _process_calls(status: Mapping[str, str], scratch: Scratch,
                   timers: list[dict[str, str]]) -> list[tuple[str, tuple[int, ...]]]:
    """What the process is asked of itself (in its main thread), answering into the scratch
    (``_collect_process``); ``timers``: its POSIX timers (``_timer_lines``), the first
    ``BATCHED_TIMERS`` of which are asked here too."""
    caught = int(status["SigCgt"], 16)
    asked = [signo for signo in range(1, 65) if signo not in (SIGKILL, SIGSTOP) and caught >> (signo - 1) & 1]
    batch: list[tuple[str, tuple[int, ...]]] = [
        ("rt_sigaction", (signo, 0, scratch.addr + SIGACTIONS_AT + 32 * signo, 8)) for signo in asked]
    batch += [("getitimer", (which, scratch.addr + ITIMERS_AT + 32 * which)) for which in range(3)]
    for i, fields in enumerate(timers[:BATCHED_TIMERS]):
        batch += [("timer_gettime", (int(fields["ID"]), scratch.addr + TIMERS_AT + 32 * i)),
                  ("timer_getoverrun", (int(fields["ID"]),))]
    batch += [("brk", (0,)), ("prctl", (PR_GET_DUMPABLE,)), ("prctl", (PR_GET_SECUREBITS,)),
              ("prctl", (PR_GET_CHILD_SUBREAPER, scratch.addr + SUBREAPER_AT)), ("prctl", (PR_GET_THP_DISABLE,)),
              ("prctl", (PR_GET_MDWE, 0, 0, 0, 0)), ("membarrier", (MEMBARRIER_CMD_GET_REGISTRATIONS, 0, 0))]
    return batch


def _collect_process(held: Held, inj: Injector, calls: Calls, status: Mapping[str, str],
                     timers: list[dict[str, str]], batch: list[tuple[str, tuple[int, ...]]],
                     got: list[int]) -> ProcessState:
    """The process's state; ``status``: its /proc status, ``timers``: its POSIX timers as
    /proc lists them, ``batch``: its ``_process_calls`` (asked with those), ``got``: their results."""
    pid = held.pid
    caught = int(status["SigCgt"], 16)
    ignored = int(status["SigIgn"], 16)
    scratch = calls.scratch
    for (name, _), result in zip(batch[:-2], got):      # all but the last two, which may fail (below)
        _ok(result, name, pid)
    answers = scratch.get(0, SUBREAPER_AT + 4)
    sigactions: list[SigAction] = []
    for signo in range(1, 65):
        if signo in (SIGKILL, SIGSTOP):
            continue
        if caught >> (signo - 1) & 1:
            at = SIGACTIONS_AT + 32 * signo
            sigactions.append(SigAction(signo, _u64(answers, at), _u64(answers, at + 8), _u64(answers, at + 16),
                                        _u64(answers, at + 24)))
        elif ignored >> (signo - 1) & 1:
            sigactions.append(SigAction(signo, 1, 0, 0, 0))
    itimers: list[ITimer] = []
    for which in range(3):
        iv = struct.unpack_from("<4q", answers, ITIMERS_AT + 32 * which)
        itimers.append(ITimer(which, iv[0] * 1_000_000 + iv[1], iv[2] * 1_000_000 + iv[3]))
    shared_pending = ptrace.peek_siginfo(pid, shared=True)
    itimers = [_rearm_fired_real_timer(it, shared_pending) for it in itimers]
    brk, dumpable, securebits, _, thp_disable, mdwe, membarrier = got[-7:]
    if mdwe == -errno.EINVAL:
        mdwe = 0            # a kernel before 6.3: no process denies itself writable code
    _ok(mdwe, "prctl", pid)
    subreaper = int.from_bytes(answers[SUBREAPER_AT:SUBREAPER_AT + 4], "little")
    stat = read_stat(pid)
    mm = MmFields(
        start_code=int(stat[26]), end_code=int(stat[27]), start_data=int(stat[45]), end_data=int(stat[46]),
        start_brk=int(stat[47]), brk=brk, start_stack=int(stat[28]), arg_start=int(stat[48]),
        arg_end=int(stat[49]), env_start=int(stat[50]), env_end=int(stat[51]))
    with open(f"/proc/{pid}/auxv", "rb") as f:
        auxv = f.read()
    rlimits = tuple(Rlimit(r, soft, hard) for r, soft, hard in read_limits(pid))
    exe = os.readlink(f"/proc/{pid}/exe")
    if exe.endswith(" (deleted)"):
        raise UnsupportedResource(f"pid {pid} runs a deleted executable ({exe[:-10]}): restore needs it on disk",
                                  pid=pid)
    return ProcessState(
        pid=pid, exe=exe, cwd=os.readlink(f"/proc/{pid}/cwd"), root=os.readlink(f"/proc/{pid}/root"),
        umask=int(status.get("Umask", "0022"), 8), personality=int(read_text(pid, "personality"), 16),
        dumpable=dumpable, creds=_parse_creds(status, securebits), rlimits=rlimits, mm=mm, auxv=auxv,
        sigactions=tuple(sigactions), itimers=tuple(itimers),
        shared_pending=tuple(shared_pending), child_subreaper=subreaper,
        oom_score_adj=int(read_text(pid, "oom_score_adj")), thp_disable=thp_disable,
        posix_timers=_posix_timers(inj, scratch, timers, got[-7 - 2 * min(len(timers), BATCHED_TIMERS):-7]),
        loginuid=_loginuid(pid),
        membarrier=_membarrier_registrations(inj, membarrier), cgroups=cgroups.read(pid),
        coredump_filter=int(read_text(pid, "coredump_filter"), 16), mdwe=mdwe, guard_regions=read_guard_regions(pid),
        spec_store_bypass=SPECULATION.get(status.get("Speculation_Store_Bypass", ""), 0),
        spec_indirect_branch=SPECULATION.get(status.get("SpeculationIndirectBranch", ""), 0))


# /proc/PID/status's words for a mitigation the process asked for (PR_SET_SPECULATION_CTRL), and
# the prctl value that asks for it again; any other (the default, "not vulnerable", "globally
# mitigated", "always ...") is the host's, not the process's
PR_SPEC_DISABLE, PR_SPEC_FORCE_DISABLE = 4, 8
SPECULATION = {"thread mitigated": PR_SPEC_DISABLE, "thread force mitigated": PR_SPEC_FORCE_DISABLE,
               "conditional disabled": PR_SPEC_DISABLE, "conditional force disabled": PR_SPEC_FORCE_DISABLE}


def read_guard_regions(pid: int) -> tuple[GuardRegion, ...]:
    """The process's guard pages (MADV_GUARD_INSTALL), as PAGEMAP_SCAN tells them
    (PAGE_IS_GUARD, Linux 6.14; before it, no kernel reports them: none are read). One walk of
    the page tables: about 2 ms per GiB of memory in small pages."""
    if not pagemap_scan_works():
        return ()
    try:
        with PagemapScanner(pid) as scanner:
            found = scanner.scan(0, TASK_SIZE, anyof=PAGE_IS_GUARD, returned=PAGE_IS_GUARD)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return ()       # a kernel without PAGE_IS_GUARD
        raise
    if len(found) > MAX_GUARD_REGIONS:
        raise UnsupportedResource(f"pid {pid} has {len(found)} guard regions (MADV_GUARD_INSTALL), more than "
                                  f"kcr-migrate carries ({MAX_GUARD_REGIONS})", pid=pid)
    return tuple(GuardRegion(r.start, r.end) for r in found)


def _loginuid(pid: int) -> int:
    try:
        return int(read_text(pid, "loginuid"))
    except (OSError, ValueError):       # a kernel without audit has no loginuid
        return AUDIT_UID_UNSET


def _membarrier_registrations(inj: Injector, registrations: int) -> int:
    """The membarrier commands the process registered for: ``registrations``, what
    MEMBARRIER_CMD_GET_REGISTRATIONS (Linux 6.3) answered, or where it failed, each private
    expedited barrier issued once, which only a registered process may (EPERM otherwise).
    Before 6.3 a global expedited registration cannot be seen, and is not carried."""
    if not -4096 < registrations < 0:
        return registrations & MEMBARRIER_REGISTRATIONS
    found = 0
    for register in MEMBARRIER_REGISTER_COMMANDS[1:]:     # the barrier's command is the bit below
        try:
            inj.call("membarrier", register >> 1, 0, 0)
            found |= register
        except InjectionError:
            continue
    return found


_NOTIFY = {"signal": 0, "none": 1, "thread": 2}


def _timer_lines(pid: int) -> list[dict[str, str]]:
    """Each timer_create() timer of the process, as /proc/PID/timers lists it (field: value)."""
    blocks: list[dict[str, str]] = []
    for line in read_text(pid, "timers").splitlines():
        key, _, value = line.partition(":")
        if key == "ID":
            blocks.append({})
        if blocks:
            blocks[-1][key.strip()] = value.strip()
    return blocks


def _posix_timers(inj: Injector, scratch: Scratch, blocks: list[dict[str, str]],
                  batched: list[int]) -> tuple[PosixTimer, ...]:
    """The process's timer_create() timers: what /proc/PID/timers says of each (``blocks``),
    and the time left, period and overrun (timer_gettime and timer_getoverrun, in the
    process): the first ones' asked in the process's batch (``batched``: their results,
    the time answered at ``TIMERS_AT``), the rest one call at a time."""
    timers = []
    times = scratch.get(TIMERS_AT, 32 * len(batched) // 2) if batched else b""
    for i, fields in enumerate(blocks):
        tid = int(fields["ID"])
        signo, _, sigval = fields["signal"].partition("/")
        how, _, target = fields["notify"].partition("/")       # "signal/pid.123", "signal/tid.124", "none/pid.1"
        kind, _, who = target.partition(".")
        notify = _NOTIFY[how] | (4 if kind == "tid" else 0)
        if 2 * i < len(batched):
            isec, insec, vsec, vnsec = struct.unpack_from("<4q", times, 32 * i)
            overrun = batched[2 * i + 1]
        else:
            inj.call("timer_gettime", tid, scratch.addr)
            isec, insec, vsec, vnsec = struct.unpack("<4q", scratch.get(0, 32))
            overrun = inj.call("timer_getoverrun", tid)
        timers.append(PosixTimer(id=tid, clockid=int(fields["ClockID"]), signo=int(signo), sigval=int(sigval, 16),
                                 notify=notify, tid=int(who) if notify & 4 else 0,
                                 value_ns=vsec * 1_000_000_000 + vnsec, interval_ns=isec * 1_000_000_000 + insec,
                                 overrun=overrun))
    return tuple(timers)


def _rearm_fired_real_timer(it: ITimer, shared_pending: list[bytes]) -> ITimer:
    """A periodic ITIMER_REAL that fired while the process was frozen is disarmed until its
    SIGALRM is dequeued (the kernel re-arms it then, but not for a SIGALRM we queue again at
    restore). Record it as due one interval from now, which is what the kernel would do."""
    alarm_pending = any(int.from_bytes(info[:4], "little") == SIGALRM for info in shared_pending)
    if it.which == 0 and it.value_us == 0 and it.interval_us > 0 and alarm_pending:
        return ITimer(it.which, it.interval_us, it.interval_us)
    return it


def collect_layout(pid: int, cache: LayoutCache | None = None) -> Mappings:
    """The process's layout, through ``cache`` where the caller read it before (only what
    changed since is made anew)."""
    if cache is not None:
        return Mappings(cache.read(pid))
    return Mappings(tuple(to_vma(m, flags) for m, flags in read_smaps_flags(pid)))


def in_syscall(regs: GpRegs) -> bool:
    return to_signed(regs.orig_rax) >= 0 and to_signed(regs.rax) in ERESTART_CODES


__all__ = ["Collected", "collect", "collect_layout", "image_header", "in_syscall", "PageFinder"]
