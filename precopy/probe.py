"""Probing the kernel for dirty-page tracking, and choosing a tracker for a process.

Each backend has a tiny real check run on this process (CRIU's kerndat style), not a version
test: uffd-wp registers and scans a scratch mapping, soft-dirty clears, writes and reads back a
page's bit, checksum reads its own memory through process_vm_readv. ``choose_tracker`` runs
them before anything is frozen and says which backend it picked and why; it also refuses
processes a backend cannot follow (pinned memory, io_uring, a userfaultfd of their own).
"""
from __future__ import annotations

import os
from dataclasses import field
from typing import Iterator

from precopy import uffd as uffd_mod
from precopy.pagemap import PM_SOFT_DIRTY, pagemap_scan_works, read_pagemap
from transport.errors import KernelFeatureMissing, NoSuchProcess, PermissionDenied, ProcessError, UnsupportedResource
from transport.frozen import frozen
from transport.schema import PAGE_SIZE

BACKENDS = ("uffd-wp", "soft-dirty", "checksum")     # in order of preference
CHOICES = ("auto",) + BACKENDS


@frozen
class Probe:
    name: str
    available: bool
    reason: str


def _probe_soft_dirty() -> Probe:
    """Write, clear, touch, read back: does a written page become soft-dirty here?"""
    import ctypes
    import mmap

    page = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf = (ctypes.c_char * PAGE_SIZE).from_buffer(page)
        addr = ctypes.addressof(buf)
        buf[0] = b"x"
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("4")
            except OSError as exc:
                return Probe("soft-dirty", False, f"/proc/self/clear_refs refused '4': {exc.strerror}")
            if read_pagemap(fd, addr, addr + PAGE_SIZE)[0] & PM_SOFT_DIRTY:
                return Probe("soft-dirty", False, "clearing soft-dirty bits had no effect")
            buf[0] = b"y"
            dirty = bool(read_pagemap(fd, addr, addr + PAGE_SIZE)[0] & PM_SOFT_DIRTY)
        finally:
            os.close(fd)
            del buf
    finally:
        page.close()
    if not dirty:
        return Probe("soft-dirty", False,
                     "a written page did not become soft-dirty (kernel built without CONFIG_MEM_SOFT_DIRTY)")
    return Probe("soft-dirty", True, "written pages become soft-dirty after clear_refs on this kernel")


def _probe_uffd_wp() -> Probe:
    if not pagemap_scan_works():
        return Probe("uffd-wp", False, "PAGEMAP_SCAN is missing (Linux >= 6.7 needed)")
    ok, why = uffd_mod.probe()
    return Probe("uffd-wp", ok, why)


def _probe_checksum() -> Probe:
    from precopy.kernel import process_vm_readv
    from transport.buffers import buffer_address
    src = bytearray(b"k" * 64)
    dst = bytearray(64)
    try:
        process_vm_readv(os.getpid(), [(buffer_address(dst), 64)], [(buffer_address(src), 64)])
    except OSError as exc:
        return Probe("checksum", False, f"process_vm_readv failed: {exc.strerror}")
    if dst != src:
        return Probe("checksum", False, "process_vm_readv read the wrong bytes")
    return Probe("checksum", True, "reads and hashes every populated page each round (a full read)")


_PROBES: dict[str, Probe] = {}


def probe_backends(*, fresh: bool = False) -> dict[str, Probe]:
    """Run each backend's tiny real check once per process (``fresh`` runs them again)."""
    if fresh or not _PROBES:
        _PROBES.clear()
        for probe in (_probe_uffd_wp(), _probe_soft_dirty(), _probe_checksum()):
            _PROBES[probe.name] = probe
    return dict(_PROBES)


@frozen
class TrackerChoice:
    name: str
    reason: str
    probes: dict[str, Probe] = field(default_factory=dict)


def read_status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(f"no process with pid {pid}: check the pid (ps -p {pid})", pid=pid) from None
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def pinned_kib(status: dict[str, str]) -> int:
    """VmPin of /proc/PID/status, in KiB (memory pinned for DMA: io_uring buffers, RDMA, vfio)."""
    value = status.get("VmPin", "0 kB").split()
    return int(value[0]) if value and value[0].isdigit() else 0


