"""Debian's own kernel (it has soft-dirty) under qemu, running this project's tests inside it.

``scripts/setup`` unpacks the kernel package that ``linux-image-amd64`` depends on and
busybox-static's binary into ``CACHE`` (never installing them). ``Guest`` builds an initramfs
around that busybox (an ``/init`` script, the kernel modules 9p and overlayfs need) and boots the
kernel under TCG (the nested, paravirtual ``/dev/kvm`` here cannot run a stock kernel). The
script shares this host's root read-only over 9p under a tmpfs overlay and switch_roots into it,
so the guest runs the host's Python, gcc and this project; pid 1 is then ``_softdirty_guest.py``,
which runs pytest once per transparent-huge-page mode and writes what happened (the kernel's
tracker probes, each run's junit xml, exit status and time) to a second, writable share.

A human can use it too: ``python3 -m tests._softdirty_vm [--thp always,never] [TEST ...]``.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("KCR_VM_CACHE", "/var/cache/kcr-migrate/vm"))
QEMU = "qemu-system-x86_64"
REPO = Path(__file__).resolve().parent.parent
RESULTS_TAG = "kcrresults"
RESULTS_MOUNT = "/kcr-results"       # where the guest mounts the writable share
# Modules the initramfs loads (with what they depend on, read from each one's .modinfo).
MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
SETUP_HINT = "run scripts/setup"
PR_SET_PDEATHSIG = 1
STAGE2_MARK = b"kcr-vm: kernel "     # the guest's pid 1 prints it once it runs


class VmUnavailable(Exception):
    """qemu or the kernel package is missing: the VM cannot run here at all."""


@dataclass(frozen=True)
class RunPlan:
    """One pytest run in the guest: the THP mode it runs under and what it selects."""
    thp: str
    tests: tuple[str, ...]
    timeout_s: float


@dataclass(frozen=True)
class RunResult:
    thp: str
    thp_line: str               # the guest's /sys/kernel/mm/transparent_hugepage/enabled during the run
    status: int | None          # pytest's exit status; None when the guest stopped it (timeout)
    seconds: float
    junit: Path


@dataclass(frozen=True)
class VmResult:
    """What came back from the guest (``status.json``), and its console."""
    runs: tuple[RunResult, ...]
    probes: dict[str, dict[str, Any]]     # tracker name -> {"available", "reason"}, probed in the guest
    kernel: str
    boot_s: float                         # qemu started to the guest's pid 1 running Python
    total_s: float                        # qemu started to qemu gone
    console: str

    def run(self, thp: str) -> RunResult:
        return next(r for r in self.runs if r.thp == thp)


def unavailable_reason() -> str | None:
    """Why qemu cannot boot the guest here at all, or None."""
    if shutil.which(QEMU) is None:
        return f"no {QEMU} ({SETUP_HINT}: it installs qemu-system-x86)"
    if not (CACHE / "kernel" / "boot").is_dir():
        return f"no unpacked kernel package in {CACHE} ({SETUP_HINT}: it fetches linux-image-amd64's kernel)"
    if not os.access(CACHE / "busybox", os.X_OK):
        return f"no static busybox in {CACHE} ({SETUP_HINT})"
    return None


def kernel_files() -> tuple[Path, Path, str]:
    """(vmlinuz, the module tree lib/modules/RELEASE, RELEASE) of the unpacked kernel package."""
    root = CACHE / "kernel"
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if len(images) != 1:
        raise VmUnavailable(f"expected one vmlinuz in {root / 'boot'}, found {len(images)} ({SETUP_HINT})")
    release = images[0].name[len("vmlinuz-"):]
    modules = root / "lib" / "modules" / release
    if not modules.is_dir():
        raise VmUnavailable(f"no {modules} ({SETUP_HINT})")
    return images[0], modules, release


# --- kernel modules ------------------------------------------------------------------------

def modinfo_depends(ko: Path) -> list[str]:
    """The ``depends=`` list of a kernel module, from its ELF ``.modinfo`` section."""
    data = ko.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise VmUnavailable(f"{ko} is not a 64-bit little-endian ELF module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        if data[stroff + name:data.index(b"\0", stroff + name)] == b".modinfo":
            for entry in data[offset:offset + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    return [d for d in entry[len(b"depends="):].decode().split(",") if d]
            return []
    return []


def module_load_order(tree: Path, wanted: tuple[str, ...] = MODULES) -> list[Path]:
    """The .ko files to insmod, dependencies first. Names compare with '-' and '_' alike, as
    the kernel's do; a module built into this kernel (not in the tree) needs no loading."""
    files = {p.name[:-3].replace("-", "_"): p for p in tree.rglob("*.ko")}
    builtin = {Path(line).name[:-3].replace("-", "_")
               for line in (tree / "modules.builtin").read_text().split()} if (tree / "modules.builtin").exists() else set()
    order: list[Path] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in chain:
            raise VmUnavailable(f"kernel modules depend on each other in a loop: {' -> '.join(chain + (name,))}")
        if name not in files:
            if name in builtin:
                return
            raise VmUnavailable(f"no kernel module {name} in {tree} ({SETUP_HINT})")
        if files[name] in order:
            return
        for dep in modinfo_depends(files[name]):
            visit(dep, chain + (name,))
        order.append(files[name])

    for name in wanted:
        visit(name, ())
    return order


