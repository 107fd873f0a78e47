"""The restore stub: a tiny static ELF (no libc, no rseq, no TLS) that waits to be rebuilt.

kcr-migrate writes it itself, byte by byte, into a memfd and spawns it. The stub forks once
so that the process to be restored is not our child (its parent becomes the nearest child
subreaper or init), reports the grandchild's pid on stdout, and the grandchild sleeps in
``pause()`` until the restorer seizes it. An ``alarm(60)`` ends a stub nobody took over.

To keep a pid, ``spawn(pid)`` builds the stub for that pid: its first process calls
``clone3`` with ``set_tid`` (the ``clone_args`` and the pid are read-only data in the ELF)
instead of ``fork``, and reports ``-errno`` in place of the pid when the kernel refuses.
Both programs have one code layout, so ``STUB_SYSCALL`` is the same for every stub.
``clone_args`` packs the kernel's struct for anyone else choosing an id the same way
(a thread's tid, with ``CLONE_THREAD``).
"""
from __future__ import annotations

import errno
import os
import struct

BASE = 0x10000            # where the stub's single segment is loaded (mmap_min_addr)
_ENTRY_OFFSET = 0x78      # ELF header (64) + one program header (56)

SYS_CLONE3 = 435
SIGCHLD = 17
CLONE_ARGS_SIZE_VER2 = 88     # struct clone_args up to and including ``cgroup``
_PID_T_MAX = 2**31 - 1


def clone_args(flags: int, exit_signal: int, set_tid_addr: int, set_tid_size: int, stack: int = 0,
               stack_size: int = 0, tls: int = 0, child_tid: int = 0, parent_tid: int = 0) -> bytes:
    """``struct clone_args`` for clone3(2) (CLONE_ARGS_SIZE_VER2, 88 bytes), ``pidfd`` and
    ``cgroup`` 0. ``set_tid_addr`` is the address, in the calling process, of an array of
    ``set_tid_size`` pid_t (int32): one id per pid-namespace level, innermost first."""
    return struct.pack("<11Q", flags, 0, child_tid, parent_tid, exit_signal, stack, stack_size,
                       tls, set_tid_addr, set_tid_size, 0)


class PidTaken(OSError):
    """The pid a restored process must keep belongs to another process or thread here."""

    def __init__(self, pid: int) -> None:
        super().__init__(errno.EEXIST, f"pid {pid} is taken on this host")
        self.pid = pid


class _Asm:
    """Just enough x86_64 for the stub: 32-bit immediates, short jumps."""

    def __init__(self) -> None:
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str]] = []

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def mov_eax(self, imm: int) -> None:
        self.code += b"\xb8" + struct.pack("<I", imm)

    def mov_edi(self, imm: int) -> None:
        self.code += b"\xbf" + struct.pack("<I", imm)

    def mov_edx(self, imm: int) -> None:
        self.code += b"\xba" + struct.pack("<I", imm)

    def mov_esi(self, imm: int) -> None:
        self.code += b"\xbe" + struct.pack("<I", imm)

    def mov_rsi_rsp(self) -> None:
        self.code += b"\x48\x89\xe6"

    def push_rax(self) -> None:
        self.code += b"\x50"

    def test_eax(self) -> None:
        self.code += b"\x85\xc0"

    def syscall(self) -> int:
        at = len(self.code)
        self.code += b"\x0f\x05"
        return at

    def _jump(self, opcode: int, target: str) -> None:
        self.code += bytes([opcode, 0])
        self.fixups.append((len(self.code) - 1, target))

    def jz(self, target: str) -> None:
        self._jump(0x74, target)

    def jmp(self, target: str) -> None:
        self._jump(0xEB, target)

    def link(self) -> bytes:
        for at, target in self.fixups:
            rel = self.labels[target] - (at + 1)
            assert -128 <= rel < 128
            self.code[at] = rel & 0xFF
        return bytes(self.code)