def _fd_targets(pid: int) -> Iterator[tuple[int, str]]:
    d = f"/proc/{pid}/fd"
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        raise NoSuchProcess(f"no process with pid {pid}", pid=pid) from None
    except PermissionError:
        raise PermissionDenied(f"may not inspect pid {pid}'s files: run as its owner or as root", pid=pid) from None
    for name in names:
        try:
            yield int(name), os.readlink(os.path.join(d, name))
        except OSError:
            continue


def check_target(pid: int) -> None:
    """The pid names a live user process (not a thread, not a kernel thread, not us)."""
    if pid <= 0:
        raise NoSuchProcess(f"invalid pid {pid}", pid=pid)
    if pid == os.getpid():
        raise ProcessError("kcr-migrate cannot track its own process", pid=pid)
    status = read_status(pid)
    tgid = int(status.get("Tgid", pid))
    if tgid != pid:
        raise ProcessError(f"{pid} is a thread of process {tgid}: give the process id {tgid}", pid=pid)
    if status.get("State", "").startswith(("Z", "X")):
        raise NoSuchProcess(f"pid {pid} is a zombie: it has already exited", pid=pid)
    if "VmSize" not in status:
        raise ProcessError(f"pid {pid} ({status.get('Name', '?')}) is a kernel thread: it has no memory to track",
                           pid=pid)


def check_trackable(pid: int, backend: str) -> None:
    """Refuse what this backend cannot track in this process, with one line that says why."""
    if backend not in ("uffd-wp", "soft-dirty"):
        return
    fix = "writes into it bypass write-protection; use --tracker checksum"
    kib = pinned_kib(read_status(pid))
    if kib:
        raise UnsupportedResource(f"pid {pid} has {kib} KiB of pinned memory (VmPin: io_uring buffers, RDMA, "
                                  f"vfio): {fix}", pid=pid)
    for fd, target in _fd_targets(pid):
        if target.startswith("anon_inode:[io_uring]"):
            raise UnsupportedResource(f"pid {pid} has an io_uring instance open as fd {fd}: {fix}", pid=pid)
        if backend == "uffd-wp" and target.startswith("anon_inode:[userfaultfd]"):
            raise UnsupportedResource(f"pid {pid} uses a userfaultfd of its own (fd {fd}): use --tracker checksum",
                                      pid=pid)


def choose_tracker(requested: str = "auto", pid: int | None = None) -> TrackerChoice:
    """The backend to use, and why. Probes run here, before anything is frozen."""
    if requested not in CHOICES:
        raise ValueError(f"unknown tracker {requested!r} (choose from {', '.join(CHOICES)})")
    probes = probe_backends()
    if requested != "auto":
        probe = probes[requested]
        if not probe.available:
            raise KernelFeatureMissing(f"the {requested} tracker does not work here: {probe.reason}; "
                                       f"use --tracker auto", pid=pid)
        if pid is not None:
            check_trackable(pid, requested)
        return TrackerChoice(requested, f"requested; {probe.reason}", probes)
    passed: list[str] = []
    for name in BACKENDS:
        probe = probes[name]
        if not probe.available:
            passed.append(f"not {name}: {probe.reason}")
            continue
        if pid is not None:
            try:
                check_trackable(pid, name)
            except UnsupportedResource as exc:
                passed.append(f"not {name}: {exc.message}")
                continue
        # Say why the better ones were passed over, and what the worse ones would have cost.
        later = [f"{n} {'would cost a full read per round' if n == 'checksum' else 'also works'}"
                 if probes[n].available else f"not {n}: {probes[n].reason}"
                 for n in BACKENDS[BACKENDS.index(name) + 1:]]
        reason = f"auto-selected: {probe.reason}" + (f" ({'; '.join(passed + later)})" if passed + later else "")
        return TrackerChoice(name, reason, probes)
    raise KernelFeatureMissing("no dirty-page tracker works here: " + "; ".join(passed), pid=pid)
