"""The Linux plumbing under the testbed: root commands, namespaces, links and mounts.

Each function does one thing to this machine with the system tools (``ip``, ``nsenter``,
``unshare``, ``setpriv``, ``mount``, ``losetup``, ``mkfs.btrfs``) and knows nothing of a testbed's
layout: the caller passes every name and path.  ``examples/testbed.py`` decides what a host is
made of and where its files live; this module makes and removes the parts:

* a bridge, and per host a network namespace whose ``eth0`` is one end of a veth on that bridge;
* a mount namespace kept alive by a bind mount of its namespace file, with a private ``/srv``
  (a bind-mounted directory, or btrfs on a loop device);
* optionally a pid namespace, kept alive the same way, whose pid 1 is ``_pidns_init.py`` and whose
  ``/proc`` is mounted in the host's mount namespace; pids mapped in and out of it;
* emptying namespaces of processes, and the probes ``status`` needs (mount table, namespace ids,
  live pids, open TCP ports).

Errors are ``TestbedError``, or ``TestbedUnavailable`` where the machine cannot host a testbed.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")
PIDNS_INIT = Path(__file__).resolve().with_name("_pidns_init.py")
KILL_TIMEOUT = 10.0
SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

# Tool -> Debian package that provides it.
BASE_TOOLS = {
    "ip": "iproute2", "nsenter": "util-linux", "unshare": "util-linux", "mount": "mount",
    "umount": "mount", "losetup": "mount", "sshd": "openssh-server", "ssh": "openssh-client",
    "ssh-keygen": "openssh-client", "setpriv": "util-linux",
}
BTRFS_TOOLS = {"mkfs.btrfs": "btrfs-progs"}


class TestbedError(Exception):
    """A testbed operation failed; the message says what went wrong and what to do."""

    __test__ = False


class TestbedUnavailable(TestbedError):
    """This machine cannot host a testbed (not root, a tool missing, no namespaces)."""

    __test__ = False


# --- running system tools ------------------------------------------------------------------------

def tool(name: str) -> str:
    """Absolute path of a required program, or TestbedUnavailable naming its Debian package."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *SYSTEM_PATH])
    found = shutil.which(name, path=search)
    if found is None:
        package = {**BASE_TOOLS, **BTRFS_TOOLS}.get(name, name)
        raise TestbedUnavailable(f"`{name}` not found: apt-get install {package}")
    return os.path.abspath(found)


def run(argv: Sequence[str], *, check: bool = True, input: str | None = None,
        timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a command and capture its output; on failure raise TestbedError with its stderr."""
    argv = [tool(argv[0]), *argv[1:]] if "/" not in argv[0] else list(argv)
    stdin = None if input is not None else subprocess.DEVNULL
    try:
        proc = subprocess.run(argv, input=input, stdin=stdin, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise TestbedError(f"`{shlex.join(argv)}` did not finish in {timeout:g} s") from exc
    if check and proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        raise TestbedError(f"`{shlex.join(argv)}` failed: {detail}")
    return proc


def check_available(srv_fs: str = "dir") -> None:
    """Raise TestbedUnavailable unless this machine can host a testbed."""
    if os.geteuid() != 0:
        raise TestbedUnavailable("must run as root (namespaces, mounts and sshd need it)")
    for name in {**BASE_TOOLS, **(BTRFS_TOOLS if srv_fs == "btrfs" else {})}:
        tool(name)
    probe = run(["unshare", "--net", "--mount", "true"], check=False)
    if probe.returncode != 0:
        detail = probe.stderr.strip().splitlines()[-1:] or ["unknown error"]
        raise TestbedUnavailable(f"cannot create namespaces: {detail[0]}")


def nsenter_argv(netns: Path, mntns: Path, argv: Sequence[str], cwd: str | None = None,
                 pidns: Path | None = None) -> list[str]:
    """argv that runs ``argv`` inside these network and mount namespaces (``cwd`` inside), and
    inside pid namespace ``pidns`` if given.

    To enter a pid namespace nsenter forks: ``argv`` runs in its child while nsenter, outside,
    waits for it and exits as it did.  ``argv`` gets SIGKILL should nsenter die first, so killing
    the process this argv starts ends ``argv`` as it does without a pid namespace.
    """
    wd = [f"--wdns={cwd}"] if cwd is not None else []
    if pidns is None:
        return [tool("nsenter"), f"--net={netns}", f"--mount={mntns}", *wd, "--", *argv]
    return [tool("nsenter"), f"--net={netns}", f"--mount={mntns}", f"--pid={pidns}", *wd, "--",
            tool("setpriv"), "--pdeathsig", "KILL", "--", *argv]


# --- probes --------------------------------------------------------------------------------------

def mount_points() -> set[str]:
    """Mount points of this process's mount namespace."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        fields = [line.split()[4] for line in f if line.strip()]
    return {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), p) for p in fields}