# --- the initramfs -------------------------------------------------------------------------

def _cpio_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 0) -> bytes:
    """One entry of a cpio archive in the kernel's "newc" format."""
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


INIT = """#!/bin/busybox sh
# Stage 1 (initramfs): modules, the host's root read-only under a tmpfs overlay, results share.
/bin/busybox --install -s /bin
fail() { echo "kcr-vm: stage 1 failed: $*"; poweroff -f; }
mount -t proc proc /proc && mount -t sysfs sysfs /sys && mount -t devtmpfs devtmpfs /dev || fail mounts
for m in $(cat /modules/order); do insmod "/modules/$m" || fail "insmod $m"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower || fail "9p hostroot"
mount -t tmpfs -o mode=755 tmpfs /rw && mkdir /rw/upper /rw/work || fail tmpfs
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot || fail overlay
mkdir -p /newroot{results} && \\
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 {tag} /newroot{results} || fail "9p results"
umount /proc /sys /dev
exec switch_root /newroot {python} {guest} {results}/plan.json
fail switch_root
"""


def build_initramfs(out: Path, python: str, guest_script: str) -> None:
    """An uncompressed newc cpio: busybox as /bin/busybox, the stage-1 /init, the modules."""
    _, tree, _ = kernel_files()
    mods = module_load_order(tree)
    entries: list[bytes] = []
    ino = 1

    def add(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nonlocal ino
        entries.append(_cpio_entry(name, mode, data, rdev, ino))
        ino += 1

    for d in ("bin", "dev", "proc", "sys", "lower", "rw", "newroot", "modules"):
        add(d, 0o040755)
    add("dev/console", 0o020600, rdev=(5, 1))     # the kernel opens it before /init runs
    add("bin/busybox", 0o100755, (CACHE / "busybox").read_bytes())
    init = (INIT.replace("{results}", RESULTS_MOUNT).replace("{tag}", RESULTS_TAG)
            .replace("{python}", python).replace("{guest}", guest_script))
    add("init", 0o100755, init.encode())
    add("modules/order", 0o100644, "".join(f"{m.name}\n" for m in mods).encode())
    for m in mods:
        add(f"modules/{m.name}", 0o100644, m.read_bytes())
    entries.append(_cpio_entry("TRAILER!!!", 0))
    out.write_bytes(b"".join(entries))


def prebuild_workloads() -> None:
    """Compile the tests' C workloads here first (tests/_build, cached as the tests do): the
    guest sees them through the shared root and need not run gcc under emulation."""
    from tests._workloads import SOURCES, build
    if shutil.which("gcc") or shutil.which("cc"):
        for src in sorted(SOURCES.glob("*.c")):
            build(src.stem)


# --- the guest -----------------------------------------------------------------------------

def qemu_argv(vmlinuz: Path, initrd: Path, results: Path, console: Path, memory_mib: int, cpus: int) -> list[str]:
    return [QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-m", str(memory_mib), "-smp", str(cpus),
            "-machine", "q35", "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
            "-chardev", f"file,id=console,path={console}", "-serial", "chardev:console",
            "-kernel", str(vmlinuz), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs", f"local,path={results},mount_tag={RESULTS_TAG},security_model=none"]


class Guest:
    """One boot of the VM: ``start()`` returns at once (qemu runs in the background),
    ``wait()`` collects the result. ``stop()`` ends qemu if it still runs."""

    def __init__(self, runs: list[RunPlan], workdir: Path, *, repo: Path = REPO, memory_mib: int = 2048,
                 cpus: int = 2, boot_timeout_s: float = 240, env: dict[str, str] | None = None,
                 nice: int = 0) -> None:
        self.runs = runs
        self.workdir = workdir
        self.repo = repo
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.boot_timeout_s = boot_timeout_s
        self.env = env or {}
        self.nice = nice
        self.results = workdir / "results"
        self.console = workdir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    @property
    def timeout_s(self) -> float:
        return self.boot_timeout_s + sum(r.timeout_s for r in self.runs) + 60

    def start(self) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise VmUnavailable(reason)
        vmlinuz, _, _ = kernel_files()
        prebuild_workloads()
        self.results.mkdir(parents=True, exist_ok=True)
        initrd = self.workdir / "initramfs.cpio"
        build_initramfs(initrd, os.path.realpath(sys.executable), str(self.repo / "tests" / "_softdirty_guest.py"))
        plan = {"repo": str(self.repo), "results": RESULTS_MOUNT, "env": self.env,
                "runs": [{"thp": r.thp, "tests": list(r.tests), "timeout_s": r.timeout_s} for r in self.runs]}
        (self.results / "plan.json").write_text(json.dumps(plan))
        self.started = time.monotonic()
        with open(self.workdir / "qemu.stderr", "wb") as err:
            self.proc = subprocess.Popen(
                qemu_argv(vmlinuz, initrd, self.results, self.console, self.memory_mib, self.cpus),
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True,
                preexec_fn=self._in_child)

    def _in_child(self) -> None:
        """qemu dies with whoever started it (a killed test session leaves no guest behind)."""
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(127)
        if self.nice:
            os.nice(self.nice)
            # and SCHED_IDLE: a niced thread still holds a CPU until the scheduler's slice ends
            # when a test's process wakes up (their agents, holders and workloads wake each
            # other thousands of times); an idle-class one gives it up at once.
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def console_text(self) -> str:
        parts = []
        for name in ("console.log", "qemu.stderr"):
            path = self.workdir / name
            if path.exists():
                parts.append(f"--- {name} ---\n" + path.read_text(errors="replace"))
        return "\n".join(parts)

    def unnice(self) -> None:
        """Back to normal priority: whoever waits for the guest now has nothing else to run.
        (Niceness and the scheduling class are per thread on Linux: each of qemu's.)"""
        if self.nice and self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError):          # qemu may end meanwhile
                for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
                    with contextlib.suppress(OSError):
                        os.sched_setscheduler(int(tid), os.SCHED_OTHER, os.sched_param(0))
                        os.setpriority(os.PRIO_PROCESS, int(tid), 0)

    def booted(self) -> bool:
        """Has the guest's pid 1 (stage 2) said it runs?"""
        return self.console.exists() and STAGE2_MARK in self.console.read_bytes()

    def wait(self) -> VmResult:
        """Wait for qemu to end (the guest powers off when done): first for the boot (a guest
        that never reaches its stage 2 fails then, not at the end), then for the runs."""
        assert self.proc is not None, "start() first"
        self.unnice()
        for deadline, what in ((self.started + self.boot_timeout_s, "boot"),
                               (self.started + self.timeout_s, "finish")):
            try:
                self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                break
            except subprocess.TimeoutExpired:
                if what == "boot" and self.booted():
                    continue
                self.stop()
                raise AssertionError(f"the VM did not {what} within {deadline - self.started:.0f} s; its console:\n"
                                     + self.console_text()) from None
        total = time.monotonic() - self.started
        status_path = self.results / "status.json"
        if not status_path.exists():
            raise AssertionError(f"the VM ended (qemu status {self.proc.returncode}) without {status_path.name}; "
                                 "its console:\n" + self.console_text())
        status = json.loads(status_path.read_text())
        runs = tuple(RunResult(r["thp"], r["thp_line"], r["status"], r["seconds"], self.results / r["junit"])
                     for r in status["runs"])
        return VmResult(runs, status["probes"], status["kernel"], status["uptime_at_start_s"], total,
                        self.console_text())


# --- one guest per test session, started as soon as the session knows it runs the VM tests ---

class _Session:
    """The session's one guest, what it found, or why it could not start."""
    guest: Guest | None = None
    result: VmResult | None = None
    error: BaseException | None = None


# The suite's own tests mostly wait (on workloads that sleep, on ssh, on each other): niced,
# the guest runs in that idle time and the suite's timing-sensitive tests keep their CPU.
SESSION_NICE = 19
PLAN_ATTRIBUTE = "SOFTDIRTY_VM_RUNS"      # a test module that holds it runs its tests on the guest's results


def _vm_items(items: list[Any]) -> list[Any]:
    return [i for i in items if getattr(getattr(i, "module", None), PLAN_ATTRIBUTE, None) is not None]


def _start(runs: list[RunPlan]) -> None:
    if _Session.guest is None and _Session.error is None:
        _Session.guest = Guest(runs, Path(tempfile.mkdtemp(prefix="kcr-vm-")),
                               nice=int(os.environ.get("KCR_VM_NICE", str(SESSION_NICE))))
        try:
            _Session.guest.start()
        except Exception as exc:     # said by the test that needs the guest, not by the hook
            _Session.error = exc


def session_result(runs: list[RunPlan]) -> VmResult:
    """Wait for the session's guest (starting it if no hook did) and keep what it found; what
    went wrong is raised again to every test that asks."""
    _start(runs)
    if _Session.result is None and _Session.error is None:
        assert _Session.guest is not None
        try:
            _Session.result = _Session.guest.wait()
        except Exception as exc:
            _Session.error = exc
    if _Session.error is not None:
        raise _Session.error
    assert _Session.result is not None
    return _Session.result


def pytest_collection_modifyitems(session: Any, config: Any, items: list[Any]) -> None:
    """The VM's tests go last: the guest boots and runs while everything else does."""
    vm = _vm_items(items)
    if vm:
        items[:] = [i for i in items if i not in vm] + vm


def pytest_collection_finish(session: Any) -> None:
    """Start the guest as soon as the session is known to run its tests (deselection is over),
    unless KCR_VM_EARLY=0. A VM that cannot run is left to the tests, which skip saying why."""
    vm = _vm_items(session.items)
    if (vm and os.environ.get("KCR_VM_EARLY", "1") != "0" and not session.config.option.collectonly
            and unavailable_reason() is None):
        _start(getattr(vm[0].module, PLAN_ATTRIBUTE))


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    """A guest still running (the session was cut short) is stopped; its files go."""
    if _Session.guest is not None:
        _Session.guest.stop()
        shutil.rmtree(_Session.guest.workdir, ignore_errors=True)
    _Session.guest, _Session.result, _Session.error = None, None, None


# --- reading junit xml ---------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    nodeid: str         # file::name[param], as pytest names it
    outcome: str        # passed, failed, error, skipped
    message: str


def junit_cases(path: Path) -> list[Case]:
    """Every test case of a pytest junit xml file with its outcome."""
    cases = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        classname, name = tc.get("classname", ""), tc.get("name", "")
        module = classname.replace(".", "/") + ".py"
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            child = tc.find(kind)
            if child is not None:
                outcome = {"failure": "failed"}.get(kind, kind)
                message = child.get("message", "") or (child.text or "")
                break
        cases.append(Case(f"{module}::{name}", outcome, message))
    return cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests", nargs="*", default=["tests/test_tracker.py"],
                        help="what pytest runs in the guest (pytest's options may follow too)")
    parser.add_argument("--thp", default="always,never", help="THP modes to run the tests under, in order")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run inside the guest")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (console log, junit xml)")
    args, pytest_options = parser.parse_known_args()     # the rest goes to pytest as it is
    workdir = Path(tempfile.mkdtemp(prefix="kcr-vm-"))
    runs = [RunPlan(mode, (*pytest_options, *args.tests), args.timeout) for mode in args.thp.split(",")]
    guest = Guest(runs, workdir)
    try:
        guest.start()
        result = guest.wait()
    except (VmUnavailable, AssertionError) as exc:
        print(f"softdirty_vm: {exc}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
        return 2 if isinstance(exc, VmUnavailable) else 1
    finally:
        guest.stop()
    print(result.console.split("--- qemu.stderr ---")[0])
    print(f"kernel {result.kernel}: booted in {result.boot_s:.1f} s, {result.total_s:.1f} s in all")
    for r in result.runs:
        counts: dict[str, int] = {}
        for c in junit_cases(r.junit) if r.junit.exists() else []:
            counts[c.outcome] = counts.get(c.outcome, 0) + 1
        print(f"THP {r.thp}: pytest status {r.status} in {r.seconds:.1f} s: {counts}")
    if args.keep:
        print(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(r.status == 0 for r in result.runs) else 1

if __name__ == "__main__":
    sys.exit(main())