def _program(pid: int | None = None) -> tuple[bytes, int]:
    a = _Asm()
    # The first process: fork(), or clone3(&args, 88) for a kept pid. Both take the same
    # four instructions (fork ignores rdi and rsi), so the code, the name's address and
    # the pause() gadget sit at the same place in every stub; the args' address is
    # patched in below, once the code's length is known.
    args_at = len(a.code) + 1
    a.mov_edi(0)
    a.mov_esi(0 if pid is None else CLONE_ARGS_SIZE_VER2)
    a.mov_eax(57 if pid is None else SYS_CLONE3)
    a.syscall()
    a.test_eax()
    a.jz("child")
    a.push_rax()           # parent: write(1, &child_pid or -errno, 4); exit(0)
    a.mov_edi(1)
    a.mov_rsi_rsp()
    a.mov_edx(4)
    a.mov_eax(1)
    a.syscall()
    a.mov_edi(0)
    a.mov_eax(60)
    a.syscall()
    a.label("child")
    a.mov_eax(112)         # setsid()
    a.syscall()
    a.mov_edi(15)          # prctl(PR_SET_NAME, "kcr-stub"): recognisable in ps
    name_at = len(a.code) + 1
    a.mov_esi(0)           # patched below with the name's address
    a.mov_eax(157)
    a.syscall()
    a.mov_edi(60)          # alarm(60): an orphaned stub ends by itself
    a.mov_eax(37)
    a.syscall()
    a.label("loop")
    a.mov_eax(34)          # pause()
    pause_at = a.syscall()
    a.jmp("loop")
    code = bytearray(a.link())
    name_addr = BASE + _ENTRY_OFFSET + len(code)
    code[name_at: name_at + 4] = struct.pack("<I", name_addr)
    data = bytearray(b"kcr-stub\0")
    if pid is not None:
        data += bytes(-(len(code) + len(data)) % 8)        # clone_args 8-aligned
        args_addr = BASE + _ENTRY_OFFSET + len(code) + len(data)
        data += clone_args(0, SIGCHLD, args_addr + CLONE_ARGS_SIZE_VER2, 1)
        data += struct.pack("<i", pid)                    # set_tid[0]
        code[args_at: args_at + 4] = struct.pack("<I", args_addr)
    return bytes(code + data), pause_at


def build(pid: int | None = None) -> tuple[bytes, int]:
    """The ELF image (forking, or creating ``pid``) and the address of a ``syscall``
    instruction in it, the same for every ``pid``."""
    code, syscall_at = _program(pid)
    size = _ENTRY_OFFSET + len(code)
    entry = BASE + _ENTRY_OFFSET
    ehdr = struct.pack(
        "<4sBBBBB7sHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7,   # 64-bit, little-endian, SysV
        2, 0x3E, 1, entry, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, BASE, BASE, size, size, 0x1000)   # PT_LOAD, R+X
    return ehdr + phdr + code, entry + syscall_at


STUB_ELF, STUB_SYSCALL = build()


def spawn(pid: int | None = None) -> int:
    """Start a stub; returns the pid of the process to restore into (not our child).

    With ``pid``, that process is created with exactly that pid (clone3 with set_tid):
    ``PidTaken`` if a process or thread here has it; ``OSError`` with the kernel's errno
    if the kernel refuses otherwise (EPERM: kept pids need CAP_CHECKPOINT_RESTORE or
    CAP_SYS_ADMIN over this pid namespace, i.e. root; EINVAL: pid not below pid_max).
    """
    if pid is None:
        elf = STUB_ELF
    else:
        if not 0 < pid <= _PID_T_MAX:     # set_tid 0 would mean "any pid"
            raise ValueError(f"pid {pid} is not a valid pid")
        elf = build(pid)[0]
    memfd = os.memfd_create("kcr-stub", os.MFD_CLOEXEC)
    try:
        os.write(memfd, elf)
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        try:
            child = os.posix_spawn(
                f"/proc/self/fd/{memfd}", ["kcr-stub"], {},
                file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                              (os.POSIX_SPAWN_DUP2, wfd, 1),
                              (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0)],
                setsigdef=[s for s in range(1, 65) if s not in (9, 19, 32, 33)],
                setsigmask=[])
            os.close(wfd)
            wfd = -1
            data = b""
            while len(data) < 4:
                chunk = os.read(rfd, 4 - len(data))
                if not chunk:
                    break
                data += chunk
            os.waitpid(child, 0)
        finally:
            os.close(rfd)
            if wfd >= 0:
                os.close(wfd)
    finally:
        os.close(memfd)
    if len(data) != 4:
        raise OSError("the restore stub did not start")
    got: int = struct.unpack("<i", data)[0]
    if got > 0:
        return got
    err = -got
    if pid is None:
        raise OSError(err, f"the restore stub could not fork: {os.strerror(err)}")
    if err == errno.EEXIST:
        raise PidTaken(pid)
    if err == errno.EINVAL:
        raise OSError(err, f"cannot create pid {pid}: {os.strerror(err)} (is it below "
                      "/proc/sys/kernel/pid_max? kept pids also need root: CAP_CHECKPOINT_RESTORE)")
    raise OSError(err, f"cannot create pid {pid}: {os.strerror(err)}; kept pids need root "
                  "(CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN over this pid namespace)")