def ns_id(path: str | Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of a namespace file or /proc/PID/ns link; None if unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def tcp_open(address: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def link_names() -> set[str]:
    """Names of the network interfaces in this network namespace."""
    links = run(["ip", "-o", "link", "show"]).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()}


def ipv4_interfaces() -> list[tuple[str, str]]:
    """(interface, address/prefix) for every IPv4 address in this network namespace."""
    lines = run(["ip", "-o", "-4", "addr", "show"]).stdout.splitlines()
    return [(words[1], words[3]) for words in (line.split() for line in lines)]


# --- processes in namespaces ---------------------------------------------------------------------

def pids_in_namespaces(ids: set[tuple[int, int]]) -> list[int]:
    """Live processes whose network, mount or pid namespace is one of ``ids``.

    A zombie's pid namespace can still be read; it does not count: only its parent can reap it.
    Nor does a pid namespace's init exiting already (PF_EXITING): killed, it stays so until
    every process of its namespace is reaped, some by parents outside it (nsenter's children:
    the machine's init, which may reap lazily).
    """
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        if any(ns_id(f"/proc/{entry.name}/ns/{kind}") in ids for kind in ("net", "mnt", "pid")) \
                and pid_alive(int(entry.name)) and not _init_exiting(int(entry.name)):
            found.append(int(entry.name))
    return found


PF_EXITING = 0x4


def _init_exiting(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            exiting = bool(int(f.read().rsplit(")", 1)[1].split()[6]) & PF_EXITING)
    except (OSError, IndexError, ValueError):
        return True
    return exiting and (_nspids(pid) or [0])[-1] == 1


def kill_namespace_members(ids: set[tuple[int, int]]) -> None:
    """SIGKILL every process inside these namespaces and wait until none is left."""
    kill_until_gone(lambda: pids_in_namespaces(ids), "processes")


def kill_until_gone(find: Callable[[], Sequence[int]], what: str) -> None:
    """SIGKILL the processes ``find`` names, again and again, until it names none (it is asked
    afresh each time: a process may fork while being killed)."""
    deadline = time.monotonic() + KILL_TIMEOUT
    while pids := find():
        if time.monotonic() > deadline:
            raise TestbedError(f"{what} {list(pids)} survived SIGKILL for {KILL_TIMEOUT:g} s")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


# --- network: bridge, network namespaces, veth links ---------------------------------------------

def make_bridge(bridge: str, interface: str) -> None:
    """Create bridge ``bridge`` with address ``interface`` (``10.0.0.1/24``) and bring it up."""
    run(["ip", "link", "add", bridge, "type", "bridge"])
    run(["ip", "addr", "add", interface, "dev", bridge])
    run(["ip", "link", "set", bridge, "up"])


def remove_link(name: str, *, check: bool = True) -> None:
    """Delete network interface ``name`` if it exists (a veth takes its peer with it)."""
    if Path("/sys/class/net", name).exists():
        run(["ip", "link", "del", name], check=check)


def make_netns(netns: str, veth: str, bridge: str, interface: str) -> None:
    """Network namespace ``netns`` whose ``eth0`` (address ``interface``) is veth ``veth``'s
    peer, with ``veth`` on ``bridge``; ``lo`` and ``eth0`` up, no default route."""
    run(["ip", "netns", "add", netns])
    run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns])
    run(["ip", "link", "set", veth, "master", bridge, "up"])
    run(["ip", "-n", netns, "addr", "add", interface, "dev", "eth0"])
    run(["ip", "-n", netns, "link", "set", "eth0", "up"])
    run(["ip", "-n", netns, "link", "set", "lo", "up"])


def remove_netns(netns: str, veth: str) -> None:
    """Delete veth ``veth`` (never mind if that fails) and network namespace ``netns``."""
    remove_link(veth, check=False)
    if (NETNS_DIR / netns).exists():
        run(["ip", "netns", "del", netns])


# --- mounts: mount namespaces and /srv -----------------------------------------------------------

def in_mntns(mnt: Path) -> list[str]:
    """argv prefix that runs a command inside the mount namespace bound on ``mnt``."""
    return ["nsenter", f"--mount={mnt}", "--"]


