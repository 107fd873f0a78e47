"""Test hosts for kcr-migrate: network + mount namespaces on this machine, each with its own sshd.

    python3 examples/testbed.py up [--hosts hostA hostB ...] [--own-pids HOST ...]
                                   [--srv-fs dir|btrfs]
    python3 examples/testbed.py status [--ssh-config]
    python3 examples/testbed.py exec hostA -- ip addr
    ssh -F "$(python3 examples/testbed.py status --ssh-config)" hostA true
    python3 examples/testbed.py down

Each host is a network namespace (``ip netns``) whose ``eth0`` is one end of a veth pair; the other
end sits in a bridge on this machine.  All addresses come from one private /24 used only on those
links (bridge ``.1``, hosts ``.11``, ``.12``, ...).  Nothing is routed or NATed anywhere else: the
hosts have no default route.  Each host also has its own mount namespace (kept alive by a bind mount
of its namespace file in the state directory) with its own ``/srv``: a per-host directory, or a
btrfs filesystem on a loop device (``--srv-fs btrfs``).  Each host runs an OpenSSH sshd inside both
namespaces with generated keys; ``up`` writes an ssh config so ``ssh -F FILE hostA`` works.

The hosts share this machine's pids, unless named in ``--own-pids``: such a host also has a pid
namespace of its own (pinned like its mount namespace), whose pid 1 is a small init that reaps
orphans; its sshd, and so every ssh session, runs in it, and its ``/proc`` shows that namespace.
As on a separate machine, a process can get the same pid there as on another host.

Everything lives under a state directory (default ``/run/kcr-testbed``, or ``$KCR_TESTBED_DIR``);
``down`` removes all of it and is safe to run at any time.  The same logic is importable:
``from examples.testbed import Testbed``.  Needs root.

This module holds the testbed's layout (names, addresses, files, state), where its keys and
config files go, the order of ``up`` and ``down``, and the CLI.  The commands that make and
remove the parts are in ``examples/_namespaces.py`` (namespaces, links, mounts) and
``examples/_openssh.py`` (keys, sshd and ssh config text, sshd).
"""
from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make ``examples`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples._namespaces import (  # noqa: E402
    NETNS_DIR,
    TestbedError,
    TestbedUnavailable,
    check_available,
    ipv4_interfaces,
    kill_namespace_members,
    link_names,
    make_bridge,
    make_mntns,
    make_netns,
    make_pidns,
    mount_points,
    mount_srv_btrfs,
    mount_srv_dir,
    ns_id,
    ns_pid,
    nsenter_argv,
    remove_link,
    remove_mntns,
    remove_netns,
    remove_pidns,
    root_pid,
    run,
    tcp_open,
    tool,
)
from examples._openssh import (  # noqa: E402
    SSH_PORT,
    SSHD_START_TIMEOUT,
    keygen,
    ssh_config,
    sshd_config,
    sshd_log_tail,
    sshd_pid,
    start_sshd,
)

__all__ = [
    "HostStatus",
    "Testbed",
    "TestbedError",
    "TestbedUnavailable",
    "check_available",
    "default_state_dir",
    "main",
    "tcp_open",
]

DEFAULT_STATE_DIR = Path("/run/kcr-testbed")
STATE_DIR_ENV = "KCR_TESTBED_DIR"
DEFAULT_HOSTS = ("hostA", "hostB")
DEFAULT_PREFIX = "kcr-"
DEFAULT_SUBNET = "10.77.213.0/24"
SRV_FS_CHOICES = ("dir", "btrfs")
DEFAULT_SRV_SIZE = 1 << 30
FIRST_HOST_OFFSET = 11
STATE_VERSION = 1
IFNAMSIZ = 15
NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")

# Files a testbed creates; ``down`` removes these and nothing else.
TOP_FILES = ("ssh_config", "known_hosts", "authorized_keys", "id_ed25519", "id_ed25519.pub",
             "testbed.json")
HOST_FILES = ("sshd_config", "ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", "sshd.pid",
              "sshd.log", "mnt", "srv.img", "pid")


@dataclasses.dataclass(frozen=True)
class HostStatus:
    """Health of one host, as ``status`` reports it."""

    host: str
    address: str
    netns: bool
    mntns: bool
    sshd_pid: int | None
    listening: bool

    @property
    def healthy(self) -> bool:
        return self.netns and self.mntns and self.sshd_pid is not None and self.listening


# --- the testbed ---------------------------------------------------------------------------------

class Testbed:
    """A set of hosts (namespaces with sshd) on this machine; ``up()``, use, ``down()``."""

    __test__ = False

    def __init__(self, state_dir: str | os.PathLike[str] | None = None, *,
                 hosts: Sequence[str] = DEFAULT_HOSTS, prefix: str = DEFAULT_PREFIX,
                 bridge: str | None = None, subnet: str = DEFAULT_SUBNET, srv_fs: str = "dir",
                 srv_size: int = DEFAULT_SRV_SIZE, own_pids: Sequence[str] = ()) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.hosts: tuple[str, ...] = tuple(hosts)
        self.own_pids: tuple[str, ...] = tuple(own_pids)  # hosts with a pid namespace of their own
        self.prefix = prefix
        self.bridge = bridge if bridge is not None else f"{prefix}br0"
        self.subnet = subnet
        self.srv_fs = srv_fs
        self.srv_size = srv_size
        self._network = self._validate()

    def _validate(self) -> ipaddress.IPv4Network:
        if not self.state_dir.is_absolute() or len(self.state_dir.parts) < 3:
            raise TestbedError(f"state dir must be an absolute path below /x/: {self.state_dir}")
        try:
            network = ipaddress.ip_network(self.subnet)
        except ValueError as exc:
            raise TestbedError(f"bad subnet {self.subnet!r}: {exc}") from None
        if not isinstance(network, ipaddress.IPv4Network) or not network.is_private:
            raise TestbedError(f"subnet {self.subnet} must be a private IPv4 network")
        if FIRST_HOST_OFFSET + len(self.hosts) >= network.num_addresses - 1:
            raise TestbedError(f"subnet {self.subnet} is too small for {len(self.hosts)} hosts")
        if self.srv_fs not in SRV_FS_CHOICES:
            raise TestbedError(f"srv_fs must be one of {', '.join(SRV_FS_CHOICES)}")
        if not self.hosts or len(set(self.hosts)) != len(self.hosts):
            raise TestbedError("hosts must be a non-empty list of distinct names")
        for host in self.own_pids:
            if host not in self.hosts:
                raise TestbedError(f"own_pids names {host!r}, which is not one of the hosts "
                                   f"({', '.join(self.hosts)})")
        for name in (*self.hosts, self.prefix + "x", self.bridge):
            if not NAME_RE.match(name):
                raise TestbedError(f"bad name {name!r}: use letters, digits, - and _")
        for name in (*(self.veth_name(h) for h in self.hosts), self.bridge):
            if len(name) > IFNAMSIZ:
                raise TestbedError(f"interface name {name!r} (prefix + host) is longer than "
                                   f"{IFNAMSIZ} characters")
        return network

    @classmethod
    def from_state(cls, state_dir: str | os.PathLike[str] | None = None) -> Testbed:
        """The testbed recorded in a state dir by ``up``; TestbedError if there is none."""
        state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        try:
            state = json.loads((state_dir / "testbed.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TestbedError(f"testbed is not up (no {state_dir}/testbed.json); "
                               "run: examples/testbed.py up") from None
        except (OSError, ValueError) as exc:
            raise TestbedError(f"unreadable testbed state in {state_dir}: {exc}") from None
        if state.get("version") != STATE_VERSION:
            raise TestbedError(f"testbed state in {state_dir} has an unknown version; run down")
        return cls(state_dir, hosts=state["hosts"], prefix=state["prefix"],
                   bridge=state["bridge"], subnet=state["subnet"], srv_fs=state["srv_fs"],
                   srv_size=state["srv_size"], own_pids=state.get("own_pids", ()))

    def _state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "hosts": list(self.hosts), "prefix": self.prefix,
                "bridge": self.bridge, "subnet": self.subnet, "srv_fs": self.srv_fs,
                "srv_size": self.srv_size, "own_pids": list(self.own_pids)}

    # --- names and paths ---

    def _check_host(self, host: str) -> None:
        if host not in self.hosts:
            raise TestbedError(f"no host {host!r} in this testbed (hosts: {', '.join(self.hosts)})")

    def address(self, host: str) -> str:
        self._check_host(host)
        return str(self._network.network_address + FIRST_HOST_OFFSET + self.hosts.index(host))

    @property
    def bridge_address(self) -> str:
        return str(self._network.network_address + 1)

    def netns_name(self, host: str) -> str:
        return f"{self.prefix}{host}"

    def veth_name(self, host: str) -> str:
        return f"{self.prefix}{host}"

    def netns_path(self, host: str) -> Path:
        return NETNS_DIR / self.netns_name(host)

    def host_dir(self, host: str) -> Path:
        return self.state_dir / host

    def mntns_path(self, host: str) -> Path:
        return self.host_dir(host) / "mnt"

    def pidns_path(self, host: str) -> Path | None:
        """Where the host's own pid namespace is pinned; None if it shares this machine's pids."""
        self._check_host(host)
        return self._pidns_pin(host) if host in self.own_pids else None

    def _pidns_pin(self, host: str) -> Path:
        return self.host_dir(host) / "pid"

    def srv_path(self, host: str) -> Path | None:
        """Where this host's /srv content lives as seen from this machine (None for btrfs)."""
        self._check_host(host)
        return self.host_dir(host) / "srv" if self.srv_fs == "dir" else None

    def srv_image(self, host: str) -> Path:
        return self.host_dir(host) / "srv.img"

    @property
    def ssh_config_path(self) -> Path:
        return self.state_dir / "ssh_config"

    @property
    def identity_path(self) -> Path:
        return self.state_dir / "id_ed25519"

    @property
    def known_hosts_path(self) -> Path:
        return self.state_dir / "known_hosts"

    def _pid_file(self, host: str) -> Path:
        return self.host_dir(host) / "sshd.pid"

    # --- running things in hosts ---

    def nsenter_argv(self, host: str, argv: Sequence[str], cwd: str | None = None) -> list[str]:
        """argv that runs ``argv`` inside the host's network and mount namespaces, and its pid
        namespace if it has its own (then nsenter forks: see ``popen``)."""
        self._check_host(host)
        return nsenter_argv(self.netns_path(host), self.mntns_path(host), argv, cwd,
                            pidns=self.pidns_path(host))

    def exec(self, host: str, argv: Sequence[str],
             **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run ``argv`` inside the host (``cwd`` is a path inside the host)."""
        cwd = kwargs.pop("cwd", None)
        return subprocess.run(self.nsenter_argv(host, argv, cwd), **kwargs)

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen ``argv`` inside the host; the caller waits for it.

        The child is nsenter until it has entered the namespaces and exec'd ``argv``.  On a host
        with its own pids it stays nsenter, outside the host's pid namespace: ``argv`` runs as
        its only child, which ``popen(...).pid`` is not; nsenter exits as ``argv`` does, and
        killing nsenter kills ``argv`` (not what ``argv`` started).
        """
        cwd = kwargs.pop("cwd", None)
        return subprocess.Popen(self.nsenter_argv(host, argv, cwd), **kwargs)

    def ssh_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """argv that runs ``argv`` on the host over ssh (each word quoted for the remote shell)."""
        self._check_host(host)
        return [tool("ssh"), "-F", str(self.ssh_config_path), host, "--", shlex.join(argv)]

    def ssh(self, host: str, argv: Sequence[str],
            **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run ``argv`` on the host over ssh."""
        return subprocess.run(self.ssh_argv(host, argv), **kwargs)

    # --- status ---

    def sshd_pid(self, host: str) -> int | None:
        """The host's sshd's pid, in this machine's pid namespace; None if it is not running."""
        return sshd_pid(self._pid_file(host), self.mntns_path(host), self.pidns_path(host))

    # --- pids inside hosts ---

    def root_pid(self, host: str, pid: int) -> int | None:
        """This machine's pid (that of this process's pid namespace) of the process whose pid in
        ``host`` is ``pid``; None if the host has no such process (a zombie counts).

        For a host without pids of its own, that is ``pid`` if it exists.
        """
        pidns = self.pidns_path(host)
        if pidns is None:
            return pid if os.path.exists(f"/proc/{pid}") else None
        return root_pid(pidns, pid)

    def host_pid(self, host: str, root_pid: int) -> int | None:
        """The pid in ``host`` of the process whose pid on this machine is ``root_pid``; None if
        that process is not one of the host's own pid namespace (a zombie counts).

        For a host without pids of its own, that is ``root_pid`` if it exists.
        """
        pidns = self.pidns_path(host)
        if pidns is None:
            return root_pid if os.path.exists(f"/proc/{root_pid}") else None
        return ns_pid(pidns, root_pid)

    def status(self) -> list[HostStatus]:
        mounts = mount_points()
        return [HostStatus(host=h, address=self.address(h),
                           netns=str(self.netns_path(h)) in mounts,
                           mntns=str(self.mntns_path(h)) in mounts, sshd_pid=self.sshd_pid(h),
                           listening=tcp_open(self.address(h), SSH_PORT))
                for h in self.hosts]

    def is_up(self) -> bool:
        """True if this exact testbed is recorded in the state dir and every host is healthy."""
        try:
            recorded = Testbed.from_state(self.state_dir)
        except TestbedError:
            return False
        return recorded._state() == self._state() and all(s.healthy for s in self.status())

    # --- up ---

    def up(self) -> bool:
        """Build the testbed; False (and no change) if it is already up and healthy.

        A different or broken testbed recorded in the state dir is torn down first.  If building
        fails, whatever was built is torn down again before the error propagates.
        """
        check_available(self.srv_fs)
        if self.is_up():
            return False
        self._down_recorded()
        self.down()
        try:
            self._build()
        except BaseException:
            self._down_after_failure()
            raise
        return True

    def _down_recorded(self) -> None:
        try:
            recorded = Testbed.from_state(self.state_dir)
        except TestbedError:
            return
        recorded.down()

    def _down_after_failure(self) -> None:
        try:
            self.down()
        except TestbedError as exc:
            print(f"testbed: cleanup after failed up: {exc}", file=sys.stderr)

    def _build(self) -> None:
        self._check_free()
        self._make_state_dir()
        self._write_keys_and_configs()
        self._make_bridge()
        for host in self.hosts:
            self._make_host(host)
            self._start_sshd(host)
        self._wait_for_sshd()

    def _check_free(self) -> None:
        names = link_names()
        for name in (self.bridge, *(self.veth_name(h) for h in self.hosts)):
            if name in names:
                raise TestbedError(f"network interface {name} already exists; pick another prefix")
        for host in self.hosts:
            if self.netns_path(host).exists():
                raise TestbedError(f"network namespace {self.netns_name(host)} already exists")
        for name, interface in ipv4_interfaces():
            if ipaddress.ip_interface(interface).ip in self._network:
                raise TestbedError(f"subnet {self.subnet} is already used by {name} "
                                   f"({interface}); pick another subnet")
        if self.state_dir.exists() and any(self.state_dir.iterdir()):
            raise TestbedError(f"state dir {self.state_dir} is not empty and holds no testbed")

    def _make_state_dir(self) -> None:
        self.state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        if str(self.state_dir) not in mount_points():
            run(["mount", "--bind", str(self.state_dir), str(self.state_dir)])
        run(["mount", "--make-private", str(self.state_dir)])
        tmp = self.state_dir / "testbed.json.tmp"
        tmp.write_text(json.dumps(self._state(), indent=2) + "\n", encoding="utf-8")
        tmp.rename(self.state_dir / "testbed.json")
        for host in self.hosts:
            self.host_dir(host).mkdir(mode=0o755, exist_ok=True)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir

    def _write_keys_and_configs(self) -> None:
        client_key = keygen(self.identity_path, "kcr-testbed-client")
        self.state_dir.joinpath("authorized_keys").write_text(client_key, encoding="ascii")
        known = []
        for host in self.hosts:
            hd = self.host_dir(host)
            kind, blob = keygen(hd / "ssh_host_ed25519_key", f"kcr-testbed-{host}").split()[:2]
            known.append(f"{host},{self.address(host)} {kind} {blob}\n")
            config = sshd_config(host, self.address(host), host_key=hd / "ssh_host_ed25519_key",
                                 pid_file=self._pid_file(host),
                                 authorized_keys=self.state_dir / "authorized_keys")
            hd.joinpath("sshd_config").write_text(config, encoding="utf-8")
        self.known_hosts_path.write_text("".join(known), encoding="ascii")
        config = ssh_config(self.ssh_config_path, [(h, self.address(h)) for h in self.hosts],
                            identity=self.identity_path, known_hosts=self.known_hosts_path)
        self.ssh_config_path.write_text(config, encoding="utf-8")

    def _make_bridge(self) -> None:
        make_bridge(self.bridge, f"{self.bridge_address}/{self._network.prefixlen}")

    def _make_host(self, host: str) -> None:
        make_netns(self.netns_name(host), self.veth_name(host), self.bridge,
                   f"{self.address(host)}/{self._network.prefixlen}")
        make_mntns(self.mntns_path(host))
        if self.srv_fs == "dir":
            mount_srv_dir(self.mntns_path(host), self.host_dir(host) / "srv")
        else:
            mount_srv_btrfs(self.mntns_path(host), self.srv_image(host), self.srv_size)
        pidns = self.pidns_path(host)
        if pidns is not None:
            make_pidns(self.netns_path(host), self.mntns_path(host), pidns, str(pidns))

    def _start_sshd(self, host: str) -> None:
        hd = self.host_dir(host)
        start_sshd(self.netns_path(host), self.mntns_path(host), hd / "sshd_config",
                   hd / "sshd.log", self.pidns_path(host))

    def _wait_for_sshd(self) -> None:
        deadline = time.monotonic() + SSHD_START_TIMEOUT
        for host in self.hosts:
            while not (self.sshd_pid(host) and tcp_open(self.address(host), SSH_PORT)):
                if time.monotonic() > deadline:
                    raise TestbedError(f"sshd of {host} is not accepting connections on "
                                       f"{self.address(host)}:{SSH_PORT}"
                                       f"{self._sshd_log_tail(host)}")
                time.sleep(0.05)
        for host in self.hosts:
            proc = run(self.ssh_argv(host, ["true"]), check=False, timeout=SSHD_START_TIMEOUT)
            if proc.returncode != 0:
                detail = proc.stderr.strip().replace("\n", "; ") or f"exit {proc.returncode}"
                raise TestbedError(f"`ssh -F {self.ssh_config_path} {host} true` failed: "
                                   f"{detail}{self._sshd_log_tail(host)}")

    def _sshd_log_tail(self, host: str) -> str:
        return sshd_log_tail(self.host_dir(host) / "sshd.log")

    # --- down ---

    def down(self) -> None:
        """Remove everything this testbed made; safe after a partial up and when already down."""
        errors: list[str] = []
        for host in self.hosts:
            for step in (self._stop_host_processes, self._remove_host_mounts,
                         self._remove_host_network, self._remove_host_files):
                _collect(errors, step, host)
        _collect(errors, self._remove_bridge)
        _collect(errors, self._remove_state_dir)
        if errors:
            raise TestbedError("down incomplete: " + "; ".join(errors))

    # A pid namespace pin goes whether or not this testbed gives the host its own pids: an
    # interrupted testbed of another configuration may have left one.

    def _stop_host_processes(self, host: str) -> None:
        pins = (self.netns_path(host), self.mntns_path(host), self._pidns_pin(host))
        ids = {i for i in map(ns_id, pins) if i}
        if ids:
            kill_namespace_members(ids)

    def _remove_host_mounts(self, host: str) -> None:
        remove_pidns(self._pidns_pin(host))
        remove_mntns(self.mntns_path(host), self.srv_image(host))

    def _remove_host_network(self, host: str) -> None:
        remove_netns(self.netns_name(host), self.veth_name(host))

    def _remove_host_files(self, host: str) -> None:
        hd = self.host_dir(host)
        for name in HOST_FILES:
            hd.joinpath(name).unlink(missing_ok=True)
        if hd.joinpath("srv").is_dir():
            shutil.rmtree(hd / "srv")
        if hd.is_dir():
            hd.rmdir()

    def _remove_bridge(self) -> None:
        remove_link(self.bridge)

    def _remove_state_dir(self) -> None:
        for name in TOP_FILES:
            self.state_dir.joinpath(name).unlink(missing_ok=True)
        self.state_dir.joinpath("testbed.json.tmp").unlink(missing_ok=True)
        while str(self.state_dir) in mount_points():
            run(["umount", str(self.state_dir)])
        if self.state_dir.is_dir():
            try:
                self.state_dir.rmdir()
            except OSError:
                leftovers = ", ".join(sorted(p.name for p in self.state_dir.iterdir()))
                raise TestbedError(f"left {self.state_dir}: it holds files the testbed did not "
                                   f"create ({leftovers})") from None

    def __enter__(self) -> Testbed:
        self.up()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()


def _collect(errors: list[str], step: Any, *args: Any) -> None:
    """Run one teardown step; record its error instead of stopping the teardown."""
    try:
        step(*args)
    except (TestbedError, OSError) as exc:
        errors.append(str(exc))


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


# --- CLI -----------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="testbed.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=None,
                        help=f"state directory (default ${STATE_DIR_ENV} or {DEFAULT_STATE_DIR})")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create the hosts (no-op if already up; rebuilt if different)")
    up.add_argument("--hosts", nargs="+", default=list(DEFAULT_HOSTS), metavar="HOST")
    up.add_argument("--own-pids", nargs="+", default=[], metavar="HOST",
                    help="these hosts get a pid namespace of their own (default: none)")
    up.add_argument("--srv-fs", choices=SRV_FS_CHOICES, default="dir",
                    help="what /srv is on each host: a directory, or btrfs on a loop device")
    up.add_argument("--srv-size", type=int, default=DEFAULT_SRV_SIZE, metavar="BYTES",
                    help="size of each sparse btrfs image")
    up.add_argument("--prefix", default=DEFAULT_PREFIX, help="netns and interface name prefix")
    up.add_argument("--bridge", default=None, help="bridge name (default PREFIXbr0)")
    up.add_argument("--subnet", default=DEFAULT_SUBNET, help="private /24 for the links")
    sub.add_parser("down", help="remove everything the testbed made")
    status = sub.add_parser("status", help="show hosts, addresses, sshd pids and health")
    status.add_argument("--ssh-config", action="store_true",
                        help="print only the path of the ssh config file")
    exe = sub.add_parser("exec", help="run a command inside a host: exec HOST -- CMD...")
    exe.add_argument("host")
    exe.add_argument("cmd", nargs=argparse.REMAINDER)
    return parser.parse_args(argv)


def cmd_up(args: argparse.Namespace) -> int:
    bed = Testbed(args.state_dir, hosts=args.hosts, prefix=args.prefix, bridge=args.bridge,
                  subnet=args.subnet, srv_fs=args.srv_fs, srv_size=args.srv_size,
                  own_pids=args.own_pids)
    if not bed.up():
        print(f"testbed already up in {bed.state_dir}")
    print_status(bed)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    try:
        bed = Testbed.from_state(args.state_dir)
    except TestbedError:
        # `up` writes its state before it makes anything else: without it, nothing here is ours
        # but the state dir (a testbed of the default names may belong to another state dir).
        Testbed(args.state_dir)._remove_state_dir()
        print(f"no testbed in {args.state_dir}: nothing to remove")
        return 0
    bed.down()
    print(f"testbed down ({bed.state_dir} removed)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    bed = Testbed.from_state(args.state_dir)
    if args.ssh_config:
        print(bed.ssh_config_path)
        return 0
    return 0 if print_status(bed) else 1


def print_status(bed: Testbed) -> bool:
    print(f"state {bed.state_dir}  bridge {bed.bridge} {bed.bridge_address} on {bed.subnet}  "
          f"/srv: {bed.srv_fs}")
    healthy = True
    for st in bed.status():
        problems = [what for ok, what in ((st.netns, "no netns"), (st.mntns, "no mount ns"),
                                          (st.sshd_pid is not None, "sshd not running"),
                                          (st.listening, "port 22 closed")) if not ok]
        healthy = healthy and not problems
        pids = "; own pids" if bed.pidns_path(st.host) else ""
        print(f"{st.host:<10} {st.address:<15} netns {bed.netns_name(st.host):<15} "
              f"sshd {st.sshd_pid or '-':<8} {'ok' if not problems else ', '.join(problems)}"
              f"{pids}")
    print(f"ssh -F {bed.ssh_config_path} {bed.hosts[0]}")
    return healthy


def cmd_exec(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise TestbedError("exec needs a command: exec HOST -- CMD...")
    bed = Testbed.from_state(args.state_dir)
    returncode = bed.exec(args.host, cmd).returncode
    return returncode if returncode >= 0 else 128 - returncode


COMMANDS = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "exec": cmd_exec}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        needs_root = not (args.command == "status" and args.ssh_config)
        if needs_root and os.geteuid() != 0:
            raise TestbedUnavailable("must run as root (namespaces, mounts and sshd need it)")
        return COMMANDS[args.command](args)
    except TestbedError as exc:
        print(f"testbed: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("testbed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