def make_mntns(mnt: Path) -> None:
    """A private mount namespace, kept alive by a bind mount of it on file ``mnt``."""
    mnt.touch()
    run(["unshare", f"--mount={mnt}", "--propagation", "private", "true"])
    # Do not pin other hosts' network namespaces through this namespace's copy of /run/netns;
    # an empty tmpfs there keeps `ip` inside the host from tripping over stale entries.
    if str(NETNS_DIR) in mount_points():
        run([*in_mntns(mnt), tool("umount"), "--recursive", "--lazy", str(NETNS_DIR)])
        run([*in_mntns(mnt), tool("mount"), "-t", "tmpfs", "-o", "size=64k,mode=755",
             "kcr-netns", str(NETNS_DIR)])


def mount_srv_dir(mnt: Path, srv: Path) -> None:
    """Bind-mount directory ``srv`` (made if missing) on ``/srv`` in the namespace on ``mnt``."""
    Path("/srv").mkdir(mode=0o755, exist_ok=True)
    srv.mkdir(mode=0o755, exist_ok=True)
    run([*in_mntns(mnt), tool("mount"), "--bind", str(srv), "/srv"])


def mount_srv_btrfs(mnt: Path, image: Path, size: int) -> None:
    """Mount a fresh btrfs on a sparse ``size``-byte loop image on ``/srv`` in the namespace on
    ``mnt``."""
    Path("/srv").mkdir(mode=0o755, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(size)
    device = run(["losetup", "--find", "--show", str(image)]).stdout.strip()
    run(["mkfs.btrfs", "-q", device])
    run([*in_mntns(mnt), tool("mount"), "-t", "btrfs", device, "/srv"])


def remove_mntns(mnt: Path, image: Path) -> None:
    """Unmount ``/srv`` in the namespace on ``mnt`` and the namespace; detach ``image``'s loops."""
    if str(mnt) in mount_points():
        run([*in_mntns(mnt), tool("umount"), "/srv"], check=False)
        run(["umount", str(mnt)])
    if image.exists():
        for line in run(["losetup", "--associated", str(image)]).stdout.splitlines():
            run(["losetup", "--detach", line.split(":")[0]])


# --- pids: a pid namespace per host --------------------------------------------------------------

def make_pidns(netns: Path, mntns: Path, pin: Path, label: str) -> None:
    """A pid namespace kept alive by a bind mount on file ``pin``, whose pid 1 reaps orphans and
    runs in these network and mount namespaces; ``/proc`` in ``mntns`` shows its processes.

    ``label`` goes on pid 1's command line, to tell whose it is in ``ps``.
    """
    argv = nsenter_argv(netns, mntns, [sys.executable, "-I", str(PIDNS_INIT), label])
    init = int(run(argv).stdout)
    pin.touch()
    run(["mount", "--bind", f"/proc/{init}/ns/pid", str(pin)])
    # proc shows the pid namespace of the process that mounts it: mount from inside.
    run(nsenter_argv(netns, mntns, [tool("mount"), "-t", "proc", "proc", "/proc"], pidns=pin))


def remove_pidns(pin: Path) -> None:
    """Unpin the pid namespace bound on ``pin`` (empty it first: kill its pid 1)."""
    if str(pin) in mount_points():
        run(["umount", str(pin)])


def _nspids(pid: int) -> list[int] | None:
    """Process ``pid``'s pids, from this process's pid namespace inward (``NSpid``)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(word) for word in line.split()[1:]]
    except (OSError, ValueError):
        return None
    return None


def ns_pid(pidns: Path, pid: int) -> int | None:
    """The pid inside the pid namespace bound on ``pidns`` of process ``pid`` of this process's
    pid namespace; None unless that process (a zombie too) is a member of that namespace."""
    ids = ns_id(pidns)
    if ids is None or ns_id(f"/proc/{pid}/ns/pid") != ids:
        return None
    pids = _nspids(pid)
    return pids[-1] if pids else None


def root_pid(pidns: Path, pid: int) -> int | None:
    """The pid in this process's pid namespace of process ``pid`` of the pid namespace bound on
    ``pidns``; None if it has no such member (a zombie counts)."""
    ids = ns_id(pidns)
    if ids is None:
        return None
    with os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit() and ns_id(f"/proc/{entry.name}/ns/pid") == ids:
                pids = _nspids(int(entry.name))
                if pids and pids[-1] == pid:
                    return int(entry.name)
    return None
